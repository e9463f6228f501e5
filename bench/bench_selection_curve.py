"""When does selection emerge? The swap test on every checkpoint a run kept.

    python bench/bench_selection_curve.py --run exp/demo/run_twins --config configs/demo_test.yaml \
        --name synthetic_twins

Runs ``bench/bench_selection.py``'s swap test (60 pairs of the config's validation speakers,
dry and noisy) on each ``step_*.pt`` of the run folder (their EMA weights), and plots selection
accuracy with its bootstrap 95 % interval against the step, beside the run's own validation
swap test (``select_acc`` in train.log, on the few pairs of the training corpus's validation
speakers). A curve still rising at the last step says more steps would help. Prints a table,
writes its doc/benchmarks.md section and ``doc/selection_curve_<name>.png``, and one JSON line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_selection import CONDITIONS, pitch_table, swap_test
from bench.report import BENCH_DOC, machine, markdown_table, print_json, write_section
from config import load_config
from data.dataset import HiFiTSEDataset, dataset_kwargs
from evaluation.selection import fmt_ci
from models.registry import load_model

STEP = re.compile(r"step_(\d+)\.pt$")
VAL_LINE = re.compile(r" INFO val step=(\d+) .*select_acc=(\S+)")


def plot(points: list[dict[str, Any]], val: list[tuple[int, float]], path: Path,
         title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    steps = [p["step"] for p in points]
    for name in CONDITIONS:
        acc = [100 * p[name]["select_acc"] for p in points]
        lo = [a - 100 * p[name]["select_acc_ci"][0] for a, p in zip(acc, points, strict=True)]
        hi = [100 * p[name]["select_acc_ci"][1] - a for a, p in zip(acc, points, strict=True)]
        ax.errorbar(steps, acc, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{name} swap pairs (60, unseen)")
    if val:
        ax.plot([v[0] for v in val], [100 * v[1] for v in val], linestyle=":", marker=".",
                label="train.log select_acc (validation pairs)")
    ax.axhline(50.0, color="black", linestyle=":", linewidth=1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("step")
    ax.set_ylabel("selection accuracy (%)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a train.py run folder")
    parser.add_argument("--config", type=Path, required=True,
                        help="names the corpus: its validation speakers make the pairs")
    parser.add_argument("--n-pairs", type=int, default=60)
    parser.add_argument("--name", required=True, help="the doc/benchmarks.md section suffix")
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()
    device = torch.device("cpu")
    cfg = load_config(args.config)
    dataset = HiFiTSEDataset(**{**dataset_kwargs(cfg.data, "val", sample_rate=cfg.stft.sample_rate),
                                "length": 1})
    pitch = pitch_table(args.config, None)
    ckpts = sorted((int(m[1]), p) for p in args.run.glob("step_*.pt") if (m := STEP.search(p.name)))
    if not ckpts:
        sys.exit(f"error: {args.run}: no step_*.pt checkpoints")
    points = []
    for step, path in ckpts:
        model = load_model(path).eval()
        result = swap_test(model, dataset, args.n_pairs, pitch, device=device)
        points.append({"step": step, **{k: result[k]["all"] for k in CONDITIONS}})
        print(f"step {step}: " + ", ".join(
            f"{k} {fmt_ci(points[-1][k], 'select_acc', '.0f', 100)} %" for k in CONDITIONS),
            flush=True)
    log = args.run / "train.log"
    val = [(int(m[1]), float(m[2])) for line in log.read_text().splitlines()
           if (m := VAL_LINE.search(line)) and m[2] != "nan"] if log.is_file() else []
    rows = [[p["step"], *(fmt_ci(p[k], "select_acc", ".0f", 100) for k in CONDITIONS),
             *(fmt_ci(p[k], "si_sdri", "+.2f") for k in CONDITIONS)] for p in points]
    table = markdown_table(["step", "selection dry % [95 % CI]", "selection noisy %",
                            "SI-SDRi dry pairs dB", "SI-SDRi noisy pairs dB"], rows)
    print(table)
    png = (args.run if args.no_write else BENCH_DOC.parent) / f"selection_curve_{args.name}.png"
    plot(points, val, png, f"{args.run}: swap test by step")
    if not args.no_write:
        write_section(
            f"selection_curve_{args.name}",
            f"## Selection over steps, {args.name} (`bench/bench_selection_curve.py`)\n\n"
            f"{machine()}; the checkpoints `{args.run}/step_*.pt` (EMA weights), "
            f"{args.n_pairs} swap pairs of the validation speakers of `{args.config}` per "
            f"condition; curve in `doc/{png.name}`.\n\n{table}\n")
    print_json({"name": args.name, "run": str(args.run), "points": points, "val": val})


if __name__ == "__main__":
    main()
