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


def add_field(parser: argparse._ActionsContainer, model: type[BaseModel], name: str, *flags: str,
              **overrides: Any) -> argparse.Action:
    """One flag for ``model.name`` (``--name-with-dashes`` unless ``flags`` are given)."""
    info = model.model_fields[name]
    help_text = info.description or ""
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        if default is not None and not isinstance(default, BaseModel):
            help_text += f" (default {_shown(default)})"
    kwargs = {**_kwargs(info.annotation), "dest": name, "default": None, "help": help_text, **overrides}
    action = parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), **kwargs)
    setattr(action, MODEL_FIELD, (model, name))
    return action


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
