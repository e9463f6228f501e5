"""Audio reading, resampling and atomic writing.

Audio is read with soundfile and resampled with soxr (no torchaudio). Every signal inside the
project is mono float32 at 48 kHz.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from dsp.files import atomic_path

SAMPLE_RATE = 48_000


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
    # Float WAV keeps the estimate's full range: an extraction may exceed 0 dBFS.
    subtype = "FLOAT" if fmt == "WAV" else None
    with atomic_path(path) as tmp, sf.SoundFile(
        tmp, "w", samplerate=sr, channels=1, format=fmt, subtype=subtype
    ) as f:
        yield f


def save_audio(path: str | Path, wave: np.ndarray | torch.Tensor, sr: int = SAMPLE_RATE) -> None:
    """Write mono ``wave`` atomically (see ``atomic_writer``)."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    with atomic_writer(path, sr) as f:
        f.write(np.asarray(wave, dtype=np.float32).reshape(-1))
