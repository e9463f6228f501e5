"""SpEx+: the family contract (lengths, scale, batch independence, encode once), the valid-frame
speaker average, checkpointing, bf16 with near-silent input, size, and a short overfit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from losses.separation import si_sdr_loss
from models.layers.conv_norms import GlobalLayerNorm
from models.registry import constructor_keywords
from models.spex_plus import SpExPlus, SpExPlusArgs

SR = 48_000
N_SAMPLES = SR // 5  # 0.2 s
TINY = {
    "n_filters": 16,
    "spk_channels": 16,
    "spk_hidden": 16,
    "embed_dim": 16,
    "n_resnet": 1,
    "bottleneck": 16,
    "hidden": 16,
    "n_stacks": 2,
    "n_blocks": 2,
    "n_speakers": 5,
}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The cores are shared: two intra-op threads of these tiny convolutions fight other
    processes and run many times slower than one (as in test_evaluate.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> SpExPlus:
    torch.manual_seed(0)
    return SpExPlus(sample_rate=SR, **{**TINY, **overrides})


def waves(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def test_recipe_builds_from_its_args_with_about_11m_parameters() -> None:
    model = SpExPlus(sample_rate=SR, **constructor_keywords(SpExPlusArgs()))
    n_params = sum(p.numel() for p in model.parameters())
    assert 10e6 < n_params < 12.5e6
    keywords = constructor_keywords(SpExPlusArgs())
    with_head = SpExPlus(sample_rate=SR, **{**keywords, "n_speakers": 101})
    assert sum(p.numel() for p in with_head.parameters()) == n_params + 101 * (256 + 1)
    # One speech encoder (3 filterbanks) serves both paths.
    assert sum(isinstance(m, torch.nn.Conv1d) and m.in_channels == 1 for m in model.modules()) == 3


def test_constructor_defaults_match_the_dataclass() -> None:
    import inspect

    params = inspect.signature(SpExPlus).parameters
    for name, value in constructor_keywords(SpExPlusArgs()).items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == value, name
    assert params["sample_rate"].default == SR


@pytest.mark.parametrize(
    ("n_mix", "n_ref"), [(N_SAMPLES, N_SAMPLES), (9_601, 7_000), (4_799, 12_345), (100, 1_000)]
)
def test_exact_lengths_and_aux_outputs(n_mix: int, n_ref: int) -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        est, aux = model(waves(2, n_mix), waves(2, n_ref, seed=2), with_aux=True)
    assert est.shape == (2, n_mix)
    assert set(aux) == {"est_middle", "est_long", "speaker_logits"}
    assert aux["est_middle"].shape == aux["est_long"].shape == (2, n_mix)
    assert aux["speaker_logits"].shape == (2, TINY["n_speakers"])
    assert all(torch.isfinite(t).all() for t in (est, *aux.values()))


def test_no_head_no_logits() -> None:
    model = tiny_model(n_speakers=0).eval()
    with torch.no_grad():
        _, aux = model(waves(1, N_SAMPLES), waves(1, N_SAMPLES, seed=2), with_aux=True)
    assert set(aux) == {"est_middle", "est_long"}


def test_scale_equivariant_for_all_three_estimates() -> None:
    model = tiny_model().eval()
    mix, ref = waves(2, N_SAMPLES), waves(2, 7_000, seed=2)
    with torch.no_grad():
        est, aux = model(mix, ref, with_aux=True)
        for a in (3.7, 1e-3):
            est_a, aux_a = model(a * mix, 0.5 * ref, with_aux=True)
            torch.testing.assert_close(est_a, a * est, rtol=1e-4, atol=1e-6 * a)
            for key in ("est_middle", "est_long"):
                torch.testing.assert_close(aux_a[key], a * aux[key], rtol=1e-4, atol=1e-6 * a)
            torch.testing.assert_close(aux_a["speaker_logits"], aux["speaker_logits"])


def test_batch_items_independent_in_eval() -> None:
    model = tiny_model().eval()
    mix, ref = waves(2, 9_601), waves(2, 7_000, seed=2)
    ref[1] *= 50.0  # a loud neighbour must not change item 0
    with torch.no_grad():
        both = model(mix, ref)
        alone = model(mix[:1], ref[:1])
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-5)


def test_encode_once_then_extract_equals_forward() -> None:
    model = tiny_model().eval()
    mix, ref = waves(2, 4_799), waves(2, 9_000, seed=2)
    with torch.no_grad():
        z_ref = model.encode_reference(ref)
        assert z_ref.shape == (2, TINY["embed_dim"])
        torch.testing.assert_close(model.extract(mix, z_ref), model(mix, ref))
        # A caller-given scale is the level in and out.
        scale = torch.tensor([[2.0], [0.1]])
        est = model.extract(mix, z_ref, scale=scale)
        torch.testing.assert_close(
            est, model.extract(mix / scale, z_ref, scale=torch.ones(2, 1)) * scale
        )


def test_padded_reference_with_lengths_embeds_as_alone() -> None:
    """The speaker average runs over the valid frames only (eval mode: BN uses running stats)."""
    model = tiny_model(n_resnet=2).eval()
    short, long = waves(1, 5_000, seed=3), waves(1, 9_000, seed=4)
    padded = torch.cat([F.pad(short, (0, 4_000)), long])
    with torch.no_grad():
        z = model.encode_reference(padded, ref_lengths=torch.tensor([5_000, 9_000]))
        torch.testing.assert_close(z[:1], model.encode_reference(short), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z[1:], model.encode_reference(long), rtol=1e-5, atol=1e-6)
        # Without the lengths the zeros count: a different embedding.
        assert not torch.allclose(model.encode_reference(padded)[:1], z[:1], atol=1e-3)


def test_grad_checkpoint_gives_equal_outputs_and_gradients() -> None:
    model = tiny_model().train()
    mix, ref, target = waves(2, 9_601), waves(2, 7_000, seed=2), waves(2, 9_601, seed=3)
    labels = torch.tensor([1, 3])

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        est, aux = model(mix, ref, with_aux=True)
        loss = (
            si_sdr_loss(est, target)
            + si_sdr_loss(aux["est_middle"], target)
            + si_sdr_loss(aux["est_long"], target)
            + F.cross_entropy(aux["speaker_logits"], labels)
        )
        loss.backward()
        return est.detach(), [p.grad.clone() for p in model.parameters()]

    est_plain, grads_plain = step()
    model.grad_checkpoint = True
    est_ckpt, grads_ckpt = step()
    torch.testing.assert_close(est_ckpt, est_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain)


def test_near_silent_input_under_bf16_autocast_is_finite() -> None:
    model = tiny_model().train()
    mix, ref = 1e-6 * waves(2, N_SAMPLES), 1e-6 * waves(2, 7_000, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est, aux = model(mix, ref, with_aux=True)
        loss = est.float().square().mean() + aux["speaker_logits"].float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(est).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # A caller-given unit scale lets the near-silent level reach the norms themselves.
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_ref = model.encode_reference(ref)
        est = model.extract(mix, z_ref, scale=torch.ones(2, 1))
    est.float().square().sum().backward()
    assert torch.isfinite(est).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gln_statistics_are_float32(dtype: torch.dtype) -> None:
    """Quiet activations (variance 1e-6: its square underflows in fp16) normalise as float32."""
    norm = GlobalLayerNorm(8)
    x = 1e-3 * waves(2, 8 * 50).view(2, 8, 50)
    expected = norm(x)  # float32
    y = norm(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02)
    assert 0.9 < expected.std() < 1.1


def test_overfits_one_tiny_batch() -> None:
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(5)
    t = torch.arange(N_SAMPLES) / SR
    target = torch.sin(2 * torch.pi * 440.0 * t)[None] * (1 + torch.rand(2, 1, generator=gen))
    mix = target + 0.5 * torch.randn(2, N_SAMPLES, generator=gen)
    ref = torch.sin(2 * torch.pi * 440.0 * t[:7_000])[None].repeat(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        est, aux = model(mix, ref, with_aux=True)
        loss = (
            0.8 * si_sdr_loss(est, target)
            + 0.1 * si_sdr_loss(aux["est_middle"], target)
            + 0.1 * si_sdr_loss(aux["est_long"], target)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 3.0, losses  # at least 3 dB better SI-SDR
