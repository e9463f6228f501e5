"""SEMamba-TSE's own pieces (models/semamba.py, losses/mag_phase.py): the learnable sigmoid,
the anti-wrapping function, each spectral loss term at and away from a perfect estimate, and
the consistency of a spectrum that is a signal's STFT. The family contract and real train.py
steps are in tests/test_families.py."""

from __future__ import annotations

import math

import pytest
import torch

from losses.mag_phase import anti_wrapping, antiwrap_phase_loss, mag_phase_terms, mse_loss
from models.semamba import CompressedSTFT, LearnableSigmoid

N_FFT, HOP = 256, 64
TERMS = ("compressed_mag", "antiwrap_phase", "compressed_complex", "consistency")


# One torch thread per test (conftest.py): small tensors on shared cores only contend.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def spectrum() -> CompressedSTFT:
    return CompressedSTFT(n_fft=N_FFT, win_length=N_FFT, hop_length=HOP, compress=0.3)


def waves(batch: int = 2, n: int = 4_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))


def test_learnable_sigmoid_spans_zero_to_beta() -> None:
    sig = LearnableSigmoid(5, beta=2.0)
    x = torch.tensor([-1e4, -1.0, 0.0, 1.0, 1e4])
    with torch.no_grad():
        y = sig(x.expand(3, 5))
    assert torch.all((y >= 0) & (y <= 2.0))
    assert float(y[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(y[0, -1]) == pytest.approx(2.0)
    assert float(y[0, 2]) == pytest.approx(1.0)  # beta / 2 at 0, whatever the slope
    with torch.no_grad():
        sig.slope.fill_(3.0)  # a steeper slope per bin, the same range
        steep = sig(torch.ones(5))
    assert float(steep[0]) == pytest.approx(2.0 * float(torch.sigmoid(torch.tensor(3.0))))


def test_anti_wrapping_is_in_zero_to_pi_and_ignores_whole_turns() -> None:
    x = torch.linspace(-20, 20, 4001)
    y = anti_wrapping(x)
    assert y.min() >= 0
    assert y.max() <= math.pi + 1e-6
    for turns in (-3, -1, 1, 2):
        torch.testing.assert_close(anti_wrapping(x + 2 * math.pi * turns), y, atol=1e-5, rtol=0)
    small = torch.tensor([0.3, -0.3])
    torch.testing.assert_close(anti_wrapping(small), small.abs())
    pha = torch.rand(2, 9, 7) * 2 * math.pi - math.pi
    assert antiwrap_phase_loss(pha + 2 * math.pi, pha) == pytest.approx(0.0, abs=1e-5)


def aux_of(spectrum: CompressedSTFT, wave: torch.Tensor, scale: torch.Tensor) -> dict:
    """What the model's forward returns for an estimate equal to ``wave``."""
    mag, pha = spectrum.mag_phase(wave / scale)
    return {"compressed_mag": mag, "phase": pha, "scale": scale}


def test_every_term_is_zero_for_a_perfect_estimate_and_positive_otherwise(
    spectrum: CompressedSTFT,
) -> None:
    target = waves()
    scale = torch.tensor([[0.5], [2.0]])
    perfect = mag_phase_terms(target, target, aux_of(spectrum, target, scale),
                              spectrum=spectrum)
    assert set(perfect) == set(TERMS)
    for name, value in perfect.items():
        assert value == pytest.approx(0.0, abs=1e-6), name

    # Another waveform, and its own (consistent) spectrum: every term but consistency > 0
    other = target + 0.3 * waves(seed=1)
    wrong = mag_phase_terms(other, target, aux_of(spectrum, other, scale), spectrum=spectrum)
    for name in ("compressed_mag", "antiwrap_phase", "compressed_complex"):
        assert wrong[name] > 1e-3, name
    # The right waveform with a predicted spectrum that no waveform has: only consistency sees
    # the mismatch between the prediction and the waveform it was turned into.
    aux = aux_of(spectrum, target, scale)
    aux["phase"] = aux["phase"] + 0.5 * torch.randn_like(aux["phase"])
    inconsistent = mag_phase_terms(target, target, aux, spectrum=spectrum)
    assert inconsistent["consistency"] > 1e-3
    assert inconsistent["compressed_mag"] == pytest.approx(0.0, abs=1e-6)


def test_consistency_is_zero_for_the_stft_of_a_signal(spectrum: CompressedSTFT) -> None:
    """The model's output waveform is the iSTFT of its prediction; when the prediction is a
    signal's STFT, the waveform's STFT is the prediction again."""
    wave = waves(n=4_321)
    mag, pha = spectrum.mag_phase(wave)
    out = spectrum.inverse(mag, pha, wave.shape[-1])
    torch.testing.assert_close(out, wave, atol=1e-4, rtol=1e-4)
    assert mse_loss(torch.polar(mag, pha), spectrum(out)) < 1e-8


def test_terms_have_finite_gradients_at_silence(spectrum: CompressedSTFT) -> None:
    """A zero target (TA items, masked out) and an all-zero estimate keep every gradient finite:
    the compression's epsilon, and a re-analysis written without an angle."""
    est = torch.zeros(2, 2_000, requires_grad=True)
    scale = torch.ones(2, 1)
    mag = torch.full((2, N_FFT // 2 + 1, 2_000 // HOP + 2), 0.1, requires_grad=True)
    pha = torch.zeros_like(mag, requires_grad=True)
    aux = {"compressed_mag": mag, "phase": pha, "scale": scale}
    terms = mag_phase_terms(est, torch.zeros(2, 2_000), aux, spectrum=spectrum,
                            weights=torch.tensor([1.0, 0.0]))
    sum(terms.values()).backward()
    for grad in (est.grad, mag.grad, pha.grad):
        assert torch.isfinite(grad).all()
