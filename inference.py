"""Extract the target speaker from real recordings with a trained HiFi-TSE checkpoint.

    python inference.py --ckpt CKPT --mix mix.wav --ref ref.wav -o out.wav
    python inference.py --ckpt CKPT --mix mix.wav --ref a.wav --ref b.wav -o out.wav
    python inference.py --ckpt CKPT --mix-dir MIXES --ref ref.wav --out-dir OUT
    python inference.py --ckpt CKPT --mix-dir MIXES --ref-dir REFS --out-dir OUT
    python inference.py --ckpt CKPT --list jobs.csv          # columns mix,ref,out

Inputs may have any sample rate, bit depth and channel count: channels are averaged and the
signal is resampled with soxr to the model's rate (48 kHz). The output is mono float WAV (or the
format its suffix names) at 48 kHz, or at the mixture's own rate with ``--keep-sr``, and always
has the mixture's duration: ``round(n_in * sr_out / sr_in)`` samples. Every output is written to
a temporary file in its folder and renamed when complete, so a failure never leaves a partial
file behind.

Folder pairing (``--ref-dir``): a mixture ``ID-mixed.<ext>`` pairs with ``ID-ref.<any ext>`` and
is written as ``ID-extracted.wav`` (the triplet naming evaluate.py reads, so a triplet folder
can be passed as both ``--mix-dir`` and ``--ref-dir``); when the folder holds ``*-mixed.*``
files only those are mixtures. Any other mixture ``NAME.<ext>`` pairs with the reference of the
same file name (or, failing that, the one file ``NAME.<any ext>``) and is written as
``NAME.wav``. In a CSV list, relative paths are relative to the CSV file's folder.

Long recordings run in bounded memory. The mixture is read block by block (never whole) and
resampled with a streaming soxr resampler; the model runs on windows of ``--window`` seconds
(default 8) that overlap by ``--overlap`` seconds (default 1); the last window is moved back to
end at the last sample, so it is full length and overlaps its neighbour by more. In each overlap
the two windows' estimates are cross-faded with a raised-cosine pair whose gains sum to one: the
two estimates of the same target are strongly correlated, so amplitude-complementary gains keep
the level constant where an equal-power fade would add up to +3 dB in the middle of the seam.
The reference is embedded once per file (``Generator.encode_reference``) and reused for every
window and every mixture that shares it; the embeddings of the ``REF_CACHE_SIZE`` most recently
used references are kept (about 81 MB each for 30 s at the recipe's width), so a ``--ref-dir``
run holds a bounded number of them however many references it meets.

Several references of the target (``--ref`` given more than once, with ``--mix`` or
``--mix-dir``) are encoded one by one and pooled (``models.layers.conditioning.pool_references``:
reference frames side by side, pretrained speaker embeddings averaged); a longer enrolment
tells the model more about the voice than any one utterance.

References: the first ``MAX_REF_SECONDS`` of each are used; one shorter than
``MIN_REF_SECONDS`` or with no voice in it (``check_reference``: its loudest
``REF_FRAME_SECONDS`` frame below ``MIN_REF_PEAK_DBFS``) is refused, since the target cannot be
identified from it.

Level: the generator divides its input by the input's RMS. Normalising each window by its own
RMS would change the gain from window to window, so a first streaming pass measures the RMS of
the whole (resampled) mixture and every window is divided and re-multiplied by that one scale
(``Generator.extract(..., scale=...)``). A recording that fits in one window is therefore
processed as ``Generator.forward`` would process it (the scale is summed in float64, so it may
differ from the generator's float32 one in the last bit).

``Extractor.extract_array`` runs the same reference check and encoding, windows, cross-fades and
one scale per file on signals already in memory; evaluate.py scores checkpoints through it.

``--pcs`` post-processes every estimate with perceptual contrast stretching (``models/pcs.py``,
SEMamba's PCS400 moved to 48 kHz, without its peak normalisation). It runs at the model rate on
the assembled, cross-faded estimate as it streams out (before ``--keep-sr`` resampling), with
the result PCS of the whole file would give, in bounded memory.

Errors: a bad input prints one line ``error: <path>: <problem>`` to stderr, writes no output
for that pair and makes the exit code 1 (the other pairs of a folder or list still run).
Checkpoints are read once (``models.registry.read_checkpoint``) with ``weights_only=True``: a
file holding arbitrary pickled objects is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

from dsp.audio import SAMPLE_RATE, AudioError, atomic_writer
from dsp.level import RMS_EPS
from models.hifi_tse.tf_gridnet import bf16_lstm_works, use_float32_lstms
from models.layers.conditioning import EncodedReference, pool_references
from models.pcs import pcs_stream
from models.registry import CheckpointError, load_model

log = logging.getLogger(__name__)

WINDOW_SECONDS = 8.0  # 2x the 4 s training crops; the full-band attention is quadratic in it
OVERLAP_SECONDS = 1.0  # cross-fade length between windows
READ_BLOCK_SECONDS = 1.0  # how much of the mixture is decoded per read
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
# Embedded references kept by an Extractor: each is (1, S, K, D) float32, about 81 MB for 30 s
# at the recipe's width (3001 frames x 53 bands x 128 channels), so a --ref-dir run must not
# keep them all; 8 covers a list that alternates between a few speakers.
REF_CACHE_SIZE = 8
MIXED_SUFFIX, REF_SUFFIX, OUT_SUFFIX = "-mixed", "-ref", "-extracted"
OUT_EXT = ".wav"
AUDIO_EXTS = frozenset(
    {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}
)
CSV_COLUMNS = ("mix", "ref", "out")


class InferenceError(ValueError):
    """A job that cannot run (bad pairing, bad list, bad output path); names the file."""


# ---------------------------------------------------------------------------------------------
# Streaming audio I/O
# ---------------------------------------------------------------------------------------------


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


def energy(block: np.ndarray) -> float:
    """Sum of squares in float64: the blocks of a whole recording add up without rounding
    drift."""
    block64 = block.astype(np.float64)
    return float(np.dot(block64, block64))


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


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


def _reference_limit(n_frames: int, sr: int, name: str | Path) -> int:
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
        limit = _reference_limit(reader.frames, reader.sr, path)
        wave = np.concatenate(list(reader.blocks(limit)))
    check_reference(wave, reader.sr, path)
    return wave, reader.sr


# ---------------------------------------------------------------------------------------------
# Windows and cross-fades
# ---------------------------------------------------------------------------------------------


def plan_windows(n_samples: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each window: every ``window - overlap`` samples, the last one moved
    back to end at ``n_samples`` (so it is full length and overlaps its neighbour by more)."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window {window})")
    if n_samples <= window:
        return [(0, n_samples)]
    starts = list(range(0, n_samples - window, window - overlap))
    starts.append(n_samples - window)
    return [(s, s + window) for s in starts]


def fade_in(n: int) -> np.ndarray:
    """Raised-cosine fade-in of ``n`` samples; ``1 - fade_in(n)`` is its fade-out partner, so
    the pair's gains sum to exactly one at every sample."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def overlap_add(
    blocks: Iterable[np.ndarray],
    n_samples: int,
    process: Callable[[np.ndarray], np.ndarray],
    *,
    window: int,
    overlap: int,
) -> Iterator[np.ndarray]:
    """Run ``process`` on overlapping windows of a stream of exactly ``n_samples`` samples and
    yield the cross-faded result as soon as each part is final.

    Holds at most one window of input plus one read block, and one window of output.
    ``process`` maps (n,) to (n,).
    """
    plan = plan_windows(n_samples, window, overlap)
    source = iter(blocks)
    buf, buf_start = np.zeros(0, dtype=np.float32), 0  # input samples [buf_start, ...)
    carry = np.zeros(0, dtype=np.float32)  # previous window's estimate over [start, prev end)
    for k, (start, end) in enumerate(plan):
        while buf_start + buf.shape[0] < end:
            block = next(source, None)
            if block is None:
                raise ValueError(f"the stream ended before sample {end} of {n_samples}")
            buf = np.concatenate([buf, block])
        est = np.array(process(buf[start - buf_start : end - buf_start]), dtype=np.float32)
        if carry.shape[0]:
            gain = fade_in(carry.shape[0])
            est[: carry.shape[0]] = carry * (1.0 - gain) + est[: carry.shape[0]] * gain
        if k + 1 == len(plan):
            yield est
            return
        next_start = plan[k + 1][0]
        yield est[: next_start - start]
        carry = est[next_start - start :]
        buf, buf_start = buf[next_start - buf_start :], next_start


# ---------------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InferenceError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: CUDA is not available on this machine")
    return device


@dataclass
class Job:
    mix: Path
    ref: Path
    out: Path
    extra_refs: tuple[Path, ...] = ()  # more references of the same speaker, pooled with ref

    @property
    def refs(self) -> tuple[Path, ...]:
        return (self.ref, *self.extra_refs)


@dataclass
class Result:
    duration: float  # seconds of audio in the mixture
    seconds: float  # wall-clock processing time

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio duration (< 1 is faster than real time)."""
        return self.seconds / self.duration


class Extractor:
    """Runs a generator over files of any length in bounded memory; see the module docstring.

    ``half`` runs the network under bf16 autocast on GPUs that support it (fp16 otherwise); the
    STFT stays float32 in any case. It is ignored, with a warning, on the CPU. ``pcs`` applies
    perceptual contrast stretching (models/pcs.py) to every estimate of ``run``,
    ``extract_array`` and ``extract_chunked``.
    """

    def __init__(
        self,
        model: nn.Module,  # any registered family (models/registry.py)
        *,
        device: torch.device | str = "cpu",
        half: bool = False,
        window_seconds: float = WINDOW_SECONDS,
        overlap_seconds: float = OVERLAP_SECONDS,
        ref_cache_size: int = REF_CACHE_SIZE,
        pcs: bool = False,
    ) -> None:
        if ref_cache_size < 0:
            raise ValueError(f"ref_cache_size must be >= 0, got {ref_cache_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.sr = model.sample_rate
        self.window = round(window_seconds * self.sr)
        self.overlap = round(overlap_seconds * self.sr)
        if not 0 <= self.overlap < self.window:
            raise ValueError(
                f"overlap {overlap_seconds} s must be >= 0 and shorter than the window "
                f"({window_seconds} s)"
            )
        self.amp_dtype: torch.dtype | None = None
        if half and self.device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
            if bf16 and not bf16_lstm_works(self.device):  # as train.py: some cuDNN builds
                use_float32_lstms(self.model)
                log.warning("bf16_lstm=unsupported device=%s: the LSTMs run in float32",
                            self.device)
        elif half:
            log.warning("--half needs a CUDA device; running in float32 on %s", self.device)
        self.ref_cache_size = ref_cache_size
        self.pcs = pcs
        self._refs: OrderedDict[Path, EncodedReference] = OrderedDict()  # least recently used first

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _embed(self, wave: np.ndarray) -> EncodedReference:
        """The encoded reference (``encode_reference``) of a checked waveform at the model rate,
        batch 1. Shape: (M,) -> z_ref."""
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        ref = torch.from_numpy(wave).to(self.device)[None]  # (1, M)
        with torch.inference_mode(), self._autocast():
            return self.model.encode_reference(ref)

    def reference(self, path: Path) -> EncodedReference:
        """The embedded reference of a file (``read_reference``); the ``ref_cache_size`` most
        recently used ones are kept (batch 1)."""
        if path in self._refs:
            self._refs.move_to_end(path)
            return self._refs[path]
        wave, sr = read_reference(path)
        if sr != self.sr:
            wave = soxr.resample(wave, sr, self.sr).astype(np.float32, copy=False)
        z_ref = self._embed(wave)
        self._refs[path] = z_ref
        while len(self._refs) > self.ref_cache_size:
            self._refs.popitem(last=False)
        return z_ref

    def _window(
        self, z_ref: EncodedReference, scale: torch.Tensor | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """The model on one window, with the file's reference embedding and scale (``None``:
        each window's own RMS)."""

        def process(segment: np.ndarray) -> np.ndarray:
            mix = torch.from_numpy(segment).to(self.device)[None]  # (1, n)
            with torch.inference_mode(), self._autocast():
                est = self.model.extract(mix, z_ref, scale)
            return est[0].float().cpu().numpy()

        return process

    def _extract_stream(
        self,
        blocks: Iterable[np.ndarray],
        n_samples: int,
        total_energy: float,
        z_ref: EncodedReference,
    ) -> Iterator[np.ndarray]:
        """The target in a stream of exactly ``n_samples`` samples at the model rate whose
        ``energy`` is ``total_energy``: overlapping windows, each divided and re-multiplied by
        the one RMS of the whole stream, cross-faded (module docstring)."""
        rms = math.sqrt(total_energy / n_samples) + RMS_EPS
        scale = torch.full((1, 1), rms, dtype=torch.float32, device=self.device)
        process = self._window(z_ref, scale)
        est = overlap_add(blocks, n_samples, process, window=self.window, overlap=self.overlap)
        # PCS on the assembled stream, not per window: the cross-fade of two stretched windows
        # is not the stretch of their cross-fade (PCS is not linear), so seams would differ
        # from the rest. pcs_stream gives what PCS of the whole estimate would, in bounded
        # memory (models/pcs.py).
        return pcs_stream(est, sr=self.sr) if self.pcs else est

    def extract_array(
        self, mix: np.ndarray, ref: np.ndarray, *, extra_refs: Sequence[np.ndarray] = (),
        ref_name: str | Path = "reference",
    ) -> np.ndarray:
        """The target in a mixture held in memory, given a reference held in memory (and
        ``extra_refs`` of the same speaker, pooled with it), all mono at the model rate: the
        reference check and encoding, windows and level of ``run``.

        Memory beyond the two inputs and the output is bounded as in ``run``. ``ref_name``
        names the reference in a refusal (``check_reference``).

        Shape:
            mix (N,), ref (M,) -> (N,) float32
        """
        z_ref = self._pooled([ref, *extra_refs], ref_name)
        mix = np.asarray(mix, dtype=np.float32)
        n_samples = mix.shape[0]
        step = round(READ_BLOCK_SECONDS * self.sr)

        def blocks() -> Iterator[np.ndarray]:  # views, as a file is read: no copy of the mix
            return (mix[i : i + step] for i in range(0, n_samples, step))

        out = np.empty(n_samples, dtype=np.float32)
        done = 0
        for part in self._extract_stream(blocks(), n_samples, sum(map(energy, blocks())), z_ref):
            out[done : done + part.shape[0]] = part
            done += part.shape[0]
        return out

    def extract_chunked(
        self, mix: np.ndarray, ref: np.ndarray, *, chunk_seconds: float, overlap_seconds: float,
        extra_refs: Sequence[np.ndarray] = (), ref_name: str | Path = "reference",
    ) -> np.ndarray:
        """The target as a streaming system would extract it: the mixture is cut into chunks of
        ``chunk_seconds`` overlapping by ``overlap_seconds`` (the last one moved back to end at
        the last sample), each chunk is processed alone, at its own level (the RMS of the chunk,
        not of the file, which a stream cannot know in advance), with the one reference
        embedding, and the chunks are re-assembled with the cross-fades of ``run``.

        Shape:
            mix (N,), ref (M,) -> (N,) float32
        """
        chunk, overlap = round(chunk_seconds * self.sr), round(overlap_seconds * self.sr)
        if not 0 <= overlap < chunk:
            raise ValueError(f"chunk overlap {overlap_seconds} s must be >= 0 and shorter than "
                             f"the chunk ({chunk_seconds} s)")
        z_ref = self._pooled([ref, *extra_refs], ref_name)
        mix = np.asarray(mix, dtype=np.float32)
        parts = overlap_add([mix], mix.shape[0], self._window(z_ref, None), window=chunk,
                            overlap=overlap)
        return np.concatenate(list(pcs_stream(parts, sr=self.sr) if self.pcs else parts))

    def _checked_embedding(self, ref: np.ndarray, ref_name: str | Path) -> EncodedReference:
        """The embedding of an in-memory reference after ``read_reference``'s checks: its
        first ``MAX_REF_SECONDS``, refused when too short or voiceless. Shape: (M,) -> z_ref."""
        ref = ref[: _reference_limit(ref.shape[0], self.sr, ref_name)]
        check_reference(ref, self.sr, ref_name)
        return self._embed(ref)

    def _pooled(self, refs: Sequence[np.ndarray], ref_name: str | Path) -> EncodedReference:
        return pool_references([self._checked_embedding(r, ref_name) for r in refs])

    def run(self, job: Job, *, keep_sr: bool = False) -> Result:
        """Extract ``job.mix`` given ``job.ref`` into ``job.out``; see the module docstring."""
        begin = time.perf_counter()
        for src in (job.mix, *job.refs):
            if job.out.resolve() == src.resolve():
                raise InferenceError(f"{job.out}: output would overwrite its input")
        if job.out.suffix.lstrip(".").upper() not in sf.available_formats():
            raise AudioError(f"{job.out}: unsupported audio format '{job.out.suffix}'")
        z_ref = pool_references([self.reference(path) for path in job.refs])
        with MonoReader(job.mix) as reader:
            # Pass 1: length, finiteness and the energy that sets the one scale of every window.
            n_in, total_energy = 0, 0.0

            def counted() -> Iterator[np.ndarray]:
                nonlocal n_in
                for block in reader.blocks():
                    n_in += block.shape[0]
                    yield block

            for block in resample_stream(counted(), reader.sr, self.sr):
                total_energy += energy(block)
            n_model = resampled_length(n_in, reader.sr, self.sr)
            # Pass 2: windows through the model, streamed into the output file.
            mix = fit_length(resample_stream(reader.blocks(), reader.sr, self.sr), n_model)
            est = self._extract_stream(mix, n_model, total_energy, z_ref)
            out_sr = reader.sr if keep_sr else self.sr
            if keep_sr:
                est = fit_length(resample_stream(est, self.sr, out_sr), n_in)
            with atomic_writer(job.out, out_sr) as f:
                for block in est:
                    if not np.isfinite(block).all():
                        raise InferenceError(
                            f"{job.mix}: the model produced non-finite samples"
                            + (" (try without --half)" if self.amp_dtype else "")
                        )
                    f.write(block)
        return Result(duration=n_in / reader.sr, seconds=time.perf_counter() - begin)


# ---------------------------------------------------------------------------------------------
# Jobs from the command line
# ---------------------------------------------------------------------------------------------


def _audio_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InferenceError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTS)


def _pair_reference(mix: Path, ref_dir: Path, refs: list[Path]) -> Path:
    """The reference of ``mix`` in ``ref_dir`` by the pairing rule (module docstring)."""
    if mix.stem.endswith(MIXED_SUFFIX):
        stem = mix.stem[: -len(MIXED_SUFFIX)] + REF_SUFFIX
        found = [p for p in refs if p.stem == stem]
    else:
        stem = mix.stem
        same_name = ref_dir / mix.name
        found = [same_name] if same_name in refs else [p for p in refs if p.stem == stem]
    if len(found) != 1:
        problem = "no reference" if not found else f"{len(found)} references"
        raise InferenceError(f"{mix}: {problem} named {stem}.* in {ref_dir}")
    return found[0]


def _out_name(mix: Path) -> str:
    if mix.stem.endswith(MIXED_SUFFIX):
        return mix.stem[: -len(MIXED_SUFFIX)] + OUT_SUFFIX + OUT_EXT
    return mix.stem + OUT_EXT


def folder_jobs(
    mix_dir: Path, out_dir: Path, *, ref: Path | None = None, ref_dir: Path | None = None
) -> tuple[list[Job], list[InferenceError]]:
    """Pairs for a mixture folder with one reference or a reference folder, and the mixtures
    that could not be paired."""
    mixes = _audio_files(mix_dir)
    if any(p.stem.endswith(MIXED_SUFFIX) for p in mixes):
        mixes = [p for p in mixes if p.stem.endswith(MIXED_SUFFIX)]
    if not mixes:
        raise InferenceError(f"{mix_dir}: no audio files")
    refs = _audio_files(ref_dir) if ref_dir is not None else []
    jobs, errors = [], []
    for mix in mixes:
        try:
            pair = ref if ref is not None else _pair_reference(mix, ref_dir, refs)
        except InferenceError as err:
            errors.append(err)
            continue
        jobs.append(Job(mix=mix, ref=pair, out=out_dir / _out_name(mix)))
    return jobs, errors


def list_jobs(csv_path: Path) -> list[Job]:
    """Jobs from a CSV file with a header naming (at least) the columns mix, ref, out."""
    if not csv_path.is_file():
        raise InferenceError(f"{csv_path}: no such file")
    base = csv_path.parent
    try:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InferenceError(f"{csv_path}: missing column(s) {', '.join(missing)}")
            jobs = []
            for row in reader:
                cells = {c: (row.get(c) or "").strip() for c in CSV_COLUMNS}
                empty = [c for c, v in cells.items() if not v]
                if empty:
                    raise InferenceError(
                        f"{csv_path}: line {reader.line_num}: empty {', '.join(empty)}"
                    )
                jobs.append(Job(**{c: base / v for c, v in cells.items()}))
    except (UnicodeDecodeError, csv.Error) as err:
        raise InferenceError(f"{csv_path}: not a readable CSV file ({err})") from None
    if not jobs:
        raise InferenceError(f"{csv_path}: no rows")
    return jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Extract the target speaker (HiFi-TSE).",
        epilog="Pairing rules, windows and level handling: see the docstring of inference.py.",
    )
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="a checkpoint of any model family (.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--mix", type=Path, help="one mixture")
    source.add_argument("--mix-dir", type=Path, help="a folder of mixtures")
    source.add_argument("--list", type=Path, help="CSV file with columns mix,ref,out")
    refs = parser.add_mutually_exclusive_group()
    refs.add_argument("--ref", type=Path, action="append",
                      help="reference of the target speaker; repeat it for several (pooled)")
    refs.add_argument("--ref-dir", type=Path, help="folder of references paired by file name")
    parser.add_argument("-o", "--out", type=Path, help="output file (with --mix)")
    parser.add_argument("--out-dir", type=Path, help="output folder (with --mix-dir)")
    parser.add_argument("--keep-sr", action="store_true", help="write at the mixture's own rate")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--half", action="store_true", help="bf16/fp16 autocast (CUDA only)")
    parser.add_argument("--no-ema", action="store_true", help="raw generator, not its EMA")
    parser.add_argument("--pcs", action="store_true",
                        help="perceptual contrast stretching (PCS400 at 48 kHz) of every output")
    parser.add_argument("--window", type=float, default=WINDOW_SECONDS, metavar="SECONDS")
    parser.add_argument("--overlap", type=float, default=OVERLAP_SECONDS, metavar="SECONDS")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.mix is not None and (args.ref is None or args.out is None):
        parser.error("--mix needs --ref and -o/--out")
    if args.mix_dir is not None and (args.out_dir is None or (args.ref or args.ref_dir) is None):
        parser.error("--mix-dir needs --out-dir and one of --ref / --ref-dir")
    if args.list is not None and (args.ref or args.ref_dir or args.out or args.out_dir):
        parser.error("--list takes mix, ref and out from the CSV file only")
    if args.mix is None and args.out is not None:
        parser.error("-o/--out goes with --mix; use --out-dir with --mix-dir")
    if args.mix_dir is None and args.out_dir is not None:
        parser.error("--out-dir goes with --mix-dir; use -o/--out with --mix")
    if not 0 <= args.overlap < args.window:
        parser.error("--overlap must be >= 0 and shorter than --window")
    return args


def _error(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)  # noqa: T201 (the CLI's one-line error)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    errors: list[Exception] = []
    try:
        if args.mix is not None:
            jobs = [Job(mix=args.mix, ref=args.ref[0], out=args.out,
                        extra_refs=tuple(args.ref[1:]))]
        elif args.mix_dir is not None:
            jobs, errors = folder_jobs(
                args.mix_dir, args.out_dir, ref=args.ref[0] if args.ref else None,
                ref_dir=args.ref_dir
            )
            jobs = [replace(job, extra_refs=tuple((args.ref or [])[1:])) for job in jobs]
        else:
            jobs = list_jobs(args.list)
        device = resolve_device(args.device)
        model = load_model(args.ckpt, use_ema=not args.no_ema)
    except (InferenceError, CheckpointError) as err:
        _error(err)
        return 1
    if model.sample_rate != SAMPLE_RATE:
        log.warning("%s: the model runs at %d Hz", args.ckpt, model.sample_rate)
    extractor = Extractor(
        model,
        device=device,
        half=args.half,
        window_seconds=args.window,
        overlap_seconds=args.overlap,
        pcs=args.pcs,
    )
    for err in errors:
        _error(err)
    for job in jobs:
        try:
            result = extractor.run(job, keep_sr=args.keep_sr)
        except (AudioError, InferenceError) as err:
            errors.append(err)
            _error(err)
            continue
        except OSError as err:
            errors.append(err)
            _error(f"{job.out}: cannot write ({err.strerror or err})")
            continue
        except torch.OutOfMemoryError:
            errors.append(MemoryError())
            _error(f"{job.mix}: out of memory on {device} (try a shorter --window)")
            continue
        print(  # noqa: T201 (the CLI's result line)
            f"{job.mix} -> {job.out}: {result.duration:.2f} s in {result.seconds:.2f} s, "
            f"RTF {result.rtf:.3f}"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
