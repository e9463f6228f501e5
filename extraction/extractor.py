"""The extractor: a trained model run over recordings of any length (files or arrays), with
the reference cache; see extraction/__init__.py for what it does to them."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

from dsp.audio import (
    READ_BLOCK_SECONDS,
    AudioError,
    MonoReader,
    atomic_writer,
    fit_length,
    resample_stream,
    resampled_length,
)
from dsp.level import RMS_EPS
from extraction.pcs import pcs_stream
from extraction.reference import check_reference, read_reference, reference_limit
from extraction.streaming import StreamingExtractor
from extraction.windows import OVERLAP_SECONDS, WINDOW_SECONDS, overlap_add
from models.hifi_tse.tf_gridnet import bf16_lstm_works, use_float32_lstms
from models.layers.conditioning import EncodedReference, pool_references

log = logging.getLogger(__name__)

# Embedded references kept by an Extractor: each is (1, S, K, D) float32, about 81 MB for 30 s
# at the recipe's width (3001 frames x 53 bands x 128 channels), so a --ref-dir run must not
# keep them all; 8 covers a list that alternates between a few speakers.
REF_CACHE_SIZE = 8


class InferenceError(ValueError):
    """A job that cannot run (bad pairing, bad list, bad output path); names the file."""


# ---------------------------------------------------------------------------------------------
# Jobs from the command line
# ---------------------------------------------------------------------------------------------


def energy(block: np.ndarray) -> float:
    """Sum of squares in float64: the blocks of a whole recording add up without rounding
    drift."""
    block64 = block.astype(np.float64)
    return float(np.dot(block64, block64))


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
    hop_seconds: tuple[float, ...] = ()  # streaming: compute time of each pushed hop

    def hop_percentile(self, q: float) -> float:
        """Streaming: the ``q``-th percentile of the per-hop compute time, in seconds."""
        return float(np.percentile(self.hop_seconds, q))

    @property
    def rtf(self) -> float:
        """Real-time factor: processing time / audio duration (< 1 is faster than real time)."""
        return self.seconds / self.duration


class Extractor:
    """Runs a model over files of any length in bounded memory (extraction/__init__.py).

    ``half`` runs the network under bf16 autocast on GPUs that support it (fp16 otherwise); the
    STFT stays float32 in any case. It is ignored, with a warning, on the CPU. ``pcs`` applies
    perceptual contrast stretching (extraction/pcs.py) to every estimate of ``run``,
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
        self._rates_seen: set[int] = set()  # input rates already announced (``_resampled``)
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

    def _resampled(self, path: Path, sr: int) -> bool:
        """Whether a file at ``sr`` must be resampled to the model's rate; the first file at each
        other rate is announced in one line."""
        if sr == self.sr:
            return False
        if sr not in self._rates_seen:
            self._rates_seen.add(sr)
            log.info("%s: %d Hz; files at %d Hz are resampled to the model's %d Hz", path, sr,
                     sr, self.sr)
        return True

    def reference(self, path: Path) -> EncodedReference:
        """The embedded reference of a file (``read_reference``); the ``ref_cache_size`` most
        recently used ones are kept (batch 1)."""
        if path in self._refs:
            self._refs.move_to_end(path)
            return self._refs[path]
        wave, sr = read_reference(path)
        if self._resampled(path, sr):
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
        # memory (extraction/pcs.py).
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
        ref = ref[: reference_limit(ref.shape[0], self.sr, ref_name)]
        check_reference(ref, self.sr, ref_name)
        return self._embed(ref)

    def _pooled(self, refs: Sequence[np.ndarray], ref_name: str | Path) -> EncodedReference:
        return pool_references([self._checked_embedding(r, ref_name) for r in refs])

    def streaming(
        self, ref: np.ndarray, *, extra_refs: Sequence[np.ndarray] = (),
        ref_name: str | Path = "reference",
    ) -> StreamingExtractor:
        """A stream through a causal model (extraction/streaming.py), with the reference (and
        ``extra_refs``) checked, encoded and pooled once, as ``extract_array`` does. It runs in
        float32 (``half`` is for the windowed path).

        Shape: ref (M,) at the model rate
        """
        return StreamingExtractor(self.model, self._pooled([ref, *extra_refs], ref_name),
                                  device=self.device)

    def extract_streamed(
        self, mix: np.ndarray, ref: np.ndarray, *, extra_refs: Sequence[np.ndarray] = (),
        ref_name: str | Path = "reference",
    ) -> np.ndarray:
        """The target as a live system gets it from a causal model: the mixture pushed hop by
        hop through ``streaming`` (each sample's output depends only on what came before it,
        its level on a running RMS), then PCS as a stream when ``pcs``.

        Shape:
            mix (N,), ref (M,) -> (N,) float32
        """
        stream = self.streaming(ref, extra_refs=extra_refs, ref_name=ref_name)
        mix = np.asarray(mix, dtype=np.float32)
        parts = [stream.push(mix[i : i + stream.hop]) for i in range(0, mix.shape[0], stream.hop)]
        parts.append(stream.flush())
        return np.concatenate(list(pcs_stream(parts, sr=self.sr) if self.pcs else parts))

    def _checked_job(self, job: Job) -> None:
        for src in (job.mix, *job.refs):
            if job.out.resolve() == src.resolve():
                raise InferenceError(f"{job.out}: output would overwrite its input")
        if job.out.suffix.lstrip(".").upper() not in sf.available_formats():
            raise AudioError(f"{job.out}: unsupported audio format '{job.out.suffix}'")

    def _write(self, job: Job, blocks: Iterable[np.ndarray], sr: int) -> None:
        """Stream ``blocks`` into ``job.out`` (atomically), refusing non-finite samples."""
        with atomic_writer(job.out, sr) as f:
            for block in blocks:
                if not np.isfinite(block).all():
                    raise InferenceError(
                        f"{job.mix}: the model produced non-finite samples"
                        + (" (try without --half)" if self.amp_dtype else "")
                    )
                f.write(block)

    def run_stream(self, job: Job, *, keep_sr: bool = False) -> Result:
        """Extract ``job.mix`` into ``job.out`` as a live system would: read block by block,
        resampled as a stream, pushed one hop at a time through a causal model
        (``streaming``), written as it comes out; the compute time of every hop is recorded.
        With ``keep_sr`` the output is resampled back and cut to the header's frame count."""
        begin = time.perf_counter()
        self._checked_job(job)
        stream = StreamingExtractor(
            self.model, pool_references([self.reference(path) for path in job.refs]),
            device=self.device)
        hop_seconds: list[float] = []
        with MonoReader(job.mix) as reader:
            self._resampled(job.mix, reader.sr)
            n_in = 0

            def counted() -> Iterator[np.ndarray]:
                nonlocal n_in
                for block in reader.blocks():
                    n_in += block.shape[0]
                    yield block

            def hops() -> Iterator[np.ndarray]:  # the model's output, pushed hop by hop
                pending = np.zeros(0, dtype=np.float32)
                for block in resample_stream(counted(), reader.sr, self.sr):
                    pending = np.concatenate([pending, block])
                    while pending.shape[0] >= stream.hop:
                        start = time.perf_counter()
                        out = stream.push(pending[: stream.hop])
                        hop_seconds.append(time.perf_counter() - start)
                        pending = pending[stream.hop :]
                        yield out
                yield stream.push(pending)
                yield stream.flush()

            est = pcs_stream(hops(), sr=self.sr) if self.pcs else hops()
            out_sr = reader.sr if keep_sr else self.sr
            if keep_sr:
                est = fit_length(resample_stream(est, self.sr, out_sr), reader.frames)
            self._write(job, est, out_sr)
        return Result(duration=n_in / reader.sr, seconds=time.perf_counter() - begin,
                      hop_seconds=tuple(hop_seconds))

    def run(self, job: Job, *, keep_sr: bool = False) -> Result:
        """Extract ``job.mix`` given ``job.refs`` into ``job.out`` (extraction/__init__.py)."""
        begin = time.perf_counter()
        self._checked_job(job)
        z_ref = pool_references([self.reference(path) for path in job.refs])
        with MonoReader(job.mix) as reader:
            self._resampled(job.mix, reader.sr)
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
            self._write(job, est, out_sr)
        return Result(duration=n_in / reader.sr, seconds=time.perf_counter() - begin)
