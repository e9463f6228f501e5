"""Worker processes: they end with the process that started them, and leave stop signals to it.

A worker pool's processes outlive a parent killed by SIGKILL (the OOM killer, a supervisor's
chaos test) unless told otherwise: PyTorch's DataLoader workers watch their parent, but spawned
pools (PESQ targets, metric workers, packing decoders) would live on as orphans, each holding
its memory, one set per crash of a multi-day run.
"""

import ctypes
import os
import signal
import threading
import time

# The signals that ask a run to stop: a scheduler's or torchrun's SIGTERM, Ctrl-C, a closed
# terminal (tmux kill-session).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
PARENT_POLL_S = 1.0


def ignore_stop_signals() -> None:
    """For a worker process (data loading, metrics): ignore the stop signals. Ctrl-C and a
    scheduler's SIGTERM reach every process of the group; a worker that died of them would turn
    the main process's graceful stop into a crash ("DataLoader worker exited unexpectedly").
    SIGKILL still ends it, and so does its parent's death (``die_with_parent``)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when the thread that started it dies (with its process,
    or when it is a pool's thread, with the pool); elsewhere a thread polls the parent.

    A parent that died before this ran (a spawned worker imports for a while first) is gone
    already: the process then exits at once, when its parent is no longer ``parent`` (the pid
    of the process that started it, passed by it) or is init.
    """
    def orphaned() -> bool:
        return os.getppid() == 1 or (parent is not None and os.getppid() != parent)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            if orphaned():
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass
    parent = parent or os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_init(parent: int) -> None:
    """Initializer of a training run's worker pool (``initargs=(os.getpid(),)``):
    ``ignore_stop_signals`` and ``die_with_parent``."""
    ignore_stop_signals()
    die_with_parent(parent)
