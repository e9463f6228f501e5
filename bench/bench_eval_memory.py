"""Peak memory and time of each evaluation metric alone on long signals.

    python bench/bench_eval_memory.py [--minutes 1 10] [--metrics si_sdr pesq ...]
    python bench/bench_eval_memory.py --minutes 0.05 0.1 --metrics si_sdr lsd_hb --no-write

(the second: a smoke run in seconds).

Each (metric, length) runs in a fresh spawned process with one thread (``OMP_NUM_THREADS=1``,
``OMP_WAIT_POLICY=PASSIVE``, ``NUMBA_NUM_THREADS=1``, one torch thread), as an evaluation's metric
worker does. The process imports the metric's modules, loads its model (the GE2E encoder, the
DNSMOS session, the PocketSphinx decoder, the ViSQOL instance) and makes the signals; its peak
RSS (``ru_maxrss``) then is the *base*. It runs the metric once; its peak RSS after is the
*peak*, and peak - base is what the metric itself needed. The signals are speech-like and
float32 at 48 kHz: a RAVDESS sentence (../shared/data) repeated to the length is the target,
the estimate is target + white noise, the mixture target + another actor's repeated sentence
+ the noise. Prints a table, writes it to doc/benchmarks.md and prints one JSON object as its
last line.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section

SR = 48_000
WB_PESQ_SR = 16_000
SPEECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech" / "ravdess"
TARGET_FILE = "Actor_03/03-01-01-01-01-01-03.flac"
INTERFERER_FILE = "Actor_02/03-01-01-01-02-01-02.flac"
NOISE_RMS = 1e-3  # RAVDESS is quiet (around -48 dBFS RMS): a noisy but scoreable estimate
INTERFERER_GAIN = 0.5
CHUNK = 2**20  # samples of noise drawn at a time, so making the signals needs no temporaries
KIB = 1024
MIB = 1024**2
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": "1"}
METRICS = ("si_sdr", "si_sdri-mix", "pesq", "stoi", "estoi", "lsd_hb", "ta_suppression", "sdr",
           "similarity", "dnsmos", "wer", "visqol")


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB


def make_signals(minutes: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, target, mixture), float32 at 48 kHz, ``minutes`` long; the noise is drawn
    ``CHUNK`` samples at a time so that the process peaks at the three signals.

    Shape:
        each (round(minutes * 60 * SR),)
    """
    import soundfile as sf

    n = round(minutes * 60 * SR)
    speech, _ = sf.read(SPEECH / TARGET_FILE, dtype="float32")
    other, _ = sf.read(SPEECH / INTERFERER_FILE, dtype="float32")
    target = np.resize(speech, n)
    estimate = target.copy()
    mixture = np.resize(other, n)
    mixture *= INTERFERER_GAIN
    mixture += target
    rng = np.random.default_rng(0)
    for start in range(0, n, CHUNK):
        noise = rng.standard_normal(min(CHUNK, n - start), dtype=np.float32)
        noise *= NOISE_RMS
        estimate[start : start + CHUNK] += noise
        mixture[start : start + CHUNK] += noise
    return estimate, target, mixture


Metric = Callable[[np.ndarray, np.ndarray, np.ndarray, list[str]], float]


def load_metric(name: str) -> Metric:
    """The metric ``name`` as ``f(estimate, target, mixture, notes) -> value``, its modules
    imported and its model loaded (so that both count in the base)."""
    from evaluation import metrics

    if name == "si_sdr":
        return lambda e, t, m, notes: metrics.si_sdr_db(e, t)
    if name == "si_sdri-mix":  # the mixture's SI-SDR, which SI-SDRi subtracts
        return lambda e, t, m, notes: metrics.si_sdr_db(m, t)
    if name == "pesq":
        return lambda e, t, m, notes: metrics.pesq(e, t, SR, WB_PESQ_SR, notes)
    if name in ("stoi", "estoi"):
        extended = name == "estoi"
        return lambda e, t, m, notes: metrics.stoi(e, t, SR, extended=extended, notes=notes)
    if name == "lsd_hb":
        return lambda e, t, m, notes: metrics.lsd_highband(e, t, SR, notes)
    if name == "ta_suppression":
        return lambda e, t, m, notes: metrics.ta_suppression(e, m)
    if name == "sdr":
        import mir_eval  # noqa: F401  (bss_sdr imports it on first use)

        return lambda e, t, m, notes: metrics.bss_sdr(e, t, notes, sample_rate=SR)
    if name == "similarity":
        from evaluation import speaker_similarity

        speaker_similarity._get_encoder()
        # the embedding's norm: 1, or NaN for a silent signal
        return lambda e, t, m, notes: float(
            np.linalg.norm(speaker_similarity.speaker_embedding(e, SR)))
    if name == "dnsmos":
        from evaluation import dnsmos

        dnsmos._get_session(False)
        return lambda e, t, m, notes: dnsmos.dnsmos(
            e, SR, level_dbfs=metrics.DNSMOS_LEVEL_DBFS)["ovrl"]
    if name == "wer":
        from evaluation import asr

        asr._get_decoder()
        return lambda e, t, m, notes: float(len(asr.transcribe(e, SR).split()))  # words
    if name == "visqol":
        from evaluation import visqol

        visqol._get_api()
        return lambda e, t, m, notes: visqol.visqol_audio(e, t, SR)
    raise ValueError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")


def measure(name: str, minutes: float) -> dict[str, Any]:
    """Run in a fresh process: base and peak RSS (MiB) and the time of one metric call."""
    import torch

    torch.set_num_threads(1)
    metric = load_metric(name)
    signals = make_signals(minutes)
    base = peak_rss_mib()
    notes: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()
    value = metric(*signals, notes)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"metric": name, "minutes": minutes, "base_mib": round(base, 1),
            "peak_mib": round(peak_rss_mib(), 1), "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2), "value": None if math.isnan(value) else value,
            "notes": "; ".join(notes)}


def measure_fresh(name: str, minutes: float) -> dict[str, Any]:
    """``measure`` in a fresh spawned process with the one-thread environment."""
    os.environ.update(CHILD_ENV)  # read by the child's libraries when they load
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(measure, name, minutes).result()


def table(results: list[dict[str, Any]], minutes: list[float]) -> str:
    """One row per metric: base, peak, peak - base (MiB) and seconds per length, and how much
    more the metric itself needed at the longest length than at the shortest."""
    header = ["metric"]
    for m in minutes:
        header += [f"{m:g} min: base / peak (MiB)", f"{m:g} min: metric (MiB)",
                   f"{m:g} min: s"]
    header.append(f"metric {minutes[-1]:g} / {minutes[0]:g} min")
    rows = []
    for name in dict.fromkeys(r["metric"] for r in results):
        by_length = {r["minutes"]: r for r in results if r["metric"] == name}
        row: list[Any] = [name]
        for m in minutes:
            r = by_length[m]
            row += [f"{r['base_mib']:.0f} / {r['peak_mib']:.0f}",
                    f"{r['peak_mib'] - r['base_mib']:.0f}", f"{r['seconds']:.1f}"]
        first, last = by_length[minutes[0]], by_length[minutes[-1]]
        extra = [max(r["peak_mib"] - r["base_mib"], 1.0) for r in (first, last)]
        row.append(f"{extra[1] / extra[0]:.1f}x")
        rows.append(row)
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0],
                        help="signal lengths")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    args = parser.parse_args()

    results = []
    for name in args.metrics:
        for minutes in args.minutes:
            results.append(measure_fresh(name, minutes))
            r = results[-1]
            print(f"{name} {minutes:g} min: base {r['base_mib']:.0f} MiB, peak "
                  f"{r['peak_mib']:.0f} MiB, {r['seconds']:.1f} s {r['notes']}", flush=True)
    text = table(results, args.minutes)
    print(text)
    if not args.no_write:
        write_section(
            "bench_eval_memory",
            "## Evaluation metrics on long signals (`bench/bench_eval_memory.py`)\n\n"
            f"{machine()}; each metric alone in a fresh process on one thread. Base: the "
            "process's peak RSS after its imports, its model and the three float32 48 kHz "
            "signals (estimate, target, mixture: 11 MiB per signal-minute each); peak: its peak "
            "RSS after one call of the metric; metric: peak - base; s: wall-clock seconds of "
            "the call. Signals: a RAVDESS sentence repeated to the length (the target), plus "
            f"white noise at {NOISE_RMS:g} RMS (the estimate), plus another actor's sentence "
            f"at {INTERFERER_GAIN:g}x and the noise (the mixture). `si_sdri-mix` is the "
            "mixture's SI-SDR; `sdr` is not computed above 60 s.\n\n" + text,
        )
    print_json({"bench": "bench_eval_memory", "minutes": args.minutes, "results": results})


if __name__ == "__main__":
    main()
