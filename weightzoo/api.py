"""The Python API for notebooks and scripts: build a dataset, read its rows as tensors or as a LoRA.

``weightzoo.build(...)`` runs the same flow, and so the same checks, as ``weightzoo build`` (paths made
absolute, inputs checked before anything is made, the resolved config recorded under ``<dataset>/_builds/``).
``weights(dataset)`` gives rows as one ``(n, D)`` tensor; ``lora_state_dict(dataset, id)`` gives one row
as the state dict ``pipe.load_lora_weights`` (diffusers) or ``set_peft_model_state_dict`` (peft) takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from pydantic import BaseModel


def build(manifest: str, base: str, dataset: str, *, finetune: dict[str, Any] | BaseModel | None = None,
          **settings: Any) -> dict[str, Any]:
    """Fine-tune every manifest row not yet committed in ``dataset``; returns the build's summary.

    ``finetune`` holds the engine's fine-tune settings (a dict, or the engine's config model);
    ``settings`` any other ``BuildConfig`` field (``batch_size``, ``engine``, ``executor``, ...).
    A wrong path, base or engine raises a ``weightzoo.errors`` error before anything is created (checked
    here, before a Prefect API starts, and again by the flow, as for every build); an incomplete build
    raises the flow's ``BuildIncomplete``, whose ``summary`` has the counts.
    """
    from weightzoo.flows.build_checks import check_inputs
    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.flows.config import BuildConfig

    manifest, base, dataset = _absolute(manifest), _absolute(base), _absolute(dataset)
    engine = check_inputs(manifest, base, dataset, settings.pop("engine", None))
    request = BuildConfig(manifest=manifest, base=base, dataset=dataset, engine=engine, finetune=finetune, **settings)
    return build_dataset(request)


def _absolute(path: str) -> str:
    """A local path made absolute (a flow run may start in another folder); a URI as it is."""
    import os

    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def weights(dataset: str, ids: Sequence[str] | None = None, dtype: torch.dtype | None = None) -> tuple[pa.Table, torch.Tensor]:
    """The committed rows' metadata and their ``(n, D)`` weights (all rows, or ``ids`` in that order),
    as float32 unless ``dtype`` is given (the stored dtype: ``weights(D, dtype=ds_dtype)``).

    Every shard read is CRC-checked; an id that is not committed raises ``NotFoundError``.
    """
    import pyarrow as pa
    import torch

    from weightzoo.errors import NotFoundError
    from weightzoo.storage.dataset import Dataset

    ds, tables, rows = Dataset(dataset), [], []
    for table, w in ds.iter_batches():
        tables.append(table)
        rows.append(ds.layout.as_tensor(w).to(dtype or torch.float32))  # bf16 rows are stored as int16 bits
    meta = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})
    matrix = torch.cat(rows) if rows else torch.zeros((0, 0), dtype=dtype or torch.float32)
    if ids is None:
        return meta, matrix
    where = {i: k for k, i in enumerate(meta.column("id").to_pylist())}
    missing = [i for i in ids if i not in where]
    if missing:
        raise NotFoundError(f"ids not committed in {dataset}: {missing}")
    take = [where[i] for i in ids]
    return meta.take(take), matrix[take]


def lora_state_dict(dataset: str, item_id: str, format: Literal["diffusers", "peft"] = "diffusers") -> dict[str, torch.Tensor]:
    """One row as a LoRA state dict: ``diffusers`` (``unet.``-prefixed, alpha/rank baked in, for
    ``pipe.load_lora_weights(sd)``) or ``peft`` (unscaled, for ``set_peft_model_state_dict``)."""
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune import export

    ds = Dataset(dataset)
    meta, vector = ds.row(item_id)
    if format == "peft":
        return export.peft_state_dict(vector, ds.layout)
    return export.lora_state_dict(vector, ds.layout, meta["hparams"])
