"""Why a dataset's storage cannot take a build: missing, no such bucket, read-only, (almost) full,
unreachable, credentials refused.

A build that fails for one of these reasons may not be able to record why in the dataset itself (a
read-only or full disk refuses the failure record too), so ``weightzoo status`` asks the storage.
``probe`` asks an object store once, fast, before a build's first batch (a missing bucket used to be
found after every batch had tried it), and ``storage_fault`` turns a storage exception into one line
naming the URI and the likely cause.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from weightzoo.errors import CorruptShardError, StorageError
from weightzoo.storage.card import read_card
from weightzoo.storage.fs import StorageOptions, filesystem, is_local, redact
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.retry import storage_cause

# The probe connects once, for at most this long, with no retries: an endpoint nothing listens on is
# answered in seconds (s3fs's own 5 retries with backoff took 11 s), while a build's reads keep theirs.
PROBE_CONNECT_S = 3.0
PROBE_READ_S = 10.0

# Space is judged against what the next batch writes, estimated from the shards already committed (a fixed
# 64 MiB said "no space left" right after a build of small shards succeeded). Below MIN_FREE_BYTES not even a
# ledger entry or a small shard may fit; BATCH_MARGIN leaves room for a batch a little larger than the largest
# so far (ids differ in length) and for its ledger files.
MIN_FREE_BYTES = 1 << 20
BATCH_MARGIN = 1.25


def batch_bytes(shard_sizes: Iterable[int]) -> int:
    """Bytes the next batch is expected to write: the largest committed shard, with the margin (0 for none)."""
    return int(max(shard_sizes, default=0) * BATCH_MARGIN)


def _local_problems(path: str, need: int) -> list[str]:
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    out = []
    if st.f_flag & os.ST_RDONLY:
        out.append(f"read-only file system at {probe}")
    free = st.f_bavail * st.f_frsize
    need = max(need, MIN_FREE_BYTES)
    if free < need:
        out.append(f"no space left for a batch: {free:,} bytes free at {probe}, the next batch needs about "
                   f"{need:,} (the largest committed shard, plus {BATCH_MARGIN - 1:.0%})")
    return out


def storage_problems(uri: str, storage_options: StorageOptions = None, need_bytes: int = 0) -> list[str]:
    """What stops writes to ``uri`` (empty when nothing is known to): one line per problem. ``need_bytes``:
    what the next batch writes (``batch_bytes``); less free space than that (or than MIN_FREE_BYTES) is one."""
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        return _local_problems(path, need_bytes)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError:
        return [f"no such bucket: {redact(uri.split('://', 1)[0] + '://' + bucket)}"]
    except PermissionError:
        return [f"access denied to {redact(uri)}"]
    return []


def card_problems(ledger: Ledger) -> list[str]:
    """An unreadable dataset card (every build refuses to start on it): one line, or none."""
    try:
        read_card(ledger)
    except CorruptShardError as e:
        return [f"{e}: run weightzoo verify --repair"]
    return []


def storage_fault(exc: BaseException, uri: str) -> StorageError | None:
    """``exc`` as one line naming ``uri`` and the likely cause (credentials, endpoint, bucket), or None
    when it is not a storage fault (a bug keeps its traceback)."""
    if isinstance(exc, StorageError):
        return exc
    why = storage_cause(exc, "://" in str(uri) and not str(uri).startswith("file://"))
    return StorageError(f"storage of {redact(uri)} cannot be used: {why}") if why else None


def _probe_options(storage_options: StorageOptions) -> dict:
    options = dict(storage_options or {})
    config = {**options.get("config_kwargs", {}), "connect_timeout": PROBE_CONNECT_S, "read_timeout": PROBE_READ_S,
              "retries": {"max_attempts": 1}}
    return {**options, "config_kwargs": config, "skip_instance_cache": True}


def probe(uri: str, storage_options: StorageOptions = None) -> None:
    """Raise one-line ``StorageError`` if the object store holding ``uri`` cannot be reached, refuses the
    credentials or has no such bucket: one bounded request, before any batch. Local paths pass (their
    read-only or full disks are reported per batch and by ``status``)."""
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        return
    if "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)):
        fs, path = filesystem(uri, _probe_options(storage_options))
        fs.retries = 1  # s3fs retries a refused connection 5 times with backoff on its own
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise StorageError(f"storage of {redact(uri)} cannot be used: no such bucket: "
                           f"{redact(uri.split('://', 1)[0] + '://' + bucket)} (create it or fix the name)") from None
    except Exception as e:  # classified by cause; anything else is a bug and keeps its traceback
        raise storage_fault(e, uri) or e from None
