"""A shard writer run as its own process by the ledger tests (so it can be killed with SIGKILL).

usage: python shard_writer_proc.py DATASET BATCH N_ROWS DIM [--hang-before-commit]
Rows get ids BATCH-0..N-1 and weights = row index + batch hash, so readers can check them.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta, write_shard


def rows_for(batch: str, n: int, dim: int) -> tuple[list[RowMeta], np.ndarray]:
    seed = sum(map(ord, batch))
    w = (np.arange(n, dtype=np.float32)[:, None] + seed + np.zeros((1, dim), np.float32)).astype(np.float16)
    return [RowMeta(id=f"{batch}-{i}") for i in range(n)], w


def main() -> None:
    dataset, batch, n, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    layout = Layout(("w",), ((dim,),), "float16")
    ledger = Ledger(dataset)
    rows, w = rows_for(batch, n, dim)
    info = write_shard(ledger.fs, ledger.new_shard_path(batch), layout, rows, w, row_group_size=4)
    print("WRITTEN", flush=True)
    if "--hang-before-commit" in sys.argv:
        time.sleep(600)
    ledger.commit(batch, info)
    print("COMMITTED", flush=True)


if __name__ == "__main__":
    main()
