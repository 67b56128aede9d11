"""``build --dry-run`` and ``build --config``, the resolved config recorded with a build, and the Python API
(``weightzoo.build``, ``weightzoo.weights``, ``weightzoo.lora_state_dict``) on real datasets.

The datasets here hold rows of a small real LoRA layout written through the real shard writer and ledger
(random weights: what is tested is reading and converting them, not training); one test trains for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_FINETUNE
from safetensors.torch import load_file

import weightzoo
from weightzoo.cli import main
from weightzoo.errors import NotFoundError
from weightzoo.flows.build_checks import record_config
from weightzoo.flows.config import BuildConfig
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import BUILDS, Ledger
from weightzoo.storage.shards import RowMeta, write_shard
from weightzoo.tasks.finetune.export import PEFT_WEIGHT_NAME, WEIGHT_NAME
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.synthetic import write_demo_manifest

LAYOUT = Layout(keys=("mid.attn.to_q.lora_A.weight", "mid.attn.to_q.lora_B.weight"), shapes=((2, 8), (8, 2)),
                dtype="float32")
HPARAMS = {"alpha": 4, "rank": 2}


def commit_rows(dataset: Path, ids: list[str], seed: int = 0) -> np.ndarray:
    """Commit one shard of ``ids`` with random weights in LAYOUT; returns the weights."""
    weights = np.random.default_rng(seed).standard_normal((len(ids), LAYOUT.numel)).astype(np.float32)
    ledger = Ledger(str(dataset))
    metas = [RowMeta(id=i, hparams=HPARAMS, loss=0.123456789) for i in ids]
    ledger.commit(f"b-{seed}", write_shard(ledger.fs, ledger.new_shard_path(f"b-{seed}"), LAYOUT, metas, weights))
    return weights


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_demo_manifest(str(tmp_path_factory.mktemp("m")), 3, images_per_subject=1, size=16)


def dry_run(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(["build", *argv, "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_prints_the_plan_and_creates_nothing(
    manifest: str, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = dry_run(capsys, "--manifest", manifest, "--base", str(tiny_base), "--dataset", "ds", "--batch-size", "2")
    assert plan["config"]["dataset"] == str(tmp_path / "ds") and plan["config"]["manifest"] == manifest
    assert plan["dataset_exists"] is False and list(tmp_path.iterdir()) == []
    ids = [r.id for r in read_manifest(manifest)]
    assert (plan["manifest_ids"], plan["committed"], plan["to_train"]) == (3, 0, ids)
    assert [len(b["ids"]) for b in plan["batches"]] == [2, 1]
    assert plan["recipe"]["engine"] == "diffusers-lora" and len(plan["recipe"]["config_fingerprint"]) >= 8

    commit_rows(tmp_path / "ds", ids[:1])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    plan = dry_run(capsys, "--manifest", manifest, "--base", str(tiny_base), "--dataset", "ds")
    assert (plan["committed"], plan["to_train"]) == (1, ids[1:])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # only read

    assert main(["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", "ds", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("dry run: nothing trained, nothing written\n") and "1 committed, 2 to train" in text


@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_config_file_takes_the_flags_settings_and_flags_override(
    kind: str, manifest: str, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "cfg"
    folder.mkdir()
    settings = {"manifest": manifest, "base": str(tiny_base), "dataset": "ds", "batch_size": 1, "engine": "diffusers-lora"}
    if kind == "toml":
        text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "\n[finetune]\nsteps = 3\nrank = 2\n"
    else:
        text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()) + "finetune:\n  steps: 3\n  rank: 2\n"
    config = folder / f"build.{kind}"
    config.write_text(text)
    plan = dry_run(capsys, "--config", str(config))
    assert plan["config"]["dataset"] == str(folder / "ds")  # a relative path in the file: against its folder
    assert (plan["config"]["batch_size"], plan["config"]["finetune"]["steps"], plan["config"]["finetune"]["rank"]) == (1, 3, 2)
    assert len(plan["batches"]) == 3
    plan = dry_run(capsys, "--config", str(config), "--batch-size", "2", "--steps", "5")
    assert (plan["config"]["batch_size"], plan["config"]["finetune"]["steps"], plan["config"]["finetune"]["rank"]) == (2, 5, 2)
    assert sorted(p.name for p in folder.iterdir()) == [config.name]

    config.write_text(text.replace("batch_size", "batch_sise"))
    assert main(["build", "--config", str(config), "--dry-run"]) == 2
    assert capsys.readouterr().err == (f"weightzoo build: error: --config {config}: unknown setting 'batch_sise'; "
                                       "did you mean 'batch_size'?\n")


def test_the_resolved_config_is_recorded_where_readers_do_not_look(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = tmp_path / "ds"
    commit_rows(dataset, ["a", "b"])
    request = BuildConfig(manifest="/m.jsonl", base="/base", dataset=str(dataset), batch_size=7)
    uri = record_config(request)
    assert Path(uri).parent == dataset / BUILDS
    assert BuildConfig(**json.loads(Path(uri).read_text())) == request
    assert main(["verify", "--dataset", str(dataset)]) == 0
    assert main(["gc", "--dataset", str(dataset), "--older-than", "0s"]) == 0
    assert "_builds" not in capsys.readouterr().out
    assert weightzoo.open_dataset(str(dataset)).count_rows() == 2


@pytest.mark.usefixtures("prefect_harness")
def test_a_manifest_that_fails_validation_leaves_no_build_record(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    """The manifest parses (so the CLI's first checks pass) but an image does not decode: the build flow
    refuses it before ``_builds/`` is written, in one line, on a new dataset and on one with rows."""
    from helpers import corrupt_image

    folder = tmp_path / "m"
    manifest = write_demo_manifest(str(folder), 2, images_per_subject=1, size=16)
    corrupt_image(folder / "images" / "subject-00001" / "0.png")
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    commit_rows(existing, ["subject-00000"])
    for dataset in (fresh, existing):
        capsys.readouterr()
        assert main(["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", str(dataset)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("weightzoo build: error: 1 problem(s) in 1 row(s) of the manifest") and err.count("\n") == 1
        assert not (dataset / BUILDS).exists()
    assert not fresh.exists()
    ids = weightzoo.weights(str(existing))[0].column("id").to_pylist()
    assert (len(ids), len(set(ids))) == (1, 1)


def test_a_read_only_dataset_folder_is_one_line_and_keeps_its_rows(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    """A dataset on a file system remounted read-only: the build's config record is refused in one line
    (no OSError traceback), exit code 2, and the committed rows are all still there."""
    from helpers import can_mount, tmpfs

    if not can_mount():
        pytest.skip("mounting a tmpfs needs root")
    import subprocess

    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=16)
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        dataset = mnt / "ds"
        commit_rows(dataset, ["subject-00000"])
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        capsys.readouterr()
        code = main(["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", str(dataset)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"weightzoo build: error: storage of {dataset} cannot be used: ") and "Read-only" in err
        assert not (dataset / BUILDS).exists()
        ids = weightzoo.weights(str(dataset))[0].column("id").to_pylist()
        assert (len(ids), len(set(ids))) == (1, 1)


def test_weights_and_lora_state_dict_match_the_export_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = tmp_path / "ds"
    w = commit_rows(dataset, ["a", "b", "c"])
    meta, x = weightzoo.weights(str(dataset), ["c", "a"])
    assert meta.column("id").to_pylist() == ["c", "a"] and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(w[[2, 0]]))
    assert weightzoo.weights(str(dataset))[1].shape == (3, LAYOUT.numel)
    with pytest.raises(NotFoundError, match="'z'"):
        weightzoo.weights(str(dataset), ["a", "z"])

    out = tmp_path / "out"
    assert main(["export", "--dataset", str(dataset), "--id", "b", "--out", str(out / "d" / WEIGHT_NAME)]) == 0
    assert "loss 0.1235," in capsys.readouterr().out  # four significant digits
    assert main(["export", "--dataset", str(dataset), "--id", "b", "--out", str(out / "p"), "--format", "peft"]) == 0
    for fmt, file in (("diffusers", out / "d" / WEIGHT_NAME), ("peft", out / "p" / PEFT_WEIGHT_NAME)):
        sd, exported = weightzoo.lora_state_dict(str(dataset), "b", fmt), load_file(str(file))
        assert sorted(sd) == sorted(exported) and all(torch.equal(sd[k], exported[k]) for k in sd), fmt


def test_weights_of_a_bfloat16_dataset_are_its_values_not_its_bits(tmp_path: Path) -> None:
    layout = Layout(keys=LAYOUT.keys, shapes=LAYOUT.shapes, dtype="bfloat16")
    w = torch.randn(2, layout.numel, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ledger = Ledger(str(tmp_path / "ds"))
    metas = [RowMeta(id=i, hparams=HPARAMS) for i in ("a", "b")]
    ledger.commit("b-0", write_shard(ledger.fs, ledger.new_shard_path("b-0"), layout, metas, layout.to_numpy(w)))
    assert torch.equal(weightzoo.weights(ledger.uri)[1], w.float())
    assert torch.equal(weightzoo.weights(ledger.uri, ["b"], dtype=torch.bfloat16)[1], w[1:])


def test_files_json_lists_the_files_before_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    commit_rows(tmp_path / "ds", ["a"])
    assert main(["files", "--dataset", str(tmp_path / "ds"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["dataset", "rows", "files", "left_out", "layout"] and out["files"][0]["ids"] == ["a"]
    assert out["left_out"] == [] and out["rows"] == 1


@pytest.mark.usefixtures("prefect_harness", "one_thread")
def test_python_build_then_cli_build_with_config_resume_and_record(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=32)
    dataset = tmp_path / "ds"
    with pytest.raises(NotFoundError, match="^base: no diffusers pipeline"):
        weightzoo.build(manifest, str(tmp_path), str(dataset))
    assert not dataset.exists()
    summary = weightzoo.build(manifest, str(tiny_base), str(dataset), finetune=TINY_FINETUNE, batch_size=2)
    assert (summary["committed"], summary["failed"], summary["pending"]) == (2, 0, 0)
    config = tmp_path / "build.toml"
    config.write_text(f'manifest = "{manifest}"\nbase = "{tiny_base}"\ndataset = "ds"\nbatch_size = 2\n'
                      f"[finetune]\n{''.join(f'{k} = {json.dumps(v)}' + chr(10) for k, v in TINY_FINETUNE.items())}")
    assert main(["build", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["batches"] == {} and out["summary"]["committed"] == 2
    records = sorted((dataset / BUILDS).iterdir())
    assert len(records) == 2
    assert [json.loads(r.read_text())["finetune"]["steps"] for r in records] == [TINY_FINETUNE["steps"]] * 2
    assert sorted(weightzoo.weights(str(dataset))[0].column("id").to_pylist()) == ["subject-00000", "subject-00001"]


def test_the_python_api_section_of_reading_md_runs(tmp_path: Path) -> None:
    """docs/READING.md's notebook snippet, executed on a real dataset (so the docs stay true)."""
    import re

    from helpers import REPO

    dataset = tmp_path / "ds"
    w = commit_rows(dataset, ["a", "b"])
    section = (REPO / "docs" / "READING.md").read_text().split("\n## Python API for notebooks")[1].split("\n## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    ns: dict = {}
    exec(code.replace('"work/demo/dataset"', repr(str(dataset))), ns)
    assert ns["some_id"] == "a" and torch.equal(ns["x"], torch.from_numpy(w)) and torch.equal(ns["x1"], ns["x"][:1])
    assert sorted(ns["state_dict"]) == [f"unet.{k}" for k in LAYOUT.keys] and len(ns["peft_sd"]) == 2
