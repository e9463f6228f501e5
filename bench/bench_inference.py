"""inference.py on the CPU: real-time factor and peak memory against the recording's length.

    python bench/bench_inference.py [--threads 2] [--full] [--no-write]

Each case runs ``Extractor`` (extraction/) on one file in a fresh subprocess, so the peak RSS
(``resource.getrusage(...).ru_maxrss``, the kernel's high-water mark of resident memory) belongs
to that case alone; tracemalloc would miss torch's allocations. The models have random weights
(the speed and memory of a trained model are the same). Inputs are a 10 s real mixture (RAVDESS
speech of two actors + a kitchen-noise recording from ../shared/data; white noise if that folder
is missing) repeated to length, written as 48 kHz 16-bit WAV; the reference is 4 s of speech.

The recipe model runs the RTF cases (10 s, 60 s) and the 60 s memory point. A 600 s file through
the recipe takes ~10 min or more on two shared cores, so by default the 600 s memory point uses
the tiny config, next to tiny 60 s and 1800 s points for the comparison; ``--full`` adds the
recipe on 600 s.

The children run with ``OMP_WAIT_POLICY=PASSIVE``: on cores that other jobs share, OpenMP
threads that spin while waiting for a descheduled peer made single 8 s windows of the tiny
model take 25-40 s instead of 0.7 s (measured); passive waiting removes those stalls.
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
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import machine, markdown_table, print_json, write_section
from config import load_config, model_kwargs
from dsp.audio import SAMPLE_RATE, load_audio
from extraction.extractor import Extractor, Job
from extraction.windows import OVERLAP_SECONDS, WINDOW_SECONDS
from models.registry import build_model, checkpoint_payload, load_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = {"recipe": REPO / "configs" / "hifi_tse.yaml", "tiny": REPO / "configs" / "tiny.yaml"}
BASE_SECONDS = 10  # the real mixture that longer inputs repeat
REF_SECONDS = 4.0
MIB = 1024**2
KIB = 1024  # ru_maxrss is in KiB on Linux
# (model, seconds of input, what the case measures)
CASES = [("recipe", 10, "RTF"), ("recipe", 60, "RTF + memory"), ("tiny", 60, "memory"),
         ("tiny", 600, "memory"), ("tiny", 1800, "memory")]
FULL_CASES = [("recipe", 600, "memory")]


def base_audio() -> tuple[np.ndarray, np.ndarray]:
    """A 10 s mixture and a 4 s reference at 48 kHz, from real recordings when present."""
    n, n_ref = BASE_SECONDS * SAMPLE_RATE, round(REF_SECONDS * SAMPLE_RATE)
    speech = SHARED_DATA / "speech" / "ravdess"
    if not speech.is_dir():
        rng = np.random.default_rng(0)
        return (0.05 * rng.standard_normal(n)).astype(np.float32), (
            0.05 * rng.standard_normal(n_ref)
        ).astype(np.float32)

    def concat(actor: str, length: int, skip: int = 0) -> np.ndarray:
        files = sorted((speech / actor).glob("*.flac"))[skip:]
        wave = np.concatenate([load_audio(p) for p in files[: 2 + length // SAMPLE_RATE // 3]])
        return wave[:length]

    target, interferer = concat("Actor_02", n), concat("Actor_03", n)
    noise = load_audio(SHARED_DATA / "noise" / "doing_the_dishes.flac")[:n]
    mix = target + 0.7 * interferer + 0.1 * noise * target.std() / noise.std()
    return mix.astype(np.float32), concat("Actor_02", n_ref, skip=30)


def write_repeated(path: Path, base: np.ndarray, seconds: int) -> None:
    """``base`` repeated to ``seconds``, written block by block (never whole in memory)."""
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16") as f:
        for _ in range(seconds * SAMPLE_RATE // base.shape[0]):
            f.write(base)


def child(ckpt: Path, mix: Path, ref: Path, threads: int) -> None:
    """One case in this (fresh) process; prints its numbers as one JSON line."""
    torch.set_num_threads(threads)
    extractor = Extractor(load_model(ckpt))
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        result = extractor.run(Job(mix=mix, ref=ref, out=Path(tmp) / "out.wav"))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "seconds": result.seconds,
        "duration": result.duration,
        "rtf": result.rtf,
        "loaded_mib": loaded_kib * KIB / MIB,
        "peak_mib": peak_kib * KIB / MIB,
    }))


def run_case(ckpt: Path, mix: Path, ref: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(ckpt), str(mix), str(ref),
           "--threads", str(threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"case {mix.name} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also the recipe on 600 s")
    parser.add_argument("--no-write", action="store_true", help="do not touch doc/benchmarks.md")
    parser.add_argument("--child", nargs=3, type=Path, metavar=("CKPT", "MIX", "REF"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return

    cases = CASES + (FULL_CASES if args.full else [])
    mix, ref = base_audio()
    rows, result = [], {"threads": args.threads, "window_s": WINDOW_SECONDS,
                        "overlap_s": OVERLAP_SECONDS, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sf.write(tmp / "ref.wav", ref, SAMPLE_RATE, subtype="PCM_16")
        ckpts, n_params = {}, {}
        for name, cfg_path in CONFIGS.items():
            cfg = load_config(cfg_path)
            torch.manual_seed(0)
            model = build_model(model_kwargs(cfg))
            n_params[name] = sum(p.numel() for p in model.parameters())
            ckpts[name] = tmp / f"{name}.pt"
            torch.save(checkpoint_payload(model, model_kwargs(cfg)) | {"ema": None}, ckpts[name])
        for model_name, seconds, measures in cases:
            mix_path = tmp / f"mix_{seconds}s.wav"
            if not mix_path.exists():
                write_repeated(mix_path, mix, seconds)
            start = time.perf_counter()
            case = run_case(ckpts[model_name], mix_path, tmp / "ref.wav", args.threads)
            wall = time.perf_counter() - start
            key = f"{model_name}_{seconds}s"
            result["cases"][key] = {k: round(v, 4) for k, v in case.items()}
            rows.append([
                f"{model_name} ({n_params[model_name] / 1e6:.2f} M)", f"{seconds} s", measures,
                f"{case['seconds']:.1f}", f"{case['rtf']:.3f}", f"{case['loaded_mib']:.0f}",
                f"{case['peak_mib']:.0f}", f"{case['peak_mib'] - case['loaded_mib']:.0f}",
            ])
            print(f"{key}: {case['seconds']:.1f} s (process {wall:.1f} s), RTF {case['rtf']:.3f}, "
                  f"peak RSS {case['peak_mib']:.0f} MiB", flush=True)

    table = markdown_table(
        ["model (random weights)", "input", "measures", "time (s)", "RTF",
         "RSS after load (MiB)", "peak RSS (MiB)", "peak - load (MiB)"],
        rows,
    )
    peaks = {key: case["peak_mib"] for key, case in result["cases"].items()}
    growth = {
        f"{name} {short} s -> {long} s": peaks[f"{name}_{long}s"] - peaks[f"{name}_{short}s"]
        for name, short, long in (("recipe", 60, 600), ("tiny", 60, 600), ("tiny", 600, 1800))
        if f"{name}_{long}s" in peaks
    }
    result["peak_growth_mib"] = {k: round(v, 1) for k, v in growth.items()}
    for key in ("recipe_10s", "recipe_60s"):
        result[f"rtf_{key}"] = result["cases"][key]["rtf"]
    recipe_600 = (
        "The recipe also ran the 600 s point (`--full`)."
        if args.full
        else "The 600 s memory point uses the tiny config: the recipe would take 10+ minutes on "
        "two shared cores (`--full` adds it)."
    )
    body = (
        "## Inference (`bench/bench_inference.py`)\n\n"
        f"Machine: {machine()}; {args.threads} threads per case. `Extractor` (extraction/) on one "
        f"48 kHz 16-bit WAV per case ({WINDOW_SECONDS:g} s windows, {OVERLAP_SECONDS:g} s "
        "cross-fades, reference encoded once), each case in a fresh process; peak RSS is that "
        "process's `ru_maxrss`. Random weights (a trained model costs the same). Inputs: a 10 s "
        "real mixture (RAVDESS speech + noise from ../shared/data) repeated to length. RTF = "
        "processing time / audio duration, including reading, resampling and writing. A 10 s "
        "file runs two full 8 s windows (the last one is moved back to end at the last sample): "
        "1.6 s of model input per second of audio, against 8/7 = 1.14 for a long file.\n\n"
        f"{table}\n\n"
        f"{recipe_600} Peak RSS change with length: "
        + ", ".join(f"{k}: {v:+.0f} MiB" for k, v in growth.items())
        + ". A separate per-window trace (tiny, 600 s, 86 windows, 1 thread) kept the resident "
        "size between windows at 327-353 MiB from the first window to the last, while the "
        "high-water mark rose in steps (416 MiB after window 1, 455 after 5, 477 after 60): "
        "transient peaks inside one window vary with the allocator's state, nothing "
        "accumulates. The cases run with `OMP_WAIT_POLICY=PASSIVE`: on shared cores, "
        "spinning OpenMP threads stalled single windows 40x (see the script's docstring). "
        "Wall-clock times on cores that other jobs share: expect +-20 % or worse."
    )
    print(table)
    if not args.no_write:
        write_section("bench_inference", body)
    print_json(result)


if __name__ == "__main__":
    main()
