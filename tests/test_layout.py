"""Canonical layout: order independent of dict insertion, flatten/unflatten bit-exact."""

from __future__ import annotations

import pytest
import torch

from weightzoo.storage.layout import Layout


def _state_dict(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "down_blocks.10.attn1.to_q.lora_A.weight": (1, 320),
        "down_blocks.2.attn1.to_q.lora_A.weight": (1, 320),
        "down_blocks.2.attn1.to_q.lora_B.weight": (320, 1),
        "mid_block.attn2.to_v.lora_B.weight": (640, 1),
    }
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_flatten_unflatten_bit_exact(dtype: torch.dtype) -> None:
    sd = _state_dict(dtype)
    layout = Layout.from_state_dict(sd)
    vec = layout.flatten(sd)
    assert vec.dtype == dtype and vec.shape == (layout.numel,)
    back = layout.unflatten(vec)
    assert list(back) == list(layout.keys)
    for k, t in sd.items():
        assert torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)), k  # bit-exact, NaN-safe
    # and through the numpy storage view, as rows come back from a shard
    again = layout.unflatten(layout.to_numpy(vec))
    assert all(torch.equal(again[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in sd)


def test_order_ignores_insertion_order_and_is_natural() -> None:
    sd = _state_dict(torch.float32)
    reversed_sd = dict(reversed(list(sd.items())))
    a, b = Layout.from_state_dict(sd), Layout.from_state_dict(reversed_sd)
    assert a == b and a.fingerprint == b.fingerprint
    assert torch.equal(a.flatten(sd), b.flatten(reversed_sd))
    assert a.keys[0].startswith("down_blocks.2.") and a.keys[2].startswith("down_blocks.10.")


def test_fingerprint_changes_with_shape_and_dtype() -> None:
    sd = _state_dict(torch.float32)
    base = Layout.from_state_dict(sd)
    assert Layout.from_state_dict(sd, dtype="float16").fingerprint != base.fingerprint
    sd["mid_block.attn2.to_v.lora_B.weight"] = torch.zeros(641, 1)
    assert Layout.from_state_dict(sd).fingerprint != base.fingerprint
    assert Layout.from_json(base.to_json()) == base


def test_flatten_rejects_mismatch() -> None:
    sd = _state_dict(torch.float32)
    layout = Layout.from_state_dict(sd)
    with pytest.raises(KeyError, match="missing"):
        layout.flatten({k: v for k, v in sd.items() if "mid_block" not in k})
    bad = dict(sd)
    bad["mid_block.attn2.to_v.lora_B.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        layout.flatten(bad)
    with pytest.raises(ValueError, match="needs"):
        layout.unflatten(torch.zeros(layout.numel + 1))
