"""The test kit, loaded once per session as a pytest plugin (``pytest_plugins`` in conftest.py).

Fixtures: the tiny model, a moto S3 server, one Prefect API per session (harness or a real server)
and real process workers, ``one_thread``. Helpers for test modules (``from helpers import ...``):
``TINY_FINETUNE``, ``REPO``, ``stop_tree``, ``worker_env``, ``corrupt_image``, ``TcpProxy``, ``tmpfs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from weightzoo.deployments.net import free_port, wait_healthy
from weightzoo.deployments.servers import drain_queues

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


@pytest.fixture(autouse=True)
def engine_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Engines a test registers (the null engine, a counting wrapper) stay in that test: names seen by the
    next test are the built-in ones, whatever ran before."""
    from weightzoo.tasks.finetune import engines

    monkeypatch.setattr(engines, "_REGISTERED", dict(engines._REGISTERED))
    engines.get.cache_clear()
    yield
    engines.get.cache_clear()


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
def prefect_harness(prefect_server: str) -> Iterator[None]:
    """This test process's flows and clients talk to its session's real server. (Prefect's own test harness
    started a second server in each process: ~20 s of CPU to start and idle, times four processes.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield


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
        wait_healthy(f"{url}/health", timeout=240, proc=proc, log=log.read_text)
        yield url
    finally:
        drain_queues()  # this process's logs and events reach the server before it stops
        stop_tree(proc)


# A process worker polls its pool every 2 s: Prefect's default 10 s adds up to 10 s to every batch run's pickup.
WORKER_QUERY_S = "2"


def worker_env(api_url: str, home: Path) -> dict[str, str]:
    return {**os.environ, **_isolated_env(home), "PREFECT_API_URL": api_url, "PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_S}


@contextlib.contextmanager
def process_workers(pool: str, env: dict[str, str], logs: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """``start(limit=...)`` starts a real ``prefect worker start --pool <pool>`` process; all of them are
    stopped (tree and all, flow-run children included) when the block ends."""
    started: list[subprocess.Popen] = []
    logs.mkdir(parents=True, exist_ok=True)

    def start(limit: int = 1) -> subprocess.Popen:
        log = logs / f"worker-{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit)],
                                    env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                stop_tree(proc)


@pytest.fixture
def process_worker(prefect_server: str, tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen]]:
    """Start ``prefect worker start --pool <pool>`` processes on the session server; stopped at teardown."""
    env = worker_env(prefect_server, tmp_path / "worker-home")
    with contextlib.ExitStack() as stack:
        starters: dict[str, Callable[..., subprocess.Popen]] = {}

        def start(pool: str, limit: int = 2) -> subprocess.Popen:
            if pool not in starters:
                starters[pool] = stack.enter_context(process_workers(pool, env, tmp_path / f"workers-{pool}"))
            return starters[pool](limit)

        yield start


LEASE_TTL_S = 6.0  # kill tests: a killed worker's lease expires in seconds, not the default minutes


def deployment_build(manifest: str, base: Path, dataset: Path, finetune: dict, deployment: str, wait_s: float):
    """A build that sends 2-item batches to ``deployment`` and polls every 2 s."""
    from weightzoo.flows.config import BuildConfig
    from weightzoo.tasks.identity.config import FinetuneConfig

    return BuildConfig(manifest=manifest, base=str(base), dataset=str(dataset), batch_size=2, executor="deployment",
                       deployment=deployment, finetune=FinetuneConfig(**finetune), poll_s=2, batch_timeout_s=wait_s,
                       lease_ttl_s=LEASE_TTL_S)


def deployment_runs(deployment: str, batch_ids: set[str] | None = None) -> list:
    """Flow runs of ``deployment`` (optionally only those of some batches)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(limit=200)
    return [r for r in runs if r.deployment_id == dep.id and (batch_ids is None or run_batch_id(r) in batch_ids)]


def run_batch_id(run) -> str:
    """The batch id of a finetune-batch flow run, from its parameters (its name also carries the dataset)."""
    config = run.parameters.get("config") or {}
    return config.get("batch_id", "") if isinstance(config, dict) else config.batch_id


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two torch threads on two cores shared with other jobs spin-wait badly (7-8x slower here); one is steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def corrupt_image(path: str | Path) -> None:
    """Overwrite a local PNG so its header still parses but decoding fails (a realistic bad file).

    Keeps the 33-byte signature + IHDR chunk, so ``Image.open`` succeeds lazily and only a full decode
    (``load_image``) finds the damage, as with a truncated upload.
    """
    p = Path(path)
    head = p.read_bytes()[:33]
    p.write_bytes(head + b"\x00\x00\x10\x00IDAT" + b"not image data " * 8)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny SD-style pipeline saved with ``save_pretrained`` (built once per session)."""
    from weightzoo.tasks.identity.base_model import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_base: Path):
    """The tiny pipeline loaded on CPU in fp32. Shared: tests must not leave adapters or hooks on it."""
    from weightzoo.tasks.identity.base_model import load_base

    return load_base(str(tiny_base))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server mode) on a loopback port, with credentials in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh bucket URI (``s3://...``) on the moto server, one per test."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    name = "wz-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def dataset_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same storage test on local disk and on moto-backed S3."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    return request.getfixturevalue("s3_bucket") + "/dataset"


class TcpProxy:
    """A loopback TCP proxy in front of a server (e.g. moto), to cut a client off mid-request for real.

    ``cut_after(nbytes, down_s)`` arms it: the first connection that carries ``nbytes`` upstream is
    dropped and the proxy refuses every connection for ``down_s`` seconds, then serves again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._armed: tuple[int, float] | None = None
        self.cuts = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for s in ([listener] if listener else []) + conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut_after(self, nbytes: int, down_s: float) -> None:
        self._armed = (nbytes, down_s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                sent += len(data)
                if upstream and self._armed and sent >= self._armed[0]:
                    _, down_s = self._armed
                    self._armed, self.cuts = None, self.cuts + 1
                    self.stop()
                    threading.Timer(down_s, self.start).start()
                    return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``path`` (root only: the caller skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None
