"""The manifest: one typed row per identity or concept to fine-tune.

Image references are URIs (any fsspec URL) or paths relative to the manifest's own folder.

A manifest is checked whole before any GPU time is spent: ``load_and_validate`` reads every row,
checks ids, duplicates, fields and that every image exists and fully decodes, and raises one
``ManifestError`` that lists every problem, so a bad manifest is fixed in one pass, not one row per run.
The format is documented in docs/MANIFEST.md.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from weightzoo.errors import InputError
from weightzoo.storage.fs import UnsafeIdError, atomic_write, check_id, filesystem, join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
# Image checks are bound by storage latency (an S3 GET is ~10-50 ms), not by CPU, so many threads pay off.
VALIDATE_WORKERS = 16

RawRow = dict[str, Any]


class ManifestRow(BaseModel):
    """One fine-tune to run: who or what, with which prompt, from which images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Unique id; becomes part of file names, so letters, digits, '.', '_', '-' only.")
    kind: Literal["identity", "concept"] = Field("identity", description="A person-like identity or a concept.")
    prompt: str = Field("sks person", description="Instance prompt with the rare token, e.g. 'sks person'.")
    class_prompt: str = Field("person", description="Class prompt for prior preservation, e.g. 'person'.")
    images: list[str] = Field(default_factory=list, description="Image URIs, absolute or relative to the manifest.")
    image_dir: str | None = Field(None, description="A folder URI whose images are all used (instead of, or as well as, images).")
    attributes: dict[str, str] = Field(default_factory=dict, description="Labels (e.g. colour=red) for edit directions.")


class ManifestProblem(NamedTuple):
    """One thing wrong with one row; ``row`` counts data rows from 1 (no CSV header, no blank lines)."""

    row: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        who = f"id {self.id!r}" if self.id is not None else "no id"
        return f"row {self.row} ({who}): {self.reason}"


class ManifestError(InputError):
    """A manifest that must not run; ``problems`` lists every bad row, not just the first."""

    def __init__(self, problems: Sequence[ManifestProblem], source: str | None = None, message: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if message is None:
            rows = len({p.row for p in self.problems})
            head = f"{len(self.problems)} problem(s) in {rows} row(s) of the manifest{where}:"
            message = "\n  ".join([head, *(str(p) for p in self.problems)])
        super().__init__(message)


def resolve(uri: str, base_uri: str | None) -> str:
    """``uri`` as an absolute URI: relative paths are taken against the manifest's folder ``base_uri``."""
    if "://" in uri or uri.startswith("/") or base_uri is None:
        return uri
    return join(base_uri, uri)


def manifest_folder(uri: str) -> str:
    """The folder that relative image paths in the manifest at ``uri`` are taken against."""
    uri = str(uri)
    if "/" not in uri:
        return "."
    return uri.rsplit("/", 1)[0] or "/"


def image_uris(row: ManifestRow, base_uri: str | None = None) -> list[str]:
    """Every image URI of a row: its listed images, then the images in its folder (sorted)."""
    uris = [resolve(u, base_uri) for u in row.images]
    if row.image_dir:
        folder = resolve(row.image_dir, base_uri)
        fs, path = filesystem(folder)
        protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
        uris += [protocol + p for p in sorted(fs.find(path)) if p.lower().endswith(IMAGE_SUFFIXES)]
    return uris


def load_image(uri: str) -> Image.Image:
    """Read and fully decode one image as RGB (raises on missing or undecodable files)."""
    fs, path = filesystem(uri)
    with Image.open(io.BytesIO(fs.cat_file(path))) as im:
        im.load()
        return im.convert("RGB")


def load_images(row: ManifestRow, base_uri: str | None = None) -> list[Image.Image]:
    uris = image_uris(row, base_uri)
    if not uris:
        raise ValueError(f"row {row.id!r} has no images")
    return [load_image(u) for u in uris]


# --- reading and writing -------------------------------------------------------------------------


def _format_of(uri: str) -> str:
    """'jsonl', 'csv' or 'parquet' from the file suffix (a compression suffix such as .gz is looked past)."""
    name = str(uri).lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(comp)
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the manifest format of {uri!r}: expected a name ending in {', '.join(MANIFEST_SUFFIXES)}")


def _parse_attributes(text: str) -> dict[str, str] | str:
    """A CSV ``attributes`` cell: a JSON object or ``key=value;key=value``; the text itself if neither parses.

    Returning the text (rather than raising) lets row validation report it along with the row's other problems.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        return value if isinstance(value, dict) else text
    pairs = [p for p in text.split(";") if p.strip()]
    if not all("=" in p for p in pairs):
        return text
    return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}


def _is_pair(item: object) -> bool:
    return isinstance(item, tuple | list) and len(item) == 2


def _normalise(record: Mapping[Any, Any]) -> RawRow:
    """One format-independent raw row: nulls and empty cells dropped (so defaults apply), list-like cells split."""
    out: RawRow = {}
    for key, value in record.items():
        if value is None or (isinstance(value, str) and not value.strip() and key != "id"):
            continue
        if key == "images" and isinstance(value, str):
            value = [p.strip() for p in value.split(";") if p.strip()]
        elif key == "attributes" and isinstance(value, str):
            value = _parse_attributes(value)
        elif key == "attributes" and isinstance(value, dict):  # a Parquet struct column: nulls for absent keys
            value = {k: v for k, v in value.items() if v is not None}
        elif key == "attributes" and isinstance(value, list) and all(_is_pair(p) for p in value):
            value = {k: v for k, v in value if v is not None}  # a Parquet map column reads as (key, value) pairs
        out[key] = value
    return out


def _read_jsonl(text: str) -> list[RawRow | ManifestProblem]:
    rows: list[RawRow | ManifestProblem] = []
    for line in (ln for ln in text.splitlines() if ln.strip()):
        n = len(rows) + 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(ManifestProblem(n, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append(ManifestProblem(n, None, f"not a JSON object but {type(record).__name__}"))
            continue
        rows.append(_normalise(record))
    return rows


def _read_csv(text: str) -> list[RawRow | ManifestProblem]:
    rows: list[RawRow | ManifestProblem] = []
    for record in csv.DictReader(io.StringIO(text)):
        n = len(rows) + 1
        if None in record:  # DictReader files surplus cells under the key None
            extra = len(record[None])  # type: ignore[index]
            rid = record.get("id")
            rows.append(ManifestProblem(n, rid or None, f"{extra} more cell(s) than the header has columns"))
            continue
        rows.append(_normalise({k.strip(): v.strip() if isinstance(v, str) else v for k, v in record.items()}))
    return rows


def read_raw_manifest(uri: str) -> list[RawRow | ManifestProblem]:
    """Every row of the manifest at ``uri`` as a plain dict, unvalidated, in file order.

    JSONL, CSV or Parquet by suffix (optionally compressed, e.g. ``.jsonl.gz``). A row that cannot
    even be parsed (a JSONL line that is not JSON) comes back as a ``ManifestProblem`` in its place,
    so that validation can still report it together with every other bad row.
    """
    fmt = _format_of(uri)
    fs, path = filesystem(uri)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return [_normalise(r) for r in pq.read_table(f).to_pylist()]
    with fs.open(path, "rb", compression="infer") as f:
        text = f.read().decode("utf-8-sig")  # utf-8-sig: spreadsheets often start CSVs with a BOM
    return _read_jsonl(text) if fmt == "jsonl" else _read_csv(text)


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence a manifest author can act on."""
    loc = ".".join(str(p) for p in error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"missing required field {loc!r}"
    if kind == "extra_forbidden":
        return f"unknown field {loc!r} (allowed: {', '.join(ManifestRow.model_fields)})"
    if kind == "literal_error":
        return f"unknown {loc} {value!r} (expected {error['ctx']['expected']})"
    if loc == "attributes" and kind == "dict_type":
        return f"attributes must be a JSON object or key=value;key=value pairs, got {value!r}"
    return f"field {loc!r}: {error['msg']} (got {value!r})"


def _parse_rows(entries: Sequence[ManifestRow | Mapping[str, Any] | ManifestProblem]) -> tuple[
    list[ManifestRow | None], list[list[ManifestProblem]], list[str | None]
]:
    """Parse each entry on its own: the rows (None where unparseable), each row's problems, each row's raw id."""
    rows: list[ManifestRow | None] = []
    problems: list[list[ManifestProblem]] = []
    ids: list[str | None] = []
    for n, entry in enumerate(entries, start=1):
        if isinstance(entry, ManifestProblem):
            rows.append(None)
            problems.append([entry._replace(row=n)])
            ids.append(entry.id)
            continue
        if isinstance(entry, ManifestRow):
            rows.append(entry)
            problems.append([])
            ids.append(entry.id)
            continue
        rid = entry.get("id") if isinstance(entry.get("id"), str) else None
        ids.append(rid)
        try:
            rows.append(ManifestRow.model_validate(dict(entry)))
            problems.append([])
        except ValidationError as e:
            rows.append(None)
            problems.append([ManifestProblem(n, rid, _describe(err)) for err in e.errors()])
    return rows, problems, ids


def read_manifest(uri: str) -> list[ManifestRow]:
    """The rows of the manifest at ``uri`` (JSONL, CSV or Parquet), typed but with images unchecked.

    Raises ``ManifestError`` listing every row that does not parse; ``load_and_validate`` checks more.
    """
    rows, problems, _ = _parse_rows(read_raw_manifest(uri))
    flat = [p for ps in problems for p in ps]
    if flat:
        raise ManifestError(flat, source=uri)
    return [r for r in rows if r is not None]


def write_manifest(rows: Iterable[ManifestRow], uri: str) -> str:
    """Write ``rows`` as JSONL to ``uri`` (whole or not at all) and return ``uri``."""
    lines = [json.dumps(r.model_dump(mode="json", exclude_none=True), ensure_ascii=False) for r in rows]
    fs, path = filesystem(uri)
    with atomic_write(fs, path) as f:
        f.write(("\n".join(lines) + "\n" if lines else "").encode())
    return uri


# --- validation ----------------------------------------------------------------------------------


def _check_id(row_id: str) -> str | None:
    """Why ``row_id`` cannot be a path component, or None if it can."""
    try:
        check_id(row_id)
    except UnsafeIdError as e:
        return str(e).replace(f"id {row_id!r}", "id", 1)  # the problem line already names the id
    return None


def _list_images(row: ManifestRow, base_uri: str | None) -> tuple[list[str], str | None]:
    """The row's image URIs, or why there are none."""
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


def _check_image(uri: str) -> str | None:
    """Why the image at ``uri`` cannot be used, or None if it fully decodes."""
    try:
        load_image(uri)
    except FileNotFoundError:
        return f"image not found: {uri}"
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"image cannot be decoded: {uri} ({type(e).__name__}: {e})"
    return None


def validate_manifest(
    rows_or_raw: Sequence[ManifestRow | Mapping[str, Any] | ManifestProblem],
    base_uri: str | None,
    *,
    max_workers: int = VALIDATE_WORKERS,
) -> list[ManifestRow]:
    """Check every row, then return them all or raise one ``ManifestError`` listing every problem.

    Checks: each raw row parses (known fields and kind), ids are safe as file names and unique, each
    row has images, and every image exists and fully decodes (in ``max_workers`` threads, since reads
    from S3 are latency-bound). Relative image paths are taken against ``base_uri``. Decodes every
    image once: seconds per thousand small local images, more on S3.
    """
    entries = list(rows_or_raw)
    rows, problems, ids = _parse_rows(entries)
    first_seen: dict[str, int] = {}
    for n, rid in enumerate(ids, start=1):
        if rid is None:
            continue
        if (why := _check_id(rid)) is not None:
            problems[n - 1].append(ManifestProblem(n, rid, why))
        if rid in first_seen:
            problems[n - 1].append(ManifestProblem(n, rid, f"duplicate id: already used by row {first_seen[rid]}"))
        else:
            first_seen[rid] = n

    probes = [row if row is not None else _image_probe(entry) for row, entry in zip(rows, entries, strict=True)]
    present = [(n, probe) for n, probe in enumerate(probes, start=1) if probe is not None]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        listed = list(pool.map(lambda item: _list_images(item[1], base_uri), present))
        checks = [(n, uri) for (n, _), (uris, _) in zip(present, listed, strict=True) for uri in uris]
        verdicts = list(pool.map(lambda check: _check_image(check[1]), checks))
    listing_problems = [(n, why) for (n, _), (_, why) in zip(present, listed, strict=True)]
    for n, why in listing_problems + [(n, why) for (n, _), why in zip(checks, verdicts, strict=True)]:
        if why is not None:
            problems[n - 1].append(ManifestProblem(n, ids[n - 1], why))

    flat = [p for ps in problems for p in ps]
    if flat:
        raise ManifestError(flat)
    return [r for r in rows if r is not None]


def load_and_validate(uri: str, *, max_workers: int = VALIDATE_WORKERS) -> list[ManifestRow]:
    """Read the manifest at ``uri`` and validate every row, with relative image paths taken against its folder."""
    raw = read_raw_manifest(uri)
    if not raw:
        raise ManifestError([], source=uri, message=f"the manifest {uri} has no rows")
    try:
        return validate_manifest(raw, manifest_folder(uri), max_workers=max_workers)
    except ManifestError as e:
        raise ManifestError(e.problems, source=uri) from None
