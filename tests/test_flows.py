"""The dataset flows under Prefect's test harness, with the real engine on the tiny model (few steps).

One harness per session (tests/helpers.py); each test trains a handful of subjects for 2 steps.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_FINETUNE, corrupt_image

from weightzoo.cli import main as cli
from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig
from weightzoo.flows.finetune_batch import finetune_batch, train_and_commit
from weightzoo.flows.names import batch_run_name
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.ledger import BUILDS, Ledger
from weightzoo.tasks.finetune.batch import batch_id_for, plan_batches, run_batch
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.finetune.row import ManifestError
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.synthetic import write_demo_manifest

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _request(manifest: str, base: Path, dataset: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"manifest": manifest, "base": str(base), "dataset": str(dataset),
                          "finetune": FinetuneConfig(**TINY_FINETUNE), **kw})


def _flow_runs(name_prefix: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=name_prefix)))


def _artifact_keys() -> set[str]:
    """Keys of every keyed artifact in the API (the newest version of each)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_latest_artifacts(limit=200)}


# -- pure planning -------------------------------------------------------------------------------------


def test_batch_ids_are_deterministic_order_free_and_path_safe() -> None:
    plans = plan_batches([f"id{i}" for i in range(7)], 3)
    assert [len(p.ids) for p in plans] == [3, 3, 1]
    assert plans[0].batch_id == batch_id_for(["id2", "id0", "id1"])
    assert plans == plan_batches([f"id{i}" for i in range(7)], 3)
    Ledger("/tmp/unused").new_shard_path(plans[0].batch_id)  # check_id accepts it
    with pytest.raises(ValueError, match="duplicates"):
        plan_batches(["a", "a"], 2)


def test_retries_are_declared_for_transient_errors_only() -> None:
    """The classification itself is tested in test_trust.py; here, that the task uses it."""
    assert train_and_commit.retries == 2
    assert train_and_commit.retry_delay_seconds == [10, 60]
    assert train_and_commit.retry_condition_fn is not None


# -- flows ---------------------------------------------------------------------------------------------


def test_local_build_end_to_end_then_rerun_is_a_no_op(tmp_path: Path, tiny_base: Path, capsys) -> None:
    manifest = write_demo_manifest(str(tmp_path / "m"), 6)
    dataset = tmp_path / "ds"
    args = ["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", str(dataset),
            "--batch-size", "3", "--finetune-json", json.dumps(TINY_FINETUNE), "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["failures"] == [] and out["summary"]["batch_failures"] == []
    assert (out["summary"]["committed"], out["summary"]["failed"], out["summary"]["pending"]) == (6, 0, 0)
    assert out["summary"]["shards"] == 2
    assert sorted(out["summary"]["batches"].values()) == ["COMPLETED"] * 2

    ds = Dataset(str(dataset))
    rows = {r.id: r for r in read_manifest(manifest)}
    assert sorted(ds.ids) == sorted(rows) and len(ds.entries) == 2
    meta, weights = ds.row("subject-00003")
    assert meta["attributes"] == rows["subject-00003"].attributes and meta["prompt"] == rows["subject-00003"].prompt
    assert meta["steps"] == 2 and meta["method"] == "lora" and meta["hparams"]["steps"] == 2
    assert len(meta["base_model"]) == 16 and meta["loss"] > 0 and meta["train_seconds"] > 0
    assert weights.shape == (ds.layout.numel,)

    expected = {batch_run_name(str(dataset), b) for b in out["summary"]["batches"]}  # finetune-ds-<hash>-<batch>
    runs = [r for r in _flow_runs("finetune-ds-") if r.name in expected]
    assert {r.name for r in runs} == expected and all(r.state.is_completed() for r in runs)
    keys = _artifact_keys()
    assert "build-summary" in keys and "build-progress" in keys
    assert {f"batch-{b}" for b in out["summary"]["batches"]} <= keys

    entries = [c.name for c in Ledger(str(dataset)).commits()]
    again = build_dataset(_request(manifest, tiny_base, dataset, batch_size=3))
    assert again["batches"] == {} and again["committed"] == 6
    assert [c.name for c in Ledger(str(dataset)).commits()] == entries


def test_corrupt_image_fails_its_item_only_and_a_rerun_after_the_fix_trains_only_it(
    tmp_path: Path, tiny_base: Path, capsys
) -> None:
    folder = tmp_path / "m"
    manifest = write_demo_manifest(str(folder), 3)
    dataset = tmp_path / "ds"
    bad = folder / "images" / "subject-00001" / "2.png"
    corrupt_image(bad)  # after validation would have run: the batch itself meets the bad file
    req = _request(manifest, tiny_base, dataset, batch_size=3)
    out = finetune_batch(req.batch("b-corrupt", ["subject-00000", "subject-00001", "subject-00002"]))
    assert sorted(out["committed"]) == ["subject-00000", "subject-00002"]
    assert [i for i, _ in out["failed"]] == ["subject-00001"] and "images" in out["failed"][0][1]

    assert cli(["status", "--dataset", str(dataset), "--manifest", manifest, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["committed"], st["failed"], st["pending"]) == (2, 1, 0)  # pending: neither committed nor failed, as in the build summary
    assert st["failures"][0]["id"] == "subject-00001" and "images" in st["failures"][0]["reason"]

    first = Ledger(str(dataset)).commits()
    write_demo_manifest(str(folder), 3)  # same seed: redraws the same images, the bad one fixed
    assert build_dataset(req)["committed"] == 3
    after = Ledger(str(dataset)).commits()
    assert after[: len(first)] == first  # nothing committed before was touched
    assert [c.ids for c in after[len(first) :]] == [("subject-00001",)]  # only the fixed item was trained
    assert Ledger(str(dataset)).failed() == {}
    assert sorted(Dataset(str(dataset)).ids) == ["subject-00000", "subject-00001", "subject-00002"]


def test_no_retry_failed_leaves_failed_items_alone(tmp_path: Path, tiny_base: Path) -> None:
    manifest = write_demo_manifest(str(tmp_path / "m"), 2)
    dataset = str(tmp_path / "ds")
    Ledger(dataset).record_failures("b-earlier", [("subject-00001", "images: earlier failure")])
    state = build_dataset(_request(manifest, tiny_base, tmp_path / "ds", retry_failed=False), return_state=True)
    assert state.is_failed()  # an id is not committed: the build is not done, whatever its runs reported
    assert state.message.endswith("1 of 2 ids not committed (1 failed, 0 pending; 0 of 1 batch runs not completed): "
                                  "subject-00001: images: earlier failure")
    summary = state.result(raise_on_failure=False).summary
    assert (summary["committed"], summary["failed"], summary["pending"]) == (1, 1, 0)
    assert Ledger(dataset).committed_ids() == {"subject-00000"}
    ids = Dataset(dataset).ids
    assert (len(ids), len(set(ids))) == (1, 1)


def _unloadable_copy(base: Path, where: Path) -> Path:
    """A copy of the base whose UNet weights are truncated: its fingerprint reads, its load fails in each batch."""
    copy = Path(shutil.copytree(base, where))
    weights = next((copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    return copy


def test_a_build_whose_batches_all_fail_ends_failed_with_counts_and_reasons_and_the_cli_exits_1(
    tmp_path: Path, tiny_base: Path, capsys
) -> None:
    """Every batch run fails (a base that cannot be loaded): the parent run is Failed, its message gives the
    counts and the first batch's exception; the summary artifact and the terminal list each batch's reason."""
    manifest = write_demo_manifest(str(tmp_path / "m"), 4)
    base = _unloadable_copy(tiny_base, tmp_path / "bad-base")
    dataset = tmp_path / "ds"
    state = build_dataset(_request(manifest, base, dataset, batch_size=2), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("Flow run encountered an exception: BuildIncomplete: 4 of 4 ids not committed "
                                    "(0 failed, 4 pending; 2 of 2 batch runs not completed): batch b-")
    summary = state.result(raise_on_failure=False).summary
    assert [b["state"] for b in summary["batch_failures"]] == ["FAILED", "FAILED"]
    reasons = [b["reason"] for b in summary["batch_failures"]]
    assert all(r.startswith("OSError: Unable to load weights from checkpoint file") for r in reasons), reasons
    assert reasons[0] in state.message
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=200)
    markdown = next(a.data for a in artifact if a.key == "build-summary")
    assert all(f"| {b['batch']} | FAILED | {b['reason']} |" in markdown for b in summary["batch_failures"])

    args = ["build", "--manifest", manifest, "--base", str(base), "--dataset", str(dataset), "--batch-size", "2",
            "--finetune-json", json.dumps(TINY_FINETUNE)]
    capsys.readouterr()
    assert cli(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("committed 0, failed 0, pending 4 of 4")
    assert [ln.split(":")[0] for ln in lines[-2:]] == [f"  batch {b['batch']} FAILED" for b in summary["batch_failures"]]
    assert all(ln.split(": ", 1)[1] for ln in lines[-2:])  # each with its exception text, not only FAILED
    assert Ledger(str(dataset)).commits() == [] and Dataset(str(dataset)).ids == []


def test_a_failed_subspace_or_generator_run_ends_failed_with_its_reason(tmp_path: Path, tiny_base: Path) -> None:
    """The fit-subspace and weight-diffusion flows on a dataset with no committed rows: Failed, reason in the message."""
    from weightzoo.flows.config import FitSubspaceConfig
    from weightzoo.flows.fit_subspace import fit_subspace
    from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig

    dataset = str(tmp_path / "ds")
    Ledger(dataset).record_failures("b-x", [("subject-00000", "images: unreadable")])  # a dataset, no rows
    state = fit_subspace(FitSubspaceConfig(dataset=dataset, out=str(tmp_path / "sub")), return_state=True)
    assert state.is_failed() and "has no committed rows" in state.message
    state = train_weight_diffusion_flow(WeightDiffusionConfig(dataset=dataset, base=str(tiny_base),
                                                              out=str(tmp_path / "wd"), steps=2), return_state=True)
    assert state.is_failed() and state.message.endswith("InputError: the holdout leaves no rows to train on")
    assert Dataset(dataset).ids == []


def test_overlapping_batches_never_commit_an_id_twice_and_a_committed_batch_loads_nothing(
    tmp_path: Path, tiny_base: Path
) -> None:
    manifest = write_demo_manifest(str(tmp_path / "m"), 3)
    dataset = str(tmp_path / "ds")
    config = FinetuneConfig(**TINY_FINETUNE)
    run_batch("b-a", ["subject-00000", "subject-00001"], manifest, str(tiny_base), dataset, config)
    out = run_batch("b-b", ["subject-00001", "subject-00002"], manifest, str(tiny_base), dataset, config)
    assert out.committed == ["subject-00002"] and out.skipped == ["subject-00001"]
    ids = Dataset(dataset).ids
    assert sorted(ids) == ["subject-00000", "subject-00001", "subject-00002"] and len(ids) == len(set(ids))
    # A missing base would raise if it were loaded; an all-committed batch never gets that far.
    again = run_batch("b-b", ["subject-00002", "subject-00001"], manifest, str(tmp_path / "no-base"), dataset, config)
    assert again.committed == [] and sorted(again.skipped) == ["subject-00001", "subject-00002"]
    assert len(Ledger(dataset).commits()) == 2


def test_bad_manifest_fails_the_flow_before_any_training(tmp_path: Path, tiny_base: Path) -> None:
    folder = tmp_path / "m"
    manifest = write_demo_manifest(str(folder), 3)
    corrupt_image(folder / "images" / "subject-00002" / "0.png")
    shutil.rmtree(folder / "images" / "subject-00000")
    state = build_dataset(_request(manifest, tiny_base, tmp_path / "ds"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ManifestError) as err:
        state.result()
    assert {p.id for p in err.value.problems} == {"subject-00000", "subject-00002"}
    assert Ledger(str(tmp_path / "ds")).commits() == [] and not (tmp_path / "ds" / "shards").exists()
    assert not (tmp_path / "ds" / BUILDS).exists()  # the config is recorded only once every row passed
    assert "manifest-problems" in _artifact_keys()
    assert Dataset(str(tmp_path / "ds")).ids == []


def test_a_deployment_started_build_checks_its_inputs_and_fails_with_the_reason(tmp_path: Path, tiny_base: Path) -> None:
    """The build-dataset deployment calls the flow with its parameters, no CLI in front: the flow's own
    checks refuse a missing manifest, a base of the wrong kind and an unknown field of the engine's config,
    each run Failed with the one-line reason as its state message, before anything is made."""
    dataset = tmp_path / "ds"
    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=16)
    missing = tmp_path / "nope.jsonl"
    cases = [
        (_request(str(missing), tiny_base, dataset), f"NotFoundError: manifest: no such file {missing}"),
        (_request(manifest, tmp_path / "m", dataset), f"NotFoundError: base: no diffusers pipeline (model_index.json) "
                                                      f"at {tmp_path / 'm'}"),
        (_request(manifest, tiny_base, dataset, engine="edit-lora", finetune=None),
         f"NotFoundError: base: no edit base (config.json) at {tiny_base}"),
    ]
    for config, reason in cases:
        params = config.model_dump(mode="json")  # what a deployment run receives
        state = build_dataset(BuildConfig(**params), return_state=True)
        assert state.is_failed() and state.message == f"Flow run encountered an exception: {reason}"
    with pytest.raises(ValueError, match="stepz"):  # the engine's own config model checks the parameters
        BuildConfig(**{**params, "engine": "diffusers-lora", "finetune": {"stepz": 1}})
    assert not dataset.exists()


# -- deployments contract (yaml only: no flow is imported to check it) ---------------------------------


def test_prefect_yaml_entrypoints_exist() -> None:
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"build-dataset", "gpu", "fit-subspace", "train-weight-diffusion"} <= set(deployments)
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        tree = ast.parse((REPO / path).read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, d["entrypoint"]
        assert d["work_pool"]["name"] == ("cpu" if d["name"] == "build-dataset" else "gpu")
    assert deployments["gpu"]["entrypoint"] == "flows/finetune_batch.py:finetune_batch"
    assert deployments["gpu"]["concurrency_limit"] >= 1
    assert deployments["build-dataset"]["schedules"][0]["cron"]


def test_serve_print_lists_the_one_box_commands(capsys) -> None:
    assert cli(["serve", "--print", "--gpus", "2", "--port", "4301"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "prefect server start --host 127.0.0.1 --port 4301"
    assert "prefect work-pool create gpu --type process --overwrite" in out
    assert "prefect work-pool set-concurrency-limit gpu 2" in out
    assert [ln.split()[0] for ln in out if "worker start" in ln] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
