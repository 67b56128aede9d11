"""The dataset in everyone's tools: pyarrow, DuckDB, polars, pandas and Hugging Face ``datasets``.

Every reader runs against one hostile dataset, on local disk and on (moto) S3: a duplicate-commit
race (two entries list the id ``common``; the earlier wins), an entry that lists fewer ids than its
shard holds (``one-0`` committed elsewhere first), an orphan shard (never committed) and stale temp
files (beside the shards and under ``shards/_tmp/``), both holding valid Parquet of real rows. Each
reader must see exactly the 12 visible rows, 12 unique ids, and the bytes of the winning copies.

The reader snippets are not copies: they are executed from docs/READING.md, so the docs stay true.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import REPO

import weightzoo
from weightzoo.cli import main
from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import join
from weightzoo.storage.layout import FixedTensor, Layout
from weightzoo.storage.ledger import COMMITS, Ledger
from weightzoo.storage.publish import publish, publish_schema
from weightzoo.storage.shards import RowMeta, write_shard
from weightzoo.tasks.finetune.export import lora_state_dict

LAYOUT = Layout(("mid.attn.to_q.lora_A.weight", "mid.attn.to_q.lora_B.weight"), ((1, 4), (3, 1)), "bfloat16")
DOC = (REPO / "docs" / "READING.md").read_text()
TEMP = "b-orphan-0123456789ab.parquet.tmp-0123456789ab"


@dataclass
class Zoo:
    uri: str
    expected: dict[str, np.ndarray]  # visible id → its weights as stored (bf16 bits as int16)


def _shard(ledger: Ledger, batch: str, ids: list[str]) -> tuple:
    """A real shard of bf16 rows; every batch draws its own weights, so two copies of an id differ."""
    g = torch.Generator().manual_seed(sum(map(ord, batch)))
    w = LAYOUT.to_numpy(torch.randn(len(ids), LAYOUT.numel, generator=g).to(torch.bfloat16))
    rows = [RowMeta(id=i, prompt="sks person", attributes={"batch": batch}, hparams={"rank": 1, "alpha": 27.0})
            for i in ids]
    return write_shard(ledger.fs, ledger.new_shard_path(batch), LAYOUT, rows, w), dict(zip(ids, w, strict=True))


def make_zoo(uri: str) -> Zoo:
    ledger = Ledger(uri)
    one, w1 = _shard(ledger, "b-one", [f"one-{i}" for i in range(4)] + ["common"])
    two, w2 = _shard(ledger, "b-two", [f"two-{i}" for i in range(4)] + ["common"])
    # The race, reproduced with real commits: b-two commits first, but b-one's writer read the ledger
    # before that entry landed (moved aside here), so both entries list "common"; the earlier (b-two) wins.
    e2 = ledger.commit("b-two", two)
    aside = join(ledger.root, "aside.json")
    ledger.fs.mv(join(ledger.root, COMMITS, e2.name), aside)
    assert "common" in ledger.commit("b-one", one).ids
    ledger.fs.mv(aside, join(ledger.root, COMMITS, e2.name))
    three, w3 = _shard(ledger, "b-three", [f"three-{i}" for i in range(3)] + ["one-0"])
    assert len(ledger.commit("b-three", three).ids) == 3  # one-0 is b-one's
    orphan, _ = _shard(ledger, "b-orphan", ["orphan-0", "one-1"])
    data = ledger.fs.cat_file(orphan.path)
    for rel in (f"shards/{TEMP}", f"shards/_tmp/{TEMP}"):
        ledger.fs.pipe_file(join(ledger.root, rel), data)
    expected = {**w1, **w2, **{k: v for k, v in w3.items() if k != "one-0"}}
    assert len(expected) == 12
    return Zoo(uri, expected)


@pytest.fixture
def zoo(dataset_root: str) -> Zoo:
    return make_zoo(dataset_root)


def check_rows(ids, weights: torch.Tensor, zoo: Zoo) -> None:
    """Exactly the visible rows, each id once, with the winning copy's bits."""
    ids = list(ids)
    assert len(ids) == len(zoo.expected) and len(set(ids)) == len(zoo.expected)
    assert weights.dtype == torch.bfloat16 and tuple(weights.shape) == (len(ids), LAYOUT.numel)
    got = dict(zip(ids, weights.view(torch.int16).numpy(), strict=True))
    for i, w in zoo.expected.items():
        np.testing.assert_array_equal(got[i], w, err_msg=i)


def card_code(hub: Path | str) -> str:
    """The published card's decode snippet, its placeholder repo replaced by the folder ``hub`` (as a user would)."""
    text = (Path(hub) / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)[0].replace('"ORG/NAME"', repr(str(hub)))


def doc_code(section: str, lang: str = "python") -> str:
    """The ``lang`` code blocks of READING.md's section ``## <section>…``, joined."""
    body = next(s for s in DOC.split("\n## ") if s.startswith(section))
    return "\n".join(re.findall(rf"```{lang}\n(.*?)```", body, re.S))


def run_doc(section: str, uri: str, hub: str = "work/demo/hub") -> dict:
    """Execute the shared decoder, then the section's snippet, on ``uri``; returns its namespace."""
    ns: dict = {}
    exec(doc_code("Columns and the weights"), ns)
    exec(doc_code(section).replace('"work/demo/dataset"', repr(uri)).replace("work/demo/hub", hub), ns)
    return ns


@pytest.mark.parametrize("section", ["pyarrow", "DuckDB", "polars", "pandas"])  # short name: S3 buckets are named after tests
def test_doc_snippet(zoo: Zoo, section: str) -> None:
    ns = run_doc(section, zoo.uri)
    check_rows(ns["ids"], ns["weights"], zoo)


def test_open_dataset_is_one_dataset_every_reader_counts_the_same(zoo: Zoo) -> None:
    ds = weightzoo.open_dataset(zoo.uri)
    assert Layout.from_json(ds.schema.metadata[b"weightzoo.layout"]) == LAYOUT
    assert set(ds.to_table(columns=["shard"]).column("shard").to_pylist()) == {
        e.shard for e in Ledger(zoo.uri).commits()
    }
    n = len(zoo.expected)
    assert duckdb.sql("select count(*), count(distinct id) from ds").fetchall()[0] == (n, n)
    # a pushed-down filter on top of the dataset's own: the race's loser stays hidden
    assert duckdb.sql("select count(*) from ds where id = 'common'").fetchall()[0] == (1,)
    lf = pl.scan_pyarrow_dataset(ds)
    assert lf.select(pl.len(), pl.col("id").n_unique()).collect().row(0) == (n, n)
    assert lf.filter(pl.col("id") == "common").collect()["shard"].to_list() == [
        e.shard for e in Ledger(zoo.uri).commits() if e.batch == "b-two"
    ]
    df = ds.to_table().to_pandas()
    assert (len(df), df["id"].nunique()) == (n, n)
    assert (ds.count_rows(), len(set(ds.to_table(columns=["id"]).column("id").to_pylist()))) == (n, n)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_dataset`` converts into a cache: keep it in the test's folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.usefixtures("hf_cache")
def test_datasets_loads_the_published_snapshot(zoo: Zoo, tmp_path: Path) -> None:
    import datasets

    hub = str(tmp_path / "hub")
    report = publish(zoo.uri, hub)
    assert report.rows == 12 and report.files == ["data/train-00000-of-00001.parquet"]
    ns = run_doc("Hugging Face `datasets`", zoo.uri, hub)
    check_rows(ns["ids"], ns["weights"], zoo)
    assert ns["attributes"] == {"batch": "b-two"}  # row 0 is b-two's, the first committed
    loaded = ns["hub"]
    assert loaded.features == datasets.Features.from_arrow_schema(publish_schema(LAYOUT))
    meta, row = Dataset(zoo.uri).row("common")
    k = list(loaded["id"]).index("common")
    decoded = ns["decode"](loaded[k]["weights"], ns["layout"])[0]
    np.testing.assert_array_equal(decoded.view(torch.int16).numpy(), row)
    assert json.loads(loaded[k]["hparams"]) == meta["hparams"]
    n = duckdb.sql(f"select count(*), count(distinct id) from '{hub}/data/*.parquet'").fetchall()[0]
    assert n == (12, 12)
    card: dict = {}  # the dataset card's own decode snippet works too: bf16 bytes → the diffusers state dict
    exec(card_code(hub), card)
    meta, row = Dataset(zoo.uri).row(card["row"]["id"])
    want = lora_state_dict(row, LAYOUT, meta["hparams"])
    assert sorted(card["lora"]) == sorted(want) == [f"unet.{k}" for k in LAYOUT.keys]
    for key, t in want.items():  # unet. prefix, float32, alpha/rank (27) baked into B: exactly weightzoo's export
        assert card["lora"][key].dtype == torch.float32 and torch.equal(card["lora"][key], t), key
    assert (card["ds"].num_rows, len(set(card["ds"]["id"]))) == (12, 12)


def test_dataset_card_header_and_recipe(zoo: Zoo, tmp_path: Path) -> None:
    publish(zoo.uri, str(tmp_path / "hub"))
    text = (tmp_path / "hub" / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["license"] == "other"
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    assert [f["name"] for f in header["dataset_info"]["features"]] == publish_schema(LAYOUT).names
    assert header["dataset_info"]["splits"][0]["num_examples"] == 12
    assert '"alpha": 27.0' in text and "12 fine-tuned models" in text and LAYOUT.fingerprint in text
    assert Layout.from_json((tmp_path / "hub" / "layout.json").read_text()) == LAYOUT


def test_the_cards_snippet_works_from_any_folder(zoo: Zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Published to a relative folder, the card names no path: its repo, set to the folder, loads it from elsewhere."""
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    publish(zoo.uri, "hub")
    assert 'repo = "ORG/NAME"' in (tmp_path / "work" / "hub" / "README.md").read_text()
    monkeypatch.chdir(tmp_path / "elsewhere")
    card: dict = {}
    exec(card_code(tmp_path / "work" / "hub"), card)
    assert (card["ds"].num_rows, len(set(card["ds"]["id"]))) == (12, 12)


@pytest.mark.usefixtures("hf_cache")
def test_the_cards_snippet_rebuilds_a_layouts_fixed_tensors(tmp_path: Path) -> None:
    """A lora_fa row stores B only: the card says so, and its snippet rebuilds A exactly as ``Layout`` does."""
    fixed = FixedTensor("mid.attn.to_q.lora_A.weight", (2, 4), seed=7, scale=1.5)
    layout = Layout(("mid.attn.to_q.lora_B.weight",), ((3, 2),), "float32", (fixed,))
    ledger = Ledger(str(tmp_path / "ds"))
    w = layout.to_numpy(torch.randn(2, layout.numel, generator=torch.Generator().manual_seed(0)))
    rows = [RowMeta(id=f"r{i}", prompt="sks", attributes={}, hparams={"rank": 2, "alpha": 2.0}) for i in range(2)]
    ledger.commit("b-fa", write_shard(ledger.fs, ledger.new_shard_path("b-fa"), layout, rows, w))
    publish(ledger.root, str(tmp_path / "hub"))
    text = (tmp_path / "hub" / "README.md").read_text()
    assert "plus 1 fixed tensors" in text and Layout.from_json((tmp_path / "hub" / "layout.json").read_text()) == layout
    card: dict = {}
    exec(card_code(tmp_path / "hub"), card)
    row = w[int(card["row"]["id"].removeprefix("r"))]
    want = layout.unflatten(row)
    assert sorted(card["tensors"](card["row"])) == sorted(want)
    for key, t in want.items():
        assert torch.equal(card["tensors"](card["row"])[key], t), key
    for key, t in lora_state_dict(row, layout, {"rank": 2, "alpha": 2.0}).items():  # A rebuilt, B prefixed
        assert torch.equal(card["lora"][key], t), key
    assert (card["ds"].num_rows, len(set(card["ds"]["id"]))) == (2, 2)


def test_publish_resumes_and_replans(tmp_path: Path) -> None:
    zoo = make_zoo(str(tmp_path / "ds"))
    out = tmp_path / "hub"
    first = publish(zoo.uri, str(out), max_file_bytes=1)  # one output file per committed shard
    assert first.files == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)] and first.written == first.files
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    again = publish(zoo.uri, str(out), max_file_bytes=1)
    assert again.written == [] and again.skipped == first.files
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == stamp
    (out / "data" / "train-00001-of-00003.parquet").unlink()  # a run killed before this file
    (out / "data" / "train-00002-of-00003.parquet.tmp-0123456789ab").write_bytes(b"partial")
    resumed = publish(zoo.uri, str(out), max_file_bytes=1)
    assert resumed.written == ["data/train-00001-of-00003.parquet"] and len(resumed.skipped) == 2
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]

    ledger = Ledger(zoo.uri)  # a new commit: four files now, the three-file plan is stale
    info, _ = _shard(ledger, "b-four", ["four-0"])
    ledger.commit("b-four", info)
    replanned = publish(zoo.uri, str(out), max_file_bytes=1)
    assert len(replanned.removed) == 3 and len(replanned.written) == 4 and replanned.rows == 13
    table = pq.read_table(out / "data")
    assert (table.num_rows, len(set(table.column("id").to_pylist()))) == (13, 13)


def test_publish_to_s3_streams_and_resumes(s3_bucket: str, tmp_path: Path) -> None:
    zoo = make_zoo(str(tmp_path / "ds"))
    out = f"{s3_bucket}/hub"
    first = publish(zoo.uri, out, max_file_bytes=1, batch_size=2)
    assert len(first.written) == 3
    fs, _ = fsspec.core.url_to_fs(out)
    ids: list[str] = []
    for name in first.files:
        with fs.open(f"{out}/{name}", "rb") as f:
            pf = pq.ParquetFile(f)
            assert pf.metadata.row_group(0).num_rows <= 2  # streamed in bounded batches
            ids += pf.read(columns=["id"]).column("id").to_pylist()
    assert (len(ids), len(set(ids))) == (12, 12)
    assert fs.exists(f"{out}/README.md") and fs.exists(f"{out}/layout.json")
    assert publish(zoo.uri, out, max_file_bytes=1).skipped == first.files


def test_files_lists_each_visible_id_once(zoo: Zoo, capsys: pytest.CaptureFixture) -> None:
    assert main(["files", "--dataset", zoo.uri, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert Layout.from_json(json.dumps(listing["layout"])) == LAYOUT and listing["rows"] == 12
    assert main(["files", "--dataset", zoo.uri]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(u, i.split(",")) for u, i in lines] == [(f["uri"], f["ids"]) for f in listing["files"]]
    ids, parts = [], []
    for f in listing["files"]:  # what a non-Python tool does: open each URI, keep the listed ids
        assert f["uri"].startswith("s3://") == zoo.uri.startswith("s3://")
        with fsspec.open(f["uri"], "rb") as fh:
            table = pq.read_table(fh, columns=["id", "weights"])
        keep = [k for k, i in enumerate(table.column("id").to_pylist()) if i in set(f["ids"])]
        ids += [table.column("id")[k].as_py() for k in keep]
        parts += [table.column("weights")[k].as_py() for k in keep]
    ns = run_doc("Columns and the weights", zoo.uri)
    check_rows(ids, ns["decode"](parts, listing["layout"]), zoo)


def test_files_sql_snippet_in_duckdb(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    zoo = make_zoo(str(tmp_path / "ds"))
    assert main(["files", "--dataset", zoo.uri]) == 0
    tsv = tmp_path / "files.tsv"
    tsv.write_text(capsys.readouterr().out)
    sql = doc_code("Outside Python", "sql").replace("'files.tsv'", f"'{tsv}'")
    sql = sql.replace("work/demo/dataset", zoo.uri)
    con = duckdb.connect()
    *setup, query = [s for s in sql.split(";") if s.strip()]
    for statement in setup:
        con.execute(statement)
    assert con.sql(query).fetchall()[0] == (12, 12)
    # the glob alone would count the orphan's rows and the race's losing copy
    assert con.sql(f"select count(*) from '{zoo.uri}/shards/*.parquet'").fetchall()[0] == (16,)


def test_missing_or_resized_shard_and_empty_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(NotFoundError):
        weightzoo.open_dataset(str(tmp_path / "empty"))
    assert main(["publish", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no committed rows" in err
    assert main(["files", "--dataset", str(tmp_path / "nowhere")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    zoo = make_zoo(str(tmp_path / "ds"))
    shard = Path(zoo.uri) / Ledger(zoo.uri).commits()[0].shard
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CorruptShardError, match="bytes, its ledger entry says"):
        weightzoo.open_dataset(zoo.uri)
    shard.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        weightzoo.open_dataset(zoo.uri)


def test_import_weightzoo_stays_light() -> None:
    code = "import sys, weightzoo; print(sorted({'pyarrow', 'torch', 'fsspec'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(weightzoo.open_dataset)
