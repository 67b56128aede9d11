"""The manifest: one typed row per identity or concept to fine-tune.

Image references are URIs (any fsspec URL) or paths relative to the manifest's own folder.

A manifest is checked whole before any GPU time is spent: ``load_and_validate`` reads every row,
checks ids, duplicates, fields and that every image exists, fully decodes and passes ``ImageConfig``,
and raises one ``ManifestError`` that lists every problem, so a bad manifest is fixed in one pass, not one
row per run. ``load_image`` is also what training reads images with, so a validated image is trained on
exactly as it was checked. The format and the image rules are documented in docs/MANIFEST.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.fs import UnsafeIdError, atomic_write, check_id, filesystem, join
from weightzoo.tasks.finetune.contract import RowRules

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
# Image checks are bound by storage latency (an S3 GET is ~10-50 ms), not by CPU, so many threads pay off.
VALIDATE_WORKERS = 16
# The most ImageConfig.max_pixels may be (about 1.07 gigapixels); PIL's own bomb guard is kept above it.
PIXEL_CEILING = 1 << 30
# 16-bit grey as PIL opens it ("I" is how older Pillow opened 16-bit PNGs); PIL's convert() clips these at 255.
SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

RawRow = dict[str, Any]
DEFAULT_RULES = RowRules()


class ManifestRow(BaseModel):
    """One fine-tune to run: who or what, with which prompt, from which images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Unique id; becomes part of file names, so letters, digits, '.', '_', '-' only.")
    kind: Literal["identity", "concept", "edit"] = Field(
        "identity", description="A person-like identity, a concept, or an image-editing concept ('edit')."
    )
    prompt: str = Field("sks person", description="Instance prompt with the rare token, e.g. 'sks person'.")
    class_prompt: str = Field("person", description="Class prompt for prior preservation, e.g. 'person'.")
    images: list[str] = Field(default_factory=list, description="Image URIs, absolute or relative to the manifest.")
    image_dir: str | None = Field(None, description="A folder URI whose images are all used (instead of, or as well as, images).")
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Labels (e.g. colour=red) for edit directions; for kind 'edit', the edit spec: 'family' and its "
        "numeric parameters (numbers accepted, kept as canonical text like every stored attribute).",
    )
    # Kind 'edit' only: paired by position with `images` (the sources). None: weightzoo renders the targets.
    targets: list[str] | None = Field(
        None, description="Kind 'edit': target image URIs, one per source in `images` (default: rendered from the spec)."
    )

    @model_validator(mode="before")
    @classmethod
    def _edit_numbers(cls, data: Any) -> Any:
        """Kind 'edit' accepts numeric parameters as numbers; they are stored as canonical text.

        The dataset's ``attributes`` column is a string map (docs/FORMAT.md), so the row holds exactly what
        a shard will; ``tasks.concepts.spec.EditSpec.parse`` reads the numbers back.
        """
        if isinstance(data, Mapping) and data.get("kind") == "edit" and isinstance(data.get("attributes"), Mapping):
            attrs = {k: canonical_number(v) if _is_number(v) else v for k, v in data["attributes"].items()}
            data = {**data, "attributes": attrs}
        return data

    @field_serializer("attributes")
    def _numbers_out(self, attributes: dict[str, str]) -> dict[str, str | float]:
        """Kind 'edit' rows write their numeric parameters as numbers again (other kinds: text as given)."""
        if self.kind != "edit":
            return attributes
        return {k: float(v) if k != "family" and _numeric_text(v) else v for k, v in attributes.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def canonical_number(value: float) -> str:
    """The text a numeric attribute is stored as: up to 10 significant digits ('0.7', '3', '1e-05')."""
    return format(float(value), ".10g")


def _numeric_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


Byte = Annotated[int, Field(ge=0, le=255)]


class ImageConfig(BaseModel):
    """How an image file becomes the 8-bit RGB that is checked and trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Composite by default: transparent cut-outs are common in subject folders, and flattening them on a known
    # colour is what a person expects; dropping alpha instead trains on whatever colour hid under it.
    alpha: Literal["composite", "refuse"] = Field(
        "composite",
        description="What to do with transparent pixels: 'composite' them on `background`, or 'refuse' the image "
        "(fully opaque images with an alpha channel are always accepted).",
    )
    # White: cut-outs are made to sit on white pages, and a plain light background is easy for a LoRA to ignore.
    background: tuple[Byte, Byte, Byte] = Field(
        (255, 255, 255), description="RGB colour (0-255 each) that transparent pixels are composited on."
    )
    # 50 MP: above the 48 MP of the largest phone photos, so no phone original is refused, yet a scan or a
    # crafted file (a decompression bomb) is stopped from its header before gigabytes of pixels are decoded;
    # validation decodes 16 images at once, and a 50 MP image is already 150 MB as RGB.
    max_pixels: int = Field(
        50_000_000, gt=0, le=PIXEL_CEILING,
        description=f"Largest width x height accepted; larger images are refused before decoding (at most {PIXEL_CEILING}).",
    )


DEFAULT_IMAGE_OPTIONS = ImageConfig()


class UnusableImageError(InputError):
    """An image that ``ImageConfig`` refuse: too many pixels, or transparent pixels under ``alpha='refuse'``."""


def _keep_pil_guard_behind_ours() -> None:
    """Raise PIL's decompression-bomb limit to PIXEL_CEILING (never lower it, nor turn a disabled one back on).

    PIL checks inside ``Image.open``, before the file's name is known to anyone: it warns above its limit
    (89 MP by default) and raises above twice that. With its limit at the largest ``max_pixels`` allowed, PIL
    says nothing about an image we accept, and its error (above 2 GP) is turned into ours in ``_open``.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PIXEL_CEILING:
        Image.MAX_IMAGE_PIXELS = PIXEL_CEILING


_keep_pil_guard_behind_ours()


def _too_large(uri: str, size: str, limit: int) -> UnusableImageError:
    return UnusableImageError(f"image too large: {uri} is {size} pixels, over the limit of {limit:,} (max_pixels)")


def _open(data: bytes, uri: str, limit: int) -> Image.Image:
    """Open (header only) an image, reporting PIL's bomb error as ours so it names the file.

    PIL's warning (above PIXEL_CEILING, so only for images refused anyway) is caught too, for processes
    that turn warnings into errors.
    """
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(uri, f"{int(found[1]):,}" if found else "over 2x PIL's limit of", limit) from None


def _check_size(im: Image.Image, uri: str, limit: int) -> None:
    """Refuse an image of more than ``limit`` pixels from its header, before its pixels are decoded."""
    width, height = im.size
    if width * height > limit:
        raise _too_large(uri, f"{width}x{height} = {width * height:,}", limit)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8-bit 'L' (or 'LA' if it has a tRNS key); any other image as it is.

    PIL's convert() clips 16-bit values at 255, so a 16-bit PNG came out nearly white. PIL already
    reduces 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits as it decodes them.
    """
    if im.mode not in SIXTEEN_BIT_GREY:
        return im
    values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    key = im.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", [grey, alpha])


def _flatten(im: Image.Image, uri: str, options: ImageConfig) -> Image.Image:
    """``im`` as RGB; transparent pixels composited on ``options.background``, or refused, never silently dropped."""
    if not im.has_transparency_data:
        return im.convert("RGB")
    rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)  # 255 * 255 + 127 still fits in 16 bits
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() < 255 and options.alpha == "refuse":
        raise UnusableImageError(f"image has transparent pixels: {uri} (the alpha policy is 'refuse')")
    background = np.array(options.background, dtype=np.uint16)
    return Image.fromarray(((colour * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8))


def load_image(uri: str, options: ImageConfig = DEFAULT_IMAGE_OPTIONS) -> Image.Image:
    """Read and fully decode one image as the 8-bit RGB that is trained on (see ``ImageConfig``).

    Turned upright by its EXIF orientation, 16-bit grey scaled to 8 bits, transparency composited or refused,
    oversize refused before decoding. Raises FileNotFoundError, UnusableImageError, or PIL's error for a
    file that does not decode.
    """
    fs, path = filesystem(uri)
    with _open(fs.cat_file(path), uri, options.max_pixels) as im:
        _check_size(im, uri, options.max_pixels)
        im.load()
        upright = ImageOps.exif_transpose(im)  # a copy, so it outlives the file
    return _flatten(_to_8bit(upright), uri, options)


def load_images(
    row: ManifestRow, base_uri: str | None = None, image_options: ImageConfig = DEFAULT_IMAGE_OPTIONS
) -> list[Image.Image]:
    """Every image of a row, read as training reads them; raises on the first that cannot be used."""
    uris = image_uris(row, base_uri)
    if not uris:
        raise InputError(f"row {row.id!r} has no images")
    return [load_image(u, image_options) for u in uris]


# --- reading and writing -------------------------------------------------------------------------


def _format_of(uri: str) -> str:
    """'jsonl', 'csv' or 'parquet' from the file suffix (a compression suffix such as .gz is looked past)."""
    name = str(uri).lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(comp)
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise InputError(f"cannot tell the manifest format of {uri!r}: expected a name ending in {', '.join(MANIFEST_SUFFIXES)}")


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


def _file_error(uri: str, reason: str) -> ManifestError:
    """A one-line error about the manifest file as a whole (no row to blame)."""
    return ManifestError([], source=uri, message=f"the manifest {uri} {reason}")


def _directory_error(uri: str) -> ManifestError:
    return _file_error(uri, f"is a directory; give the manifest file in it ({', '.join(MANIFEST_SUFFIXES)})")


def _read_bytes(fs: AbstractFileSystem, path: str, uri: str, fmt: str) -> bytes:
    """The manifest's bytes (text formats decompressed), or a one-line error naming it instead of a traceback."""
    try:
        with fs.open(path, "rb", compression=None if fmt == "parquet" else "infer") as f:
            return f.read()
    except IsADirectoryError:
        raise _directory_error(uri) from None
    except FileNotFoundError:
        if fs.isdir(path):  # object stores say "not found" for a prefix
            raise _directory_error(uri) from None
        raise NotFoundError(f"manifest not found: {uri}") from None
    except PermissionError:
        raise _file_error(uri, "cannot be read: permission denied") from None
    except (gzip.BadGzipFile, EOFError, lzma.LZMAError, zlib.error) as e:
        raise _file_error(uri, f"cannot be decompressed ({type(e).__name__}: {e})") from None


def _decode(data: bytes, uri: str) -> str:
    """UTF-8 text (a leading BOM dropped: spreadsheets often start CSVs with one), or an error saying where it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise _file_error(uri, f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}); save it as UTF-8") from None


def _read_parquet(data: bytes, uri: str) -> list[RawRow | ManifestProblem]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:  # the text names the in-memory buffer, not the file: drop that part
        why = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(e))
        raise _file_error(uri, f"is not a readable Parquet file ({why})") from None
    return [_normalise(r) for r in table.to_pylist()]


def read_raw_manifest(uri: str) -> list[RawRow | ManifestProblem]:
    """Every row of the manifest at ``uri`` as a plain dict, unvalidated, in file order.

    JSONL, CSV or Parquet by suffix (optionally compressed, e.g. ``.jsonl.gz``). A row that cannot
    even be parsed (a JSONL line that is not JSON) comes back as a ``ManifestProblem`` in its place,
    so that validation can still report it together with every other bad row. A file that cannot be
    read at all (missing, a directory, not Parquet, not UTF-8) raises one line naming it: ``NotFoundError``
    if it is missing, else ``ManifestError``.
    """
    fs, path = filesystem(uri)
    try:
        fmt = _format_of(uri)
    except InputError:
        if fs.isdir(path):
            raise _directory_error(uri) from None
        raise
    data = _read_bytes(fs, path, uri, fmt)
    if fmt == "parquet":
        return _read_parquet(data, uri)
    text = _decode(data, uri)
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


def validate_manifest(
    rows_or_raw: Sequence[ManifestRow | Mapping[str, Any] | ManifestProblem],
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
    since reads from S3 are latency-bound. Relative image paths are taken against ``base_uri``. Decodes every
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

    for n, row in enumerate(rows, start=1):
        if row is not None:
            problems[n - 1] += [ManifestProblem(n, row.id, why) for why in rules.problems(row, base_uri)]

    probes = [row if row is not None else _image_probe(entry) for row, entry in zip(rows, entries, strict=True)]
    present = [(n, probe) for n, probe in enumerate(probes, start=1) if probe is not None]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        listed = list(pool.map(lambda item: _list_images(item[1], base_uri, rules), present))
        checks = [(n, uri) for (n, _), (uris, _) in zip(present, listed, strict=True) for uri in uris]
        verdicts = list(pool.map(lambda check: _check_image(check[1], image_options), checks))
    listing_problems = [(n, why) for (n, _), (_, why) in zip(present, listed, strict=True)]
    for n, why in listing_problems + [(n, why) for (n, _), why in zip(checks, verdicts, strict=True)]:
        if why is not None:
            problems[n - 1].append(ManifestProblem(n, ids[n - 1], why))

    flat = [p for ps in problems for p in ps]
    if flat:
        raise ManifestError(flat)
    return [r for r in rows if r is not None]


def load_and_validate(
    uri: str, *, max_workers: int = VALIDATE_WORKERS, image_options: ImageConfig = DEFAULT_IMAGE_OPTIONS,
    rules: RowRules = DEFAULT_RULES,
) -> list[ManifestRow]:
    """Read the manifest at ``uri`` and validate every row, with relative image paths taken against its folder.

    Raises ``NotFoundError`` or a one-line ``ManifestError`` for a file that cannot be read at all, else
    one ``ManifestError`` listing every bad row.
    """
    raw = read_raw_manifest(uri)
    if not raw:
        raise ManifestError([], source=uri, message=f"the manifest {uri} has no rows")
    try:
        return validate_manifest(raw, manifest_folder(uri), max_workers=max_workers, image_options=image_options,
                                 rules=rules)
    except ManifestError as e:
        raise ManifestError(e.problems, source=uri) from None
