"""Does the extraction follow the reference? SI-SDRi with the right and with a wrong reference.

    python bench/bench_conditioning.py --ckpt exp/demo/run/best.pt --config configs/demo_test.yaml

Takes the target-present samples of a config's fixed validation list (for the demo configs: the
unseen test speakers) and extracts each twice: with its own reference (another utterance of the
target speaker) and with the reference of a sample whose target is a different speaker. A model
that has learned target speaker extraction scores clearly lower with the wrong reference; one
that only removes noise, or always keeps the louder voice, scores the same with both. Prints a
table, writes it to doc/benchmarks.md and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import load_config
from data.dataset import HiFiTSEDataset, dataset_kwargs
from losses.separation import si_sdr_improvement
from models.registry import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="names the validation set")
    parser.add_argument("--n-samples", type=int, default=100, help="validation list entries")
    parser.add_argument("--name", default="demo", help="the doc/benchmarks.md section suffix")
    args = parser.parse_args()

    cfg = load_config(args.config)
    dataset = HiFiTSEDataset(**{**dataset_kwargs(cfg.data, "val"), "length": args.n_samples})
    items = [dataset[i] for i in range(args.n_samples)]
    items = [item for item in items if not item["is_ta"]]
    if len({item["speaker"] for item in items}) < 2:
        sys.exit(f"{args.config}: the first {args.n_samples} validation samples hold fewer than "
                 "two target-present speakers; raise --n-samples")
    model = load_model(args.ckpt).eval()
    # Each sample borrows the reference of the next sample (cyclically) whose speaker differs.
    wrong = [
        next(other for other in items[i + 1:] + items[:i] if other["speaker"] != item["speaker"])
        for i, item in enumerate(items)
    ]
    rows = []
    with torch.no_grad():
        for item, other in zip(items, wrong, strict=True):
            mix, target = item["mix"][None], item["target"][None]
            own = model(mix, item["ref"][None])
            swapped = model(mix, other["ref"][None])
            rows.append([si_sdr_improvement(est.double(), target.double(), mix.double()).item()
                         for est in (own, swapped)])
    gains = np.array(rows)  # (n, 2): SI-SDRi with the own and with the wrong reference
    own_mean, wrong_mean = gains.mean(axis=0)
    better = float((gains[:, 0] > gains[:, 1]).mean())
    table = markdown_table(
        ["checkpoint", "TP samples", "SI-SDRi own ref dB", "SI-SDRi wrong ref dB",
         "difference dB", "own ref better"],
        [[f"`{args.ckpt}`", len(gains), f"{own_mean:+.2f}", f"{wrong_mean:+.2f}",
          f"{own_mean - wrong_mean:+.2f}", f"{better:.0%}"]],
    )
    print(table)
    write_section(
        f"conditioning_{args.name}",
        f"## Reference swap, {args.name} (`bench/bench_conditioning.py`)\n\n{machine()}; "
        f"validation list of `{args.config}`; the wrong reference is another test speaker's."
        f"\n\n{table}",
    )
    print_json({"name": args.name, "n_tp": len(gains), "si_sdri_own_ref": own_mean,
                "si_sdri_wrong_ref": wrong_mean, "own_ref_better_share": better})


if __name__ == "__main__":
    main()
