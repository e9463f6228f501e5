"""How a run ends: the exit-code contract, refusals, and graceful stops on a signal.

Exit codes (doc/log_format.md, README "Reliability"):

- 0 (``EXIT_DONE``): finished, or stopped on request (a signal) after writing ``last.pt``;
- 2 (``EXIT_NO_RESTART``): do not restart, it would fail again: a config or usage error
  (argparse uses 2 as well), an incompatible or unreadable checkpoint, the non-finite limit,
  ranks that hold different weights, a full disk;
- anything else (1 for a Python exception, 128 + N for signal N): a crash, safe to restart
  from ``last.pt``.

Under torchrun the launcher's own exit code is 1 for any failed worker, so a refusal also
writes its code to the file named by ``$HIFI_TSE_EXIT_FILE`` when set (run_training.sh sets
it and reads it back).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from dsp.processes import STOP_SIGNALS

EXIT_DONE = 0
EXIT_NO_RESTART = 2
EXIT_FILE_ENV = "HIFI_TSE_EXIT_FILE"
# Copies of one stop request arrive together (the scheduler signals every process of the job,
# torchrun and run_training.sh forward theirs): a second signal counts as a new request, which
# ends the process at once, only this long after the first.
SECOND_SIGNAL_AFTER_S = 1.0


class Refused(SystemExit):
    """``SystemExit`` with ``EXIT_NO_RESTART`` whose text is the one-line ``error: ...``."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_NO_RESTART)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def refuse(message: str) -> NoReturn:
    """Print ``error: message`` and exit with ``EXIT_NO_RESTART`` (``Refused``), recorded in
    the exit file too for a supervisor that cannot see this process's own code (torchrun)."""
    exit_file = os.environ.get(EXIT_FILE_ENV)
    if exit_file:
        # Every rank may write it, all the same content; an append is atomic for one line.
        with open(exit_file, "a") as f:
            f.write(f"{EXIT_NO_RESTART}\n")
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise Refused(message)


class StopRequest:
    """Catches the stop signals in the main process: the first one asks the loop to stop after
    the current optimizer update (``requested``); a second one, at least
    ``SECOND_SIGNAL_AFTER_S`` later, ends the process at once by the signal's default action
    (exit status 128 + N: a crash under the contract, so a supervisor resumes from the last
    checkpoint). ``restore()`` puts the previous handlers back."""

    def __init__(self) -> None:
        self.signum = 0
        self._at = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._at = signum, now
            # A raw write: the handler may interrupt a buffered write to stderr (a log line),
            # which sys.stderr.write would refuse as reentrant; and the terminal may be gone
            # (SIGHUP), which must not raise into the loop.
            with contextlib.suppress(OSError):
                os.write(2, f"{signal.Signals(signum).name}: stopping after this update (a "
                            "second signal ends the run at once)\n".encode())
        elif now - self._at >= SECOND_SIGNAL_AFTER_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def free_space(path: Path) -> str:
    """The free space of the file system holding ``path``, for a disk-full message."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"
