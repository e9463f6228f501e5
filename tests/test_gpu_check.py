"""bench/gpu_check.py: its CPU variant end to end (every item passes, the JSON line says so), and
the pieces the CUDA run depends on that the CPU run cannot reach: the checks on train.log lines,
the one-line failure messages and the no-CUDA exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Proc, build_generator, nonfinite_terms
from config import load_config
from models.registry import build_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # 50-65 s alone on 2 cores; the budget inside the script is 600 s


@pytest.mark.parametrize("flag", [True, False])
def test_build_generator_sets_checkpointing_and_returns_rebuildable_args(flag: bool) -> None:
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    model, kwargs = build_generator(cfg, grad_checkpoint=flag)
    assert model.grad_checkpoint is flag
    rebuilt = build_model(kwargs)  # what a checkpoint's model_args must allow
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_nonfinite_terms_checks_losses_only() -> None:
    ok = {"step": "1", "loss": "3.2", "si_sdr": "-1.5", "adv": "2", "grad_norm": "inf",
          "lr": "0.001", "step_time": "0.1"}
    assert nonfinite_terms([ok]) == []  # a skipped fp16 update has an inf gradient norm
    assert nonfinite_terms([ok, {**ok, "step": "2", "disc": "nan"}]) == ["step=2 disc=nan"]
    assert nonfinite_terms([{**ok, "snr": "-inf"}]) == ["step=1 snr=-inf"]
    missing = {k: v for k, v in ok.items() if k != "loss"}
    assert nonfinite_terms([missing]) == ["step=1 loss missing"]


def test_failure_names_the_cause() -> None:
    torchrun = (
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]:   File \"train.py\", line 9, in <module>\n"
        "[rank1]: KeyError: 'adv'\n"
        "E1201 elastic_launch failed\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "train.py FAILED\n"
    )
    assert Proc(1, "", torchrun, 3.0, 60.0).failure() == "exit 1: KeyError: 'adv'"
    assert Proc(None, "", "", 60.0, 60.0).failure() == "timed out after 60 s"
    assert "budget" in Proc(None, "", "", 0.0, None).failure()
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n"
    assert Proc(1, "", oom, 1.0, 9.0).failure().startswith("exit 1: torch.OutOfMemoryError")


def test_without_cuda_there_is_nothing_to_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "no CUDA device: nothing to check"
    assert json.loads(lines[-1])["cuda"] is False


@pytest.mark.slow
def test_cpu_variant_passes(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--log-dir",
           str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                            check=False)
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    table = "\n".join(lines[:-1])
    assert result.returncode == 0, f"{table}\n(child outputs in {tmp_path})"
    assert report["passed"] is True
    assert report["cuda"] is False
    results = {key: item["result"] for key, item in report["items"].items()}
    assert results.pop("f_no_sync") == "skipped", "the sync check needs CUDA"
    assert set(results.values()) == {"pass"}, results
    assert len(results) == 7  # (a), (b), corpus, (c) x 2, (d), (e)
    assert report["items"]["e_inference"]["rtf"] > 0
