"""Progress reports from long work, to whoever listens: the one callback shape every layer uses.

Long work (a batch's training, PCA passes, inversion, weight-diffusion training) calls
``report(done, total, *extra, bar=...)``, or a ``progress`` callback of the same shape that its caller
passed. Who listens is the caller's choice: the CLI installs its terminal bar with ``listening(sink)``,
a flow its progress artifact. Nothing here draws anything, so storage, tasks and flows never import the
CLI. With no listener, ``report`` is a no-op (a worker, a test, output that is not a terminal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MAIN = "main"  # the bar that ``report`` moves unless told otherwise
COMMITTED = "committed"  # build: committed of all manifest ids

# ``sink(bar, done, total, extra)``
Sink = Callable[[str, int, int, tuple[Any, ...]], None]
Progress = Callable[..., None]  # ``progress(done, total, *extra)``

_sink: Sink | None = None  # process-wide: reports come from Prefect's worker threads too


def report(done: int, total: int, *extra: Any, bar: str = MAIN) -> None:
    """Tell the process's listener that ``bar`` is at ``done`` of ``total`` (``extra``: e.g. the loss)."""
    sink = _sink
    if sink is not None:
        sink(bar, int(done), int(total), extra)


@contextmanager
def listening(sink: Sink) -> Iterator[None]:
    """Make ``sink`` the process's listener for the block (the previous one returns after it)."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous
