"""Streaming randomized PCA against the exact SVD of the standardised matrix, on real shards."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta, write_shard
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.subspace.pca import (
    ShardRef,
    SubspaceConfig,
    fit_subspace,
    group_shards,
    load_subspace,
)

N, D, RANK, K = 600, 2000, 12, 8


def low_rank_matrix(n: int = N, d: int = D, rank: int = RANK, seed: int = 0) -> np.ndarray:
    """Known structure: a decaying rank-``rank`` signal plus noise, columns of very different scales and
    offsets, and a few constant columns (std 0, which the fit must not divide by)."""
    g = np.random.default_rng(seed)
    u = np.linalg.qr(g.standard_normal((n, rank)))[0]
    v = np.linalg.qr(g.standard_normal((d, rank)))[0]
    s = 60.0 * 0.8 ** np.arange(rank)
    x = (u * s) @ v.T + 0.05 * g.standard_normal((n, d))
    x = x * g.uniform(0.01, 3.0, d) + g.uniform(-2, 2, d)
    x[:, :5] = 0.5
    return x.astype(np.float32)


def write_matrix(uri: str, x: np.ndarray, shard_rows: int, row_group: int, dtype: str = "float32") -> Layout:
    """A real dataset (shards + ledger commits) holding the rows of ``x``."""
    layout = Layout(("w",), ((x.shape[1],),), dtype)
    ledger = Ledger(uri)
    for start in range(0, len(x), shard_rows):
        stop = min(start + shard_rows, len(x))
        rows = [RowMeta(f"r{i:05d}", attributes={"g": str(i % 3)}) for i in range(start, stop)]
        batch = f"b{start:05d}"
        commit_batch(ledger, batch, layout, rows, layout.to_numpy(torch.from_numpy(x[start:stop])),
                     row_group_size=row_group)
    return layout


@functools.cache
def _exact(key: bytes, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = torch.frombuffer(bytearray(key), dtype=torch.float32).reshape(n, d).double()
    std = t.std(0, correction=0)
    z = (t - t.mean(0)) / torch.where(std > 1e-12, std, torch.ones_like(std))
    _, s, vh = torch.linalg.svd(z, full_matrices=False)
    return s, vh, z.square().sum()


def exact_pca(x: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values, right singular vectors and total ‖Z‖² of the standardised matrix (float64, cached)."""
    s, vh, total = _exact(np.ascontiguousarray(x, dtype=np.float32).tobytes(), *x.shape)
    return s[:k], vh[:k], total


def check_against_exact(x: np.ndarray, out: str, k: int = K) -> None:
    sub = load_subspace(out)
    s, vh, total = exact_pca(x, k)
    ratio_exact = (s.square() / total).float()
    assert torch.allclose(sub.explained_variance_ratio, ratio_exact, rtol=0.01), (sub.explained_variance_ratio, ratio_exact)
    assert torch.allclose(sub.singular_values.double(), s, rtol=0.005)
    # principal angles between the fitted and exact top-k subspaces: all cosines ≈ 1
    cos = torch.linalg.svdvals(sub.components.double() @ vh.T)
    assert cos.min() > 0.999, cos
    # orthonormal components, and coordinates that are the projection of the standardised rows
    eye = sub.components @ sub.components.T
    assert torch.allclose(eye, torch.eye(k), atol=1e-4)
    meta, coords = sub.dataset_coords()
    assert coords.shape == (len(x), k) and meta.column("id").to_pylist()[:2] == ["r00000", "r00001"]
    assert torch.allclose(coords, sub.to_coords(torch.from_numpy(x)), atol=1e-3 * float(s[0]))
    assert sub.std[:5].eq(1).all() and sub.card["constant_columns"] == 5


@pytest.fixture(scope="module")
def matrix() -> np.ndarray:
    return low_rank_matrix()


def test_streaming_matches_exact_svd_for_any_sharding(tmp_path: Path, matrix: np.ndarray) -> None:
    """One shard of one row group; 8 shards of row groups of 13, one task per shard; the same 8 shards
    in 3 groups: all match the exact SVD and, with the same seed, each other (up to float rounding)."""
    subs = []
    for i, (rows, rg, tasks) in enumerate([(600, 600, 8), (77, 13, 8), (77, 13, 3)]):
        if not (tmp_path / f"ds{rows}").exists():
            write_matrix(str(tmp_path / f"ds{rows}"), matrix, rows, rg)
        opts = SubspaceConfig(components=K, tasks_per_pass=tasks)
        result = fit_subspace(str(tmp_path / f"ds{rows}"), str(tmp_path / f"s{i}"), opts)
        assert result.rows == N
        check_against_exact(matrix, str(tmp_path / f"s{i}"))
        assert not any((tmp_path / f"s{i}" / "_work").iterdir())  # work files removed
        subs.append(load_subspace(str(tmp_path / f"s{i}")))
    a = subs[0]
    for b in subs[1:]:
        assert torch.allclose(a.singular_values, b.singular_values, rtol=1e-4)
        assert torch.allclose((a.components * b.components).sum(1).abs(), torch.ones(K), atol=1e-4)


def test_group_shards_keeps_order_and_bounds_the_partials() -> None:
    refs = [ShardRef(f"s{i}", None, nbytes, "fp", f"{i:05d}") for i, nbytes in enumerate([5, 1, 1, 1, 9, 2, 2, 3])]
    for groups in (1, 2, 3, 8, 20):
        out = group_shards(refs, groups)
        assert len(out) <= min(groups, len(refs))
        assert [r for g in out for r in g.refs] == refs and all(g.refs for g in out)
    assert group_shards(refs, 1)[0].name == "00000-00007"
    equal = [ShardRef(f"s{i}", None, 100, "fp", f"{i:05d}") for i in range(8)]
    assert [len(g.refs) for g in group_shards(equal, 8)] == [1] * 8
    assert [len(g.refs) for g in group_shards(equal, 4)] == [2] * 4


def test_fp16_rows_and_only_committed_rows(tmp_path: Path, matrix: np.ndarray) -> None:
    """fp16 storage; an uncommitted shard is invisible; a shard whose ids were partly committed
    elsewhere contributes only its visible rows."""
    x16 = matrix.astype(np.float16).astype(np.float32)
    uri = str(tmp_path / "ds")
    layout = write_matrix(uri, x16, 200, 64, dtype="float16")
    ledger = Ledger(uri)
    extra = [RowMeta(f"r{i:05d}") for i in range(590, 600)] + [RowMeta("x-new")]
    new = x16[:1] * 0 + 7
    new[:, :5] = 0.5  # keep the constant columns constant
    dup = np.concatenate([x16[590:600], new]).astype(np.float16)
    commit_batch(ledger, "dup", layout, extra, dup)
    write_shard(ledger.fs, ledger.new_shard_path("orphan"), layout, [RowMeta("ghost")], dup[:1])  # never committed
    fit_subspace(uri, str(tmp_path / "sub"), SubspaceConfig(components=K))
    sub = load_subspace(str(tmp_path / "sub"))
    assert sub.card["rows"] == N + 1
    ids = sub.coords_table().column("id").to_pylist()
    assert "x-new" in ids and "ghost" not in ids and len(set(ids)) == N + 1
    check_against_exact(np.concatenate([x16, dup[-1:].astype(np.float32)]), str(tmp_path / "sub"))


def test_on_s3(s3_bucket: str, matrix: np.ndarray) -> None:
    write_matrix(f"{s3_bucket}/ds", matrix, 200, 100)
    fit_subspace(f"{s3_bucket}/ds", f"{s3_bucket}/sub", SubspaceConfig(components=K))
    check_against_exact(matrix, f"{s3_bucket}/sub")
    fs, path = filesystem(f"{s3_bucket}/sub")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    assert names == ["card.json", "coords.parquet", "directions.json", "directions.safetensors", "subspace.safetensors"]
    card = json.loads(fs.cat_file(f"{path}/card.json"))
    assert card["dataset"] == f"{s3_bucket}/ds" and Layout.from_json(json.dumps(card["layout"])).numel == D


def test_rejects_impossible_width(tmp_path: Path) -> None:
    write_matrix(str(tmp_path / "ds"), low_rank_matrix(20, 30, 3), 20, 20)
    with pytest.raises(ValueError, match="exceeds the dimension"):
        fit_subspace(str(tmp_path / "ds"), str(tmp_path / "sub"), SubspaceConfig(components=25))
    with pytest.raises(ValueError, match="below components"):  # before any pass: the Ritz problem would be too small
        SubspaceConfig(components=8, block_size=2, power_iters=2)


@pytest.mark.usefixtures("prefect_harness")
def test_flow_maps_passes_and_publishes(tmp_path: Path) -> None:
    """The Prefect flow runs the same algorithm as tasks and leaves the plot and the artifacts."""
    from prefect.client.orchestration import get_client

    from weightzoo.flows.config import FitSubspaceConfig
    from weightzoo.flows.fit_subspace import fit_subspace as fit_flow

    x = low_rank_matrix(120, 300, 6, seed=1)
    write_matrix(str(tmp_path / "ds"), x, 40, 16)
    params = FitSubspaceConfig(dataset=str(tmp_path / "ds"), out=str(tmp_path / "sub"),
                               options=SubspaceConfig(components=4, block_size=4, power_iters=2))
    result = fit_flow(params)
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert result.rows == 120 and result.components == 4
    check_against_exact(x, str(tmp_path / "sub"), k=4)
    assert (tmp_path / "sub" / "explained_variance.png").read_bytes()[:4] == b"\x89PNG"
    assert {"subspace-explained-variance", "subspace-summary", "subspace-top-components"} <= keys
