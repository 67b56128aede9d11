"""Perfusion as a recipe: key-locked, gated rank-1 edits of cross-attention K and V, plus a concept embedding.

Tewel et al. 2023 ("Key-Locked Rank One Editing for Text-to-Image Personalization"). For each
cross-attention layer, the K and V projections W get a rank-1 update along the concept's input
direction i* (the text encoder's output at the concept token), ROME-style:

    W'x = W x + σ((xᵀC⁻¹i* / i*ᵀC⁻¹i* − β) / τ) · (o − W i*)

C is the uncentred covariance of text-encoder outputs over a corpus of prompts ("a photo of <name>"
for the Celeb Basis names), so the gate opens for the concept's encoding and stays shut for other
words. K is **locked**: o_K = W_k i_class, the key of the class word ("person") in the same prompt,
so the concept attends where its class would. V's target o_V is learned per layer, and so is the
concept's input word embedding (initialised at the class word's), which sets i*. The same gate
(temperature τ, bias β) is used in training and at inference.

Row: ``perfusion.embedding`` (1, D) and one ``<attn2>.to_v.perfusion_value`` (out,) per cross-attention
layer; the covariance is fitted once per base and cached like the Celeb Basis. Export: one safetensors
file with the embedding, the V targets, C⁻¹, τ and β; ``load_perfusion(pipe, file, token, class_word)``
(``tasks/identity/perfusion_loader.py``) loads the embedding as a textual inversion, recomputes i* and the locked key
from the base as training did (prompt "<token> <class word>"), and installs attention processors that
apply the gated edits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import safetensors.torch
import torch
from torch import nn

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks.finetune.packed_lora import find_targets
from weightzoo.tasks.identity.recipes.base import Recipe
from weightzoo.tasks.identity.recipes.celeb_basis import encode_with_words, splice_instance_states, tokenise
from weightzoo.tasks.identity.recipes.names_basis import read_names
from weightzoo.tasks.identity.recipes.options import PerfusionConfig

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from weightzoo.tasks.finetune.row import ManifestRow
    from weightzoo.tasks.identity.config import FinetuneConfig

EMBEDDING = "perfusion.embedding"
VALUE = ".perfusion_value"
CROSS = ("attn2.to_k", "attn2.to_v")


def gated_edit(x: torch.Tensor, istar: torch.Tensor, cinv: torch.Tensor, delta: torch.Tensor, options: PerfusionConfig
               ) -> torch.Tensor:
    """The gated rank-1 term for groups: x (m, N, D), istar (m, D), delta = o − W i* (m, out) → (m, N, out)."""
    proj = istar @ cinv  # (m, D): C⁻¹ i* (C⁻¹ is symmetric)
    score = torch.bmm(x, proj[..., None].to(x.dtype)).squeeze(-1) / (proj * istar).sum(-1, keepdim=True).to(x.dtype)
    gate = torch.sigmoid((score - options.bias) / options.temperature)
    return gate[..., None] * delta[:, None, :].to(x.dtype)


@dataclass
class _State:
    """Shared by every edited layer of a pack: the active rows' i* for the current step."""

    istar: torch.Tensor | None = None  # (m, D)
    active: torch.Tensor | None = None  # (m,)


class PerfusionLinear(nn.Module):
    """A cross-attention K or V projection plus K rows' gated rank-1 edits (target: locked key or learned value)."""

    def __init__(self, base: nn.Linear, target: torch.Tensor, learn: bool, cinv: torch.Tensor, state: _State,
                 options: PerfusionConfig) -> None:
        super().__init__()
        self.base, self.state, self.options = base, state, options
        self.register_buffer("cinv", cinv)
        target = target.detach().clone().float()
        if learn:
            self.target = nn.Parameter(target)
        else:
            self.register_buffer("target", target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        istar, active = self.state.istar, self.state.active
        m = istar.shape[0]
        delta = self.target.index_select(0, active) - istar @ self.base.weight.float().T
        edit = gated_edit(x.reshape(m, -1, x.shape[-1]).float(), istar, self.cinv, delta, self.options)
        return y + edit.reshape(y.shape).to(y.dtype)


@dataclass
class Prepared:
    options: PerfusionConfig
    cinv: torch.Tensor  # (D, D)
    cov_uri: str | None
    cov_fingerprint: str
    ids: dict[str, torch.Tensor]  # row id -> (L,) token ids of its instance prompt, slot included
    slots: dict[str, torch.Tensor]  # row id -> (1,) position of the concept token
    class_vec: dict[str, torch.Tensor]  # row id -> (D,) input embedding of its class word
    iclass: dict[str, torch.Tensor]  # row id -> (D,) encoder output at the concept position with the class word
    layers: list[str] = field(default_factory=list)  # cross-attention to_k / to_v module names


@torch.no_grad()
def word_vector(tokenizer, encoder: nn.Module, word: str) -> torch.Tensor:
    """A word's input embedding: the mean of its tokens' embeddings."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].float().mean(0)


@torch.no_grad()
def covariance_inverse(tokenizer, encoder: nn.Module, names_uri: str | None, cache_dir: str | None
                       ) -> tuple[torch.Tensor, str | None, str]:
    """C⁻¹ of encoder outputs over "a photo of <name>" prompts (every token up to end-of-text), cached."""
    prompts = [f"a photo of {n}" for n in read_names(names_uri)]
    key = hashlib.sha256(json.dumps(prompts).encode())
    key.update(encoder.get_input_embeddings().weight.detach().float().cpu().numpy().tobytes())
    uri = join(cache_dir, "perfusion", f"{key.hexdigest()[:16]}.safetensors") if cache_dir else None
    if uri is not None and filesystem(uri)[0].exists(filesystem(uri)[1]):
        cinv = load_tensors(uri)["cinv"]
    else:
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        states = encoder(tok.input_ids.to(encoder.device))[0].float().cpu()
        lengths = (tok.input_ids == tokenizer.eos_token_id).int().argmax(1) + 1
        x = torch.cat([s[:n] for s, n in zip(states, lengths, strict=True)]).double()
        cov = x.T @ x / len(x)
        cov += 1e-4 * cov.trace() / cov.shape[0] * torch.eye(cov.shape[0], dtype=cov.dtype)
        cinv = torch.linalg.inv(cov).float()
        if uri is not None:
            save_tensors(uri, {"cinv": cinv})
    return cinv, uri, hashlib.sha256(cinv.contiguous().numpy().tobytes()).hexdigest()[:16]


def class_word(row: ManifestRow) -> str:
    words = re.findall(r"\w+", row.class_prompt)
    if not words:
        raise InputError(f"perfusion: row {row.id} has no class word in class_prompt {row.class_prompt!r}")
    return words[-1]


class PerfusionAdapters:
    """K rows' concept embeddings and V targets, with every cross-attention K/V wrapped by ``PerfusionLinear``."""

    def __init__(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                 prepared: Prepared) -> None:
        self.unet, self.encoder, self.prepared = pipe.unet, pipe.text_encoder, prepared
        device = self.unet.device
        self.embedding = nn.Parameter(torch.stack([prepared.class_vec[r.id] for r in rows])[:, None].to(device))
        self.ids = torch.stack([prepared.ids[r.id] for r in rows]).to(device)
        self.slots = torch.stack([prepared.slots[r.id] for r in rows]).to(device)
        self.iclass = torch.stack([prepared.iclass[r.id] for r in rows]).to(device)
        self.instances, self.state = config.images_per_step, _State()
        self.layers: dict[str, PerfusionLinear] = {}
        self._originals: dict[str, nn.Linear] = {}
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.unet.get_submodule(parent), child, module)

    def __enter__(self) -> PerfusionAdapters:
        self._flags = [(p, p.requires_grad) for p in self.encoder.parameters()]
        self.encoder.requires_grad_(False)
        cinv = self.prepared.cinv.to(self.unet.device)
        for name in self.prepared.layers:
            base = self.unet.get_submodule(name)
            with torch.no_grad():  # K: locked to the class word's key; V: starts at the class word's value
                target = self.iclass @ base.weight.float().T
            layer = PerfusionLinear(base, target, name.endswith("to_v"), cinv, self.state, self.prepared.options)
            self._swap(name, layer)
            self._originals[name], self.layers[name] = base, layer
        return self

    def __exit__(self, *exc: object) -> None:
        for name, base in self._originals.items():
            self._swap(name, base)
        self._originals.clear()
        for p, flag in self._flags:
            p.requires_grad_(flag)

    def parameters(self) -> Iterator[nn.Parameter]:
        yield self.embedding
        for layer in self.layers.values():
            if isinstance(layer.target, nn.Parameter):
                yield layer.target

    def set_active(self, slots: list[int] | None) -> None:
        """Nothing to do: ``condition`` receives the active slots with every step."""

    @torch.no_grad()
    def load_slot(self, slot: int, state_dict: dict[str, torch.Tensor]) -> None:
        self.embedding[slot].copy_(state_dict[EMBEDDING])
        for name, layer in self.layers.items():
            if isinstance(layer.target, nn.Parameter):
                layer.target[slot].copy_(state_dict[name + VALUE])

    def state_dict_for(self, slot: int) -> dict[str, torch.Tensor]:
        out = {EMBEDDING: self.embedding[slot].detach()}
        out |= {n + VALUE: m.target[slot].detach() for n, m in self.layers.items() if isinstance(m.target, nn.Parameter)}
        return out

    def condition(self, ehs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Encode the active rows' prompts with their embeddings; i* (the concept's output) goes to the edits."""
        m, slots = active.numel(), self.slots.index_select(0, active)
        states = encode_with_words(self.encoder, self.ids.index_select(0, active), slots,
                                   self.embedding.index_select(0, active))
        self.state.istar = states[torch.arange(m, device=states.device), slots[:, 0]]
        self.state.active = active
        return splice_instance_states(ehs, states, self.instances)


class PerfusionRecipe(Recipe):
    name = "perfusion"

    def layout(self, pipe: StableDiffusionPipeline, config: FinetuneConfig) -> Layout:
        self.options(config)
        dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        shapes = {EMBEDDING: torch.empty(1, dim, device="meta")}
        for name in find_targets(pipe.unet, ("attn2.to_v",)):
            shapes[name + VALUE] = torch.empty(pipe.unet.get_submodule(name).out_features, device="meta")
        return Layout.from_state_dict(shapes, dtype=config.weights_dtype)

    @torch.no_grad()
    def prepare(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                cache_dir: str | None) -> Prepared:
        o = self.options(config)
        tok, enc = pipe.tokenizer, pipe.text_encoder
        cinv, uri, fp = covariance_inverse(tok, enc, o.names, cache_dir)
        ids, slots, vecs, iclass = {}, {}, {}, {}
        for r in rows:
            ids[r.id], slots[r.id] = tokenise(tok, r.prompt, o.placeholder, 1)
            vecs[r.id] = word_vector(tok, enc, class_word(r)).cpu()
            states = encode_with_words(enc, ids[r.id][None].to(enc.device), slots[r.id][None].to(enc.device),
                                       vecs[r.id][None, None].to(enc.device))
            iclass[r.id] = states[0, int(slots[r.id][0])].cpu()
        layers = find_targets(pipe.unet, CROSS)
        return Prepared(o, cinv, uri, fp, ids, slots, vecs, iclass, layers)

    def attach(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
               prepared: Prepared) -> PerfusionAdapters:
        return PerfusionAdapters(pipe, config, rows, prepared)

    def hparams(self, config: FinetuneConfig, prepared: Prepared) -> dict:
        return {"recipe_options": prepared.options.model_dump(mode="json"),
                "perfusion": {"uri": prepared.cov_uri, "fingerprint": prepared.cov_fingerprint}}

    def export(self, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out: str) -> str:
        """One safetensors file for ``perfusion_loader.load_perfusion``; returns its URI."""
        options = PerfusionConfig(**hparams.get("recipe_options", {}))
        record = hparams.get("perfusion", {})
        if not record.get("uri"):
            raise InputError("this perfusion row's covariance was not cached (trained without cache_dir)")
        cinv = load_tensors(record["uri"])["cinv"]
        if hashlib.sha256(cinv.contiguous().numpy().tobytes()).hexdigest()[:16] != record.get("fingerprint"):
            raise InputError(f"{record['uri']} is not the covariance this row was trained with")
        tensors = {k: v.float().contiguous() for k, v in layout.unflatten(weights).items()} | {"cinv": cinv}
        metadata = {"format": "pt", "weightzoo.method": self.name, "weightzoo.layout": layout.fingerprint,
                    "weightzoo.perfusion": json.dumps(options.model_dump(mode="json"))}
        path = out if str(out).endswith(".safetensors") else join(str(out), "perfusion.safetensors")
        fs, fs_path = filesystem(path)
        write_bytes(fs, fs_path, safetensors.torch.save(tensors, metadata=metadata))
        return path


RECIPES = (PerfusionRecipe(),)
