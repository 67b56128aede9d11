"""Storage and server faults end in one line that names the URI and the cause; crash leftovers are taken
over at once; manifest validation streams. Real faults: moto with auth turned on, an endpoint nothing
listens on, a killed process's lease. Every test ends by counting visible rows and ids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
from helpers import TINY_FINETUNE
from PIL import Image

from weightzoo.cli import main as cli
from weightzoo.errors import short
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.lease import Lease, leased_batches
from weightzoo.storage.ledger import Ledger
from weightzoo.tasks.finetune.manifest import CHUNK_ROWS, load_and_validate
from weightzoo.tasks.finetune.row import ManifestError
from weightzoo.tasks.identity.synthetic import write_demo_manifest

FINETUNE = json.dumps(TINY_FINETUNE)


def _manifest(tmp_path: Path, n: int) -> str:
    return write_demo_manifest(str(tmp_path / "m"), n, images_per_subject=1, size=32)


def _visible(dataset: str) -> tuple[int, int]:
    """(rows, unique ids) a reader sees; an absent dataset has none."""
    if not Ledger(dataset).exists():
        return 0, 0
    ids = Dataset(dataset).ids
    return len(ids), len(set(ids))


def _error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The one error line ``command`` printed (asserting it printed exactly one and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"weightzoo {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- storage faults ------------------------------------------------------------------------------------


@pytest.fixture
def refusing_credentials(monkeypatch: pytest.MonkeyPatch, s3_bucket: str) -> str:
    """moto checking credentials from now on: the test's keys are unknown to it, as wrong keys are to S3."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_bucket
    s3fs.S3FileSystem.clear_instance_cache()


def test_wrong_credentials_are_one_line_naming_the_dataset(
    refusing_credentials: str, tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = f"{refusing_credentials}/ds"
    assert cli(["status", "--dataset", dataset]) == 2
    line = _error_line(capsys, "status")
    assert dataset in line and "credentials were refused" in line
    args = ["build", "--manifest", _manifest(tmp_path, 2), "--base", str(tiny_base), "--dataset", dataset,
            "--finetune-json", FINETUNE]
    assert cli(args) == 2
    line = _error_line(capsys, "build")
    assert dataset in line and "credentials were refused" in line
    monkeypatch.undo()  # credentials accepted again: nothing was written
    s3fs.S3FileSystem.clear_instance_cache()
    assert _visible(dataset) == (0, 0)


def test_an_endpoint_nothing_listens_on_is_one_line_before_any_batch(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch, s3_bucket: str,
) -> None:
    dataset = f"{s3_bucket}/ds"
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    s3fs.S3FileSystem.clear_instance_cache()
    args = ["build", "--manifest", _manifest(tmp_path, 2), "--base", str(tiny_base), "--dataset", dataset,
            "--finetune-json", FINETUNE]
    assert cli(args) == 2
    line = _error_line(capsys, "build")
    assert dataset in line and "endpoint does not answer" in line and dead in line
    assert cli(["status", "--dataset", dataset]) == 2
    assert "endpoint does not answer" in _error_line(capsys, "status")
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    assert _visible(dataset) == (0, 0)


def test_a_missing_bucket_stops_the_build_before_its_first_batch(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture, s3_server: str
) -> None:
    dataset = "s3://no-such-bucket-faults/ds"
    args = ["build", "--manifest", _manifest(tmp_path, 4), "--base", str(tiny_base), "--dataset", dataset,
            "--batch-size", "1", "--finetune-json", FINETUNE]
    assert cli(args) == 2
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("weightzoo build: error:")]
    assert len(lines) == 1 and dataset in lines[0] and "no such bucket" in lines[0] and "Traceback" not in out.err
    assert "in 4 batches" not in out.err  # stopped before planning: no batch ran
    assert _visible(dataset) == (0, 0)


# -- long ids ------------------------------------------------------------------------------------------


def test_a_long_id_is_cut_in_the_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x" * 10_000, "images": ["a.png"]}) + "\n")
    assert short("x" * 10_000).endswith("(10,000 chars)") and len(short("x" * 10_000)) < 100
    with pytest.raises(ManifestError) as e:
        load_and_validate(str(tmp_path / "m.jsonl"))
    assert len(str(e.value)) < 400 and "(10,002 chars)" in str(e.value)  # the id's repr, quotes included
    dataset = str(tmp_path / "ds")
    assert cli(["build", "--manifest", str(tmp_path / "m.jsonl"), "--base", str(tmp_path), "--dataset", dataset]) == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and err.count("\n") == 1, err[:2000]
    assert _visible(dataset) == (0, 0)


# -- leases --------------------------------------------------------------------------------------------


HOLD = """
import sys, time
from weightzoo.storage.lease import Lease
from weightzoo.storage.ledger import Ledger
assert Lease(Ledger(sys.argv[1]), "b-1", ttl_s=120).acquire(settle_s=0)
print("held", flush=True)
time.sleep(600)
"""


def test_a_lease_held_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    dataset = str(tmp_path / "ds")
    ledger = Ledger(dataset)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, dataset], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not Lease(ledger, "b-1", ttl_s=120).acquire(settle_s=0)  # alive: respected
        assert leased_batches(ledger) == {"b-1"}
    finally:
        holder.kill()
        holder.wait()
    assert leased_batches(ledger) == set()  # its 120 s are not waited out
    assert Lease(ledger, "b-1", ttl_s=120).acquire(settle_s=0)
    # A pid now running another process (started later than the holder) is dead for the lease too.
    path = Path(dataset) / "ledger/leases/b-2.json"
    path.write_text(json.dumps({"holder": "x", "expires": 9e9, "host": socket.gethostname(), "pid": os.getpid(),
                                "started": 1}))
    assert Lease(ledger, "b-2", ttl_s=120).acquire(settle_s=0)
    # Another host's lease cannot be judged from here: it is respected until it expires (an expiry within its
    # TTL; one further ahead is a wrong clock, tests/test_probe.py).
    path.write_text(json.dumps({"holder": "x", "expires": time.time() + 100, "ttl_s": 120, "host": "elsewhere",
                                "pid": 1, "started": 1}))
    assert not Lease(ledger, "b-2", ttl_s=120).acquire(settle_s=0)
    assert _visible(dataset) == (0, 0)


# -- manifest validation at scale ----------------------------------------------------------------------


def test_manifest_validation_streams_in_chunks_and_checks_each_shared_image_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    n = CHUNK_ROWS + 5  # rows in two chunks: ids and row numbers carry across
    rows = [{"id": f"s-{i:05d}", "images": ["a.png", "b.png"]} for i in range(n)]
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = load_and_validate(str(tmp_path / "ok.jsonl"))
    assert (len(good), len({r.id for r in good})) == (n, n)
    rows[-1]["id"] = "s-00000"  # a duplicate of row 1, in the second chunk
    rows[CHUNK_ROWS + 1]["images"] = ["a.png", "bad.png"]
    rows[3]["images"] = ["bad.png"]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError) as e:
        load_and_validate(str(tmp_path / "bad.jsonl"))
    found = {(p.row, p.reason.split(":")[0]) for p in e.value.problems}
    assert found == {(n, "duplicate id"), (CHUNK_ROWS + 2, "image cannot be decoded"), (4, "image cannot be decoded")}


# -- shards and outputs --------------------------------------------------------------------------------


def _matrix_dataset(uri: str, rows: int = 40, shard_rows: int = 20) -> list[str]:
    """A real dataset of ``rows`` random rows in shards of ``shard_rows`` (no training); its shard paths."""
    import torch

    from weightzoo.storage.layout import Layout
    from weightzoo.storage.shards import RowMeta
    from weightzoo.storage.writer import commit_batch

    x = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    layout, ledger = Layout(("w",), ((64,),), "float32"), Ledger(uri)
    for start in range(0, rows, shard_rows):
        metas = [RowMeta(f"r{i:05d}") for i in range(start, start + shard_rows)]
        commit_batch(ledger, f"b{start:05d}", layout, metas, layout.to_numpy(torch.from_numpy(x[start:start + shard_rows])))
    return sorted(c.shard for c in ledger.commits())


def test_a_tampered_layout_in_a_shard_footer_is_one_line_naming_the_shard(
    tmp_path: Path, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    import pyarrow.parquet as pq

    from weightzoo.storage.shards import LAYOUT_KEY

    dataset = str(tmp_path / "ds")
    shard = _matrix_dataset(dataset)[1]
    table = pq.read_table(Path(dataset) / shard)
    meta = {**table.schema.metadata, LAYOUT_KEY: b'{"entries": [["w", [64]]], "dtype": '}
    pq.write_table(table.replace_schema_metadata(meta), Path(dataset) / shard)
    assert cli(["fit-subspace", "--dataset", dataset, "--out", str(tmp_path / "sub"), "--components", "2"]) == 2
    line = _error_line(capsys, "fit-subspace")
    assert f"shard {shard} has an unreadable layout in its footer" in line and "verify --repair" in line
    assert len(Ledger(dataset).commits()) == 2 and sum(len(c.ids) for c in Ledger(dataset).commits()) == 40


def test_export_onto_an_existing_file_is_one_line(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    from weightzoo.tasks.finetune.batch import batch_id_for, run_batch
    from weightzoo.tasks.identity.config import FinetuneConfig

    manifest, dataset = _manifest(tmp_path, 1), str(tmp_path / "ds")
    ids = [json.loads(line)["id"] for line in Path(manifest).read_text().splitlines()]
    run_batch(batch_id_for(ids), ids, manifest, str(tiny_base), dataset, FinetuneConfig(**TINY_FINETUNE))
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for fmt in ("diffusers", "peft"):
        assert cli(["export", "--dataset", dataset, "--id", ids[0], "--out", str(taken), "--format", fmt]) == 2
        line = _error_line(capsys, "export")
        assert f"--out {taken} is an existing file" in line
    assert taken.read_text() == "mine"
    assert _visible(dataset) == (1, 1)


# -- Prefect's temporary server ------------------------------------------------------------------------


EPHEMERAL = """
import time
from weightzoo.cli.server import mark_process
mark_process()
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start()
print(server.server_process.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_commands_temporary_server_is_reaped_by_the_next(
    tmp_path: Path, prefect_home: Path, capsys: pytest.CaptureFixture
) -> None:
    from weightzoo.storage.procs import process_gone, process_start

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # Prefect's 20 s is short on a loaded 2-core box
    command = subprocess.Popen([sys.executable, "-c", EPHEMERAL], stdout=subprocess.PIPE, text=True, env=env)
    server = int(command.stdout.readline())
    started = process_start(server)
    command.kill()  # kill -9: no atexit, so Prefect's own stop never runs
    command.wait()
    assert not process_gone(server, started)  # left running, as before
    dataset = str(tmp_path / "ds")
    assert cli(["status", "--dataset", dataset]) == 2  # any next command reaps it
    assert "no dataset at" in _error_line(capsys, "status")
    for _ in range(300):  # SIGTERM'd: uvicorn shuts down in about a second
        if process_gone(server, started):
            break
        time.sleep(0.1)
    assert process_gone(server, started)
    assert _visible(dataset) == (0, 0)


def test_a_prefect_api_time_out_is_one_line_suggesting_serve(tmp_path: Path) -> None:
    """A Prefect API that accepts connections and never answers (as a server under load), with a short timeout."""
    dataset = str(tmp_path / "ds")
    _matrix_dataset(dataset)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_API_REQUEST_TIMEOUT": "1", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    try:
        out = subprocess.run([sys.executable, "-m", "weightzoo.cli", "fit-subspace", "--dataset", dataset, "--out",
                              str(tmp_path / "sub"), "--components", "2"], capture_output=True, text=True, env=env,
                             timeout=300)
    finally:
        silent.close()
    lines = [line for line in out.stderr.splitlines() if line.startswith("weightzoo fit-subspace: error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert api in lines[0] and "did not answer in time" in lines[0] and "weightzoo serve" in lines[0]
    assert _visible(dataset) == (40, 40)


def test_the_commands_terminal_leaves_prefects_server_database_off_and_other_libraries_errors_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A temporary server stopped mid-query logs SQLAlchemy's cancelled pool reset as an ERROR with a traceback
    (seen once on a full-disk build's terminal): Prefect's server internals, so off the command's terminal, as
    its ``prefect.*`` records are; another library's error still shows."""
    import logging

    from weightzoo.cli.console import ConsoleHandler

    monkeypatch.setenv("PREFECT__SERVER_EPHEMERAL", "1")  # as Prefect marks its temporary server
    handler = ConsoleHandler()

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, "Exception during reset or similar", None, None)

    assert not handler.filter(record("sqlalchemy.pool.impl.AsyncAdaptedQueuePool"))
    assert not handler.filter(record("prefect.server"))
    assert handler.filter(record("botocore.endpoint"))
