"""The one fsspec entry point: every read and write of a dataset, model or manifest goes through here.

Local paths and ``s3://`` URIs alike. For S3, s3fs takes credentials and the endpoint from the usual
AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or from
``storage_options``; nothing here logs them.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

from weightzoo.errors import InputError, NotFoundError, StorageError, WeightzooError, short
from weightzoo.storage.retry import is_transient, storage_cause

StorageOptions = Mapping[str, Any] | None

# Ids become file names (shards, exported LoRAs), so they are checked once, here.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" would let a trailing newline through


_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "abfs", "az")


class UnsafeIdError(InputError):
    """An id that cannot safely become part of a path."""


def check_id(item_id: str) -> str:
    """Return ``item_id`` if it is safe as one path component, else raise ``UnsafeIdError`` saying why."""
    if not isinstance(item_id, str) or not item_id:
        raise UnsafeIdError("id is empty")
    if "/" in item_id or "\\" in item_id:
        raise UnsafeIdError(f"id {short(repr(item_id))} contains a path separator")
    if ".." in item_id:
        raise UnsafeIdError(f"id {short(repr(item_id))} contains '..'")
    if not _SAFE_ID.fullmatch(item_id):
        raise UnsafeIdError(
            f"id {short(repr(item_id))} must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return item_id


def filesystem(uri: str, storage_options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the protocol-less path for ``uri`` (a local path or any fsspec URL).

    Object-store listings are not cached: a dataset is written by many workers at once, and a
    stale listing would hide their commits.
    """
    options = dict(storage_options or {})
    if str(uri).split("://", 1)[0] in _OBJECT_STORES:
        options.setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(str(uri), **options)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', keeping its protocol."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextmanager
def atomic_write(fs: AbstractFileSystem, path: str, durable: bool = True) -> Iterator[IO[bytes]]:
    """Open ``path`` for writing so that it appears whole or not at all.

    Local disk: write a temporary sibling, fsync, then ``os.replace``. Object stores (S3): an
    object becomes visible only when its upload completes, so a plain write is already atomic.
    ``durable=False`` skips the fsync (still atomic): for scratch files that a crash makes moot anyway.
    """
    if not is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):  # s3fs: abort the multipart upload; nothing becomes visible
                f.discard()
            raise
        f.close()
        return
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> None:
    with atomic_write(fs, path, durable) as f:
        f.write(data)


def read_index(folder: str, name: str, what: str) -> Any:
    """The JSON index file ``name`` of a model folder (any fsspec URI), parsed: what says a folder holds a
    ``what`` (a diffusers pipeline's ``model_index.json``, an edit base's ``config.json``) before anything
    loads. One line each for a file where the folder should be, no index, an index that does not parse."""
    fs, path = filesystem(str(folder))
    if is_local(fs) and not fs.isdir(path):
        raise NotFoundError(f"no {what} at {folder}" + (" (a file)" if fs.exists(path) else ""))
    try:
        raw = fs.cat_file(join(path, name))
    except FileNotFoundError:
        raise NotFoundError(f"no {what} ({name}) at {folder}") from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InputError(f"{folder}/{name} does not parse: {e}") from None


def redact(uri: str) -> str:
    """A URI safe to log: any ``user:password@`` part is removed."""
    return re.sub(r"//[^/@]*@", "//", str(uri))


# Storage that refuses a write for good, by errno: the words a person reads for each.
REFUSALS = {errno.EROFS: "read-only storage (read-only file system)", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded"}


def refused(exc: BaseException, uri: str, what: str) -> StorageError | None:
    """``exc`` as one ``StorageError`` line naming the storage ``uri``, the operation ``what`` and the refusal
    (read-only, permission, no space), its errno kept so retry policies still read it; None for anything else."""
    if isinstance(exc, WeightzooError) or not isinstance(exc, OSError) or exc.errno not in REFUSALS:
        return None
    where = f" at {exc.filename}" if exc.filename else ""
    err = StorageError(f"storage of {redact(uri)} cannot be used: {what} failed: {REFUSALS[exc.errno]}{where}")
    err.errno = exc.errno  # str() stays the message while strerror is unset
    return err


def storage_error(exc: BaseException, uri: str, what: str) -> StorageError | None:
    """A fault raised by a storage call on ``uri`` as one ``StorageError`` line naming the URI, the operation
    and the cause (refused write, unreachable endpoint, refused credentials, no bucket); None when it is not
    the storage's (a bug keeps its traceback)."""
    if isinstance(exc, WeightzooError):
        return None
    err = refused(exc, uri, what)
    if err is not None:
        return err
    why = storage_cause(exc, "://" in str(uri) and not str(uri).startswith("file://"))
    return StorageError(f"storage of {redact(uri)} cannot be used: {what} failed: {why}") if why else None


@contextmanager
def storage_step(uri: str, what: str, retried: bool = True) -> Iterator[None]:
    """The boundary where a storage call's fault becomes one user line naming the storage ``uri`` and the
    operation ``what`` it was part of (``verify --repair`` moving a ledger file, ``gc --delete`` removing
    orphans, ``publish`` writing its snapshot); anything else passes as it is. ``retried``: the step may run
    under a retry policy (``with_retries``), so a transient fault (a dropped connection) is left as it is,
    to be retried; a ``StorageError`` is permanent."""
    try:
        yield
    except Exception as e:
        err = None if retried and is_transient(e) else storage_error(e, uri, what)
        if err is None:
            raise
        raise err from e


# -- URIs relative to one another (a card that names its dataset, a subspace that names its fit) ----------


def split_uri(uri: str) -> tuple[str, str]:
    """(protocol, path): ``file`` and an absolute path for local URIs."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return "file", os.path.abspath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path


def relative_ref(target: str, card_dir: str) -> str | None:
    """``target`` relative to the folder ``card_dir``, when both are on local disk or in the same bucket
    (so the pair can move together); None otherwise."""
    (tp, tpath), (cp, cpath) = split_uri(target), split_uri(card_dir)
    if tp != cp or (tp != "file" and tpath.split("/", 1)[0] != cpath.split("/", 1)[0]):
        return None
    return (os.path.relpath if tp == "file" else posixpath.relpath)(tpath, cpath)


def resolve_ref(relative: str, card_dir: str) -> str:
    """The inverse of ``relative_ref``: ``relative`` resolved against the folder ``card_dir``."""
    protocol, path = split_uri(card_dir)
    if protocol == "file":
        return os.path.normpath(os.path.join(path, relative))
    return f"{protocol}://{posixpath.normpath(posixpath.join(path, relative))}"


def same_uri(a: str, b: str) -> bool:
    """Whether two URIs name the same place (a relative and an absolute local path included)."""
    return split_uri(a) == split_uri(b)


def uri_exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))
