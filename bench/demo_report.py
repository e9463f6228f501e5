"""Put the result of `make demo` into doc/benchmarks.md and say where everything is.

    python bench/demo_report.py --dir exp/demo --name synthetic

Reads the evaluation summary (evaluate.py's summary.json) and the run's train.log; prints a
table and one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section

LOG_STEP = re.compile(r"training finished step=(\d+)")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")
STEP_TIME = re.compile(r"^\S+ \S+ INFO step=\d+ .*step_time=([\d.]+)")
DEFAULT_MINUTES = 15.0  # the Makefile's DEMO_MINUTES
DEFAULT_ARCH = "hifi_tse"  # the Makefile's ARCH
ROW_FILE = "family_row.json"  # in each evaluation folder: its row of the families table
FAMILY_HEADER = ["family", "params", "s/step", "steps", "training wall-clock", "SI-SDRi dB",
                 "TA suppression dB", "SI-SDRi wrong ref dB", "PESQ", "STOI"]


def training_stats(log_text: str) -> tuple[int | None, float | None, float | None]:
    """(final step, mean step_time of the logged intervals after the first, training
    wall-clock seconds from the first to the last line of train.log)."""
    steps = [int(m) for m in LOG_STEP.findall(log_text)]
    times = [float(m.group(1)) for line in log_text.splitlines()
             if (m := STEP_TIME.match(line))]
    stamps = [m.group(1) for line in log_text.splitlines() if (m := LOG_TIME.match(line))]
    wall = None
    if len(stamps) >= 2:
        first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S") for t in (stamps[0], stamps[-1]))
        wall = (last - first).total_seconds()
    step_time = sum(times[1:]) / len(times[1:]) if len(times) > 1 else None
    return (steps[-1] if steps else None), step_time, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the demo folder (exp/demo)")
    parser.add_argument("--name", required=True, help="synthetic | shared")
    parser.add_argument("--minutes", type=float, required=True, help="the training budget")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="the model family (Makefile ARCH)")
    args = parser.parse_args()
    suffix = "" if args.arch == DEFAULT_ARCH else f"_{args.arch}"
    run, evaluation = args.dir / f"run{suffix}", args.dir / f"eval{suffix}"

    summary = json.loads((evaluation / "summary.json").read_text())
    metrics = {k: v["mean"] for k, v in summary["metrics"].items()}
    step, step_time, wall = training_stats((run / "train.log").read_text())
    step = step if step is not None else summary.get("step")
    swap_lines = (evaluation / "conditioning.txt").read_text().strip().splitlines()
    swap = json.loads(swap_lines[-1]) if swap_lines else {}

    def fmt(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else format(value, spec)

    rows = [[
        args.name + suffix, f"{args.minutes:g} min, {step} steps", summary["generator_params"],
        f"{summary['n_tp']} TP + {summary['n_ta']} TA", fmt("si_sdr", "+.2f"),
        fmt("si_sdri", "+.2f"), fmt("pesq", ".2f"), fmt("stoi", ".3f"),
        fmt("ta_suppression_db", ".1f"),
    ]]
    table = markdown_table(
        ["demo", "training", "params", "test samples", "SI-SDR dB", "SI-SDRi dB", "PESQ",
         "STOI", "TA suppression dB"], rows,
    )
    print(table)
    # The default budget has its own section; any other budget or family gets one more, so a
    # long run never overwrites the 15-minute result the README talks about.
    budget = "" if args.minutes == DEFAULT_MINUTES else f"_{args.minutes:g}min"
    key = f"demo_{args.name}{suffix}{budget}"
    command = "make demo" + (" DEMO=shared" if args.name == "shared" else "")
    command += f" ARCH={args.arch}" if suffix else ""
    command += f" DEMO_MINUTES={args.minutes:g}" if budget else ""
    write_section(
        key,
        f"## `{command}` (unseen test speakers)\n\n{machine()}; CPU training for a fixed time "
        f"budget, then `evaluate.py` on the held-out test speakers.\n\n{table}",
    )

    # The families side by side: every family's row of this demo and budget found on disk.
    row = {"arch": args.arch, "minutes": args.minutes, "params": summary["generator_params"],
           "step_time": step_time, "steps": step, "wall_s": wall,
           "si_sdri": metrics.get("si_sdri"), "ta_suppression_db": metrics.get("ta_suppression_db"),
           "si_sdri_wrong_ref": swap.get("si_sdri_wrong_ref"), "pesq": metrics.get("pesq"),
           "stoi": metrics.get("stoi")}
    (evaluation / ROW_FILE).write_text(json.dumps(row))
    def cell(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    family_rows = []
    for path in sorted(args.dir.glob(f"eval*/{ROW_FILE}")):
        other = json.loads(path.read_text())
        if other.get("minutes") != args.minutes:
            continue
        family_rows.append([
            other["arch"], other["params"], cell(other["step_time"], ".3f"), other["steps"],
            cell(None if other["wall_s"] is None else other["wall_s"] / 60, ".1f") + " min",
            cell(other["si_sdri"], "+.2f"), cell(other["ta_suppression_db"], ".1f"),
            cell(other["si_sdri_wrong_ref"], "+.2f"), cell(other["pesq"], ".2f"),
            cell(other["stoi"], ".3f"),
        ])
    families = markdown_table(FAMILY_HEADER, family_rows)
    write_section(
        f"demo_families_{args.name}{budget}",
        f"## Model families on `make demo{' DEMO=shared' if args.name == 'shared' else ''}` "
        f"(ARCH=...), {args.minutes:g} min each\n\n{machine()}; the same corpus, schedule, "
        "wall-clock budget and unseen test speakers for every family; s/step is the mean "
        "`step_time` of train.log (validation excluded); SI-SDRi wrong ref is "
        "`bench/bench_conditioning.py` with another test speaker's reference.\n\n"
        f"{families}",
    )
    print(f"\ncheckpoint: {run / 'best.pt'}")
    print(f"report:     {evaluation / 'report.md'}")
    print(f"audio:      {evaluation / 'examples'} and {args.dir / f'extracted{suffix}.wav'}")
    print(f"tensorboard --logdir {run / 'tb'}")
    print_json({"bench": key, "steps": step, "step_time": step_time, "wall_s": wall, **{
        k: metrics.get(k) for k in ("si_sdr", "si_sdri", "pesq", "stoi", "ta_suppression_db")
    }})


if __name__ == "__main__":
    main()
