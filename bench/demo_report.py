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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section

LOG_STEP = re.compile(r"training finished step=(\d+)")
DEFAULT_MINUTES = 15.0  # the Makefile's DEMO_MINUTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the demo folder (exp/demo)")
    parser.add_argument("--name", required=True, help="synthetic | shared")
    parser.add_argument("--minutes", type=float, required=True, help="the training budget")
    args = parser.parse_args()

    summary = json.loads((args.dir / "eval" / "summary.json").read_text())
    metrics = {k: v["mean"] for k, v in summary["metrics"].items()}
    log_text = (args.dir / "run" / "train.log").read_text()
    steps = [int(m) for m in LOG_STEP.findall(log_text)]
    step = steps[-1] if steps else summary.get("step")

    def fmt(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else format(value, spec)

    rows = [[
        args.name, f"{args.minutes:g} min, {step} steps", summary["generator_params"],
        f"{summary['n_tp']} TP + {summary['n_ta']} TA", fmt("si_sdr", "+.2f"),
        fmt("si_sdri", "+.2f"), fmt("pesq", ".2f"), fmt("stoi", ".3f"),
        fmt("ta_suppression_db", ".1f"),
    ]]
    table = markdown_table(
        ["demo", "training", "params", "test samples", "SI-SDR dB", "SI-SDRi dB", "PESQ",
         "STOI", "TA suppression dB"], rows,
    )
    print(table)
    # The default budget has its own section; any other budget gets one more, so a long run
    # never overwrites the 15-minute result the README talks about.
    key = f"demo_{args.name}"
    command = "make demo" + (" DEMO=shared" if args.name == "shared" else "")
    if args.minutes != DEFAULT_MINUTES:
        key += f"_{args.minutes:g}min"
        command += f" DEMO_MINUTES={args.minutes:g}"
    write_section(
        key,
        f"## `{command}` (unseen test speakers)\n\n{machine()}; CPU training for a fixed time "
        f"budget, then `evaluate.py` on the held-out test speakers.\n\n{table}",
    )
    print(f"\ncheckpoint: {args.dir / 'run' / 'best.pt'}")
    print(f"report:     {args.dir / 'eval' / 'report.md'}")
    print(f"audio:      {args.dir / 'eval' / 'examples'} and {args.dir / 'extracted.wav'}")
    print(f"tensorboard --logdir {args.dir / 'run' / 'tb'}")
    print_json({"bench": key, "steps": step, **{
        k: metrics.get(k) for k in ("si_sdr", "si_sdri", "pesq", "stoi", "ta_suppression_db")
    }})


if __name__ == "__main__":
    main()
