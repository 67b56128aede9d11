"""Shared fixtures. Session-scoped where building costs seconds (the tiny model, the S3 server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny SD-style pipeline saved with ``save_pretrained`` (built once per session)."""
    from weightzoo.tasks.finetune.base_model import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_base: Path):
    """The tiny pipeline loaded on CPU in fp32. Shared: tests must not leave adapters or hooks on it."""
    from weightzoo.tasks.finetune.base_model import load_base

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
