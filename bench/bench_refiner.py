"""The score-based refiner against its own first stage: quality and sampling cost per step count.

    python bench/bench_refiner.py --ckpt exp/demo/run_sgmse_refiner/best.pt \
        --config configs/demo_test.yaml [--n-samples 20] [--steps 30 10 4]

Takes a refiner checkpoint (``arch: sgmse_refiner``; its first stage is inside it) and a config
naming a fixed validation list (for the demo configs: the unseen test speakers), and extracts
every sample with the first stage alone and with the refiner at each number of sampler steps,
through ``Extractor`` (extraction/) as evaluate.py does. Per system: SI-SDRi, wide-band PESQ and
the 8-24 kHz log-spectral distance of the TP items (``evaluation.metrics``), DNSMOS P.835 of
the TP estimates at -25 dBFS (``evaluation.dnsmos``), TA suppression, and the extraction time
per second of audio (wall clock, the first stage included). Prints a table, writes it to
doc/benchmarks.md and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import SAMPLE_RATE, load_config
from evaluation.dnsmos import dnsmos
from evaluation.metrics import DNSMOS_LEVEL_DBFS, MetricSettings
from evaluation.runner import RunSettings, load_sample
from evaluation.scoring import row_of
from evaluation.sources import TP, validation_samples
from extraction.extractor import Extractor
from models.refiner.refiner import SGMSERefiner
from models.registry import load_model

METRICS = ("si_sdri", "pesq", "lsd_hb", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a refiner checkpoint")
    parser.add_argument("--config", type=Path, required=True, help="names the validation set")
    parser.add_argument("--n-samples", type=int, default=20, help="validation list entries")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 10, 4],
                        help="sampler steps to compare (the model's n_steps is the default's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="demo", help="the doc/benchmarks.md section suffix")
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    refiner = load_model(args.ckpt).eval()
    if not isinstance(refiner, SGMSERefiner):
        sys.exit(f"error: {args.ckpt}: not a refiner checkpoint (arch sgmse_refiner)")
    sources = validation_samples(load_config(args.config), args.n_samples)
    samples = [load_sample(source, RunSettings())[0] for source in sources]
    core = MetricSettings(groups=("core",))
    systems = {"first stage alone": (Extractor(refiner.first_stage), None)}
    systems.update({f"refiner, N = {n}": (Extractor(refiner), n) for n in args.steps})

    results = {}
    for name, (extractor, steps) in systems.items():
        if steps is not None:
            refiner.n_steps = steps
        values: dict[str, list[float]] = {k: [] for k in (*METRICS, "ta_suppression_db")}
        seconds = audio = 0.0
        for sample in samples:
            start = time.perf_counter()
            est = extractor.extract_array(sample.mix, sample.ref, ref_name=sample.id)
            seconds += time.perf_counter() - start
            audio += len(sample.mix) / SAMPLE_RATE
            row = row_of({"": est}, sample, core)
            if sample.condition == TP:
                row.update({f"dnsmos_{k}": v for k, v in dnsmos(
                    est, SAMPLE_RATE, level_dbfs=DNSMOS_LEVEL_DBFS).items()})
            for key, column in values.items():
                if np.isfinite(row.get(key, np.nan)):
                    column.append(float(row[key]))
        results[name] = {"steps": steps, "s_per_audio_s": round(seconds / audio, 3),
                         **{k: round(float(np.mean(v)), 3) if v else None
                            for k, v in values.items()}}
        print(name, results[name], flush=True)

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    n_tp = sum(s.condition == TP for s in samples)
    rows = [[name, cell(r["si_sdri"], "+.2f"), cell(r["pesq"], ".2f"), cell(r["lsd_hb"], ".2f"),
             cell(r["dnsmos_ovrl"], ".2f"), cell(r["dnsmos_sig"], ".2f"),
             cell(r["dnsmos_bak"], ".2f"), cell(r["ta_suppression_db"], ".1f"),
             cell(r["s_per_audio_s"], ".2f")] for name, r in results.items()]
    table = markdown_table(
        ["system", "SI-SDRi dB", "PESQ", "LSD 8-24 kHz dB", "DNSMOS OVRL", "SIG", "BAK",
         "TA suppression dB", "s per s of audio"], rows)
    print(table)
    if not args.no_write:
        write_section(
            f"bench_refiner_{args.name}",
            f"## Score-based refiner vs its first stage (`bench/bench_refiner.py`)\n\n"
            f"{machine()}; `{args.ckpt}` on the first {len(samples)} entries of "
            f"{args.config}'s validation list ({n_tp} TP, {len(samples) - n_tp} TA); the "
            "refiner's OUVE predictor-corrector sampler (one corrector step, so 2N network "
            "calls) at each N, its first stage alone as the baseline, both through "
            "`Extractor` (extraction/). SI-SDRi, PESQ (wide-band), LSD and DNSMOS (P.835 at -25 "
            "dBFS) over the TP items, TA suppression over the TA items; time is wall clock per "
            f"second of audio, first stage included.\n\n{table}",
        )
    print_json({"bench": "bench_refiner", "ckpt": str(args.ckpt), "n_samples": len(samples),
                "n_tp": n_tp, "systems": results})


if __name__ == "__main__":
    main()
