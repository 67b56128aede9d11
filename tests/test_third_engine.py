"""Adding an engine is one module: a third engine, registered from tests/third_engine.py, builds datasets
through ``weightzoo.build``, ``weightzoo build`` and the build flow, with its own config model, base check,
toy base and demo rows, and with nothing else in weightzoo edited for it.

Files the third engine needed: tests/third_engine.py (the engine), and this test. No other file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import third_engine
import torch

import weightzoo
from weightzoo.cli import main
from weightzoo.errors import InputError, NotFoundError, RecipeMismatchError
from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.ledger import BUILDS
from weightzoo.tasks.bases import make_base
from weightzoo.tasks.finetune import engines

pytestmark = pytest.mark.usefixtures("prefect_harness")

FINETUNE = {"steps": 80, "target_scale": 2.0}


def _visible(dataset: Path) -> tuple[int, int]:
    ids = Dataset(str(dataset)).ids
    return len(ids), len(set(ids))


def test_a_third_engine_builds_through_every_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name = third_engine.register()
    assert main(["base", "--engine", name, "--out", str(tmp_path / "base")]) == 0  # its toy base
    base = str(tmp_path / "base")
    manifest = engines.get(name).demo_rows(str(tmp_path / "demo"), 6)  # its demo rows
    dataset = tmp_path / "ds"

    # The flows' config validates `finetune` against this engine's own model, and round-trips as parameters.
    config = BuildConfig(manifest=manifest, base=base, dataset=str(dataset), engine=name, finetune=FINETUNE)
    assert type(config.finetune) is third_engine.PromptFitConfig and config.finetune.target_scale == 2.0
    assert BuildConfig(**config.model_dump(mode="json")) == config
    with pytest.raises(ValueError, match="num_class_images"):  # another engine's field is refused by this model
        BuildConfig(manifest=manifest, base=base, dataset=str(dataset), engine=name, finetune={"num_class_images": 1})

    # Its base check runs in the build's checks, named by the caller's name for the input.
    with pytest.raises(NotFoundError, match=r"^base: no prompt-fit base \(prompt_fit_base.json\) at "):
        weightzoo.build(manifest, str(tmp_path / "demo"), str(dataset), engine=name)
    assert not dataset.exists()

    summary = weightzoo.build(manifest, base, str(dataset), engine=name, finetune=FINETUNE, batch_size=4)
    assert (summary["committed"], summary["failed"], summary["pending"], summary["shards"]) == (6, 0, 0, 2)
    meta, rows = weightzoo.weights(str(dataset))
    projection = third_engine.load_base(base, "cpu")
    prompts = dict(zip(meta.column("id").to_pylist(), meta.column("prompt").to_pylist(), strict=True))
    want = torch.stack([third_engine.target(projection, prompts[i], 2.0) for i in meta.column("id").to_pylist()])
    assert rows.shape == (6, 6)
    assert ((rows - want).norm(dim=1) / want.norm(dim=1)).max() < 0.05  # each row fitted its own target
    assert set(meta.column("method").to_pylist()) == {"fit"}

    # The CLI: its flags are this engine's fields; --dry-run plans; a build adds the new rows only.
    more = engines.get(name).demo_rows(str(tmp_path / "more"), 2, seed=1)
    args = ["build", "--manifest", more, "--base", base, "--dataset", str(dataset), "--engine", name,
            "--steps", "80", "--finetune-json", json.dumps({"target_scale": 2.0})]
    capsys.readouterr()
    assert main([*args, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"]["engine"] == name and len(plan["to_train"]) == 2
    assert main(args) == 0
    assert "committed 2, failed 0, pending 0 of 2" in capsys.readouterr().out
    assert len(list((dataset / BUILDS).iterdir())) == 2  # one config record per build, none for the dry run

    # One dataset, one recipe: this engine's own fields are part of it.
    with pytest.raises(RecipeMismatchError, match="target_scale"):
        weightzoo.build(more, base, str(dataset), engine=name, finetune={**FINETUNE, "target_scale": 3.0})
    assert _visible(dataset) == (8, 8)


def test_an_engine_without_the_optional_hooks_still_builds(tmp_path: Path) -> None:
    """A plugin may leave ``check_base``, ``toy_base`` and ``demo_rows`` None: its base is then only checked
    to exist, and ``weightzoo base``/the demo refuse it in one line."""
    full = third_engine.engine()
    bare = dataclasses.replace(full, name="prompt-fit-bare", check_base=None, toy_base=None, demo_rows=None)
    engines.register(bare)
    base = full.toy_base(str(tmp_path / "base"))
    manifest = full.demo_rows(str(tmp_path / "demo"), 3)
    dataset = tmp_path / "ds"
    with pytest.raises(NotFoundError, match=f"^base: no base at {tmp_path / 'nowhere'}$"):
        weightzoo.build(manifest, str(tmp_path / "nowhere"), str(dataset), engine=bare.name)
    with pytest.raises(InputError, match="has no toy base"):
        make_base(bare.name, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()

    state = build_dataset(BuildConfig(manifest=manifest, base=base, dataset=str(dataset), engine=bare.name,
                                      finetune={"steps": 5}), return_state=True)
    assert state.is_completed() and state.result()["committed"] == 3
    assert _visible(dataset) == (3, 3)
