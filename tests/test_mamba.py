"""Mamba layers (models/layers/mamba.py) against a float64 loop over time, mamba-ssm's parameter
layout, the BiMamba reversal symmetry, the fused CUDA kernel where there is one; and the hifi_tse
generator with ``model.sequence_layer=mamba`` keeping the family contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError, load_config, model_kwargs
from models.hifi_tse.tf_gridnet import use_float32_lstms
from models.layers import mamba
from models.layers.mamba import DT_MAX, DT_MIN, BiMamba, Mamba, selective_scan
from models.registry import (
    CheckpointError,
    build_model,
    checkpoint_payload,
    load_model,
    normalised_args,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
MAMBA = ["model.sequence_layer=mamba"]
# Lengths: 1, odd, even, a power of two, the recipe's 53 bands and 401 frames.
LENGTHS = [1, 2, 3, 7, 16, 53, 100, 401]
NEW_KEYS = ("sequence_layer", "mamba_d_state", "mamba_expand")


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# Sequential float64 references
# ---------------------------------------------------------------------------------------------


def reference_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """y_t = C_t h_t + D u_t, h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t: a loop over time
    in float64. Shape: u, delta (B, L, E), A (E, N), B, C (B, L, N), D (E,) -> (B, L, E)."""
    u, delta, A, B, C, D = (t.double() for t in (u, delta, A, B, C, D))
    h = torch.zeros(u.shape[0], *A.shape, dtype=torch.float64)  # (B, E, N)
    ys = []
    for t in range(u.shape[1]):
        dt = delta[:, t, :, None]  # (B, E, 1)
        h = torch.exp(dt * A) * h + dt * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, dim=1)


def reference_mamba(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """The Mamba mixer written out in float64 from ``layer``'s weights, convolution as a sum of
    shifted taps. Shape: (B, L, D) -> (B, L, D)."""
    w = {k: v.detach().double() for k, v in layer.state_dict().items()}
    length, n = x.shape[1], layer.d_state
    u, z = (x.double() @ w["in_proj.weight"].T).chunk(2, dim=-1)  # (B, L, E)
    taps = w["conv1d.weight"][:, 0]  # (E, K)
    k = taps.shape[1]
    padded = F.pad(u, (0, 0, k - 1, 0))  # k - 1 zeros before the first frame
    u = F.silu(w["conv1d.bias"] + sum(taps[:, i] * padded[:, i : i + length] for i in range(k)))
    dt, B, C = (u @ w["x_proj.weight"].T).split([layer.dt_rank, n, n], dim=-1)
    delta = F.softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])
    y = reference_scan(u, delta, -torch.exp(w["A_log"]), B, C, w["D"]) * F.silu(z)
    return y @ w["out_proj.weight"].T


def scan_inputs(
    batch: int, length: int, e: int, n: int, dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    """u, delta, A, B, C, D with step sizes and decay rates spread over orders of magnitude, so
    that some channels remember the whole sequence and others forget within a step."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    tensors = [
        randn(batch, length, e),
        F.softplus(2 * randn(batch, length, e)),
        -torch.exp(2 * randn(e, n)),
        randn(batch, length, n),
        randn(batch, length, n),
        randn(e),
    ]
    return [t.to(dtype).requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------
# The scan and the layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_parallel_scan_and_its_gradients_equal_the_sequential_reference(length: int) -> None:
    inputs = scan_inputs(2, length, 6, 4, torch.float64)
    y_scan, y_ref = selective_scan(*inputs), reference_scan(*inputs)
    torch.testing.assert_close(y_scan, y_ref, atol=1e-12, rtol=1e-10)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(2, length, 6, dtype=torch.float64, generator=gen)
    grads_scan = torch.autograd.grad((y_scan * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), inputs)
    for name, ours, ref in zip(("u", "delta", "A", "B", "C", "D"), grads_scan, grads_ref,
                               strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-11, rtol=1e-9, msg=f"d/d{name}")


@pytest.mark.parametrize("length", [53, 401])
def test_float32_scan_is_close_to_the_float64_reference(length: int) -> None:
    inputs = scan_inputs(2, length, 8, 16, torch.float32)
    with torch.no_grad():
        ours, ref = selective_scan(*inputs).double(), reference_scan(*inputs)
    # Relative to the largest output: a small y_t is a sum of large terms that cancel.
    torch.testing.assert_close(ours, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("length", [1, 37, 64])
def test_layer_equals_a_float64_sequential_layer_with_the_same_weights(length: int) -> None:
    torch.manual_seed(0)
    layer = Mamba(d_model=24, d_state=8, backend="torch")
    x = torch.randn(3, length, 24)
    with torch.no_grad():
        ref = reference_mamba(layer, x)
        scale = ref.abs().max().item()
        torch.testing.assert_close(layer(x).double(), ref, atol=1e-5 * scale, rtol=1e-5)
        # In float64 throughout (the scan follows the model's dtype above float32): exact.
        torch.testing.assert_close(layer.double()(x.double()), ref, atol=1e-12, rtol=1e-10)


def test_bf16_autocast_gives_finite_gradients_with_the_scan_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scanned: set[torch.dtype] = set()
    scan = mamba._scan_

    def recording_scan(a: torch.Tensor, x: torch.Tensor, *, reverse: bool = False) -> None:
        scanned.update((a.dtype, x.dtype))
        scan(a, x, reverse=reverse)

    monkeypatch.setattr(mamba, "_scan_", recording_scan)
    torch.manual_seed(0)
    layer = BiMamba(d_model=16)
    x = torch.randn(2, 29, 16, requires_grad=True)
    with torch.no_grad():
        full = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16, "the projections run under autocast"
    y.float().square().mean().backward()
    assert scanned == {torch.float32}, "forward and backward scans run in float32"
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert (y.float() - full).norm() < 0.05 * full.norm(), "bf16 stays near float32"


def test_state_dict_has_mamba_ssm_layout_and_initialisation() -> None:
    # mamba_ssm.modules.mamba_simple.Mamba(d_model=32): d_inner 64, dt_rank ceil(32/16) = 2,
    # d_state 16, d_conv 4, no projection biases, in this order.
    expected = [
        ("A_log", (64, 16)),
        ("D", (64,)),
        ("in_proj.weight", (128, 32)),
        ("conv1d.weight", (64, 1, 4)),
        ("conv1d.bias", (64,)),
        ("x_proj.weight", (34, 64)),
        ("dt_proj.weight", (64, 2)),
        ("dt_proj.bias", (64,)),
        ("out_proj.weight", (32, 64)),
    ]
    torch.manual_seed(0)
    layer = Mamba(d_model=32)
    state = layer.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    assert all(v.dtype == torch.float32 for v in state.values())
    torch.testing.assert_close(state["A_log"], torch.arange(1.0, 17.0).log().expand(64, 16))
    torch.testing.assert_close(state["D"], torch.ones(64))
    dt = F.softplus(state["dt_proj.bias"])
    assert DT_MIN * (1 - 1e-5) <= dt.min() <= dt.max() <= DT_MAX * (1 + 1e-5)
    assert state["dt_proj.weight"].abs().max() <= 2**-0.5

    bi = BiMamba(d_model=32).state_dict()
    assert [k for k in bi if k.startswith("fwd.")] == [f"fwd.{k}" for k, _ in expected]
    assert [k for k in bi if k.startswith("bwd.")] == [f"bwd.{k}" for k, _ in expected]
    assert tuple(bi["proj.weight"].shape) == (32, 64)


def test_bimamba_reversed_input_with_swapped_directions_gives_reversed_output() -> None:
    d = 8
    torch.manual_seed(0)
    layer = BiMamba(d_model=d).double()
    state = layer.state_dict()
    # The forward direction's weights go to the backward one and vice versa; the projection's
    # two input halves (one per direction) swap with them.
    other = {"fwd": "bwd", "bwd": "fwd"}
    swapped = {}
    for key, value in state.items():
        direction, _, name = key.partition(".")
        swapped[f"{other[direction]}.{name}" if direction in other else key] = value
    w = state["proj.weight"]  # (D, 2D): [forward | backward] columns
    swapped["proj.weight"] = torch.cat([w[:, d:], w[:, :d]], dim=1)
    mirror = BiMamba(d_model=d).double()
    mirror.load_state_dict(swapped)
    x = torch.randn(2, 13, d, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mirror(x.flip(1)), layer(x).flip(1), atol=1e-12, rtol=1e-10)


def test_backend_is_checked() -> None:
    with pytest.raises(ValueError, match="backend 'tpu'"):
        Mamba(d_model=8, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs a CUDA input"):
        Mamba(d_model=8, backend="cuda")(torch.randn(1, 5, 8))


def _outputs_and_grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.float().square().mean().backward()
    return [y.detach().float(), x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_scan_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    layer = BiMamba(d_model=32, backend="torch")
    x = torch.randn(4, 101, 32)
    cpu = _outputs_and_grads(layer, x)
    cuda = _outputs_and_grads(layer.cuda(), x.cuda())
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3)


NO_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is None


@pytest.mark.skipif(NO_MAMBA_SSM, reason="needs mamba_ssm")
def test_same_seed_draws_the_weights_of_mamba_ssm() -> None:
    from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM

    torch.manual_seed(0)
    theirs = MambaSSM(d_model=64).state_dict()
    torch.manual_seed(0)
    ours = Mamba(d_model=64).state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=0, rtol=0, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(NO_MAMBA_SSM, reason="needs mamba_ssm (the fused kernel)")
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_cuda_kernel_equals_the_torch_scan(autocast: bool) -> None:
    torch.manual_seed(0)
    fused = Mamba(d_model=64, backend="cuda").cuda()
    scan = Mamba(d_model=64, backend="torch").cuda()
    scan.load_state_dict(fused.state_dict())
    x = torch.randn(3, 401, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        results = [_outputs_and_grads(layer, x) for layer in (fused, scan)]
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-4, "rtol": 1e-3}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------------------------
# The hifi_tse generator with Mamba sequence layers
# ---------------------------------------------------------------------------------------------


def tiny_mamba() -> nn.Module:
    torch.manual_seed(0)
    return build_model(model_kwargs(load_config(TINY, MAMBA)))


def signals(batch: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, n, generator=gen), 0.1 * torch.randn(batch, m, generator=gen)


def test_sequence_layer_replaces_only_the_lstm_paths() -> None:
    lstm = build_model(model_kwargs(load_config(TINY)))
    model = tiny_mamba()
    assert use_float32_lstms(model) == 0
    assert not any(isinstance(m, nn.LSTM) for m in model.modules())
    for block in model.blocks:
        assert isinstance(block.intra.mamba, BiMamba)
        assert isinstance(block.inter.mamba, BiMamba)

    def outside_paths(net: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in net.state_dict().items()
                if ".intra." not in k and ".inter." not in k}

    assert outside_paths(model) == outside_paths(lstm)


def test_unknown_sequence_layer_is_an_error_naming_the_key() -> None:
    # At load, before any model is built (config.check_ranges) ...
    with pytest.raises(ConfigError, match=r"config key 'model\.sequence_layer'.*'gru'"):
        load_config(TINY, ["model.sequence_layer=gru"])
    # ... and by the model itself, for a caller that builds one from a dict.
    args = {**model_kwargs(load_config(TINY)), "sequence_layer": "gru"}
    with pytest.raises(ValueError, match=r"model\.sequence_layer 'gru'"):
        build_model(args)


@pytest.mark.parametrize(("n", "m"), [(9_601, 7_203), (4_799, 12_001)])
def test_mamba_generator_output_has_exactly_the_mixture_length(n: int, m: int) -> None:
    model = tiny_mamba().eval()
    mix, ref = signals(2, n, m)
    with torch.inference_mode():  # as inference.py runs it
        est = model(mix, ref)
    assert est.shape == (2, n)
    assert torch.isfinite(est).all()


def test_mamba_generator_is_scale_equivariant() -> None:
    model = tiny_mamba().eval()
    mix, ref = signals(1, 9_600, 9_600)
    with torch.no_grad():
        est = model(mix, ref)
        for a in (1e-3, 7.0):
            torch.testing.assert_close(model(a * mix, ref), a * est, atol=1e-5 * a, rtol=1e-4)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_mamba_generator_gradients_are_finite(dtype: torch.dtype | None) -> None:
    model = tiny_mamba().train()
    mix, ref = signals(2, 4_800, 4_800)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        est = model(mix, ref)
    est.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_mamba_generator_gradients_equal_with_and_without_checkpointing() -> None:
    model = tiny_mamba().train()
    mix, ref = signals(1, 4_800, 4_800)
    outs, grads = [], []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        model.zero_grad(set_to_none=True)
        est = model(mix, ref)
        est.square().mean().backward()
        outs.append(est.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for a, b in zip(*grads, strict=True):
        # The same ops; only the order in which autograd accumulates may differ.
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_mamba_checkpoint_round_trip_through_the_registry(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = model_kwargs(load_config(TINY, MAMBA))
    assert args["sequence_layer"] == "mamba"
    model = build_model(args).eval()
    torch.save(checkpoint_payload(model, args), tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt").eval()
    mix, ref = signals(1, 4_801, 4_800)
    with torch.no_grad():
        torch.testing.assert_close(again(mix, ref), model(mix, ref), atol=0, rtol=0)
    # Mamba weights do not fit an LSTM model: a clear error, not a silent partial load.
    lstm_args = {k: v for k, v in args.items() if k not in NEW_KEYS}
    torch.save(checkpoint_payload(model, lstm_args), tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "mismatch.pt")


def test_checkpoint_without_the_key_loads_as_lstm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = model_kwargs(load_config(TINY))
    model = build_model(args).eval()
    old_args = {k: v for k, v in args.items() if k not in NEW_KEYS}  # written before the key
    assert normalised_args(old_args) == args, "train.py resumes an older run"
    torch.save(checkpoint_payload(model, old_args), tmp_path / "old.pt")
    again = load_model(tmp_path / "old.pt").eval()
    assert use_float32_lstms(again, enabled=False) == 2 * len(again.blocks)
    mix, ref = signals(1, 4_800, 4_800)
    with torch.no_grad():
        torch.testing.assert_close(again(mix, ref), model(mix, ref), atol=0, rtol=0)


def test_adamw_leaves_a_log_and_d_undecayed() -> None:
    """As mamba-ssm: weight decay would pull every channel's A towards -1 and the skip D to 0.
    One AdamW step with zero gradients moves only the decayed parameters."""
    from training.nets import param_groups

    model = tiny_mamba()
    groups = param_groups(model, weight_decay=0.1)
    exempt = {id(p) for p in groups[1]["params"]}
    named = {id(p): name for name, p in model.named_parameters()}
    assert {named[i].rsplit(".", 1)[-1] for i in exempt} == {"A_log", "D"}
    assert len(exempt) == 2 * 2 * 2 * len(model.blocks)  # 2 paths x 2 directions per block
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (id(p) not in exempt and bool(before[name].abs().sum() > 0)), name
    # An LSTM generator has nothing tagged: one group, so its optimizer states still resume.
    lstm = build_model(model_kwargs(load_config(TINY)))
    assert len(param_groups(lstm, weight_decay=0.1)) == 1


@pytest.mark.parametrize("base", ["hifi_tse.yaml", "tiny.yaml"])
def test_the_mamba_config_layers_on_the_recipe_and_the_tiny_config(base: str) -> None:
    configs = REPO / "configs"
    lstm = model_kwargs(load_config(configs / base))
    layered = model_kwargs(load_config([configs / base, configs / "hifi_tse_mamba.yaml"]))
    assert layered.pop("sequence_layer") == "mamba"
    assert lstm.pop("sequence_layer") == "lstm"
    assert layered == lstm  # mamba_d_state and mamba_expand are the defaults the recipe has
