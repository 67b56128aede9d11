"""Runs findable by dataset, loss curves and tracking (issue 31, parts 2 and 3).

- the driver hands each row's per-step loss, learning rate and gradient norm out, and reports the running
  loss with its progress (a quadratic "pack": no model, milliseconds);
- the ``loss_history`` column reads back, and shards written before it existed stay readable by every
  reader (``Dataset``, ``open_dataset``, ``publish`` and ``datasets.load_dataset`` on the snapshot);
- two datasets built in one Prefect API (the session's harness): run names and tags (build, batch,
  subspace, generator) read back through the client and filtered apart by tag, batch runs of equal batch
  ids named apart, the batch run's image
  artifact, TensorBoard events read back with TensorBoard's own reader, the stored curve equal to the
  window means of those events, and the terminal bar showing the running loss.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_FINETUNE

from weightzoo.cli import main
from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig, FitSubspaceConfig
from weightzoo.flows.fit_subspace import fit_subspace
from weightzoo.flows.names import batch_run_name, dataset_hash, dataset_name, dataset_tags
from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.open import open_dataset
from weightzoo.storage.publish import publish
from weightzoo.storage.shards import LOSS_HISTORY, RowMeta, iter_shard, write_shard
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.finetune import tracking
from weightzoo.tasks.finetune.contract import TrainingConfig
from weightzoo.tasks.finetune.driver import train_packs
from weightzoo.tasks.finetune.tracking import window_means
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.synthetic import write_demo_manifest
from weightzoo.tasks.subspace.config import SubspaceConfig

LAYOUT = Layout(("a.lora_A.weight", "a.lora_B.weight"), ((1, 4), (4, 1)), "float32")


# -- the driver ------------------------------------------------------------------------------------------


class _Row:
    def __init__(self, i: int) -> None:
        self.id = f"r{i}"


class _Quadratic:
    """K rows of 3 weights, each pulled to its own target: loss ‖w − t‖², gradient 2(w − t)."""

    def __init__(self, targets: list[float]) -> None:
        self.t = torch.tensor(targets).view(-1, 1)
        self.w = torch.nn.Parameter(torch.zeros(len(targets), 3))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.w]

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        a = torch.tensor(active)
        return ((self.w[a] - self.t[a]) ** 2).sum(1)

    def flatten(self, slot: int) -> torch.Tensor:
        return self.w[slot].detach().clone()

    def load(self, slot: int, vector) -> None:
        self.w.data[slot] = torch.as_tensor(vector)


@contextlib.contextmanager
def _open_pack(rows: list[_Row]) -> Iterator[_Quadratic]:
    yield _Quadratic([1.0 + int(r.id[1:]) for r in rows])


def test_driver_hands_out_curves_and_reports_the_running_loss() -> None:
    cfg = TrainingConfig(steps=6, learning_rate=0.1, lr_warmup_steps=2, loss_window=2, check_every=3, pack=2,
                         weights_dtype="float32")
    calls: list[tuple] = []
    results = train_packs(_open_pack, [_Row(i) for i in range(3)], cfg, progress=lambda *a: calls.append(a))
    for r in results:
        target = 1.0 + int(r.id[1:])
        assert r.ok and len(r.loss_history) == len(r.lr_history) == len(r.grad_norm_history) == cfg.steps
        assert r.lr_history == pytest.approx([0.05] + [0.1] * 5)  # the warm-up, then the constant rate
        assert r.grad_norm_history[0] == pytest.approx(2 * target * math.sqrt(3))  # before its clip to 1.0
        assert r.loss_history[0] == pytest.approx(3 * target**2) and r.loss_history[-1] < r.loss_history[0]
        assert r.loss == pytest.approx(sum(r.loss_history[-2:]) / 2)
    # Every report after the first check carries the pack's running loss: the first pack's first window.
    first = results[:2]
    assert [c[:2] for c in calls] == [(6, 18), (12, 18), (15, 18), (18, 18)]
    assert calls[0][2] == pytest.approx(np.mean([r.loss_history[:3] for r in first]), rel=1e-6)
    assert (len(results), len({r.id for r in results})) == (3, 3)


# -- the column ------------------------------------------------------------------------------------------


def _commit(ledger: Ledger, batch: str, ids: list[str], curves: list[list[float]] | None) -> None:
    """A committed shard of ``ids``; ``curves`` None writes it as shards were before ``loss_history``."""
    rows = [RowMeta(id=i, prompt="sks", hparams={"loss_window": 2}, loss=1.0,
                    loss_history=None if curves is None else curves[k]) for k, i in enumerate(ids)]
    info = write_shard(ledger.fs, ledger.new_shard_path(batch), LAYOUT, rows, np.ones((len(ids), LAYOUT.numel), "f4"))
    if curves is None:  # the same file without the column (its schema metadata, the layout, kept)
        pq.write_table(pq.read_table(info.path).drop_columns([LOSS_HISTORY]), info.path)
        info = replace(info, nbytes=os.path.getsize(info.path))
        assert LOSS_HISTORY not in pq.ParquetFile(info.path).schema_arrow.names
    ledger.commit(batch, info)


def test_loss_history_reads_back_and_older_shards_stay_readable(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    uri = str(tmp_path / "ds")
    ledger = Ledger(uri)
    _commit(ledger, "b-old", ["old-0", "old-1"], None)
    _commit(ledger, "b-new", ["new-0", "new-1"], [[0.5, 0.25], [0.75, 0.125]])
    expected = {"old-0": None, "old-1": None, "new-0": [0.5, 0.25], "new-1": [0.75, 0.125]}

    ds = Dataset(uri)
    assert {i: ds.row(i)[0][LOSS_HISTORY] for i in expected} == expected
    shard = ledger.commits()[0]
    (table, _), = iter_shard(ledger.fs, f"{ledger.root}/{shard.shard}")
    assert table.column(LOSS_HISTORY).null_count == table.num_rows  # an old shard: the column, all null
    scanned = open_dataset(uri).to_table(columns=["id", LOSS_HISTORY]).to_pylist()
    assert {r["id"]: r[LOSS_HISTORY] for r in scanned} == expected

    hub = str(tmp_path / "hub")
    assert publish(uri, hub).rows == 4
    loaded = datasets.load_dataset("parquet", data_files=f"{hub}/data/*.parquet", split="train")
    assert dict(zip(loaded["id"], loaded[LOSS_HISTORY], strict=True)) == expected
    ids = open_dataset(uri).to_table(columns=["id"]).column("id").to_pylist()
    assert (len(ids), len(set(ids)), loaded.num_rows, len(set(loaded["id"]))) == (4, 4, 4, 4)


# -- flows -----------------------------------------------------------------------------------------------


def _runs_tagged(tag: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def _artifacts_of(run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.usefixtures("prefect_harness", "one_thread")
def test_two_datasets_runs_named_tagged_and_tracked(tmp_path: Path, tiny_base: Path) -> None:
    from weightzoo.cli.commands.build import build_bars
    from weightzoo.cli.progress import terminal_progress

    pytest.importorskip("tensorboard")
    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=32)
    steps, window = 4, 2
    finetune = FinetuneConfig(**{**TINY_FINETUNE, "steps": steps, "loss_window": window})
    faces, pets = tmp_path / "zoo" / "faces", tmp_path / "other" / "pets"
    a = BuildConfig(manifest=manifest, base=str(tiny_base), dataset=str(faces), finetune=finetune, batch_size=2,
                    report_to="tensorboard")
    b = a.model_copy(update={"dataset": str(pets), "report_to": "none"})
    build_dataset(a)
    with terminal_progress(*build_bars(b), enabled=True) as term:
        build_dataset(b)
        bar = term.progress.tasks[0].fields["info"]
    assert "· loss " in bar, bar  # the driver's running loss, through the batch run's progress callback

    (batch,) = Ledger(str(faces)).commits()
    assert Ledger(str(pets)).commits()[0].ids == batch.ids  # the same ids: the same batch id in both
    names = {}
    for config, name in ((a, "faces"), (b, "pets")):
        runs = _runs_tagged(f"dataset:{name}")
        assert dataset_tags(config.dataset) == [f"dataset:{name}"]
        names[name] = {r.name for r in runs}
        assert names[name] == {f"build-{name}", batch_run_name(config.dataset, batch.batch)}
        assert all(r.state.is_completed() for r in runs)
    assert batch_run_name(str(faces), batch.batch) == f"finetune-faces-{dataset_hash(str(faces))}-{batch.batch}"
    assert not names["faces"] & names["pets"]  # filtered apart; equal batch ids, distinct batch run names
    # A dataset's name is its last folder, made safe, credentials never shown; the hash ignores them too.
    secret = "s3://key:secret@bucket/zoo/My Faces!/"
    assert dataset_name(secret) == "My-Faces" and "secret" not in batch_run_name(secret, "b-1")
    assert dataset_hash(secret) == dataset_hash("s3://bucket/zoo/My Faces!")

    (batch_run,) = [r for r in _runs_tagged("dataset:faces") if r.name.startswith("finetune-")]
    (image,) = [x for x in _artifacts_of(batch_run.id) if x.key == f"loss-curves-{batch.batch}"]
    assert image.type == "image" and image.data.startswith("data:image/png;base64,")
    assert base64.b64decode(image.data.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    ds = Dataset(str(faces))
    for row_id in batch.ids:
        scalars = _scalars(faces / tracking.TENSORBOARD_DIR / batch.batch / row_id)
        assert set(scalars) == {"loss", "lr", "grad_norm"}
        assert all([s for s, _ in v] == list(range(1, steps + 1)) for v in scalars.values())
        assert [v for _, v in scalars["lr"]] == pytest.approx([finetune.learning_rate] * steps)
        assert all(v > 0 for _, v in scalars["grad_norm"])
        meta, _ = ds.row(row_id)
        curve = window_means([v for _, v in scalars["loss"]], window)
        assert len(meta[LOSS_HISTORY]) == steps // window and meta[LOSS_HISTORY] == pytest.approx(curve, rel=1e-5)
        assert meta["loss"] == pytest.approx(curve[-1], rel=1e-5)
    assert not (pets / tracking.TENSORBOARD_DIR).exists()

    # The subspace and the generator carry their dataset too (a run that fails is named and tagged first).
    fit_subspace(FitSubspaceConfig(dataset=str(faces), out=str(tmp_path / "sub"), options=SubspaceConfig(components=1)))
    train_weight_diffusion_flow(WeightDiffusionConfig(dataset=str(pets), base=str(tiny_base), out=str(tmp_path / "wd"),
                                                      steps=2), return_state=True)
    assert {r.name for r in _runs_tagged("dataset:faces")} == names["faces"] | {"fit-subspace-faces"}
    assert {r.name for r in _runs_tagged("dataset:pets")} == names["pets"] | {"train-weight-diffusion-pets"}
    for root in (faces, pets):
        ids = open_dataset(str(root)).to_table(columns=["id"]).column("id").to_pylist()
        assert (len(ids), len(set(ids))) == (2, 2)


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path: Path, tiny_base: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(tracking, "has_tensorboard", lambda: False)
    manifest = write_demo_manifest(str(tmp_path / "m"), 1, images_per_subject=1, size=16)
    dataset = tmp_path / "ds"
    code = main(["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", str(dataset),
                 "--report-to", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--report-to tensorboard needs the tensorboard package: pip install 'weightzoo[tracking]'" in err
    assert not dataset.exists()  # nothing made: no rows, no ids
