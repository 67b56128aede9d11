"""Apply an exported Perfusion file to a diffusers pipeline: a textual inversion plus attention processors.

    from weightzoo.tasks.identity.perfusion_loader import load_perfusion, unload_perfusion
    handle = load_perfusion(pipe, "perfusion.safetensors", token="<sks>", class_word="person")
    image = pipe("a photo of <sks> person").images[0]
    unload_perfusion(pipe, handle)   # the original processors back (the token stays in the tokenizer)

The concept embedding becomes the token (``pipe.load_textual_inversion``). i* and the class word's
encoding are recomputed from the base exactly as training computed them (the prompt "<token> <class
word>" with the embedding, or the class word's embedding, at the token's position). Every
cross-attention (``attn2``) then gets a ``PerfusionAttnProcessor``: the standard scaled-dot-product
cross-attention with ``K = W_k x + gate(x)·(W_k i_class − W_k i*)`` and ``V = W_v x + gate(x)·(o_V − W_v i*)``.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from weightzoo.tasks.finetune.packed_lora import find_targets
from weightzoo.tasks.identity.recipes.celeb_basis import encode_with_words, tokenise
from weightzoo.tasks.identity.recipes.perfusion import (
    EMBEDDING,
    VALUE,
    PerfusionConfig,
    gated_edit,
    word_vector,
)


class PerfusionAttnProcessor:
    """Cross-attention with Perfusion's gated rank-1 edits of K and V (one concept)."""

    def __init__(self, key_delta: torch.Tensor, value_delta: torch.Tensor, istar: torch.Tensor, cinv: torch.Tensor,
                 options: PerfusionConfig) -> None:
        self.key_delta, self.value_delta, self.istar, self.cinv, self.options = key_delta, value_delta, istar, cinv, options

    def _edited(self, linear: torch.nn.Linear, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(1, -1, x.shape[-1]).float()
        edit = gated_edit(flat, self.istar[None].to(x.device), self.cinv.to(x.device), delta[None].to(x.device),
                          self.options)
        y = linear(x)
        return y + edit.reshape(y.shape).to(y.dtype)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        residual, batch = hidden_states, hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        key = self._edited(attn.to_k, context, self.key_delta)
        value = self._edited(attn.to_v, context, self.value_delta)
        head = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head).transpose(1, 2) for t in (query, key, value))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@torch.no_grad()
def _encoded_at_token(pipe, placeholder: str, class_word: str, vector: torch.Tensor) -> torch.Tensor:
    """The encoder's output at the concept position of "<placeholder> <class word>" with ``vector`` there."""
    enc = pipe.text_encoder
    ids, slots = tokenise(pipe.tokenizer, f"{placeholder} {class_word}", placeholder, 1)
    states = encode_with_words(enc, ids[None].to(enc.device), slots[None].to(enc.device),
                               vector.reshape(1, 1, -1).to(enc.device))
    return states[0, int(slots[0])]


@torch.no_grad()
def load_perfusion(pipe, path: str, token: str = "<sks>", class_word: str = "person") -> dict:
    """Apply the Perfusion file at ``path`` to ``pipe``; returns the replaced processors (for ``unload_perfusion``)."""
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        options = PerfusionConfig(**json.loads(f.metadata()["weightzoo.perfusion"]))
    embedding = tensors[EMBEDDING].float()
    pipe.load_textual_inversion({token: embedding}, token=token)
    istar = _encoded_at_token(pipe, options.placeholder, class_word, embedding)
    iclass = _encoded_at_token(pipe, options.placeholder, class_word, word_vector(pipe.tokenizer, pipe.text_encoder,
                                                                                 class_word))
    replaced = {}
    for name in find_targets(pipe.unet, ("attn2.to_v",)):
        attn = pipe.unet.get_submodule(name.rsplit(".", 1)[0])
        wk, wv = attn.to_k.weight.float(), attn.to_v.weight.float()
        proc = PerfusionAttnProcessor(wk @ iclass - wk @ istar, tensors[name + VALUE].to(wv.device) - wv @ istar,
                                      istar, tensors["cinv"], options)
        replaced[name.rsplit(".", 1)[0]] = attn.processor
        attn.set_processor(proc)
    return replaced


def unload_perfusion(pipe, replaced: dict) -> None:
    """Put back the processors ``load_perfusion`` replaced."""
    for name, processor in replaced.items():
        pipe.unet.get_submodule(name).set_processor(processor)
