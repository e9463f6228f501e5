"""Generator: band layout, mask decoding, lengths, batch independence, checkpointing, size."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from config import Config, load_config, model_kwargs
from dsp.stft import STFT
from models.hifi_tse.band_split import BandMergeDecoder, BandSplitEncoder, band_layout
from models.hifi_tse.generator import Generator
from models.registry import CheckpointError, build_model, checkpoint_payload, load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    return build_model(model_kwargs(load_config(CONFIGS / "tiny.yaml")))


def recipe_bands() -> list[tuple[int, int]]:
    cfg = load_config(CONFIGS / "hifi_tse.yaml")
    return band_layout(
        sample_rate=cfg.stft.sample_rate,
        n_fft=cfg.stft.n_fft,
        band_regions=cfg.model.band_regions,
        band_overlap=cfg.model.band_overlap,
    )


def test_band_layout_of_the_recipe() -> None:
    bands = recipe_bands()
    assert len(bands) == 53
    covered = torch.zeros(1025, dtype=torch.bool)
    for start, end in bands:
        assert 0 <= start < end <= 1025
        covered[start:end] = True
    assert covered.all(), "every bin 0..1024 belongs to a band"
    for (s0, e0), (s1, e1) in itertools.pairwise(bands):
        assert s0 < s1, "bands run from low to high"
        assert e0 < e1, "bands run from low to high"
        assert s1 < e0, "neighbours overlap"
    # Widths grow with frequency: every band of a higher region is wider than every band of a
    # lower one (fine 0-1 kHz: 10 bands, medium 1-8 kHz: 28, coarse 8-24 kHz: 15).
    widths = [e - s for s, e in bands]
    fine, medium, coarse = widths[:10], widths[10:38], widths[38:]
    assert max(fine) < min(medium)
    assert max(medium) < min(coarse)


def test_band_layout_rejects_bad_regions() -> None:
    with pytest.raises(ValueError, match="tile"):
        band_layout(
            sample_rate=48_000,
            n_fft=2048,
            band_regions=[[0, 1000, 4], [2000, 24000, 4]],
            band_overlap=0.1,
        )
    with pytest.raises(ValueError, match="Nyquist"):
        band_layout(sample_rate=48_000, n_fft=2048, band_regions=[[0, 8000, 4]], band_overlap=0.1)


def test_band_layout_at_a_lower_rate_keeps_the_bands_below_nyquist() -> None:
    # The recipe's 48 kHz regions at 24 kHz with the same bin width (23.4 Hz): the bands below
    # 12 kHz keep their bins, those above are dropped, and the last one kept ends at Nyquist.
    cfg = load_config(CONFIGS / "hifi_tse.yaml")
    full = recipe_bands()
    half = band_layout(sample_rate=24_000, n_fft=1024, band_regions=cfg.model.band_regions,
                       band_overlap=cfg.model.band_overlap)
    n_bins = 1024 // 2 + 1
    assert half[-1][1] == n_bins
    # the same bins below the cut (the two bands at it may differ in their overlap)
    assert half[:-2] == full[: len(half) - 2]
    assert len(half) < len(full)
    assert all(start < n_bins for start, _ in half)
    # At 48 kHz nothing changes; a layout that stops short of Nyquist is still refused.
    assert recipe_bands() == full
    with pytest.raises(ValueError, match="Nyquist"):
        band_layout(sample_rate=24_000, n_fft=1024, band_regions=[[0, 8000, 4]],
                    band_overlap=0.1)


def test_unit_mask_returns_the_input() -> None:
    bands = recipe_bands()
    stft = STFT()
    decoder = BandMergeDecoder(bands=bands, feature_dim=8, mask_hidden=4, n_bins=stft.n_bins)
    wave = torch.randn(2, 48_017, generator=torch.Generator().manual_seed(1))
    spec = stft(wave)
    n_valid = int(decoder.merge_index.numel())
    ones = torch.zeros(2, spec.shape[-1], n_valid, 2)
    ones[..., 0] = 1.0  # mask 1 + 0j in every band, merged by normalised overlap-add
    out = stft.inverse(decoder.merge(ones) * spec, wave.shape[-1])
    assert (out - wave).abs().max().item() < 1e-4


def test_complex_mask_is_a_true_complex_product() -> None:
    bands = recipe_bands()
    stft = STFT()
    decoder = BandMergeDecoder(bands=bands, feature_dim=8, mask_hidden=4, n_bins=stft.n_bins)
    spec = stft(torch.randn(1, 9600))
    masks = torch.zeros(1, spec.shape[-1], int(decoder.merge_index.numel()), 2)
    masks[..., 1] = 1.0  # the mask j rotates every bin by 90 degrees
    torch.testing.assert_close(decoder.merge(masks) * spec, 1j * spec)


def test_encoder_ignores_bins_outside_a_band() -> None:
    bands = [(0, 3), (2, 6)]
    enc = BandSplitEncoder(bands=bands, feature_dim=4)
    spec = torch.randn(1, 6, 5, dtype=torch.complex64)
    out = enc(spec)
    assert out.shape == (1, 5, 2, 4)
    spec2 = spec.clone()
    spec2[:, 5] *= 10  # bin 5 is only in band 1
    out2 = enc(spec2)
    torch.testing.assert_close(out[:, :, 0], out2[:, :, 0])
    assert not torch.allclose(out[:, :, 1], out2[:, :, 1])


@pytest.mark.parametrize(("n_mix", "n_ref"), [(24_001, 24_001), (19_207, 31_001), (4_801, 961)])
def test_output_length_equals_input_length(n_mix: int, n_ref: int) -> None:
    model = tiny_generator().eval()
    with torch.no_grad():
        out = model(torch.randn(2, n_mix), torch.randn(2, n_ref))
    assert out.shape == (2, n_mix)
    assert torch.isfinite(out).all()


def test_batch_items_are_independent() -> None:
    model = tiny_generator().eval()
    mix, ref = torch.randn(3, 9_601), torch.randn(3, 7_201)
    with torch.no_grad():
        out = model(mix, ref)
        mix2, ref2 = mix.clone(), ref.clone()
        mix2[1:] = torch.randn(2, 9_601) * 5
        ref2[1:] = torch.randn(2, 7_201)
        out2 = model(mix2, ref2)
        alone = model(mix[:1], ref[:1])
    torch.testing.assert_close(out[0], out2[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-4)


def test_output_scales_with_the_mixture() -> None:
    model = tiny_generator().eval()
    mix, ref = torch.randn(1, 9_600), torch.randn(1, 9_600)
    with torch.no_grad():
        torch.testing.assert_close(model(3 * mix, ref), 3 * model(mix, ref), atol=1e-4, rtol=1e-4)


def test_checkpointing_gives_equal_outputs_and_gradients() -> None:
    plain = tiny_generator().train()
    ckpt = tiny_generator().train()
    ckpt.grad_checkpoint = True  # a runtime setting (train.grad_checkpoint), not a model arg
    ckpt.load_state_dict(plain.state_dict())
    mix, ref = torch.randn(2, 14_401), torch.randn(2, 9_601)
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
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "film" not in n), (
        "every parameter gets a gradient"
    )


def test_forward_under_bf16_autocast() -> None:
    model = tiny_generator().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 9_600), torch.randn(1, 9_600))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_recipe_parameter_count() -> None:
    model = build_model(model_kwargs(load_config(CONFIGS / "hifi_tse.yaml")))
    n_params = sum(p.numel() for p in model.parameters())
    assert 10.5e6 <= n_params <= 12.5e6, n_params
    assert len(model.bands) == 53
    assert model_kwargs(Config()) == model_kwargs(load_config(CONFIGS / "hifi_tse.yaml"))


def test_rebuild_from_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml")
    model = tiny_generator().eval()
    path = tmp_path / "gen.pt"
    torch.save(checkpoint_payload(model, model_kwargs(cfg)), path)
    again = load_model(path).eval()
    mix, ref = torch.randn(1, 4_800), torch.randn(1, 4_800)
    with torch.no_grad():
        torch.testing.assert_close(again(mix, ref), model(mix, ref))


def test_non_checkpoint_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=str(junk)):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a HiFi-TSE checkpoint"):
        load_model(other)
    # Weights of another version of the generator (here: one parameter missing).
    model = tiny_generator()
    args = model_kwargs(load_config(CONFIGS / "tiny.yaml"))
    payload = checkpoint_payload(model, args)
    del payload["generator"]["encoder.energy_weight"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(CheckpointError, match=f"{old}: weights do not fit this model"):
        load_model(old)


def test_film_tells_voices_apart_by_spectrum_not_by_phase() -> None:
    """Band-split features are linear in Re/Im, so a voice's features change sign with the
    phase and average to ~0 over time whatever the voice. FiLM's statistics pooling must give
    two voices (different feature spreads) different conditioning, and two phases of one
    voice (same spreads, other signs) the same one."""
    from models.layers.usef import FiLMLayer

    torch.manual_seed(0)
    film = FiLMLayer(feature_dim=16)
    torch.nn.init.normal_(film.proj.weight)  # a trained projection, not the identity
    z = torch.ones(1, 1, 8, 16)
    spread_a, spread_b = torch.rand(1, 1, 8, 16) * 2, torch.rand(1, 1, 8, 16) * 2

    def conditioning(spread: torch.Tensor) -> torch.Tensor:
        signs = torch.randint(0, 2, (1, 400, 8, 16)) * 2.0 - 1.0  # random phase per frame
        with torch.no_grad():
            return film(z, signs * spread)

    same = (conditioning(spread_a) - conditioning(spread_a)).abs().mean()
    different = (conditioning(spread_a) - conditioning(spread_b)).abs().mean()
    assert different > 5 * same, (different, same)


def test_encoder_sees_how_loud_a_band_frame_is() -> None:
    """The per-frame normalisation alone maps a band-frame and the same frame 20 dB quieter to
    the same feature; the added log energy must tell them apart (silence, onsets, dominance)."""
    torch.manual_seed(0)
    encoder = BandSplitEncoder(bands=recipe_bands(), feature_dim=8)
    frame = 10 * torch.randn(1, 1025, 1, dtype=torch.complex64)  # far above NORM_EPS
    spec = torch.cat([frame, 0.1 * frame], dim=2)  # (1, F, 2): loud, then 20 dB quieter
    with torch.no_grad():
        z = encoder(spec)  # (1, 2, K, D)
        difference = z[0, 0] - z[0, 1]
        # exactly log10(100) = 2 decades of energy times each band's learned energy vector
        expected = 2 * encoder.energy_weight
    torch.testing.assert_close(difference, expected, atol=1e-3, rtol=1e-3)
