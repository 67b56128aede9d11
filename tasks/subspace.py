"""Streaming randomized PCA of a weights dataset: the weights2weights subspace, never the N×D matrix.

What is fitted: each parameter (column) is standardised, ``z = (x − mean) / std`` (as weights2weights
does; a constant column gets std 1 so it contributes nothing), then the top-k right singular vectors
of the standardised matrix Z (N×D) are found with a randomized range finder (Halko, Martinsson and
Tropp 2011) run on the D-side, so no state ever grows with N:

    pass 0       moments: count, mean, M2 per column (float64, Chan's parallel merge)
    pass 1       Y = Zᵀ(Z Ω)            Ω: D×l Gaussian, l = k + p        → Q = qr(Y)
    pass 2..q+1  Y = Zᵀ(Z Q)            (power iterations, QR between passes)
    last pass    B = Z Q (n×l per group, written to the work URI), G = BᵀB   → eigh(G) = V Λ Vᵀ
                 components = (Q V)ᵀ[:k], singular values √Λ, coordinates B V[:, :k]

Every pass is a sum of partials over groups of shards (at most ``tasks_per_pass`` groups, so the
partial files do not grow with the number of shards), and each ``group_*`` function below is one
Prefect task mapped over the groups (``flows/fit_subspace.py``), in one process or on many workers.
Large matrices (Ω/Q: D×l, partials: D×l) travel as safetensors files under a work URI; tasks return
only their paths, and a pass's partials are deleted once reduced. Memory per task: O(D·l) plus one
row group. The last pass keeps B on disk so the coordinates need no extra pass over the weights.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.storage.dataset import CorruptShardError, Dataset
from weightzoo.storage.fs import atomic_write, filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.storage.shards import LayoutMismatchError, iter_shard, read_layout
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks.device import resolve_device

SUBSPACE_FILE = "subspace.safetensors"
COORDS_FILE = "coords.parquet"
CARD_FILE = "card.json"
PLOT_FILE = "explained_variance.png"
# Metadata carried into coords.parquet so edits (attributes) and sampling need not reopen the dataset.
META_COLUMNS = ["id", "kind", "prompt", "attributes", "hparams"]
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SubspaceOptions(BaseModel):
    """How to fit the subspace (saved in ``card.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    components: int = Field(64, ge=1, description="Principal components k to keep.")
    # Halko et al.: p = 5..10 suffices for fast-decaying spectra; weight spectra decay slowly, so more.
    oversample: int = Field(10, ge=0, description="Extra sketch columns p (sketch width l = k + p).")
    # Each power iteration sharpens the spectrum by one more factor of σ²; 2 matches exact to <1% here.
    power_iters: int = Field(2, ge=0, description="Power iterations q (one pass over the data each).")
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    # float32 matmuls with float32 accumulators; moments are always float64.
    dtype: Literal["float32", "float64"] = Field("float32", description="Compute dtype of the matmuls.")
    seed: int = Field(0, ge=0, description="Seed of the Gaussian test matrix Ω.")
    keep_work: bool = Field(False, description="Keep the work files (partials, bases) after the fit.")
    # Each task writes one D×l partial per pass (400 MB at weights2weights' D and k = 1,000): group
    # the shards, so thousands of shards do not mean thousands of partials.
    tasks_per_pass: int = Field(8, ge=1, description="Shard groups per pass: parallel tasks, one partial file each.")

    @property
    def width(self) -> int:
        return self.components + self.oversample


@dataclass(frozen=True)
class ShardRef:
    """One committed shard as a task argument: small, serialisable, and enough to read only visible rows."""

    shard: str  # relative to the dataset root
    ids: tuple[str, ...] | None  # visible ids when only some rows of the shard are committed, else None
    nbytes: int
    layout: str  # fingerprint from the ledger; every shard of one fit must share it
    name: str  # a short name for task runs and work files


@dataclass(frozen=True)
class ShardGroup:
    """Consecutive shards read by one task of a pass; its partial covers all of them."""

    name: str
    refs: tuple[ShardRef, ...]


def group_shards(refs: Sequence[ShardRef], groups: int) -> list[ShardGroup]:
    """Split ``refs`` (in order) into at most ``groups`` runs of about equal bytes."""
    total = sum(r.nbytes for r in refs) or 1
    out: list[list[ShardRef]] = [[]]
    done = 0
    for r in refs:
        if out[-1] and done >= total * len(out) / groups:
            out.append([])
        out[-1].append(r)
        done += r.nbytes
    return [ShardGroup(f"{g[0].name}-{g[-1].name}", tuple(g)) for g in out]


def shard_refs(dataset_uri: str) -> list[ShardRef]:
    """The committed shards of a dataset, in commit order (read the ledger once, in the driver)."""
    ds = Dataset(dataset_uri)
    layouts = {e.layout for e in ds.entries}
    if len(layouts) > 1:
        raise LayoutMismatchError(f"dataset {dataset_uri} mixes layouts {sorted(layouts)}; datasets never mix layouts")
    return [
        ShardRef(e.shard, None if len(e.ids) == e.rows else tuple(e.ids), e.nbytes, e.layout, f"{i:05d}")
        for i, e in enumerate(ds.entries)
    ]


# -- storage helpers -------------------------------------------------------------------------------------


def shard_layout(dataset_uri: str, ref: ShardRef) -> Layout:
    """The layout of one shard (its footer; no ledger listing per task), checked against its commit entry."""
    fs, root = filesystem(dataset_uri)
    layout = read_layout(fs, join(root, ref.shard))
    if layout.fingerprint != ref.layout:
        raise LayoutMismatchError(f"shard {ref.shard} has layout {layout.fingerprint}, its ledger entry says {ref.layout}")
    return layout


def _iter_ref(
    dataset_uri: str, ref: ShardRef, layout: Layout | None = None, columns: Sequence[str] | None = None
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Row groups of one shard's visible rows: (metadata, (n, D) weights in storage dtype)."""
    fs, root = filesystem(dataset_uri)
    path = join(root, ref.shard)
    if fs.size(path) != ref.nbytes:
        raise CorruptShardError(f"shard {ref.shard} is not the size its ledger entry says")
    visible = None if ref.ids is None else pa.array(ref.ids)
    for table, w in iter_shard(fs, path, columns or ["id"], layout):
        assert w is not None
        if visible is not None:
            mask = pc.is_in(table.column("id"), value_set=visible)
            table, w = table.filter(mask), w[np.asarray(mask)]
        if table.num_rows:
            yield table, w


class _Standardiser:
    """z = (x − mean) / std for one row group, on the compute device and dtype."""

    def __init__(self, stats_uri: str, options: SubspaceOptions) -> None:
        st = load_tensors(stats_uri)
        self.device = resolve_device(options.device)
        self.dtype = COMPUTE_DTYPES[options.dtype]
        self.mean = st["mean"].to(self.device, self.dtype)
        self.inv_std = (1.0 / st["std"]).to(self.device, self.dtype)

    def __call__(self, layout: Layout, w: np.ndarray) -> torch.Tensor:
        # Always a fresh copy (w may be a read-only memory map), then in place: one (n, D) allocation, not two.
        x = layout.as_tensor(w).to(self.device, self.dtype, copy=True)
        return x.sub_(self.mean).mul_(self.inv_std)


# -- pass 0: moments -------------------------------------------------------------------------------------


def _merge_moments(a: tuple[float, torch.Tensor, torch.Tensor], b: tuple[float, torch.Tensor, torch.Tensor]):
    """Chan et al.'s parallel merge of (count, mean, M2): exact in any order, no catastrophic cancellation."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if na == 0:
        return b
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta.square() * (na * nb / n)


def _iter_group(
    dataset_uri: str, group: ShardGroup, columns: Sequence[str] | None = None
) -> Iterator[tuple[Layout, pa.Table, np.ndarray]]:
    """Row groups of every shard of ``group``, each with its shard's (checked) layout."""
    for ref in group.refs:
        layout = shard_layout(dataset_uri, ref)
        for meta, w in _iter_ref(dataset_uri, ref, layout, columns):
            yield layout, meta, w


def group_moments(dataset_uri: str, group: ShardGroup, work_uri: str, options: SubspaceOptions) -> str:
    """Per-column count, mean and M2 of a group of shards (float64) → a partial file; returns its URI."""
    device = resolve_device(options.device)
    acc: tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros(0), torch.zeros(0))
    for layout, _, w in _iter_group(dataset_uri, group):
        # float32 within a row group (a few hundred rows: ~1e-6 relative error; a float64 copy would be
        # the largest allocation of the fit), float64 across row groups and shards. A constant column
        # stays exact: the float32 mean of equal fp16 values is that value.
        x = layout.as_tensor(w).to(device, torch.float32)
        m = x.mean(0)
        m2 = x.sub_(m).square_().sum(0)
        acc = _merge_moments(acc, (x.shape[0], m.double(), m2.double()))
    n, mean, m2 = acc
    out = join(work_uri, "moments", f"{group.name}.safetensors")
    return save_tensors(out, {"count": torch.tensor([float(n)], dtype=torch.float64), "mean": mean, "m2": m2})


def reduce_moments(partials: Sequence[str], work_uri: str) -> str:
    """Merge the groups' moments into mean and std (ddof=0, as StandardScaler; std 0 → 1); returns stats URI."""
    acc: tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros(0), torch.zeros(0))
    for uri in partials:
        t = load_tensors(uri)
        if t["count"].item() > 0:
            acc = _merge_moments(acc, (t["count"].item(), t["mean"], t["m2"]))
    n, mean, m2 = acc
    if n < 2:
        raise ValueError(f"need at least 2 rows to fit a subspace, found {int(n)}")
    std = (m2 / n).sqrt()
    constant = std <= 1e-12 * mean.abs().clamp_min(1.0)
    std = torch.where(constant, torch.ones_like(std), std)
    return save_tensors(
        join(work_uri, "stats.safetensors"),
        {"count": torch.tensor([n], dtype=torch.float64), "mean": mean, "std": std, "constant": constant},
    )


# -- passes 1..q+1: range finder -------------------------------------------------------------------------


def initial_basis(stats_uri: str, work_uri: str, options: SubspaceOptions) -> str:
    """Ω (D×l Gaussian, seeded; generated on CPU so every device gets the same one) → basis-0."""
    d = load_tensors(stats_uri)["mean"].numel()
    if options.width > d:
        raise ValueError(f"components + oversample = {options.width} exceeds the dimension D = {d}")
    g = torch.Generator().manual_seed(options.seed)
    omega = torch.randn(d, options.width, generator=g, dtype=torch.float32)
    return save_tensors(join(work_uri, "basis-0.safetensors"), {"Q": omega})


def group_power(
    dataset_uri: str, group: ShardGroup, basis_uri: str, stats_uri: str, work_uri: str, options: SubspaceOptions
) -> str:
    """Σ over the group's row groups of Zᵀ(Z Q): a D×l partial of one power-iteration pass."""
    std = _Standardiser(stats_uri, options)
    q = load_tensors(basis_uri)["Q"].to(std.device, std.dtype)
    y = torch.zeros_like(q)
    for layout, _, w in _iter_group(dataset_uri, group):
        z = std(layout, w)
        y.addmm_(z.T, z @ q)
    tag = basis_uri.rsplit("/", 1)[-1].removesuffix(".safetensors")
    return save_tensors(join(work_uri, f"power-{tag}", f"{group.name}.safetensors"), {"Y": y})


def orthonormalise(partials: Sequence[str], work_uri: str, step: int) -> str:
    """Sum the pass's partials and re-orthonormalise (QR): keeps the basis well conditioned between passes."""
    y: torch.Tensor | None = None
    for uri in partials:
        part = load_tensors(uri)["Y"]
        y = part if y is None else y.add_(part)
    assert y is not None, "no shards"
    q, _ = torch.linalg.qr(y)  # Householder QR: orthonormal to working precision, no float64 copy of D×l
    return save_tensors(join(work_uri, f"basis-{step}.safetensors"), {"Q": q})


# -- last pass: Rayleigh–Ritz and coordinates ------------------------------------------------------------


def group_project(
    dataset_uri: str, group: ShardGroup, basis_uri: str, stats_uri: str, work_uri: str, options: SubspaceOptions
) -> str:
    """B = Z Q for the group's rows (saved as a Parquet part with their metadata) and G = BᵀB (the partial)."""
    std = _Standardiser(stats_uri, options)
    q = load_tensors(basis_uri)["Q"].to(std.device, std.dtype)
    gram = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64, device=std.device)
    total = torch.zeros((), dtype=torch.float64, device=std.device)
    fs, path = filesystem(join(work_uri, "project", f"{group.name}.parquet"))
    with atomic_write(fs, path) as f:
        writer = None  # streamed row group by row group: a group's B (n×l) is never all in memory
        for layout, meta, w in _iter_group(dataset_uri, group, META_COLUMNS):
            z = std(layout, w)
            b = z @ q
            norms = z.square().sum(1, dtype=torch.float64)
            gram += b.T.to(torch.float64) @ b.to(torch.float64)
            total += norms.sum()
            table = meta.append_column("B", _fixed_list(b.cpu().float().numpy())).append_column(
                "norm2", pa.array(norms.cpu().numpy()))
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        if writer is None:
            raise ValueError(f"shard group {group.name} has no visible rows")
        writer.close()
    out = join(work_uri, "project", f"{group.name}.safetensors")
    return save_tensors(out, {"G": gram.cpu(), "total": total.cpu().reshape(1)})


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


@dataclass(frozen=True)
class FitResult:
    """What ``finalise`` wrote; small enough to return from a task."""

    uri: str
    rows: int
    components: int
    explained_variance_ratio: list[float]
    singular_values: list[float]


def finalise(
    dataset_uri: str, out_uri: str, partials: Sequence[str], basis_uri: str, stats_uri: str, options: SubspaceOptions,
    layout_json: str,
) -> FitResult:
    """Rayleigh–Ritz on the last basis, then write subspace.safetensors, coords.parquet and card.json.

    Memory: Q (D×l) and the components (k×D), plus one row group's B at a time for the coordinates.
    """
    k = options.components
    gram = torch.zeros(options.width, options.width, dtype=torch.float64)
    total = 0.0
    parts = []
    for uri in partials:
        t = load_tensors(uri)
        gram += t["G"]
        total += float(t["total"])
        parts.append(_part_of(uri))
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)[:k]
    evals, v = evals[order].clamp_min(0), evecs[:, order]
    stats = load_tensors(stats_uri)
    n = float(stats["count"])
    q = load_tensors(basis_uri)["Q"]
    components = (q @ v.to(q.dtype)).T.contiguous()  # k×D, orthonormal rows
    sv = evals.sqrt()
    tensors = {
        "components": components.float(),
        "mean": stats["mean"].float(),
        "std": stats["std"].float(),
        "singular_values": sv.float(),
        "explained_variance": (evals / (n - 1)).float(),
        "explained_variance_ratio": (evals / total).float(),
    }
    layout = Layout.from_json(layout_json)
    save_tensors(join(out_uri, SUBSPACE_FILE), tensors, {"layout": layout.fingerprint})
    _write_coords(join(out_uri, COORDS_FILE), parts, v.float())
    card = {
        "format": 1,
        "dataset": dataset_uri,
        "layout_fingerprint": layout.fingerprint,
        "layout": json.loads(layout_json),
        "components": k,
        "rows": int(n),
        "dimension": int(components.shape[1]),
        "constant_columns": int(stats["constant"].sum()),
        "total_variance": total / (n - 1),
        "options": options.model_dump(mode="json"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fs, path = filesystem(join(out_uri, CARD_FILE))
    write_bytes(fs, path, json.dumps(card, indent=2).encode())
    return FitResult(out_uri, int(n), k, tensors["explained_variance_ratio"].tolist(), sv.tolist())


def _part_of(partial_uri: str) -> str:
    """The Parquet part (B and metadata) written beside a ``group_project`` partial."""
    return partial_uri.removesuffix(".safetensors") + ".parquet"


def _write_coords(uri: str, parts: Sequence[str], v: torch.Tensor) -> None:
    """Stream each group's B through V: coords = B V[:, :k], residual = ‖z − ẑ‖ / ‖z‖ in standardised space."""
    fs, path = filesystem(uri)
    writer = None
    with atomic_write(fs, path) as f:
        for part in parts:
            pfs, ppath = filesystem(part)
            with pfs.open(ppath, "rb") as pf:
                for batch in pq.ParquetFile(pf).iter_batches():  # a part's row groups, one at a time
                    t = pa.Table.from_batches([batch])
                    b = torch.from_numpy(np.array(t.column("B").combine_chunks().flatten()).reshape(t.num_rows, -1))
                    c = b @ v
                    norm2 = torch.from_numpy(t.column("norm2").to_numpy().copy())
                    resid = (1 - c.double().square().sum(1) / norm2.clamp_min(1e-30)).clamp_min(0).sqrt()
                    out = t.select(META_COLUMNS).append_column("coords", _fixed_list(c.numpy())).append_column(
                        "residual", pa.array(resid.float().numpy()))
                    if writer is None:
                        writer = pq.ParquetWriter(f, out.schema)
                    writer.write_table(out)
        if writer is not None:
            writer.close()


def cleanup(work_uri: str) -> None:
    fs, path = filesystem(work_uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def discard(uris: Sequence[str]) -> None:
    """Delete a pass's partials once reduced: at D×l each they would otherwise pile up pass after pass."""
    for uri in uris:
        fs, path = filesystem(uri)
        fs.rm_file(path)


# -- the whole fit, for one process (the flow maps the same functions as tasks) ---------------------------

Mapper = Callable[..., list[Any]]
Runner = Callable[..., Any]


def _serial_map(fn: Callable[..., Any], groups: Sequence[ShardGroup], **kwargs: Any) -> list[Any]:
    return [fn(group=g, **kwargs) for g in groups]


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return fn(**kwargs)


def default_work_uri(out_uri: str) -> str:
    return join(out_uri, "_work", uuid.uuid4().hex[:12])


def fit_subspace(
    dataset_uri: str, out_uri: str, options: SubspaceOptions | None = None, work_uri: str | None = None,
    map_shards: Mapper = _serial_map, run: Runner = _call,
) -> FitResult:
    """Fit the subspace of ``dataset_uri`` into ``out_uri`` (q + 3 passes over the weights).

    ``map_shards(fn, groups, **kwargs)`` runs ``fn(group=g, **kwargs)`` for every shard group and
    returns the results in order; ``run(fn, **kwargs)`` runs one reduce step. Both call directly by default; the
    Prefect flow passes ones that submit tasks, so this is the one implementation of the algorithm.
    """
    options = options or SubspaceOptions()
    work = work_uri or default_work_uri(out_uri)
    refs = shard_refs(dataset_uri)
    if not refs:
        raise ValueError(f"dataset {dataset_uri} has no committed rows")
    groups = group_shards(refs, options.tasks_per_pass)
    common = {"dataset_uri": dataset_uri, "work_uri": work, "options": options}
    stats = run(reduce_moments, partials=map_shards(group_moments, groups, **common), work_uri=work)
    basis = run(initial_basis, stats_uri=stats, work_uri=work, options=options)
    for step in range(1, options.power_iters + 2):
        partials = map_shards(group_power, groups, basis_uri=basis, stats_uri=stats, **common)
        previous, basis = basis, run(orthonormalise, partials=partials, work_uri=work, step=step)
        if not options.keep_work:
            discard([*partials, previous])
    partials = map_shards(group_project, groups, basis_uri=basis, stats_uri=stats, **common)
    layout = shard_layout(dataset_uri, refs[0])
    result = run(finalise, dataset_uri=dataset_uri, out_uri=out_uri, partials=partials, basis_uri=basis,
                 stats_uri=stats, options=options, layout_json=layout.to_json())
    if not options.keep_work:
        cleanup(work)
    return result


def plot_explained_variance(ratio: Sequence[float], out_uri: str) -> bytes:
    """A PNG of per-component and cumulative explained variance, saved beside the subspace; returns its bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # headless workers
    from matplotlib.figure import Figure

    r = np.asarray(ratio)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.bar(np.arange(1, len(r) + 1), r, color="#4c72b0", label="per component")
    ax.set_xlabel("component")
    ax.set_ylabel("explained variance ratio")
    ax2 = ax.twinx()
    ax2.plot(np.arange(1, len(r) + 1), np.cumsum(r), color="#dd8452", label="cumulative")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("cumulative")
    ax.set_title(f"{len(r)} components: {np.sum(r):.1%} of the standardised variance")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fs, path = filesystem(join(out_uri, PLOT_FILE))
    write_bytes(fs, path, buf.getvalue())
    return buf.getvalue()


# -- reading a fitted subspace ---------------------------------------------------------------------------


@dataclass
class Subspace:
    """A fitted subspace: x ≈ mean + std ⊙ (coords @ components). Tensors are float32 on CPU."""

    uri: str
    components: torch.Tensor  # (k, D), orthonormal rows, standardised space
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,), constant columns hold 1
    singular_values: torch.Tensor  # (k,)
    explained_variance: torch.Tensor  # (k,), σ² / (N − 1)
    explained_variance_ratio: torch.Tensor  # (k,), of the total standardised variance
    card: dict[str, Any]

    @property
    def layout(self) -> Layout:
        return Layout.from_json(json.dumps(self.card["layout"]))

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    def to_coords(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Rows (n, D) or one row (D,) of weights → coordinates (n, k) or (k,)."""
        x = self.layout.as_tensor(weights).float() if isinstance(weights, np.ndarray) else weights.float()
        return ((x - self.mean) / self.std) @ self.components.T

    def to_weights(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates (…, k) → float32 weights (…, D); differentiable in ``coords``."""
        return self.mean + self.std * (coords @ self.components)

    def coords_table(self) -> pa.Table:
        fs, path = filesystem(join(self.uri, COORDS_FILE))
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    def dataset_coords(self) -> tuple[pa.Table, torch.Tensor]:
        """The fitted rows' metadata and their (N, k) coordinates."""
        t = self.coords_table()
        c = np.asarray(t.column("coords").combine_chunks().flatten(), dtype=np.float32).reshape(t.num_rows, -1)
        return t.drop_columns(["coords"]), torch.from_numpy(c.copy())


def load_subspace(uri: str) -> Subspace:
    """Read ``subspace.safetensors`` and ``card.json`` from a subspace URI (local or any fsspec URI)."""
    uri = str(uri).rstrip("/")
    fs, path = filesystem(join(uri, CARD_FILE))
    if not fs.exists(path):
        raise FileNotFoundError(f"no subspace at {uri} (missing {CARD_FILE})")
    card = json.loads(fs.cat_file(path))
    t = load_tensors(join(uri, SUBSPACE_FILE))
    return Subspace(
        uri, t["components"], t["mean"], t["std"], t["singular_values"], t["explained_variance"],
        t["explained_variance_ratio"], card,
    )
