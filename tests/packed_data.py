"""A packed subset of ../shared/data (bench/shared_subset.py) for the packing and dataset tests,
built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.shared_subset import FILES_PER_ACTOR, VAL_FRACTION, link_subset, write_config
from config import DataConfig, load_config

__all__ = ["FILES_PER_ACTOR", "VAL_FRACTION", "link_subset", "packed_subset", "write_config"]

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
