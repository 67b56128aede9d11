"""Manifest files: JSONL, CSV or Parquet (optionally compressed) read into raw rows, typed rows back out
as JSONL. A row that cannot even be parsed comes back as a ``ManifestProblem`` in its place, so that
validation reports it with every other bad row.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.fs import atomic_write, filesystem, is_local
from weightzoo.tasks.finetune.row import ManifestError, ManifestProblem, ManifestRow, parse_rows

MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")

RawRow = dict[str, Any]
# Parquet rows turned into Python dicts at a time (a Parquet manifest is read whole, its rows in batches).
PARQUET_BATCH_ROWS = 4096


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


def _read_jsonl(text: str) -> Iterator[RawRow | ManifestProblem]:
    lines = (ln for ln in io.StringIO(text) if ln.strip())  # line by line: no list of every line at once
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield ManifestProblem(n, None, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield ManifestProblem(n, None, f"not a JSON object but {type(record).__name__}")
            continue
        yield _normalise(record)


def _read_csv(text: str) -> Iterator[RawRow | ManifestProblem]:
    for n, record in enumerate(csv.DictReader(io.StringIO(text)), start=1):
        if None in record:  # DictReader files surplus cells under the key None
            extra = len(record[None])  # type: ignore[index]
            rid = record.get("id")
            yield ManifestProblem(n, rid or None, f"{extra} more cell(s) than the header has columns")
            continue
        yield _normalise({k.strip(): v.strip() if isinstance(v, str) else v for k, v in record.items()})


def _file_error(uri: str, reason: str) -> ManifestError:
    """A one-line error about the manifest file as a whole (no row to blame)."""
    return ManifestError([], source=uri, message=f"the manifest {uri} {reason}")


def _directory_error(uri: str) -> ManifestError:
    return _file_error(uri, f"is a directory; give the manifest file in it ({', '.join(MANIFEST_SUFFIXES)})")


def _read_bytes(fs: AbstractFileSystem, path: str, uri: str, fmt: str) -> bytes:
    """The manifest's bytes (text formats decompressed), or a one-line error naming it instead of a traceback.

    A local pipe (``--manifest <(zcat m.jsonl.gz)``, a FIFO) is read as a stream: fsspec's local file seeks,
    which a pipe cannot."""
    try:
        if is_local(fs) and not (stat.S_ISREG(mode := os.stat(path).st_mode) or stat.S_ISDIR(mode)):
            with open(path, "rb") as pipe:
                return pipe.read()
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


def _read_parquet(data: bytes, uri: str) -> Iterator[RawRow | ManifestProblem]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as e:  # the text names the in-memory buffer, not the file: drop that part
        why = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(e))
        raise _file_error(uri, f"is not a readable Parquet file ({why})") from None
    for batch in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):  # Python objects a batch at a time
        yield from (_normalise(r) for r in batch.to_pylist())


def read_raw_manifest(uri: str) -> list[RawRow | ManifestProblem]:
    """Every row of the manifest at ``uri`` as a plain dict (``iter_raw_manifest``, held in a list)."""
    return list(iter_raw_manifest(uri))


def iter_raw_manifest(uri: str) -> Iterator[RawRow | ManifestProblem]:
    """Every row of the manifest at ``uri`` as a plain dict, unvalidated, in file order, one at a time.

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
        yield from _read_parquet(data, uri)
        return
    text = _decode(data, uri)
    del data  # the text is what rows are read from: not the bytes as well
    yield from _read_jsonl(text) if fmt == "jsonl" else _read_csv(text)


def read_manifest(uri: str) -> list[ManifestRow]:
    """The rows of the manifest at ``uri`` (JSONL, CSV or Parquet), typed but with images unchecked.

    Raises ``ManifestError`` listing every row that does not parse; ``load_and_validate`` checks more.
    """
    rows, problems, _ = parse_rows(read_raw_manifest(uri))
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
