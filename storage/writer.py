"""The commit protocol in one call: every writer of rows (the batch driver, benches, tests) uses it.

``commit_batch`` fixes the dataset card's recipe (refusing another recipe or layout), writes the batch's
shard whole (temp file + rename, or one upload), checks the shard is there at its size, writes the
ledger entry (the commit) and checks the shard once more. Like mosaicml/streaming's writer, the index is
written only after the data is complete. A shard found missing (a ``gc`` racing the write) raises
``LostWriteError``, which the retry policy retries; one found missing *after* its commit has its entry
quarantined first, so the ledger never points at a shard that is not there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace

import numpy as np
import torch

from weightzoo.storage.card import Recipe, fix_recipe
from weightzoo.storage.fs import StorageOptions
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import COMMITS, CommitEntry, Ledger
from weightzoo.storage.retry import LostWriteError
from weightzoo.storage.shards import RowMeta, ShardInfo, write_shard


def _shard_problem(ledger: Ledger, info: ShardInfo) -> str | None:
    """Why the shard just written is not there as written (None when it is)."""
    name = info.path.rsplit("/", 1)[-1]
    ledger.fs.invalidate_cache(info.path)
    try:
        size = ledger.fs.size(info.path)
    except FileNotFoundError:
        return f"shard {name} is gone"
    return None if size == info.nbytes else f"shard {name} is {size} bytes, {info.nbytes} were written"


def commit_batch(
    dataset: Ledger | str,
    batch_id: str,
    layout: Layout,
    rows: Sequence[RowMeta],
    weights: np.ndarray | torch.Tensor,
    recipe: Recipe | None = None,
    *,
    base_model: str | None = None,
    row_group_size: int = 128,
    storage_options: StorageOptions = None,
) -> CommitEntry | None:
    """Write ``rows`` (with their (n, D) ``weights``) as one shard of ``dataset`` and commit it.

    ``recipe`` (the build's; its layout is set here) is checked against the dataset card and fixes it at the
    first commit; without one (benches, tests of the ledger) the card is left alone. Returns the entry, or
    None when every id was already committed (a rerun). ``base_model`` defaults to the recipe's.
    """
    ledger = dataset if isinstance(dataset, Ledger) else Ledger(dataset, storage_options)
    if recipe is not None:
        recipe = replace(recipe, layout=layout.fingerprint)
        fix_recipe(ledger, recipe)
    info = write_shard(ledger.fs, ledger.new_shard_path(batch_id), layout, rows, weights, row_group_size)
    problem = _shard_problem(ledger, info)
    if problem:
        raise LostWriteError(f"batch {batch_id}: {problem} after writing it; not committed")
    base = base_model if base_model is not None else (recipe.base_model if recipe else "")
    entry = ledger.commit(batch_id, info, base_model=base, recipe=asdict(recipe) if recipe else None)
    problem = _shard_problem(ledger, info)
    if entry is not None and problem:
        ledger.quarantine(f"{COMMITS}/{entry.name}", f"{problem} right after its commit", shard=entry.shard)
        raise LostWriteError(f"batch {batch_id}: {problem} right after its commit; entry quarantined")
    return entry
