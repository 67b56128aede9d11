"""How much LoRAs interfere when merged: each concept's denoising loss on its own images under a LoRA.

The loss is the training objective (epsilon MSE of the UNet conditioned on the concept's prompt) on a
fixed set of draws per concept (timesteps, noise, images from a generator seeded by the concept's id),
so the base, each single model and the merge are scored on exactly the same draws. What a merge keeps
of a concept is ``(base − merged) / (base − single)``: 1 when merging costs nothing, ≤ 0 when the merge
is no better than the base for that concept. Used by ``bench/merge.py`` and ``tests/test_recipes.py``
(a measurement, so it lives with the benches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from weightzoo.tasks.finetune.packed_lora import PackedLoRA
from weightzoo.tasks.seeds import stable_seed


def apply_lora(unet: torch.nn.Module, lora: Mapping[str, torch.Tensor] | None) -> PackedLoRA | None:
    """Inject a diffusers-format LoRA (``unet.``-prefixed keys, scale baked into B) as one packed slot."""
    if not lora:
        return None
    names = sorted({k[len("unet."):].rsplit(".", 2)[0] for k in lora})
    rank = lora[f"unet.{names[0]}.lora_A.weight"].shape[0]
    packed = PackedLoRA(unet, names, 1, rank, 1.0, lambda n, m: torch.zeros(1, rank, m.in_features))
    packed.load_slot(0, {k[len("unet."):]: v for k, v in lora.items()})
    return packed


@torch.no_grad()
def concept_losses(pipe, lora: Mapping[str, torch.Tensor] | None, latents: Mapping[str, torch.Tensor],
                   embeds: Mapping[str, torch.Tensor], draws: int = 16, seed: int = 0) -> dict[str, float]:
    """Concept id → mean epsilon loss over ``draws`` fixed draws, under ``lora`` (None: the base alone).

    ``latents[id]``: (n, C, h, w) VAE latents of the concept's images; ``embeds[id]``: (1, L, D) states of
    its prompt. The pipeline is left as it was.
    """
    unet, sched = pipe.unet, pipe.scheduler
    packed = apply_lora(unet, lora)
    try:
        out = {}
        for cid, lat in latents.items():
            g = torch.Generator().manual_seed(stable_seed(seed, "interference", cid))
            x0 = lat[torch.randint(0, len(lat), (draws,), generator=g)]
            t = torch.randint(0, sched.config.num_train_timesteps, (draws,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            dev = unet.device
            ehs = embeds[cid].to(dev, unet.dtype).expand(draws, -1, -1)
            pred = unet(sched.add_noise(x0, noise, t).to(dev, unet.dtype), t.to(dev), ehs).sample
            out[cid] = float(F.mse_loss(pred.float(), noise.to(dev)))
        return out
    finally:
        if packed is not None:
            packed.remove()


def kept(base: float, single: float, merged: float) -> float:
    """The share of a single model's improvement over the base that the merge keeps."""
    return (base - merged) / (base - single) if base != single else float("nan")


def merge_report(pipe, singles: Mapping[str, Mapping[str, torch.Tensor]], merged: Mapping[str, torch.Tensor],
                 latents: Mapping[str, torch.Tensor], embeds: Mapping[str, torch.Tensor],
                 draws: int = 16) -> list[dict[str, float | str]]:
    """Per concept: base, single and merged loss and the share kept (``singles[id]``: its own LoRA)."""
    base = concept_losses(pipe, None, latents, embeds, draws)
    merged_loss = concept_losses(pipe, merged, latents, embeds, draws)
    rows: list[dict[str, float | str]] = []
    for cid in latents:
        single = concept_losses(pipe, singles[cid], {cid: latents[cid]}, {cid: embeds[cid]}, draws)[cid]
        rows.append({"id": cid, "base": base[cid], "single": single, "merged": merged_loss[cid],
                     "kept": kept(base[cid], single, merged_loss[cid])})
    return rows


def mean_kept(report: Sequence[Mapping[str, float | str]]) -> float:
    return sum(float(r["kept"]) for r in report) / len(report)


def concept_inputs(pipe, rows: Sequence, base_uri: str | None, resolution: int) -> tuple[dict, dict]:
    """Each concept's image latents and prompt states, as the engine encodes them."""
    from weightzoo.tasks.finetune.images import load_images
    from weightzoo.tasks.identity.engine import encode_prompt, instance_latents

    latents = {r.id: instance_latents(pipe, r, load_images(r, base_uri), resolution) for r in rows}
    return latents, {r.id: encode_prompt(pipe, r.prompt) for r in rows}


def train_and_merge(pipe, rows: Sequence, config, base_uri: str | None, cache_dir: str | None,
                    draws: int = 16) -> list[dict[str, float | str]]:
    """Train ``rows`` independently with ``config`` (one batch), merge them all, and report per concept."""
    from weightzoo.tasks.finetune.export import lora_state_dict, merged_state_dict
    from weightzoo.tasks.identity.engine import finetune_batch

    result = finetune_batch(pipe, list(rows), config, base_uri=base_uri, cache_dir=cache_dir)
    bad = [r.id for r in result.results if not r.ok]
    if bad:
        raise RuntimeError(f"rows failed to train: {bad}")
    singles = {r.id: lora_state_dict(r.weights, result.layout, result.hparams) for r in result.results}
    merged = merged_state_dict([(r.weights, result.hparams) for r in result.results], result.layout)
    latents, embeds = concept_inputs(pipe, rows, base_uri, result.hparams["resolution"])
    return merge_report(pipe, singles, merged, latents, embeds, draws)
