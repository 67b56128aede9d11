"""A Prefect server for weightzoo: SQLite for one box, PostgreSQL + Redis for many workers.

Shared by ``weightzoo serve``, the tests and the benches, so all three run the server the same way:

- ``sqlite``: one ``prefect server start`` (API, UI and services in one process, in-memory messaging).
- ``postgres``: Prefect's self-hosting layout. The database migration is its own step
  (``prefect server database upgrade -y``), the API runs with ``--no-services`` and the background
  services (scheduler, triggers/automations, event persister, ...) in ``prefect server services start``;
  events and leases go through Redis (``prefect-redis``) so the two processes share them.

PostgreSQL and Redis are either given (URLs from the environment) or started here in a data folder on
loopback, with random passwords kept in a 0600 file. Credentials only ever travel in environment
variables; anything logged goes through :func:`weightzoo.storage.fs.redact`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from weightzoo.deployments.net import free_port, wait_healthy
from weightzoo.errors import InputError, NotFoundError

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
CRASH_AUTOMATION = REPO / "deployments" / "crash-zombie-runs.yaml"
# Prefect's minimum: a run emits a heartbeat event this often; the automation waits 3 of them.
HEARTBEAT_S = 30
# Runs of weightzoo deployments carry this tag; the crashed-run automation watches only those.
DEPLOYMENT_TAGS = ("weightzoo", "gpu")
DATABASE_URL_ENV, REDIS_URL_ENV = "WEIGHTZOO_DATABASE_URL", "WEIGHTZOO_REDIS_URL"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian keeps the server binaries off PATH
SERVICE_USER = "postgres"  # PostgreSQL refuses to run as root


class ServerConfig(BaseModel):
    """How to run the Prefect API: where, on which backend, with which pool and heartbeat settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["sqlite", "postgres"] = Field("sqlite", description="'sqlite': one process, one box; "
                                                   "'postgres': PostgreSQL + Redis, API and services apart.")
    host: str = Field("127.0.0.1", description="Address the API binds (loopback unless you put a proxy in front).")
    port: int = Field(4200, ge=1, le=65535, description="API port.")
    database_url: SecretStr | None = Field(None, description="postgresql:// URL (credentials inside); None: start one.")
    redis_url: SecretStr | None = Field(None, description="redis:// URL (password inside); None: start one.")
    pool_size: int = Field(30, ge=1, description="SQLAlchemy pool per server process (Prefect's default 5 starves "
                                               "under many workers).")
    max_overflow: int = Field(30, ge=0, description="Extra SQLAlchemy connections per process at peaks.")
    heartbeat_s: int = Field(HEARTBEAT_S, ge=30, description="Seconds between flow-run heartbeats (Prefect's minimum is 30).")
    home: Path | None = Field(None, description="PREFECT_HOME of the server processes (default: the caller's).")

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"


def from_environment(backend: str, **overrides: object) -> ServerConfig:
    """A config whose URLs come from WEIGHTZOO_DATABASE_URL / WEIGHTZOO_REDIS_URL unless given."""
    urls = {"database_url": os.environ.get(DATABASE_URL_ENV), "redis_url": os.environ.get(REDIS_URL_ENV)}
    fields = {k: v for k, v in urls.items() if v} | {k: v for k, v in overrides.items() if v is not None}
    return ServerConfig(backend=backend, **fields)


# ---------------------------------------------------------------- environments


def asyncpg_url(url: str) -> str:
    """Prefect's async engine needs the asyncpg driver: ``postgresql://`` becomes ``postgresql+asyncpg://``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+asyncpg"}:
        raise InputError("the database URL must start with postgresql:// (or postgresql+asyncpg://)")
    return f"postgresql+asyncpg://{rest}"


def redis_env(url: str) -> dict[str, str]:
    """prefect-redis's discrete settings (PREFECT_REDIS_MESSAGING_*), which every prefect-redis release reads."""
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
        raise InputError("the Redis URL must look like redis://[:password@]host:port/db")
    env = {
        "PREFECT_REDIS_MESSAGING_HOST": parts.hostname,
        "PREFECT_REDIS_MESSAGING_PORT": str(parts.port or 6379),
        "PREFECT_REDIS_MESSAGING_DB": parts.path.strip("/") or "0",
        "PREFECT_REDIS_MESSAGING_SSL": str(parts.scheme == "rediss").lower(),
    }
    if parts.username:
        env["PREFECT_REDIS_MESSAGING_USERNAME"] = unquote(parts.username)
    if parts.password:
        env["PREFECT_REDIS_MESSAGING_PASSWORD"] = unquote(parts.password)
    return env


def base_env(config: ServerConfig) -> dict[str, str]:
    """What every Prefect process of this server needs (API URL, no telemetry, heartbeats)."""
    env = {
        "PREFECT_API_URL": config.api_url,
        "PREFECT_SERVER_API_HOST": config.host,
        "PREFECT_SERVER_API_PORT": str(config.port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(config.heartbeat_s),
    }
    if config.home is not None:
        env["PREFECT_HOME"] = str(config.home)
    return env


def postgres_env(config: ServerConfig) -> dict[str, str]:
    """The production settings of Prefect's self-hosting guide: PostgreSQL, Redis messaging, a larger pool."""
    if config.database_url is None or config.redis_url is None:
        raise InputError("the postgres backend needs a database URL and a Redis URL")
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": asyncpg_url(config.database_url.get_secret_value()),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": str(config.pool_size),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": str(config.max_overflow),
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",  # migrations are their own step
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        **redis_env(config.redis_url.get_secret_value()),
    }


def server_env(config: ServerConfig) -> dict[str, str]:
    """The full environment of the server processes (the caller's, plus this backend's settings)."""
    extra = postgres_env(config) if config.backend == "postgres" else {}
    return {**os.environ, **base_env(config), **extra}


def heartbeat_env(heartbeat_s: int = HEARTBEAT_S) -> dict[str, str]:
    """The job variable every weightzoo deployment sets, so its runs heartbeat as the automation expects."""
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}


def worker_env(api_url: str, heartbeat_s: int = HEARTBEAT_S, **extra: str) -> dict[str, str]:
    """A worker's environment: its flow-run processes inherit it, so they send heartbeats to this API."""
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


# ---------------------------------------------------------------- processes


def start_logged(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start a long-running process in its own session (so stopping it stops its children), output to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def stop(*procs: subprocess.Popen, wait: float = 30) -> None:
    """SIGTERM each process's whole session at once, then SIGKILL what is left after ``wait`` seconds.

    All at once: a prefect worker can take its full ``wait`` to exit, and stopped one after another N
    workers took N x 30 s, past a supervisor's patience (a bench's 60 s, systemd's 90 s), whose SIGKILL then
    left the last workers and the server running with no serve behind them."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_checked(cmd: list[str], env: dict[str, str] | None = None, what: str = "") -> None:
    """Run a setup step; on failure raise with its output, which never contains a credential we passed by env."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{what or cmd[0]} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")


# ---------------------------------------------------------------- local PostgreSQL and Redis


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's newest /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which(name)
    if found:
        return found
    dirs = sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise NotFoundError(f"PostgreSQL's {name} was not found (install Debian's postgresql package, or give "
                        f"--database-url / {DATABASE_URL_ENV})")


def have_local_services() -> bool:
    """True when PostgreSQL's server binaries and redis-server are installed here."""
    try:
        postgres_bin("pg_ctl")
    except NotFoundError:
        return False
    return shutil.which("redis-server") is not None


def as_service_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``cmd`` as the ``postgres`` user."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser") is None:
        raise NotFoundError("running as root needs runuser to start PostgreSQL as the postgres user")
    return ["runuser", "-u", SERVICE_USER, "--", *cmd]


def _give_to_service_user(path: Path) -> None:
    """As root, hand ``path`` to the postgres user and check that user can reach it (every parent traversable)."""
    if os.geteuid() != 0:
        return
    import pwd

    pw = pwd.getpwnam(SERVICE_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for parent in path.resolve().parents:
        if os.stat(parent).st_uid == pw.pw_uid:
            continue
        if not os.stat(parent).st_mode & 0o001:
            raise InputError(f"the postgres user cannot reach {path}: {parent} is not traversable by others; "
                             "choose a data folder under a world-traversable path (e.g. /var/lib/weightzoo)")


def _secrets(root: Path) -> dict[str, str]:
    """The local services' passwords: made once, kept in a 0600 file readable by this user only."""
    path = root / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {"postgres": secrets.token_urlsafe(24), "redis": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return values


class LocalPostgres:
    """A PostgreSQL cluster in ``root/postgres`` on 127.0.0.1:``port`` (password auth), reused across starts."""

    USER, DATABASE = "weightzoo", "prefect"

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.data = root / "postgres"
        self.password = _secrets(root)["postgres"]

    @property
    def url(self) -> str:
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/{self.DATABASE}"

    def _initdb(self) -> None:
        self.data.mkdir(mode=0o700)
        _give_to_service_user(self.data)
        pwfile = self.root / "pwfile"  # the postgres user must read it; deleted right after initdb
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        _give_to_service_user(pwfile)
        try:
            run_checked(as_service_user([postgres_bin("initdb"), "-D", str(self.data), "-U", self.USER,
                                         "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"]), what="initdb")
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> str:
        """Start the cluster (initialising it the first time) and create the database; returns its URL."""
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self._initdb()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data} -c max_connections=300"
        run_checked(as_service_user([postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"),
                                     "-o", opts, "-w", "-t", "120", "start"]), what="pg_ctl start")
        if fresh:
            env = {**os.environ, "PGPASSWORD": self.password}
            run_checked([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER,
                         self.DATABASE], env=env, what="createdb")
        return self.url

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            run_checked(as_service_user([postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                        what="pg_ctl stop")


class LocalRedis:
    """A redis-server on 127.0.0.1:``port`` with a password, no persistence (Prefect keeps only messages there)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.password = _secrets(root)["redis"]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _config(self) -> Path:
        folder = self.root / "redis"
        folder.mkdir(exist_ok=True)
        conf = folder / "redis.conf"  # the password lives here, not on the command line (ps shows argv)
        conf.touch(mode=0o600)
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {folder}\nsave \"\"\nappendonly no\n"
                        f"protected-mode yes\nrequirepass {self.password}\n")
        return conf

    def start(self) -> str:
        server = shutil.which("redis-server")
        if server is None:
            raise NotFoundError(f"redis-server was not found (install Debian's redis-server package, or give "
                                f"--redis-url / {REDIS_URL_ENV})")
        self.proc = start_logged([server, str(self._config())], dict(os.environ), self.root / "redis" / "server.log")
        self._wait_ready()
        return self.url

    def _wait_ready(self, timeout: float = 60) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                if client.ping():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"redis-server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@contextlib.contextmanager
def local_services(root: Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and Redis in ``root`` on free loopback ports; yields (database URL, Redis URL)."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        root.chmod(0o711)  # the postgres user traverses into root/postgres; nothing here is listable
    pg, rd = LocalPostgres(root), LocalRedis(root)
    try:
        db_url = pg.start()
        yield db_url, rd.start()
    finally:
        rd.stop()
        pg.stop()


# ---------------------------------------------------------------- the Prefect server


def migrate(env: dict[str, str]) -> None:
    """Create or upgrade Prefect's tables: its own step, before any API process starts."""
    run_checked([PREFECT, "server", "database", "upgrade", "-y"], env=env, what="prefect server database upgrade")


def server_commands(config: ServerConfig) -> list[list[str]]:
    """The long-running processes: one all-in-one server (sqlite), or the API and the services (postgres)."""
    start = [PREFECT, "server", "start", "--host", config.host, "--port", str(config.port)]
    if config.backend == "sqlite":
        return [start]
    return [[*start, "--no-services"], [PREFECT, "server", "services", "start"]]


class PrefectServer:
    """The server processes of ``config``, started and stopped together; ``env`` is what they run with."""

    def __init__(self, config: ServerConfig, logs: Path) -> None:
        self.config, self.logs = config, logs
        self.env = server_env(config)
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 240) -> str:
        """Migrate (postgres), start every process, wait until the API answers; returns the API URL."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.config.backend == "postgres":
            migrate(self.env)
        for i, cmd in enumerate(server_commands(self.config)):
            name = "api" if i == 0 else "services"
            self.procs.append(start_logged(cmd, self.env, self.logs / f"{name}.log"))
        api = self.procs[0]
        wait_healthy(f"{self.config.api_url}/health", timeout=timeout, proc=api, log=api.log.read_text)  # type: ignore[attr-defined]
        return self.config.api_url

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


@contextlib.contextmanager
def running_server(config: ServerConfig, logs: Path) -> Iterator[PrefectServer]:
    """A started :class:`PrefectServer` (stopped on exit, also on errors)."""
    server = PrefectServer(config, logs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def drain_queues(timeout: float = 60) -> None:
    """Deliver this process's queued Prefect logs and events before its server stops; otherwise each one is
    retried, with a long timeout, when the interpreter exits (80 s seen in the tests)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # the log worker never started in this process
        APILogWorker.instance().drain()
    EventsWorker.drain_all(timeout=timeout)


# ---------------------------------------------------------------- crashed-run automation


def load_automation(path: Path = CRASH_AUTOMATION):
    """The automation kept in ``deployments/`` as YAML, validated by Prefect's own schema."""
    import yaml
    from prefect.automations import AutomationCore

    return AutomationCore.model_validate(yaml.safe_load(path.read_text()))


def install_automation(path: Path = CRASH_AUTOMATION) -> UUID:
    """Create the automation in the API ``PREFECT_API_URL`` points at, replacing any of the same name."""
    from prefect.client.orchestration import get_client

    automation = load_automation(path)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        return client.create_automation(automation)
