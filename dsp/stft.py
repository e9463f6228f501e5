"""The STFT used everywhere in HiFi-TSE, and the default analysis of a 48 kHz signal."""

from __future__ import annotations

import torch
from torch import nn

N_FFT = 2048  # 1025 bins of 23.4 Hz
WIN_LENGTH = 960  # 20 ms Hann window
HOP_LENGTH = 480  # 10 ms


class STFT(nn.Module):
    """Centred STFT / iSTFT with a Hann window shorter than ``n_fft`` (zero-padded by torch).

    The transform always runs in float32, also under autocast: half-precision FFTs lose the
    quiet high bands that a 48 kHz model is meant to keep.
    """

    def __init__(
        self,
        *,
        n_fft: int = N_FFT,
        win_length: int = WIN_LENGTH,
        hop_length: int = HOP_LENGTH,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    def n_frames(self, n_samples: int) -> int:
        return -(-n_samples // self.hop_length) + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Shape: (B, N) real -> (B, F, T) complex64 with T = ceil(N / hop) + 1."""
        # Zero-pad to a whole number of hops: otherwise the last samples sit under the falling
        # edge of a single window and the inverse divides by a near-zero envelope.
        tail = -wave.shape[-1] % self.hop_length
        with torch.autocast(wave.device.type, enabled=False):
            return torch.stft(
                torch.nn.functional.pad(wave.float(), (0, tail)),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window,
                center=True,
                # Zero padding (not reflect) works for signals shorter than n_fft / 2 too.
                pad_mode="constant",
                return_complex=True,
            )

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """Shape: (B, F, T) complex -> (B, length) real; exactly ``length`` samples."""
        padded = (spec.shape[-1] - 1) * self.hop_length
        if not padded - self.hop_length < length <= padded:
            raise ValueError(f"{spec.shape[-1]} frames cannot hold {length} samples")
        with torch.autocast(spec.device.type, enabled=False):
            wave = torch.istft(
                spec.to(torch.complex64),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window,
                center=True,
                length=padded,
            )
        return wave[..., :length]
