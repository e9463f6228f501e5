"""Spectral and waveform reconstruction losses: multi-resolution STFT, waveform L1, amplitude.

All of them are level-normalised per item (divided by a statistic of the target, or compared in
the log domain with a floor relative to the target), so their values, and the config weights
that scale them, do not depend on how loud the training data happen to be. Like every loss in
``losses``, they cast to float32 and run with autocast disabled (see ``losses.separation``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsp.precision import autocast_off, to_float32
from losses.separation import ENERGY_EPS, check_spectra, check_waves, weighted_mean

# Resolutions for 48 kHz. Window = FFT size with 75 % overlap: 10.7 / 21.3 / 42.7 / 85.3 ms
# windows, 93.8 / 46.9 / 23.4 / 11.7 Hz bins and 2.7 / 5.3 / 10.7 / 21.3 ms hops. They bracket
# the model's own 2048-point, 20 ms STFT on both sides: the 512-point one sees onsets and
# plosives, the 4096-point one resolves the harmonics of low voices (F0 ~ 80 Hz). This is the
# usual 24 kHz recipe (Yamamoto et al., 2020, Parallel WaveGAN: 512 - 2048 points) doubled.
DEFAULT_FFT_SIZES: tuple[int, ...] = (512, 1024, 2048, 4096)
DEFAULT_HOP_SIZES: tuple[int, ...] = (128, 256, 512, 1024)
DEFAULT_WIN_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 4096)

# Floor of the log-magnitude term, relative to the target's mean bin power (-80 dB). Below it
# differences are ignored: they are inaudible, and an absolute floor would make the loss depend
# on the signal level.
LOG_POWER_REL_FLOOR = 1e-8


def _magnitude(spec: Tensor) -> Tensor:
    """``|spec|`` as ``sqrt(re^2 + im^2 + ENERGY_EPS)``: finite gradient at 0, unlike ``abs``.

    Shape:
        spec: any complex shape; returns the same shape, real.
    """
    return torch.sqrt(spec.real.square() + spec.imag.square() + ENERGY_EPS)


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over STFT resolutions (Yamamoto et al.,
    2020, "Parallel WaveGAN"; Arik et al., 2019, for spectral convergence).

    Per item and resolution, with ``X = |STFT(estimate)|`` and ``Y = |STFT(target)|``::

        sc     = ||Y - X||_F / ||Y||_F
        logmag = mean_{f,t} |log(X^2 + floor) - log(Y^2 + floor)| / 2    (= L1 of log |.|)
        floor  = LOG_POWER_REL_FLOOR * mean_{f,t} Y^2

    Both terms are invariant to scaling estimate and target together. Unlike the batch-level
    norms of the original, ``sc`` is computed per item so that ``weights`` can select items.

    Shape:
        estimate: ``(B, N)``.
        target: ``(B, N)``.
        weights: ``(B,)`` 0/1 mask, or ``None``.
        returns: scalar.
    """

    def __init__(
        self,
        *,
        fft_sizes: tuple[int, ...] = DEFAULT_FFT_SIZES,
        hop_sizes: tuple[int, ...] = DEFAULT_HOP_SIZES,
        win_lengths: tuple[int, ...] = DEFAULT_WIN_LENGTHS,
    ) -> None:
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths) > 0:
            raise ValueError("fft_sizes, hop_sizes and win_lengths must be non-empty, equal length")
        for n_fft, win in zip(fft_sizes, win_lengths, strict=True):
            if win > n_fft:
                raise ValueError(f"win_length {win} exceeds fft size {n_fft}")
        self.fft_sizes = tuple(fft_sizes)
        self.hop_sizes = tuple(hop_sizes)
        self.win_lengths = tuple(win_lengths)
        for i, win in enumerate(self.win_lengths):
            # Not persistent: the windows are derived from the arguments, so they need not (and
            # should not, if the resolutions change) travel in checkpoints.
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)

    def _window(self, i: int) -> Tensor:
        window: Tensor = getattr(self, f"window_{i}")
        return window

    def forward(self, estimate: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
        """Return the loss; see the class docstring for the formula and shapes."""
        check_waves(estimate, target)
        with autocast_off(estimate):
            est = to_float32(estimate)
            tgt = to_float32(target).to(est.dtype)
            # (2B, N): one STFT call per resolution for both signals.
            both = torch.cat([est, tgt], dim=0)
            per_item = est.new_zeros(est.shape[0])
            for i, (n_fft, hop, win) in enumerate(
                zip(self.fft_sizes, self.hop_sizes, self.win_lengths, strict=True)
            ):
                spec = torch.stft(
                    both,
                    n_fft=n_fft,
                    hop_length=hop,
                    win_length=win,
                    window=self._window(i).to(device=both.device, dtype=both.dtype),
                    center=True,
                    # Zero padding works for any length; reflection needs N > n_fft / 2.
                    pad_mode="constant",
                    return_complex=True,
                )  # (2B, F, T)
                est_spec, tgt_spec = spec.chunk(2, dim=0)
                tgt_power = tgt_spec.real.square() + tgt_spec.imag.square()  # (B, F, T)
                est_power = est_spec.real.square() + est_spec.imag.square()
                floor = LOG_POWER_REL_FLOOR * tgt_power.mean(dim=(1, 2), keepdim=True) + ENERGY_EPS
                est_mag = torch.sqrt(est_power + ENERGY_EPS)
                tgt_mag = torch.sqrt(tgt_power + ENERGY_EPS)
                # sqrt(... + eps) rather than a norm: finite gradient when the difference is 0.
                sc_num = torch.sqrt((tgt_mag - est_mag).square().sum(dim=(1, 2)) + ENERGY_EPS)
                sc = sc_num / torch.sqrt(tgt_power.sum(dim=(1, 2)) + ENERGY_EPS)
                log_mag = 0.5 * (torch.log(est_power + floor) - torch.log(tgt_power + floor))
                per_item = per_item + sc + log_mag.abs().mean(dim=(1, 2))
            return weighted_mean(per_item / len(self.fft_sizes), weights)


def waveform_l1_loss(estimate: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Waveform L1, normalised per item by the target's mean absolute amplitude.

    ``loss_b = sum_n |e - t| / sum_n |t|``; the normalisation makes it level-free like the other
    losses (a raw L1 of speech peaking at -28 dBFS would be ~1e-3 and its weight meaningless).
    Use ``weights`` to leave target-absent items (``t == 0``) out.

    Shape:
        estimate: ``(B, N)``.
        target: ``(B, N)``.
        weights: ``(B,)`` 0/1 mask, or ``None``.
        returns: scalar.
    """
    check_waves(estimate, target)
    with autocast_off(estimate):
        est = to_float32(estimate)
        tgt = to_float32(target).to(est.dtype)
        per_item = (est - tgt).abs().sum(dim=-1) / (tgt.abs().sum(dim=-1) + ENERGY_EPS)
        return weighted_mean(per_item, weights)


def amplitude_loss(est_spec: Tensor, target_spec: Tensor, weights: Tensor | None = None) -> Tensor:
    """L1 between STFT magnitudes, normalised per item by the target's mean magnitude.

    ``loss_b = sum_{f,t} ||S_hat| - |S|| / sum_{f,t} |S|``.

    Shape:
        est_spec: ``(B, F, T)`` complex.
        target_spec: ``(B, F, T)`` complex.
        weights: ``(B,)`` 0/1 mask, or ``None``.
        returns: scalar.
    """
    check_spectra(est_spec, target_spec, "amplitude_loss")
    with autocast_off(est_spec):
        est = to_float32(est_spec)
        est_mag = _magnitude(est)
        tgt_mag = _magnitude(to_float32(target_spec).to(est.dtype))
        per_item = (est_mag - tgt_mag).abs().sum(dim=(1, 2)) / (
            tgt_mag.sum(dim=(1, 2)) + ENERGY_EPS
        )
        return weighted_mean(per_item, weights)


__all__ = ["MultiResolutionSTFTLoss", "amplitude_loss", "waveform_l1_loss"]
