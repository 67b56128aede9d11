"""The command line: every default comes from one place, user errors print one line, bugs keep tracebacks."""

from __future__ import annotations

import argparse
import re

import pytest
from pydantic import BaseModel

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
    assert f"--method {{{edit.model_fields['method'].default}}}" in out
    assert f"LoRA rank r. (default {edit.model_fields['rank'].default})" in out
    assert f"(default {edit.model_fields['learning_rate'].default})" in out
    assert (edit.model_fields["rank"].default, edit.model_fields["learning_rate"].default) == (2, 5e-3)
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank r. (default 1)" in out and "{edit-lora}" not in out
