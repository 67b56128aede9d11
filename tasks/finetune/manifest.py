"""Manifest validation: a manifest is checked whole before any GPU time is spent.

The row model is ``row.py``, image decoding ``images.py``, the file formats ``readers.py``.
A manifest is checked whole before any GPU time is spent: ``load_and_validate`` reads every row,
checks ids, duplicates, fields and that every image exists, fully decodes and passes ``ImageConfig``,
and raises one ``ManifestError`` that lists every problem, so a bad manifest is fixed in one pass, not one
row per run. ``load_image`` is also what training reads images with, so a validated image is trained on
exactly as it was checked. The format and the image rules are documented in docs/MANIFEST.md.
"""


from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from weightzoo.errors import short
from weightzoo.storage.fs import UnsafeIdError, check_id, filesystem
from weightzoo.tasks.finetune.contract import RowRules
from weightzoo.tasks.finetune.images import DEFAULT_IMAGE_OPTIONS, ImageConfig, UnusableImageError, load_image
from weightzoo.tasks.finetune.readers import iter_raw_manifest
from weightzoo.tasks.finetune.row import (
    IMAGE_SUFFIXES,
    ManifestError,
    ManifestProblem,
    ManifestRow,
    image_uris,
    manifest_folder,
    parse_rows,
    resolve,
)

# Image checks are bound by storage latency (an S3 GET is ~10-50 ms), not by CPU, so many threads pay off.
VALIDATE_WORKERS = 16
DEFAULT_RULES = RowRules()
# Rows parsed and checked at a time: enough to keep the image threads busy, few enough to stream.
CHUNK_ROWS = 2048


def _check_id(row_id: str) -> str | None:
    """Why ``row_id`` cannot be a path component, or None if it can."""
    try:
        check_id(row_id)
    except UnsafeIdError as e:
        return str(e).replace(f"id {short(repr(row_id))}", "id", 1)  # the problem line already names the id
    return None


def _init_problem(row: ManifestRow, base_uri: str | None) -> str | None:
    """Why the row's ``init`` start cannot be used (read into the batch's layout later, once the base is
    loaded: ``starts.with_starts``), or None."""
    if row.init is None:
        return None
    uri = resolve(row.init, base_uri)
    if not uri.endswith(".safetensors"):
        return f"init {short(uri)}: not a .safetensors LoRA file"
    try:
        fs, path = filesystem(uri)
        found = fs.isfile(path)
    except Exception as e:  # storage that cannot be asked is this row's problem, named
        return f"init {short(uri)}: {type(e).__name__}: {e}"
    return None if found else f"init file not found: {short(uri)}"


def _list_images(row: ManifestRow, base_uri: str | None, rules: RowRules) -> tuple[list[str], str | None]:
    """The row's image URIs, or why there are none (the workload's ``rules`` may list them their own way)."""
    try:
        listed = rules.images(row, base_uri)
    except Exception as e:  # a listing that fails is a problem of this row, not of the whole run
        return [], f"cannot list image_dir {row.image_dir!r}: {type(e).__name__}: {e}"
    if listed is not None:
        return listed
    try:
        uris = image_uris(row, base_uri)
    except Exception as e:  # a listing that fails is a problem of this row, not of the whole run
        return [], f"cannot list image_dir {row.image_dir!r}: {type(e).__name__}: {e}"
    if uris:
        return uris, None
    if row.image_dir:
        return [], f"no images: image_dir {row.image_dir!r} holds no {'/'.join(IMAGE_SUFFIXES)} files (or does not exist)"
    return [], "no images (neither 'images' nor 'image_dir' is given)"


def _image_probe(entry: ManifestRow | Mapping[str, Any] | ManifestProblem) -> ManifestRow | None:
    """Just the image fields of a row that failed to parse, so its images are still checked in the same pass."""
    if not isinstance(entry, Mapping):
        return None
    try:
        return ManifestRow(id="-", images=entry.get("images", []), image_dir=entry.get("image_dir"))
    except ValidationError:  # malformed image fields are already reported by the parse
        return None


def _check_image(uri: str, options: ImageConfig) -> str | None:
    """Why the image at ``uri`` cannot be used, or None if it fully decodes and ``options`` accept it."""
    try:
        load_image(uri, options)
    except FileNotFoundError:
        return f"image not found: {uri}"
    except UnusableImageError as e:  # its message already names the file and why
        return str(e)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"image cannot be decoded: {uri} ({type(e).__name__}: {e})"
    return None


def _image_verdicts(uris: Iterable[str], options: ImageConfig, pool: ThreadPoolExecutor) -> dict[str, str | None]:
    """Each distinct image URI checked once: manifests often share images across rows (a class set, a style
    reference), and decoding per mention made 100,000 rows over 4 images take minutes and gigabytes."""
    distinct = list(dict.fromkeys(uris))
    return dict(zip(distinct, pool.map(lambda uri: _check_image(uri, options), distinct), strict=True))


class _Pass:
    """One validation pass over chunks of rows: what must outlive a chunk (ids seen, each image's verdict,
    the good rows, the problems) and nothing else, so a manifest of any length is checked in bounded memory."""

    def __init__(self, base_uri: str | None, options: ImageConfig, rules: RowRules, pool: ThreadPoolExecutor):
        self.base_uri, self.options, self.rules, self.pool = base_uri, options, rules, pool
        self.first_seen: dict[str, int] = {}
        self.verdicts: dict[str, str | None] = {}
        self.rows: list[ManifestRow] = []
        self.problems: list[ManifestProblem] = []
        self.done = 0

    def _id_problems(self, ids: list[str | None], problems: list[list[ManifestProblem]]) -> None:
        for n, rid in enumerate(ids, start=self.done + 1):
            if rid is None:
                continue
            if (why := _check_id(rid)) is not None:
                problems[n - self.done - 1].append(ManifestProblem(n, rid, why))
            if rid in self.first_seen:
                why = f"duplicate id: already used by row {self.first_seen[rid]}"
                problems[n - self.done - 1].append(ManifestProblem(n, rid, why))
            else:
                self.first_seen[rid] = n

    def _image_problems(self, chunk: Sequence[Any], rows: list[ManifestRow | None], ids: list[str | None],
                        problems: list[list[ManifestProblem]]) -> None:
        probes = [row if row is not None else _image_probe(entry) for row, entry in zip(rows, chunk, strict=True)]
        present = [(i, probe) for i, probe in enumerate(probes) if probe is not None]
        listed = list(self.pool.map(lambda item: _list_images(item[1], self.base_uri, self.rules), present))
        fresh = (uri for uris, _ in listed for uri in uris if uri not in self.verdicts)
        self.verdicts.update(_image_verdicts(fresh, self.options, self.pool))
        for (i, _), (uris, why) in zip(present, listed, strict=True):
            for reason in [why, *(self.verdicts[uri] for uri in uris)]:
                if reason is not None:
                    problems[i].append(ManifestProblem(self.done + i + 1, ids[i], reason))

    def check(self, chunk: Sequence[ManifestRow | Mapping[str, Any] | ManifestProblem]) -> None:
        """Parse and check one chunk of rows, numbered on from the rows checked before it."""
        rows, parsed, ids = parse_rows(chunk)
        problems = [[p._replace(row=p.row + self.done) for p in ps] for ps in parsed]
        self._id_problems(ids, problems)
        for i, row in enumerate(rows):
            if row is not None:
                why_init = _init_problem(row, self.base_uri)
                problems[i] += [ManifestProblem(self.done + i + 1, row.id, why)
                                for why in [*self.rules.problems(row, self.base_uri), why_init] if why is not None]
        self._image_problems(chunk, rows, ids, problems)
        self.problems += [p for ps in problems for p in ps]
        self.rows += [r for r in rows if r is not None]
        self.done += len(chunk)


def validate_manifest(
    rows_or_raw: Iterable[ManifestRow | Mapping[str, Any] | ManifestProblem],
    base_uri: str | None,
    *,
    max_workers: int = VALIDATE_WORKERS,
    image_options: ImageConfig = DEFAULT_IMAGE_OPTIONS,
    rules: RowRules = DEFAULT_RULES,
) -> list[ManifestRow]:
    """Check every row, then return them all or raise one ``ManifestError`` listing every problem.

    Checks: each raw row parses (known fields and kind), ids are safe as file names and unique, each
    row has images, and every image exists, fully decodes and is accepted by ``image_options`` (too
    large, or transparent under alpha='refuse', is that row's problem), in ``max_workers`` threads,
    and the workload's own ``rules`` (the engine's ``Engine.rows``; the default refuses ``targets``),
    since reads from S3 are latency-bound. Relative image paths are taken against ``base_uri``. Rows are
    taken ``CHUNK_ROWS`` at a time from ``rows_or_raw`` (an iterator streams: raw rows are not all held),
    and each distinct image is decoded once, however many rows name it.
    """
    entries = iter(rows_or_raw)
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        state = _Pass(base_uri, image_options, rules, pool)
        while chunk := list(itertools.islice(entries, CHUNK_ROWS)):
            state.check(chunk)
    if state.problems:
        raise ManifestError(state.problems)
    return state.rows


def load_and_validate(
    uri: str, *, max_workers: int = VALIDATE_WORKERS, image_options: ImageConfig = DEFAULT_IMAGE_OPTIONS,
    rules: RowRules = DEFAULT_RULES,
) -> list[ManifestRow]:
    """Read the manifest at ``uri`` and validate every row, with relative image paths taken against its folder.

    Raises ``NotFoundError`` or a one-line ``ManifestError`` for a file that cannot be read at all, else
    one ``ManifestError`` listing every bad row.
    """
    raw = iter_raw_manifest(uri)
    if (first := next(raw, None)) is None:
        raise ManifestError([], source=uri, message=f"the manifest {uri} has no rows")
    try:
        return validate_manifest(itertools.chain([first], raw), manifest_folder(uri), max_workers=max_workers,
                                 image_options=image_options, rules=rules)
    except ManifestError as e:
        raise ManifestError(e.problems, source=uri) from None
