"""`make demo` end to end on a budget of 20 steps: corpus, packing, training, evaluation on unseen
speakers, inference and the report, run by the real Makefile in a copy of the repository.

The Makefile runs with the interpreter that runs this test (``PY=sys.executable``, nothing
installed), so the test works under the repository's .venv, a conda env or any other one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "exp", "runs", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".ruff_cache")


@pytest.mark.slow
def test_make_demo_runs_the_whole_chain(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=COPY_IGNORE)
    shutil.copy2(REPO / "doc" / "benchmarks.md", repo / "doc" / "benchmarks.md")
    # --no-print-directory: under CI's `make test` this make is nested and would otherwise
    # print "Leaving directory" after the report's JSON line.
    cmd = ["make", "--no-print-directory", "demo", f"PY={sys.executable}", "INSTALL=",
           "DEMO_STEPS=20",
           "DEMO_CORPUS_ARGS=--n-train 10 --n-val 2 --n-test 3 --utts-per-speaker 3",
           "DEMO_EVAL_ARGS=--n-samples 6 --jobs 1", "DEMO_SEL_ARGS=--n-samples 6 --n-pairs 4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (repo / ".venv").exists(), "the demo must not create a venv"

    demo = repo / "exp" / "demo"
    corpus = json.loads((demo / "corpus" / "corpus.json").read_text())
    train_spk = {p.name for p in (demo / "corpus" / "speech").iterdir()}
    test_spk = {p.name for p in (demo / "corpus" / "test_speech").iterdir()}
    assert len(train_spk) == 12
    assert len(test_spk) == 3
    assert not train_spk & test_spk, "test speakers are unseen"
    assert len(corpus["voices"]) == 15

    assert (demo / "run" / "best.pt").is_file()
    assert "training finished step=20 " in (demo / "run" / "train.log").read_text()
    summary = json.loads((demo / "eval" / "summary.json").read_text())
    assert summary["n_samples"] == 6
    assert np.isfinite(summary["metrics"]["si_sdri"]["mean"])
    out, sr = sf.read(demo / "extracted.wav")
    mix, mix_sr = sf.read(demo / "eval" / "examples" / "median_mix.wav")
    assert sr == mix_sr == 48_000
    assert len(out) == len(mix)
    last = result.stdout.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "demo_synthetic_20steps"  # not the default section
    doc = (repo / "doc" / "benchmarks.md").read_text()
    assert "demo_synthetic_20steps:start" in doc
    swap = doc.split("<!-- selection_synthetic_20steps:start -->")[1].split("<!-- ")[0]
    assert "selection accuracy % [95 % CI]" in swap
    assert "with another speaker's" in swap

    # Another family on the same corpus (ARCH): its own run and evaluation, and one table of
    # the families at this budget.
    result = subprocess.run([*cmd, "ARCH=spex_plus"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (demo / "run_spex_plus" / "best.pt").is_file()
    assert (demo / "run" / "best.pt").is_file(), "the hifi_tse run is kept"
    last = result.stdout.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "demo_synthetic_spex_plus_20steps"
    doc = (repo / "doc" / "benchmarks.md").read_text()
    families = doc.split("<!-- demo_families_synthetic_20steps:start -->")[1].split("<!-- ")[0]
    rows = [line for line in families.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| hifi_tse", "| spex_plus"], families
