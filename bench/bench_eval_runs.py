"""Peak memory and time of whole evaluate.py runs on one long triplet: 1 and 10 minutes with the
default metrics, 60 minutes with ``--metrics core``.

    python bench/bench_eval_runs.py                        # 1, 10 min default; 60 min core
    python bench/bench_eval_runs.py --runs 1:default 3:core --no-write

Each run is a fresh process (``evaluate.main`` in a child) on a synthetic 48 kHz triplet: a
RAVDESS actor's sentences tiled to the length, a second actor 3 dB below as the interferer,
a 3 s reference. The checkpoint is an untrained tiny generator with 8 bands (the memory of the
metrics and the run is measured, not of a recipe-size network). Reported per run: the peak RSS
of the main process and of the largest metric worker (``ru_maxrss`` of the process and of its
waited-for children), and the wall time. The triplet files are written to a temporary folder and
deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import load_config, model_kwargs
from models.registry import build_model, checkpoint_payload

REPO = Path(__file__).resolve().parents[1]
SR = 48_000
DEFAULT_RUNS = ("1:default", "10:default", "60:core")
SECTION = "eval_runs"
INTERFERER_GAIN = 10 ** (-3 / 20)
REF_SECONDS = 3
BLOCK_SECONDS = 60  # the triplet is written a minute at a time
MIB = 1024.0
# The child: evaluate.main, then the peak RSS (kB on Linux) of itself and of its largest
# waited-for child (the metric workers are joined before main returns).
CHILD = """
import json, resource, sys, time
import evaluate
begin = time.perf_counter()
evaluate.main(sys.argv[1:])
print(json.dumps({
    "main_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "seconds": time.perf_counter() - begin,
}))
"""


def _voices(shared: Path) -> list[np.ndarray]:
    out = []
    for actor in (1, 2):
        files = sorted((shared / "speech" / "ravdess" / f"Actor_{actor:02d}").glob("*.flac"))
        out.append(np.concatenate([sf.read(f, dtype="float32")[0] for f in files]))
    return out


def write_triplet(folder: Path, minutes: float, voices: list[np.ndarray]) -> None:
    """``x-mixed.wav``, ``x-target.wav`` and ``x-ref.wav`` of ``minutes``, a minute at a time."""
    target_voice, other_voice = voices
    n, block = round(minutes * 60 * SR), BLOCK_SECONDS * SR
    files = {k: sf.SoundFile(folder / f"x-{k}.wav", "w", SR, 1, subtype="FLOAT")
             for k in ("mixed", "target")}
    try:
        for start in range(0, n, block):
            idx = np.arange(start, min(start + block, n))
            target = target_voice[idx % len(target_voice)]
            other = other_voice[(idx + SR // 3) % len(other_voice)]
            files["target"].write(target)
            files["mixed"].write(target + INTERFERER_GAIN * other)
    finally:
        for f in files.values():
            f.close()
    sf.write(folder / "x-ref.wav", target_voice[-REF_SECONDS * SR :], SR, subtype="FLOAT")


def tiny_checkpoint(path: Path) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.band_regions=[[0, 24000, 8]]"])
    torch.manual_seed(0)
    torch.save(checkpoint_payload(build_model(model_kwargs(cfg)), model_kwargs(cfg)), path)


def measure(minutes: float, metrics: str, ckpt: Path, voices: list[np.ndarray],
            jobs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench_eval_runs.") as tmp:
        folder = Path(tmp) / "triplet"
        folder.mkdir()
        write_triplet(folder, minutes, voices)
        argv = ["--ckpt", str(ckpt), "--out-dir", str(Path(tmp) / "out"), "--triplets",
                str(folder), "--jobs", str(jobs)]
        if metrics != "default":
            argv += ["--metrics", metrics]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"evaluate.py on {minutes} min failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    return {"minutes": minutes, "metrics": metrics,
            "main_mib": result["main_kb"] / MIB, "worker_mib": result["worker_kb"] / MIB,
            "seconds": result["seconds"], "metrics_used": summary["settings"]["metrics"],
            "failed_items": summary["metric_failures"]["n_items"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        metavar="MINUTES:METRICS", help="e.g. 10:default 60:core")
    parser.add_argument("--jobs", type=int, default=1, help="evaluate.py --jobs")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()
    voices = _voices(args.shared)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_runs_ckpt.") as tmp:
        ckpt = Path(tmp) / "tiny8.pt"
        tiny_checkpoint(ckpt)
        for spec in args.runs:
            minutes, metrics = spec.split(":")
            results.append(measure(float(minutes), metrics, ckpt, voices, args.jobs))
            r = results[-1]
            print(f"{r['minutes']:g} min, {r['metrics_used']}: main {r['main_mib']:.0f} MiB, "
                  f"worker {r['worker_mib']:.0f} MiB, {r['seconds']:.0f} s", flush=True)
    base = next((r for r in results if r["minutes"] == 1 and r["metrics"] == "default"), None)
    rows = []
    for r in results:
        peak = max(r["main_mib"], r["worker_mib"])
        ratio = (f"{peak / max(base['main_mib'], base['worker_mib']):.2f}x"
                 if base is not None and r["metrics"] == "default" else "")
        rows.append([f"{r['minutes']:g} min", r["metrics_used"], f"{r['main_mib']:.0f}",
                     f"{r['worker_mib']:.0f}", ratio, f"{r['seconds']:.0f}",
                     str(r["failed_items"])])
    table = markdown_table(["triplet", "metrics", "main peak RSS (MiB)",
                            "largest worker peak RSS (MiB)", "vs 1 min", "wall time (s)",
                            "items with a failed metric"], rows)
    print(table)
    if not args.no_write:
        body = (f"## evaluate.py on long recordings (`bench/bench_eval_runs.py`)\n\n"
                f"{machine()}; `--jobs {args.jobs}`, tiny 8-band untrained checkpoint, one "
                f"synthetic triplet per run (RAVDESS tiled, interferer 3 dB below). The main "
                f"process (extraction, then the report) and the worker (metrics) peak at "
                f"different times; the machine needs at most their sum.\n\n{table}\n")
        write_section(SECTION, body)
    print_json({"runs": results, "jobs": args.jobs})


if __name__ == "__main__":
    main()
