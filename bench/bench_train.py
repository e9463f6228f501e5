"""Training speed and peak memory on the CPU: the tiny config through the real ``train.py``, and
one optimizer step of the recipe.

    .venv/bin/python bench/bench_train.py [--steps 30] [--threads 2] [--no-write]

Tiny config: ../shared/data is packed into a temporary folder (as ``bench/bench_data.py`` does)
and ``train.py`` runs in a subprocess on configs/tiny.yaml's model with that data (one DataLoader
worker, 4 s segments), fp32, ``--steps`` micro-steps, logging every ``LOG_EVERY``. Steps/s and
samples/s come from its ``train.log`` (the ``step_time`` of each ``step=...`` line, see
doc/log_format.md) without the first interval, which pays for the worker start-up. So the rate is
what a user gets, ``train.py`` picks its own thread count (cores - data workers on the CPU);
``OMP_NUM_THREADS`` is removed from its environment so that rule applies.

Memory of the tiny run: the table's peak RSS is ``ru_maxrss`` of the ``train.py`` process as
returned by ``os.wait4`` when it exits, i.e. the larger of its own high-water mark and those of
the DataLoader workers it reaped (max, not sum: each worker is a separate process). Beside it,
the workers' own peak (``VmHWM`` in /proc, polled) and the peak of the whole tree's proportional
set size (``Pss`` from /proc/PID/smaps_rollup, summed over the trainer and its workers, polled
every ``POLL_S``): the pages forked workers share with the trainer count once there.

Recipe: configs/hifi_tse.yaml (gradient checkpointing on, as in the recipe) through train.py's
own ``build_nets``, ``micro_step`` and ``update``, on a random batch of 2 x 4 s at 48 kHz, in a
fresh child process with ``--threads`` torch threads and ``OMP_WAIT_POLICY=PASSIVE`` (spinning
OpenMP threads stall on shared cores, see bench/bench_inference.py). Two steps of forward, every
loss term, backward, clipping, AdamW and EMA; the second is reported with the child's
``ru_maxrss``. It is fp32: the recipe uses bf16 autocast on the GPU, and train.py's data
pipeline is not run for it because one step takes tens of seconds on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train  # noqa: E402
from bench.report import machine, markdown_table, print_json, write_section  # noqa: E402
from config import load_config, model_kwargs  # noqa: E402
from data.prepare_manifest import prepare  # noqa: E402
from models.registry import build_model  # noqa: E402
from training.nets import build_nets  # noqa: E402
from training.step_log import StepLog  # noqa: E402

TINY_CONFIG = REPO / "configs" / "tiny.yaml"
RECIPE_CONFIG = REPO / "configs" / "hifi_tse.yaml"
DATA_CONFIG = REPO / "configs" / "shared_data.yaml"
SEGMENT_SECONDS = 4.0
LOG_EVERY = 10
N_VAL_SAMPLES = 8  # the end-of-run validation is not timed; keep it short
DATA_WORKERS = 1
RECIPE_BATCH = 2
RECIPE_STEPS = 2  # the first one allocates and picks kernels; the second is reported
POLL_S = 0.5
KIB, GIB = 1024, 1024**3  # ru_maxrss and /proc values are in KiB on Linux
TRAIN_LINE = re.compile(r" INFO step=(\d+) .*?\bstep_time=(\S+) samples_per_s=(\S+)")


# ---------------------------------------------------------------------------------------------
# Tiny config through train.py
# ---------------------------------------------------------------------------------------------


def write_tiny_config(work: Path, steps: int) -> Path:
    """tiny.yaml's model (and its grad_checkpoint) + the shared data packed into ``work`` + a
    short fp32 run in ``work``."""
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    data = yaml.safe_load(DATA_CONFIG.read_text())["data"]
    data.update(
        manifest_dir=str(work / "manifests"),
        hdf5_dir=str(work / "hdf5"),
        num_workers=DATA_WORKERS,
        segment_seconds=SEGMENT_SECONDS,
        n_val_samples=N_VAL_SAMPLES,
    )
    cfg = {
        "model": tiny["model"],
        "data": data,
        "optim": {"grad_accum": 1},
        "train": {
            "run_dir": str(work / "run"),
            "total_steps": steps,
            "log_every": LOG_EVERY,
            "val_every": steps,
            "ckpt_every": steps,
            "precision": "fp32",
            "deterministic": False,
            "device": "cpu",
            "grad_checkpoint": tiny["train"]["grad_checkpoint"],
        },
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _proc_kib(pid: int, name: str, field: str) -> int:
    """``field`` (kB) of /proc/PID/NAME, or 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_train(config: Path) -> dict[str, Any]:
    """Run train.py to the end; its wall time and memory peaks (KiB)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(config)]
    peaks = {"worker_hwm_kib": 0, "tree_pss_kib": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    done = threading.Event()

    def poll() -> None:
        while not done.wait(POLL_S):
            workers = _children(proc.pid)
            pss = sum(_proc_kib(p, "smaps_rollup", "Pss") for p in [proc.pid, *workers])
            peaks["tree_pss_kib"] = max(peaks["tree_pss_kib"], pss)
            for p in workers:
                peaks["worker_hwm_kib"] = max(
                    peaks["worker_hwm_kib"], _proc_kib(p, "status", "VmHWM")
                )

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with proc.stderr:  # drains the pipe until train.py closes it (at exit)
        stderr = proc.stderr.read()
    # wait4 rather than Popen.wait: it returns the child's rusage, whose ru_maxrss also covers
    # the DataLoader workers it reaped.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": seconds, "maxrss_kib": usage.ru_maxrss, **peaks}


def train_rate(log_path: Path) -> dict[str, float]:
    """Steps/s and samples/s over the logged intervals after the first (the warm-up)."""
    intervals, prev = [], 0
    for line in log_path.read_text().splitlines():
        match = TRAIN_LINE.search(line)
        if match:
            step, step_time, samples_per_s = int(match[1]), float(match[2]), float(match[3])
            intervals.append((step - prev, step_time, samples_per_s))
            prev = step
    if len(intervals) < 2:
        raise RuntimeError(
            f"{log_path}: need 2 log intervals, found {len(intervals)}; "
            f"raise --steps above {LOG_EVERY}"
        )
    timed = intervals[1:]
    steps = sum(n for n, _, _ in timed)
    seconds = sum(n * t for n, t, _ in timed)
    samples = sum(n * t * s for n, t, s in timed)
    return {
        "steps": steps,
        "steps_per_s": steps / seconds,
        "samples_per_s": samples / seconds,
        "s_per_step": seconds / steps,
        "warmup_s_per_step": intervals[0][1],
    }


# ---------------------------------------------------------------------------------------------
# One recipe step, in a fresh child process
# ---------------------------------------------------------------------------------------------


def recipe_child(threads: int) -> None:
    """Time RECIPE_STEPS optimizer steps of the recipe in this process, through train.py's own
    ``micro_step`` and ``update`` (every loss term of the recipe, clipping, AdamW, EMA); one
    JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # One micro-step per update, in float32 (the CPU has no fast bf16 here).
    cfg = load_config(RECIPE_CONFIG, ["optim.grad_accum=1", "train.precision=fp32"])
    nets = build_nets(cfg, torch.device("cpu"))
    n_samples = round(SEGMENT_SECONDS * cfg.stft.sample_rate)  # 192000
    mix, ref, target = (0.1 * torch.randn(RECIPE_BATCH, n_samples) for _ in range(3))
    batch = {"mix": mix, "ref": ref, "target": target,
             "is_ta": torch.zeros(RECIPE_BATCH, dtype=torch.bool)}
    times = []
    for step in range(RECIPE_STEPS):
        start = time.perf_counter()
        train.micro_step(nets, cfg, batch, step=step, autocast=contextlib.nullcontext(),
                         step_log=StepLog())
        train.update(nets, cfg, step + 1)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "params": sum(p.numel() for p in nets.generator.parameters()),
                "step_times": times,
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "grad_checkpoint": nets.generator.grad_checkpoint,
            }
        )
    )


def run_recipe(threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--recipe-child", "--threads", str(threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"recipe step failed: {proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="micro-steps of the tiny run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the recipe step")
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    parser.add_argument("--recipe-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_child:
        recipe_child(args.threads)
        return
    if args.steps < 2 * LOG_EVERY:
        parser.error(f"--steps must be at least {2 * LOG_EVERY} (the first interval is warm-up)")
    logging.basicConfig(level=logging.WARNING)

    os.chdir(REPO)  # the data config's paths are relative to the repository root
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        config = write_tiny_config(work, args.steps)
        start = time.perf_counter()
        prepare(load_config(config).data, show_progress=False)
        pack_s = time.perf_counter() - start
        tiny_run = run_train(config)
        tiny = train_rate(work / "run" / "train.log")
        tiny_cfg = load_config(config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recipe = run_recipe(args.threads)
    recipe_s = recipe["step_times"][-1]
    tiny_params = sum(p.numel() for p in build_model(model_kwargs(tiny_cfg)).parameters())

    batch = tiny_cfg.train.batch_size
    rows = [
        [
            f"tiny ({tiny_params / 1e6:.2f} M), train.py, batch {batch} x 4 s, "
            f"{DATA_WORKERS} data worker, steps {LOG_EVERY + 1}-{LOG_EVERY + tiny['steps']}",
            f"{tiny['steps_per_s']:.2f}",
            f"{tiny['samples_per_s']:.1f}",
            f"{tiny['s_per_step']:.3f}",
            f"{tiny_run['maxrss_kib'] * KIB / GIB:.2f}",
        ],
        [
            f"recipe ({recipe['params'] / 1e6:.2f} M), one optimizer step, batch {RECIPE_BATCH}"
            f" x 4 s, checkpointing, {args.threads} threads",
            f"{1 / recipe_s:.3f}",
            f"{RECIPE_BATCH / recipe_s:.2f}",
            f"{recipe_s:.1f}",
            f"{recipe['maxrss_kib'] * KIB / GIB:.2f}",
        ],
    ]
    table = markdown_table(
        ["what (CPU, fp32)", "steps/s", "samples/s", "s/step", "peak RSS (GiB)"], rows
    )
    print(table)
    if not args.no_write:
        write_section(
            "bench_train",
            "## Training (`bench/bench_train.py`)\n\n"
            f"Machine: {machine()}. Timings on a shared 2-core machine vary (other jobs use the "
            "same cores): expect +-20 % or worse.\n\n"
            f"{table}\n\n"
            f"Tiny: the real `train.py` (subprocess, its own thread rule: cores - data workers) on "
            f"../shared/data packed into a temporary folder ({pack_s:.0f} s), fp32, "
            f"{args.steps} micro-steps; rates from `train.log` without the first {LOG_EVERY} "
            f"steps (worker start-up: {tiny['warmup_s_per_step']:.3f} s/step there). Peak RSS is "
            "the trainer's `ru_maxrss` from `wait4` (the max over it and the DataLoader workers "
            "it reaped, not their sum); the data worker alone peaked at "
            f"{tiny_run['worker_hwm_kib'] * KIB / GIB:.2f} GiB (VmHWM) and trainer + workers "
            f"at {tiny_run['tree_pss_kib'] * KIB / GIB:.2f} GiB of summed PSS (shared pages "
            f"counted once; polled every {POLL_S} s). "
            f"Recipe: configs/hifi_tse.yaml's model and losses through train.py's `micro_step` + "
            f"`update` (forward, every loss term, backward, clip, AdamW, EMA), random batch, "
            f"gradient accumulation 1, in a fresh process "
            f"(`OMP_WAIT_POLICY=PASSIVE`), the second of {RECIPE_STEPS} steps (first "
            f"{recipe['step_times'][0]:.1f} s); peak RSS is that process's `ru_maxrss`. fp32 on "
            "the CPU; the recipe trains with bf16 autocast on a GPU.",
        )
    print_json(
        {
            "bench": "bench_train",
            "tiny": {
                "params": tiny_params,
                "steps_timed": tiny["steps"],
                "steps_per_s": round(tiny["steps_per_s"], 3),
                "samples_per_s": round(tiny["samples_per_s"], 2),
                "s_per_step": round(tiny["s_per_step"], 4),
                "peak_rss_gib": round(tiny_run["maxrss_kib"] * KIB / GIB, 3),
                "worker_peak_rss_gib": round(tiny_run["worker_hwm_kib"] * KIB / GIB, 3),
                "tree_peak_pss_gib": round(tiny_run["tree_pss_kib"] * KIB / GIB, 3),
                "train_py_seconds": round(tiny_run["seconds"], 1),
            },
            "recipe": {
                "params": recipe["params"],
                "batch": RECIPE_BATCH,
                "threads": args.threads,
                "s_per_step": round(recipe_s, 2),
                "first_step_s": round(recipe["step_times"][0], 2),
                "samples_per_s": round(RECIPE_BATCH / recipe_s, 3),
                "peak_rss_gib": round(recipe["maxrss_kib"] * KIB / GIB, 3),
            },
            "pack_seconds": round(pack_s, 1),
        }
    )


if __name__ == "__main__":
    main()
