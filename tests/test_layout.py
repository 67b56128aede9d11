"""Canonical layout: order independent of dict insertion, flatten/unflatten bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from weightzoo.storage.layout import FixedTensor, Layout


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


def test_layout_without_fixed_tensors_keeps_its_json_and_fingerprint() -> None:
    """Pinned: the fingerprint of a layout written before fixed tensors existed (shards and ledgers name it)."""
    layout = Layout.from_state_dict(_state_dict(torch.float16))
    assert layout.fingerprint == "253bacf48c682f1f" and "fixed" not in layout.to_json()


def test_fixed_tensors_round_trip_rebuild_exactly_and_are_not_stored() -> None:
    sd = _state_dict(torch.float32)
    a_key = "down_blocks.2.attn1.to_q.lora_A.weight"
    fixed = (FixedTensor(a_key, (2, 320), seed=7, scale=0.25),)
    stored = {k: v for k, v in sd.items() if k != a_key}
    plain, layout = Layout.from_state_dict(stored), Layout.from_state_dict(stored, fixed=fixed)
    assert layout.numel == plain.numel and layout.fingerprint != plain.fingerprint
    back = Layout.from_json(layout.to_json())
    assert back == layout and back.fingerprint == layout.fingerprint
    rows = back.unflatten(layout.flatten(stored))
    a = rows[a_key]
    assert set(rows) == set(stored) | {a_key} and a.dtype == torch.float32
    assert torch.equal(a, FixedTensor(a_key, (2, 320), seed=7, scale=0.25).build())  # same bits every rebuild
    torch.testing.assert_close(a @ a.T, 0.25**2 * torch.eye(2))  # orthogonal rows of norm = scale
    assert torch.equal(layout.flatten(rows), layout.flatten(stored))  # the fixed tensor is checked, not stored
    with pytest.raises(ValueError, match="not this layout's fixed"):
        layout.flatten(rows | {a_key: a + 1e-3})
    assert not torch.equal(FixedTensor(a_key, (2, 320), seed=8, scale=0.25).build(), a)


def test_a_fixed_tensor_that_rebuilds_differently_is_refused_when_read() -> None:
    """``check`` guards the rebuild: a layout whose recorded check differs (another random stream) is refused,
    and the check never changes the fingerprint."""
    fixed = FixedTensor("m.lora_A.weight", (2, 8), seed=3, scale=0.5)
    layout = Layout(("m.lora_B.weight",), ((4, 2),), "float32", (fixed,))
    d = layout.to_dict()
    assert d["fixed"][0]["check"] == fixed.check and len(fixed.check) == 16
    assert Layout.from_json(layout.to_json()) == layout
    unchecked = {**d, "fixed": [{k: v for k, v in d["fixed"][0].items() if k != "check"}]}
    d["fixed"][0]["check"] = "0" * 16
    with pytest.raises(ValueError, match="rebuilds differently"):
        Layout.from_json(json.dumps(d))
    assert Layout.from_json(json.dumps(unchecked)).fingerprint == layout.fingerprint
