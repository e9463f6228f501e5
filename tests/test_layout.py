"""The dependency rule of doc/design.md ("Layout and dependency rule"), checked by parsing every
import of the repository: a module imports only the layers its own layer may stand on, so a new
module that breaks the rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("models.hifi_tse", "models.td_speakerbeam", "models.spex_plus", "models.semamba",
            "models.refiner")
MODELS = ("models.layers", "models.discriminators", *FAMILIES, "models.registry")
SCRIPTS = ("train", "evaluate", "inference", "export_onnx")
# What each unit may import besides itself, from the bottom up.
ALLOWED: dict[str, frozenset[str]] = {
    "dsp": frozenset(),
    "losses": frozenset({"dsp"}),
    "models.layers": frozenset({"dsp"}),
    "models.discriminators": frozenset({"dsp"}),
    **{family: frozenset({"models.layers", "dsp"}) for family in FAMILIES},
    "models.registry": frozenset({*FAMILIES, "models.layers", "dsp"}),
    # config builds its model section from the families' argument dataclasses.
    "config": frozenset({*MODELS, "dsp"}),
    "data": frozenset({"config", "dsp"}),
    "extraction": frozenset({*MODELS, "dsp"}),
    "evaluation": frozenset({"extraction", "data", "losses", "config", *MODELS, "dsp"}),
    "training": frozenset({"evaluation", "extraction", "data", "losses", "config", *MODELS,
                           "dsp"}),
}
LIBRARIES = frozenset(ALLOWED)
# The command lines import the libraries, never one another; benchmarks and tests may import
# anything (tests/ also runs the command lines' ``main``).
ALLOWED.update(dict.fromkeys(SCRIPTS, LIBRARIES))
ALLOWED.update({"bench": LIBRARIES | set(SCRIPTS), "tests": LIBRARIES | {*SCRIPTS, "bench"}})
TOP_LEVEL = LIBRARIES | set(SCRIPTS) | {"bench", "tests", "models"}


def unit_of(module: str) -> str | None:
    """The layer unit of a dotted module name; None for a module outside the repository."""
    parts = module.split(".")
    if parts[0] == "models":
        return ".".join(parts[:2]) if len(parts) > 1 else "models"
    return parts[0] if parts[0] in TOP_LEVEL else None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def sources() -> list[Path]:
    skip = {".venv", "exp", ".git"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from models import registry`` imports models.registry
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_every_module_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in sources()} - {"models", None}
    assert units <= set(ALLOWED), f"modules outside the rule: {units - set(ALLOWED)}"


def violations(own: str, path: Path) -> list[str]:
    """The imports of ``path`` (a module of unit ``own``) that the rule forbids."""
    bad = []
    for line, target in imports_of(path):
        unit = unit_of(target)
        if unit is None or unit == own or unit == "models":
            continue
        if unit not in ALLOWED[own]:
            bad.append(f"{path.name}:{line}: {own} imports {target} ({unit})")
    return bad


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_dependency_rule(path: Path) -> None:
    own = unit_of(module_name(path))
    if own not in (None, "models"):
        assert not violations(own, path), "\n".join(violations(own, path))


def test_the_check_catches_a_bad_import(tmp_path: Path) -> None:
    """A family importing another family, a signal layer importing a model, a library importing
    a command line: each is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom models.spex_plus import SpExPlus\n"
                   "from dsp.audio import SAMPLE_RATE\n")
    assert len(violations("models.td_speakerbeam", bad)) == 1
    bad.write_text("def f():\n    from models import registry\n")
    assert len(violations("dsp", bad)) == 1
    bad.write_text("from inference import main\n")
    assert len(violations("evaluation", bad)) == 1
    assert not violations("tests", bad)
