"""A packed subset of ../shared/data (bench/shared_subset.py) for the packing and dataset tests,
built once per session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bench.shared_subset import FILES_PER_ACTOR, VAL_FRACTION, link_subset, write_config
from config import DataConfig, load_config

__all__ = ["FILES_PER_ACTOR", "VAL_FRACTION", "items_around_corrupt", "link_subset",
           "packed_subset", "write_config"]

_BUILT: dict[Path, Path] = {}


def packed_subset(factory: pytest.TempPathFactory, shared: Path) -> DataConfig:
    """The data config of the session's packed subset (packed on first use)."""
    if shared not in _BUILT:
        from data.prepare_manifest import prepare

        root = factory.mktemp("packed")
        data = link_subset(shared, root / "data")
        config = write_config(root, data)
        prepare(load_config(config).data, show_progress=False)
        _BUILT[shared] = config
    return load_config(_BUILT[shared]).data


def items_around_corrupt(packed: DataConfig, manifests: Path, bad_keys: set[str], n: int,
                         caplog: pytest.LogCaptureFixture) -> list[dict]:
    """``n`` training items of the packed data at ``manifests``, whose ``bad_keys`` entries were
    damaged: checks that corrupt entries were met and counted in the items' ``n_corrupt``, and
    that no item uses a damaged entry. The log is left in ``caplog``."""
    from data.dataset import HiFiTSEDataset, dataset_kwargs

    ds = HiFiTSEDataset(**{**dataset_kwargs(packed, "train"), "manifest_dir": manifests})
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        items = [ds[i] for i in range(n)]
    assert ds.n_corrupt > 0
    assert sum(s["n_corrupt"] for s in items) == ds.n_corrupt
    for s in items:
        used = {s["target_utt"], s["ref_utt"], *s["interferer_utts"].split("|")}
        assert not used & bad_keys
    return items
