"""Captioned image folders in, manifest rows out: the way LoRA practitioners keep their data.

One subfolder per subject (kohya-ss sd-scripts, ai-toolkit, OneTrainer), each image captioned by a
same-named ``.txt`` beside it, or by the subfolder's ``metadata.jsonl`` (a Hugging Face imagefolder:
one ``{"file_name": ..., "text": ...}`` line per image). Labels for edit directions come from an optional
``attributes.json`` in the subfolder. A kohya folder name ``<repeats>_<token> <class>`` (``10_sks dog``)
gives the row's prompt (``sks dog``) and class prompt (``dog``); other names take the given defaults.

Every image must have a non-empty caption: a missing or empty one is named (folder and file) before any
manifest is written, all of them in one error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from weightzoo.errors import InputError, NotFoundError, short
from weightzoo.storage.fs import filesystem, join
from weightzoo.tasks.finetune.row import IMAGE_SUFFIXES, ManifestRow

METADATA = "metadata.jsonl"
ATTRIBUTES = "attributes.json"
CAPTION_KEYS = ("text", "caption")  # the diffusers scripts' default caption column, then the other common name
KOHYA_NAME = re.compile(r"^\d+_(?P<token>\S+) (?P<cls>.+)$")
ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _subfolders(fs, root: str) -> Iterator[str]:
    for info in sorted(fs.ls(root, detail=True), key=lambda i: i["name"]):
        if info["type"] == "directory" and not info["name"].rstrip("/").rsplit("/", 1)[-1].startswith("."):
            yield info["name"].rstrip("/")


def _metadata(fs, folder: str) -> dict[str, str]:
    """file name → caption from the folder's ``metadata.jsonl``, if it has one."""
    path = join(folder, METADATA)
    if not fs.isfile(path):
        return {}
    out: dict[str, str] = {}
    for n, line in enumerate(fs.cat_file(path).decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path} line {n} is not JSON: {e}") from None
        if not isinstance(entry, dict) or "file_name" not in entry:
            raise InputError(f"{path} line {n} has no 'file_name'")
        caption = next((entry[k] for k in CAPTION_KEYS if isinstance(entry.get(k), str)), None)
        if caption is not None:
            out[str(entry["file_name"])] = caption
    return out


def folder_row(fs, folder: str, prompt: str, class_prompt: str, problems: list[str]) -> ManifestRow | None:
    """One subject folder as a manifest row (appending what is wrong with it to ``problems``)."""
    name = folder.rsplit("/", 1)[-1]
    kohya = KOHYA_NAME.match(name)
    if kohya:
        prompt, class_prompt = f"{kohya['token']} {kohya['cls']}", kohya["cls"]
    files = sorted(p for p in fs.ls(folder, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        problems.append(f"{name}/: no images ({', '.join(IMAGE_SUFFIXES)})")
        return None
    meta = _metadata(fs, folder)
    before = len(problems)
    captions = []
    for path in files:
        base = path.rsplit("/", 1)[-1]
        txt = path.rsplit(".", 1)[0] + ".txt"
        if fs.isfile(txt):
            caption = fs.cat_file(txt).decode("utf-8", errors="replace").strip()
        elif base in meta:
            caption = meta[base].strip()
        else:
            problems.append(f"{name}/{base}: no caption (no {base.rsplit('.', 1)[0]}.txt, not in {METADATA})")
            continue
        if not caption:
            problems.append(f"{name}/{base}: the caption is empty")
        captions.append(caption)
    attributes: dict[str, str] = {}
    if fs.isfile(join(folder, ATTRIBUTES)):
        try:
            raw = json.loads(fs.cat_file(join(folder, ATTRIBUTES)))
        except ValueError as e:
            problems.append(f"{name}/{ATTRIBUTES} is not JSON: {e}")
            raw = {}
        if not isinstance(raw, dict):
            problems.append(f"{name}/{ATTRIBUTES} must hold an object of labels")
            raw = {}
        attributes = {str(k): str(v) for k, v in raw.items()}
    if len(problems) > before:
        return None
    protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    row_id = ID_UNSAFE.sub("-", name).strip("-.") or "subject"
    return ManifestRow(id=row_id, prompt=prompt, class_prompt=class_prompt, images=[protocol + f for f in files],
                       captions=captions, attributes=attributes)


def rows_from_folder(root: str, prompt: str = "sks person", class_prompt: str = "person") -> list[ManifestRow]:
    """Every subject subfolder of ``root`` as a row; refuses (one error listing each problem) any
    uncaptioned or unreadable image, an empty folder, or two folders that map to the same id."""
    fs, path = filesystem(root)
    if not fs.isdir(path):
        raise NotFoundError(f"--from-folder: no such folder {root}")
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    problems: list[str] = []
    rows = [r for f in _subfolders(fs, path) if (r := folder_row(fs, protocol + f if protocol else f, prompt,
                                                                   class_prompt, problems)) is not None]
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.id] = seen.get(r.id, 0) + 1
    problems += [f"{n} folders map to the id {short(i)!r}" for i, n in seen.items() if n > 1]
    if problems:
        head = f"{len(problems)} problem(s) in {root}:" if len(problems) > 1 else f"{root}:"
        raise InputError("\n  ".join([head, *problems]) if len(problems) > 1 else f"{head} {problems[0]}")
    if not rows:
        raise InputError(f"--from-folder {root} has no subject subfolders (one folder of captioned images each)")
    return rows
