"""A published dataset as a Hub user meets it: the card's snippet loads a row into diffusers, typed weights.

The card's code is executed as written, on a snapshot moved away from where it was published (so no
machine path can help it): the state dict it builds is exactly ``weightzoo``'s own, and
``load_lora_weights`` with it changes the tiny SD pipeline's picture. fp16 weights are a list feature
that ``with_format("torch")`` turns into an ``(n, D)`` tensor; the peft export names its base; a bad
``--repo-id`` is one line before anything is written. Every test ends by counting rows and unique ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO

import weightzoo
from weightzoo.cli import main
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.publish import DENOISERS, publish
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.finetune.export import FINGERPRINT_BASE, PEFT_CONFIG_NAME, lora_state_dict
from weightzoo.tasks.identity.families import FAMILIES

REPO_ID = "acme/tiny-loras"
HPARAMS = {"rank": 1, "alpha": 4.0, "family": "sd", "method": "lora"}
IDS = ["ann", "bob", "cy"]
# A path-like token that starts at a word boundary: "/tmp/x" in code or prose, not "ORG/NAME" or "a / b".
ABSOLUTE = re.compile(r"(?<![\w.~…/-])(?:[A-Za-z]:[\\/]|~/|/)[\w.-]+")


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_dataset`` converts into a cache: keep it in the test's folder, not ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def sd_rows(tiny_pipe, tiny_base: Path) -> tuple[Layout, np.ndarray, str]:
    """Three fp16 rank-1 LoRAs on the tiny UNet's to_q/to_v, large enough to change its picture; and the base's
    fingerprint."""
    from weightzoo.tasks.identity.base_model import base_fingerprint

    g = torch.Generator().manual_seed(0)
    linears = {n: m for n, m in tiny_pipe.unet.named_modules() if n.endswith(("to_q", "to_v"))}
    rows = []
    for _ in IDS:
        sd = {}
        for name, m in linears.items():
            sd[f"{name}.lora_A.weight"] = torch.randn(1, m.in_features, generator=g) / m.in_features**0.5
            sd[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 1, generator=g) * 0.5
        rows.append(sd)
    layout = Layout.from_state_dict(rows[0], dtype="float16")
    weights = layout.to_numpy(torch.stack([layout.flatten(sd) for sd in rows]))
    return layout, weights, base_fingerprint(str(tiny_base))


def commit_rows(root: Path, layout: Layout, weights: np.ndarray, base_fp: str, hparams: dict = HPARAMS) -> str:
    """A dataset of the rows, committed as a build commits them; returns its URI."""
    rows = [RowMeta(id=i, prompt="sks person", attributes={"n": str(k)}, base_model=base_fp, hparams=hparams)
            for k, i in enumerate(IDS)]
    commit_batch(Ledger(str(root)), "b-0", layout, rows, weights, base_model=base_fp)
    return str(root)


@pytest.fixture
def sd_dataset(sd_rows: tuple[Layout, np.ndarray, str], tmp_path: Path) -> str:
    """The rows in a dataset whose config names a path of this machine (the card must not repeat it)."""
    return commit_rows(tmp_path / "ds", *sd_rows, hparams={**HPARAMS, "cache_dir": str(tmp_path / "cache")})


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def counts(ds) -> tuple[int, int]:
    """(rows, unique ids) of a ``datasets.Dataset``."""
    return ds.num_rows, len(set(ds["id"]))


def test_card_snippet_loads_a_row_that_changes_the_picture_from_a_moved_copy(
    sd_dataset: str, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(sd_dataset, str(tmp_path / "work" / "hub"), repo_id=REPO_ID)
    moved = tmp_path / "elsewhere" / REPO_ID  # a local copy named like the repo: the snippet runs as written
    moved.parent.mkdir(parents=True)
    shutil.move(tmp_path / "work" / "hub", moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    card = (moved / "README.md").read_text()
    assert str(tmp_path) not in card and os.path.expanduser("~") not in card and ABSOLUTE.findall(card) == []
    assert f'repo = "{REPO_ID}"' in card and f"hf upload {REPO_ID} . --repo-type dataset" in card
    assert "pretty_name: tiny-loras" in card

    decode, load = python_blocks(card)
    ns: dict = {}
    exec(decode, ns)
    meta, row = Dataset(sd_dataset).row(ns["row"]["id"])
    want = lora_state_dict(row, Dataset(sd_dataset).layout, meta["hparams"])  # weightzoo's own export
    assert sorted(ns["lora"]) == sorted(want) and all(k.startswith("unet.") for k in want)
    for key, t in want.items():
        assert torch.equal(ns["lora"][key], t), key

    exec(load.replace('"BASE_MODEL"', repr(str(tiny_base))), ns)  # the card's own load code, on the tiny base
    pipe = ns["pipe"]
    pipe.set_progress_bar_config(disable=True)

    def picture() -> torch.Tensor:
        return pipe("sks person", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    with_lora = picture()
    pipe.unload_lora_weights()
    assert (with_lora - picture()).abs().max() > 1e-3
    assert {n: f.denoiser for n, f in FAMILIES.items()} == DENOISERS  # the card's family → prefix table
    assert counts(ns["ds"]) == (3, 3)


def test_placeholder_repo_reads_layout_from_the_hub_unless_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --repo-id the card says to replace ORG/NAME; a repo id (not a folder) takes the Hub path."""
    import datasets
    import huggingface_hub

    layout = Layout(("x.attn.to_q.lora_A.weight", "x.attn.to_q.lora_B.weight"), ((1, 4), (3, 1)), "float32")
    w = layout.to_numpy(torch.randn(3, layout.numel, generator=torch.Generator().manual_seed(1)))
    flux = {**HPARAMS, "family": "flux"}  # a transformer family: the prefix follows the row's family
    dataset = commit_rows(tmp_path / "ds", layout, w, "flux-0123", flux)
    hub = tmp_path / "hub"
    publish(dataset, str(hub))
    card = (hub / "README.md").read_text()
    assert 'repo = "ORG/NAME"  # replace with the Hub repo id' in card and "hf upload ORG/NAME ." in card
    asked: list[tuple] = []
    load = datasets.load_dataset

    def hf_hub_download(repo: str, filename: str, repo_type: str) -> str:
        asked.append((repo, filename, repo_type))
        return str(hub / filename)

    def load_dataset(path: str, split: str):
        asked.append((path, split))
        return load(str(hub), split=split)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)  # no folder named like the repo here
    ns: dict = {}
    exec(python_blocks(card)[0].replace('"ORG/NAME"', repr(REPO_ID)), ns)
    assert asked == [(REPO_ID, "layout.json", "dataset"), (REPO_ID, "train")]
    row = w[IDS.index(ns["row"]["id"])]
    want = lora_state_dict(row, layout, flux)
    assert sorted(ns["lora"]) == sorted(want) and all(k.startswith("transformer.") for k in want)
    for key, t in want.items():
        assert torch.equal(ns["lora"][key], t), key
    assert counts(ns["ds"]) == (3, 3)


def _doc_section(title: str) -> str:
    """The python blocks of docs/READING.md's shared decoder and section ``title``."""
    doc = (REPO / "docs" / "READING.md").read_text()
    sections = [s for s in doc.split("\n## ") if s.startswith(("Columns and the weights", title))]
    return "\n".join(b for s in sections for b in python_blocks(s))


def test_fp16_weights_are_a_list_feature_torch_reads_as_n_by_d(sd_dataset: str, tmp_path: Path) -> None:
    import datasets

    hub = tmp_path / "hub"
    report = publish(sd_dataset, str(hub))
    meta, x = weightzoo.weights(sd_dataset)
    n, d = x.shape
    assert pq.read_schema(hub / report.files[0]).field("weights").type == pa.list_(pa.float16(), d)
    assert weightzoo.open_dataset(sd_dataset).schema.field("weights").type == pa.binary(2 * d)  # shards unchanged
    loaded = datasets.load_dataset(str(hub), split="train")
    assert loaded.features["weights"] == datasets.List(datasets.Value("float16"), length=d)
    weights = loaded.with_format("torch")["weights"][:]
    assert isinstance(weights, torch.Tensor) and weights.shape == (n, d)
    order = [meta.column("id").to_pylist().index(i) for i in loaded["id"]]
    assert torch.equal(weights, x[order])  # fp16 → float32 in both: exactly the same values
    ns: dict = {}  # READING.md's `datasets` snippet takes the same path
    exec(_doc_section("Hugging Face `datasets`").replace("work/demo/hub", str(hub)), ns)
    assert torch.equal(ns["weights"], weights) and ns["ids"] == loaded["id"]
    assert counts(loaded) == (3, 3)


def test_peft_export_names_the_base_the_rows_were_trained_on(
    sd_dataset: str, sd_rows: tuple, tiny_base: Path, tmp_path: Path
) -> None:
    from weightzoo.flows.build_checks import record_config
    from weightzoo.flows.config import BuildConfig


    def base_of(out: Path) -> str | None:
        assert main(["export", "--dataset", sd_dataset, "--id", "ann", "--out", str(out), "--format", "peft"]) == 0
        return json.loads((out / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"]

    # committed without a build: only the fingerprint is known, and it says so
    assert base_of(tmp_path / "p0") == f"{FINGERPRINT_BASE}{sd_rows[2]}"
    record_config(BuildConfig(manifest=str(tmp_path / "m.jsonl"), base=str(tiny_base), dataset=sd_dataset))
    assert base_of(tmp_path / "p1") == str(tiny_base)  # the base the build loaded, as peft records a local base
    ds = weightzoo.open_dataset(sd_dataset)
    ids = ds.to_table(columns=["id"]).column("id").to_pylist()
    assert (len(ids), len(set(ids))) == (3, 3)


def test_a_bad_repo_id_is_one_line_and_writes_nothing(sd_dataset: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hub"
    for bad in ["acme", "acme/x/y", "acme/-x", "a--b/c", "acme/x.git", "acme/x..y", "acme/ná", "/abs", ""]:
        assert main(["publish", "--dataset", sd_dataset, "--out", str(out), "--repo-id", bad]) == 2, bad
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "--repo-id" in captured.err
        assert not out.exists(), bad
    assert main(["publish", "--dataset", sd_dataset, "--out", str(out), "--repo-id", REPO_ID]) == 0
    assert f"hf upload {REPO_ID} {out} . --repo-type dataset" in capsys.readouterr().out
    table = pq.read_table(out / "data")
    assert (table.num_rows, len(set(table.column("id").to_pylist()))) == (3, 3)
