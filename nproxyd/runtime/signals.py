"""The daemon's signals, in a module of its own so ``nproxyd run`` can set them before it
imports the rest of the daemon (docs/operations.md "Signals")."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Signals an operator or a log rotator may send that must never stop the daemon: each is
# logged (`signal_received`) and otherwise ignored; nproxyd reads its configuration only at
# start (docs/operations.md "Signals").
NOTED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def ignore_noted_signals() -> None:
    """Ignore :data:`NOTED_SIGNALS` outside the daemon's signal task (start-up, shutdown)."""
    if threading.current_thread() is threading.main_thread():
        for signum in NOTED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
