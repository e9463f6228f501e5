"""What makes the reference matter: the speaker-selection mechanisms side by side, one row per
trained demo run, from what its evaluation and swap test wrote.

    python bench/bench_mechanisms.py --name synthetic \
        --row "today's model" exp/demo/run exp/demo/eval \
        --row "GE2E embedding" exp/demo/run_ge2e exp/demo/eval_ge2e

A row's run folder holds train.log and best.pt (`make demo DEMO_VARIANT=...` writes
``run_<variant>``); its evaluation folder holds evaluate.py's summary.json and
``selection.txt``, the output of bench/bench_selection.py whose last line is its JSON. Nothing is
trained or run here: the table is only as current as those files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.demo_report import training_stats
from bench.report import machine, markdown_table, print_json, write_section
from models.registry import load_model

HEADER = ["mechanism", "selection dry % [95 % CI]", "selection noisy % [95 % CI]",
          "reference sensitivity dry dB", "SI-SDRi, 2-speaker dry pairs dB",
          "full-demo SI-SDRi dB", "wrong-reference cost dB", "s/step", "trained params"]


def ci(figures: dict[str, Any], key: str, scale: float, spec: str) -> str:
    lo, hi = figures[f"{key}_ci"]
    return (f"{format(scale * figures[key], spec)} [{format(scale * lo, spec)}, "
            f"{format(scale * hi, spec)}]")


def row_of(label: str, run: Path, evaluation: Path) -> dict[str, Any]:
    """The figures of one run (see the module docstring)."""
    summary = json.loads((evaluation / "summary.json").read_text())
    swap = json.loads((evaluation / "selection.txt").read_text().strip().splitlines()[-1])
    metrics = summary["breakdown"]["all"]["metrics"]
    own = metrics["si_sdri"]["mean"]
    wrong = metrics.get("si_sdri_wrong_ref", {}).get("mean", math.nan)
    _, step_time, _ = training_stats((run / "train.log").read_text())
    model = load_model(run / "best.pt")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mechanism": label, "run": str(run), "dry": swap["dry"]["all"],
            "noisy": swap["noisy"]["all"], "si_sdri": own, "wrong_ref_cost": own - wrong,
            "step_time": step_time, "trained_params": trained, "steps": summary.get("step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", nargs=3, action="append", required=True,
                        metavar=("LABEL", "RUN_DIR", "EVAL_DIR"))
    parser.add_argument("--name", default="synthetic", help="the doc/benchmarks.md section")
    parser.add_argument("--note", default="", help="a sentence on how the runs were made")
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()
    results = [row_of(label, Path(run), Path(ev)) for label, run, ev in args.row]
    rows = [[r["mechanism"], ci(r["dry"], "select_acc", 100, ".0f"),
             ci(r["noisy"], "select_acc", 100, ".0f"), f"{r['dry']['ref_sens_db']:+.1f}",
             ci(r["dry"], "si_sdri", 1, "+.2f"), f"{r['si_sdri']:+.2f}",
             f"{r['wrong_ref_cost']:.2f}",
             "n/a" if r["step_time"] is None else f"{r['step_time']:.3f}",
             f"{r['trained_params']:,}"] for r in results]
    table = markdown_table(HEADER, rows)
    print(table)
    if not args.no_write:
        write_section(
            f"mechanisms_{args.name}",
            f"## What makes the reference matter, {args.name} (`bench/bench_mechanisms.py`)\n\n"
            f"{machine()}; each row a demo run at the demo's step budget{args.note}; selection "
            "and the 2-speaker SI-SDRi: `bench/bench_selection.py`, 60 swap pairs of unseen "
            "test speakers at 0 dB (dry; noisy: reverberant, noise at 5 dB SNR), bootstrap "
            "95 % intervals over pairs; full-demo SI-SDRi and the wrong-reference cost "
            "(SI-SDRi with the own reference minus with another test speaker's): `evaluate.py` "
            "on the TP test samples; s/step: mean `step_time` of train.log; trained "
            f"parameters exclude a frozen encoder.\n\n{table}\n")
    print_json({"name": args.name, "rows": results})


if __name__ == "__main__":
    main()
