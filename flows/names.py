"""Names and tags that make a dataset's runs findable; free of Prefect and torch (the configs use them).

Every flow that works on a dataset names its run after it (``dataset_name``: the URI's last folder, made
safe, credentials never shown) and tags it ``dataset:<name>``, so the UI's tag filter (or
``FlowRunFilterTags``) shows one dataset's runs. A batch run's name also carries a short hash of the dataset
URI: the same ids make the same batch id in every dataset, and the hash keeps two datasets' batch runs
apart while the batch id in the ledger stays what it was (docs/ORCHESTRATION.md).
"""

from __future__ import annotations

import hashlib
import re

from weightzoo.storage.fs import redact

DATASET_TAG = "dataset:"  # a run's tag naming its dataset: ``dataset:<dataset_name>``
NAME_CHARS = 40  # a dataset's name in run names and tags: enough to tell folders apart, short in the UI's list


def _plain(uri: str) -> str:
    """The URI without credentials, query or trailing slash: what names and hashes are made of."""
    return re.split(r"[?#]", redact(str(uri)), maxsplit=1)[0].rstrip("/")


def dataset_name(uri: str) -> str:
    """A short, safe name for the dataset at ``uri``: its last folder (``s3://u:p@bucket/zoo/faces/`` ->
    ``faces``), in letters, digits, ``.``, ``_`` and ``-`` only."""
    last = _plain(uri).rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")[:NAME_CHARS] or "dataset"


def dataset_hash(uri: str) -> str:
    """Six hex digits of the dataset URI (credentials left out): tells apart datasets of the same name."""
    return hashlib.sha256(_plain(uri).encode()).hexdigest()[:6]


def dataset_tags(uri: str) -> list[str]:
    return [f"{DATASET_TAG}{dataset_name(uri)}"]


def batch_run_name(dataset: str, batch_id: str) -> str:
    """``finetune-<dataset>-<hash>-<batch id>``: unique across datasets (a batch id is not)."""
    return f"finetune-{dataset_name(dataset)}-{dataset_hash(dataset)}-{batch_id}"

