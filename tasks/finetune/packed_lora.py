"""Batched LoRA: K independent adapters trained in one forward/backward of a shared frozen model.

peft refuses mixed-adapter batches in training mode, and its per-layer loop over adapters would not
batch anyway. Here each target ``nn.Linear`` is wrapped by a ``PackedLoRALinear`` holding stacked
adapters, ``A: (K, r, in)`` and ``B: (K, out, r)``, and computes ``base(x) + scale * B_k A_k x`` for
every sample with one pair of ``bmm`` calls.

Which adapter a sample uses is given by its position, not by a per-sample index tensor: the batch is
laid out *item-major in equal groups* (group g = samples ``g*S .. g*S+S-1`` of adapter
``active[g]``), so a layer reshapes ``x: (m*S, L, in)`` to ``(m, S*L, in)`` and multiplies it by the
gathered ``(m, r, in)`` adapters directly — no per-sample copies of the weights. ``PackState`` (shared
by all layers of one model) holds ``active``; dropping a diverged item just removes it from
``active``, leaving its adapter untouched.

Samples never mix: every layer of a diffusion UNet (conv, GroupNorm, attention) is per-sample, each
group only reads its own adapter, and the loss is a plain sum of per-item losses, so adapter k's
gradient is exactly what it would be if trained alone. AdamW is element-wise (its moments and weight
decay are per element of the stacked tensors), and the driver's ``clip_per_item`` clips per item, so
the optimiser state is independent per item too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PackState:
    """What the current batch looks like, shared by every packed layer of one model.

    ``active`` is a (m,) long tensor on the model's device listing the adapter of each group, in
    batch order; ``None`` means all K adapters in order (the common case, saving one gather per layer).
    """

    k: int
    active: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.k if self.active is None else int(self.active.numel())


class PackedLoRALinear(nn.Module):
    """An ``nn.Linear`` plus K stacked LoRA adapters; the base layer is used as is (frozen)."""

    def __init__(self, base: nn.Linear, a_init: torch.Tensor, train_a: bool, scale: float, state: PackState):
        super().__init__()
        k, rank, fan_in = a_init.shape
        if fan_in != base.in_features or k != state.k:
            raise ValueError(f"A init of shape {tuple(a_init.shape)} does not fit {base} with K={state.k}")
        self.base = base
        self.scale = float(scale)
        self.state = state
        device = base.weight.device
        # LoRA parameters stay fp32 whatever the base dtype: autocast runs the matmuls in bf16 on CUDA,
        # and the optimiser updates full-precision weights.
        a = a_init.detach().to(device, torch.float32, copy=True).contiguous()  # never alias the caller's tensor
        if train_a:
            self.lora_A = nn.Parameter(a)
        else:
            self.register_buffer("lora_A", a)
        self.lora_B = nn.Parameter(torch.zeros(k, base.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a, b = self.lora_A, self.lora_B
        if self.state.active is not None:
            a, b = a.index_select(0, self.state.active), b.index_select(0, self.state.active)
        m = a.shape[0]
        if x.shape[0] % m:
            raise ValueError(f"batch of {x.shape[0]} samples cannot be split into {m} equal adapter groups")
        dtype = y.dtype  # the compute dtype (bf16 under autocast), so no matmul mixes dtypes
        h = torch.bmm(x.reshape(m, -1, x.shape[-1]).to(dtype), a.to(dtype).mT)  # (m, S*L, r)
        out = torch.baddbmm(y.reshape(m, -1, y.shape[-1]), h, b.to(dtype).mT, alpha=self.scale)
        return out.view(y.shape)


def find_targets(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose name ends with one of ``targets`` (e.g. ``to_q``, ``to_out.0``).

    In module-registration order, which for diffusers UNets is down → mid → up blocks.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear modules named {list(targets)} in {type(model).__name__}")
    return names


@dataclass
class PackedLoRA:
    """K adapters injected into ``model``'s target layers; ``remove()`` (or leaving the ``with``) restores it.

    ``a_init(name, layer)`` returns the (K, r, in) initial down-projections of one layer; ``B`` starts
    at zero so every adapter starts as the identity edit.
    """

    model: nn.Module
    names: list[str]
    k: int
    rank: int
    scale: float
    a_init: Callable[[str, nn.Linear], torch.Tensor]
    train_a: bool = True
    state: PackState = field(init=False)
    layers: dict[str, PackedLoRALinear] = field(init=False, default_factory=dict)
    _originals: dict[str, nn.Linear] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.state = PackState(self.k)
        try:
            for name in self.names:
                base = self.model.get_submodule(name)
                if not isinstance(base, nn.Linear):
                    raise TypeError(f"{name} is {type(base).__name__}, not nn.Linear")
                a = self.a_init(name, base)
                if a.shape[1] != self.rank:
                    raise ValueError(f"{name}: A init has rank {a.shape[1]}, expected {self.rank}")
                layer = PackedLoRALinear(base, a, self.train_a, self.scale, self.state)
                self._swap(name, layer)
                self._originals[name] = base
                self.layers[name] = layer
        except BaseException:
            self.remove()
            raise

    def _swap(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def remove(self) -> None:
        """Put the original layers back (idempotent): the model is exactly as before injection."""
        for name, base in self._originals.items():
            self._swap(name, base)
        self._originals.clear()

    def __enter__(self) -> PackedLoRA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def set_active(self, slots: list[int] | None) -> None:
        """Which adapters the next batches' groups use, in batch order (``None``: all K in order)."""
        if slots is None or list(slots) == list(range(self.k)):
            self.state.active = None
            return
        device = next(iter(self.layers.values())).lora_B.device
        self.state.active = torch.tensor(list(slots), dtype=torch.long, device=device)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable stacked tensors (A and B, or only B when A is fixed), in layer order."""
        for layer in self.layers.values():
            if isinstance(layer.lora_A, nn.Parameter):
                yield layer.lora_A
            yield layer.lora_B

    @torch.no_grad()
    def load_slot(self, slot: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Set adapter ``slot`` from a canonical LoRA state dict (to resume, or to rebuild a trained model)."""
        for name, layer in self.layers.items():
            layer.lora_A[slot].copy_(state_dict[f"{name}.lora_A.weight"])
            layer.lora_B[slot].copy_(state_dict[f"{name}.lora_B.weight"])

    def state_dict_for(self, slot: int) -> dict[str, torch.Tensor]:
        """Adapter ``slot`` as a canonical LoRA state dict (peft/diffusers key names, no scaling baked in)."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A.weight"] = layer.lora_A[slot].detach()
            out[f"{name}.lora_B.weight"] = layer.lora_B[slot].detach()
        return out
