"""Magnitude-phase losses of MP-SENet and SEMamba on a compressed spectrum: magnitude MSE,
anti-wrapping phase losses (instantaneous phase, group delay, instantaneous frequency), complex
MSE and the consistency of the predicted spectrum with the STFT of the output waveform.

After SEMamba's models/loss.py and train.py (github RoyChao19477/SEMamba, MIT License,
Copyright (c) 2024 Rong Chao; portions Copyright (c) 2023 Ye-Xin Lu, MP-SENet, MIT). The group
delay and instantaneous frequency are differences along frequency and time (``torch.diff``)
rather than SEMamba's (F, F) and (T, T) difference matrices, whose first column repeats the
instantaneous phase of the first bin or frame.

Per item, every term is a mean over the (F, T) grid, combined over items by ``weighted_mean``;
as the other losses, everything runs in float32 with autocast off.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from dsp.precision import autocast_off, to_float32
from losses.separation import weighted_mean

TWO_PI = 2 * math.pi


class CompressedSpectrum(Protocol):
    """The model's compressed STFT (models/semamba.py ``CompressedSTFT``)."""

    def mag_phase(self, wave: Tensor) -> tuple[Tensor, Tensor]: ...

    def __call__(self, wave: Tensor) -> Tensor: ...


def anti_wrapping(x: Tensor) -> Tensor:
    """|x - 2 pi round(x / 2 pi)|: the distance of a phase difference from the nearest whole
    turn, in [0, pi], so an error of a whole turn costs nothing (MP-SENet)."""
    return (x - TWO_PI * torch.round(x / TWO_PI)).abs()


def _grid_mean(x: Tensor) -> Tensor:
    """Shape: (B, F, T) -> (B,)"""
    return x.flatten(1).mean(-1)


def antiwrap_phase_loss(est_pha: Tensor, target_pha: Tensor, *, weights: Tensor | None = None
                        ) -> Tensor:
    """Instantaneous phase + group delay (difference over frequency) + instantaneous frequency
    (difference over time) losses, each the mean anti-wrapped error (MP-SENet's ``phase_losses``,
    summed under one weight as SEMamba does).

    Shape:
        est_pha, target_pha (B, F, T) radians; weights (B,) -> scalar
    """
    with autocast_off(est_pha):
        est, tgt = to_float32(est_pha), to_float32(target_pha)
        err = est - tgt
        per_item = (_grid_mean(anti_wrapping(err))
                    + _grid_mean(anti_wrapping(err.diff(dim=1)))  # group delay
                    + _grid_mean(anti_wrapping(err.diff(dim=2))))  # instantaneous frequency
        return weighted_mean(per_item, weights)


def mse_loss(estimate: Tensor, target: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Per-item mean squared error over the grid, real or complex (|e - t|^2: the sum over the
    real and imaginary parts, which is SEMamba's ``2 * mse_loss`` of the stacked parts).

    Shape:
        estimate, target (B, F, T) -> scalar
    """
    with autocast_off(estimate):
        err = to_float32(estimate) - to_float32(target)
        per_item = _grid_mean(err.abs().square() if err.is_complex() else err.square())
        return weighted_mean(per_item, weights)


def mag_phase_terms(
    estimate: Tensor,
    target: Tensor,
    aux: dict[str, Tensor],
    *,
    spectrum: CompressedSpectrum,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """SEMamba's spectral terms of one batch, by their ``loss`` section names.

    ``aux`` is the model's (``compressed_mag``, ``phase`` of the predicted spectrum and the
    ``scale`` the mixture was divided by); the target and the output waveform are divided by the
    same scale, so the terms see the levels the model saw (SEMamba normalises the noisy and
    clean waveforms by the noisy RMS in the same way).

    Shape:
        estimate, target (B, N); aux: (B, F, T) and scale (B, 1); weights (B,) -> scalars
    """
    scale = aux["scale"].float()
    with autocast_off(estimate):
        target_mag, target_pha = spectrum.mag_phase(to_float32(target) / scale)
        target_com = torch.polar(target_mag, target_pha)
        mag, pha = to_float32(aux["compressed_mag"]), to_float32(aux["phase"])
        predicted = torch.polar(mag, pha)
        # The re-analysis is differentiated: it pulls the spectrum towards one a waveform has.
        analysed = spectrum(to_float32(estimate) / scale)
        return {
            "compressed_mag": mse_loss(mag, target_mag, weights=weights),
            "antiwrap_phase": antiwrap_phase_loss(pha, target_pha, weights=weights),
            "compressed_complex": mse_loss(predicted, target_com, weights=weights),
            "consistency": mse_loss(predicted, analysed, weights=weights),
        }
