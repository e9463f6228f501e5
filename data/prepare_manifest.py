"""Scan the corpora named in the config, pack them into HDF5 and write the training manifests.

    python -m data.prepare_manifest --config configs/hifi_tse.yaml [--set data.pack_workers=8]

For each kind (speech, noise, RIR): scan the headers of the configured folders (data/scan.py),
choose the validation split, pack the audio at ``stft.sample_rate`` into
``<hdf5_dir>/<kind>.h5`` (data/hdf5_store.py; interrupted runs resume) and write
``<manifest_dir>/{speaker,noise,rir}_manifest.json``, whose entries name the HDF5 file and key
of each packed file. Files that cannot be used are listed in ``<hdf5_dir>/<kind>_report.json``.
``--scan-only`` writes the manifests without packing.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config import SAMPLE_RATE, ConfigError, DataConfig, load_config
from data.hdf5_store import PackError, pack
from data.manifest import MANIFEST_NAMES, write_manifest
from data.scan import ScanResult, assign_splits, scan_noise, scan_rir, scan_speech

log = logging.getLogger("data.prepare_manifest")


def _plan(d: DataConfig) -> list[tuple[str, Callable[[Any], ScanResult], list[Any], float]]:
    """(kind, scanner, configured sources, minimum seconds) for each kind of audio."""
    return [
        ("speech", scan_speech, d.speech_sources, d.min_speech_seconds),
        ("noise", scan_noise, d.noise_dirs, d.min_noise_seconds),
        ("rir", scan_rir, d.rir_dirs, d.min_rir_seconds),
    ]


def prepare(d: DataConfig, *, scan_only: bool = False, show_progress: bool = True,
            sample_rate: int = SAMPLE_RATE) -> dict:
    """Scan, split, pack at ``sample_rate`` (the config's ``stft.sample_rate``) and write the
    manifests; returns a summary per kind."""
    manifest_dir = Path(d.manifest_dir)
    hdf5_dir = Path(d.hdf5_dir)
    summary: dict[str, dict[str, Any]] = {}
    for kind, scanner, sources, min_seconds in _plan(d):
        if not sources:
            log.warning("no %s sources configured; %s not written", kind, MANIFEST_NAMES[kind])
            continue
        scanned = scanner(sources)
        entries = sorted(scanned.entries, key=lambda e: e["key"])
        assign_splits(entries, d.val_fraction)
        manifest_path = manifest_dir / MANIFEST_NAMES[kind]
        row: dict[str, Any] = {
            "scanned": len(entries),
            "scan_problems": len(scanned.problems),
            "val": sum(e["split"] == "val" for e in entries),
        }
        if scan_only:
            write_manifest(manifest_path, kind, [{**e, "hdf5": None} for e in entries],
                           sample_rate)
            summary[kind] = row
            continue
        h5_path = hdf5_dir / f"{kind}.h5"
        result = pack(
            entries,
            h5_path,
            min_seconds=min_seconds,
            workers=d.pack_workers,
            problems=scanned.problems,
            show_progress=show_progress,
            sample_rate=sample_rate,
        )
        rel_h5 = os.path.relpath(h5_path.resolve(), manifest_dir.resolve())
        packed = [
            {**e, "hdf5": rel_h5, "num_samples": result.num_samples[e["key"]]}
            for e in entries
            if e["key"] in result.num_samples
        ]
        write_manifest(manifest_path, kind, packed, sample_rate)
        row.update(
            packed=len(packed),
            new=result.n_new,
            resumed=result.n_resumed,
            skipped=len(result.skipped),
            seconds=round(result.seconds, 3),
        )
        if kind == "speech":
            row["speakers"] = len({e["speaker"] for e in packed})
            row["val_speakers"] = len({e["speaker"] for e in packed if e["split"] == "val"})
        summary[kind] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (data section)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override"
    )
    parser.add_argument("--scan-only", action="store_true", help="write manifests, do not pack")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        summary = prepare(cfg.data, scan_only=args.scan_only, show_progress=not args.no_progress,
                          sample_rate=cfg.stft.sample_rate)
    except PackError as err:
        raise SystemExit(f"error: {err}") from None
    for kind, row in summary.items():
        print(f"{kind:7s} " + " ".join(f"{k}={v}" for k, v in row.items()))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
