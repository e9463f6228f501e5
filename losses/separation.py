"""Separation losses and metrics: SI-SDR, a phase-sensitive spectral loss, target-absent energy.

Every function here casts its inputs to float32 (complex64 for spectra) and runs with autocast
disabled before it reduces anything: under bf16/fp16 autocast a sum of 10^5 squared samples can
overflow fp16, an epsilon such as 1e-8 rounds to zero in both half formats, and autocast would
otherwise run ``linalg.vecdot``/``matmul`` in bf16. float64 inputs stay float64.

Per-item values are combined by :func:`weighted_mean`, which takes a ``(B,)`` 0/1 mask (e.g. the
target-present items of a batch) without a data-dependent branch, so no device sync happens in
the training step and an all-unselected batch still returns a zero that carries a graph.

``weighted_mean`` and ``check_waves`` are shared with ``losses.stft_loss`` and
``losses.adversarial``; ``to_float32`` and ``autocast_off`` live in ``dsp.precision``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsp.precision import autocast_off, to_float32

# An absolute energy floor, far below the energy of any real recording (one 16-bit LSB,
# 3e-5, held for 1 ms at 48 kHz already carries 4e-8), yet large enough that its reciprocal
# (~1e19) stays far from float32 overflow: logs and divisions by an energy plus this floor have
# finite gradients even for digital silence.
ENERGY_EPS: float = torch.finfo(torch.float32).tiny ** 0.5  # ~1.1e-19

# SI-SDR adds REL_EPS * (estimate energy) to both energies of its ratio. This keeps the value
# exactly invariant to the scale of the estimate, caps it at about +-100 dB (beyond what float32
# rounding of a 10^5-sample signal can resolve anyway) and makes an all-zero estimate 0 dB.
SI_SDR_REL_EPS = 1e-10

# ta_suppression_db of an all-zero estimate (or a perfect one, for SI-SDR) is clamped to this.
MAX_SUPPRESSION_DB = 100.0

# Relative floor on the per-bin power in the phase-sensitive loss; only keeps |S_hat| (and its
# gradient) defined where the estimate is exactly zero. -100 dB below the mean bin power.
SPEC_REL_EPS = 1e-10

DB_PER_LOG10 = 10.0  # power ratio -> dB


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def weighted_mean(per_item: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of per-item values over the items selected by ``weights``.

    Unselected items are replaced by zero before weighting, so an inf/NaN in an item the mask
    drops (e.g. a loss of a target-absent item) cannot leak into the result. With no item
    selected the result is an exact 0 that still depends on ``per_item`` (so ``backward`` works
    and gives zero gradients); no ``.item()``/branch on the mask, hence no device sync.

    Shape:
        per_item: ``(B,)``.
        weights: ``(B,)`` non-negative (0/1 float or bool), or ``None`` for a plain mean.
        returns: scalar.
    """
    if weights is None:
        return per_item.mean()
    if weights.shape != per_item.shape:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not match items {tuple(per_item.shape)}"
        )
    w = weights.to(device=per_item.device, dtype=per_item.dtype)
    selected = torch.where(w > 0, per_item, torch.zeros_like(per_item))
    # clamp: 0 / tiny = 0 when nothing is selected, instead of 0 / 0 = NaN.
    return (w * selected).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def check_waves(estimate: Tensor, target: Tensor) -> None:
    """Raise unless both are ``(B, N)`` waveforms of the same shape."""
    if estimate.dim() != 2 or estimate.shape != target.shape:
        raise ValueError(
            f"expected two (B, N) waveforms of equal shape, got {tuple(estimate.shape)} "
            f"and {tuple(target.shape)}"
        )


def check_spectra(est_spec: Tensor, target_spec: Tensor, name: str) -> None:
    """Raise unless both are complex ``(B, F, T)`` spectra of the same shape."""
    if not (est_spec.is_complex() and target_spec.is_complex()):
        raise TypeError(f"{name} expects complex spectra")
    if est_spec.dim() != 3 or est_spec.shape != target_spec.shape:
        raise ValueError(
            f"expected two (B, F, T) spectra of equal shape, got {tuple(est_spec.shape)} "
            f"and {tuple(target_spec.shape)}"
        )


def _energy(x: Tensor) -> Tensor:
    """Sum of squares over the last axis, ``(B, N) -> (B,)``."""
    return x.square().sum(dim=-1)


def _db(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``10 log10(numerator / denominator)`` of two energies, written as a difference of logs:
    no overflow of the quotient when the denominator is tiny (callers add their floors)."""
    return DB_PER_LOG10 * (torch.log10(numerator) - torch.log10(denominator))


# ---------------------------------------------------------------------------------------------
# SI-SDR
# ---------------------------------------------------------------------------------------------


def si_sdr(estimate: Tensor, target: Tensor, *, zero_mean: bool = True) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019, "SDR - half-baked
    or well done?").

    The target is scaled to its projection ``alpha * target`` with
    ``alpha = <estimate, target> / ||target||^2`` and the rest of the estimate counts as
    distortion: ``10 log10(||alpha t||^2 / ||e - alpha t||^2)``. Both energies get
    ``SI_SDR_REL_EPS * ||e||^2 + ENERGY_EPS`` added (note ``||alpha t||^2 + ||e - alpha t||^2 =
    ||e||^2``), so the value is invariant to scaling either signal (down to energies near
    ``ENERGY_EPS``), bounded by about +-100 dB, and finite with finite gradients for an all-zero
    estimate or target; the latter matters because masked-out target-absent items are still
    computed.

    An all-zero estimate scores 0 dB, as in torchmetrics (asteroid's convention gives -80 dB).
    Its gradient is zero under either convention, so only reported numbers could differ, and a
    scale-invariant measure cannot tell a near-silent output from a loud one anyway: report
    over-suppression of target-present items with an energy measure, not with SI-SDR.

    Shape:
        estimate: ``(B, N)``.
        target: ``(B, N)``.
        returns: ``(B,)`` float32 (float64 for float64 inputs).
    """
    check_waves(estimate, target)
    with autocast_off(estimate):
        est = to_float32(estimate)
        tgt = to_float32(target).to(est.dtype)
        if zero_mean:
            est = est - est.mean(dim=-1, keepdim=True)
            tgt = tgt - tgt.mean(dim=-1, keepdim=True)
        alpha = (est * tgt).sum(dim=-1, keepdim=True) / (_energy(tgt)[:, None] + ENERGY_EPS)
        projection = alpha * tgt  # (B, N)
        distortion = est - projection
        eps = SI_SDR_REL_EPS * _energy(est) + ENERGY_EPS
        return _db(_energy(projection) + eps, _energy(distortion) + eps)


def si_sdr_loss(estimate: Tensor, target: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Negative SI-SDR (dB), averaged over the items selected by ``weights``.

    Shape:
        estimate: ``(B, N)``.
        target: ``(B, N)``.
        weights: ``(B,)`` 0/1 mask of the target-present items, or ``None`` for all items.
        returns: scalar; 0 (with a graph) when no item is selected.
    """
    return weighted_mean(-si_sdr(estimate, target), weights)


def snr_loss(estimate: Tensor, target: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Negative SNR (dB) of the estimate against the target, averaged over selected items.

    Unlike SI-SDR it is not scale-invariant: a target-present estimate that is too quiet costs
    as much as one that is distorted. Without such a term the target-absent energy loss is free
    to turn every output down (SI-SDR does not see the level), which is what happened.

    Shape:
        estimate, target: ``(B, N)``; weights: ``(B,)`` 0/1 or ``None``; returns a scalar.
    """
    check_waves(estimate, target)
    with autocast_off(estimate):
        est, tgt = to_float32(estimate), to_float32(target)
        signal = _energy(tgt)
        noise = _energy(tgt - est)
        eps = SI_SDR_REL_EPS * signal + ENERGY_EPS
        snr = _db(signal + eps, noise + eps)
    return weighted_mean(-snr, weights)


def level_loss(estimate: Tensor, target: Tensor, *, weights: Tensor | None = None) -> Tensor:
    """Absolute level error of target-present estimates, ``|10 log10(E_est / E_tgt)|`` in dB.

    The counterweight of :func:`ta_energy_loss`. Both are in dB, so each pulls on the output
    gain with a force that does not fade with the level. :func:`snr_loss` does fade: as the
    estimate goes quiet its SNR tends to 0 dB and its gradient to zero, so on its own it let
    the TA term mute every output (estimate/target RMS fell to 0.01 in a demo run).

    Shape:
        estimate, target: ``(B, N)``; weights: ``(B,)`` 0/1 or ``None``; returns a scalar.
    """
    check_waves(estimate, target)
    with autocast_off(estimate):
        est, tgt = to_float32(estimate), to_float32(target)
        db = _db(_energy(est) + ENERGY_EPS, _energy(tgt) + ENERGY_EPS)
    return weighted_mean(db.abs(), weights)


def si_sdr_improvement(estimate: Tensor, target: Tensor, mixture: Tensor) -> Tensor:
    """SI-SDR of the estimate minus SI-SDR of the unprocessed mixture, in dB.

    Shape:
        estimate, target, mixture: ``(B, N)``.
        returns: ``(B,)``.
    """
    return si_sdr(estimate, target) - si_sdr(mixture, target)


# ---------------------------------------------------------------------------------------------
# Phase-sensitive spectral loss
# ---------------------------------------------------------------------------------------------


def phase_sensitive_loss(
    est_spec: Tensor, target_spec: Tensor, *, weights: Tensor | None = None
) -> Tensor:
    """Phase-sensitive magnitude loss (Erdogan et al., 2015, "Phase-sensitive and
    recognition-boosted speech separation using deep recurrent neural networks").

    Erdogan et al. train a real mask on the mixture, whose phase is fixed, and show that the
    magnitude minimising the complex error is the *projection* of the clean spectrum onto that
    phase, ``|S| cos(angle(S) - angle(Y))``. Here the spectrum is estimated directly, so the
    estimate's own phase takes the role of the mixture phase::

        target_psa = |S| cos(angle(S) - angle(S_hat)) = Re(S conj(S_hat)) / |S_hat|
        loss_b     = sum_{f,t} (|S_hat| - target_psa)^2 / sum_{f,t} |S|^2

    i.e. the magnitude is judged against what it *should* be given the phase it comes with: in
    a bin whose phase is wrong, a large magnitude only adds error energy, so it is pushed down
    (to zero at 90 degrees or more of phase error, where the projection is <= 0).

    Design decisions:

    * The phase-sensitive target is a *target*: it is detached, so the gradient reaches the
      estimate only through ``|S_hat|``. Without the detach the term also pulls on the phase,
      toward the clean phase when the magnitude is too large but *away* from it when the
      magnitude is too small, and it has zero-loss points with a wrong phase and a shrunken
      magnitude. The phase is learned by SI-SDR (weighted 1.0 against 0.1 for this term).
      For reference, ``|S_hat - S|^2 = (|S_hat| - target_psa)^2 + |S|^2 sin^2(delta)``: this loss
      is the part of the complex error that the magnitude controls.
    * Dividing by the target's spectral energy per item makes the value independent of the
      signal level (the training data are far below full scale) and comparable across items.
      ``est == target`` gives 0; a uniform phase rotation by ``phi`` with the right magnitude
      gives ``(1 - cos phi)^2``.
    * The mixture spectrum is not needed (the estimate's phase plays its role), so the function
      takes no ``mix_spec``.

    Shape:
        est_spec: ``(B, F, T)`` complex.
        target_spec: ``(B, F, T)`` complex.
        weights: ``(B,)`` 0/1 mask of the target-present items, or ``None``.
        returns: scalar.
    """
    check_spectra(est_spec, target_spec, "phase_sensitive_loss")
    with autocast_off(est_spec):
        est = to_float32(est_spec)
        tgt = to_float32(target_spec).to(est.dtype)
        tgt_power = tgt.real.square() + tgt.imag.square()  # (B, F, T)
        tgt_energy = tgt_power.sum(dim=(1, 2))  # (B,)
        # Keeps |S_hat| differentiable at S_hat == 0; relative, so the loss stays level-free.
        floor = SPEC_REL_EPS * tgt_power.mean(dim=(1, 2), keepdim=True) + ENERGY_EPS
        est_mag = torch.sqrt(est.real.square() + est.imag.square() + floor)  # (B, F, T)
        target_psa = ((tgt * est.conj()).real / est_mag).detach()
        per_item = (est_mag - target_psa).square().sum(dim=(1, 2)) / (tgt_energy + ENERGY_EPS)
        return weighted_mean(per_item, weights)


# ---------------------------------------------------------------------------------------------
# Target-absent items
# ---------------------------------------------------------------------------------------------


def ta_energy_loss(
    estimate: Tensor,
    mixture: Tensor,
    *,
    weights: Tensor | None = None,
    floor_db: float = -60.0,
) -> Tensor:
    """Output energy relative to the mixture, in dB, for target-absent items.

    ``loss_b = 10 log10(E_est / E_mix + 10^(floor_db / 10))``: 0 dB when the estimate is as loud
    as the mixture, and bounded below by ``floor_db`` so that items already suppressed that far
    stop contributing gradient instead of running to -inf and dominating the batch.

    Shape:
        estimate: ``(B, N)``.
        mixture: ``(B, N)``.
        weights: ``(B,)`` 0/1 mask of the target-absent items, or ``None``.
        returns: scalar.
    """
    check_waves(estimate, mixture)
    floor = 10.0 ** (floor_db / DB_PER_LOG10)
    with autocast_off(estimate):
        est = to_float32(estimate)
        mix = to_float32(mixture).to(est.dtype)
        e_mix = _energy(mix)
        # The ENERGY_EPS terms keep both logs finite for a silent mixture or estimate.
        per_item = _db(_energy(est) + floor * e_mix + ENERGY_EPS, e_mix + ENERGY_EPS)
        return weighted_mean(per_item, weights)


def ta_suppression_db(estimate: Tensor, mixture: Tensor) -> Tensor:
    """Suppression of a target-absent item, ``10 log10(E_mix / E_est)`` dB (positive = good).

    Clamped to ``+-MAX_SUPPRESSION_DB``, which an all-zero estimate reaches, so validation
    averages stay finite.

    Shape:
        estimate: ``(B, N)``.
        mixture: ``(B, N)``.
        returns: ``(B,)``.
    """
    check_waves(estimate, mixture)
    with autocast_off(estimate):
        est = to_float32(estimate)
        mix = to_float32(mixture).to(est.dtype)
        db = _db(_energy(mix) + ENERGY_EPS, _energy(est) + ENERGY_EPS)
        return db.clamp(-MAX_SUPPRESSION_DB, MAX_SUPPRESSION_DB)


__all__ = [
    "ENERGY_EPS",
    "autocast_off",
    "check_waves",
    "level_loss",
    "phase_sensitive_loss",
    "si_sdr",
    "si_sdr_improvement",
    "si_sdr_loss",
    "ta_energy_loss",
    "ta_suppression_db",
    "to_float32",
    "weighted_mean",
]
