"""Streaming randomized PCA of a weights dataset: the weights2weights subspace, never the N×D matrix.

What is fitted: each parameter (column) is standardised, ``z = (x − mean) / std`` (as weights2weights
does; a constant column gets std 1 so it contributes nothing), then the top-k right singular vectors
of the standardised matrix Z (N×D) are found by randomized block Krylov iteration (Musco and Musco
2015; Tropp and Webber 2023) with A = ZᵀZ applied on the D-side, so no state ever grows with N:

    pass 0     moments: count, mean, M2 per column (float64, Chan's parallel merge)
    pass j     AQⱼ = Zᵀ(Z Qⱼ), j = 0..q      Q₀ = qr(Ω), Ω: D×b Gaussian
               Qⱼ₊₁ = qr(AQⱼ − K Kᵀ AQⱼ), twice (block Gram–Schmidt against K = [Q₀ … Qⱼ])
               Bⱼ = Z Qⱼ (n×b per row) is written beside the partial
    finalise   Rayleigh–Ritz on the Krylov basis K = [Q₀ … Q_q] (D × (q+1)·b):
               G = Kᵀ A K = Kᵀ [AQ₀ … AQ_q] — every product is already known, so no further pass
               eigh(G) = V Λ Vᵀ → components (K V)ᵀ[:k], singular values √Λ,
               coordinates [B₀ … B_q] V[:, :k] (read back from the work files)

Why Krylov and not plain power iterations: a pass costs 4·N·D·b flops either way, but Rayleigh–Ritz
over the whole Krylov space uses every block, not only the last one. At 10k × 100k and k = 256 on a
slowly decaying spectrum, q = 3 power iterations (l = 276) captured 0.9954 of the exact top-k
variance in 4 passes of 276 columns plus a projection pass; block Krylov with b = 128 captures 0.9966
in 5 passes of 128 columns and no projection pass, 0.9991 in 6 (q = 5, the default; docs/BENCHMARKS.md).

Every pass is a sum of partials over groups of shards (at most ``tasks_per_pass`` groups, so the
partial files do not grow with the number of shards), and each ``group_*`` function below is one
Prefect task mapped over the groups (``flows/fit_subspace.py``), in one process or on many workers.
Large matrices (Qⱼ, AQⱼ: D×b) travel as safetensors files under a work URI; tasks return only their
paths, and a pass's partials are deleted once reduced. Memory per task: O(D·b) plus one row group;
the reduce steps hold K and AK, O(D·(q+1)·b).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from weightzoo.errors import InputError, NotFoundError, short
from weightzoo.storage.dataset import CorruptShardError, verified_shard_batches
from weightzoo.storage.fs import (
    atomic_write,
    filesystem,
    join,
    relative_ref,
    resolve_ref,
    uri_exists,
    write_bytes,
)
from weightzoo.storage.layout import Layout
from weightzoo.storage.listing import committed_files, one_layout
from weightzoo.storage.shards import LayoutMismatchError, open_parquet, read_layout
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks.device import resolve_device
from weightzoo.tasks.progress import report
from weightzoo.tasks.stats import constant_columns, safe_std
from weightzoo.tasks.subspace.config import SubspaceConfig

SUBSPACE_FILE = "subspace.safetensors"
COORDS_FILE = "coords.parquet"
CARD_FILE = "card.json"
PLOT_FILE = "explained_variance.png"
# Metadata carried into coords.parquet so edits (attributes) and sampling need not reopen the dataset.
META_COLUMNS = ["id", "kind", "prompt", "attributes", "hparams"]
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ShardRef:
    """One committed shard as a task argument: small, serialisable, and enough to read only visible rows."""

    shard: str  # relative to the dataset root
    ids: tuple[str, ...] | None  # visible ids when only some rows of the shard are committed, else None
    nbytes: int
    layout: str  # fingerprint from the ledger; every shard of one fit must share it
    name: str  # a short name for task runs and work files
    crc32: int | None = None  # the ledger's checksum of the weights; None: size check only


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
    files = committed_files(dataset_uri)
    one_layout(files, dataset_uri)
    return [
        ShardRef(f.shard, f.ids if f.partial else None, f.nbytes, f.layout, f"{i:05d}", f.crc32)
        for i, f in enumerate(files)
    ]


# -- storage helpers -------------------------------------------------------------------------------------


def shard_layout(dataset_uri: str, ref: ShardRef) -> Layout:
    """The layout of one shard (its footer; no ledger listing per task), checked against its commit entry."""
    fs, root = filesystem(dataset_uri)
    try:
        layout = read_layout(fs, join(root, ref.shard))
    except FileNotFoundError as e:  # a committed shard that is gone: the ledger's word against the storage's
        raise CorruptShardError(f"shard {ref.shard} is missing: run weightzoo verify --repair") from e
    except (OSError, pa.ArrowException) as e:  # truncated or overwritten: its footer no longer parses
        raise CorruptShardError(f"shard {ref.shard} cannot be read ({e}): run weightzoo verify --repair") from e
    except (ValueError, KeyError, TypeError) as e:  # a footer that parses, with a layout that does not
        why = short(f"{type(e).__name__}: {e}", 160)
        raise CorruptShardError(f"shard {ref.shard} has an unreadable layout in its footer ({why}): "
                                "run weightzoo verify --repair") from e
    if layout.fingerprint != ref.layout:
        raise LayoutMismatchError(f"shard {ref.shard} has layout {layout.fingerprint}, its ledger entry says {ref.layout}")
    return layout


def _iter_ref(
    dataset_uri: str, ref: ShardRef, layout: Layout | None = None, columns: Sequence[str] | None = None
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Row groups of one shard's visible rows: (metadata, (n, D) weights in storage dtype), size and CRC checked."""
    fs, root = filesystem(dataset_uri)
    yield from verified_shard_batches(
        fs, join(root, ref.shard), ref.shard, nbytes=ref.nbytes, crc32=ref.crc32, fingerprint=ref.layout,
        visible=ref.ids, columns=columns or ["id"], layout=layout,
    )


def _save_work(uri: str, tensors: dict[str, torch.Tensor]) -> str:
    """Work files are scratch (a crash restarts the fit): atomic, but not fsynced."""
    return save_tensors(uri, tensors, durable=False)


class _RowBuffer:
    """One (rows, D) compute buffer reused for every row group of a task.

    A fresh 50 MB tensor per row group costs more in page faults than converting fp16 into it
    (21 ms vs 3 ms for 128 × 100,000 on this CPU); reusing one makes the conversion a plain copy.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.buf = torch.empty(0, device=device, dtype=dtype)

    def load(self, layout: Layout, w: np.ndarray) -> torch.Tensor:
        """Row group ``w`` as a writable (n, D) tensor of the compute dtype (w may be a read-only map)."""
        n, d = w.shape
        if self.buf.shape[0] < n or self.buf.shape[-1] != d:
            self.buf = torch.empty(n, d, device=self.device, dtype=self.dtype)
        return self.buf[:n].copy_(layout.as_tensor(w))


class _Standardiser:
    """z = (x − mean) / std for one row group, on the compute device and dtype (valid until the next call)."""

    def __init__(self, stats_uri: str, options: SubspaceConfig) -> None:
        st = load_tensors(stats_uri)
        self.device = resolve_device(options.device)
        self.dtype = COMPUTE_DTYPES[options.dtype]
        self.mean = st["mean"].to(self.device, self.dtype)
        self.inv_std = (1.0 / st["std"]).to(self.device, self.dtype)
        self.rows = _RowBuffer(self.device, self.dtype)

    def __call__(self, layout: Layout, w: np.ndarray) -> torch.Tensor:
        return self.rows.load(layout, w).sub_(self.mean).mul_(self.inv_std)


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


def group_moments(dataset_uri: str, group: ShardGroup, work_uri: str, options: SubspaceConfig) -> str:
    """Per-column count, mean and M2 of a group of shards (float64) → a partial file; returns its URI."""
    rows = _RowBuffer(resolve_device(options.device), torch.float32)
    acc: tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros(0), torch.zeros(0))
    for layout, _, w in _iter_group(dataset_uri, group):
        # float32 within a row group (a few hundred rows: ~1e-6 relative error; a float64 copy would be
        # the largest allocation of the fit), float64 across row groups and shards. A constant column
        # stays exact: the float32 mean of equal fp16 values is that value.
        x = rows.load(layout, w)
        m = x.mean(0)
        m2 = x.sub_(m).square_().sum(0)
        acc = _merge_moments(acc, (x.shape[0], m.double(), m2.double()))
    n, mean, m2 = acc
    out = join(work_uri, "moments", f"{group.name}.safetensors")
    return _save_work(out, {"count": torch.tensor([float(n)], dtype=torch.float64), "mean": mean, "m2": m2})


def reduce_moments(partials: Sequence[str], work_uri: str) -> str:
    """Merge the groups' moments into mean and std (ddof=0, as StandardScaler; std 0 → 1); returns stats URI."""
    acc: tuple[float, torch.Tensor, torch.Tensor] = (0, torch.zeros(0), torch.zeros(0))
    for uri in partials:
        t = load_tensors(uri)
        if t["count"].item() > 0:
            acc = _merge_moments(acc, (t["count"].item(), t["mean"], t["m2"]))
    n, mean, m2 = acc
    if n < 2:
        raise InputError(f"need at least 2 rows to fit a subspace, found {int(n)}")
    std = (m2 / n).sqrt()
    constant = constant_columns(mean, std)
    std = safe_std(mean, std)
    return _save_work(
        join(work_uri, "stats.safetensors"),
        {"count": torch.tensor([n], dtype=torch.float64), "mean": mean, "std": std, "constant": constant},
    )


# -- passes 1..q+1: block Krylov ------------------------------------------------------------------------


def initial_basis(stats_uri: str, work_uri: str, options: SubspaceConfig) -> str:
    """Q₀ = qr(Ω), Ω a D×b Gaussian (seeded; generated on CPU so every device gets the same one) → basis-0."""
    d = load_tensors(stats_uri)["mean"].numel()
    if options.width > d:
        raise InputError(f"the Krylov width (power_iters + 1) · block_size = {options.width} exceeds the "
                         f"dimension D = {d}")
    g = torch.Generator().manual_seed(options.seed)
    omega = torch.randn(d, options.block, generator=g, dtype=torch.float32)
    return _save_work(join(work_uri, "basis-0.safetensors"), {"Q": torch.linalg.qr(omega)[0]})


def group_power(
    dataset_uri: str, group: ShardGroup, basis_uri: str, stats_uri: str, work_uri: str, options: SubspaceConfig,
    step: int,
) -> str:
    """Σ over the group's row groups of Zᵀ(Z Qⱼ) → a D×b partial; Bⱼ = Z Qⱼ goes to a Parquet part beside it.

    The part of pass 0 also carries each row's metadata and ‖z‖², so the coordinates and their
    residuals need no pass of their own. Parts are written row group by row group, in read order, so
    the parts of all passes line up row for row.
    """
    std = _Standardiser(stats_uri, options)
    q = load_tensors(basis_uri)["Q"].to(std.device, std.dtype)
    y = torch.zeros_like(q)
    first = step == 0
    out = join(work_uri, f"power-{step}", f"{group.name}.safetensors")
    fs, path = filesystem(_part_of(out))
    with atomic_write(fs, path, durable=False) as f:
        writer = None
        for layout, meta, w in _iter_group(dataset_uri, group, META_COLUMNS if first else ["id"]):
            z = std(layout, w)
            b = z @ q
            y.addmm_(z.T, b)
            table = meta.append_column("B", _fixed_list(b.cpu().float().numpy()))
            if first:
                # float32 (a float64 norm converts every element first, far slower); no (n, D) temporary
                norm2 = torch.linalg.vector_norm(z, dim=1).double().square_()
                table = table.append_column("norm2", pa.array(norm2.cpu().numpy()))
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
        if writer is None:
            raise InputError(f"shard group {group.name} has no visible rows")
        writer.close()
    return _save_work(out, {"Y": y.cpu()})


def _sum_partials(partials: Sequence[str]) -> torch.Tensor:
    y: torch.Tensor | None = None
    for uri in partials:
        part = load_tensors(uri)["Y"]
        y = part if y is None else y.add_(part)
    assert y is not None, "no shards"
    return y


def _load_blocks(uris: Sequence[str], key: str) -> torch.Tensor:
    return torch.cat([load_tensors(u)[key] for u in uris], 1)


def reduce_power(partials: Sequence[str], bases: Sequence[str], work_uri: str, step: int, extend: bool) -> tuple[str, str]:
    """Sum pass ``step``'s partials into AQⱼ; if ``extend``, the next block Qⱼ₊₁ ⟂ every earlier one.

    Returns (URI of AQⱼ, URI of Qⱼ₊₁ or ""). Block classical Gram–Schmidt runs twice, each followed
    by a QR: the second pass restores orthogonality the first lost to rounding, and keeps K
    orthonormal even where the Krylov space runs out of new directions (a new block is then random).
    """
    y = _sum_partials(partials)
    aq = _save_work(join(work_uri, f"aq-{step}.safetensors"), {"AQ": y})
    if not extend:
        return aq, ""
    basis = _load_blocks(bases, "Q").to(y.dtype)  # Q₀ is drawn in float32 whatever the compute dtype
    for _ in range(2):
        y = torch.linalg.qr(y - basis @ (basis.T @ y))[0]  # Householder QR: orthonormal to working precision
    return aq, _save_work(join(work_uri, f"basis-{step + 1}.safetensors"), {"Q": y})


# -- Rayleigh–Ritz and coordinates -----------------------------------------------------------------------


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def _unfixed(table: pa.Table, column: str) -> torch.Tensor:
    """The inverse of ``_fixed_list``: a fixed-size-list column as a writable (rows, width) float32 tensor."""
    flat = np.array(table.column(column).combine_chunks().flatten(), dtype=np.float32)
    return torch.from_numpy(flat.reshape(table.num_rows, -1))


@dataclass(frozen=True)
class FitResult:
    """What ``finalise`` wrote; small enough to return from a task."""

    uri: str
    rows: int
    components: int
    explained_variance_ratio: list[float]
    singular_values: list[float]


def finalise(
    dataset_uri: str, out_uri: str, bases: Sequence[str], products: Sequence[str], parts: Sequence[Sequence[str]],
    stats_uri: str, options: SubspaceConfig, layout_json: str,
) -> FitResult:
    """Rayleigh–Ritz on the Krylov basis, then write subspace.safetensors, coords.parquet and card.json.

    ``bases[j]`` holds Qⱼ, ``products[j]`` AQⱼ and ``parts[j][g]`` group g's Bⱼ. Memory: K and AK
    (D × (q+1)·b each) and the components (k×D), plus one row group's B at a time for the coordinates.
    """
    k = options.components
    basis = _load_blocks(bases, "Q")
    gram = (basis.T @ _load_blocks(products, "AQ")).double()  # Kᵀ A K: every product already known
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    order = torch.argsort(evals, descending=True)[:k]
    evals, v = evals[order].clamp_min(0), evecs[:, order]
    stats = load_tensors(stats_uri)
    n = float(stats["count"])
    components = (basis @ v.to(basis.dtype)).T.contiguous()  # k×D, orthonormal rows
    del basis
    # Every non-constant standardised column has variance 1 (ddof 0): ‖Z‖² = N · (D − constant columns).
    total = n * float((~stats["constant"]).sum())
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
    _write_probes(out_uri)
    card = {
        "format": 1,
        "dataset": dataset_uri,
        "dataset_relative": relative_ref(dataset_uri, out_uri),  # a dataset moved with its subspace is found
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


def _write_probes(out_uri: str) -> None:
    """The attribute directions, cross-validated on the fitted rows (tasks/subspace/probes.py), stored
    beside the coordinates before the card commits the subspace."""
    from weightzoo.tasks.subspace.probes import fit_probes, save_probes

    fs, path = filesystem(join(out_uri, COORDS_FILE))
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    attributes = [dict(a or []) for a in table.column("attributes").to_pylist()] if "attributes" in table.column_names else []
    save_probes(out_uri, fit_probes(_unfixed(table, "coords"), attributes) if attributes else {})


def _part_of(partial_uri: str) -> str:
    """The Parquet part (Bⱼ, and in pass 0 the metadata) written beside a ``group_power`` partial."""
    return partial_uri.removesuffix(".safetensors") + ".parquet"


def _write_coords(uri: str, parts: Sequence[Sequence[str]], v: torch.Tensor) -> None:
    """coords = [B₀ … B_q] V[:, :k], residual = ‖z − ẑ‖ / ‖z‖ in standardised space; streamed row group
    by row group through every pass's part of a shard group at once (the parts line up row for row)."""
    fs, path = filesystem(uri)
    writer = None
    with atomic_write(fs, path) as f:
        for group_parts in zip(*parts, strict=True):
            with ExitStack() as stack:
                files = [stack.enter_context(open_parquet(*filesystem(p))) for p in group_parts]
                for i in range(files[0].num_row_groups):
                    tables = [pf.read_row_group(i) for pf in files]
                    t = tables[0]
                    if any(not x.column("id").equals(t.column("id")) for x in tables[1:]):
                        raise CorruptShardError(f"work parts {list(group_parts)} do not line up at row group {i}")
                    b = torch.cat([_unfixed(x, "B") for x in tables], 1)
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
    """Delete a pass's partials once reduced: at D×b each they would otherwise pile up pass after pass."""
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
    dataset_uri: str, out_uri: str, options: SubspaceConfig | None = None, work_uri: str | None = None,
    map_shards: Mapper = _serial_map, run: Runner = _call, progress: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Fit the subspace of ``dataset_uri`` into ``out_uri`` (q + 2 passes over the weights).

    ``map_shards(fn, groups, **kwargs)`` runs ``fn(group=g, **kwargs)`` for every shard group and
    returns the results in order; ``run(fn, **kwargs)`` runs one reduce step. Both call directly by default; the
    Prefect flow passes ones that submit tasks, so this is the one implementation of the algorithm.
    ``progress(passes done, q + 2)`` follows the passes; by default the command's terminal bar, if any.
    """
    options = options or SubspaceConfig()
    work = work_uri or default_work_uri(out_uri)
    refs = shard_refs(dataset_uri)
    if not refs:
        raise NotFoundError(f"dataset {dataset_uri} has no committed rows")
    groups = group_shards(refs, options.tasks_per_pass)
    common = {"dataset_uri": dataset_uri, "work_uri": work, "options": options}
    tick = progress or report
    passes = options.power_iters + 2
    tick(0, passes)
    stats = run(reduce_moments, partials=map_shards(group_moments, groups, **common), work_uri=work)
    tick(1, passes)
    bases = [run(initial_basis, stats_uri=stats, work_uri=work, options=options)]
    products: list[str] = []
    parts: list[list[str]] = []
    for step in range(options.power_iters + 1):
        partials = map_shards(group_power, groups, basis_uri=bases[-1], stats_uri=stats, step=step, **common)
        extend = step < options.power_iters
        aq, nxt = run(reduce_power, partials=partials, bases=bases, work_uri=work, step=step, extend=extend)
        products.append(aq)
        parts.append([_part_of(p) for p in partials])
        if extend:
            bases.append(nxt)
        if not options.keep_work:
            discard(partials)
        tick(step + 2, passes)
    layout = shard_layout(dataset_uri, refs[0])
    result = run(finalise, dataset_uri=dataset_uri, out_uri=out_uri, bases=bases, products=products, parts=parts,
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

    @property
    def dataset(self) -> str:
        """The URI of the dataset it was fitted on (see ``card_dataset``)."""
        return card_dataset(self.uri, self.card)

    def coords_table(self) -> pa.Table:
        fs, path = filesystem(join(self.uri, COORDS_FILE))
        with fs.open(path, "rb") as f:
            return pq.read_table(f)

    def dataset_coords(self) -> tuple[pa.Table, torch.Tensor]:
        """The fitted rows' metadata and their (N, k) coordinates."""
        t = self.coords_table()
        return t.drop_columns(["coords"]), _unfixed(t, "coords")


def card_dataset(card_dir: str, card: dict[str, Any], card_file: str = CARD_FILE) -> str:
    """The dataset a card (a subspace's, a weight-diffusion model's) names: ``dataset_relative`` resolved
    against the card's folder first (the two moved together), else ``dataset`` as recorded at the time;
    ``NotFoundError`` if neither exists."""
    relative = card.get("dataset_relative")
    candidates = ([resolve_ref(relative, card_dir)] if relative else []) + [card["dataset"]]
    for uri in candidates:
        if uri_exists(uri):
            return uri
    also = f" nor at {card['dataset']}" if relative and candidates[0] != card["dataset"] else ""
    raise NotFoundError(f"dataset not found at {candidates[0]}{also} (recorded in {join(card_dir, card_file)})")


def load_subspace(uri: str) -> Subspace:
    """Read ``subspace.safetensors`` and ``card.json`` from a subspace URI (local or any fsspec URI)."""
    uri = str(uri).rstrip("/")
    fs, path = filesystem(join(uri, CARD_FILE))
    if not fs.exists(path):
        raise NotFoundError(f"no subspace at {uri} (missing {CARD_FILE})")
    card = json.loads(fs.cat_file(path))
    t = load_tensors(join(uri, SUBSPACE_FILE))
    return Subspace(
        uri, t["components"], t["mean"], t["std"], t["singular_values"], t["explained_variance"],
        t["explained_variance_ratio"], card,
    )
