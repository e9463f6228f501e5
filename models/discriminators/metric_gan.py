"""MetricGAN's discriminator: a learned, differentiable estimate of wide-band PESQ.

MetricGAN (Fu et al., 2019) trains the discriminator to predict a metric of the estimate against
the target, ``D(target, estimate) ~ (PESQ - 1) / 3.5``, and ``D(target, target) ~ 1``; the
generator is then pushed towards ``D(target, estimate) = 1`` (losses/adversarial.py), i.e.
along the gradient of a smooth surrogate of PESQ, which itself has none.

The network follows SEMamba's ``MetricDiscriminator`` (RoyChao19477/SEMamba, MIT,
``models/discriminators/hifigan.py``, after MP-SENet's) closely: the target's and the estimate's
compressed magnitude spectrograms stacked as two channels, four spectral-norm 2-D convolutions
(kernel 4, stride 2, no bias) each with instance norm and PReLU, channels 16 -> 32 -> 64 -> 128,
global max pooling, spectral-norm linear layers 128 -> 64 -> 1 with dropout and PReLU between,
and a learnable sigmoid, so the output lies in (0, 1).

Input spectrogram at 48 kHz: the ``stft`` section's transform (n_fft 2048, 20 ms Hann window,
10 ms hop; 23.4 Hz bins), the one the spectral losses use for every model family, of about the
window length SEMamba's 25 ms 16 kHz STFT has, and only its bins up to 8 kHz (342 of 1025): the
metric is wide-band PESQ at 16 kHz, which sees nothing above 8 kHz, so the higher bins could only
teach the discriminator cues that do not bear on the score (and would let the generator change
the upper band to move the prediction); they are left to the other losses. Magnitudes are
compressed as SEMamba's features are, ``(|X|^2 + 1e-9)^(0.3 / 2)``. Bias-free convolutions
followed by instance norm make the prediction independent of a gain common to both inputs, as
PESQ is of the overall level, so no level normalisation is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from dsp.audio import SAMPLE_RATE
from dsp.stft import HOP_LENGTH, N_FFT, STFT, WIN_LENGTH

CHANNELS = 16  # SEMamba's dim: the first convolution's width, doubled by each further one
N_CONVS = 4
KERNEL, STRIDE, PADDING = 4, 2, 1  # each convolution halves both axes
MIN_FRAMES = STRIDE**N_CONVS  # 16 frames (0.15 s at a 10 ms hop): one left after the convs
DROPOUT = 0.3
COMPRESS = 0.3  # SEMamba's compress_factor: features are |X| ** 0.3
POWER_FLOOR = 1e-9  # SEMamba's floor on |X|^2 before the root (a finite gradient at |X| = 0)
PESQ_BAND_HZ = 8_000.0  # the band wide-band PESQ (16 kHz sampling) evaluates


class LearnableSigmoid(nn.Module):
    """``beta * sigmoid(slope * x)`` with a learned slope per feature (MP-SENet's
    ``LearnableSigmoid1d``, MIT, as in SEMamba), initialised at 1; ``beta = 1`` keeps the
    output in (0, 1).

    Shape: (B, features) -> the same.
    """

    def __init__(self, features: int = 1, *, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.slope = nn.Parameter(torch.ones(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.beta * torch.sigmoid(self.slope * x)


class MetricDiscriminator(nn.Module):
    """Predicts the normalised wide-band PESQ of ``estimate`` against ``target`` (module
    docstring). The STFT arguments are the ``stft`` config section's.

    Shape:
        target, estimate: (B, N) waveforms, N giving at least ``MIN_FRAMES`` frames
        returns: (B,) in (0, 1)
    """

    def __init__(
        self,
        *,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        win_length: int = WIN_LENGTH,
        hop_length: int = HOP_LENGTH,
        channels: int = CHANNELS,
    ) -> None:
        super().__init__()
        self.stft = STFT(n_fft=n_fft, win_length=win_length, hop_length=hop_length)
        # Bins 0 .. floor(8 kHz / bin width): 342 at the recipe's 48 kHz / 2048 points.
        self.n_bins = min(int(PESQ_BAND_HZ * n_fft / sample_rate) + 1, self.stft.n_bins)
        convs: list[nn.Module] = []
        width_in = 2  # target and estimate
        for i in range(N_CONVS):
            width = channels * 2**i
            convs += [
                spectral_norm(nn.Conv2d(width_in, width, KERNEL, STRIDE, PADDING, bias=False)),
                nn.InstanceNorm2d(width, affine=True),
                nn.PReLU(width),
            ]
            width_in = width
        self.convs = nn.Sequential(*convs)
        self.head = nn.Sequential(
            spectral_norm(nn.Linear(width_in, width_in // 2)),
            nn.Dropout(DROPOUT),
            nn.PReLU(width_in // 2),
            spectral_norm(nn.Linear(width_in // 2, 1)),
            LearnableSigmoid(1),
        )

    def features(self, wave: Tensor) -> Tensor:
        """Compressed magnitudes of the PESQ band, float32 (the STFT runs outside autocast).

        Shape: (B, N) -> (B, n_bins, T)
        """
        spec = self.stft(wave)[:, : self.n_bins]  # (B, n_bins, T) complex64
        return (spec.real.square() + spec.imag.square() + POWER_FLOOR).pow(COMPRESS / 2)

    def forward(self, target: Tensor, estimate: Tensor) -> Tensor:
        if target.shape != estimate.shape or target.dim() != 2:
            raise ValueError(f"expected two (B, N) waveforms of equal shape, got "
                             f"{tuple(target.shape)} and {tuple(estimate.shape)}")
        n_frames = self.stft.n_frames(target.shape[-1])
        if n_frames < MIN_FRAMES:
            raise ValueError(f"{target.shape[-1]} samples give {n_frames} STFT frames; the "
                             f"metric discriminator needs at least {MIN_FRAMES}")
        pair = torch.stack([self.features(target), self.features(estimate)], dim=1)
        hidden = self.convs(pair)  # (B, 2, n_bins, T) -> (B, 8 channels, n_bins / 16, T / 16)
        # Global max pooling as amax rather than SEMamba's AdaptiveMaxPool2d: the same values,
        # and a backward that CUDA can run under torch.use_deterministic_algorithms.
        return self.head(hidden.amax(dim=(2, 3))).squeeze(1)  # (B, 8 channels) -> (B,)


__all__ = ["MetricDiscriminator"]
