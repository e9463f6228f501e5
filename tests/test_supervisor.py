"""run_training.sh against a stand-in for train.py that exits as a plan says: restarts after
crashes only, exponential backoff, giving up on a crash loop, counting only crashes since the
newest checkpoint, --resume/--init on the first start only, the exit file under torchrun, and
signals passed on without a restart. train.py itself under the supervisor:
tests/test_reliability.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUPERVISOR = REPO / "run_training.sh"

# Start n does what plan[n] says: {"exit": code, "checkpoint": step (write last.pt and
# step_N.pt first), "refuse_file": write the exit file, "wait_signal": wait for SIGTERM}.
STAND_IN = r'''
import json, os, pathlib, signal, sys, time
args = sys.argv[1:]
run = pathlib.Path(os.environ["FAKE_RUN_DIR"])
if "--print-run-dir" in args:
    if os.environ.get("FAKE_BAD_CONFIG"):
        sys.stderr.write("error: unknown config key 'train.totl_steps'\n")
        sys.exit(2)
    print(run)
    sys.exit(0)
root = run.parent
starts = root / "starts.jsonl"
n = len(starts.read_text().splitlines()) if starts.exists() else 0
with open(starts, "a") as f:
    f.write(json.dumps(args) + "\n")
step = json.loads((root / "plan.json").read_text())[n]
if step.get("checkpoint"):
    run.mkdir(exist_ok=True)
    (run / "tmp").write_text(str(n))
    os.replace(run / "tmp", run / "last.pt")
    (run / f"step_{step['checkpoint']:09d}.pt").write_text("")
if step.get("refuse_file"):
    with open(os.environ["HIFI_TSE_EXIT_FILE"], "a") as f:
        f.write("2\n")
if step.get("wait_signal"):
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    (root / "ready").write_text("")
    while not got:
        time.sleep(0.01)
    (root / "got_signal").write_text(str(got[0]))
sys.exit(step["exit"])
'''

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def supervise(tmp_path: Path, plan: list[dict], *options: str, train_args: tuple = (),
              wait: bool = True, env: dict | None = None) -> subprocess.Popen:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    stand_in = tmp_path / "train_stand_in.py"
    stand_in.write_text(STAND_IN)
    env = {**os.environ, "FAKE_RUN_DIR": str(tmp_path / "run"), "HIFI_TSE_TRAIN_PY":
           str(stand_in), "PYTHON": sys.executable, **(env or {})}
    args = train_args or ("--config", "c.yaml")
    proc = subprocess.Popen(["bash", str(SUPERVISOR), "--backoff", "0", *options, "--", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=60)
    return proc


def starts(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "run" / "train.log").read_text()


def test_restarts_after_crashes_and_stops_when_finished(tmp_path: Path) -> None:
    proc = supervise(tmp_path, [{"exit": 1}, {"exit": 137, "checkpoint": 8}, {"exit": 0}])
    assert proc.returncode == 0, proc.stderr.read()
    assert len(starts(tmp_path)) == 3
    text = log_text(tmp_path)
    # Lines in train.py's format: time, level, event (doc/log_format.md).
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING restart n=1 after exit=1 "
                     r"last_step=none wait_s=0$", text, re.M), text
    assert "WARNING restart n=2 after exit=137 last_step=8 wait_s=0" in text
    assert "INFO supervisor stop reason=finished exit=0 last_step=8" in text


def test_backoff_doubles_up_to_its_cap(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = supervise(tmp_path, [{"exit": 1}] * 4 + [{"exit": 0}], "--backoff", "0.2",
                     "--max-backoff", "0.5", "--max-crashes", "9")
    assert proc.returncode == 0
    waits = re.findall(r"restart n=\d after exit=1 last_step=none wait_s=(\S+)",
                       log_text(tmp_path))
    assert [float(w) for w in waits] == [0.2, 0.4, 0.5, 0.5]
    assert time.monotonic() - start >= 1.6  # the waits happened


def test_gives_up_after_n_crashes_without_a_new_checkpoint(tmp_path: Path) -> None:
    proc = supervise(tmp_path, [{"exit": 137}] * 5, "--max-crashes", "3", "--window-min", "5")
    assert proc.returncode == 137
    assert len(starts(tmp_path)) == 3
    text = log_text(tmp_path)
    assert text.count("restart n=") == 2
    assert ("ERROR supervisor stop reason=crash_loop crashes=3 window_min=5 exit=137 "
            "last_step=none") in text


def test_a_new_checkpoint_resets_the_crash_count(tmp_path: Path) -> None:
    plan = [{"exit": 1, "checkpoint": 4 * (i + 1)} for i in range(4)] + [{"exit": 0}]
    proc = supervise(tmp_path, plan, "--max-crashes", "2")
    assert proc.returncode == 0, log_text(tmp_path)
    assert len(starts(tmp_path)) == 5
    assert "crash_loop" not in log_text(tmp_path)


@pytest.mark.parametrize("refusal", [{"exit": 2}, {"exit": 1, "refuse_file": True}])
def test_do_not_restart(tmp_path: Path, refusal: dict) -> None:
    # exit 2 from train.py, or (under torchrun, which exits 1) the exit file it wrote
    proc = supervise(tmp_path, [refusal, {"exit": 0}])
    assert proc.returncode == 2
    assert len(starts(tmp_path)) == 1
    assert "ERROR supervisor stop reason=do_not_restart" in log_text(tmp_path)


def test_a_config_error_stops_before_any_start(tmp_path: Path) -> None:
    proc = supervise(tmp_path, [{"exit": 0}], env={"FAKE_BAD_CONFIG": "1"})
    assert proc.returncode == 2
    assert "train.totl_steps" in proc.stderr.read()
    assert starts(tmp_path) == []


def test_resume_and_init_only_until_the_run_writes_a_checkpoint(tmp_path: Path) -> None:
    # A last.pt from before the supervisor started is not this run's: keep --resume.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("old")
    first = ("--config", "c.yaml", "--resume", "other/last.pt", "--init=x.pt", "--set", "a=b")
    plan = [{"exit": 1}, {"exit": 1, "checkpoint": 4}, {"exit": 0}]
    proc = supervise(tmp_path, plan, train_args=first)
    assert proc.returncode == 0
    assert starts(tmp_path) == [list(first), list(first), ["--config", "c.yaml", "--set", "a=b"]]


def test_a_signal_is_passed_on_and_nothing_restarts(tmp_path: Path) -> None:
    proc = supervise(tmp_path, [{"exit": 0, "wait_signal": True}, {"exit": 0}], wait=False)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "got_signal").read_text() == str(int(signal.SIGTERM))
    assert len(starts(tmp_path)) == 1
    assert "INFO supervisor stop reason=signal exit=0" in log_text(tmp_path)


def test_bad_options_are_refused(tmp_path: Path) -> None:
    for options in (("--max-crashes", "0"), ("--backoff", "soon")):
        proc = supervise(tmp_path, [{"exit": 0}], *options)
        assert proc.returncode == 2
        assert "run_training.sh:" in proc.stderr.read()
    assert starts(tmp_path) == []
