"""train.py under faults (issue 28): the exit-code contract, graceful stops on signals (alone, to
a process group, under torchrun), kill -9 under run_training.sh, a killed DDP rank, a full disk,
non-finite losses, refused resumes that overwrite nothing, and the time budget over restarts.
The supervisor's own logic: tests/test_supervisor.py; corrupt HDF5 entries: tests/test_pack.py."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from bench.bench_chaos import child_pid, compare, run_chaos, trainer_pid
from tests.packed_data import packed_subset
from tests.test_train import log_lines, write_config
from training.stopping import EXIT_NO_RESTART

REPO = Path(__file__).resolve().parents[1]
SUPERVISOR = REPO / "run_training.sh"
# Every restart-sensitive feature at once: a data worker, accumulation 2, target-absent items
# (phase 2 from step 2), the EMA and the GAN phase with its discriminator warm-up (MetricGAN:
# small, and its PESQ worker process must ignore the stop signals too).
ALL_ON = {"optim": {"grad_accum": 2},
          "train": {"phase2_step": 2, "noisy_ref_ramp": [2, 6], "log_every": 2,
                    "deterministic": True},
          "gan": {"enabled": True, "kind": "metric", "pesq_workers": 1, "start_step": 4,
                  "d_warmup_steps": 2, "ramp_steps": 2}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict:
    d = packed_subset(tmp_path_factory, shared_data)
    return {"manifest_dir": d.manifest_dir, "segment_seconds": 0.5, "ref_seconds": 0.5,
            "n_val_samples": 4, "num_workers": 1, "val_fraction": d.val_fraction}


def merged(*settings: dict) -> dict:
    out: dict = {}
    for s in settings:
        for name, values in s.items():
            out.setdefault(name, {}).update(values)
    return out


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "PYTHON": sys.executable}


def wait_for(predicate, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ckpt(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / name, weights_only=True)


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash and modification time."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            + f"@{p.stat().st_mtime_ns}" for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The exit-code contract
# ---------------------------------------------------------------------------------------------


def test_config_and_usage_errors_exit_do_not_restart(tmp_path: Path, capsys) -> None:
    tiny = str(REPO / "configs" / "tiny.yaml")
    for argv in (["--config", tiny, "--set", "train.totl_steps=1"],  # config error
                 ["--config", tiny, "--resum", "x.pt"],  # usage error (argparse)
                 ["--config", tiny, "--resume", str(tmp_path / "missing.pt")]):
        with pytest.raises(SystemExit) as err:
            train.main(argv)
        assert err.value.code == EXIT_NO_RESTART, argv
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_a_crash_exits_1_and_logs_its_traceback(tmp_path: Path, data: dict) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**data, "num_workers": 0},
                       train={"total_steps": 4})
    boom = ("import sys, train\n"
            "def micro_step(*a, **k): raise ZeroDivisionError('injected')\n"
            "train.micro_step = micro_step\n"
            f"sys.argv = ['train.py', '--config', {str(cfg)!r}]\n"
            "train.cli()\n")
    result = subprocess.run([sys.executable, "-c", boom], env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1  # neither 0 (done) nor 2 (do not restart): restart it
    text = (tmp_path / "run" / "train.log").read_text()
    assert "ERROR crashed" in text
    assert "ZeroDivisionError: injected" in text


# ---------------------------------------------------------------------------------------------
# Graceful stops
# ---------------------------------------------------------------------------------------------


def test_stop_request_counts_copies_once_and_a_second_signal_ends_the_process() -> None:
    script = ("import os, signal, sys, time\n"
              "from training.stopping import StopRequest\n"
              "stop = StopRequest()\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "os.kill(os.getpid(), signal.SIGINT)  # a copy: the group and a supervisor\n"
              "print('requested', stop.requested, stop.name, flush=True)\n"
              "time.sleep(1.2)\n"
              "os.kill(os.getpid(), signal.SIGTERM)  # a second request\n"
              "time.sleep(5)\n"
              "print('still alive', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.splitlines() == ["requested True SIGTERM"]
    assert result.returncode == -signal.SIGTERM  # killed by it: a crash, safe to restart


@pytest.mark.slow
def test_sigterm_mid_accumulation_finishes_the_update_and_resumes_exactly(
    tmp_path: Path, data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = merged(ALL_ON, {"train": {"total_steps": 10, "ckpt_every": 4, "val_every": 8}})
    straight = write_config(tmp_path / "a" / "c.yaml", data, **settings)
    train.main(["--config", str(straight)])

    stopped = write_config(tmp_path / "b" / "c.yaml", data, **settings)
    original = train.micro_step

    def micro_step(*args, step: int, **kwargs) -> None:
        if step == 6:  # the first micro-step of the update that ends at step 8
            os.kill(os.getpid(), signal.SIGTERM)
        original(*args, step=step, **kwargs)

    monkeypatch.setattr(train, "micro_step", micro_step)
    train.main(["--config", str(stopped)])  # returns: exit status 0
    run = tmp_path / "b" / "run"
    assert "stopped step=8 reason=signal signal=SIGTERM" in (run / "train.log").read_text()
    assert ckpt(run)["step"] == 8  # the update finished, then last.pt
    monkeypatch.setattr(train, "micro_step", original)
    train.main(["--config", str(stopped)])
    equal, worst = compare(ckpt(tmp_path / "a" / "run"), ckpt(run))
    assert equal, f"resumed run differs from the uninterrupted one by up to {worst}"


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_gracefully(tmp_path: Path, data: dict) -> None:
    # Ctrl-C reaches every process of the group: the data worker must ignore it.
    cfg = write_config(tmp_path / "c.yaml", data,
                       **merged(ALL_ON, {"train": {"total_steps": 400, "ckpt_every": 400}}))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg)],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    run = tmp_path / "run"
    wait_for(lambda: len(log_lines(run)) >= 2 if (run / "train.log").exists() else False,
             what="two step lines")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    stderr = proc.stderr.read()
    assert "DataLoader worker" not in stderr, stderr
    text = (run / "train.log").read_text()
    assert "reason=signal signal=SIGINT" in text
    stop_step = int(text.split("stopped step=")[1].split()[0])
    assert stop_step % 2 == 0
    assert ckpt(run)["step"] == stop_step < 400


def torchrun(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", *extra, str(REPO / "train.py"), "--config", str(cfg)]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (from its environment)."""
    return child_pid(launcher, env=f"RANK={rank}")


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_update(
    tmp_path: Path, data: dict
) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**data, "num_workers": 0},
                       **merged(ALL_ON, {"train": {"total_steps": 400, "ckpt_every": 400}}))
    proc = subprocess.Popen(torchrun(cfg), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = tmp_path / "run"
    try:
        wait_for(lambda: len(log_lines(run)) >= 2 if (run / "train.log").exists() else False,
                 what="two step lines")
        os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only; rank 0 learns it
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (run / "train.log").read_text()
    step = int(text.split("stopped step=")[1].split()[0])
    assert f"stopped step={step} reason=signal signal=on_another_rank" in text
    assert f"ranks step={step} world=2 in_sync=1" in text
    assert ckpt(run)["step"] == step < 400


# ---------------------------------------------------------------------------------------------
# Kills, under run_training.sh
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_five_kills_under_the_supervisor_end_bit_exact(tmp_path: Path, data: dict) -> None:
    result = run_chaos(tmp_path, data, total_steps=30, kills=5, seed=0, timeout_s=900)
    assert result["kills_landed"] == 5, result
    assert result["restarts"] == 5, result
    assert result["supervisor_exit"] == 0, result
    assert result["steps_missing"] == 0
    assert result["final_equal"], result
    assert result["orphan_processes"] == 0  # no worker of a killed run lives on


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_supervisor_restarts_it(
    tmp_path: Path, data: dict
) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**data, "num_workers": 0},
                       **merged(ALL_ON, {"train": {"total_steps": 24, "ckpt_every": 4,
                                                   "val_every": 1000}}))
    sup = subprocess.Popen(["bash", str(SUPERVISOR), "--backoff", "0", "--torchrun",
                            "--nproc_per_node 2 --standalone", "--", "--config", str(cfg)],
                           env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    run = tmp_path / "run"
    log = run / "train.log"
    try:
        wait_for(lambda: log.exists() and "saved step=8" in log.read_text(),
                 what="the checkpoint of step 8")
        launcher = trainer_pid(sup.pid)
        victim = rank_pid(launcher, 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # torchrun sees the dead rank within its monitor interval and ends the other one
        # (SIGTERM, then SIGKILL after --shutdown_timeout, 30 s): it must not hang.
        wait_for(lambda: "restart n=1" in log.read_text(), timeout=60, what="the restart")
        gone_after = time.monotonic() - killed_at
        assert sup.wait(timeout=600) == 0, sup.stderr.read()[-3000:]
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
    assert gone_after < 40
    text = log.read_text()
    after = text.split("restart n=1")[1]
    assert "resumed step=" in after
    assert "ranks step=24 world=2 in_sync=1" in after
    assert text.count("restart n=") == 1
    assert ckpt(run)["step"] == 24


# ---------------------------------------------------------------------------------------------
# A full disk, non-finite losses, refused resumes, the time budget
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("failing_write", [3, 4])  # step_000000008.pt, then last.pt
def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(
    tmp_path: Path, data: dict, monkeypatch: pytest.MonkeyPatch, capsys, failing_write: int
) -> None:
    cfg = write_config(tmp_path / "c.yaml", {**data, "num_workers": 0},
                       train={"total_steps": 12, "ckpt_every": 4})
    real_save, calls = torch.save, []

    def save(obj, f) -> None:
        calls.append(f)
        if len(calls) == failing_write:
            f.write(b"\0" * 4096)  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(cfg)])
    monkeypatch.setattr(torch, "save", real_save)
    assert err.value.code == EXIT_NO_RESTART
    message = capsys.readouterr().err.strip().splitlines()[-1]
    name = "step_000000008.pt" if failing_write == 3 else "last.pt"
    assert message.startswith(f"error: {tmp_path / 'run' / name}: no space left on device")
    assert "MiB free" in message
    run = tmp_path / "run"
    assert ckpt(run)["step"] == 4  # the previous last.pt, whole
    assert not list(run.glob(".*.tmp"))
    assert "reason=disk_full" in (run / "train.log").read_text()


@pytest.mark.slow
def test_nonfinite_losses_on_chosen_steps_never_reach_the_weights(
    tmp_path: Path, data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"optim": {"grad_accum": 2}, "train": {"total_steps": 12, "ckpt_every": 2,
                                                        "val_every": 6, "log_every": 2,
                                                        "keep_checkpoints": 10}}
    cfg = write_config(tmp_path / "c.yaml", {**data, "num_workers": 0}, **settings)
    original, calls = train.weighted_sum, []

    def weighted_sum(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        loss = original(*args, **kwargs)
        # micro-steps 3 and 8 (1-based): the updates ending at steps 4 and 8
        return loss * float("nan") if len(calls) in (3, 8) else loss

    monkeypatch.setattr(train, "weighted_sum", weighted_sum)
    train.main(["--config", str(cfg)])
    run = tmp_path / "run"
    text = (run / "train.log").read_text()
    assert "nonfinite step=4 count=1 in_a_row=1" in text
    assert "nonfinite step=8 count=2 in_a_row=1" in text
    paths = sorted(run.glob("*.pt"))
    assert len(paths) >= 7  # every step_*.pt kept, last.pt, best.pt
    for path in paths:
        state = torch.load(path, weights_only=True)
        tensors = [*state["generator"].values(), *state["ema"].values(),
                   *(v for s in state["opt_g"]["state"].values() for v in s.values()
                     if torch.is_tensor(v))]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), path
    assert ckpt(run)["nonfinite_total"] == 2


@pytest.mark.slow
def test_a_resume_from_another_family_or_config_is_refused_and_overwrites_nothing(
    tmp_path: Path, data: dict, capsys
) -> None:
    data = {**data, "num_workers": 0}
    short = {"train": {"total_steps": 2, "ckpt_every": 2}}
    other = write_config(tmp_path / "a" / "c.yaml", data, "td_speakerbeam_tiny.yaml", **short)
    train.main(["--config", str(other)])
    ours = write_config(tmp_path / "b" / "c.yaml", data, **short)
    train.main(["--config", str(ours)])
    run = tmp_path / "b" / "run"
    before = files_of(run)

    # Another family through --resume ...
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(ours), "--resume", str(tmp_path / "a" / "run" / "last.pt")])
    assert err.value.code == EXIT_NO_RESTART
    message = capsys.readouterr().err
    assert "it holds a td_speakerbeam model, the config builds hifi_tse" in message
    # ... and the same family with another model section, from the run's own last.pt.
    changed = write_config(tmp_path / "b" / "c.yaml", data, model={"feature_dim": 8}, **short)
    with pytest.raises(SystemExit) as err:
        train.main(["--config", str(changed)])
    assert err.value.code == EXIT_NO_RESTART
    assert "model.feature_dim: checkpoint 16, config 8" in capsys.readouterr().err
    assert files_of(run) == before  # config.yaml, train.log, checkpoints, TensorBoard


@pytest.mark.slow
def test_the_time_budget_spans_restarts(tmp_path: Path, data: dict) -> None:
    data = {**data, "num_workers": 0}
    first = write_config(tmp_path / "c.yaml", data, train={"total_steps": 4, "ckpt_every": 4})
    train.main(["--config", str(first)])
    used = ckpt(tmp_path / "run")["train_seconds"]
    assert used > 0
    # A budget smaller than what the first process used: the resumed run stops after one
    # update (the budget is checked there), although it has just started.
    budget = used / 60 / 2
    again = write_config(tmp_path / "c.yaml", data,
                         train={"total_steps": 100, "ckpt_every": 4, "max_minutes": budget})
    train.main(["--config", str(again)])
    state = ckpt(tmp_path / "run")
    assert state["step"] == 5
    assert state["train_seconds"] > used
    assert "training finished step=5" in (tmp_path / "run" / "train.log").read_text()
