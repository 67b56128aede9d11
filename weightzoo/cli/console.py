"""Prefect's terminal log handler, less the records of errors a user can fix.

A ``WeightzooError`` (a tampered shard, refused credentials, a bad manifest) raised inside a flow or task
made Prefect print its traceback, often twice (task, then flow), before the CLI printed the same cause in
one line. ``quiet`` names this class in Prefect's own logging override (``PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS``),
so only the terminal drops those records: the API, and so the UI, still gets every one.
"""

from __future__ import annotations

import logging
import re

from prefect.logging.handlers import PrefectConsoleHandler

from weightzoo.errors import WeightzooError


def user_error(record: logging.LogRecord) -> bool:
    """The record reports a ``WeightzooError`` (as its exception, or named in its message by Prefect)."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, WeightzooError):
        return True
    return record.levelno >= logging.ERROR and _names_user_error(record.getMessage())


def _names_user_error(message: str) -> bool:
    """Prefect's "Finished in state Failed('... CorruptShardError: ...')" lines carry only the class name."""
    names = "|".join(cls.__name__ for cls in _user_error_classes())
    return re.search(rf"\b({names})\b", message) is not None


def _user_error_classes() -> list[type]:
    out, todo = [], [WeightzooError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


class ConsoleHandler(PrefectConsoleHandler):
    """``PrefectConsoleHandler`` that leaves user errors to the CLI's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not user_error(record) and bool(super().filter(record))
