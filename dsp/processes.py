"""Worker processes and stop signals: the main process of a run decides what a signal means."""

import signal

# The signals that ask a run to stop: a scheduler's or torchrun's SIGTERM, Ctrl-C, a closed
# terminal (tmux kill-session).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def ignore_stop_signals() -> None:
    """For a worker process (data loading, metrics): ignore the stop signals. Ctrl-C and a
    scheduler's SIGTERM reach every process of the group; a worker that died of them would turn
    the main process's graceful stop into a crash ("DataLoader worker exited unexpectedly").
    SIGKILL still ends it, and PyTorch's and our pools end their workers with the main one."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
