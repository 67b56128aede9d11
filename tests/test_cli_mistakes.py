"""Every user mistake answered in one line, with exit code 2, before any server, model or folder is made.

Each case runs the real ``main`` and checks the exact message, the exit code and that no dataset folder
(or anything else) appeared. The time to answer is printed (``pytest -s``), never asserted: it depends on
the machine; the point is that no Prefect server starts and no model loads first.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from weightzoo.cli import main
from weightzoo.cli.paths import absolute_paths
from weightzoo.tasks.finetune.readers import write_manifest
from weightzoo.tasks.identity.synthetic import make_subjects


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real manifest of two synthetic subjects, a folder that is no pipeline, an edit-base-like file."""
    root = tmp_path_factory.mktemp("inputs")
    rows = make_subjects(str(root / "subjects"), 2, images_per_subject=1, seed=1, size=16)
    manifest = Path(write_manifest(rows, str(root / "manifest.jsonl")))
    not_a_pipeline = root / "not-a-pipeline"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "unet").mkdir()
    diffusers_like = root / "diffusers-like"
    diffusers_like.mkdir()
    (diffusers_like / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    unsupported = root / "unsupported"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    a_file = root / "a-file"
    a_file.write_text("x")
    garbage = root / "garbage.jsonl"
    garbage.write_text("{not json\n")
    return {"root": root, "manifest": manifest, "not_a_pipeline": not_a_pipeline, "diffusers_like": diffusers_like,
            "a_file": a_file, "garbage": garbage, "unsupported": unsupported}


def answer(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of one command; prints how long it took to answer."""
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n  weightzoo {' '.join(argv[:2])} ...: exit {code} in {elapsed:.2f} s")
    return code, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def test_build_mistakes_are_one_line_and_create_nothing(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = tmp_path / "ds"
    m, base, bad = str(inputs["manifest"]), str(inputs["diffusers_like"]), inputs["not_a_pipeline"]
    cases = [  # (argv after `build`, the exact line)
        (["--manifest", str(tmp_path / "nope.jsonl"), "--base", base, "--dataset", str(dataset)],
         f"weightzoo build: error: --manifest: no such file {tmp_path / 'nope.jsonl'}"),
        (["--manifest", str(inputs["root"]), "--base", base, "--dataset", str(dataset)],
         f"weightzoo build: error: --manifest: {inputs['root']} is a folder, not a file"),
        (["--manifest", m, "--base", str(bad), "--dataset", str(dataset)],
         f"weightzoo build: error: --base: no diffusers pipeline (model_index.json) at {bad}"),
        (["--manifest", m, "--base", str(tmp_path / "nobase"), "--dataset", str(dataset)],
         f"weightzoo build: error: --base: no diffusers pipeline at {tmp_path / 'nobase'}"),
        (["--manifest", m, "--base", str(inputs["unsupported"]), "--dataset", str(dataset)],
         f"weightzoo build: error: --base: {inputs['unsupported']}/model_index.json: pipeline class "
         "'KandinskyPipeline' is not supported; supported: StableDiffusionPipeline (sd), "
         "StableDiffusionXLPipeline (sdxl), StableDiffusion3Pipeline (sd3), FluxPipeline (flux)"),
        (["--manifest", m, "--base", base, "--dataset", str(dataset), "--engine", "edit-lora"],
         f"weightzoo build: error: --base: no edit base (config.json) at {base}"),
        (["--manifest", m, "--base", base, "--dataset", str(inputs["a_file"])],
         f"weightzoo build: error: --dataset: {inputs['a_file']} is a file, not a folder"),
        (["--manifest", m, "--base", base, "--dataset", str(dataset), "--engine", "diffusers-lorra"],
         "weightzoo build: error: unknown engine 'diffusers-lorra'; registered engines: diffusers-lora, edit-lora"),
        (["--base", base, "--dataset", str(dataset)],
         "weightzoo build: error: the following arguments are required (as flags or in --config): --manifest"),
        (["--manifest", m, "--base", base, "--dataset", str(dataset), "--finetune-json", "[1]"],
         "weightzoo build: error: --finetune-json must be a JSON object of the engine's config fields, got list"),
        (["--manifest", m, "--base", base, "--dataset", str(dataset), "--finetune-json", '{"stepz": 1}'],
         "weightzoo build: error: stepz: Extra inputs are not permitted"),
    ]
    for argv, line in cases:
        code, err = answer(["build", *argv], capsys)
        assert (code, one_line(err)) == (2, line)
    code, err = answer(["build", "--manifest", str(inputs["garbage"]), "--base", base, "--dataset", str(dataset)], capsys)
    assert (code, one_line(err)) == (2, f"weightzoo build: error: 1 problem(s) in 1 row(s) of the manifest in "
                                     f"{inputs['garbage']}: row 1 (no id): not valid JSON (Expecting property name "
                                     "enclosed in double quotes at column 2)")
    assert not dataset.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_mistyped_flag_gets_the_commands_usage_and_a_suggestion(capsys: pytest.CaptureFixture) -> None:
    code, err = answer(["build", "--manifest", "m", "--batch-sise", "3"], capsys)
    assert code == 2
    usage, line = err.split("weightzoo build: error: ")
    assert usage.startswith("usage: weightzoo build ")
    assert line == "unrecognized arguments: --batch-sise; did you mean --batch-size?\n"
    code, err = answer(["build", "--method", "lorra"], capsys)
    assert code == 2 and err.rstrip().endswith("; did you mean lora?"), err
    code, err = answer(["buidl"], capsys)
    assert code == 2 and err.rstrip().endswith("; did you mean build?"), err


OUT_COMMANDS = {  # every command with an --out, with its other required flags (dummies: --out is checked first)
    "export": ["--dataset", "D", "--id", "a"],
    "merge": ["--dataset", "D", "--ids", "a", "b"],
    "publish": ["--dataset", "D"],
    "sample": ["--subspace", "S"],
    "edit": ["--subspace", "S", "--id", "a", "--attribute", "colour=red"],
    "invert": ["--subspace", "S", "--base", "B", "--image", "i.png"],
    "generate": ["--model", "W", "--prompt", "p"],
    "init": ["--model", "W"],
    "fit-subspace": ["--dataset", "D"],
    "train-diffusion": ["--dataset", "D", "--base", "B"],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
@pytest.mark.parametrize("marker", ["ledger", "dataset_card.json"])
def test_an_out_inside_a_dataset_folder_is_refused(
    command: str, marker: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / marker).mkdir() if marker == "ledger" else (dataset / marker).write_text("{}")
    before = sorted(dataset.rglob("*"))
    out = dataset / "shards" / "x"
    code, err = answer([command, *OUT_COMMANDS[command], "--out", str(out)], capsys)
    assert (code, one_line(err)) == (
        2, f"weightzoo {command}: error: --out {out} is inside the dataset folder {dataset}; write outputs elsewhere")
    assert sorted(dataset.rglob("*")) == before


def test_relative_paths_are_made_absolute_and_uris_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    import argparse

    args = absolute_paths(argparse.Namespace(manifest="m.jsonl", base="s3://bucket/base", dataset="~/d", out=None, id="x"))
    assert (args.manifest, args.base, args.dataset, args.id) == (
        str(tmp_path / "m.jsonl"), "s3://bucket/base", str(Path.home() / "d"), "x")
    code, err = answer(["status", "--dataset", "rel/ds"], capsys)
    assert code == 2 and one_line(err).startswith(f"weightzoo status: error: no dataset at {tmp_path / 'rel/ds'}")


def test_a_flow_run_refuses_a_relative_path_naming_the_parameter(inputs: dict[str, Path]) -> None:
    from weightzoo.flows.config import BuildConfig

    with pytest.raises(ValidationError) as e:
        BuildConfig(manifest="manifest.jsonl", base=str(inputs["diffusers_like"]), dataset="s3://b/ds")
    (error,) = e.value.errors()
    assert error["loc"] == ("manifest",)
    assert "manifest must be an absolute path or a URI" in error["msg"]
    ok = BuildConfig(manifest=str(inputs["manifest"]), base="s3://b/base", dataset="memory://ds")
    assert ok.dataset == "memory://ds"
