"""Prefect fixtures shared by the orchestration tests: one API per session, never the user's ~/.prefect.

``prefect_harness``: the in-process test harness (fast tier). ``prefect_server``: a real
``prefect server start`` on a free loopback port; ``process_worker``: real ``prefect worker start``
processes on a pool, stopped (with their flow-run children) in finalizers. Import the fixtures
into a test module with ``from tests.prefect_fixtures import *``-style explicit names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
# Small enough for 2 shared CPU cores, real enough to exercise every stage of the engine.
TINY_FINETUNE = {"steps": 2, "num_class_images": 1, "class_inference_steps": 1, "pack": 3, "check_every": 1}


def _isolated_env(home: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network here; avoid telemetry errors in logs
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point Prefect at a private home for the session (other sessions share ~/.prefect's SQLite file)."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = _isolated_env(home)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_harness(prefect_home: Path) -> Iterator[None]:
    """Prefect's in-process test API (SQLite in a temporary folder), started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Signal a process and all its descendants (a worker's flow-run children included), then reap it."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=wait)
    for p in alive:
        p.kill()
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory, prefect_home: Path) -> Iterator[str]:
    """A real ``prefect server start`` on a free loopback port with its own SQLite file; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **_isolated_env(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, timeout=240, log=log)
        yield url
    finally:
        stop_tree(proc)


def worker_env(api_url: str, home: Path) -> dict[str, str]:
    return {**os.environ, **_isolated_env(home), "PREFECT_API_URL": api_url}


@pytest.fixture
def process_worker(prefect_server: str, tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start ``prefect worker start --pool <pool>`` processes; each is stopped (tree and all) at teardown."""
    started: list[subprocess.Popen] = []

    def start(pool: str, limit: int = 2) -> subprocess.Popen:
        log = tmp_path / f"worker-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit)],
                env=worker_env(prefect_server, tmp_path / "worker-home"), cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            stop_tree(proc)
