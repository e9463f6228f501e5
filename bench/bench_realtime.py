"""Real time on the CPU: the recipe offline, the recipe made causal, and the real-time student,
streamed hop by hop.

    python bench/bench_realtime.py [--threads 2] [--no-write]

Per case, in a fresh process (so the peak RSS, ``ru_maxrss``, is that case's alone): the
model's parameters, the real-time factor (compute time / audio duration), for streamed cases
the compute time of each 10 ms hop (p50 / p99) and the state the stream holds, and the peak
RSS. Offline cases run ``Extractor.extract_array`` (8 s windows, 1 s cross-fades); streamed
cases push the mixture one hop at a time through ``StreamingExtractor`` after encoding the
reference once. Random weights: speed and memory do not depend on them. The input is the 10 s
real mixture of bench/bench_inference.py (RAVDESS speech + noise from ../shared/data; white
noise without it), repeated to length. The tiny causal model streams 1, 5 and 10 minutes to
show that the state and the memory stay flat in the stream's length.

Backends: PyTorch eager. ONNX Runtime and its int8 copy are measured where export_onnx.py has
written them (``--onnx``); otherwise their columns say "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_inference import base_audio
from bench.report import machine, markdown_table, print_json, write_section
from config import load_config, model_kwargs
from dsp.audio import SAMPLE_RATE
from extraction.extractor import Extractor
from models.registry import build_model

REPO = Path(__file__).resolve().parents[1]
MIB, KIB = 1024**2, 1024
CAUSAL = ["model.causal=true"]
MODELS = {  # name: (config, overrides)
    "recipe": ("hifi_tse.yaml", []),
    "recipe causal": ("hifi_tse.yaml", CAUSAL),
    "hifi_tse_rt": ("hifi_tse_rt.yaml", []),
    "tiny causal": ("tiny.yaml", CAUSAL),
}
# (model, mode, seconds of input)
# (model, mode, seconds of input, intra-op threads); the student streams with one thread and
# with two: a hop is a chain of small sequential ops, which a second thread may not speed up.
CASES = [("recipe", "offline", 10, None), ("recipe causal", "stream", 10, None),
         ("hifi_tse_rt", "stream", 60, 1), ("hifi_tse_rt", "stream", 60, None),
         ("tiny causal", "stream", 60, None), ("tiny causal", "stream", 300, None),
         ("tiny causal", "stream", 600, None)]


def repeated(base: np.ndarray, seconds: int) -> np.ndarray:
    return np.tile(base, -(-seconds * SAMPLE_RATE // base.shape[0]))[: seconds * SAMPLE_RATE]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this fresh process."""
    torch.set_num_threads(spec["threads"])
    config, overrides = MODELS[spec["model"]]
    cfg = load_config(REPO / "configs" / config, overrides)
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg)).eval()
    mix, ref = base_audio()
    mix = repeated(mix, spec["seconds"])
    extractor = Extractor(model)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if spec["mode"] == "offline":
        begin = time.perf_counter()
        extractor.extract_array(mix, ref)
        out["compute_s"] = time.perf_counter() - begin
    else:
        stream = extractor.streaming(ref)
        hop = stream.hop
        times = np.empty(mix.shape[0] // hop)
        for i in range(times.shape[0]):
            begin = time.perf_counter()
            stream.push(mix[i * hop : (i + 1) * hop])
            times[i] = time.perf_counter() - begin
        out.update(compute_s=float(times.sum()), hop_ms=1e3 * hop / SAMPLE_RATE,
                   p50_ms=1e3 * float(np.percentile(times, 50)),
                   p99_ms=1e3 * float(np.percentile(times, 99)),
                   state_elements=stream.state_size(),
                   latency_ms=1e3 * model.stft.win_length / SAMPLE_RATE)
    out["rtf"] = out["compute_s"] / spec["seconds"]
    out["threads"] = spec["threads"]
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB
    return out


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows, result = [], {"threads": args.threads, "cases": {}}
    for model, mode, seconds, threads in CASES:
        threads = threads or args.threads
        case = run_case({"model": model, "mode": mode, "seconds": seconds, "threads": threads})
        key = f"{model.replace(' ', '_')}_{mode}_{seconds}s_{threads}t"
        result["cases"][key] = {k: round(v, 4) if isinstance(v, float) else v
                                for k, v in case.items()}
        rows.append([model, f"{case['params'] / 1e6:.2f} M", mode, "PyTorch eager",
                     str(threads), f"{seconds} s", f"{case['rtf']:.3f}",
                     fmt(case.get("p50_ms"), ".2f"), fmt(case.get("p99_ms"), ".2f"),
                     fmt(case.get("latency_ms"), ".0f"),
                     fmt(case.get("state_elements"), ","), f"{case['peak_mib']:.0f}"])
        print(f"{key}: RTF {case['rtf']:.3f}"
              + (f", hop p50 {case['p50_ms']:.2f} ms p99 {case['p99_ms']:.2f} ms"
                 if "p50_ms" in case else "")
              + f", peak RSS {case['peak_mib']:.0f} MiB", flush=True)
    table = markdown_table(
        ["model (random weights)", "parameters", "mode", "backend", "threads", "input", "RTF",
         "hop p50 (ms)", "hop p99 (ms)", "algorithmic latency (ms)", "stream state (elements)",
         "peak RSS (MiB)"], rows)
    tiny = [result["cases"][f"tiny_causal_stream_{s}s_{args.threads}t"] for s in (60, 300, 600)]
    result["tiny_state_flat"] = len({c["state_elements"] for c in tiny}) == 1
    result["tiny_peak_mib"] = [c["peak_mib"] for c in tiny]
    rt_cases = [c for k, c in result["cases"].items() if k.startswith("hifi_tse_rt")]
    rt = min(rt_cases, key=lambda c: c["rtf"])  # the faster thread count
    result.update(rt_rtf=rt["rtf"], rt_p99_ms=rt["p99_ms"], rt_params=rt["params"])
    body = (
        "## Real time (`bench/bench_realtime.py`)\n\n"
        f"Machine: {machine()}; {args.threads} threads per case, each case in a fresh process "
        "(peak RSS is its `ru_maxrss`), random weights, the 10 s real mixture of "
        "bench_inference.py repeated to length. Offline: `Extractor.extract_array` (8 s "
        "windows). Streamed: `StreamingExtractor.push` one 10 ms hop at a time after the "
        "reference is encoded once; RTF is the sum of the per-hop compute times over the audio "
        "duration. Algorithmic latency: the analysis window (the output lags the input by "
        "`win_length`), compute time not included; input at another rate adds the streaming "
        "resampler's delay. ONNX Runtime and int8: see the ONNX section where measured.\n\n"
        f"{table}\n\n"
        f"Goal (issue 27): the student streams at RTF <= 0.5 with p99 per-hop compute under the "
        f"10 ms hop. Measured (the faster thread count): RTF {rt['rtf']:.3f}, p99 "
        f"{rt['p99_ms']:.2f} ms, "
        f"{rt['params'] / 1e6:.2f} M parameters. The tiny causal model's stream state is "
        f"{'the same size' if result['tiny_state_flat'] else 'NOT the same size'} at 1, 5 and "
        f"10 minutes; its peak RSS: {', '.join(f'{p:.0f}' for p in result['tiny_peak_mib'])} "
        "MiB."
    )
    if not args.no_write:
        write_section("realtime", body)
    print(body)
    print_json(result)


if __name__ == "__main__":
    main()
