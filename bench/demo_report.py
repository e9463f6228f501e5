"""Put the result of `make demo` into doc/benchmarks.md and say where everything is.

    python bench/demo_report.py --dir exp/demo --name synthetic [--arch spex_plus] [--steps N]

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
DEFAULT_ARCH = "hifi_tse"  # the Makefile's ARCH
ROW_FILE = "family_row.json"  # in each evaluation folder: its row of the families table
FAMILY_HEADER = ["family", "params", "s/step", "steps", "training wall-clock", "SI-SDRi dB",
                 "TA suppression dB", "SI-SDRi wrong ref dB", "selection dry %",
                 "selection noisy %", "PESQ", "STOI"]


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


def cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def budget_words(steps: int | None, minutes: str | None) -> str:
    """The training budget in words, as the Makefile set it."""
    words = f"{steps} steps" if steps else "each family's default number of steps"
    return words + (f", capped at {minutes} min" if minutes else "")


def budget_flags(steps: int | None, minutes: str | None) -> str:
    return (f" DEMO_STEPS={steps}" if steps else "") + (f" DEMO_MINUTES={minutes}" if minutes
                                                        else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the demo folder (exp/demo)")
    parser.add_argument("--name", required=True, help="synthetic | shared")
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="the model family (Makefile ARCH)")
    parser.add_argument("--steps", type=int, help="DEMO_STEPS, when it replaced the default")
    parser.add_argument("--minutes", help="DEMO_MINUTES, when a wall-clock cap was set")
    parser.add_argument("--variant", help="DEMO_VARIANT: the name of the DEMO_SETS overrides")
    parser.add_argument("--sets", default="", help="DEMO_SETS, the variant's overrides")
    args = parser.parse_args()
    suffix = ("" if args.arch == DEFAULT_ARCH else f"_{args.arch}") + (
        f"_{args.variant}" if args.variant else "")
    label = args.arch + (f"+{args.variant}" if args.variant else "")
    # The Makefile's BUDGET_SUFFIX: the default budget (each family's own steps) has its own
    # sections; any other budget gets more, so a long run never overwrites the default result
    # the README talks about.
    budget = (f"_{args.steps}steps" if args.steps else "") + (
        f"_{args.minutes}min" if args.minutes else "")
    run, evaluation = args.dir / f"run{suffix}", args.dir / f"eval{suffix}"

    summary = json.loads((evaluation / "summary.json").read_text())
    metrics = {k: v["mean"] for k, v in summary["metrics"].items()}
    step, step_time, wall = training_stats((run / "train.log").read_text())
    step = step if step is not None else summary.get("step")
    swap_lines = (evaluation / "selection.txt").read_text().strip().splitlines()
    swap = json.loads(swap_lines[-1]) if swap_lines else {}

    def selection(condition: str) -> float | None:
        return swap.get(condition, {}).get("all", {}).get("select_acc")

    def fmt(key: str, spec: str) -> str:
        return cell(metrics.get(key), spec)

    minutes = cell(None if wall is None else wall / 60, ".1f")
    rows = [[
        args.name + suffix, f"{step} steps, {minutes} min", summary["generator_params"],
        f"{summary['n_tp']} TP + {summary['n_ta']} TA", fmt("si_sdr", "+.2f"),
        fmt("si_sdri", "+.2f"), fmt("pesq", ".2f"), fmt("stoi", ".3f"),
        fmt("ta_suppression_db", ".1f"),
    ]]
    table = markdown_table(
        ["demo", "training", "params", "test samples", "SI-SDR dB", "SI-SDRi dB", "PESQ",
         "STOI", "TA suppression dB"], rows,
    )
    print(table)
    key = f"demo_{args.name}{suffix}{budget}"
    demo = "make demo" + (" DEMO=shared" if args.name == "shared" else "")
    command = (demo + (f" ARCH={args.arch}" if args.arch != DEFAULT_ARCH else "")
               + budget_flags(args.steps, args.minutes)
               + (f' DEMO_VARIANT={args.variant} DEMO_SETS="{args.sets}"' if args.variant
                  else ""))
    write_section(
        key,
        f"## `{command}` (unseen test speakers)\n\n{machine()}; CPU training for "
        f"{budget_words(args.steps, args.minutes)} (the training column gives the steps and the "
        f"wall-clock time they took), then `evaluate.py` on the held-out test speakers.\n\n"
        f"{table}",
    )

    # The families side by side: every family's row of this demo and budget found on disk.
    row = {"arch": label, "sets": args.sets, "budget": budget,
           "params": summary["generator_params"],
           "step_time": step_time, "steps": step, "wall_s": wall,
           "si_sdri": metrics.get("si_sdri"), "ta_suppression_db": metrics.get("ta_suppression_db"),
           "si_sdri_wrong_ref": swap.get("own_vs_wrong_ref", {}).get("wrong"),
           "select_acc_dry": selection("dry"), "select_acc_noisy": selection("noisy"),
           "pesq": metrics.get("pesq"), "stoi": metrics.get("stoi")}
    (evaluation / ROW_FILE).write_text(json.dumps(row))
    family_rows = []
    for path in sorted(args.dir.glob(f"eval*/{ROW_FILE}")):
        other = json.loads(path.read_text())
        if other.get("budget") != budget:
            continue
        family_rows.append([
            other["arch"], other["params"], cell(other["step_time"], ".3f"), other["steps"],
            cell(None if other["wall_s"] is None else other["wall_s"] / 60, ".1f") + " min",
            cell(other["si_sdri"], "+.2f"), cell(other["ta_suppression_db"], ".1f"),
            cell(other["si_sdri_wrong_ref"], "+.2f"),
            *(cell(None if other.get(k) is None else 100 * other[k], ".0f")
              for k in ("select_acc_dry", "select_acc_noisy")),
            cell(other["pesq"], ".2f"),
            cell(other["stoi"], ".3f"),
        ])
    families = markdown_table(FAMILY_HEADER, family_rows)
    write_section(
        f"demo_families_{args.name}{budget}",
        f"## Model families on `{demo} ARCH=...{budget_flags(args.steps, args.minutes)}`\n\n"
        f"{machine()}; the same corpus, schedule shape and unseen test speakers for every family, "
        f"{budget_words(args.steps, args.minutes)}; s/step is the mean `step_time` of train.log "
        "(validation excluded), training wall-clock from the first to the last line of "
        "train.log; SI-SDRi wrong ref and selection are `bench/bench_selection.py` (another "
        "test speaker's reference on the validation list; swap pairs at 0 dB SIR, dry and "
        f"noisy, 50 % = chance).\n\n{families}",
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
