"""Prefect's temporary API server: reaped when the command that started it was killed, and its
time-outs told in one line.

With no ``PREFECT_API_URL``, Prefect starts a temporary server (a ``uvicorn`` child) for the command
and stops it at exit, but a ``kill -9`` of the command leaves it running. Each command marks its
environment with its pid and start time, which the server inherits; the next command stops every
temporary server whose marked parent is gone (read from /proc: nothing is recorded on disk).
"""

from __future__ import annotations

import contextlib
import os
import signal

from weightzoo.errors import WeightzooError
from weightzoo.storage.procs import process_gone, process_start
from weightzoo.storage.retry import chain

PARENT = "WEIGHTZOO_CLI_PROCESS"  # "<pid>:<start time>" of the command a temporary server belongs to
SERVER_APP = b"prefect.server.api.server:create_app"
_TIMEOUTS = {"ReadTimeout", "ConnectTimeout", "PoolTimeout", "WriteTimeout", "TimeoutException"}


def mark_process() -> None:
    """Mark this process in the environment every child (a temporary Prefect server) inherits."""
    os.environ[PARENT] = f"{os.getpid()}:{process_start(os.getpid())}"


def _orphan(pid: str) -> bool:
    """A temporary Prefect server whose marked parent command is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if SERVER_APP not in f.read():
                return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:  # gone meanwhile, or another user's
        return False
    mark = env.get(PARENT.encode())
    if mark is None or env.get(b"PREFECT__SERVER_EPHEMERAL") != b"1":
        return False
    parent, _, started = mark.decode().partition(":")
    return process_gone(int(parent), int(started) if started.isdigit() else None)


def reap_orphan_servers() -> list[int]:
    """Stop the temporary Prefect servers of killed weightzoo commands; their pids."""
    if not os.path.isdir("/proc"):
        return []
    reaped = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        if _orphan(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
                reaped.append(int(pid))
    return reaped


class PrefectTimeoutError(WeightzooError, TimeoutError):
    """The Prefect API did not answer in time."""


def _api_timeout(exc: BaseException) -> bool:
    """An httpx time-out of a request to the Prefect API (its URL, or the loopback temporary server)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if not names & _TIMEOUTS or not type(exc).__module__.startswith("httpx"):
        return False
    try:
        url = str(exc.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an exception without its request
        return False
    api = os.environ.get("PREFECT_API_URL")
    return url.startswith(api) if api else url.startswith(("http://127.0.0.1:", "http://localhost:"))


def prefect_fault(exc: BaseException) -> PrefectTimeoutError | None:
    """A Prefect API time-out as one line with the cause and the cure; None for anything else."""
    api = os.environ.get("PREFECT_API_URL") or "the temporary server this command started"
    causes = list(chain(exc))
    if not any(_api_timeout(e) or "ephemeral Prefect API server" in str(e) for e in causes):
        return None
    exc = next((e for e in causes if _api_timeout(e)), exc)
    return PrefectTimeoutError(
        f"the Prefect API ({api}) did not answer in time, likely under load ({type(exc).__name__}); start a "
        "lasting server with `weightzoo serve` and set PREFECT_API_URL to it, or raise PREFECT_API_REQUEST_TIMEOUT"
    )
