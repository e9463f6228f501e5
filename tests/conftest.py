"""Shared fixtures: the real recordings in ../shared/data and small configs for CPU tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test (as in the evaluation's metric workers): the cores are
    shared, and two threads of a small network fighting other processes run many times slower
    than one. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real speech, noise, RIRs). Skips when absent, unless CI demands it."""
    if not (SHARED_DATA / "speech").is_dir():
        reason = f"real recordings not found at {SHARED_DATA} (see ../shared/data/README.md)"
        if os.environ.get("HIFI_TSE_REQUIRE_DATA"):
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED_DATA
