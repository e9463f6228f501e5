"""A small subset of ../shared/data (real speech, noise and RIRs) as a packable corpus: the
tests pack it once per session (tests/packed_data.py), bench/bench_chaos.py trains on it.

The subset links the first ``FILES_PER_ACTOR`` RAVDESS files of every actor (16 speakers, 4 of
them held out for validation), all four 16 kHz noises and all nine 44.1 kHz stereo RIRs, so
resampling and downmixing are exercised while packing stays around a second or two.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FILES_PER_ACTOR = 8
VAL_FRACTION = 0.25  # 16 actors -> 4 validation speakers: enough for 3 interferers


def link_subset(shared: Path, dest: Path, files_per_actor: int = FILES_PER_ACTOR) -> Path:
    """Symlink a subset of ``shared`` into ``dest/{speech/ravdess,noise,rir}``; returns dest."""
    for actor in sorted((shared / "speech" / "ravdess").iterdir()):
        folder = dest / "speech" / "ravdess" / actor.name
        folder.mkdir(parents=True)
        for f in sorted(actor.glob("*.flac"))[:files_per_actor]:
            (folder / f.name).symlink_to(f)
    for kind in ("noise", "rir"):
        (dest / kind).mkdir()
        for f in sorted((shared / kind).iterdir()):
            (dest / kind / f.name).symlink_to(f)
    return dest


def write_config(root: Path, data: Path, **extra: object) -> Path:
    """A YAML config whose data section packs ``data`` into ``root/{manifests,hdf5}``."""
    cfg = {
        "data": {
            "speech_sources": [{"layout": "generic", "root": str(data / "speech" / "ravdess"),
                                "name": "ravdess"}],
            "noise_dirs": [str(data / "noise")],
            "rir_dirs": [str(data / "rir")],
            "manifest_dir": str(root / "manifests"),
            "hdf5_dir": str(root / "hdf5"),
            "pack_workers": 2,
            "val_fraction": VAL_FRACTION,
            **extra,
        }
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
