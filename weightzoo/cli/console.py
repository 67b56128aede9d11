"""Prefect's terminal log handler as the CLI uses it without ``-v``: weightzoo's own lines only.

``quiet`` names this class in Prefect's own logging override (``PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS``),
so only the terminal is quieter: the API, and so the UI, still gets every record. Two kinds of record
stay off the terminal:

- Prefect's own (its loggers ``prefect.*``, run logs included, ``docket.*``, its server's task queue, and
  ``sqlalchemy.*``, its server's database), in the command's process and its temporary server. A failed run
  is reported by the command itself, once: its summary (a build's counts and reasons), its one-line error, or
  a bug's traceback. Prefect's copies of the
  same failure were hundreds of lines (a full disk printed 515: each task's and flow's ERROR record with its
  traceback, then a BuildIncomplete traceback) before the command's own line. Processes a command starts to
  keep running (``weightzoo serve``'s server and workers, which write their logs to files) inherit this
  handler and keep every record.
- A ``WeightzooError`` (a tampered shard, refused credentials, a bad manifest) whoever logs it: the CLI
  prints it in one line.

Other libraries' warnings and errors, and weightzoo's own loggers (a storage retry, a lease taken over),
still show. ``-v`` uses Prefect's handler unchanged.
"""

from __future__ import annotations

import logging
import os
import re

from prefect.logging.handlers import PrefectConsoleHandler

from weightzoo.cli.server import PARENT
from weightzoo.errors import WeightzooError

# Prefect's engine, client, server and run logs; its server's task queue; its server's database layer (a
# temporary server stopped mid-query logs SQLAlchemy's cancelled pool reset as an ERROR with a traceback)
PREFECT_LOGGERS = ("prefect", "docket", "sqlalchemy")


def prefects_own(record: logging.LogRecord) -> bool:
    """The record comes from one of Prefect's loggers: its engine, client, server, or a flow's or task's run log."""
    return any(record.name == n or record.name.startswith(f"{n}.") for n in PREFECT_LOGGERS)


def commands_terminal() -> bool:
    """This process is the weightzoo command (``mark_process`` marked its pid) or the temporary Prefect server it
    started (Prefect marks that one ``PREFECT__SERVER_EPHEMERAL``): their terminal is the command's."""
    marked = os.environ.get(PARENT, "").partition(":")[0]
    return marked == str(os.getpid()) or os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1"


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
    """``PrefectConsoleHandler`` that leaves Prefect's records to ``-v`` and user errors to the CLI's one line."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands = commands_terminal()  # decided once: a process keeps its pid and environment

    def filter(self, record: logging.LogRecord) -> bool:
        if self.commands and prefects_own(record):
            return False
        return not user_error(record) and bool(super().filter(record))
