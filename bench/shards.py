"""Shard write/read throughput versus plain file I/O of the same bytes, in one run.

    python bench/shards.py [--rows 2000] [--dim 100000] [--repeat 3] [--dir /tmp]

Writes N rows × D fp16 values through the shard API (ShardWriter, then the ledger-free reader
``iter_shard`` and the committed-dataset reader ``Dataset.iter_batches``, with its default CRC32
verification and with ``verify=False``), and the same bytes with plain ``open().write()`` / ``read()``.
Prints MB/s (best of --repeat) and the ratio to plain I/O. The CRC32 is zlib's, or ISA-L's (bit-identical,
faster) when the optional ``isal`` package is installed; the header says which.
Targets: reads ≥ 80% of plain (verified reads included), writes ≥ 60%. The default ShardWriter fsyncs before it returns (the
ledger commit must not point at bytes a power cut can lose), so it is compared with plain + fsync;
``durable=False`` (what a kill -9 already survives) is compared with a plain write.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np

from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.open import open_dataset
from weightzoo.storage.shards import CRC32_IMPL, RowMeta, ShardWriter, iter_shard
from weightzoo.storage.writer import commit_batch


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--row-group", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(dir=args.dir)
    try:
        layout = Layout(("w",), ((args.dim,),), "float16")
        weights = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32).astype(np.float16)
        rows = [RowMeta(id=f"id-{i:06d}", prompt="sks person", attributes={"colour": "red"}) for i in range(args.rows)]
        mb = weights.nbytes / 1e6
        plain = os.path.join(tmp, "plain.bin")
        shard = os.path.join(tmp, "shard.parquet")
        fs, _ = filesystem(shard)

        def plain_write(fsync: bool = False) -> None:
            with open(plain, "wb") as f:
                for i in range(0, args.rows, args.row_group):  # same chunking as the shard writer
                    f.write(weights[i : i + args.row_group])
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())

        def plain_read() -> None:
            with open(plain, "rb") as f:
                while f.read(args.row_group * layout.nbytes):
                    pass

        def shard_write(durable: bool = False) -> None:
            with ShardWriter(fs, shard, layout, row_group_size=args.row_group, durable=durable) as w:
                for i in range(0, args.rows, args.row_group):
                    w.write(rows[i : i + args.row_group], weights[i : i + args.row_group])

        def shard_read() -> None:
            n = sum(len(w) for _, w in iter_shard(fs, shard, columns=["id"]))
            assert n == args.rows

        ledger = Ledger(os.path.join(tmp, "dataset"))
        commit_batch(ledger, "b0", layout, rows, weights, row_group_size=args.row_group)

        def dataset_read(verify: bool = True) -> None:
            n = sum(len(w) for _, w in Dataset(ledger.uri).iter_batches(columns=["id"], verify=verify))
            assert n == args.rows

        def open_dataset_read() -> None:  # weightzoo.open_dataset: the pyarrow dataset DuckDB/polars/pandas scan
            batches = open_dataset(ledger.uri).to_batches(columns=["weights"])
            n = sum(len(np.frombuffer(b.column("weights").buffers()[1], np.float16)) // args.dim for b in batches)
            assert n == args.rows

        t_pw = best(plain_write, args.repeat)
        t_sw = best(shard_write, args.repeat)
        t_pwf = best(lambda: plain_write(fsync=True), args.repeat)
        t_swf = best(lambda: shard_write(durable=True), args.repeat)
        t_pr = best(plain_read, args.repeat)
        t_sr = best(shard_read, args.repeat)
        t_dn = best(lambda: dataset_read(verify=False), args.repeat)
        t_dr = best(dataset_read, args.repeat)
        t_od = best(open_dataset_read, args.repeat)
        results = [
            ("write", "plain open().write()", t_pw, t_pw),
            ("write", "ShardWriter(durable=False)", t_sw, t_pw),
            ("write", "plain + fsync", t_pwf, t_pwf),
            ("write", "ShardWriter (default)", t_swf, t_pwf),
            ("read", "plain open().read()", t_pr, t_pr),
            ("read", "iter_shard", t_sr, t_pr),
            ("read", "iter_batches(verify=False)", t_dn, t_pr),
            ("read", "iter_batches (CRC32)", t_dr, t_pr),
            ("read", "open_dataset to_batches", t_od, t_pr),
        ]
        print(
            f"{args.rows} rows x {args.dim} fp16 = {mb:.0f} MB, row groups of {args.row_group}, best of {args.repeat}, "
            f"CRC32 from {CRC32_IMPL}"
        )
        print(f"{'op':<6} {'path':<28} {'MB/s':>8} {'vs plain':>9}")
        for op, name, t, base in results:
            print(f"{op:<6} {name:<28} {mb / t:>8.0f} {base / t:>8.0%}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
