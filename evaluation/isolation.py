"""Metric worker processes that a crashing or hanging metric cannot take down with the run.

The metrics run in spawned worker processes, each on one sample at a time. A sample's signals
never travel through a pipe: the main process writes them once to a scratch folder
(``write_item``) and the worker maps them read-only (``np.load(mmap_mode="r")``), so a
one-hour sample is neither pickled nor copied per worker.

A worker reports each unit (``evaluation/scoring.py``) as it starts it and sends its columns as
soon as it is done. One that dies while it scores (a segfault or an abort inside a C library:
``pesq``, ONNX Runtime, PocketSphinx...) or that is still busy when its sample's time is up (it
is then killed) yields a ``Failure`` naming the unit it was in, with the columns of the units it
had finished, and is replaced by a fresh process; the runner gives the units not yet run to a
worker again. So a crash or a hang costs exactly the unit that caused it, once.

Workers ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the main
process decides what happens to the run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from dsp.processes import die_with_parent
from evaluation.metrics import MetricSettings
from evaluation.sources import Sample

ARRAYS = ("mix", "ref", "target", "heard")  # the Sample fields written as .npy files
ESTIMATE_FILE = "estimate{}.npy"  # {} is the column prefix ("" or "stream_")
INFO_FILE = "sample.json"
START_TIMEOUT_S = 300.0  # a worker that cannot import its modules in this long is broken
STOP_TIMEOUT_S = 10.0
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_CONTEXT = multiprocessing.get_context("spawn")  # safe after CUDA and OpenMP are initialised


@dataclass(frozen=True)
class Job:
    """One sample to score: its scratch ``folder`` (``write_item``), the units to run (``None``:
    every unit of ``settings``) and the seconds it may take once a worker has it."""

    key: Any  # the caller's handle (the sample's index)
    name: str  # the sample's ID, for the log
    folder: Path
    settings: MetricSettings
    timeout_s: float
    units: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Failure:
    """Why a job ended without finishing: ``crashed (signal 11, SIGSEGV)``, ``timed out after
    60 s``... ``unit`` is the unit that was running (None: the worker died between units), and
    ``done`` the columns and notes of the units that finished before it."""

    reason: str
    unit: str | None
    done: dict[str, Any]
    finished: tuple[str, ...]


class WorkerError(RuntimeError):
    """A metric worker cannot even start (its imports fail): no sample could be scored."""


# ---------------------------------------------------------------------------------------------
# The scratch folder of a sample
# ---------------------------------------------------------------------------------------------


def write_item(folder: Path, sample: Sample, estimates: dict[str, np.ndarray]) -> int:
    """The sample's signals and estimates as .npy files, its other fields as JSON; returns the
    bytes of signal written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in ARRAYS:
        wave = getattr(sample, name)
        if wave is not None:
            np.save(folder / f"{name}.npy", np.asarray(wave, dtype=np.float32))
            written += np.asarray(wave).size * np.dtype(np.float32).itemsize
    for prefix, estimate in estimates.items():
        np.save(folder / ESTIMATE_FILE.format(prefix), np.asarray(estimate, dtype=np.float32))
        written += estimate.size * np.dtype(np.float32).itemsize
    info = {"id": sample.id, "condition": sample.condition, "transcript": sample.transcript,
            "meta": sample.meta, "estimates": list(estimates)}
    (folder / INFO_FILE).write_text(json.dumps(info))
    return written


def read_item(folder: Path) -> tuple[Sample, dict[str, np.ndarray]]:
    """What ``write_item`` wrote, the signals memory-mapped read-only."""
    info = json.loads((folder / INFO_FILE).read_text())

    def load(path: Path) -> np.ndarray | None:
        return np.load(path, mmap_mode="r") if path.exists() else None

    arrays = {name: load(folder / f"{name}.npy") for name in ARRAYS}
    sample = Sample(id=info["id"], condition=info["condition"], transcript=info["transcript"],
                    meta=info["meta"], **arrays)
    estimates = {p: load(folder / ESTIMATE_FILE.format(p)) for p in info["estimates"]}
    return sample, estimates


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    # The metrics never use a GPU: a worker must not initialise CUDA (the device is the main
    # process's). One thread per worker: the workers are the parallelism, and the generator in
    # the main process needs the remaining cores (NUMBA_NUM_THREADS: ViSQOL's numba kernels,
    # read when numba is first imported).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["NUMBA_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from evaluation.scoring import finite_estimates, score_unit, units_of  # before "ready"

    conn.send(("ready", None))
    with contextlib.suppress(EOFError, BrokenPipeError):  # the main process is gone
        while (job := conn.recv()) is not None:
            sample, estimates = read_item(job.folder)
            finite, notes = finite_estimates(estimates)
            conn.send(("part", {"notes": notes}))
            for name in job.units if job.units is not None else units_of(job.settings):
                conn.send(("start", name))  # if this process dies now, the unit is the culprit
                conn.send(("part", score_unit(name, sample, finite, job.settings)))
            del sample, estimates, finite  # unmap the scratch files
            conn.send(("done", None))


def _exit_reason(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"crashed (signal {-code}, {name})"
    return f"worker exited with code {code}"


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    job: Job | None = None
    deadline: float = field(default=float("inf"))
    unit: str | None = None  # the unit the job is computing
    done: dict[str, Any] = field(default_factory=lambda: {"notes": []})  # the job's finished units
    finished: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _one_thread_env() -> Iterator[None]:
    """The environment a spawned worker starts with: one OpenMP/BLAS thread (read when NumPy
    and PyTorch load, before the worker's own code runs)."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def merge_part(done: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one unit's columns and notes to what a job has finished."""
    done["notes"] += part.pop("notes")
    done.update(part)


class WorkerPool:
    """``n`` metric workers; ``submit`` hands a job to an idle one, ``collect`` returns ended
    jobs with their columns and notes (a dict) or a ``Failure``."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a pool needs at least one worker, got {n}")
        self._workers = [self._start() for _ in range(n)]

    @staticmethod
    def _start() -> _Worker:
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=_worker_main, args=(child,), daemon=True)
        with _one_thread_env():
            process.start()
        child.close()
        return _Worker(process, parent)

    def idle(self) -> int:
        """How many workers are ready and without a job."""
        return sum(w.ready and w.job is None for w in self._workers)

    def submit(self, job: Job) -> None:
        worker = next((w for w in self._workers if w.ready and w.job is None), None)
        if worker is None:
            raise RuntimeError("no idle metric worker: collect first")
        worker.job, worker.deadline = job, time.monotonic() + job.timeout_s
        worker.unit, worker.done, worker.finished = None, {"notes": []}, []
        with contextlib.suppress(OSError):  # died since it was ready: collect reports the job
            worker.conn.send(job)

    def collect(self, *, block: bool = True) -> list[tuple[Job, dict[str, Any] | Failure]]:
        """The jobs that ended; with ``block``, after waiting until at least one worker changes
        state (a message, an exit, a deadline)."""
        now = time.monotonic()
        waits = [w.deadline - now for w in self._workers if w.job is not None]
        timeout = (max(0.0, min(waits)) if waits else START_TIMEOUT_S) if block else 0.0
        handles = [h for w in self._workers for h in (w.conn, w.process.sentinel)]
        ready = set(wait(handles, timeout=timeout))
        ended: list[tuple[Job, dict[str, Any] | Failure]] = []
        for i, worker in enumerate(self._workers):
            reason = None
            try:
                while worker.conn.poll():  # what it sent before it died counts too
                    kind, payload = worker.conn.recv()
                    if kind == "ready":
                        worker.ready = True
                    elif kind == "start":
                        worker.unit = payload
                    elif kind == "part":
                        merge_part(worker.done, payload)
                        if worker.unit is not None:
                            worker.finished.append(worker.unit)
                        worker.unit = None
                    else:  # "done"
                        assert worker.job is not None
                        ended.append((worker.job, worker.done))
                        worker.job = None
            except (EOFError, OSError):
                reason = self._reap(worker)
            if reason is None and not worker.process.is_alive():
                reason = self._reap(worker)
            if reason is None and worker.job is not None and time.monotonic() >= worker.deadline:
                worker.process.kill()
                self._reap(worker)
                reason = f"timed out after {worker.job.timeout_s:.0f} s"
            if reason is None:
                continue
            if not worker.ready:
                raise WorkerError(f"a metric worker failed to start: {reason}")
            if worker.job is not None:
                ended.append((worker.job, Failure(reason, worker.unit, worker.done,
                                                  tuple(worker.finished))))
            self._workers[i] = self._start()
        if block and not ready and not ended and not any(w.job for w in self._workers):
            raise WorkerError(f"no metric worker started within {START_TIMEOUT_S:.0f} s")
        return ended

    @staticmethod
    def _reap(worker: _Worker) -> str:
        worker.process.join(STOP_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        return _exit_reason(worker.process)

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are killed."""
        for worker in self._workers:
            if worker.job is None and worker.process.is_alive():
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            else:
                worker.process.kill()
        for worker in self._workers:
            worker.process.join(STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []
