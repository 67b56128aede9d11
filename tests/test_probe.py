"""The careful hostile user's cases of issue 30, each with a real fault: one line naming what failed, an exit
code that is not 0, nothing written that should not be; every test ends by counting visible rows and ids.

No training here: datasets are written by the real commit protocol (``commit_batch``) in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from helpers import can_mount, tmpfs
from PIL import Image
from shard_writer_proc import rows_for

from weightzoo.cli import main
from weightzoo.storage.card import Recipe
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.layout import Layout
from weightzoo.storage.lease import Lease, hold, leased_batches
from weightzoo.storage.ledger import COMMITS, CommitEntry, Ledger
from weightzoo.storage.shards import write_shard
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.world import base as world

DIM = 64
LAYOUT = Layout(("w",), ((DIM,),), "float16")
WIDE = Layout(("w",), ((DIM + 8,),), "float16")  # another layout: rank 2 where the dataset is rank 1, say
RECIPE = Recipe("lora", "base-fp", "cfg-fp", {"rank": 1})
BATCHES = ("a", "b", "c")
PER_BATCH = 4
needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")


def _build(uri: str) -> list[CommitEntry]:
    """Three committed batches of four rows, with a card (as a build leaves it)."""
    ledger = Ledger(uri)
    entries = [commit_batch(ledger, b, LAYOUT, *rows_for(b, PER_BATCH, DIM), RECIPE) for b in BATCHES]
    assert all(e is not None for e in entries)
    return entries  # type: ignore[return-value]


def _visible(uri: str) -> tuple[int, int]:
    """(rows, unique ids) the verified reader sees, weights read; an absent dataset has none."""
    if not Ledger(uri).exists():
        return 0, 0
    ids = [i for t, _ in Dataset(uri).iter_batches(["id"]) for i in t.column("id").to_pylist()]
    return len(ids), len(set(ids))


def _forge_foreign_shard(uri: str, tmp_path: Path) -> CommitEntry:
    """A real shard of another layout, committed in another dataset, copied in with its commit entry."""
    other = Ledger(str(tmp_path / "other"))
    foreign = commit_batch(other, "x", WIDE, *rows_for("x", 2, DIM + 8))
    assert foreign is not None
    ledger = Ledger(uri)
    for rel in (foreign.shard, f"{COMMITS}/{foreign.name}"):
        ledger.fs.pipe_file(ledger.abspath(rel), other.fs.cat_file(other.abspath(rel)))
    return foreign


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one real ``main`` (argparse's usage errors included)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error(err: str, command: str) -> str:
    """The one line ``weightzoo COMMAND: error: ...`` on stderr, and nothing else (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"weightzoo {command}: error: "), err[-3000:]
    return lines[0]


def _listed_rows(listing: dict) -> tuple[int, int]:
    """What a tool outside Python reads from a ``files --json`` listing: each URI, only its listed ids,
    decoded with the listing's layout (a file of another layout would fail to decode here)."""
    width = Layout.from_json(json.dumps(listing["layout"])).nbytes
    ids = []
    for f in listing["files"]:
        with fsspec.open(f["uri"], "rb") as fh:
            table = pq.read_table(fh, columns=["id", "weights"])
        assert table.schema.field("weights").type.byte_width == width
        ids += [i for i in table.column("id").to_pylist() if i in set(f["ids"])]
    return len(ids), len(set(ids))


# -- 1. `files` lists only what verify would accept --------------------------------------------------------


@pytest.mark.parametrize("fault", ["foreign-layout", "first-missing", "later-missing"])
def test_files_lists_only_what_verify_accepts(fault: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: a forged entry of another layout was listed (exit 0, JSON layout from the first file); a missing
    first shard was a FileNotFoundError traceback; a missing later one was listed (exit 0)."""
    uri = str(tmp_path / "ds")
    entries = _build(uri)
    if fault == "foreign-layout":
        bad = _forge_foreign_shard(uri, tmp_path)
        why, good_rows = f"has layout {WIDE.fingerprint}, the dataset's is {LAYOUT.fingerprint}", 12
    else:
        bad = entries[0 if fault == "first-missing" else 2]
        Path(uri, bad.shard).unlink()
        why, good_rows = "is missing", 8
    for flags in ([], ["--json"], ["--verify"], ["--json", "--verify"]):
        code, out, err = _run(["files", "--dataset", uri, *flags], capsys)
        line = _one_error(err, "files")
        assert code == 2 and out == "" and bad.shard in line and why in line and "--skip-bad" in line
    code, out, err = _run(["files", "--dataset", uri, "--skip-bad"], capsys)
    assert code == 0 and bad.shard not in out and len(out.splitlines()) == good_rows // PER_BATCH
    assert err.count("\n") == 1 and err.startswith(f"weightzoo files: left out {bad.shard} ({len(bad.ids)} ids): ")
    assert why in err
    code, out, err = _run(["files", "--dataset", uri, "--skip-bad", "--json", "--verify"], capsys)
    listing = json.loads(out)
    assert code == 0 and listing["left_out"][0]["shard"] == bad.shard
    assert Layout.from_json(json.dumps(listing["layout"])) == LAYOUT
    assert _listed_rows(listing) == (good_rows, good_rows)
    hub = str(tmp_path / "hub")  # publish leaves out the same shard (it refused the mix even with --skip-bad)
    code, out, _ = _run(["publish", "--dataset", uri, "--out", hub, "--skip-bad"], capsys)
    assert code == 0 and f"left out {bad.shard}" in out
    assert pq.read_table(Path(hub, "data")).num_rows == good_rows
    assert _run(["verify", "--dataset", uri, "--repair"], capsys)[0] == 1  # quarantines what files left out
    assert _visible(uri) == (good_rows, good_rows)


# -- 2. --out follows symlinks -------------------------------------------------------------------------------


def test_an_out_that_is_a_symlink_into_a_dataset_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: after ``ln -s D/shards L``, ``publish --out L`` wrote README.md, layout.json and data/ into D/shards."""
    uri = str(tmp_path / "ds")
    _build(uri)
    link = tmp_path / "L"
    link.symlink_to(Path(uri, "shards"))
    before = sorted(p.name for p in Path(uri, "shards").iterdir())
    for out in (link, link / "sub"):
        code, stdout, err = _run(["publish", "--dataset", uri, "--out", str(out)], capsys)
        line = _one_error(err, "publish")
        assert code == 2 and stdout == "" and f"is inside the dataset folder {uri}" in line and "leads to" in line
    assert sorted(p.name for p in Path(uri, "shards").iterdir()) == before
    assert _visible(uri) == (12, 12)


# -- 3. the world base is checked against its recorded hashes ------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_world_base_with_a_flipped_byte_is_refused_when_kept_copied_or_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``weightzoo base --kind world`` kept a copy with one byte flipped in a safetensors file, and a
    dataset was then built on it. The shipped base records its hashes; a copy and a kept base are checked."""
    assert (world.SHIPPED / world.HASHES_FILE).is_file()
    world.check_world_base(world.SHIPPED)
    out = tmp_path / "w"
    assert _run(["base", "--out", str(out)], capsys)[0] == 0  # the shipped base, copied and checked
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    _flip_byte(weights)
    code, stdout, err = _run(["base", "--out", str(out)], capsys)
    line = _one_error(err, "base")
    assert code == 2 and stdout == "" and "unet/diffusion_pytorch_model.safetensors has changed" in line
    with pytest.raises(world.DamagedBaseError, match="has changed"):
        world.check_world_base(str(out))  # what loading it calls
    # A damaged shipped copy (a bad install) is refused before anything is copied.
    shipped = tmp_path / "shipped"
    shutil.copytree(world.SHIPPED, shipped)
    _flip_byte(shipped / "vae" / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(world, "SHIPPED", shipped)
    code, _, err = _run(["base", "--out", str(tmp_path / "w2")], capsys)
    assert code == 2 and "vae/diffusion_pytorch_model.safetensors has changed" in _one_error(err, "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shipped", "w"]  # nothing half-made left
    uri = str(tmp_path / "ds")  # no dataset was started on it
    assert _visible(uri) == (0, 0)


# -- 4. a FIFO among a row's images is refused by its stat, never opened -------------------------------------


def test_a_fifo_among_images_or_in_an_image_dir_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    """Before: validation opened the FIFO and hung with no output (SIGTERM did not stop it). The check runs
    in a child process with a generous timeout, so a regression fails instead of hanging the suite."""
    for folder in ("s1", "s2"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / folder / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "s2" / "b.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "one", "images": ["s1/a.png", "pipe.png"]}) + "\n"
                        + json.dumps({"id": "two", "image_dir": "s2"}) + "\n")
    dataset = tmp_path / "ds"
    out = subprocess.run([sys.executable, "-m", "weightzoo.cli", "build", "--dry-run", "--manifest", str(manifest),
                          "--base", str(world.SHIPPED), "--dataset", str(dataset)],
                         capture_output=True, text=True, timeout=300)
    line = _one_error(out.stderr, "build")
    assert out.returncode == 2 and out.stdout == ""
    assert f"row 1 (id 'one'): image is not a regular file: {tmp_path / 'pipe.png'} is a FIFO" in line
    assert f"row 2 (id 'two'): image is not a regular file: {tmp_path / 's2' / 'b.png'} is a FIFO" in line
    assert not dataset.exists()
    assert _visible(str(dataset)) == (0, 0)


# -- 5. a lease from a host whose clock is wrong -------------------------------------------------------------


def test_a_lease_expiring_further_ahead_than_its_ttl_is_named_and_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: another host's lease expiring in 10 years made a build wait silently (300 s, then give up), and
    ``status`` did not mention it."""
    uri = str(tmp_path / "ds")
    _build(uri)
    ledger = Ledger(uri)
    leases = Path(uri, "ledger", "leases")
    leases.mkdir(parents=True)
    ten_years = time.time() + 10 * 365 * 86400
    for batch, ttl in (("b-1", {"ttl_s": 120}), ("b-2", {})):  # with its TTL recorded, and an older lease without
        (leases / f"{batch}.json").write_text(json.dumps({"holder": "elsewhere:1:abcd", "expires": ten_years,
                                                          "host": "elsewhere", "pid": 1, "started": 1, **ttl}))
    (leases / "b-3.json").write_text(json.dumps({"holder": "elsewhere:2:ef01", "expires": time.time() + 100,
                                                 "host": "elsewhere", "pid": 2, "started": 1, "ttl_s": 120}))
    assert leased_batches(ledger) == {"b-3"}  # a believable lease of another host is still respected
    code, out, _ = _run(["status", "--dataset", uri], capsys)
    named = [line for line in out.splitlines() if "further ahead than its TTL" in line]
    assert code == 0 and len(named) == 2 and "lease of batch b-1" in named[0] and "10 years from now" in named[0]
    assert "TTL (120 s)" in named[0] and "TTL (3600 s, assumed)" in named[1] and "treated as stale" in named[0]
    code, out, _ = _run(["status", "--dataset", uri, "--json"], capsys)
    assert code == 0 and len(json.loads(out)["leases"]) == 2
    with hold(ledger, "b-1", ttl_s=120) as lease:  # what a build's batch does: taken at once, not waited out
        assert lease is not None and not lease.held_by_other()
    assert Lease(ledger, "b-2", ttl_s=120).acquire(settle_s=0)
    assert not Lease(ledger, "b-3", ttl_s=120).acquire(settle_s=0)
    assert _visible(uri) == (12, 12)


# -- 6. status and publish arguments; free space judged against a batch ------------------------------------


def test_status_of_a_file_and_publish_max_file_mb_below_one_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: ``status --dataset FILE`` was a NotADirectoryError traceback; ``--max-file-mb 0`` and ``-1`` were
    accepted (one output file per shard)."""
    uri = str(tmp_path / "ds")
    _build(uri)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a dataset")
    for command in ("status", "verify", "files", "gc"):
        code, out, err = _run([command, "--dataset", str(a_file)], capsys)
        assert code == 2 and out == ""
        assert _one_error(err, command) == f"weightzoo {command}: error: --dataset {a_file} is a file, not a dataset folder"
    for value in ("0", "-1", "x"):
        code, out, err = _run(["publish", "--dataset", uri, "--out", str(tmp_path / "hub"), "--max-file-mb", value],
                              capsys)
        usage, line = err.split("weightzoo publish: error: ")
        assert code == 2 and out == "" and usage.startswith("usage: weightzoo publish ") and line.count("\n") == 1
        assert line.startswith("argument --max-file-mb: ")
    assert not (tmp_path / "hub").exists()
    assert _visible(uri) == (12, 12)



@needs_mount
def test_status_judges_free_space_against_what_a_batch_needs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: under 64 MiB free was "no space left" (exit 1), even right after a build of small shards on a
    disk with room for many more. Now the warning compares free space with the largest committed shard."""
    big = 1 << 17  # fp16 values per row: 4 rows are a 1 MiB shard
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        uri = str(mnt / "ds")
        ledger = Ledger(uri)
        layout = Layout(("w",), ((big,),), "float16")
        for b in BATCHES:
            assert commit_batch(ledger, b, layout, *rows_for(b, PER_BATCH, big), RECIPE) is not None
        code, out, _ = _run(["status", "--dataset", uri], capsys)
        assert code == 0 and "no space" not in out and "storage:" not in out  # ~5 MiB free: room for a batch
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (600 << 10)))  # leave 600 KiB
        code, out, _ = _run(["status", "--dataset", uri], capsys)
        (line,) = [line for line in out.splitlines() if "storage:" in line]
        assert code == 1 and "no space left for a batch" in line and "the next batch needs about" in line
        assert _visible(uri) == (12, 12)


# -- 7. a read-only dataset folder ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_mount
def test_repair_and_gc_on_a_read_only_dataset_are_one_line_naming_read_only_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: ``verify --repair`` and ``gc --delete`` ended in an ``OSError: [Errno 30]`` traceback."""
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        uri = str(mnt / "ds")
        _build(uri)
        ledger = Ledger(uri)
        orphan = write_shard(ledger.fs, ledger.new_shard_path("o"), LAYOUT, *rows_for("o", 2, DIM))  # never committed
        os.utime(orphan.path, (time.time() - 7200,) * 2)  # past gc's grace period
        Path(uri, "ledger", "failures").mkdir(parents=True, exist_ok=True)
        Path(uri, "ledger", "failures", "zz-000000000000.json").write_text("garbage{")  # something to repair
        before = _tree(Path(uri))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, out, err = _run(["verify", "--dataset", uri, "--repair"], capsys)
        line = _one_error(err, "verify")
        assert code == 2 and out == "" and f"storage of {uri} cannot be used: quarantining ledger/failures/" in line
        assert "read-only storage" in line
        code, out, err = _run(["gc", "--dataset", uri, "--delete"], capsys)
        line = _one_error(err, "gc")
        assert code == 2 and out == "" and "deleting 1 orphan shard(s)" in line and "read-only storage" in line
        assert _tree(Path(uri)) == before
        assert _visible(uri) == (12, 12)


# -- 8. a fault is named by the operation that failed --------------------------------------------------------


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """Before: ``weightzoo status --json | true`` said "storage ... endpoint does not answer" (exit 2)."""
    uri = str(tmp_path / "ds")
    _build(uri)
    cmd = f"{sys.executable} -m weightzoo.cli status --dataset {uri} --json | true; echo ${{PIPESTATUS[0]}} >&2"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert out.stderr.strip() in ("0", "141"), out.stderr[-3000:]  # 0: it wrote before `true` exited
    assert _visible(uri) == (12, 12)


def test_a_dead_endpoint_is_named_by_the_uri_that_was_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``publish --out s3://…`` blamed the local dataset; ``--manifest s3://…`` was a 155-line traceback."""
    uri = str(tmp_path / "ds")
    _build(uri)
    dead = f"http://127.0.0.1:{_free_port()}"
    for key, value in {"AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    cases = [(["publish", "--dataset", uri, "--out", "s3://wz-probe/hub"], "s3://wz-probe/hub"),
             (["status", "--dataset", uri, "--manifest", "s3://wz-probe/m.jsonl"], "s3://wz-probe/m.jsonl")]
    for argv, touched in cases:
        code, out, err = _run(argv, capsys)
        line = _one_error(err, argv[0])
        assert code == 2 and out == "" and f"storage of {touched} cannot be used: the endpoint does not answer" in line
        assert dead in line and f"storage of {uri}" not in line
    s3fs.S3FileSystem.clear_instance_cache()
    assert _visible(uri) == (12, 12)


def test_a_dead_prefect_api_is_named_by_its_url_not_the_storage(tmp_path: Path) -> None:
    """Before: a Prefect API that does not answer was reported as "storage of D cannot be used: the endpoint
    does not answer ... check AWS_ENDPOINT_URL", for a local dataset."""
    uri = str(tmp_path / "ds")
    _build(uri)
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_CLIENT_MAX_RETRIES": "0"}
    out = subprocess.run([sys.executable, "-m", "weightzoo.cli", "fit-subspace", "--dataset", uri, "--out",
                          str(tmp_path / "sub"), "--components", "2"], capture_output=True, text=True, env=env,
                         timeout=300)
    line = _one_error(out.stderr, "fit-subspace")
    assert out.returncode == 2 and f"the Prefect API ({api}) does not answer" in line and "storage" not in line
    assert not (tmp_path / "sub").exists()
    assert _visible(uri) == (12, 12)


@pytest.mark.parametrize("sig,to_group", [("SIGINT", True), ("SIGTERM", False)])
def test_an_interrupt_is_one_line_and_its_exit_code(sig: str, to_group: bool, tmp_path: Path) -> None:
    """A command blocked reading (a FIFO manifest nobody writes to) stopped by a real signal, sent to its process
    group as a terminal does (SIGINT) or to the process as ``kill`` does (SIGTERM): one line, 128 + signal.
    The time to exit is printed (``pytest -s``), not asserted."""
    uri = str(tmp_path / "ds")
    _build(uri)
    fifo = tmp_path / "manifest.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "weightzoo.cli", "status", "--dataset", uri, "--manifest", str(fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    writer = None
    while writer is None and proc.poll() is None:  # the command has opened the FIFO once a writer can open it
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
    signum = getattr(signal, sig)
    sent = time.perf_counter()
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    print(f"\n  {sig} to the {'group' if to_group else 'process'}: exited in {time.perf_counter() - sent:.2f} s")
    if writer is not None:
        os.close(writer)
    assert proc.returncode == 128 + signum and out == ""
    assert _one_error(err, "status") == f"weightzoo status: error: interrupted by {sig}"
    assert _visible(uri) == (12, 12)


def test_a_manifest_piped_through_a_fifo_is_read_as_a_stream(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A FIFO (or `--manifest <(...)`) cannot seek: it is read to its end, not refused with a traceback."""
    import threading

    fifo = tmp_path / "manifest.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "ds" / "ledger").mkdir(parents=True)
    rows = "".join(json.dumps({"id": f"s{i}", "images": ["a.png"]}) + "\n" for i in range(3))
    writer = threading.Thread(target=fifo.write_text, args=(rows,))
    writer.start()
    assert main(["status", "--dataset", str(tmp_path / "ds"), "--manifest", str(fifo)]) == 0
    writer.join()
    assert "0 committed in 0 shards, 0 failed, 3 pending of 3" in capsys.readouterr().out
