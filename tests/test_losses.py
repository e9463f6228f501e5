"""Numbers of the losses: SI-SDR against references, closed forms, invariances, precision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

from losses.adversarial import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from losses.separation import (
    MAX_SUPPRESSION_DB,
    phase_sensitive_loss,
    si_sdr,
    si_sdr_improvement,
    si_sdr_loss,
    ta_energy_loss,
    ta_suppression_db,
)
from losses.stft_loss import MultiResolutionSTFTLoss, amplitude_loss, waveform_l1_loss

SAMPLE_RATE = 48_000
N_SAMPLES = SAMPLE_RATE // 2  # 0.5 s keeps every test well under a second
BATCH = 3
SI_SDR_TOL_DB = 1e-3
# A short STFT for the spectral losses that take spectra directly.
TEST_N_FFT = 512
TEST_HOP = 128
# The STFT backward is slow on a busy CPU; 0.25 s still spans 12 hops of the 4096-point STFT.
MR_STFT_N_SAMPLES = SAMPLE_RATE // 4


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _speech_like(n_items: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with a syllable-rate envelope and a DC offset: structured, not white."""
    gen = _generator(seed)
    t = torch.arange(n_samples, dtype=torch.float64) / SAMPLE_RATE
    items = []
    for _ in range(n_items):
        f0 = 90.0 + 160.0 * torch.rand((), generator=gen, dtype=torch.float64)
        wave = sum(
            torch.sin(2 * math.pi * k * f0 * t + 6.28 * torch.rand((), generator=gen)) / k
            for k in range(1, 30)
        )
        envelope = 0.5 * (1 + torch.sin(2 * math.pi * 4.0 * t))  # 4 Hz syllables
        items.append(0.01 * envelope * wave + 0.002)
    return torch.stack(items).float()


def _real_speech(shared_data: Path, n_items: int, n_samples: int) -> torch.Tensor:
    files = sorted((shared_data / "speech" / "ravdess").rglob("*.flac"))[:n_items]
    items = []
    for path in files:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        assert rate == SAMPLE_RATE
        start = (audio.shape[0] - n_samples) // 2  # the middle holds speech, not silence
        items.append(torch.from_numpy(audio[start : start + n_samples, 0].copy()))
    return torch.stack(items)


def _degrade(target: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """An estimate: attenuated, slightly smeared target plus noise of item-dependent level."""
    gen = _generator(seed)
    smeared = 0.7 * target + 0.2 * torch.roll(target, 3, dims=-1)
    rms = target.square().mean(dim=-1, keepdim=True).sqrt()
    levels = torch.logspace(-2, 0, target.shape[0])[:, None]  # -40 .. 0 dB noise
    noise = torch.randn(target.shape, generator=gen) * rms * levels
    return smeared + noise + 1e-3


def _numpy_si_sdr(estimate: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Textbook SI-SDR in float64, written independently of ``losses.separation``."""
    est = estimate.astype(np.float64)
    ref = target.astype(np.float64)
    est = est - est.mean(axis=-1, keepdims=True)
    ref = ref - ref.mean(axis=-1, keepdims=True)
    scale = np.sum(est * ref, axis=-1, keepdims=True) / np.sum(ref**2, axis=-1, keepdims=True)
    s_target = scale * ref
    e_noise = est - s_target
    return 10 * np.log10(np.sum(s_target**2, axis=-1) / np.sum(e_noise**2, axis=-1))


def _check_against_references(target: torch.Tensor) -> None:
    estimate = _degrade(target)
    ours = si_sdr(estimate, target)
    assert ours.shape == (target.shape[0],)
    assert ours.dtype == torch.float32
    reference = scale_invariant_signal_distortion_ratio(
        estimate.double(), target.double(), zero_mean=True
    )
    by_numpy = _numpy_si_sdr(estimate.numpy(), target.numpy())
    np.testing.assert_allclose(ours.double().numpy(), by_numpy, atol=SI_SDR_TOL_DB, rtol=0)
    np.testing.assert_allclose(ours.double().numpy(), reference.numpy(), atol=SI_SDR_TOL_DB, rtol=0)


# ---------------------------------------------------------------------------------------------
# SI-SDR
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["white", "speech_like"])
def test_si_sdr_matches_references(kind: str) -> None:
    if kind == "white":
        target = torch.randn(BATCH, N_SAMPLES, generator=_generator())
    else:
        target = _speech_like(BATCH, N_SAMPLES)
    _check_against_references(target)


def test_si_sdr_matches_references_on_real_speech(shared_data: Path) -> None:
    _check_against_references(_real_speech(shared_data, BATCH, N_SAMPLES))


def test_si_sdr_scale_invariant() -> None:
    target = _speech_like(BATCH, N_SAMPLES)
    estimate = _degrade(target)
    base = si_sdr(estimate, target)
    torch.testing.assert_close(si_sdr(3 * estimate, target), base, atol=1e-4, rtol=0)
    torch.testing.assert_close(si_sdr(estimate, 0.05 * target), base, atol=1e-4, rtol=0)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 12.5, 40.0])
def test_si_sdr_of_known_snr(snr_db: float) -> None:
    gen = _generator(2)
    target = torch.randn(BATCH, N_SAMPLES, generator=gen, dtype=torch.float64)
    noise = torch.randn(BATCH, N_SAMPLES, generator=gen, dtype=torch.float64)
    target = target - target.mean(-1, keepdim=True)
    noise = noise - noise.mean(-1, keepdim=True)
    # Orthogonal to the target, so the projection is exactly the target and SI-SDR == SNR.
    noise = noise - (noise * target).sum(-1, keepdim=True) / target.square().sum(-1, True) * target
    gain = (target.square().sum(-1) / noise.square().sum(-1) / 10 ** (snr_db / 10)).sqrt()
    estimate = (target + gain[:, None] * noise).float()
    result = si_sdr(estimate, target.float())
    torch.testing.assert_close(result, torch.full((BATCH,), snr_db), atol=SI_SDR_TOL_DB, rtol=0)


def test_si_sdr_bounded_for_perfect_estimate() -> None:
    target = torch.randn(BATCH, N_SAMPLES, generator=_generator())
    result = si_sdr(target.clone(), target)
    assert torch.isfinite(result).all()
    assert (result > 90).all()
    assert (result <= MAX_SUPPRESSION_DB + 1e-3).all()


@pytest.mark.parametrize("zero", ["estimate", "target", "both"])
def test_si_sdr_zero_signals_finite_with_finite_gradients(zero: str) -> None:
    gen = _generator(3)
    estimate = torch.randn(BATCH, N_SAMPLES, generator=gen)
    target = torch.randn(BATCH, N_SAMPLES, generator=gen)
    if zero in ("estimate", "both"):
        estimate = torch.zeros_like(estimate)
    if zero in ("target", "both"):
        target = torch.zeros_like(target)
    estimate.requires_grad_(True)
    result = si_sdr(estimate, target)
    assert torch.isfinite(result).all()
    si_sdr_loss(estimate, target).backward()
    assert torch.isfinite(estimate.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_si_sdr_half_precision_inputs(dtype: torch.dtype) -> None:
    target32 = _speech_like(BATCH, N_SAMPLES)
    estimate32 = _degrade(target32)
    target = target32.to(dtype)
    estimate = estimate32.to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = si_sdr(estimate, target)
        loss = si_sdr_loss(estimate, target)
    assert result.dtype == torch.float32
    # The half inputs are exact in float32, so the float64 formula on them is the reference.
    expected = _numpy_si_sdr(estimate.detach().float().numpy(), target.float().numpy())
    np.testing.assert_allclose(result.detach().double().numpy(), expected, atol=SI_SDR_TOL_DB)
    loss.backward()
    assert estimate.grad.dtype == dtype
    assert torch.isfinite(estimate.grad).all()
    assert estimate.grad.abs().sum() > 0

    zero = torch.zeros(BATCH, N_SAMPLES, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zero_loss = si_sdr_loss(zero, target)
    zero_loss.backward()
    assert torch.isfinite(zero_loss)
    assert torch.isfinite(zero.grad).all()


def test_si_sdr_loss_weights_ignore_unselected_items() -> None:
    gen = _generator(4)
    target = torch.randn(4, N_SAMPLES, generator=gen)
    estimate = _degrade(target)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = si_sdr_loss(estimate, target, weights=weights)
    expected = -si_sdr(estimate, target)[[0, 2]].mean()
    torch.testing.assert_close(loss, expected)

    # Unselected items: a silent target (target-absent) and garbage; nothing may change.
    other_target, other_estimate = target.clone(), estimate.clone()
    other_target[1] = 0.0
    other_estimate[3] = 1e4 * torch.randn(N_SAMPLES, generator=gen)
    other_estimate.requires_grad_(True)
    other = si_sdr_loss(other_estimate, other_target, weights=weights)
    torch.testing.assert_close(other, loss)
    other.backward()
    assert torch.isfinite(other_estimate.grad).all()
    assert other_estimate.grad[[1, 3]].abs().max() == 0


def test_si_sdr_loss_with_nothing_selected_is_zero_with_graph() -> None:
    target = torch.zeros(2, N_SAMPLES)  # a batch of target-absent items
    estimate = torch.randn(2, N_SAMPLES, generator=_generator(5), requires_grad=True)
    loss = si_sdr_loss(estimate, target, weights=torch.zeros(2))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert estimate.grad.abs().max() == 0


def test_si_sdr_improvement() -> None:
    target = _speech_like(BATCH, N_SAMPLES)
    mixture = target + 0.5 * _speech_like(BATCH, N_SAMPLES, seed=7)
    torch.testing.assert_close(si_sdr_improvement(mixture, target, mixture), torch.zeros(BATCH))
    improvement = si_sdr_improvement(target + 0.01 * (mixture - target), target, mixture)
    torch.testing.assert_close(improvement, torch.full((BATCH,), 40.0), atol=0.5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Target-absent items
# ---------------------------------------------------------------------------------------------


def test_ta_energy_loss_closed_form() -> None:
    gen = _generator(6)
    mixture = torch.randn(BATCH, N_SAMPLES, generator=gen, dtype=torch.float64)
    gains = torch.tensor([1.0, 0.1, 1e-4], dtype=torch.float64)  # 0, -20, -80 dB
    estimate = gains[:, None] * torch.randn(BATCH, N_SAMPLES, generator=gen, dtype=torch.float64)
    floor_db = -60.0
    ratio = estimate.square().sum(-1) / mixture.square().sum(-1)
    expected = (10 * torch.log10(ratio + 10 ** (floor_db / 10))).mean()
    result = ta_energy_loss(estimate.float(), mixture.float(), floor_db=floor_db)
    torch.testing.assert_close(result.double(), expected, atol=1e-3, rtol=0)

    weights = torch.tensor([0.0, 1.0, 0.0])
    result = ta_energy_loss(estimate.float(), mixture.float(), weights=weights, floor_db=floor_db)
    expected = 10 * torch.log10(ratio[1] + 10 ** (floor_db / 10))
    torch.testing.assert_close(result.double(), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("floor_db", [-60.0, -30.0])
def test_ta_energy_loss_bounded_below_by_floor(floor_db: float) -> None:
    mixture = torch.randn(BATCH, N_SAMPLES, generator=_generator(7))
    estimate = torch.zeros(BATCH, N_SAMPLES, requires_grad=True)
    loss = ta_energy_loss(estimate, mixture, floor_db=floor_db)
    assert loss.item() >= floor_db - 1e-4
    torch.testing.assert_close(loss, torch.tensor(floor_db), atol=1e-3, rtol=0)
    loss.backward()
    assert torch.isfinite(estimate.grad).all()


def test_ta_suppression_db() -> None:
    mixture = torch.randn(BATCH, N_SAMPLES, generator=_generator(8))
    torch.testing.assert_close(
        ta_suppression_db(0.1 * mixture, mixture), torch.full((BATCH,), 20.0), atol=1e-3, rtol=0
    )
    silent = ta_suppression_db(torch.zeros_like(mixture), mixture)
    torch.testing.assert_close(silent, torch.full((BATCH,), MAX_SUPPRESSION_DB))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = ta_suppression_db((0.1 * mixture).bfloat16(), mixture.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.full((BATCH,), 20.0), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------
# Spectral losses
# ---------------------------------------------------------------------------------------------


def _spec(wave: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, F, T) complex64."""
    window = torch.hann_window(TEST_N_FFT)
    return torch.stft(wave, TEST_N_FFT, TEST_HOP, window=window, return_complex=True)


def test_phase_sensitive_loss_zero_for_equal_and_grows_with_phase() -> None:
    target = _spec(_speech_like(BATCH, N_SAMPLES))
    assert phase_sensitive_loss(target.clone(), target).item() < 1e-8
    angles = [0.1, 0.5, 1.0, 2.0, math.pi]
    values = [
        phase_sensitive_loss(target * complex(math.cos(phi), math.sin(phi)), target).item()
        for phi in angles
    ]
    assert values == sorted(values)
    # A rotation with the right magnitude: (|S| - |S| cos(phi))^2 / |S|^2 = (1 - cos(phi))^2.
    np.testing.assert_allclose(values, [(1 - math.cos(phi)) ** 2 for phi in angles], rtol=1e-4)


def test_phase_sensitive_loss_level_free_and_weighted() -> None:
    target = _spec(_speech_like(BATCH, N_SAMPLES))
    estimate = _spec(_degrade(_speech_like(BATCH, N_SAMPLES)))
    base = phase_sensitive_loss(estimate, target)
    assert base.item() > 0
    torch.testing.assert_close(
        phase_sensitive_loss(10 * estimate, 10 * target), base, rtol=1e-4, atol=0
    )
    weights = torch.tensor([0.0, 1.0, 0.0])
    selected = phase_sensitive_loss(estimate[1:2], target[1:2])
    torch.testing.assert_close(phase_sensitive_loss(estimate, target, weights=weights), selected)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_phase_sensitive_loss_zero_estimate_and_half_spectra() -> None:
    target = _spec(_speech_like(BATCH, N_SAMPLES))
    estimate = torch.zeros_like(target, requires_grad=True)
    loss = phase_sensitive_loss(estimate, target)
    # A silent estimate has no phase to project on; value and gradient must still be finite.
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(torch.view_as_real(estimate.grad)).all()

    rotated = (target * 1j).to(torch.complex32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = phase_sensitive_loss(rotated, target.to(torch.complex32))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor(1.0), atol=1e-2, rtol=0)


def test_phase_sensitive_loss_gradient_only_through_magnitude() -> None:
    target = _spec(_speech_like(1, N_SAMPLES))
    # A right-magnitude estimate with a phase error: the detached target gives it no push.
    estimate = (target * complex(math.cos(0.3), math.sin(0.3))).requires_grad_(True)
    phase_sensitive_loss(estimate, target).backward()
    radial = (estimate.grad * estimate.detach().conj()).real  # along the estimate's direction
    tangential = (estimate.grad * estimate.detach().conj()).imag
    assert radial.abs().sum() > 0
    assert tangential.abs().max() < 1e-6 * radial.abs().max()


def test_multi_resolution_stft_loss() -> None:
    loss_fn = MultiResolutionSTFTLoss()
    assert not any(k.startswith("window") for k in loss_fn.state_dict())
    target = _speech_like(BATCH, MR_STFT_N_SAMPLES)
    estimate = _degrade(target).requires_grad_(True)
    assert loss_fn(target.clone(), target).item() < 1e-5
    loss = loss_fn(estimate, target)
    assert loss.item() > 0.01
    loss.backward()
    assert torch.isfinite(estimate.grad).all()
    assert estimate.grad.abs().sum() > 0
    # Level-normalised: scaling both signals changes nothing.
    scaled = loss_fn(10 * estimate.detach(), 10 * target)
    torch.testing.assert_close(scaled, loss.detach(), rtol=1e-4, atol=0)
    # Weights select items.
    weights = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(
        loss_fn(estimate.detach(), target, weights), loss_fn(estimate.detach()[:1], target[:1])
    )


def test_multi_resolution_stft_loss_zero_and_half_inputs() -> None:
    loss_fn = MultiResolutionSTFTLoss(
        fft_sizes=(256, 1024), hop_sizes=(64, 256), win_lengths=(200, 1024)
    )
    target = _speech_like(BATCH, MR_STFT_N_SAMPLES)
    zero = torch.zeros_like(target, requires_grad=True)
    loss = loss_fn(zero, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(zero.grad).all()

    estimate = _degrade(target).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss_fn(estimate, target.bfloat16())
    assert half.dtype == torch.float32
    half.backward()
    assert torch.isfinite(estimate.grad).all()
    torch.testing.assert_close(half, loss_fn(estimate.detach().float(), target.bfloat16().float()))


def test_waveform_l1_and_amplitude_losses() -> None:
    target = _speech_like(BATCH, N_SAMPLES)
    assert waveform_l1_loss(target.clone(), target).item() == 0.0
    torch.testing.assert_close(waveform_l1_loss(2 * target, target), torch.tensor(1.0))
    weights = torch.tensor([1.0, 0.0, 1.0])
    broken = torch.stack([2 * target[0], torch.zeros(N_SAMPLES), 2 * target[2]])
    torch.testing.assert_close(waveform_l1_loss(broken, target, weights), torch.tensor(1.0))

    spec = _spec(target)
    assert amplitude_loss(spec.clone(), spec).item() < 1e-6
    torch.testing.assert_close(
        amplitude_loss(0.5 * spec, spec), torch.tensor(0.5), rtol=1e-5, atol=0
    )
    assert amplitude_loss(spec * 1j, spec).item() < 1e-6  # magnitudes only
    zero = torch.zeros_like(spec, requires_grad=True)
    amplitude_loss(zero, spec).backward()
    assert torch.isfinite(torch.view_as_real(zero.grad)).all()


# ---------------------------------------------------------------------------------------------
# Adversarial losses
# ---------------------------------------------------------------------------------------------


def test_lsgan_losses_closed_form() -> None:
    real = [torch.tensor([1.0, 0.5]), torch.tensor([[0.0, 2.0]])]
    fake = [torch.tensor([0.0, -1.0]), torch.tensor([[0.5, 1.0]])]
    # k=0: real mean((1-D)^2) = (0 + 0.25)/2, fake mean(D^2) = (0 + 1)/2
    # k=1: real (1 + 1)/2,                     fake (0.25 + 1)/2
    expected_d = 0.125 + 0.5 + 1.0 + 0.625
    torch.testing.assert_close(discriminator_loss(real, fake), torch.tensor(expected_d))
    # Generator: mean((1-D(fake))^2): k=0 (1 + 4)/2, k=1 (0.25 + 0)/2
    torch.testing.assert_close(generator_adversarial_loss(fake), torch.tensor(2.5 + 0.125))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = discriminator_loss([r.bfloat16() for r in real], [f.bfloat16() for f in fake])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor(expected_d))
    with pytest.raises(ValueError, match="equal"):
        discriminator_loss(real, fake[:1])


def test_feature_matching_loss() -> None:
    gen = _generator(9)
    shapes = [[(2, 4, 10, 3), (2, 8, 5, 3)], [(2, 4, 30), (2, 8, 10), (2, 1, 10)]]
    real = [[torch.randn(s, generator=gen, requires_grad=True) for s in sub] for sub in shapes]
    same = [[r.detach().clone().requires_grad_(True) for r in sub] for sub in real]
    zero = feature_matching_loss(real, same)
    assert zero.item() == 0.0

    # Constant offsets per layer: 2 * the sum over every layer of every sub-discriminator.
    offsets = [[1.0, 3.0], [0.5, 0.5, 2.0]]
    fake = [
        [(r.detach() + o).requires_grad_(True) for r, o in zip(sub, offs, strict=True)]
        for sub, offs in zip(real, offsets, strict=True)
    ]
    loss = feature_matching_loss(real, fake)
    torch.testing.assert_close(loss, torch.tensor(2 * (1.0 + 3.0 + 0.5 + 0.5 + 2.0)))
    loss.backward()
    assert all(r.grad is None for sub in real for r in sub)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for sub in fake for f in sub)

    with pytest.raises(ValueError, match="differ in shape"):
        feature_matching_loss(real, [[f[..., :1] for f in sub] for sub in fake])
    with pytest.raises(ValueError, match="equal"):
        feature_matching_loss(real, [fake[0], fake[1][:2]])


# Independent transcriptions of HiFi-GAN's losses (jik876/hifi-gan, models.py), in float64.


def _hifigan_feature_loss(fmap_r: list, fmap_g: list) -> torch.Tensor:
    loss = torch.zeros((), dtype=torch.float64)
    for dr, dg in zip(fmap_r, fmap_g, strict=True):
        for rl, gl in zip(dr, dg, strict=True):
            loss = loss + torch.mean(torch.abs(rl.double() - gl.double()))
    return loss * 2


def _hifigan_discriminator_loss(disc_real_outputs: list, disc_generated_outputs: list):
    loss = torch.zeros((), dtype=torch.float64)
    for dr, dg in zip(disc_real_outputs, disc_generated_outputs, strict=True):
        loss = loss + torch.mean((1 - dr.double()) ** 2) + torch.mean(dg.double() ** 2)
    return loss


def _hifigan_generator_loss(disc_outputs: list) -> torch.Tensor:
    loss = torch.zeros((), dtype=torch.float64)
    for dg in disc_outputs:
        loss = loss + torch.mean((1 - dg.double()) ** 2)
    return loss


@pytest.fixture(scope="module")
def disc_outputs() -> tuple[tuple[list, list], tuple[list, list]]:
    """The recipe discriminator's (logits, features) on a random "real" and "fake" input."""
    from models.discriminators.hifigan import HiFiGANDiscriminator

    torch.manual_seed(0)
    disc = HiFiGANDiscriminator()
    gen = _generator(11)
    with torch.no_grad():
        real = disc(torch.randn(2, 3000, generator=gen))
        fake = disc(0.5 * torch.randn(2, 3000, generator=gen))
    return real, fake


def test_adversarial_losses_equal_hifigan(disc_outputs) -> None:
    (real_logits, real_feats), (fake_logits, fake_feats) = disc_outputs
    n_maps = sum(len(maps) for maps in real_feats)
    assert n_maps == 54  # 5 periods x 6 maps + 3 scales x 8 maps

    fm = feature_matching_loss(real_feats, fake_feats)
    assert fm.dtype == torch.float32
    torch.testing.assert_close(
        fm.double(), _hifigan_feature_loss(real_feats, fake_feats), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        discriminator_loss(real_logits, fake_logits).double(),
        _hifigan_discriminator_loss(real_logits, fake_logits), rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(
        generator_adversarial_loss(fake_logits).double(),
        _hifigan_generator_loss(fake_logits), rtol=1e-5, atol=0,
    )

    # bf16 maps under autocast: computed in float32, same value up to the bf16 rounding.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = feature_matching_loss(
            [[f.bfloat16() for f in maps] for maps in real_feats],
            [[f.bfloat16() for f in maps] for maps in fake_feats],
        )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, fm, rtol=1e-2, atol=0)

    # Gradient reaches the fake maps only.
    real_leaf = [[f.clone().requires_grad_(True) for f in maps] for maps in real_feats]
    fake_leaf = [[f.clone().requires_grad_(True) for f in maps] for maps in fake_feats]
    feature_matching_loss(real_leaf, fake_leaf).backward()
    assert all(f.grad is None for maps in real_leaf for f in maps)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for maps in fake_leaf for f in maps)


def test_adversarial_weights_select_items(disc_outputs) -> None:
    """A 0/1 mask gives HiFi-GAN's losses on the selected sub-batch; an unselected item's
    values (here NaN) never reach the result; an empty mask gives 0 that still backpropagates."""
    (real_logits, real_feats), (fake_logits, fake_feats) = disc_outputs
    weights = torch.tensor([1.0, 0.0])
    first_fake_logits = [x[:1] for x in fake_logits]
    first_real_logits = [x[:1] for x in real_logits]
    first_feats = [[f[:1] for f in maps] for maps in real_feats]
    first_fake_feats = [[f[:1] for f in maps] for maps in fake_feats]

    def poisoned(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:1], torch.full_like(x[1:], float("nan"))])

    bad_logits = [poisoned(x) for x in fake_logits]
    bad_feats = [[poisoned(f) for f in maps] for maps in fake_feats]
    torch.testing.assert_close(
        feature_matching_loss(real_feats, bad_feats, weights=weights).double(),
        _hifigan_feature_loss(first_feats, first_fake_feats), rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(
        generator_adversarial_loss(bad_logits, weights=weights).double(),
        _hifigan_generator_loss(first_fake_logits), rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(
        discriminator_loss(real_logits, bad_logits, weights=weights).double(),
        _hifigan_discriminator_loss(first_real_logits, first_fake_logits), rtol=1e-5, atol=0,
    )
    # All ones: the unweighted value.
    ones = torch.ones(2)
    torch.testing.assert_close(
        feature_matching_loss(real_feats, fake_feats, weights=ones),
        feature_matching_loss(real_feats, fake_feats),
    )

    fake_leaf = [[f.clone().requires_grad_(True) for f in maps] for maps in fake_feats]
    none = feature_matching_loss(real_feats, fake_leaf, weights=torch.zeros(2))
    assert none.item() == 0.0
    none.backward()
    assert all(f.grad is not None and (f.grad == 0).all() for maps in fake_leaf for f in maps)


def test_default_gan_weights_are_hifigan_generator_objective(disc_outputs) -> None:
    """With the default weights, adv + fm is HiFi-GAN's generator_loss + feature_loss."""
    from config import GanConfig

    (_, real_feats), (fake_logits, fake_feats) = disc_outputs
    gan = GanConfig()
    ours = gan.adv_weight * generator_adversarial_loss(fake_logits) + gan.fm_weight * (
        feature_matching_loss(real_feats, fake_feats)
    )
    hifigan = _hifigan_generator_loss(fake_logits) + _hifigan_feature_loss(real_feats, fake_feats)
    torch.testing.assert_close(ours.double(), hifigan, rtol=1e-5, atol=0)


def test_snr_loss_sees_the_level_that_si_sdr_ignores() -> None:
    from losses.separation import si_sdr_loss, snr_loss

    target = torch.randn(2, 8000, generator=torch.Generator().manual_seed(3))
    half = 0.5 * target  # perfect shape, 6 dB too quiet
    assert si_sdr_loss(half, target).item() < -90  # SI-SDR: perfect
    assert snr_loss(half, target).item() == pytest.approx(-20 * math.log10(2), abs=1e-3)
    weights = torch.tensor([1.0, 0.0])
    garbage = half.clone()
    garbage[1] = torch.randn(8000) * 100
    assert snr_loss(garbage, target, weights=weights).item() == pytest.approx(
        snr_loss(half[:1], target[:1]).item(), abs=1e-4
    )


def test_level_loss_is_the_db_level_error_and_keeps_pulling_a_muted_output_up() -> None:
    from losses.separation import level_loss, snr_loss, ta_energy_loss

    target = torch.randn(2, 8000, generator=torch.Generator().manual_seed(4))
    for gain in (0.5, 2.0):  # 6 dB too quiet or too loud cost the same
        assert level_loss(gain * target, target).item() == pytest.approx(6.0206, abs=1e-3)
    assert level_loss(target, target).item() == pytest.approx(0.0, abs=1e-4)
    # The failure it exists for: at -40 dB the SNR term has almost no gradient left on the
    # output gain, the TA term still pushes down at full strength; the level term pulls up
    # as hard as the TA term pushes (both dB per dB).
    log_gain = torch.tensor(math.log(0.01), requires_grad=True)
    est = log_gain.exp() * target
    snr_grad, = torch.autograd.grad(snr_loss(est, target), log_gain, retain_graph=True)
    level_grad, = torch.autograd.grad(level_loss(est, target), log_gain, retain_graph=True)
    ta_grad, = torch.autograd.grad(ta_energy_loss(est, target), log_gain)
    db_per_neper = 20 / math.log(10)
    assert level_grad.item() == pytest.approx(-db_per_neper, rel=1e-4)
    assert ta_grad.item() == pytest.approx(db_per_neper, rel=0.02)  # 1 % less: its -60 dB floor
    assert abs(snr_grad.item()) < 0.02 * ta_grad.item()  # -20 log10(1 - g): ~g of the above
    weights = torch.tensor([1.0, 0.0])
    other = target.clone()
    other[1] *= 100
    assert level_loss(other, target, weights=weights).item() == pytest.approx(0.0, abs=1e-4)
