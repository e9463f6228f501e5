"""Metric worker processes that a crashing or hanging metric cannot take down with the run.

The metrics run in spawned worker processes, each on one sample at a time. A sample's signals
never travel through a pipe: the main process writes them once to a scratch folder
(``write_item``) and the worker maps them read-only (``np.load(mmap_mode="r")``), so a
one-hour sample is neither pickled nor copied per worker.

A worker that dies while it scores (a segfault or an abort inside a C library: ``pesq``,
ONNX Runtime, PocketSphinx...) or that is still busy when its sample's time is up (it is then
killed) yields a ``Failure`` saying which, and is replaced by a fresh one. ``run_alone`` scores
one sample in a one-off process: the runner uses it to score a failed sample again unit by unit,
to find the unit that failed and keep every other column of that row.

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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics import MetricSettings
from evaluation.sources import Sample

ARRAYS = ("mix", "ref", "target", "heard")  # the Sample fields written as .npy files
ESTIMATE_FILE = "estimate{}.npy"  # {} is the column prefix ("" or "stream_")
INFO_FILE = "sample.json"
START_TIMEOUT_S = 300.0  # a worker that cannot import its modules in this long is broken
STOP_TIMEOUT_S = 10.0
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
    """Why a job has no result: ``crashed (signal 11, SIGSEGV)``, ``timed out after 60 s``..."""

    reason: str


# ---------------------------------------------------------------------------------------------
# The scratch folder of a sample
# ---------------------------------------------------------------------------------------------


def write_item(folder: Path, sample: Sample, estimates: dict[str, np.ndarray]) -> None:
    """The sample's signals and estimates as .npy files, its other fields as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        wave = getattr(sample, name)
        if wave is not None:
            np.save(folder / f"{name}.npy", np.asarray(wave, dtype=np.float32))
    for prefix, estimate in estimates.items():
        np.save(folder / ESTIMATE_FILE.format(prefix), np.asarray(estimate, dtype=np.float32))
    info = {"id": sample.id, "condition": sample.condition, "transcript": sample.transcript,
            "meta": sample.meta, "estimates": list(estimates)}
    (folder / INFO_FILE).write_text(json.dumps(info))


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


def score_job(job: Job) -> dict[str, Any]:
    """The columns and notes of one job, computed in this process."""
    from evaluation.scoring import score  # the metric libraries load in the worker only

    sample, estimates = read_item(job.folder)
    return score(estimates, sample, job.settings, job.units)


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker: the workers are the parallelism, and the generator in the main
    # process needs the remaining cores (NUMBA_NUM_THREADS: ViSQOL's numba kernels, read when
    # numba is first imported).
    os.environ["NUMBA_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    import evaluation.scoring  # noqa: F401  (imported before "ready": not on a job's clock)

    conn.send("ready")
    with contextlib.suppress(EOFError, BrokenPipeError):  # the main process is gone
        while (job := conn.recv()) is not None:
            conn.send(score_job(job))


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


class WorkerPool:
    """``n`` metric workers; ``submit`` hands a job to an idle one, ``collect`` returns finished
    jobs with their result (a dict) or a ``Failure``."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a pool needs at least one worker, got {n}")
        self._workers = [self._start() for _ in range(n)]

    @staticmethod
    def _start() -> _Worker:
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=_worker_main, args=(child,), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def idle(self) -> int:
        """How many workers are ready and without a job."""
        return sum(w.ready and w.job is None for w in self._workers)

    def busy(self) -> int:
        return sum(w.job is not None for w in self._workers)

    def submit(self, job: Job) -> None:
        worker = next((w for w in self._workers if w.ready and w.job is None), None)
        if worker is None:
            raise RuntimeError("no idle metric worker: collect first")
        worker.job, worker.deadline = job, time.monotonic() + job.timeout_s
        with contextlib.suppress(OSError):  # died since it was ready: collect reports the job
            worker.conn.send(job)

    def wait_idle(self) -> list[tuple[Job, dict[str, Any] | Failure]]:
        """Collect until a worker is idle; the jobs that finished meanwhile."""
        done: list[tuple[Job, dict[str, Any] | Failure]] = []
        while not self.idle():
            done += self.collect()
        return done

    def collect(self, *, block: bool = True) -> list[tuple[Job, dict[str, Any] | Failure]]:
        """The jobs that ended; with ``block``, after waiting until at least one worker changes
        state (ready, done, dead or past its deadline)."""
        now = time.monotonic()
        waits = [w.deadline - now for w in self._workers if w.job is not None]
        timeout = (max(0.0, min(waits)) if waits else START_TIMEOUT_S) if block else 0.0
        handles = [h for w in self._workers for h in (w.conn, w.process.sentinel)]
        ready = set(wait(handles, timeout=timeout))
        done: list[tuple[Job, dict[str, Any] | Failure]] = []
        for i, worker in enumerate(self._workers):
            failure = None
            if worker.conn in ready:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    failure = Failure(self._reap(worker))
                else:
                    if worker.job is None:
                        worker.ready = message == "ready"
                    else:
                        done.append((worker.job, message))
                        worker.job = None
                    continue
            elif worker.process.sentinel in ready:
                failure = Failure(self._reap(worker))
            elif worker.job is not None and time.monotonic() >= worker.deadline:
                worker.process.kill()
                self._reap(worker)
                failure = Failure(f"timed out after {worker.job.timeout_s:.0f} s")
            if failure is None:
                continue
            if worker.job is None:  # died before or between jobs: it cannot even start
                raise RuntimeError(f"a metric worker failed to start: {failure.reason}")
            done.append((worker.job, failure))
            self._workers[i] = self._start()
        if block and not ready and not done and not any(w.job for w in self._workers):
            raise RuntimeError(f"no metric worker started within {START_TIMEOUT_S:.0f} s")
        return done

    @staticmethod
    def _reap(worker: _Worker) -> str:
        worker.process.join(STOP_TIMEOUT_S)
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


def run_alone(job: Job) -> dict[str, Any] | Failure:
    """``job`` in a fresh one-off worker process: its result, or why it has none."""
    pool = WorkerPool(1)
    try:
        pool.wait_idle()
        pool.submit(job)
        while not (done := pool.collect()):
            pass
        return done[0][1]
    finally:
        pool.close()
