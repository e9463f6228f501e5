"""Chaos: one tiny-config run under run_training.sh, killed (SIGKILL) on a seeded schedule,
against its uninterrupted twin.

    python bench/bench_chaos.py [--total-steps 3000] [--kills 15] [--ckpt-every 20]
                                [--val-every 300] [--seed 0] [--no-write]

About 20 minutes on 2 CPU cores with the defaults (the twin and the killed run, one after the
other, each with one training thread).

Every feature that keeps state across a restart is on: a data worker, gradient accumulation 2,
target-absent items (phase 2 from step 4), the SIR curriculum, the EMA, the GAN phase (MetricGAN,
with its discriminator warm-up and a PESQ worker process) and validation with the swap test.
The kill schedule is drawn from ``--seed``: kill k waits until the run has logged a step past
its target (targets spread over the run) and then a random fraction of a second more, so kills
land anywhere in a step, a validation or a checkpoint write. The supervisor restarts at once
(``--backoff 0``).

Reports kills that landed, restarts, checkpoints written, micro-steps trained again after a
restart (the work lost by each kill), steps missing at the end, processes left behind (worker
processes of killed runs still alive at the end), and whether the final weights
(generator, EMA, discriminator, both optimizers) equal the twin's bit for bit. Writes its
section of doc/benchmarks.md and ends with one JSON line. Needs ../shared/data.

tests/test_reliability.py runs ``run_chaos`` at CI size.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section

REPO = Path(__file__).resolve().parents[1]
SUPERVISOR = REPO / "run_training.sh"
STATE_PARTS = ("generator", "ema", "disc")
OPTIMIZERS = ("opt_g", "opt_d")
MARKER = "HIFI_TSE_CHAOS_RUN"  # an environment variable that tags every process of a run


def chaos_settings(total_steps: int, *, ckpt_every: int = 4, val_every: int | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Config sections (over configs/tiny.yaml) with every restart-sensitive feature on."""
    gan_start = max(4, total_steps // 3 // 2 * 2)
    return {
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_accum": 2},
        "train": {"total_steps": total_steps, "log_every": 2, "ckpt_every": ckpt_every,
                  "val_every": val_every or max(ckpt_every, total_steps // 2 // 4 * 4),
                  "keep_checkpoints": 2, "deterministic": True, "phase2_step": 4,
                  "noisy_ref_ramp": [4, max(8, total_steps // 2)], "sir_boost_db": 6.0,
                  "sir_boost_steps": max(2, total_steps // 2), "n_val_pairs": 2},
        # MetricGAN: its PESQ worker processes are part of what a restart must rebuild, and its
        # discriminator is small (HiFi-GAN's full-width one makes a tiny CPU step 11 s).
        "gan": {"enabled": True, "kind": "metric", "pesq_workers": 1, "start_step": gan_start,
                "d_warmup_steps": 4, "ramp_steps": 4},
    }


def write_run_config(path: Path, data: dict[str, Any], settings: dict[str, dict[str, Any]]
                     ) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"] = dict(data)
    for name, values in settings.items():
        cfg.setdefault(name, {}).update(values)
    cfg["train"]["run_dir"] = str(path.parent / "run")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "PYTHON": sys.executable}


def _proc(pid: int | str, name: str) -> bytes:
    """``/proc/PID/NAME``, or nothing for a process that is gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def has_env(pid: int | str, item: str) -> bool:
    """Whether process ``pid``'s environment holds ``item`` (``KEY=VALUE``)."""
    return item.encode() in _proc(pid, "environ").split(b"\0")


def processes_marked(value: str) -> list[int]:
    """The live processes whose environment holds ``MARKER=value``: what is left of a run."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and has_env(p.name, f"{MARKER}={value}")]


def child_pid(parent: int, *, cmdline: str = "", env: str = "") -> int | None:
    """The first child of ``parent`` whose command line contains ``cmdline`` and whose
    environment holds ``env`` (``KEY=VALUE``), if any."""
    for pid in _proc(f"{parent}/task/{parent}", "children").split():
        if cmdline.encode() in _proc(int(pid), "cmdline") and (not env or has_env(int(pid), env)):
            return int(pid)
    return None


def trainer_pid(supervisor: int) -> int | None:
    """The train.py process the supervisor runs now, if any."""
    return child_pid(supervisor, cmdline="train.py")


def logged_steps(text: str) -> list[tuple[str, int]]:
    """("step" | "resumed" | "saved", N) for every such event of a train.log, in order."""
    events = []
    for line in text.splitlines():
        m = re.search(r" INFO (?:(resumed|saved) )?step=(\d+)( phase=)?", line)
        if m and (m.group(1) or m.group(3)):
            events.append((m.group(1) or "step", int(m.group(2))))
    return events


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Whether two checkpoints hold the same weights and optimizer states (bitwise), and the
    largest absolute difference of any tensor."""
    pairs = []
    for part in STATE_PARTS:
        if a.get(part) is not None or b.get(part) is not None:
            pairs += [(a[part][k], b[part][k]) for k in a[part]]
    for part in OPTIMIZERS:
        if a.get(part) is not None or b.get(part) is not None:
            for i, s in a[part]["state"].items():
                pairs += [(v, b[part]["state"][i][k]) for k, v in s.items() if torch.is_tensor(v)]
    equal = a["step"] == b["step"] and all(torch.equal(x, y) for x, y in pairs)
    worst = max(((x.double() - y.double()).abs().max().item() for x, y in pairs
                 if x.is_floating_point() and x.numel()), default=0.0)
    return equal, worst


def run_chaos(root: Path, data: dict[str, Any], *, total_steps: int, kills: int, seed: int,
              settings: dict[str, dict[str, Any]] | None = None, timeout_s: float = 3600
              ) -> dict[str, Any]:
    """The twin straight through, then the same config under run_training.sh with ``kills``
    SIGKILLs; returns the measurements (see the module docstring)."""
    settings = settings or chaos_settings(total_steps)
    env = {**child_env(), MARKER: str(root)}  # inherited by every process the runs start
    twin_cfg = write_run_config(root / "twin" / "config.yaml", data, settings)
    start = time.monotonic()
    twin = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(twin_cfg)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if twin.returncode != 0:
        raise RuntimeError(f"the twin run failed: {twin.stderr[-2000:]}")
    twin_s = time.monotonic() - start

    cfg = write_run_config(root / "chaos" / "config.yaml", data, settings)
    log_path = root / "chaos" / "run" / "train.log"
    rng = random.Random(seed)
    log_every = settings["train"]["log_every"]
    # One target per equal share of the run, never in its last two log intervals.
    span = (total_steps - 2 * log_every) / kills
    targets = [int(span * k + rng.uniform(0, span)) for k in range(kills)]
    start = time.monotonic()
    console = root / "chaos" / "console.log"  # a file: a pipe nobody reads would fill up
    with open(console, "w") as out:
        sup = subprocess.Popen(["bash", str(SUPERVISOR), "--backoff", "0", "--max-crashes",
                                str(kills + 2), "--", "--config", str(cfg)], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    landed, kill_times = 0, []
    try:
        for target in targets:
            # Only the events logged since the previous kill (whose process is gone).
            offset = len(log_path.read_text()) if log_path.exists() else 0
            while time.monotonic() - start < timeout_s and sup.poll() is None:
                text = log_path.read_text() if log_path.exists() else ""
                reached = max((n for kind, n in logged_steps(text[offset:]) if kind != "saved"),
                              default=-1)
                if trainer_pid(sup.pid) and reached >= target:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            pid = trainer_pid(sup.pid)
            if pid is None:
                continue
            os.kill(pid, signal.SIGKILL)
            landed += 1
            kill_times.append(round(time.monotonic() - start, 1))
            while trainer_pid(sup.pid) == pid:  # until the supervisor has reaped it
                time.sleep(0.02)
        code = sup.wait(timeout=max(1.0, timeout_s - (time.monotonic() - start)))
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
    chaos_s = time.monotonic() - start
    time.sleep(2.0)  # a worker whose parent just died gets its signal now
    orphans = processes_marked(str(root))
    text = log_path.read_text()
    events = logged_steps(text)
    repeated, reached = 0, 0
    for kind, n in events:
        if kind == "resumed":
            repeated += max(0, reached - n)
        reached = max(reached, n) if kind != "resumed" else n
    a = torch.load(root / "twin" / "run" / "last.pt", weights_only=True)
    b = torch.load(root / "chaos" / "run" / "last.pt", weights_only=True)
    equal, worst = compare(a, b)
    return {
        "total_steps": total_steps, "kills_planned": kills, "kills_landed": landed,
        "kill_times_s": kill_times, "supervisor_exit": code,
        "restarts": text.count(" restart n="),
        "checkpoints_written": sum(kind == "saved" for kind, _ in events),
        "steps_trained_again": repeated, "steps_missing": total_steps - int(b["step"]),
        "final_equal": equal, "max_abs_diff": worst,
        "twin_minutes": round(twin_s / 60, 2), "chaos_minutes": round(chaos_s / 60, 2),
        "orphan_processes": len(orphans),
        "console_tail": console.read_text()[-500:] if code else "",
    }


def packed_data(root: Path) -> dict[str, Any]:
    """The data section of a packed subset of ../shared/data (bench/shared_subset.py)."""
    from bench.shared_subset import link_subset, write_config
    from config import load_config
    from data.prepare_manifest import prepare

    shared = REPO.parent / "shared" / "data"
    if not shared.is_dir():
        sys.exit(f"error: {shared}: no such folder (the chaos run trains on its recordings)")
    config = write_config(root, link_subset(shared, root / "data"))
    prepare(load_config(config).data, show_progress=False)
    data = load_config(config).data
    return {"manifest_dir": data.manifest_dir, "val_fraction": data.val_fraction,
            "segment_seconds": 0.5, "ref_seconds": 0.5, "n_val_samples": 4, "num_workers": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-steps", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--ckpt-every", type=int, default=20, help="micro-steps (even)")
    parser.add_argument("--val-every", type=int, default=300, help="micro-steps (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chaos_") as tmp:
        root = Path(tmp)
        settings = chaos_settings(args.total_steps, ckpt_every=args.ckpt_every,
                                  val_every=args.val_every)
        result = run_chaos(root, packed_data(root), total_steps=args.total_steps,
                           kills=args.kills, seed=args.seed, settings=settings)
    rows = [["micro-steps (accumulation 2), checkpoint / validation every",
             f"{result['total_steps']}, {args.ckpt_every} / {args.val_every}"],
            ["kills planned / landed (SIGKILL)", f"{args.kills} / {result['kills_landed']}"],
            ["restarts by run_training.sh", result["restarts"]],
            ["supervisor exit", result["supervisor_exit"]],
            ["checkpoints written", result["checkpoints_written"]],
            ["micro-steps trained again after a kill", result["steps_trained_again"]],
            ["micro-steps missing at the end", result["steps_missing"]],
            ["processes left behind (orphaned workers)", result["orphan_processes"]],
            ["final weights, EMA, discriminator, optimizers equal to the twin's",
             "bit for bit" if result["final_equal"] else
             f"NO (max abs diff {result['max_abs_diff']:.3g})"],
            ["wall time: twin / killed run", f"{result['twin_minutes']} / "
             f"{result['chaos_minutes']} min"]]
    table = markdown_table(["", "measured"], rows)
    print(table)
    if not args.no_write:
        write_section("chaos", f"{machine()} (each training process: 1 thread, as the twin's; "
                      f"the machine otherwise quiet); seed {args.seed}; kill times (s): "
                      f"{result['kill_times_s']}\n\n{table}\n")
    print_json({k: v for k, v in result.items() if k != "console_tail"})


if __name__ == "__main__":
    main()
