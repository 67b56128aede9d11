"""Celeb Basis as a recipe: a row is ``words × basis_size`` coefficients (1,024 by default) of new words.

The UNet and text encoder stay frozen. In the instance prompt the ``placeholder`` word (``sks`` in
"sks person") is replaced by ``words`` learned word embeddings ``mean_w + Σ_j c_wj · d_wj`` over the
names basis (``names_basis.py``); the prompt is re-encoded by the frozen text encoder every step with
those embeddings at the placeholder's token positions, so the gradient reaches only the coefficients.
Class prompts (prior preservation) keep their cached embeddings.

Packing: each row's prompt is its own sequence in one text-encoder batch (CLIP is per-sequence), and
the coefficients are stacked (K, words, basis_size) under the engine's per-row clipping and element-wise
AdamW, so a row trains to the same coefficients packed or alone.

Export: a diffusers textual-inversion file ``{"<placeholder>": (words, D)}`` (safetensors), loaded by
``pipe.load_textual_inversion(file, token="<sks>")``; a prompt then says "a photo of <sks> person"
(diffusers expands the token to its ``words`` vectors).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import safetensors.torch
import torch
from torch import nn

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.tasks.identity.recipes.base import Recipe
from weightzoo.tasks.identity.recipes.names_basis import Basis, fitted_basis, load_basis
from weightzoo.tasks.identity.recipes.options import CelebBasisConfig

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from weightzoo.tasks.finetune.row import ManifestRow
    from weightzoo.tasks.identity.config import FinetuneConfig

KEY = "celeb_basis.coefficients"
EMBEDDING_NAME = "learned_embeds.safetensors"  # the name diffusers' textual-inversion scripts write


@dataclass
class Prepared:
    basis: Basis
    options: CelebBasisConfig
    ids: dict[str, torch.Tensor]  # row id -> (L,) token ids of its instance prompt, slots included
    slots: dict[str, torch.Tensor]  # row id -> (words,) positions of the learned words


def tokenise(tokenizer, prompt: str, placeholder: str, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt`` with ``placeholder`` replaced by ``words`` slots, as a tokenizer holding the
    exported token would produce them; and the slots' positions."""
    match = re.search(rf"\b{re.escape(placeholder)}\b", prompt)
    if match is None:
        raise InputError(f"celeb_basis: the instance prompt {prompt!r} has no placeholder word {placeholder!r}")
    encode = lambda text: tokenizer(text.strip(), add_special_tokens=False).input_ids  # noqa: E731
    before, after = encode(prompt[: match.start()]), encode(prompt[match.end() :])
    pad, length = tokenizer.pad_token_id, tokenizer.model_max_length
    ids = [tokenizer.bos_token_id, *before, *([pad] * words), *after, tokenizer.eos_token_id]
    if len(ids) > length:
        raise InputError(f"celeb_basis: the instance prompt {prompt!r} is longer than {length} tokens")
    slots = torch.arange(len(before) + 1, len(before) + 1 + words)
    return torch.tensor(ids + [pad] * (length - len(ids))), slots


def encode_with_words(encoder: nn.Module, ids: torch.Tensor, slots: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(m, L, D) text states of ``ids`` with ``vectors`` (m, words, D) as the input embeddings at ``slots``."""

    def inject(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[torch.arange(out.shape[0], device=out.device)[:, None], slots] = vectors.to(out.dtype)
        return out

    handle = encoder.get_input_embeddings().register_forward_hook(inject)
    try:
        return encoder(ids)[0].float()
    finally:
        handle.remove()


def splice_instance_states(ehs: torch.Tensor, states: torch.Tensor, instances: int) -> torch.Tensor:
    """``ehs`` (m·S, L, D), row-major, with each of the m rows' first ``instances`` samples conditioned on
    that row's ``states`` (m, L, D) instead; its class samples keep their states."""
    m = states.shape[0]
    grouped = ehs.view(m, ehs.shape[0] // m, *ehs.shape[1:])
    inst = states.to(ehs.dtype)[:, None].expand(m, instances, *states.shape[1:])
    return torch.cat([inst, grouped[:, instances:]], 1).flatten(0, 1)


class CelebAdapters:
    """K rows' coefficients (K, words, basis_size), and the frozen text encoder that turns them into states."""

    def __init__(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                 prepared: Prepared) -> None:
        self.encoder = pipe.text_encoder
        device = self.encoder.device
        o = prepared.options
        self.coefficients = nn.Parameter(torch.zeros(len(rows), o.words, o.basis_size, device=device))
        self.basis = Basis(prepared.basis.mean.to(device), prepared.basis.dirs.to(device), prepared.basis.fit,
                           prepared.basis.names, prepared.basis.uri, prepared.basis.fingerprint)
        self.ids = torch.stack([prepared.ids[r.id] for r in rows]).to(device)
        self.slots = torch.stack([prepared.slots[r.id] for r in rows]).to(device)
        self.instances = config.images_per_step
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> CelebAdapters:
        self._flags = [(p, p.requires_grad) for p in self.encoder.parameters()]
        self.encoder.requires_grad_(False)  # gradients reach the coefficients only, never the shared encoder
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def parameters(self) -> Iterator[nn.Parameter]:
        yield self.coefficients

    def set_active(self, slots: list[int] | None) -> None:
        """Nothing to do: ``condition`` receives the active slots with every step."""

    @torch.no_grad()
    def load_slot(self, slot: int, state_dict: dict[str, torch.Tensor]) -> None:
        self.coefficients[slot].copy_(state_dict[KEY])

    def state_dict_for(self, slot: int) -> dict[str, torch.Tensor]:
        return {KEY: self.coefficients[slot].detach()}

    def condition(self, ehs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Replace each active row's instance samples' states with its prompt encoded with its learned words."""
        vectors = self.basis.embed(self.coefficients.index_select(0, active))
        states = encode_with_words(self.encoder, self.ids.index_select(0, active),
                                   self.slots.index_select(0, active), vectors)
        return splice_instance_states(ehs, states, self.instances)


class CelebBasisRecipe(Recipe):
    name = "celeb_basis"

    def layout(self, pipe: StableDiffusionPipeline, config: FinetuneConfig) -> Layout:
        o = self.options(config)
        return Layout.from_state_dict({KEY: torch.empty(o.words, o.basis_size, device="meta")},
                                      dtype=config.weights_dtype)

    def prepare(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                cache_dir: str | None) -> Prepared:
        o = self.options(config)
        basis = fitted_basis(pipe.tokenizer, pipe.text_encoder, o.names, o.words, o.basis_size, cache_dir)
        tokens = {r.id: tokenise(pipe.tokenizer, r.prompt, o.placeholder, o.words) for r in rows}
        return Prepared(basis, o, {i: t[0] for i, t in tokens.items()}, {i: t[1] for i, t in tokens.items()})

    def attach(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
               prepared: Prepared) -> CelebAdapters:
        return CelebAdapters(pipe, config, rows, prepared)

    def hparams(self, config: FinetuneConfig, prepared: Prepared) -> dict:
        b = prepared.basis
        return {"recipe_options": prepared.options.model_dump(mode="json"),
                "celeb_basis": {"uri": b.uri, "fingerprint": b.fingerprint, "fit": b.fit, "names": b.names}}

    def export(self, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out: str) -> str:
        """Write ``{"<placeholder>": (words, D)}`` for ``pipe.load_textual_inversion``; returns the file's URI."""
        options = CelebBasisConfig(**hparams.get("recipe_options", {}))
        basis = load_basis(hparams.get("celeb_basis", {}))
        coefficients = layout.unflatten(weights)[KEY].float()
        embedding = basis.embed(coefficients).contiguous()
        path = out if str(out).endswith(".safetensors") else join(str(out), EMBEDDING_NAME)
        metadata = {"format": "pt", "weightzoo.layout": layout.fingerprint, "weightzoo.method": self.name,
                    "weightzoo.celeb_basis": basis.fingerprint}
        data = safetensors.torch.save({f"<{options.placeholder}>": embedding}, metadata=metadata)
        fs, fs_path = filesystem(path)
        write_bytes(fs, fs_path, data)
        return path


RECIPES = (CelebBasisRecipe(),)
