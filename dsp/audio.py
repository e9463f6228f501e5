"""Audio reading (whole or block by block), resampling (whole or streaming) and atomic writing.

Audio is read with soundfile and resampled with soxr (no torchaudio). Every signal inside the
project is mono float32 at 48 kHz.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from dsp.files import atomic_path

SAMPLE_RATE = 48_000
READ_BLOCK_SECONDS = 1.0  # how much of a long file is decoded per read (MonoReader)


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


# Streaming: files of any length read block by block, in bounded memory


def resampled_length(n_samples: int, sr_in: int, sr_out: int) -> int:
    """``round(n_samples * sr_out / sr_in)``, halves up, in integers (soxr's own count)."""
    return (2 * n_samples * sr_out + sr_in) // (2 * sr_in)


class MonoReader:
    """An audio file read block by block as mono float32 at its own rate.

    Raises ``AudioError`` (naming the file) for the cases ``dsp.audio.read_audio``
    rejects: missing, unreadable, empty, non-finite samples.
    """

    def __init__(self, path: Path, *, block_seconds: float = READ_BLOCK_SECONDS) -> None:
        self.path = path
        if path.is_dir():
            raise AudioError(f"{path}: a folder, not an audio file")
        if not path.is_file():
            raise AudioError(f"{path}: no such file")
        try:
            self._file = sf.SoundFile(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            raise AudioError(f"{path}: unreadable audio ({err})") from None
        self.sr = int(self._file.samplerate)
        self._block = max(1, round(block_seconds * self.sr))

    @property
    def frames(self) -> int:
        """Frames the file's header announces (the blocks are what counts)."""
        return int(self._file.frames)

    def __enter__(self) -> MonoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def blocks(self, max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Mono blocks from the start of the file (``max_frames`` at most). Shape: (n,) each."""
        self._file.seek(0)
        done = 0
        while max_frames is None or done < max_frames:
            want = self._block if max_frames is None else min(self._block, max_frames - done)
            try:
                data = self._file.read(want, dtype="float32", always_2d=True)  # (n, C)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise AudioError(f"{self.path}: unreadable audio ({err})") from None
            if data.shape[0] == 0:
                break
            wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if not np.isfinite(wave).all():
                raise AudioError(f"{self.path}: non-finite samples (NaN or Inf)")
            done += wave.shape[0]
            yield np.ascontiguousarray(wave)
        if done == 0:
            raise AudioError(f"{self.path}: empty audio")


def resample_stream(blocks: Iterable[np.ndarray], sr_in: int, sr_out: int) -> Iterator[np.ndarray]:
    """Resample a stream of mono blocks with soxr (same quality as ``soxr.resample``)."""
    if sr_in == sr_out:
        yield from blocks
        return
    stream = soxr.ResampleStream(sr_in, sr_out, 1, dtype="float32")
    for block in blocks:
        out = stream.resample_chunk(block.astype(np.float32, copy=False))
        if out.shape[0]:
            yield out
    yield stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def fit_length(blocks: Iterable[np.ndarray], n_samples: int) -> Iterator[np.ndarray]:
    """Exactly ``n_samples`` in total: cut what runs over, zero-pad what falls short."""
    done = 0
    for block in blocks:
        block = block[: n_samples - done]
        done += block.shape[0]
        if block.shape[0]:
            yield block
        if done == n_samples:
            return
    if done < n_samples:
        yield np.zeros(n_samples - done, dtype=np.float32)
