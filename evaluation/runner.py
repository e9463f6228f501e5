"""The evaluation run: the generator in the main process, the metrics in worker processes.

Each sample is loaded (and, with ``lufs``, its mixture loudness-normalised), extracted through
``Extractor`` (extraction/) as inference.py extracts it (whole file: windows, cross-fades, one level
per file) and, with ``chunk``, a second time chunk by chunk (``Extractor.extract_chunked``), or,
with ``stream``, hop by hop through a causal model as a live system runs it
(``Extractor.extract_streamed``). The metrics, which are CPU-heavy, run in ``jobs`` spawned
worker processes (``evaluation/isolation.py``) while the next sample is extracted. A sample
that cannot be loaded is skipped; a metric that crashes or hangs costs that metric on that row.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyloudnorm
from tqdm import tqdm

from dsp.audio import SAMPLE_RATE, AudioError
from evaluation.isolation import Failure, Job, WorkerPool, merge_part, write_item
from evaluation.metrics import STREAM_PREFIX, MetricSettings, reference_sensitivity, si_sdr_db
from evaluation.scoring import UNITS, nan_row, score, units_of
from evaluation.signal import energy
from evaluation.sources import TP, EvalInputError, Sample, SampleSource, Skipped, one_line
from extraction.extractor import Extractor, InferenceError

log = logging.getLogger("evaluate")

# Samples extracted ahead of the metric workers, per worker (their scratch folders wait on disk).
MAX_QUEUED_PER_JOB = 2
SECONDS_PER_MINUTE = 60.0
# Scratch files of extracted samples waiting for a worker: an hour-long sample takes ~3 GB, and
# a many-worker run must not fill the disk with them.
MAX_SCRATCH_BYTES = 8 << 30
# The run with another sample's reference doubles a sample's extraction: done up to this length
# (simulated sets), not on long recordings.
REF_SWAP_MAX_SECONDS = 60.0
METRIC_TIMEOUT_S = 600.0  # default time one sample's metrics may take per minute of its audio


@dataclass(frozen=True)
class RunSettings:
    """How samples are prepared and extracted."""

    jobs: int = 1  # metric worker processes; 0 computes them in the main process
    lufs: float | None = None  # loudness-normalise each mixture to this (LUFS) before extraction
    chunk_seconds: float | None = None  # also extract in independent chunks of this length
    chunk_overlap_seconds: float = 0.0
    stream: bool = False  # also extract hop by hop through a causal model (true streaming)
    metric_timeout_s: float = METRIC_TIMEOUT_S  # per started minute of a sample's audio




def mixture_loudness(mix: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Integrated loudness of the mixture in LUFS, ITU-R BS.1770-4 (K-weighting, 400 ms gating
    blocks with 75 % overlap, -70 LUFS absolute and -10 LU relative gates), by ``pyloudnorm``.
    -inf when every block is gated out (silence); a signal shorter than one 400 ms block is
    an error from pyloudnorm."""
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(
        np.asarray(mix, dtype=np.float64)))


def target_to_interferer_db(sample: Sample) -> float | None:
    """The target's level over its loudest interferer, as heard in the mixture (dB); None
    unless the sample's interferers are known."""
    if sample.condition != TP or sample.heard is None or len(sample.heard) < 2:
        return None
    loudest = max(energy(h) for h in sample.heard[1:])
    target = energy(sample.heard[0])
    return 10 * math.log10(target / loudest) if target > 0 and loudest > 0 else None


def load_sample(source: SampleSource, settings: RunSettings) -> tuple[Sample, dict[str, Any]]:
    """The sample of ``source`` as the model will see it, and the row fields that describe
    it. With ``settings.lufs`` the mixture, and everything compared with it, are scaled so that
    the mixture's integrated loudness is ``lufs`` (the reference keeps its own level)."""
    sample = source.load()
    row = {
        "id": sample.id,
        "condition": sample.condition,
        "n_interferers": sample.meta.get("n_interferers"),
        "snr_db": sample.meta.get("snr_db"),
        "ref_noisy": sample.meta.get("ref_noisy"),
        "sir_db": target_to_interferer_db(sample),
        "seconds": len(sample.mix) / sample.sample_rate,
    }
    if settings.lufs is not None:
        loudness = mixture_loudness(sample.mix, sample.sample_rate)
        row["mix_lufs"] = loudness
        if math.isfinite(loudness):  # a silent mixture stays as it is
            sample = sample.scaled(10 ** ((settings.lufs - loudness) / 20))
    return sample, row


def extract_all(extractor: Extractor, sample: Sample,
                settings: RunSettings) -> dict[str, np.ndarray]:
    """The estimates of ``sample``: "" the whole-file one, ``stream_`` the chunked or the
    streamed one.

    Shape:
        returns: prefix -> (N,) float32 with N = len(sample.mix)
    """
    name = f"{sample.id} (reference)"
    out = {"": extractor.extract_array(sample.mix, sample.ref, extra_refs=sample.extra_refs,
                                       ref_name=name)}
    if settings.chunk_seconds is not None:
        out[STREAM_PREFIX] = extractor.extract_chunked(
            sample.mix, sample.ref, extra_refs=sample.extra_refs,
            chunk_seconds=settings.chunk_seconds,
            overlap_seconds=settings.chunk_overlap_seconds, ref_name=name)
    elif settings.stream:
        out[STREAM_PREFIX] = extractor.extract_streamed(
            sample.mix, sample.ref, extra_refs=sample.extra_refs, ref_name=name)
    return out


def _failed(job: Job, failure: Failure) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What a job whose worker died or hung still gives: the finished units' columns, a note
    naming the culprit (``pesq: crashed (signal 11, SIGSEGV)``), and the units left to run."""
    culprit = failure.unit or "metric worker"
    log.warning("%s: %s %s", job.name, culprit, failure.reason)
    part = {**failure.done, "notes": [*failure.done["notes"], f"{culprit}: {failure.reason}"]}
    units = job.units if job.units is not None else units_of(job.settings)
    left = tuple(u for u in units if u not in failure.finished and u != failure.unit)
    return part, left


def _other_reference(sources: Sequence[SampleSource], index: int,
                     sample: Sample) -> np.ndarray | None:
    """For a TP sample whose interferers are known: the reference of the next sample
    (cyclically) of another speaker where speakers are known (the validation set), else of the
    next sample (files: possibly the same speaker). That sample is loaded whole: the run is
    limited to ``REF_SWAP_MAX_SECONDS``."""
    if sample.condition != TP or sample.heard is None or len(sources) < 2:
        return None
    speaker = sample.meta.get("speaker")
    for step in range(1, len(sources)):
        try:
            other = sources[(index + step) % len(sources)].load()
        except (AudioError, EvalInputError):
            continue
        if speaker is None or other.meta.get("speaker") != speaker:
            return other.ref
    return None


def wrong_reference_columns(extractor: Extractor, sample: Sample, estimate: np.ndarray,
                            other_ref: np.ndarray, *, zero_mean: bool) -> dict[str, float]:
    """The sample extracted once more with another speaker's reference: the reference
    sensitivity (how far the two outputs differ) and the SI-SDRi of the wrong-reference one."""
    wrong = extractor.extract_array(sample.mix, other_ref,
                                    ref_name=f"{sample.id} (another sample's reference)")
    si_sdr_mix = si_sdr_db(sample.mix, sample.target, zero_mean=zero_mean)
    return {"ref_sens_db": reference_sensitivity(estimate, wrong),
            "si_sdri_wrong_ref": si_sdr_db(wrong, sample.target, zero_mean=zero_mean)
            - si_sdr_mix}


def run_samples(
    extractor: Extractor,
    sources: Sequence[SampleSource],
    *,
    settings: RunSettings,
    metrics: MetricSettings,
    scratch: Path,
    on_row: Callable[[int, dict[str, Any]], None],
    on_skip: Callable[[Skipped], None],
    done_ids: Collection[str] = (),
    strict: bool = False,
) -> None:
    """Score every source whose ID is not in ``done_ids``: ``on_row(index, row)`` as soon as a
    row is complete (in completion order), ``on_skip`` for a sample that cannot be loaded or
    extracted (with ``strict``, its error is raised instead).

    The main process loads and extracts; each sample's signals and estimates go to a folder
    under ``scratch`` (deleted when its row is done), where ``settings.jobs`` spawned metric
    workers read them (``evaluation/isolation.py``) while the next samples are extracted. With
    ``jobs`` 0 the samples are scored one at a time and the units that are not ``native`` run
    in the main process (for debugging); the native ones still run in a child. A worker that
    crashes or passes its sample's time (``metric_timeout_s`` per started minute of audio)
    costs only the unit that caused it (``_failed``): the units it had not run go to a fresh
    worker.
    """
    units = units_of(metrics)
    if settings.jobs > 0:
        inline, pooled = (), units
    else:
        inline = tuple(u for u in units if not UNITS[u].native)
        pooled = tuple(u for u in units if UNITS[u].native)
    todo = [(i, s) for i, s in enumerate(sources) if s.id not in done_ids]
    bar = tqdm(total=len(todo), desc="evaluate", unit="sample", disable=None)
    pool = WorkerPool(max(1, settings.jobs)) if pooled and todo else None
    waiting: dict[int, dict[str, Any]] = {}  # rows whose pooled units are queued or running
    scratch_bytes: dict[int, int] = {}  # their scratch files on disk
    queue: deque[Job] = deque()
    max_waiting = 0 if settings.jobs == 0 else settings.jobs + MAX_QUEUED_PER_JOB * settings.jobs

    def finish(index: int, row: dict[str, Any]) -> None:
        row["notes"] = "; ".join(dict.fromkeys(row["notes"]))
        on_row(index, row)
        bar.update()

    def ended(job: Job, result: dict[str, Any] | Failure) -> None:
        row = waiting[job.key]
        if isinstance(result, Failure):
            result, left = _failed(job, result)
            if left:  # the rest of the sample's units, in a fresh worker
                queue.appendleft(replace(job, units=left))
        else:
            left = ()
        merge_part(row, result)
        if not left:
            del waiting[job.key], scratch_bytes[job.key]
            shutil.rmtree(job.folder, ignore_errors=True)
            finish(job.key, row)

    def too_many(most: int) -> bool:
        # One sample over the disk budget (an hour with many interferers) still goes alone.
        return len(waiting) > most or (len(waiting) > 1
                                       and sum(scratch_bytes.values()) > MAX_SCRATCH_BYTES)

    def pump(most: int) -> None:
        """Hand queued jobs to idle workers and take finished rows until at most ``most`` rows
        (and at most ``MAX_SCRATCH_BYTES`` of scratch files) are waiting."""
        assert pool is not None
        while True:
            while queue and pool.idle():
                pool.submit(queue.popleft())
            for job, result in pool.collect(block=too_many(most)):
                ended(job, result)
            if not too_many(most) and not (queue and pool.idle()):
                return

    try:
        for index, source in todo:
            try:
                sample, base = load_sample(source, settings)
                estimates = extract_all(extractor, sample, settings)
            except (AudioError, EvalInputError, InferenceError) as err:
                if strict:
                    raise
                on_skip(Skipped(source.id, one_line(err)))
                bar.update()
                continue
            row = {**base, **nan_row(metrics), "notes": []}
            if "core" in metrics.groups and base["seconds"] <= REF_SWAP_MAX_SECONDS:
                try:
                    other_ref = _other_reference(sources, index, sample)
                    if other_ref is not None:
                        row.update(wrong_reference_columns(extractor, sample, estimates[""],
                                                           other_ref,
                                                           zero_mean=metrics.zero_mean))
                except (AudioError, EvalInputError, InferenceError) as err:
                    row["notes"].append(f"reference swap: {one_line(err)}")
            if inline:
                merge_part(row, score(estimates, sample, metrics, inline))
            if pool is None:
                finish(index, row)
                continue
            folder = scratch / f"{index:08d}"
            scratch_bytes[index] = write_item(folder, sample, estimates)
            del sample, estimates  # the worker maps the files; a long sample leaves memory now
            minutes = max(1, math.ceil(base["seconds"] / SECONDS_PER_MINUTE))
            waiting[index] = row
            queue.append(Job(index, source.id, folder, metrics,
                             settings.metric_timeout_s * minutes, pooled))
            pump(max_waiting)
        if pool is not None:
            pump(0)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
