"""TD-SpeakerBeam: the model contract (lengths, scale, batch independence, encode once,
checkpointing), float32 gLN statistics under autocast, size, and a one-batch overfit."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator

import pytest
import torch

from dsp.level import rms_scale
from losses.separation import si_sdr
from models.layers.conv_norms import GlobalLayerNorm
from models.registry import constructor_keywords
from models.td_speakerbeam import TDSpeakerBeam, TDSpeakerBeamArgs

SAMPLE_RATE = 48_000
# Tiny but complete: two repeats, so checkpointing crosses a repeat boundary and the last block
# has no residual output; the real kernel/stride, so the padding is that of the recipe.
TINY = {
    "n_filters": 32,
    "bottleneck": 16,
    "hidden": 32,
    "n_blocks": 2,
    "n_repeats": 2,
    "aux_blocks": 1,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny convolutions are faster on one thread than with a thread pool, which on a
    shared machine also competes with other processes (10x slower measured)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def tiny_model(**overrides: int) -> TDSpeakerBeam:
    torch.manual_seed(0)
    return TDSpeakerBeam(**{**TINY, **overrides})


def test_args_and_constructor_agree() -> None:
    signature = inspect.signature(TDSpeakerBeam)
    params = signature.parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["sample_rate"].default == SAMPLE_RATE
    keywords = constructor_keywords(TDSpeakerBeamArgs())
    for name, default in keywords.items():
        assert params[name].default == default, name
    assert set(params) == {"sample_rate"} | set(keywords)


def test_recipe_parameter_count() -> None:
    model = TDSpeakerBeam(**constructor_keywords(TDSpeakerBeamArgs()), sample_rate=SAMPLE_RATE)
    n_params = sum(p.numel() for p in model.parameters())
    assert 6e6 <= n_params <= 7.5e6, n_params
    assert model.sample_rate == SAMPLE_RATE
    assert model.grad_checkpoint is False


@pytest.mark.parametrize(
    ("n_mix", "n_ref"), [(9_601, 9_600), (4_799, 14_401), (9_600, 500), (97, 96)]
)
def test_output_length_equals_input_length(n_mix: int, n_ref: int) -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, n_mix), torch.randn(2, n_ref))
    assert out.shape == (2, n_mix)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_scales_with_the_mixture() -> None:
    model = tiny_model().eval()
    mix, ref = torch.randn(2, 9_601), torch.randn(2, 4_800)
    with torch.no_grad():
        est = model(mix, ref)
        for a in (1e-3, 7.0):
            torch.testing.assert_close(model(a * mix, ref), a * est, atol=1e-5 * a, rtol=1e-4)
        # ... and not with the reference: it is normalised before the auxiliary network.
        torch.testing.assert_close(model(mix, 20 * ref), est, atol=1e-5, rtol=1e-4)


def test_batch_items_are_independent() -> None:
    model = tiny_model().eval()
    mix, ref = torch.randn(2, 9_601), torch.randn(2, 7_201)
    with torch.no_grad():
        out = model(mix, ref)
        mix2, ref2 = mix.clone(), ref.clone()
        mix2[1], ref2[1] = 5 * torch.randn(9_601), torch.randn(7_201)
        out2 = model(mix2, ref2)
        alone = model(mix[:1], ref[:1])
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], out2[0], atol=1e-5, rtol=1e-4)


def test_encode_once_then_extract() -> None:
    model = tiny_model().eval()
    mix, ref = torch.randn(2, 9_601), torch.randn(2, 6_000)
    with torch.no_grad():
        whole = model(mix, ref)
        z_ref = model.encode_reference(ref)
        assert z_ref.shape == (2, TINY["bottleneck"])
        torch.testing.assert_close(model.extract(mix, z_ref), whole, atol=0, rtol=0)
        # A window that is the whole signal, with the recording's scale passed in.
        windowed = model.extract(mix, z_ref, scale=rms_scale(mix))
        torch.testing.assert_close(windowed, whole, atol=0, rtol=0)
        est, aux = model(mix, ref, with_aux=True)
    torch.testing.assert_close(est, whole, atol=0, rtol=0)
    assert aux == {}


def test_the_reference_steers_the_output() -> None:
    model = tiny_model().eval()
    # Give the embedding weight: at initialisation its values are small and alike.
    with torch.no_grad():
        model.aux_out.weight.mul_(20)
        mix = torch.randn(1, 9_600)
        a = model(mix, torch.randn(1, 9_600))
        b = model(mix, torch.randn(1, 9_600).cumsum(-1))  # another, low-pass spectrum
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_checkpointing_gives_equal_outputs_and_gradients() -> None:
    plain = tiny_model().train()
    ckpt = tiny_model().train()
    ckpt.grad_checkpoint = True  # a runtime setting (train.grad_checkpoint), not a model arg
    ckpt.load_state_dict(plain.state_dict())
    mix, ref = torch.randn(2, 9_601), torch.randn(2, 4_801)
    outs, grads = [], []
    for model in (plain, ckpt):
        out = model(mix, ref)
        out.pow(2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads[0].values()), "every parameter gets a gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("level", [1e-6, 0.0])
def test_near_silence_under_autocast_is_finite(dtype: torch.dtype, level: float) -> None:
    model = tiny_model().train()
    mix, ref = level * torch.randn(2, 4_801), level * torch.randn(2, 4_801)
    with torch.autocast("cpu", dtype=dtype):
        out = model(mix, ref)
    assert out.shape == (2, 4_801)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gln_statistics_are_float32(dtype: torch.dtype) -> None:
    # Activations around 1e-3: their variance (1e-6) is subnormal in float16 and the epsilon
    # (1e-8) rounds to zero there; statistics in the input dtype would be off or infinite.
    norm = GlobalLayerNorm(8)
    x = (1e-3 * torch.randn(2, 8, 50)).to(dtype)
    y = norm(x)
    assert y.dtype == dtype
    x64 = x.double()
    mean = x64.mean(dim=(1, 2), keepdim=True)
    var = (x64 - mean).pow(2).mean(dim=(1, 2), keepdim=True)
    expected = (x64 - mean) / (var + 1e-8).sqrt()
    torch.testing.assert_close(y.double(), expected, atol=2e-2, rtol=1e-2)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="conv_kernel"):
        tiny_model(conv_kernel=4)
    with pytest.raises(ValueError, match="adapt_block"):
        tiny_model(adapt_block=4)
    with pytest.raises(ValueError, match="stride"):
        tiny_model(stride=200)
    with pytest.raises(ValueError, match="reference"):
        tiny_model().encode_reference(torch.randn(1, 50))


def _tones(gen: torch.Generator, n: int, low_hz: float, high_hz: float) -> torch.Tensor:
    """Four sinusoids of random frequency in [low_hz, high_hz) and random phase. Shape: (1, n)"""
    t = torch.arange(n) / SAMPLE_RATE
    freq = low_hz + (high_hz - low_hz) * torch.rand(4, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(4, 1, generator=gen)
    return torch.sin(2 * math.pi * freq * t + phase).sum(0, keepdim=True)


def test_overfits_one_batch() -> None:
    # Random signals in separable bands, so that the tiny model can learn it in a few steps;
    # the reference is another signal of the target's band.
    n = SAMPLE_RATE // 5  # 0.2 s
    gen = torch.Generator().manual_seed(0)
    target = _tones(gen, n, 100, 2_000)
    mix = target + 0.5 * _tones(gen, n, 6_000, 16_000)
    ref = _tones(gen, n, 100, 2_000)
    model = tiny_model().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = -si_sdr(model(mix, ref), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = si_sdr(model.eval()(mix, ref), target).item()
    assert min(losses[-5:]) < losses[0]
    assert final > si_sdr(mix, target).item() + 3.0, (final, losses[::10])
