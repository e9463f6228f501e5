"""Audio I/O and the STFT used everywhere in HiFi-TSE.

Audio is read with soundfile and resampled with soxr (no torchaudio). Every signal inside the
project is mono float32 at 48 kHz.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

SAMPLE_RATE = 48_000
N_FFT = 2048  # 1025 bins of 23.4 Hz
WIN_LENGTH = 960  # 20 ms Hann window
HOP_LENGTH = 480  # 10 ms


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the problem."""


def load_audio(path: str | Path, sr: int | None = SAMPLE_RATE) -> np.ndarray:
    """Read ``path`` as mono float32, downmixing channels and resampling to ``sr`` with soxr.

    ``sr=None`` keeps the file's own rate. Raises ``AudioError`` for a file that is missing,
    unreadable, empty or holds non-finite samples.

    Shape:
        returns (N,)
    """
    wave, file_sr = read_audio(path)
    if sr is not None and file_sr != sr:
        wave = soxr.resample(wave, file_sr, sr).astype(np.float32, copy=False)
    return wave


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read ``path`` as mono float32 at its own sample rate; see ``load_audio`` for the checks."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{path}: unreadable audio ({err})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: empty audio")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: non-finite samples (NaN or Inf)")
    return np.ascontiguousarray(wave), int(file_sr)


@contextlib.contextmanager
def atomic_writer(path: str | Path, sr: int = SAMPLE_RATE) -> Iterator[sf.SoundFile]:
    """A mono ``SoundFile`` open on a temporary file beside ``path``: renamed onto ``path`` when
    the block exits normally, deleted otherwise, so an interrupted write never leaves a
    half-written file under ``path``. Streaming writers (inference.py) write block by block."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").upper()
    if fmt not in sf.available_formats():
        raise AudioError(f"{path}: unsupported audio format '{path.suffix}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # Float WAV keeps the estimate's full range: an extraction may exceed 0 dBFS.
        subtype = "FLOAT" if fmt == "WAV" else None
        with sf.SoundFile(tmp, "w", samplerate=sr, channels=1, format=fmt, subtype=subtype) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_audio(path: str | Path, wave: np.ndarray | torch.Tensor, sr: int = SAMPLE_RATE) -> None:
    """Write mono ``wave`` atomically (see ``atomic_writer``)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    with atomic_writer(path, sr) as f:
        f.write(np.asarray(wave, dtype=np.float32).reshape(-1))


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
