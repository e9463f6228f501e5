"""Does the reference decide the output? The swap test for any family's checkpoint and corpus.

    python bench/bench_selection.py --ckpt exp/demo/run/best.pt --config configs/demo_test.yaml
    python bench/bench_selection.py --ckpt exp/demo_shared/run/best.pt \
        --config configs/demo_shared_test.yaml --name shared

A fixed, seeded set of swap pairs of the config's validation speakers (for the demo test
configs: unseen speakers): two different speakers A and B at 0 dB SIR, each run with A's and
with B's reference (``evaluation/selection.py``), in two conditions reported apart: dry and
noise-free; reverberant with noise at 5 dB SNR. Per condition: selection accuracy, mean SI-SDRi
and reference sensitivity, each with a bootstrap 95 % interval over pairs, for all pairs and for
same- and cross-group pairs (RAVDESS: sex; synthetic voices: pitch group from the corpus's
``corpus.json``). On the dry condition a model that ignores its reference scores 50 %.

It also keeps what ``bench_conditioning.py`` (which it replaces) measured: on the config's
fixed validation list, the SI-SDRi of each target-present sample with its own reference and with
another speaker's. Prints a table, writes it to doc/benchmarks.md and prints one JSON object as
its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import load_config
from data.dataset import HiFiTSEDataset, dataset_kwargs
from evaluation.selection import fmt_ci, pair_kind, run_pairs, summarize_by_group
from losses.separation import si_sdr_improvement
from models.layers.conditioning import encode_references
from models.registry import load_model

CONDITIONS = {"dry": False, "noisy": True}  # name -> swap_pair(noisy=...)
CORPUS_JSON = "corpus.json"  # the synthetic corpus's voices, for pitch groups


def pitch_table(cfg_path: Path, explicit: Path | None) -> dict[str, float] | None:
    """Median F0 per synthetic voice: ``--corpus-json``, or the ``corpus.json`` above the
    config's first speech source (the demo corpus layout), or None."""
    cfg = load_config(cfg_path)
    candidates = [explicit] if explicit is not None else [
        Path(src["root"]).parent / CORPUS_JSON for src in cfg.data.speech_sources]
    for path in candidates:
        if path is not None and path.is_file():
            voices = json.loads(path.read_text())["voices"]
            return {name: float(v["f0"]) for name, v in voices.items()}
    return None


def swap_test(model: torch.nn.Module, dataset: HiFiTSEDataset, n_pairs: int,
              pitch: dict[str, float] | None, *, device: torch.device, n_refs: int = 1,
              conditions: tuple[str, ...] = tuple(CONDITIONS)) -> dict[str, Any]:
    """``summarize_by_group`` of the first ``n_pairs`` swap pairs per condition."""
    results = {}
    for name in conditions:
        pairs = [dataset.swap_pair(i, noisy=CONDITIONS[name], n_refs=n_refs)
                 for i in range(n_pairs)]
        if n_refs == 1:
            scores = run_pairs(lambda mix, ref: model(mix, ref), pairs, device=device)
        else:  # refs (B, R, M): each encoded alone, then pooled
            scores = run_pairs(lambda mix, refs: model.extract(
                mix, encode_references(model, refs)), pairs, device=device)
        kinds = [pair_kind(p["speakers"], pitch) for p in pairs]
        results[name] = summarize_by_group(scores, kinds)
    return results


def own_vs_wrong(model: torch.nn.Module, dataset: HiFiTSEDataset, n: int,
                 device: torch.device) -> dict[str, Any]:
    """SI-SDRi of the validation list's target-present samples with their own reference and
    with the reference of the next sample (cyclically) whose speaker differs."""
    items = [item for item in (dataset[i] for i in range(n)) if not item["is_ta"]]
    if len({item["speaker"] for item in items}) < 2:
        return {"n_tp": 0}
    wrong = [next(o for o in items[i + 1 :] + items[:i] if o["speaker"] != item["speaker"])
             for i, item in enumerate(items)]
    gains = []
    with torch.no_grad():
        for item, other in zip(items, wrong, strict=True):
            mix, target = item["mix"][None].to(device), item["target"][None].to(device)
            row = []
            for ref in (item["ref"], other["ref"]):
                est = model(mix, ref[None].to(device))
                row.append(si_sdr_improvement(est.double(), target.double(), mix.double()).item())
            gains.append(row)
    g = np.array(gains)  # (n, 2): own, wrong
    return {"n_tp": len(g), "own": float(g[:, 0].mean()), "wrong": float(g[:, 1].mean()),
            "own_better": float((g[:, 0] > g[:, 1]).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True,
                        help="names the corpus: its validation speakers make the pairs")
    parser.add_argument("--n-pairs", type=int, default=60, help="swap pairs per condition")
    parser.add_argument("--n-samples", type=int, default=100,
                        help="validation list entries for the own/wrong reference comparison")
    parser.add_argument("--corpus-json", type=Path, help="voices' F0 (default: found beside "
                        "the synthetic corpus)")
    parser.add_argument("--n-refs", type=int, default=1,
                        help="references per speaker, pooled (models.layers.conditioning)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="demo", help="the doc/benchmarks.md section suffix")
    parser.add_argument("--no-write", action="store_true", help="leave doc/benchmarks.md alone")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = load_config(args.config)
    dataset = HiFiTSEDataset(**{**dataset_kwargs(cfg.data, "val", sample_rate=cfg.stft.sample_rate),
                                "length": args.n_samples})
    model = load_model(args.ckpt).to(device).eval()
    pitch = pitch_table(args.config, args.corpus_json)
    results: dict[str, Any] = swap_test(model, dataset, args.n_pairs, pitch, device=device,
                                        n_refs=args.n_refs)
    rows = []
    for name in CONDITIONS:
        for group, s in results[name].items():
            rows.append([name, group, str(s["n_pairs"]), fmt_ci(s, "select_acc", ".0f", 100),
                         fmt_ci(s, "si_sdri", "+.2f"), fmt_ci(s, "ref_sens_db", "+.1f")])
    table = markdown_table(["condition", "pairs", "n", "selection accuracy % [95 % CI]",
                            "SI-SDRi dB [95 % CI]", "reference sensitivity dB [95 % CI]"], rows)
    swap = own_vs_wrong(model, dataset, args.n_samples, device)
    results["own_vs_wrong_ref"] = swap
    swap_line = ("no two target-present speakers in the validation list" if not swap["n_tp"]
                 else f"validation list, {swap['n_tp']} TP samples: SI-SDRi {swap['own']:+.2f} dB "
                 f"with the own reference, {swap['wrong']:+.2f} dB with another speaker's "
                 f"(own better on {swap['own_better']:.0%})")
    print(table)
    print(swap_line)
    if not args.no_write:
        write_section(
            f"selection_{args.name}",
            f"## Speaker selection, {args.name} (`bench/bench_selection.py`)\n\n{machine()}; "
            f"checkpoint `{args.ckpt}`, swap pairs of the validation speakers of "
            f"`{args.config}` at 0 dB SIR, {args.n_refs} reference(s) per speaker; dry: no "
            "reverberation or noise; noisy: each voice "
            "reverberant, noise at 5 dB SNR. A model that ignores its reference scores 50 % "
            "dry; reference sensitivity -100 dB means identical outputs for both references."
            f"\n\n{table}\n\n{swap_line}\n")
    print_json({"name": args.name, "ckpt": str(args.ckpt), "config": str(args.config),
                "n_refs": args.n_refs,
                **results})


if __name__ == "__main__":
    main()
