"""Terminal progress bars for long commands, fed by the same callbacks that feed Prefect's progress artifacts.

A command opens ``terminal_progress(Bar(...), ...)``: a rich progress display on stderr while the command
runs, installed as the process-wide *current terminal progress*. Code deep inside a run reports to it with
``report(done, total, *extra, bar=...)``: the fine-tune engine through ``flows.common.ThrottledProgress``
(so a flow run in this process, the default local executor or ``--no-prefect``, moves the bar), the
PCA passes, inversion and weight-diffusion training directly. ``report`` is a no-op when no bar is
installed: on a worker, in a test, or when the output is not a terminal.

The bar is shown only when both stdout and stderr are terminals: output piped into a file or another
program (``--json | jq``) carries no control sequences. rich is imported only when a bar is shown.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from weightzoo.tasks.progress import MAIN, listening


@dataclass(frozen=True)
class Bar:
    """One line of the display; ``report(..., bar=name)`` moves it."""

    description: str
    unit: str = "steps"
    name: str = MAIN
    loss: bool = False  # show the first extra value of a report as the loss
    steps_per_item: int = 0  # > 0: also show the items of the run (total // steps_per_item) and their steps

    def info(self, done: int, total: int, extra: Sequence[Any]) -> str:
        """The text after the counter: unit, items, loss."""
        parts = [self.unit]
        if self.steps_per_item > 0:  # packed items train side by side: say how many, not which
            parts.append(f"· {total // self.steps_per_item} items × {self.steps_per_item} steps")
        if self.loss and extra and isinstance(extra[0], int | float):
            parts.append(f"· loss {float(extra[0]):.4g}")
        return " ".join(parts)


class TerminalProgress:
    """A rich ``Progress`` with one task per bar; safe to update from any thread (rich locks each update)."""

    def __init__(self, bars: Sequence[Bar], stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        adopt = self.adopt_log_handlers

        class _Progress(Progress):
            def get_renderables(self):  # every frame (10 a second), so a handler made meanwhile is soon adopted
                adopt()
                yield from super().get_renderables()

        self.stream = stream
        self._adopted: dict[logging.Handler, Any] = {}
        self.progress = _Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=stream), redirect_stdout=True, redirect_stderr=True,  # prints go above the bar
        )
        self.bars = {b.name: b for b in bars}
        self.tasks = {b.name: self.progress.add_task(b.description, total=None, info=b.unit) for b in bars}

    def update(self, bar: str, done: int, total: int, extra: Sequence[Any]) -> None:
        if bar not in self.tasks:
            return
        task = self.tasks[bar]
        if done < self.progress.tasks[task].completed:  # a new run on the same bar (build: the next batch)
            self.progress.reset(task)
        self.progress.update(task, completed=done, total=total, info=self.bars[bar].info(done, total, extra))

    def adopt_log_handlers(self) -> None:
        """Make log handlers that print through their own rich console to this terminal (Prefect's, which
        it may create only when the first flow starts) print through the bar's console instead, so their
        lines go above the bar rather than into it."""
        ours = getattr(getattr(self, "progress", None), "console", None)  # None while the Progress is made
        if ours is None:
            return
        for handler in _handlers():
            console = getattr(handler, "console", None)
            if console is not ours and hasattr(console, "print") and getattr(console, "file", None) is self.stream:
                self._adopted.setdefault(handler, console)
                handler.console = ours  # type: ignore[attr-defined]

    def release_log_handlers(self) -> None:
        for handler, console in self._adopted.items():
            handler.console = console  # type: ignore[attr-defined]
        self._adopted.clear()


def _handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *list(logging.Logger.manager.loggerDict.values())]
    return [h for lg in loggers if isinstance(lg, logging.Logger) for h in lg.handlers]


HIDDEN = {"bars": False}  # set by ``--quiet`` / ``--log-format json``: no bars even on a terminal


def shows_progress() -> bool:
    """Whether a bar would be seen: stdout and stderr are both terminals, and no flag hid the bars."""
    return not HIDDEN["bars"] and _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@contextmanager
def terminal_progress(*bars: Bar, enabled: bool | None = None) -> Iterator[TerminalProgress | None]:
    """Show ``bars`` on stderr and install them as the current terminal progress for the block.

    ``enabled`` defaults to ``shows_progress()``; when off, nothing is shown and ``report`` stays a no-op.
    The last frame stays on screen (how far the run got, in how long), and what the command prints
    afterwards follows it.
    """
    if not (shows_progress() if enabled is None else enabled):
        yield None
        return
    terminal = TerminalProgress(bars, sys.stderr)
    try:
        with listening(terminal.update), terminal.progress:
            try:
                yield terminal
            finally:  # draw the last frame even when the block ends before the first timed refresh
                terminal.progress.refresh()
    finally:
        terminal.release_log_handlers()
