"""The learning ladder: where does learning stop? The demo model trained on rungs that add one
difficulty at a time.

    python bench/bench_ladder.py                       # every rung at the demo's step budget
    python bench/bench_ladder.py --steps 600 --name screen600   # a screen

The rungs (``RUNGS``; every other setting is ``configs/demo.yaml``'s):

1. one fixed target voice and one fixed interferer voice, dry, 0 dB, no noise: speaker-
   dependent separation, the reference is irrelevant;
2. many voices, dry, 0 dB, no noise: the reference names the target;
3. rung 2 plus the demo's noise;
4. the demo's mixtures (reverberation, interferer SIRs of -5..5 dB with the SIR curriculum,
   noise, target-absent samples and noisy references in the last third).

Rungs 1-3 have no SIR curriculum, no target-absent samples and clean references. Per rung: the
validation SI-SDRi and selection accuracy (``train.py``'s swap test on ``--val-pairs`` dry pairs
of the validation speakers; rung 1 validates on its two training speakers, so its pairs come
from the training speakers, and its model never had to select: not reported) against steps
from train.log, and the rung's oracle-mask ceilings on its
validation items (the demo's STFT; ideal ratio mask ``|T| / (|T| + |I + N|)`` and the
phase-sensitive mask clipped to [0, 1]). A rung far below its ceiling while the rung before it
learns is where the work is. Writes ``doc/ladder_<name>.png`` (every curve; beside the runs
with ``--no-write``), the table to doc/benchmarks.md and one JSON object as the last line.

The demo corpus is built and packed first if it is missing (as ``make demo`` does). Each rung's
training runs in its own process with the demo's threads; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import Config, load_config
from data.dataset import HiFiTSEDataset, dataset_kwargs
from dsp.stft import STFT
from losses.separation import si_sdr_improvement

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
# Rungs 1-3: one interferer at exactly 0 dB, dry, no curriculum (neither the SIR boost nor
# the selection curriculum and twins, which a screen adds with --set), no target-absent
# samples, clean references; then noise; rung 4 is the demo as it is.
EASY = ["data.sir_db=[0.0, 0.0]", "data.min_interferers=1", "data.max_interferers=1",
        "data.reverb_prob=0.0", "data.ta_prob=0.0", "data.val_noisy_ref_prob=0.0",
        "train.sir_boost_db=0.0", "train.noisy_ref_max_prob=0.0", "train.selection_steps=0",
        "train.twin_steps=0"]
RUNGS: dict[int, tuple[str, list[str]]] = {
    1: ("one fixed voice pair, dry, 0 dB", [*EASY, "data.noise_prob=0.0"]),
    2: ("many voices, dry, 0 dB", [*EASY, "data.noise_prob=0.0"]),
    3: ("many voices, dry, 0 dB, noise", EASY),
    4: ("the demo mixtures", []),
}
LOG_FIELD = re.compile(r"(\w+)=(\S+)")  # train.log's key=value fields, in any order
N_VALIDATIONS = 8
MASK_EPS = 1e-8


def ensure_corpus(cfg: Config) -> None:
    """Build and pack the synthetic demo corpus when its manifests are missing."""
    if Path(cfg.data.manifest_dir).exists():
        return
    corpus = Path(cfg.data.speech_sources[0]["root"]).parent
    for cmd in ([sys.executable, "-m", "data.demo_corpus", "--out", str(corpus)],
                [sys.executable, "-m", "data.prepare_manifest", "--config", str(DEMO_CONFIG),
                 "--no-progress"]):
        subprocess.run(cmd, cwd=REPO, check=True)


def rung_overrides(rung: int, cfg: Config) -> list[str]:
    """The ``--set`` items of a rung; rung 1 names the first two training speakers."""
    sets = list(RUNGS[rung][1])
    if rung == 1:
        kwargs = dataset_kwargs(cfg.data, "train", sample_rate=cfg.stft.sample_rate)
        names = sorted(set(HiFiTSEDataset(**kwargs).speech.speaker_names))
        sets.append(f"data.speaker_pair=[{names[0]}, {names[1]}]")
    return sets


def oracle_ceilings(cfg: Config, n: int) -> dict[str, float]:
    """Mean SI-SDRi of the ideal ratio mask and of the clipped phase-sensitive mask over the
    target-present validation items, with the model's STFT."""
    dataset = HiFiTSEDataset(**{**dataset_kwargs(cfg.data, "val", sample_rate=cfg.stft.sample_rate),
                                "length": n, "return_components": True})
    stft = STFT(n_fft=cfg.stft.n_fft, win_length=cfg.stft.win_length,
                hop_length=cfg.stft.hop_length)
    gains: dict[str, list[float]] = {"irm": [], "psm": []}
    for i in range(n):
        item = dataset[i]
        if item["is_ta"]:
            continue
        mix, target = item["mix"][None], item["target"][None]
        rest = item["comp_interferers"].sum(0)[None] + item["comp_noise"][None]
        m, t, r = stft(mix), stft(target), stft(rest)  # (1, F, T)
        masks = {"irm": t.abs() / (t.abs() + r.abs() + MASK_EPS),
                 "psm": ((t * m.conj()).real / (m.abs() ** 2 + MASK_EPS)).clamp(0.0, 1.0)}
        for name, mask in masks.items():
            est = stft.inverse(mask * m, mix.shape[-1])
            gains[name].append(float(si_sdr_improvement(est.double(), target.double(),
                                                        mix.double())))
    return {name: float(np.mean(v)) for name, v in gains.items()}


def train_rung(rung: int, cfg: Config, steps: int, out: Path, val_pairs: int,
               extra: list[str]) -> dict[str, Any]:
    """Train one rung from scratch in its own process; its validation curve from train.log."""
    run_dir = out / f"rung{rung}"
    sets = [*rung_overrides(rung, cfg), f"train.run_dir={run_dir}",
            f"train.total_steps={steps}", f"train.val_every={max(1, steps // N_VALIDATIONS)}",
            f"train.ckpt_every={max(1, steps // N_VALIDATIONS)}", f"train.n_val_pairs={val_pairs}",
            "train.progress_bar=false", *extra]
    cmd = [sys.executable, "train.py", "--config", str(DEMO_CONFIG)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    begin = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rung {rung}: train.py failed:\n{proc.stderr[-3000:]}")
    curve, step_times = [], []
    for line in (run_dir / "train.log").read_text().splitlines():
        fields = dict(LOG_FIELD.findall(line))
        if " INFO val step=" in line:
            curve.append((int(fields["step"]), float(fields["si_sdri"]),
                          float(fields["select_acc"]), float(fields["ref_sens"])))
        elif " INFO step=" in line and "step_time" in fields:
            step_times.append(float(fields["step_time"]))
    return {"rung": rung, "description": RUNGS[rung][0], "curve": curve,
            "seconds": time.perf_counter() - begin,
            "step_time": float(np.mean(step_times[1:])) if len(step_times) > 1 else None}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax_sdr, ax_acc = fig.subplots(1, 2)
    for r in results:
        steps = [c[0] for c in r["curve"]]
        line = ax_sdr.plot(steps, [c[1] for c in r["curve"]], marker="o",
                           label=f"rung {r['rung']}: {r['description']}")[0]
        ax_sdr.axhline(r["oracle"]["psm"], color=line.get_color(), linestyle="--", linewidth=1)
        if r["rung"] > 1:
            ax_acc.plot(steps, [100 * c[2] for c in r["curve"]], marker="o",
                        color=line.get_color(), label=f"rung {r['rung']}")
    ax_sdr.set_xlabel("step")
    ax_sdr.set_ylabel("validation SI-SDRi (dB); dashed: oracle PSM")
    ax_sdr.legend(fontsize="small")
    ax_acc.axhline(50.0, color="black", linestyle=":", linewidth=1, label="chance")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("selection accuracy, dry swap pairs (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="per rung (default: the demo's total_steps)")
    parser.add_argument("--rungs", type=int, nargs="+", default=list(RUNGS), choices=list(RUNGS))
    parser.add_argument("--val-pairs", type=int, default=16, help="swap pairs per validation")
    parser.add_argument("--oracle-samples", type=int, default=40,
                        help="validation items of the oracle ceilings")
    parser.add_argument("--out", type=Path, default=REPO / "exp" / "ladder")
    parser.add_argument("--name", default="demo", help="the doc/benchmarks.md section suffix")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for every rung (a mechanism to screen)")
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()
    os.chdir(REPO)
    base = load_config(DEMO_CONFIG)
    steps = args.steps or base.train.total_steps
    ensure_corpus(base)
    results = []
    for rung in args.rungs:
        cfg = load_config(DEMO_CONFIG, [*rung_overrides(rung, base), *args.set])
        result = train_rung(rung, base, steps, args.out, args.val_pairs, args.set)
        result["oracle"] = oracle_ceilings(cfg, args.oracle_samples)
        results.append(result)
        last = result["curve"][-1]
        print(f"rung {rung}: SI-SDRi {last[1]:+.2f} dB at step {last[0]}, selection "
              f"{last[2]:.0%}, oracle PSM {result['oracle']['psm']:+.2f} dB, "
              f"{result['seconds'] / 60:.1f} min", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # Beside doc/benchmarks.md when the section is written (the figure belongs to it).
    png = (args.out if args.no_write else REPO / "doc") / f"ladder_{args.name}.png"
    plot(results, png)
    rows = []
    for r in results:
        final, best = r["curve"][-1], max(r["curve"], key=lambda c: c[1])
        rows.append([str(r["rung"]), r["description"], f"{final[1]:+.2f}",
                     f"{best[1]:+.2f} (step {best[0]})", f"{r['oracle']['irm']:+.2f}",
                     f"{r['oracle']['psm']:+.2f}",
                     f"{100 * final[2]:.0f}" if r["rung"] > 1 else "(irrelevant)",
                     f"{final[3]:+.1f}",
                     "n/a" if r["step_time"] is None else f"{r['step_time']:.3f}"])
    table = markdown_table(["rung", "mixtures", "SI-SDRi final dB", "best", "oracle IRM dB",
                            "oracle PSM dB", "selection dry %", "ref. sensitivity dB",
                            "s/step"], rows)
    print(table)
    if not args.no_write:
        extra = f", overrides {' '.join(args.set)}" if args.set else ""
        write_section(
            f"ladder_{args.name}",
            f"## Learning ladder, {args.name} (`bench/bench_ladder.py`)\n\n{machine()}; "
            f"`configs/demo.yaml`, {steps} steps per rung{extra}; validation on the demo's "
            f"validation speakers (rung 1: new mixtures of its two training speakers; "
            f"{args.val_pairs} dry swap pairs for selection); curves in "
            f"`{png.relative_to(REPO) if png.is_relative_to(REPO) else png}`.\n\n{table}\n")
    print_json({"name": args.name, "steps": steps, "rungs": results})


if __name__ == "__main__":
    main()
