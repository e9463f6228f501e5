"""Checkpoints written by an earlier layout of the code still load and give the same output.

tests/fixtures/checkpoints/ holds one tiny checkpoint per family, written before the layout
change of issue 26 by its make_fixtures.py, with a fixed input and the output it gave then.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.registry import FAMILIES, load_model, read_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = sorted(p.stem for p in FIXTURES.glob("*.pt"))


def test_every_family_has_a_fixture() -> None:
    assert set(NAMES) == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_old_checkpoint_loads_and_gives_the_same_output(name: str) -> None:
    path = FIXTURES / f"{name}.pt"
    fixture = read_checkpoint(path)["fixture"]
    model = load_model(path).eval()
    with torch.no_grad():
        out = model(fixture["mix"], fixture["ref"])
    expected = fixture["out"]
    assert out.shape == expected.shape
    # Same weights and the same arithmetic: equal to float32 rounding of the summation order.
    tol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
