"""SIGTERM handled as Ctrl-C: a job or a sweep that is told to stop ends its runs KILLED, checkpoints kept."""

from __future__ import annotations

import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends KILLED, its checkpoint stays for a resume."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


def handle_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interrupted_exit_code(stop: KeyboardInterrupt) -> int:
    print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
    return 143 if isinstance(stop, Terminated) else 130
