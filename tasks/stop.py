"""A stop request for long work running in other threads: the signal a command received, seen by every loop.

Python raises KeyboardInterrupt (or the CLI's SIGTERM equivalent) in the main thread only, while Prefect runs
a build's batches in worker threads: a batch went on training, and its retries went on calling an API that
the interrupt had stopped, for minutes after Ctrl-C. The CLI's signal handlers call ``request`` and long
loops (the batch driver's steps, between rows) call ``check``, which raises ``Stopped`` there within one step.
A batch stopped so commits nothing: its rows stay pending (the shard is written only after training).
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_signum: list[int] = []


class Stopped(KeyboardInterrupt):
    """Raised in a worker thread when the command was told to stop; a KeyboardInterrupt, so nothing retries it."""


def request(signum: int = signal.SIGINT) -> None:
    """Ask every loop of this process to stop (from a signal handler: sets a flag, nothing more)."""
    if not _requested.is_set():
        _signum.append(signum)
        _requested.set()


def requested() -> int | None:
    """The signal a stop was requested with, or None."""
    return _signum[0] if _requested.is_set() and _signum else None


def check() -> None:
    """Raise ``Stopped`` if a stop was requested (call it between units of work)."""
    if _requested.is_set():
        raise Stopped(f"stopped by {signal.Signals(_signum[0]).name}" if _signum else "stopped")


def reset() -> None:
    """Forget a request (``main`` called again in the same process: tests)."""
    _requested.clear()
    _signum.clear()
