"""Real time on the CPU: the recipe offline, the recipe made causal, and the real-time student,
streamed hop by hop.

    python bench/bench_realtime.py [--threads 2] [--no-write]

Per case, in a fresh process (so the peak RSS is that case's alone): the
model's parameters, the real-time factor (compute time / audio duration), for streamed cases
the compute time of each 10 ms hop (p50 / p99) and the state the stream holds, and the peak
RSS. Offline cases run ``Extractor.extract_array`` (8 s windows, 1 s cross-fades); streamed
cases push the mixture one hop at a time through ``StreamingExtractor`` after encoding the
reference once. Random weights: speed and memory do not depend on them. The input is the 10 s
real mixture of bench/bench_inference.py (RAVDESS speech + noise from ../shared/data; white
noise without it), repeated to length. The tiny causal model streams 1, 5 and 10 minutes to
show that the state and the memory stay flat in the stream's length.

Backends: PyTorch eager, ONNX Runtime (the graphs export_onnx.py writes: the network between
STFT and iSTFT, or the per-hop step with its states; everything around it stays in PyTorch, as
``inference.py --backend onnxruntime`` runs it) and its dynamic int8 copy. The parent process
exports each model once (random weights, seeded, so the children rebuild the same weights); the
export (in its own process) is not part of any case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
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
from export_onnx import export
from extraction.extractor import Extractor
from extraction.onnx_runtime import OnnxModel
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
BACKENDS = ("torch", "onnxruntime", "int8")
# (model, mode, seconds of input, intra-op threads (None: --threads), backends); the student
# streams with one thread and with two: a hop is a chain of small sequential ops, which a second
# thread may not speed up.
CASES = [("recipe", "offline", 10, None, BACKENDS), ("recipe causal", "stream", 10, None, BACKENDS),
         ("hifi_tse_rt", "stream", 60, 1, BACKENDS), ("hifi_tse_rt", "stream", 60, 2, ("torch",)),
         ("tiny causal", "stream", 60, None, ("torch",)),
         ("tiny causal", "stream", 300, None, ("torch",)),
         ("tiny causal", "stream", 600, None, ("torch",))]


def build(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The case's model with its seeded random weights, and its model_args."""
    config, overrides = MODELS[name]
    args = model_kwargs(load_config(REPO / "configs" / config, overrides))
    torch.manual_seed(0)
    return build_model(args).eval(), args


def repeated(base: np.ndarray, seconds: int) -> np.ndarray:
    return np.tile(base, -(-seconds * SAMPLE_RATE // base.shape[0]))[: seconds * SAMPLE_RATE]


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this fresh process."""
    if spec["mode"] == "export":
        model, model_args = build(spec["model"])
        export(model, model_args, Path(spec["onnx_dir"]), stream=spec["stream"], int8=True,
               name=spec["model"])
        return {}
    torch.set_num_threads(spec["threads"])
    model, _ = build(spec["model"])
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    latency_ms = 1e3 * model.stft.win_length / SAMPLE_RATE
    if spec["backend"] != "torch":
        model = OnnxModel(model, spec["onnx_dir"], int8=spec["backend"] == "int8",
                          threads=spec["threads"])
    base, ref = base_audio()
    extractor = Extractor(model)
    if spec["mode"] == "offline":
        mix = repeated(base, spec["seconds"])
        begin = time.perf_counter()
        extractor.extract_array(mix, ref)
        out["compute_s"] = time.perf_counter() - begin
    else:
        # Hops cut from the 10 s base in turn: a live stream never holds its whole input, and
        # a 10-minute array (115 MB) would show in the peak RSS as if the stream grew.
        stream = extractor.streaming(ref)
        hop = stream.hop
        times = np.empty(spec["seconds"] * SAMPLE_RATE // hop)
        per_base = base.shape[0] // hop
        for i in range(times.shape[0]):
            at = (i % per_base) * hop
            begin = time.perf_counter()
            stream.push(base[at : at + hop])
            times[i] = time.perf_counter() - begin
        out.update(compute_s=float(times.sum()), hop_ms=1e3 * hop / SAMPLE_RATE,
                   p50_ms=1e3 * float(np.percentile(times, 50)),
                   p99_ms=1e3 * float(np.percentile(times, 99)),
                   state_elements=stream.state_size(), latency_ms=latency_ms)
    out["rtf"] = out["compute_s"] / spec["seconds"]
    out["threads"] = spec["threads"]
    out["peak_mib"] = peak_rss_mib()
    return out


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (VmHWM). Not ``ru_maxrss``: Linux keeps
    that across fork and exec, so a child would report its parent's peak (the exports) when it
    is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KIB / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / MIB  # not Linux


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

    rows, result = [], {"threads": args.threads, "cases": {}, "export_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for model_name, mode, _, _, backends in CASES:
            if set(backends) - {"torch"} and model_name not in exports:
                exports[model_name] = Path(tmp) / model_name.replace(" ", "_")
                begin = time.perf_counter()
                # In a child too: this process must stay idle while the cases run, and ONNX
                # Runtime's thread pools (the export's parity check) spin after their work.
                run_case({"model": model_name, "mode": "export", "stream": mode == "stream",
                          "onnx_dir": str(exports[model_name])})
                result["export_s"][model_name] = round(time.perf_counter() - begin, 1)
                print(f"exported {model_name} in {result['export_s'][model_name]} s", flush=True)
        for model_name, mode, seconds, threads, backends in CASES:
            for backend in backends:
                run_one(result, rows, model_name, mode, seconds, threads or args.threads,
                        backend, exports.get(model_name))
    finish(result, rows, args)


BACKEND_NAMES = {"torch": "PyTorch eager", "onnxruntime": "ONNX Runtime", "int8": "ORT int8"}


def run_one(result: dict[str, Any], rows: list[list[str]], model: str, mode: str, seconds: int,
            threads: int, backend: str, onnx_dir: Path | None) -> None:
    """One case in a child process; its row and its numbers."""
    case = run_case({"model": model, "mode": mode, "seconds": seconds, "threads": threads,
                     "backend": backend, "onnx_dir": str(onnx_dir)})
    key = f"{model.replace(' ', '_')}_{mode}_{seconds}s_{threads}t_{backend}"
    result["cases"][key] = {k: round(v, 4) if isinstance(v, float) else v
                            for k, v in case.items()}
    rows.append([model, f"{case['params'] / 1e6:.2f} M", mode, BACKEND_NAMES[backend],
                 str(threads), f"{seconds} s", f"{case['rtf']:.3f}",
                 fmt(case.get("p50_ms"), ".2f"), fmt(case.get("p99_ms"), ".2f"),
                 fmt(case.get("latency_ms"), ".0f"), fmt(case.get("state_elements"), ","),
                 f"{case['peak_mib']:.0f}"])
    print(f"{key}: RTF {case['rtf']:.3f}"
          + (f", hop p50 {case['p50_ms']:.2f} ms p99 {case['p99_ms']:.2f} ms"
             if "p50_ms" in case else "")
          + f", peak RSS {case['peak_mib']:.0f} MiB", flush=True)


def finish(result: dict[str, Any], rows: list[list[str]], args: argparse.Namespace) -> None:
    """The table, the goal's reading, doc/benchmarks.md and the JSON line."""
    table = markdown_table(
        ["model (random weights)", "parameters", "mode", "backend", "threads", "input", "RTF",
         "hop p50 (ms)", "hop p99 (ms)", "algorithmic latency (ms)", "stream state (elements)",
         "peak RSS (MiB)"], rows)
    tiny = [result["cases"][f"tiny_causal_stream_{s}s_{args.threads}t_torch"]
            for s in (60, 300, 600)]
    result["tiny_state_flat"] = len({c["state_elements"] for c in tiny}) == 1
    result["tiny_peak_mib"] = [c["peak_mib"] for c in tiny]
    rt_cases = {k: c for k, c in result["cases"].items() if k.startswith("hifi_tse_rt")}
    best = min(rt_cases, key=lambda k: rt_cases[k]["rtf"])
    rt = rt_cases[best]
    result.update(rt_best=best, rt_rtf=rt["rtf"], rt_p99_ms=rt["p99_ms"],
                  rt_params=rt["params"])
    body = (
        "## Real time (`bench/bench_realtime.py`)\n\n"
        f"Machine: {machine()}; each case in a fresh process (peak RSS is its VmHWM), "
        "random weights, the 10 s real mixture of bench_inference.py repeated to length. "
        "Offline: `Extractor.extract_array` (8 s windows). Streamed: `StreamingExtractor.push` "
        "one 10 ms hop at a time after the reference is encoded once; RTF is the sum of the "
        "per-hop compute times over the audio duration. ONNX Runtime / int8: the network (or "
        "the per-hop step) exported by export_onnx.py, the STFT, level and overlap-add in "
        "PyTorch around it; ORT's intra-op threads = the threads column. Algorithmic latency: "
        "the analysis window (the output lags the input by `win_length`), compute time not "
        "included; input at another rate adds the streaming resampler's delay (doc/design.md, "
        "\"Real time\"). Export times (not in any case): "
        + ", ".join(f"{k} {v:g} s" for k, v in result["export_s"].items()) + ".\n\n"
        f"{table}\n\n"
        "Goal (issue 27): the student streams at RTF <= 0.5 with p99 per-hop compute under the "
        f"10 ms hop. Its fastest case ({best}): RTF {rt['rtf']:.3f}, p99 {rt['p99_ms']:.2f} ms, "
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
