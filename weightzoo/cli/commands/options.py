"""Command-line flags made from pydantic fields, so that the model stays the one source of defaults and help.

A flag made here defaults to ``None`` (unset); a command builds its model from only the flags the user
set (``set_fields``), so the model's own default applies otherwise. The help text is the field's
description plus the model's default, so the two can never drift apart. Flags that belong to no model
get their "(default ...)" from argparse itself (``HELP_FORMATTER``), never hand-written.

"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

MODEL_FIELD = "model_field"  # attribute on an argparse action: (model, field name); the parser-walk test reads it


class HELP_FORMATTER(argparse.HelpFormatter):  # noqa: N801 (used as argparse's formatter_class=)
    """Appends argparse's own default to flags that belong to no model (model flags state the model's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and not hasattr(action, MODEL_FIELD) and "%(default)" not in text:
            text += " (default %(default)s)"
        return text


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _kwargs(annotation: Any) -> dict[str, Any]:
    """argparse ``type``/``choices``/``nargs``/``action`` for a field annotation."""
    t = _unwrap(annotation)
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        values = typing.get_args(t)
        return {"choices": list(values), "type": type(values[0])}
    if origin in (tuple, list):
        return {"nargs": "*", "type": typing.get_args(t)[0], "metavar": "VALUE"}
    if t is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": t if t in (int, float, str) else str}


def _shown(default: Any) -> str:
    if isinstance(default, tuple | list):
        return " ".join(map(str, default)) or "none"
    return str(default)


def _help(model: type[BaseModel], name: str) -> str:
    """The field's description plus the model's default."""
    info = model.model_fields[name]
    help_text = info.description or ""
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if default is not None and not isinstance(default, BaseModel):
            help_text += f" (default {_shown(default)})"
    return help_text


def add_field(parser: argparse._ActionsContainer, model: type[BaseModel], name: str, *flags: str,
              **overrides: Any) -> argparse.Action:
    """One flag for ``model.name`` (``--name-with-dashes`` unless ``flags`` are given)."""
    kwargs = {**_kwargs(model.model_fields[name].annotation), "dest": name, "default": None,
              "help": _help(model, name), **overrides}
    action = parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), **kwargs)
    setattr(action, MODEL_FIELD, (model, name))
    return action


def bind(action: argparse.Action, model: type[BaseModel], name: str) -> None:
    """Point an existing flag at ``model.name``: its help, default and choices become that field's; a flag
    the model has no field for is hidden (setting it anyway is refused by the model, in one line)."""
    if name not in model.model_fields:
        action.help = argparse.SUPPRESS
        return
    kwargs = _kwargs(model.model_fields[name].annotation)
    action.help, action.choices = _help(model, name), kwargs.get("choices")
    action.type = kwargs.get("type", action.type)
    setattr(action, MODEL_FIELD, (model, name))


class _EngineAction(argparse._StoreAction):
    """``--engine NAME``: stores the name and binds the fine-tune flags to that engine's config, so
    ``--engine edit-lora --help`` (the engine first) shows the edit engine's defaults and methods."""

    def __init__(self, *args: Any, flags: list[argparse.Action], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flags = flags

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from weightzoo.tasks.finetune import engines

        setattr(namespace, self.dest, values)
        config = engines.get(values).config  # an unknown name: a one-line user error
        for action in self.flags:
            bind(action, config, action.dest)


def add_engine_fields(parser: argparse._ActionsContainer, group: argparse._ActionsContainer,
                      model: type[BaseModel], names: Iterable[str]) -> None:
    """``--engine`` (``model.engine``) and flags for the engine config's fields ``names`` in ``group``: bound
    to the default engine's config until ``--engine`` names another."""
    from weightzoo.tasks.finetune import engines

    default = engines.get(engines.DEFAULT_ENGINE).config
    flags = [add_field(group, default, name) for name in names]
    add_field(parser, model, "engine", action=_EngineAction, flags=flags)
def add_fields(parser: argparse._ActionsContainer, model: type[BaseModel], names: Iterable[str]) -> None:
    for name in names:
        add_field(parser, model, name)


def set_fields(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields among ``names`` that the user set on the command line (tuples for list flags)."""
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def add_dataset(parser: argparse._ActionsContainer) -> argparse.Action:
    """The ``--dataset`` flag every dataset command takes."""
    return parser.add_argument("--dataset", required=True, help="Dataset URI (local path or s3://bucket/prefix).")
