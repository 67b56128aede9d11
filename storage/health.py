"""Why a dataset's storage cannot take a build: missing, no such bucket, read-only, (almost) full.

A build that fails for one of these reasons may not be able to record why in the dataset itself (a
read-only or full disk refuses the failure record too), so ``weightzoo status`` asks the storage.
"""

from __future__ import annotations

import os

from weightzoo.errors import CorruptShardError
from weightzoo.storage.card import read_card
from weightzoo.storage.fs import StorageOptions, filesystem, is_local, redact
from weightzoo.storage.ledger import Ledger

# Below this, a shard of any real batch will not fit: warn before a build finds out after training.
LOW_SPACE_BYTES = 64 << 20


def _local_problems(path: str) -> list[str]:
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    out = []
    if st.f_flag & os.ST_RDONLY:
        out.append(f"read-only file system at {probe}")
    free = st.f_bavail * st.f_frsize
    if free < LOW_SPACE_BYTES:
        out.append(f"no space left: {free:,} bytes free at {probe}")
    return out


def storage_problems(uri: str, storage_options: StorageOptions = None) -> list[str]:
    """What stops writes to ``uri`` (empty when nothing is known to): one line per problem."""
    fs, path = filesystem(uri, storage_options)
    if is_local(fs):
        return _local_problems(path)
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
