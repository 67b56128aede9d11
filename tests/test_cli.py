"""The command line: every default comes from one place, user errors print one line, bugs keep tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO
from pydantic import BaseModel

import weightzoo
from weightzoo.cli import COMMANDS, build_parser, main
from weightzoo.cli.commands.options import MODEL_FIELD


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_cli_default_is_its_models_default() -> None:
    """Walks every subcommand's flags. A flag bound to a model field leaves the default to the model (None
    on the command line) and its help states the model's default; any other flag's help never claims a
    default by hand (the formatter appends argparse's real one; a None default may say what None means)."""
    subs = _subparsers(build_parser(full=True))
    assert sorted(subs) == sorted(COMMANDS)
    bound = 0
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            where = f"weightzoo {name} {action.option_strings[-1]}"
            if hasattr(action, MODEL_FIELD):
                bound += 1
                model, field = getattr(action, MODEL_FIELD)
                info = model.model_fields[field]
                assert action.default is None, where
                default = None if info.is_required() else info.get_default(call_default_factory=True)
                if default is not None and not isinstance(default, BaseModel):
                    shown = (" ".join(map(str, default)) or "none") if isinstance(default, tuple | list) else str(default)
                    assert f"(default {shown})" in action.help, where
            elif action.default is not None:  # the formatter appends the real default: none written by hand
                assert not re.search(r"\(default[ :]", action.help or ""), f"{where}: hand-written default"
    assert bound >= 20


def test_help_is_fast_and_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(
    tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["status", "--dataset", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightzoo status: error: no dataset at") and err.count("\n") == 1

    import weightzoo.cli.commands.status as status

    def bug(*args, **kwargs):
        return {}["missing-key"]  # a programming error, not the user's

    monkeypatch.setattr(status, "dataset_status", bug)
    with pytest.raises(KeyError):
        main(["status", "--dataset", str(tmp_path)])


def test_build_flags_come_from_the_chosen_engines_config(capsys: pytest.CaptureFixture) -> None:
    """``--engine edit-lora --help`` shows the edit engine's defaults and methods, not the default engine's."""
    from weightzoo.tasks.finetune import engines

    edit = engines.get("edit-lora").config
    with pytest.raises(SystemExit):
        main(["build", "--engine", "edit-lora", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--method {edit-lora,edit-lora-fa}" in out and edit.model_fields["method"].default == "edit-lora"
    assert f"LoRA rank r. (default {edit.model_fields['rank'].default})" in out
    assert f"(default {edit.model_fields['learning_rate'].default})" in out
    assert (edit.model_fields["rank"].default, edit.model_fields["learning_rate"].default) == (2, 5e-3)
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank r. (default 1)" in out and "{edit-lora}" not in out


# --- help, version, output levels -------------------------------------------------------------------------

PROBE = """
import contextlib, io, json, os, sys
from weightzoo.cli import main
results = []
for argv, cwd in json.loads(sys.argv[1]):
    if cwd:
        os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = sorted(m for m in ("torch", "diffusers", "prefect", "transformers") if m in sys.modules)
    results.append([int(code), ",".join(heavy) or "-", out.getvalue(), err.getvalue().rstrip("\\n")])
print(json.dumps(results))
"""


def probe(*calls: tuple[list[str], Path | None]) -> list[tuple[int, str, str, str]]:
    """Runs the CLI on each argv (in its cwd) one after another in one fresh interpreter: for each, (exit
    code, heavy modules imported so far, stdout, stderr). What is imported accumulates, so a heavy import by
    any call shows from that call on, as it would alone in a fresh process."""
    start = time.perf_counter()
    arg = json.dumps([[list(argv), str(cwd) if cwd else None] for argv, cwd in calls])
    proc = subprocess.run([sys.executable, "-c", PROBE, arg], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\n  {len(calls)} weightzoo command lines: answered in {time.perf_counter() - start:.2f} s")
    return [tuple(r) for r in json.loads(proc.stdout)]


def test_help_version_and_typos_import_no_torch_diffusers_or_prefect(tmp_path: Path) -> None:
    typos = [("build", "--batch-sise", "--batch-size"), ("fit-subspace", "--componets", "--components"),
             ("train-diffusion", "--checkpoint-evry", "--checkpoint-every"), ("demo", "--subjets", "--subjects")]
    calls = [(["--help"], None), (["--version"], None), (["buidl"], None), (["export", "--datset", "D"], None),
             (["build", "--manifest", "m.jsonl", "--base", "b", "--dataset", "d"], tmp_path),
             *[([command, "--help"], None) for command in COMMANDS],
             # Flags made from the engines' and flows' config models: their help and typos import no torch either.
             (["build", "--engine", "edit-lora", "--help"], None),
             *[([command, typo, "3"], None) for command, typo, _ in typos]]
    results = iter(probe(*calls))
    code, heavy, out, _ = next(results)
    assert (code, heavy) == (0, "-") and all(c in out for c in COMMANDS)
    assert next(results)[:3] == (0, "-", f"weightzoo {weightzoo.__version__}\n")
    code, heavy, _, err = next(results)
    assert (code, heavy) == (2, "-") and err.endswith("; did you mean build?")
    code, heavy, _, err = next(results)
    assert (code, heavy) == (2, "-") and err.endswith("unrecognized arguments: --datset; did you mean --dataset?")
    code, heavy, _, err = next(results)
    assert (code, heavy, err) == (2, "-", f"weightzoo build: error: --manifest: no such file {tmp_path / 'm.jsonl'}")
    assert list(tmp_path.iterdir()) == []
    for command in COMMANDS:
        code, heavy, out, _ = next(results)
        assert (code, heavy) == (0, "-"), command
        assert out.startswith(f"usage: weightzoo {command}"), command
    code, heavy, out, _ = next(results)
    assert (code, heavy) == (0, "-") and "--method {edit-lora,edit-lora-fa}" in out
    for command, _, meant in typos:
        code, heavy, _, err = next(results)
        assert (code, heavy) == (2, "-") and err.endswith(f"; did you mean {meant}?"), (command, err)
    assert next(results, None) is None


def test_every_command_has_one_clean_sentence_and_a_description() -> None:
    import importlib

    subs = _subparsers(build_parser(full=True))
    for name in COMMANDS:
        text = importlib.import_module(f"weightzoo.cli.commands.{name.replace('-', '_')}").HELP
        assert text.endswith(".") and text[0].isupper() and "``" not in text and ":" not in text.split()[0], name
        assert not re.search(r"\w\w\. [A-Z]", text), f"{name}: one sentence"
        description = subs[name].description
        assert description and "``" not in description and ":mod:" not in description, name


def test_quiet_prints_errors_only_and_json_logs_are_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "ledger").mkdir()
    assert main(["status", "--dataset", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: 0 committed")
    assert main(["--quiet", "status", "--dataset", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["status", "--dataset", str(tmp_path), "-q", "--json"]) == 0  # asked for: printed
    assert json.loads(capsys.readouterr().out)["committed"] == 0
    assert main(["-q", "status", "--dataset", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("weightzoo status: error: no dataset at")
    assert main(["--log-format", "json", "status", "--dataset", str(tmp_path / "nowhere")]) == 2
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["command"], line["error"]) == ("error", "status", "NotFoundError")
    assert line["message"].startswith(f"no dataset at {tmp_path / 'nowhere'}")


def test_serve_on_sqlite_warns_beyond_two_workers() -> None:
    from weightzoo.cli.commands.serve import sqlite_warning

    assert sqlite_warning("sqlite", 2) is None and sqlite_warning("postgres", 8) is None
    assert "--backend postgres" in sqlite_warning("sqlite", 3)


# --- docs agree with the parsers ----------------------------------------------------------------------------

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _doc_commands() -> list[tuple[str, str, str]]:
    """(file, command, text) for each `weightzoo CMD ...` in a table row or a code line of the docs."""
    out = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            for m in re.finditer(r"weightzoo ([a-z-]+)((?: +(?:\[?-[-\w]+(?: [^\s\[\]|`-][^\s\[\]`]*)?\]?|[A-Z]+|\||\(|\)))*)", line):
                if m[1] in COMMANDS:
                    out.append((path.name, m[1], m[2]))
    return out


def test_docs_flags_exist_and_bracketed_defaults_match_the_parsers() -> None:
    """Every flag the README and docs show after `weightzoo CMD` is one of CMD's; a `[--flag N]` shows
    the default (the command's table in README lists every command)."""
    subs = _subparsers(build_parser(full=True))
    readme = (REPO / "README.md").read_text()
    assert all(f"`weightzoo {c}" in readme or f"`{c}`" in readme for c in COMMANDS)
    checked = 0
    for doc, command, text in _doc_commands():
        flags = subs[command]._option_string_actions
        for flag in re.findall(r"(?<![\w-])(--?[a-z][-\w]*)", text):
            assert flag in flags, f"{doc}: weightzoo {command} has no {flag}"
            checked += 1
        for flag, value in re.findall(r"\[(--?[a-z][-\w]*) ([-\d.e]+)\]", text):
            action = flags[flag]
            default = action.default
            if hasattr(action, MODEL_FIELD):
                model, field = getattr(action, MODEL_FIELD)
                default = model.model_fields[field].get_default(call_default_factory=True)
            assert default is not None and float(value) == float(default), f"{doc}: weightzoo {command} [{flag} {value}], default {default}"
    assert checked >= 40


def test_bars_are_off_before_a_commands_parser_imports_diffusers() -> None:
    """huggingface_hub and transformers read their progress-bar switch at import, and build's parser imports
    them (its flags come from models): the output flags must act before any parser is built."""
    code = ("import sys\nfrom weightzoo.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "from huggingface_hub.utils import are_progress_bars_disabled\nfrom transformers.utils import logging\n"
            "print(are_progress_bars_disabled(), logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "TQDM", "TRANSFORMERS", "PREFECT_LOGGING"))}
    for argv, shown in ((["build", "--help"], "True False"), (["-v", "build", "--help"], "False True")):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == shown, (argv, out.stderr[-2000:])


def test_the_demo_draws_on_the_shipped_world_base_unless_told_toy(tmp_path: Path) -> None:
    """`weightzoo demo` trains world identities with the world's fine-tune settings; --base toy keeps the
    random-weights mechanics run with its own; --steps changes only the steps of whichever applies."""
    from weightzoo.cli.commands.demo import pipeline_config
    from weightzoo.flows.config import WORKLOADS, WORLD_IDENTITY
    from weightzoo.tasks.world.base import shipped_base
    from weightzoo.tasks.world.config import WorldBaseSettings

    def config(*flags: str):
        return pipeline_config(build_parser("demo").parse_args(["demo", "--workdir", str(tmp_path), *flags]))

    world, toy, short = config(), config("--base", "toy"), config("--steps", "7")
    assert (world.identity_base, world.finetune) == ("world", WORLD_IDENTITY)
    assert shipped_base(WorldBaseSettings()) is not None  # so the demo's base is a copy, not a pretraining
    assert (toy.identity_base, toy.finetune) == ("toy", WORKLOADS["identity"]["finetune"])
    assert short.finetune == WORLD_IDENTITY.model_copy(update={"steps": 7})
    assert config("--kind", "edit").finetune == WORKLOADS["edit"]["finetune"]
    assert list(tmp_path.iterdir()) == []  # building the config creates nothing


def test_bases_and_demo_rows_come_from_the_workloads_engine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`weightzoo base --kind toy --family F` makes the identity engine's toy base of that family, kept on a
    rerun and refused over another family; the demo pipeline's base and manifest stages ask the workload's
    engine (Engine.toy_base, Engine.demo_rows), never a workload's own code."""
    from weightzoo.flows.config import PipelineConfig
    from weightzoo.flows.pipeline import make_base, make_manifest
    from weightzoo.tasks.finetune.readers import read_manifest
    from weightzoo.tasks.identity.families import detect

    out = tmp_path / "sdxl"
    assert main(["base", "--kind", "toy", "--family", "sdxl", "--out", str(out)]) == 0
    assert detect(str(out)).name == "sdxl"
    before = (out / "model_index.json").stat().st_mtime_ns
    assert main(["base", "--kind", "toy", "--family", "sdxl", "--out", str(out)]) == 0
    assert (out / "model_index.json").stat().st_mtime_ns == before  # kept
    capsys.readouterr()
    for argv, line in (
        (["--kind", "toy", "--out", str(out)], f"{out} already holds a sdxl pipeline, not sd: choose another folder"),
        (["--kind", "toy", "--steps", "3", "--out", str(tmp_path / "x")],
         "the diffusers-lora engine's toy base takes no steps"),
        (["--kind", "world", "--family", "flux", "--out", str(tmp_path / "x")],
         "the world base is an sd pipeline; family 'flux' is for a toy base"),
        (["--engine", "nope", "--out", str(tmp_path / "x")],
         "unknown base kind 'nope'; choose world, toy, edit or an engine: diffusers-lora, edit-lora"),
    ):
        assert main(["base", *argv]) == 2
        assert capsys.readouterr().err == f"weightzoo base: error: {line}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl"]

    toy = PipelineConfig(workdir=str(tmp_path / "toy"), identity_base="toy", family="sd", items=2, images_per_subject=1)
    edit = PipelineConfig(workdir=str(tmp_path / "edit"), workload="edit", items=3, base_steps=1)
    for config, index in ((toy, "model_index.json"), (edit, "config.json")):
        assert config.base_kind() == config.engine
        base = make_base.fn(config.base_kind(), config.path("base"), config.base_options())
        manifest = make_manifest.fn(config.base_kind(), config.workdir, config.items, config.row_options())
        assert (Path(base) / index).is_file() and len(read_manifest(manifest)) == config.items
    assert detect(toy.path("base")).name == "sd"
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--family", "sdxl"]) == 2  # the world base is sd
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "family 'sdxl' is for identity_base 'toy'" in err
    assert not (tmp_path / "w").exists()
