"""HiFi-GAN waveform discriminators (Kong et al., 2020, "HiFi-GAN: Generative Adversarial
Networks for Efficient and High Fidelity Speech Synthesis").

Two families judge a waveform from complementary views:

* the multi-period discriminator (MPD) folds the signal into a 2-D grid of period ``p`` so that
  each column holds samples exactly ``p`` apart, which exposes periodic (pitch and harmonic)
  structure that a 1-D receptive field would smear;
* the multi-scale discriminator (MSD) looks at the raw signal and at average-pooled copies of
  it, which covers long-range structure and smooth spectral envelopes.

Every discriminator here maps one waveform batch to ``(logits, features)`` so that the GAN
losses can call it once on the target and once on the estimate and compare the two feature
lists entry by entry (feature matching). No loss lives in this module.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

LRELU_SLOPE = 0.1

MPD_PERIODS: tuple[int, ...] = (2, 3, 5, 7, 11)
# Channel progression of the strided part of the period stack; a stride-1 1024 -> 1024 layer
# follows it.
PERIOD_CHANNELS: tuple[int, ...] = (1, 32, 128, 512, 1024)
PERIOD_FINAL_CHANNELS = 1024
PERIOD_KERNEL = 5
PERIOD_STRIDE = 3
PERIOD_POST_KERNEL = 3

MSD_N_SCALES = 3
# (in_channels, out_channels, kernel, stride, groups, padding) per layer of a scale stack.
# The grouped convolutions keep the huge 41-tap kernels affordable.
SCALE_CONV_SPECS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 128, 15, 1, 1, 7),
    (128, 128, 41, 2, 4, 20),
    (128, 256, 41, 2, 16, 20),
    (256, 512, 41, 4, 16, 20),
    (512, 1024, 41, 4, 16, 20),
    (1024, 1024, 41, 1, 16, 20),
    (1024, 1024, 5, 1, 1, 2),
)
SCALE_POST_KERNEL = 3
# Each further scale sees the previous one smoothed and decimated by two.
SCALE_POOL_KERNEL = 4
SCALE_POOL_STRIDE = 2
SCALE_POOL_PADDING = 2

DiscriminatorOutput = tuple[list[Tensor], list[list[Tensor]]]


def _as_channel_wave(wave: Tensor) -> Tensor:
    """Accept ``(B, N)`` or ``(B, 1, N)`` and return ``(B, 1, N)``.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``.
        returns: ``(B, 1, N)``.
    """
    if wave.dim() == 2:
        return wave.unsqueeze(1)  # (B, N) -> (B, 1, N)
    if wave.dim() == 3 and wave.shape[1] == 1:
        return wave
    raise ValueError(f"expected a waveform of shape (B, N) or (B, 1, N), got {tuple(wave.shape)}")


class PeriodDiscriminator(nn.Module):
    """One MPD branch: 2-D convolutions over the waveform folded with period ``period``.

    Every kernel, the post conv's included, is ``(k, 1)``, so columns never mix: each column is
    judged as its own sub-sampled signal, with weights shared across columns.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``, any ``N >= period``.
        logits: ``(B, T' * period)`` where ``T'`` is the folded length after three-fold
            striding four times (``ceil(ceil(N / period) / 81)`` for stride 3).
        features: one ``(B, C_l, T_l, period)`` map per conv layer, post conv included.
    """

    def __init__(self, period: int) -> None:
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be positive, got {period}")
        self.period = period
        pad = (PERIOD_KERNEL - 1) // 2  # "same" padding along time; the period axis is untouched
        convs = [
            weight_norm(
                nn.Conv2d(
                    c_in,
                    c_out,
                    kernel_size=(PERIOD_KERNEL, 1),
                    stride=(PERIOD_STRIDE, 1),
                    padding=(pad, 0),
                )
            )
            for c_in, c_out in itertools.pairwise(PERIOD_CHANNELS)
        ]
        convs.append(
            weight_norm(
                nn.Conv2d(
                    PERIOD_CHANNELS[-1],
                    PERIOD_FINAL_CHANNELS,
                    kernel_size=(PERIOD_KERNEL, 1),
                    stride=1,
                    padding=(pad, 0),
                )
            )
        )
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(
            nn.Conv2d(
                PERIOD_FINAL_CHANNELS,
                1,
                kernel_size=(PERIOD_POST_KERNEL, 1),
                stride=1,
                padding=((PERIOD_POST_KERNEL - 1) // 2, 0),
            )
        )

    def forward(self, wave: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return ``(logits, features)``; see the class docstring for shapes."""
        x = _as_channel_wave(wave)
        batch, channels, n_samples = x.shape
        n_pad = (-n_samples) % self.period
        if n_pad:
            if n_pad >= n_samples:
                # Reflect padding needs more samples than it pads.
                raise ValueError(
                    f"input of {n_samples} samples is too short for period {self.period}"
                )
            # Reflection rather than zeros, so the tail does not end in an artificial edge
            # that the discriminator could learn to spot.
            x = F.pad(x, (0, n_pad), mode="reflect")
        # (B, 1, N') -> (B, 1, N' / p, p): column j holds samples j, j + p, j + 2p, ...
        # reshape, not view, because a sliced (B, 1, N) input need not be contiguous.
        x = x.reshape(batch, channels, (n_samples + n_pad) // self.period, self.period)

        features: list[Tensor] = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            features.append(x)
        x = self.conv_post(x)
        features.append(x)
        logits = torch.flatten(x, 1, -1)  # (B, 1, T', p) -> (B, T' * p)
        return logits, features


class ScaleDiscriminator(nn.Module):
    """One MSD branch: grouped 1-D convolutions over the waveform at a single resolution.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``.
        logits: ``(B, T')`` with ``T'`` about ``N / 64`` (total stride 2 * 2 * 4 * 4).
        features: one ``(B, C_l, T_l)`` map per conv layer, post conv included.
    """

    def __init__(self, use_spectral_norm: bool = False) -> None:
        super().__init__()
        # HiFi-GAN puts spectral norm on the full-resolution scale, where it stabilises
        # training more than weight norm does, and weight norm on the pooled ones.
        norm = spectral_norm if use_spectral_norm else weight_norm
        self.convs = nn.ModuleList(
            norm(
                nn.Conv1d(c_in, c_out, kernel_size=k, stride=stride, groups=groups, padding=padding)
            )
            for c_in, c_out, k, stride, groups, padding in SCALE_CONV_SPECS
        )
        last_channels = SCALE_CONV_SPECS[-1][1]
        self.conv_post = norm(
            nn.Conv1d(
                last_channels,
                1,
                kernel_size=SCALE_POST_KERNEL,
                stride=1,
                padding=(SCALE_POST_KERNEL - 1) // 2,
            )
        )

    def forward(self, wave: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return ``(logits, features)``; see the class docstring for shapes."""
        x = _as_channel_wave(wave)
        features: list[Tensor] = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            features.append(x)
        x = self.conv_post(x)
        features.append(x)
        logits = torch.flatten(x, 1, -1)  # (B, 1, T') -> (B, T')
        return logits, features


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN MPD: one :class:`PeriodDiscriminator` per period.

    The default periods are primes, so the sub-discriminators share as little of their view of
    the signal as possible.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``.
        logits: ``len(periods)`` tensors of shape ``(B, T_p)``.
        features: ``len(periods)`` lists, one per period, of maps ``(B, C_l, T_l, p)``.
    """

    def __init__(self, *, periods: tuple[int, ...] = MPD_PERIODS) -> None:
        super().__init__()
        if not periods:
            raise ValueError("periods must not be empty")
        self.periods = tuple(periods)
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p) for p in self.periods)

    def forward(self, wave: Tensor) -> DiscriminatorOutput:
        """Return ``(logits, features)``, one entry per period, in ``periods`` order."""
        x = _as_channel_wave(wave)
        logits: list[Tensor] = []
        features: list[list[Tensor]] = []
        for disc in self.discriminators:
            score, fmaps = disc(x)
            logits.append(score)
            features.append(fmaps)
        return logits, features


class MultiScaleDiscriminator(nn.Module):
    """HiFi-GAN MSD: :class:`ScaleDiscriminator` s on the raw and the average-pooled waveform.

    Scale ``i`` sees the input pooled ``i`` times with ``AvgPool1d(4, 2, padding=2)``; only scale
    0 uses spectral norm.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``.
        logits: ``n_scales`` tensors of shape ``(B, T_s)``.
        features: ``n_scales`` lists, one per scale, of maps ``(B, C_l, T_l)``.
    """

    def __init__(self, *, n_scales: int = MSD_N_SCALES) -> None:
        super().__init__()
        if n_scales < 1:
            raise ValueError(f"n_scales must be positive, got {n_scales}")
        self.n_scales = n_scales
        self.discriminators = nn.ModuleList(
            ScaleDiscriminator(use_spectral_norm=(i == 0)) for i in range(n_scales)
        )
        self.pool = nn.AvgPool1d(
            SCALE_POOL_KERNEL, stride=SCALE_POOL_STRIDE, padding=SCALE_POOL_PADDING
        )

    def forward(self, wave: Tensor) -> DiscriminatorOutput:
        """Return ``(logits, features)``, one entry per scale, finest scale first."""
        x = _as_channel_wave(wave)
        logits: list[Tensor] = []
        features: list[list[Tensor]] = []
        for i, disc in enumerate(self.discriminators):
            if i > 0:
                x = self.pool(x)  # (B, 1, N) -> (B, 1, N // 2 + 1)
            score, fmaps = disc(x)
            logits.append(score)
            features.append(fmaps)
        return logits, features


class HiFiGANDiscriminator(nn.Module):
    """MPD and MSD together, as used to train HiFi-GAN.

    Call it separately on the target and on the estimate; the two outputs line up entry by
    entry, which is what the adversarial and feature-matching losses need.

    Shape:
        wave: ``(B, N)`` or ``(B, 1, N)``.
        logits: ``len(periods) + n_scales`` tensors ``(B, T_d)``, MPD first, then MSD.
        features: as many lists of feature maps, in the same order.
    """

    def __init__(
        self, *, periods: tuple[int, ...] = MPD_PERIODS, n_scales: int = MSD_N_SCALES
    ) -> None:
        super().__init__()
        self.mpd = MultiPeriodDiscriminator(periods=periods)
        self.msd = MultiScaleDiscriminator(n_scales=n_scales)

    def forward(self, wave: Tensor) -> DiscriminatorOutput:
        """Return the MPD outputs followed by the MSD outputs."""
        mpd_logits, mpd_features = self.mpd(wave)
        msd_logits, msd_features = self.msd(wave)
        return mpd_logits + msd_logits, mpd_features + msd_features
