"""Manifest files: atomic JSON writes, and the packed manifests as compact arrays for training.

A manifest is ``{"version", "kind", "sample_rate", "entries": [...]}``. After packing, each
entry also names its HDF5 file (relative to the manifest folder) and key, and its length in
samples at 48 kHz. The dataset keeps the entries as numpy arrays (not 200 k dicts) so that
DataLoader workers share them copy-on-write instead of each touching every Python object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsp.audio import SAMPLE_RATE
from dsp.files import write_json_atomic

MANIFEST_VERSION = 1
MANIFEST_NAMES = {
    "speech": "speaker_manifest.json",
    "noise": "noise_manifest.json",
    "rir": "rir_manifest.json",
}


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or does not describe packed audio (names it)."""


def write_manifest(path: str | Path, kind: str, entries: list[dict[str, Any]],
                   sample_rate: int = SAMPLE_RATE) -> None:
    write_json_atomic(
        path,
        {
            "version": MANIFEST_VERSION,
            "kind": kind,
            "sample_rate": sample_rate,
            "entries": entries,
        },
    )


def read_manifest(path: str | Path, sample_rate: int | None = None) -> list[dict[str, Any]]:
    """The entries of a manifest file; with ``sample_rate``, one whose audio was packed at
    another rate (manifests before other rates existed are 48 kHz) is an error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: cannot read manifest ({err})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: not a version-{MANIFEST_VERSION} HiFi-TSE manifest")
    rate = data.get("sample_rate", SAMPLE_RATE)
    if sample_rate is not None and rate != sample_rate:
        raise ManifestError(f"{path}: audio packed at {rate} Hz, the run is at {sample_rate} Hz "
                            "(stft.sample_rate); pack the data at that rate (python -m "
                            "data.prepare_manifest with the run's config)")
    return data["entries"]


@dataclass
class PackedTable:
    """The packed entries of one manifest, optionally restricted to one split.

    ``files`` lists the distinct HDF5 paths; ``file_index[i]`` points into it.
    """

    keys: np.ndarray  # (E,) bytes: HDF5 keys
    file_index: np.ndarray  # (E,) int16
    files: list[str]
    num_samples: np.ndarray  # (E,) int64, at the manifest's sample rate
    speakers: np.ndarray  # (E,) int32 index into speaker_names, -1 without speaker
    speaker_names: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode()


def load_packed(manifest_dir: str | Path, kind: str, split: str | None,
                sample_rate: int = SAMPLE_RATE) -> PackedTable:
    """Read ``<manifest_dir>/<kind manifest>`` (packed at ``sample_rate``) and keep the packed
    entries of ``split`` (all splits when ``None``)."""
    path = Path(manifest_dir) / MANIFEST_NAMES[kind]
    entries = read_manifest(path, sample_rate)
    if split is not None:
        entries = [e for e in entries if e["split"] == split]
    missing = [e["key"] for e in entries if not e.get("hdf5")]
    if missing:
        raise ManifestError(
            f"{path}: {len(missing)} entries are not packed (e.g. {missing[0]}); "
            "run python -m data.prepare_manifest without --scan-only"
        )
    files = sorted({e["hdf5"] for e in entries})
    file_pos = {f: i for i, f in enumerate(files)}
    speaker_names = sorted({e["speaker"] for e in entries if e.get("speaker")})
    speaker_pos = {s: i for i, s in enumerate(speaker_names)}
    return PackedTable(
        keys=np.array([e["key"].encode() for e in entries], dtype=bytes),
        file_index=np.array([file_pos[e["hdf5"]] for e in entries], dtype=np.int16),
        # HDF5 paths are stored relative to the manifest so that a moved exp/ folder still works.
        files=[str((path.parent / f).resolve()) for f in files],
        num_samples=np.array([e["num_samples"] for e in entries], dtype=np.int64),
        speakers=np.array(
            [speaker_pos[e["speaker"]] if e.get("speaker") else -1 for e in entries],
            dtype=np.int32,
        ),
        speaker_names=speaker_names,
    )
