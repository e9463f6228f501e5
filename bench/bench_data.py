"""Data pipeline benchmark: HDF5 packing throughput and dynamic-mixing samples/s per worker.

    .venv/bin/python bench/bench_data.py [--samples 200] [--pack-workers 2]

Packs ../shared/data (configs/shared_data.yaml) into a temporary folder, then draws recipe
samples (4 s, 1-3 interferers, an RIR per speaker, noise, speed perturbation, phase-2 TA and
noisy-reference rates) in this one process, i.e. what one DataLoader worker delivers. Prints a
table, writes it into doc/benchmarks.md between the bench_data markers and prints one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.report import machine, print_json, write_section  # noqa: E402
from config import DataConfig, load_config  # noqa: E402
from data.dataset import HiFiTSEDataset, dataset_kwargs  # noqa: E402
from data.hdf5_store import CHUNK_SECONDS  # noqa: E402
from data.prepare_manifest import prepare  # noqa: E402

TARGET_SAMPLES_PER_S = 20.0  # one worker must feed a ~0.4 s GPU step of batch 2 with margin
PHASE2_TA_PROB, PHASE2_NOISY_REF_PROB = 0.2, 0.5
WARMUP = 10
CHECKSUM_REPEATS = 3  # rewrites of the speech with and without checksums, alternating


def bench_pack(d: DataConfig) -> dict[str, dict[str, float]]:
    """Pack every kind from scratch; files/s and MB/s of float32 48 kHz audio written."""
    rows = {}
    for kind, row in prepare(d, show_progress=False).items():
        h5 = Path(d.hdf5_dir) / f"{kind}.h5"
        mb = h5.stat().st_size / 1e6
        rows[kind] = {
            "files": row["packed"],
            "seconds": row["seconds"],
            "files_per_s": row["packed"] / max(row["seconds"], 1e-9),
            "mb_per_s": mb / max(row["seconds"], 1e-9),
        }
    return rows


def bench_checksum_writes(h5: Path, work: Path) -> dict[str, float]:
    """Milliseconds per file to write the packed speech again as ``pack`` writes it (1 s chunks,
    a flush per entry), with and without Fletcher-32 checksums: the writer's cost of the
    checksums alone, decoding excluded. Best of ``CHECKSUM_REPEATS`` each, in alternating
    order."""
    entries: list[tuple[str, object]] = []
    with h5py.File(h5, "r") as f:
        f.visititems(lambda name, obj: entries.append((name, obj[:]))
                     if isinstance(obj, h5py.Dataset) else None)
        rate = int(f.attrs.get("sample_rate", 48_000))
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(CHECKSUM_REPEATS):
        for checksums in (False, True) if repeat % 2 == 0 else (True, False):
            out = work / f"rewrite_{checksums}.h5"
            out.unlink(missing_ok=True)
            start = time.perf_counter()
            with h5py.File(out, "w") as g:
                for key, wave in entries:
                    g.create_dataset(key, data=wave,
                                     chunks=(min(len(wave), round(CHUNK_SECONDS * rate)),),
                                     fletcher32=checksums)
                    g.flush()
            times[checksums].append(time.perf_counter() - start)
            out.unlink()
    return {"files": len(entries),
            "with_ms": 1e3 * min(times[True]) / len(entries),
            "without_ms": 1e3 * min(times[False]) / len(entries)}


def bench_samples(d: DataConfig, n: int, **overrides: object) -> float:
    """Samples per second built in this process (one DataLoader worker's rate)."""
    ds = HiFiTSEDataset(**{**dataset_kwargs(d, "train"), **overrides})
    ds.ta_prob, ds.noisy_ref_prob = PHASE2_TA_PROB, PHASE2_NOISY_REF_PROB
    for i in range(WARMUP):
        ds[i]
    start = time.perf_counter()
    for i in range(WARMUP, WARMUP + n):
        ds[i]
    return n / (time.perf_counter() - start)


def bench_loader(d: DataConfig, n: int, workers: int) -> float:
    """Samples per second through a DataLoader with ``workers`` processes, batch 2."""
    ds = HiFiTSEDataset(**dataset_kwargs(d, "train"))
    ds.ta_prob, ds.noisy_ref_prob = PHASE2_TA_PROB, PHASE2_NOISY_REF_PROB
    loader = DataLoader(ds, batch_size=2, num_workers=workers, sampler=range(n + 4 * workers))
    it = iter(loader)
    for _ in range(2 * workers):  # workers started and warm
        next(it)
    start = time.perf_counter()
    got = sum(len(batch["mix"]) for batch in it)
    return got / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--pack-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded

    os.chdir(REPO)  # the config's paths are relative to the repository root
    cfg = load_config(REPO / "configs" / "shared_data.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        d = dataclasses.replace(
            cfg.data,
            manifest_dir=str(work / "manifests"),
            hdf5_dir=str(work / "hdf5"),
            pack_workers=args.pack_workers,
        )
        pack = bench_pack(d)
        writes = bench_checksum_writes(Path(d.hdf5_dir) / "speech.h5", work)
        cached = bench_samples(d, args.samples)
        # A 60 k RIR corpus makes the worker's RIR cache miss: every RIR is read and FFT'd.
        uncached = bench_samples(d, args.samples, rir_cache_size=0)
        early = bench_samples(d, args.samples, target_type="early")
        loader = bench_loader(d, args.samples, workers=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "## Data pipeline (`bench/bench_data.py`)",
        "",
        f"Machine: {machine()}. Data: ../shared/data (RAVDESS 48 kHz, 16 kHz noise, "
        "44.1 kHz stereo RIRs up to 15 s, cut at `max_rir_seconds` = "
        f"{cfg.data.max_rir_seconds} s).",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    for kind, row in pack.items():
        lines.append(
            f"| pack {kind} ({row['files']} files, {args.pack_workers} decoders + 1 writer) | "
            f"{row['files_per_s']:.1f} files/s, {row['mb_per_s']:.1f} MB/s of float32 audio |"
        )
    extra = writes["with_ms"] / writes["without_ms"] - 1
    lines += [
        f"| speech writes per file, without / with Fletcher-32 checksums ({writes['files']} "
        f"files, decoding excluded, best of {CHECKSUM_REPEATS}) | {writes['without_ms']:.2f} / "
        f"{writes['with_ms']:.2f} ms ({100 * extra:+.0f} %) |",
        f"| samples/s, one worker, recipe (4 s, 1-3 interferers, RIRs, noise, speed, "
        f"TA {PHASE2_TA_PROB}, noisy ref {PHASE2_NOISY_REF_PROB}) | {cached:.1f} |",
        f"| samples/s, one worker, RIR cache off (60 k-RIR corpus) | {uncached:.1f} |",
        f"| samples/s, one worker, early-reverb target | {early:.1f} |",
        f"| samples/s, DataLoader 2 workers, batch 2 (both cores) | {loader:.1f} |",
        "",
        f"Target: >= {TARGET_SAMPLES_PER_S:.0f} samples/s per worker "
        f"({'met' if min(cached, uncached) >= TARGET_SAMPLES_PER_S else 'NOT met'}). "
        "Wall-clock rates on a machine whose cores other jobs may share: expect +-20 %.",
    ]
    table = "\n".join(lines)
    print(table)
    write_section("bench_data", table)
    print_json(
        {
            "samples_per_s_per_worker": round(cached, 2),
            "samples_per_s_per_worker_no_rir_cache": round(uncached, 2),
            "samples_per_s_per_worker_early_target": round(early, 2),
            "samples_per_s_dataloader_2_workers": round(loader, 2),
            "pack": {
                k: {"files_per_s": round(v["files_per_s"], 2), "mb_per_s": round(v["mb_per_s"], 2)}
                for k, v in pack.items()
            },
            "speech_write_ms_per_file": {"without_checksums": round(writes["without_ms"], 3),
                                         "with_checksums": round(writes["with_ms"], 3)},
            "target_samples_per_s": TARGET_SAMPLES_PER_S,
        }
    )


if __name__ == "__main__":
    main()
