"""Loopback helpers shared by ``weightzoo serve``, the tests and ``scripts/``: a free port, a health wait."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, timeout: float = 120, proc: subprocess.Popen | None = None, log: Callable[[], str] | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` (the server) exits, quoting ``log()``."""
    deadline = time.monotonic() + timeout
    tail = (lambda: "\n" + log()[-3000:]) if log is not None else (lambda: "")
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s{tail()}")
