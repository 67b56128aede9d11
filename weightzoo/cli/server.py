"""Prefect's temporary API server: given time to start on a busy machine, reaped when the command that
started it was killed, and its time-outs told in one line.

With no ``PREFECT_API_URL``, Prefect starts a temporary server (a ``uvicorn`` child) for the command
and stops it at exit, but a ``kill -9`` of the command leaves it running. Each command marks its
environment with its pid and start time, which the server inherits; the next command stops every
temporary server whose marked parent is gone (read from /proc: nothing is recorded on disk).

Prefect waits 20 s for that server to answer, which a 2-core machine beside busy processes exceeds several
times over (most with a fresh ``PREFECT_HOME``, whose database is made first; docs/BENCHMARKS.md "Load"), so a
build failed before its first row. ``patient_server`` gives it ``STARTUP_TIMEOUT_S`` and, while it waits past
``PROGRESS_EVERY_S``, says so on the terminal (a warning of this module's logger, so ``--quiet`` and
``--log-format json`` apply), so a slow start is not taken for a hang.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from weightzoo.errors import WeightzooError
from weightzoo.storage.procs import process_gone, process_start
from weightzoo.storage.retry import chain

PARENT = "WEIGHTZOO_CLI_PROCESS"  # "<pid>:<start time>" of the command a temporary server belongs to
SERVER_APP = b"prefect.server.api.server:create_app"
SERVER_MODULE = "prefect.server.api.server"
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # Prefect's own setting (default 20 s)
# Several times the slowest start measured on a loaded 2-core machine (docs/BENCHMARKS.md "Load"); a server
# that never answers still ends the command, in one line (prefect_fault).
STARTUP_TIMEOUT_S = 300
PROGRESS_EVERY_S = 15.0
log = logging.getLogger(__name__)
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


def patient_server() -> None:
    """Let Prefect's temporary server take up to ``STARTUP_TIMEOUT_S`` to start (unless the user set Prefect's
    setting) and report the wait: its ``start`` is wrapped when Prefect's server module loads (now, if it has)."""
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(STARTUP_TIMEOUT_S))
    if SERVER_MODULE in sys.modules:
        _wrap_start(sys.modules[SERVER_MODULE])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(SERVER_MODULE, _wrap_start))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` once ``name`` is imported: Prefect imports its server module only when it needs a
    temporary server, and importing it up front costs every command seconds."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the lookup below, and any later import, goes to the ordinary finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load, then = spec.loader.exec_module, self.then

        def exec_module(module: ModuleType) -> None:
            load(module)
            then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _wrap_start(module: ModuleType) -> None:
    """Wrap ``SubprocessASGIServer.start`` (once) to report a slow start; a Prefect without it is left alone."""
    server = getattr(module, "SubprocessASGIServer", None)
    start = getattr(server, "start", None)
    if start is None or getattr(start, "_weightzoo_patient", False):
        return
    server.start = _reporting(start)  # type: ignore[union-attr]
    run = getattr(server, "_run_uvicorn_command", None)
    if run is not None and not getattr(run, "_weightzoo_own_session", False):
        server._run_uvicorn_command = _own_session(module, run)  # type: ignore[union-attr]


def _own_session(module: ModuleType, run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Start the temporary server in a session of its own: a terminal's Ctrl-C (SIGINT to the foreground
    process group) then reaches the command only, which ends its flow run through the still-running API
    and stops the server itself at exit, in seconds. In the command's group the server died at once and the
    interrupted command spent minutes retrying calls to it."""
    import subprocess

    @functools.wraps(run)
    def run_in_own_session(self: Any) -> Any:
        popen = module.subprocess.Popen

        def detached(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("start_new_session", True)
            return popen(*args, **kwargs)

        module.subprocess = _SubprocessWith(subprocess, detached)
        try:
            return run(self)
        finally:
            module.subprocess = subprocess

    run_in_own_session._weightzoo_own_session = True  # type: ignore[attr-defined]
    return run_in_own_session


class _SubprocessWith:
    """The ``subprocess`` module as Prefect's server module sees it while it starts its server: the same,
    but for a ``Popen`` that detaches the server (nothing else in the process is affected)."""

    def __init__(self, real: ModuleType, popen: Callable[..., Any]) -> None:
        self._real, self.Popen = real, popen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _reporting(start: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(start)
    def patient_start(self: Any, timeout: int | None = None) -> None:
        if getattr(self, "running", False):
            return start(self, timeout)
        done = threading.Event()
        threading.Thread(target=_report_wait, args=(done, timeout), daemon=True, name="server-start").start()
        try:
            return start(self, timeout)
        finally:
            done.set()

    patient_start._weightzoo_patient = True  # type: ignore[attr-defined]
    return patient_start


def _report_wait(done: threading.Event, timeout: int | None) -> None:
    """Every ``PROGRESS_EVERY_S`` until ``done``: one warning saying how long the temporary server has taken."""
    began = time.monotonic()
    limit = timeout or os.environ.get(STARTUP_TIMEOUT_ENV) or STARTUP_TIMEOUT_S
    while not done.wait(PROGRESS_EVERY_S):
        log.warning("waiting for Prefect's temporary server to start: %.0f s so far (up to %s s; a busy machine?). "
                    "A lasting one starts once: weightzoo serve, then set PREFECT_API_URL",
                    time.monotonic() - began, limit)


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


def prefect_fault(exc: BaseException) -> WeightzooError | None:
    """A Prefect API time-out, or a temporary server that never answered, as one line with the cause and the
    cure; None for anything else."""
    api = os.environ.get("PREFECT_API_URL") or "the temporary server this command started"
    causes = list(chain(exc))
    start = next((str(e) for e in causes if "ephemeral Prefect API server" in str(e)), None)
    if start is not None:
        if code := re.search(r"exited with code (-?\d+)", start):
            return WeightzooError(f"Prefect's temporary server exited with code {code[1]} before it answered; "
                                  "run the command with -v to see its log")
        limit = os.environ.get(STARTUP_TIMEOUT_ENV, "20")
        return PrefectTimeoutError(
            f"Prefect's temporary server did not start within {limit} s, likely under load; start a lasting server "
            f"with `weightzoo serve` and set PREFECT_API_URL to it, or raise {STARTUP_TIMEOUT_ENV}"
        )
    if not any(_api_timeout(e) for e in causes):
        return None
    exc = next(e for e in causes if _api_timeout(e))
    return PrefectTimeoutError(
        f"the Prefect API ({api}) did not answer in time, likely under load ({type(exc).__name__}); start a "
        "lasting server with `weightzoo serve` and set PREFECT_API_URL to it, or raise PREFECT_API_REQUEST_TIMEOUT"
    )
