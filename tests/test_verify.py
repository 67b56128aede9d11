"""Verification: corrupt or missing shards and garbage ledger files are caught by every reader, named by
``weightzoo verify``, quarantined by ``--repair`` (their ids become pending), and a rebuild restores them.
Stale temp files stay out of directory reads and are collected by gc. On local disk and on moto S3."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import numpy as np
import pyarrow.dataset as pads
import pytest
from shard_writer_proc import rows_for

from weightzoo.cli import main
from weightzoo.errors import CorruptShardError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.gc import collect
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import COMMITS, FAILURES, QUARANTINE, CommitEntry, Ledger
from weightzoo.storage.shards import TMP_DIR
from weightzoo.storage.writer import commit_batch

DIM = 64
LAYOUT = Layout(("w",), ((DIM,),), "float16")
BATCHES = ("a", "b", "c")
PER_BATCH = 4
ALL_IDS = [f"{b}-{i}" for b in BATCHES for i in range(PER_BATCH)]
N = len(ALL_IDS)


def _commit(ledger: Ledger, batch: str) -> CommitEntry:
    rows, w = rows_for(batch, PER_BATCH, DIM)
    entry = commit_batch(ledger, batch, LAYOUT, rows, w, row_group_size=2)
    assert entry is not None
    return entry


def _build(uri: str) -> dict[str, CommitEntry]:
    ledger = Ledger(uri)
    return {b: _commit(ledger, b) for b in BATCHES}


def _visible(uri: str) -> tuple[int, int]:
    """(visible rows, unique visible ids), read through the verified reader with weights."""
    ids = [i for t, _ in Dataset(uri).iter_batches(["id"]) for i in t.column("id").to_pylist()]
    return len(ids), len(set(ids))


def _flip_weight_byte(ledger: Ledger, entry: CommitEntry) -> None:
    """Flip one bit inside row 1's weights: the file keeps its size and still parses."""
    path = ledger.abspath(entry.shard)
    data = ledger.fs.cat_file(path)
    at = data.find(rows_for(entry.batch, PER_BATCH, DIM)[1][1].tobytes()) + 5
    assert at > 5
    ledger.fs.pipe_file(path, data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    assert ledger.fs.size(path) == entry.nbytes


def _rebuild(uri: str, batch: str) -> None:
    """What the next build does for the pending ids of ``batch``: a new attempt, a new shard, a commit."""
    ledger = Ledger(uri)
    assert ledger.pending(ALL_IDS) == [f"{batch}-{i}" for i in range(PER_BATCH)]
    _commit(ledger, batch)
    assert ledger.pending(ALL_IDS) == []


def _quarantine_names(ledger: Ledger) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in ledger.fs.find(ledger.abspath(QUARANTINE)))


def test_flipped_byte_is_caught_everywhere_then_repaired(
    dataset_root: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _build(dataset_root)
    ledger = Ledger(dataset_root)
    bad = entries["b"]
    _flip_weight_byte(ledger, bad)

    with pytest.raises(CorruptShardError, match=f"shard {bad.shard} fails its checksum"):
        list(Dataset(dataset_root).iter_batches())
    with pytest.raises(CorruptShardError, match=f"shard {bad.shard} fails its checksum"):
        Dataset(dataset_root).row("b-0")  # row 0 is intact, but its shard is not: refused
    out_file = tmp_path / "lora.safetensors"
    capsys.readouterr()
    assert main(["export", "--dataset", dataset_root, "--id", "b-0", "--out", str(out_file)]) == 2
    err = capsys.readouterr().err  # a user error: one line naming the shard, no traceback
    assert err.count("\n") == 1 and f"shard {bad.shard} fails its checksum" in err
    assert not out_file.exists()
    assert Dataset(dataset_root).row("a-1")[1].tobytes() == rows_for("a", PER_BATCH, DIM)[1][1].tobytes()
    assert len(Dataset(dataset_root).metadata(["id"])) == N  # metadata-only reads check the size only

    assert main(["verify", "--dataset", dataset_root]) == 1
    out = capsys.readouterr().out
    assert f"BAD {bad.shard}" in out and "fails its checksum" in out and "--repair" in out
    assert entries["a"].shard not in out

    assert main(["verify", "--dataset", dataset_root, "--repair", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [p["shard"] for p in report["problems"]] == [bad.shard]
    assert report["quarantined"] == [f"{QUARANTINE}/commits/{bad.name}"]
    assert _quarantine_names(ledger) == sorted([bad.name, bad.name.removesuffix(".json") + ".reason.json"])
    sidecar = json.loads(ledger.fs.cat_file(ledger.abspath(f"{QUARANTINE}/commits/{bad.name.removesuffix('.json')}.reason.json")))
    assert "checksum" in sidecar["reason"] and sidecar["origin"] == f"{COMMITS}/{bad.name}"
    assert main(["verify", "--dataset", dataset_root]) == 0
    assert main(["status", "--dataset", dataset_root]) == 0
    assert f"quarantined {COMMITS}/{bad.name}" in capsys.readouterr().out

    assert _visible(dataset_root) == (N - PER_BATCH, N - PER_BATCH)
    _rebuild(dataset_root, "b")
    assert _visible(dataset_root) == (N, N)


def test_deleted_shard_is_reported_missing_then_repaired(dataset_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    entries = _build(dataset_root)
    ledger = Ledger(dataset_root)
    gone = entries["c"]
    ledger.fs.rm(ledger.abspath(gone.shard))

    assert main(["status", "--dataset", dataset_root, "--json"]) == 1  # a problem: non-zero, same JSON
    st = json.loads(capsys.readouterr().out)
    assert st["missing_shards"] == [{"shard": gone.shard, "entry": f"{COMMITS}/{gone.name}", "ids": PER_BATCH}]
    assert main(["status", "--dataset", dataset_root]) == 1
    assert f"missing shard {gone.shard}" in capsys.readouterr().out

    with pytest.raises(CorruptShardError, match=f"shard {gone.shard} is missing"):
        list(Dataset(dataset_root).iter_batches(["id"], weights=False))
    with pytest.raises(CorruptShardError, match=f"shard {gone.shard} is missing"):
        Dataset(dataset_root).row("c-2")

    assert main(["verify", "--dataset", dataset_root]) == 1
    out = capsys.readouterr().out
    assert f"BAD {gone.shard}" in out and "is missing" in out
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 1
    assert "4 id(s) are pending again" in capsys.readouterr().out
    assert main(["status", "--dataset", dataset_root, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["missing_shards"] == [] and [q["origin"] for q in st["quarantined"]] == [f"{COMMITS}/{gone.name}"]
    assert "is missing" in st["quarantined"][0]["reason"]

    assert _visible(dataset_root) == (N - PER_BATCH, N - PER_BATCH)
    _rebuild(dataset_root, "c")
    assert _visible(dataset_root) == (N, N)


def test_garbage_ledger_files_are_named_then_quarantined(
    dataset_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _build(dataset_root)
    ledger = Ledger(dataset_root)
    bad_commit = f"{COMMITS}/z-0123456789ab.json"
    bad_failure = f"{FAILURES}/z-abcdef012345.json"
    ledger.record_failures("z", [("z-0", "loss became NaN at step 3")])  # a good record stays
    ledger.fs.pipe_file(ledger.abspath(bad_commit), b'{"batch": "z", "ids": [')  # a truncated write
    ledger.fs.pipe_file(ledger.abspath(bad_failure), b"\xff\xfe not json")

    with pytest.raises(CorruptShardError, match=rf"{bad_commit} is unreadable .*run weightzoo verify --repair"):
        Dataset(dataset_root)
    with pytest.raises(CorruptShardError, match=bad_commit):
        ledger.pending(ALL_IDS)
    assert main(["status", "--dataset", dataset_root]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad_commit in err and "weightzoo verify --repair" in err

    assert main(["verify", "--dataset", dataset_root]) == 1
    out = capsys.readouterr().out
    assert bad_commit in out and bad_failure in out and "unreadable ledger file" in out
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 1
    capsys.readouterr()
    assert not ledger.fs.exists(ledger.abspath(bad_commit)) and not ledger.fs.exists(ledger.abspath(bad_failure))
    kept = ledger.fs.cat_file(ledger.abspath(f"{QUARANTINE}/commits/z-0123456789ab.json"))
    assert kept == b'{"batch": "z", "ids": ['  # the file is kept, byte for byte, for audit
    assert main(["status", "--dataset", dataset_root, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["quarantined"]) == 2
    assert main(["verify", "--dataset", dataset_root]) == 0

    assert Ledger(dataset_root).pending(ALL_IDS) == []
    assert list(Ledger(dataset_root).failed()) == ["z-0"]
    assert _visible(dataset_root) == (N, N)


def test_stale_temp_is_invisible_to_directory_reads_and_collected(
    dataset_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _build(dataset_root)
    ledger = Ledger(dataset_root)
    # what a writer killed mid-shard leaves: the first half of a shard, no footer, under shards/_tmp/
    whole = ledger.fs.cat_file(ledger.abspath(entries["a"].shard))
    temp = f"shards/{TMP_DIR}/d-0123456789ab.parquet.tmp-0123456789ab"
    ledger.fs.pipe_file(ledger.abspath(temp), whole[: len(whole) // 2])

    found = pads.dataset(ledger.abspath("shards"), format="parquet", filesystem=ledger.fs)
    assert sorted(f.rsplit("/", 1)[-1] for f in found.files) == sorted(e.shard.rsplit("/", 1)[-1] for e in entries.values())
    assert found.to_table(columns=["id"]).num_rows == N

    local = not dataset_root.startswith("s3://")
    if local:  # backdate it; S3 times cannot be, so there the grace is shown as "1h keeps, 0s collects"
        t = time.time() - 3 * 3600
        os.utime(ledger.abspath(temp), (t, t))
    report = collect(dataset_root, timedelta(hours=1), delete=False)
    assert [t.path for t in report.temps] == ([temp] if local else []) and report.orphans == []
    if local:
        assert main(["gc", "--dataset", dataset_root, "--older-than", "1h", "--delete"]) == 0
        out = capsys.readouterr().out
        assert "removed 0 orphan shards and 1 stale temp file," in out and temp in out
    else:  # a temp younger than the lease TTL may be a write in flight: kept even at 0s, unless the TTL is 0
        assert main(["gc", "--dataset", dataset_root, "--older-than", "0s", "--delete"]) == 0
        assert "removed 0 orphan shards and 0 stale temp files," in capsys.readouterr().out
        assert ledger.fs.exists(ledger.abspath(temp))
        assert [t.path for t in collect(dataset_root, timedelta(0), delete=True, lease_ttl=timedelta(0)).temps] == [temp]
    assert not ledger.fs.exists(ledger.abspath(temp))

    assert main(["verify", "--dataset", dataset_root]) == 0
    assert _visible(dataset_root) == (N, N)


def test_verified_read_returns_the_written_weights(dataset_root: str) -> None:
    """Verification on by default changes nothing for a good dataset: same rows, same bytes, each once."""
    _build(dataset_root)
    seen: dict[str, bytes] = {}
    for table, w in Dataset(dataset_root).iter_batches(["id"]):
        for k, i in enumerate(table.column("id").to_pylist()):
            seen[i] = w[k].tobytes()
    for b in BATCHES:
        _, expected = rows_for(b, PER_BATCH, DIM)
        assert all(seen[f"{b}-{i}"] == expected[i].tobytes() for i in range(PER_BATCH))
    assert np.array_equal(Dataset(dataset_root).row("c-3")[1], rows_for("c", PER_BATCH, DIM)[1][3])
    assert _visible(dataset_root) == (N, N)


def test_status_of_a_missing_dataset_is_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--dataset", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no dataset at" in err
    assert main(["verify", "--dataset", str(tmp_path / "nope")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


# -- nothing leaves unverified: publish, open_dataset, files ----------------------------------------------


def _published(out) -> tuple[int, int]:
    """(rows, unique ids) of a published folder."""
    import pyarrow.parquet as pq

    ids = pq.read_table(os.path.join(out, "data"), columns=["id"]).column("id").to_pylist()
    return len(ids), len(set(ids))


@pytest.mark.parametrize("fault", ["flipped-byte", "same-size-swap"])
def test_publish_refuses_a_bad_shard_or_leaves_it_out(
    fault: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed shard (one byte, or another valid shard of the same size) is never published silently."""
    from weightzoo.storage.open import open_dataset

    uri = str(tmp_path / "ds")
    entries = _build(uri)
    ledger, bad = Ledger(uri), entries["b"]
    if fault == "flipped-byte":
        _flip_weight_byte(ledger, bad)
    else:  # a's shard copied over b's: valid Parquet, the same size, other rows
        ledger.fs.pipe_file(ledger.abspath(bad.shard), ledger.fs.cat_file(ledger.abspath(entries["a"].shard)))
        assert ledger.fs.size(ledger.abspath(bad.shard)) == bad.nbytes
    out = tmp_path / "pub"
    capsys.readouterr()
    assert main(["publish", "--dataset", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"shard {bad.shard}" in err and "--skip-bad" in err
    assert not out.exists()  # refused before anything was written

    with pytest.raises(CorruptShardError, match=f"shard {bad.shard}"):
        open_dataset(uri, verify=True)
    assert open_dataset(uri).count_rows() == N  # a plain reader checks sizes only (docs/READING.md)
    assert main(["files", "--dataset", uri, "--verify"]) == 2
    assert f"shard {bad.shard}" in capsys.readouterr().err

    assert main(["publish", "--dataset", uri, "--out", str(out), "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert f"published {N - PER_BATCH} rows" in printed and f"left out {bad.shard} ({PER_BATCH} ids)" in printed
    assert _published(out) == (N - PER_BATCH, N - PER_BATCH)

    assert main(["verify", "--dataset", uri, "--repair"]) == 1
    _rebuild(uri, "b")
    assert main(["publish", "--dataset", uri, "--out", str(out)]) == 0
    assert _published(out) == (N, N)
    assert _visible(uri) == (N, N)


# -- verify: the card, one layout, shards without an entry --------------------------------------------------


def _build_with_recipe(uri: str) -> None:
    from weightzoo.storage.card import Recipe

    recipe = Recipe("lora", "base-fp", "cfg-fp", {"rank": 1, "steps": 2})
    ledger = Ledger(uri)
    for b in BATCHES:
        rows, w = rows_for(b, PER_BATCH, DIM)
        assert commit_batch(ledger, b, LAYOUT, rows, w, recipe) is not None


def test_garbage_card_is_reported_and_rebuilt_from_the_commits(
    dataset_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from weightzoo.storage.card import CARD, read_card

    _build_with_recipe(dataset_root)
    ledger = Ledger(dataset_root)
    good = read_card(ledger)
    assert good is not None and good.layout == LAYOUT.fingerprint
    ledger.fs.pipe_file(ledger.abspath(CARD), b"\x00garbage{")
    capsys.readouterr()
    assert main(["status", "--dataset", dataset_root]) == 1
    assert "dataset card" in capsys.readouterr().out
    assert main(["status", "--dataset", dataset_root, "--json"]) == 1
    assert any("dataset card" in p for p in json.loads(capsys.readouterr().out)["storage"])
    assert main(["verify", "--dataset", dataset_root]) == 1
    assert f"BAD {CARD}" in capsys.readouterr().out
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 1
    assert "rebuilt dataset_card.json" in capsys.readouterr().out
    assert read_card(Ledger(dataset_root)) == good
    assert main(["verify", "--dataset", dataset_root]) == 0
    assert main(["status", "--dataset", dataset_root]) == 0
    assert _visible(dataset_root) == (N, N)


def test_garbage_card_is_not_rebuilt_from_commits_without_a_recipe(dataset_root: str, capsys) -> None:
    from weightzoo.storage.card import CARD

    _build(dataset_root)  # entries written without a recipe
    ledger = Ledger(dataset_root)
    ledger.fs.pipe_file(ledger.abspath(CARD), b"[]")
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 1
    assert "not rebuilt: some commit entries record no recipe" in capsys.readouterr().out
    assert ledger.fs.cat_file(ledger.abspath(CARD)) == b"[]"  # left for a person to fix
    assert _visible(dataset_root) == (N, N)


def test_a_shard_of_another_layout_copied_in_with_its_entry_is_reported(
    dataset_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _build(dataset_root)
    other_uri = dataset_root + "-other"
    wide = Layout(("w",), ((DIM + 8,),), "float16")
    rows, w = rows_for("x", 2, DIM + 8)
    foreign = commit_batch(Ledger(other_uri), "x", wide, rows, w)
    assert foreign is not None
    ledger, other = Ledger(dataset_root), Ledger(other_uri)
    for rel in (foreign.shard, f"{COMMITS}/{foreign.name}"):
        ledger.fs.pipe_file(ledger.abspath(rel), other.fs.cat_file(other.abspath(rel)))
    capsys.readouterr()
    assert main(["verify", "--dataset", dataset_root]) == 1
    out = capsys.readouterr().out
    assert f"BAD {foreign.shard}" in out and f"has layout {wide.fingerprint}, the dataset's is {LAYOUT.fingerprint}" in out
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 1
    assert main(["verify", "--dataset", dataset_root]) == 0
    assert _visible(dataset_root) == (N, N)


def test_a_shard_whose_entry_was_deleted_is_reported_not_deleted(
    dataset_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = _build(dataset_root)
    ledger, lost = Ledger(dataset_root), entries["a"]
    ledger.fs.rm(ledger.abspath(f"{COMMITS}/{lost.name}"))
    capsys.readouterr()
    assert main(["verify", "--dataset", dataset_root, "--repair"]) == 0  # not a problem of the committed rows
    assert f"uncommitted {lost.shard}: no commit entry points at it" in capsys.readouterr().out
    assert ledger.fs.exists(ledger.abspath(lost.shard))
    assert _visible(dataset_root) == (N - PER_BATCH, N - PER_BATCH)
    _rebuild(dataset_root, "a")
    assert _visible(dataset_root) == (N, N)
