"""Reference checks: the part of a reference that is used, and the references the target
cannot be identified from (too short, or no voice in them)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from dsp.audio import AudioError, MonoReader

log = logging.getLogger(__name__)

MIN_REF_SECONDS = 1.0  # shorter references do not identify a speaker
MAX_REF_SECONDS = 30.0  # only the first 30 s of a longer reference are read (bounded memory)
# A reference holds a voice only if some 100 ms of it (a syllable) reach -60 dBFS RMS. The
# generator divides the reference by its RMS, so a voiceless one would be amplified floor noise
# or dither (digital silence, 16-bit dither at -96 dBFS, a quiet room's hiss) and the target
# could not be identified from it. The loudest frame rather than the RMS of the whole file, so
# that a reference that is mostly pauses still passes. Measured on the 960 RAVDESS utterances in
# ../shared/data: the softest one's loudest 100 ms is at -55.6 dBFS (median -31.6 dBFS), and
# their pauses stay below -61 dBFS.
REF_FRAME_SECONDS = 0.1
MIN_REF_PEAK_DBFS = -60.0


def check_reference(wave: np.ndarray, sr: int, name: str | Path) -> None:
    """Refuse a reference the target cannot be identified from: shorter than
    ``MIN_REF_SECONDS``, or without voice (its loudest ``REF_FRAME_SECONDS`` frame below
    ``MIN_REF_PEAK_DBFS``, see the constant). Raises ``AudioError`` naming ``name``.

    Shape:
        wave: (M,) at ``sr``
    """
    if wave.shape[0] < MIN_REF_SECONDS * sr:
        raise AudioError(
            f"{name}: reference is {wave.shape[0] / sr:.2f} s long, "
            f"shorter than {MIN_REF_SECONDS:g} s"
        )
    frame = round(REF_FRAME_SECONDS * sr)
    frames = wave[: wave.shape[0] // frame * frame].reshape(-1, frame)  # (n_frames, frame)
    loudest = float(np.square(frames, dtype=np.float64).mean(axis=1).max())  # mean square
    if loudest < 10 ** (MIN_REF_PEAK_DBFS / 10):
        level = (
            "digital silence"
            if loudest == 0.0
            else f"its loudest {REF_FRAME_SECONDS:g} s at {10 * math.log10(loudest):.1f} dBFS"
        )
        raise AudioError(
            f"{name}: no voice in the reference ({level}, below {MIN_REF_PEAK_DBFS:g} dBFS): "
            "the target cannot be identified from it"
        )


def reference_limit(n_frames: int, sr: int, name: str | Path) -> int:
    """How many frames of a reference are used: the first ``MAX_REF_SECONDS`` (with a warning
    when that cuts it)."""
    limit = round(MAX_REF_SECONDS * sr)
    if n_frames > limit:
        log.warning("%s: using the first %.0f s of the reference", name, MAX_REF_SECONDS)
    return limit


def read_reference(path: Path) -> tuple[np.ndarray, int]:
    """The used part of a reference file (``MonoReader``), mono at its own rate, and that rate;
    refused by ``check_reference`` (``AudioError``) when it cannot identify the target.

    Shape:
        returns (M,), sr
    """
    with MonoReader(path) as reader:
        limit = reference_limit(reader.frames, reader.sr, path)
        wave = np.concatenate(list(reader.blocks(limit)))
    check_reference(wave, reader.sr, path)
    return wave, reader.sr
