"""The edit workload's task loss for the weight generator (``Engine.task_loss`` of ``edit-lora``).

Predicted rows are applied as LoRAs to the frozen edit base, each to its own concept's training pairs,
and scored with the L1 loss the rows were fine-tuned on (``engine.EditPack.losses``). The adapters go in
through the packed forward (``lora.packed``: one grouped conv per layer for the whole batch), with each
row's A and B sliced from the row itself (``torch.func.functional_call``), so the gradient reaches the
predicted rows and, through them, the generator; the base never changes.

A concept's pairs are rendered from its spec on the shared source pool, exactly as its row was trained
(``pairs.concept_pairs`` with the dataset's hparams), built once and cached per id. A row's stored
attributes do not name its image files, so a row whose spec cannot be rendered (pairs given as files
with only a family) adds no task loss; it still trains on the weight loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch.func import functional_call

from weightzoo.errors import InputError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.layout import LORA_A, LORA_B, Layout
from weightzoo.tasks.concepts.base import SkipUNetGenerator, load_base
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.lora import adapted_convs, packed
from weightzoo.tasks.concepts.pairs import concept_pairs
from weightzoo.tasks.concepts.spec import spec_problems
from weightzoo.tasks.finetune.row import ManifestRow


def row_factors(layout: Layout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n, D) rows as the packed adapters' stacked factors, ``<conv>.A`` (n, r, in, kh, kw) and ``<conv>.B``
    (n, out, r): views of ``rows``, so a loss on them is differentiable in the rows. A layout's fixed A
    (``edit-lora-fa``) is not in the row: it is rebuilt and shared by all n (no gradient, as in training)."""
    offs, out = layout.offsets, {}
    for i, (key, shape) in enumerate(zip(layout.keys, layout.shapes, strict=True)):
        part = rows[:, offs[i] : offs[i + 1]].reshape(len(rows), *shape)
        if key.endswith(LORA_A):
            out[key[: -len(LORA_A)] + ".A"] = part
        elif key.endswith(LORA_B):
            out[key[: -len(LORA_B)] + ".B"] = part[..., 0, 0]
    for key, a in layout.fixed_tensors(rows.device).items():
        if key.endswith(LORA_A):
            out[key[: -len(LORA_A)] + ".A"] = a.to(rows.dtype).expand(len(rows), *a.shape)
    return out


class EditTaskLoss:
    """Mean L1 edit loss of rows as adapters on the frozen base, each on its own concept's training pairs."""

    def __init__(self, model: SkipUNetGenerator, layout: Layout, config: EditFinetuneConfig,
                 attributes: dict[str, dict[str, str]], pairs_per_step: int) -> None:
        self.model, self.layout, self.config, self.attributes = model, layout, config, attributes
        self.pairs_per_step = pairs_per_step
        self.names = adapted_convs(layout)  # from B: a fixed A is not among the stored keys
        self.device = next(model.parameters()).device
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def pairs(self, rid: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The concept's training pairs on the device (built once), or None when its spec cannot be rendered."""
        if rid not in self._pairs:
            attrs = self.attributes.get(rid, {})
            c = self.config
            found = None
            if not spec_problems(attrs):
                row = ManifestRow(id=rid, kind="edit", attributes=attrs)
                p = concept_pairs(row, None, train=c.train_pairs, held_out=c.eval_pairs, size=c.resolution or
                                  self.model.config.image_size, data_seed=c.data_seed)
                found = p.train_src.to(self.device), p.train_tgt.to(self.device)
            self._pairs[rid] = found
        return self._pairs[rid]

    def __call__(self, ids: Sequence[str], rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        keep = [k for k, rid in enumerate(ids) if self.pairs(rid) is not None]
        if not keep:
            return rows.sum() * 0.0  # nothing renderable in this batch: no task loss, the graph intact
        pairs = [self.pairs(ids[k]) for k in keep]
        raw = torch.randint(0, 2**31 - 1, (self.pairs_per_step,), generator=generator)
        src = torch.cat([s[raw % len(s)] for s, _ in pairs])  # type: ignore[misc]
        tgt = torch.cat([t[raw % len(t)] for _, t in pairs])  # type: ignore[misc]
        factors = row_factors(self.layout, rows[keep].float())
        c = self.config
        with packed(self.model, self.names, len(keep), c.rank, c.alpha / c.rank):
            out = functional_call(self.model, factors, (src,))
        return (out.float() - tgt).abs().view(len(keep), -1).mean(1).mean()


def edit_task_loss(base_uri: str, dataset: Dataset, device: torch.device | str, pairs_per_step: int = 2) -> EditTaskLoss:
    """The task loss of ``dataset``'s edit rows on the base at ``base_uri`` (frozen), with the rows' own hparams."""
    meta = dataset.metadata(["id", "attributes", "hparams"])
    if not meta.num_rows:
        raise InputError(f"dataset {dataset.uri} has no committed rows")
    hparams = json.loads(meta.column("hparams")[0].as_py() or "{}")
    known = {k: v for k, v in hparams.items() if k in EditFinetuneConfig.model_fields or k in EditFinetuneConfig.RENAMED}
    attributes = {rid: dict(a or []) for rid, a in zip(meta.column("id").to_pylist(),
                                                        meta.column("attributes").to_pylist(), strict=True)}
    model = load_base(base_uri, device).requires_grad_(False)
    return EditTaskLoss(model, dataset.layout, EditFinetuneConfig(**known), attributes, pairs_per_step)
