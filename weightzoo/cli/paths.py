"""Local paths made absolute (and checked) in the CLI, before anything is submitted.

A flow run may execute on a worker whose working folder is not the user's (a deployment runs in the
code checkout), so a relative path would name another file there, or write a dataset into the code.
Every path flag is resolved here, once, for every command; ``s3://`` and other URIs pass untouched.
A dataset folder is one holding ``ledger/`` or ``dataset_card.json``: no command writes its output
into one (an export inside a dataset would sit among its shards and its ledger).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from weightzoo.errors import InputError, NotFoundError

# argparse dests that name a file or folder, in every command that has them.
PATH_DESTS = ("manifest", "base", "dataset", "out", "subspace", "model", "image", "mask", "lora", "cache_dir",
              "workdir", "work", "data_dir", "config", "logging_dir")
DATASET_MARKERS = ("ledger", "dataset_card.json")  # what makes a folder a dataset (storage/ledger.py's layout)


def is_uri(value: str) -> bool:
    """``s3://bucket/x``, ``memory://x``, ``file:///x``: a URI for fsspec, left as the user wrote it."""
    return "://" in value


def absolute(value: str) -> str:
    """``value`` as an absolute local path (``~`` expanded, symlinks kept), or the URI unchanged."""
    if is_uri(value):
        return value
    return os.path.abspath(os.path.expanduser(value))


def flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Every path flag of ``args`` made absolute, in place (the one helper every command goes through)."""
    for dest in PATH_DESTS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and value:
            setattr(args, dest, absolute(value))
    return args


def dataset_folder_of(path: str) -> str | None:
    """The dataset folder holding ``path`` (itself or an ancestor), if any; local paths only.

    Judged where ``path`` really leads (symlinks resolved, as a write would follow them): a link to a
    dataset's ``shards/`` is inside that dataset, though no folder on the way the user typed is one."""
    if is_uri(path):
        return None
    for candidate in dict.fromkeys((Path(path), Path(os.path.realpath(path)))):
        for folder in (candidate, *candidate.parents):
            if any((folder / marker).exists() for marker in DATASET_MARKERS):
                return str(folder)
    return None


def check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` inside a dataset folder (symlinks followed), before anything is read or written."""
    out = getattr(args, "out", None)
    if not isinstance(out, str) or not out:
        return
    folder = dataset_folder_of(out)
    if folder is not None:
        real = os.path.realpath(out)
        via = f" (it leads to {real})" if real != os.path.abspath(out) else ""
        raise InputError(f"--out {out} is inside the dataset folder {folder}{via}; write outputs elsewhere")


def check_dataset(args: argparse.Namespace) -> None:
    """Refuse a local ``--dataset`` that is a file (a dataset is a folder), before any command reads it: a
    file's ``ledger/commits`` is a NotADirectoryError deep in the first listing."""
    dataset = getattr(args, "dataset", None)
    if isinstance(dataset, str) and dataset and not is_uri(dataset) and os.path.exists(dataset) \
            and not os.path.isdir(dataset):
        raise InputError(f"--dataset {dataset} is a file, not a dataset folder")


def existing_file(value: str, flag: str) -> None:
    """A local file that exists and can be read (a URI is checked by whoever opens it)."""
    if is_uri(value):
        return
    p = Path(value)
    if not p.exists():
        raise NotFoundError(f"{flag}: no such file {value}")
    if p.is_dir():
        raise InputError(f"{flag}: {value} is a folder, not a file")
    if not p.is_file():  # a FIFO or a device: reading it would block or never end
        raise InputError(f"{flag}: {value} is not a regular file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{flag}: {value} is not readable")


def folder_or_absent(value: str, flag: str) -> None:
    """A local path that is a folder or does not exist yet (a dataset or output folder to create)."""
    if not is_uri(value) and Path(value).is_file():
        raise InputError(f"{flag}: {value} is a file, not a folder")


def existing_folder(value: str, flag: str, holds: str | None = None, what: str = "folder") -> None:
    """A local folder that exists (and holds ``holds``): e.g. a base pipeline with model_index.json."""
    if is_uri(value):
        return
    p = Path(value)
    if not p.is_dir():
        raise NotFoundError(f"{flag}: no {what} at {value}" + ("" if not p.exists() else " (a file)"))
    if holds and not (p / holds).is_file():
        raise NotFoundError(f"{flag}: no {what} ({holds}) at {value}")
