"""The SVD form of LoRA rows (tasks/finetune/gauge.py): same edits, no gauge freedom, the mean edit."""

from __future__ import annotations

import pytest
import torch

from weightzoo.errors import InputError
from weightzoo.storage.layout import FixedTensor, Layout
from weightzoo.tasks.finetune.gauge import a_norms, mean_edit, svd_form


def _state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A conv LoRA (peft's 4-d shapes) and a linear one, rank 2, with a plain tensor beside them."""
    return {"conv.lora_A.weight": torch.randn(2, 3, 3, 3, generator=g), "conv.lora_B.weight": torch.randn(5, 2, 1, 1, generator=g),
            "lin.lora_A.weight": torch.randn(2, 7, generator=g), "lin.lora_B.weight": torch.randn(4, 2, generator=g),
            "norm.weight": torch.randn(4, generator=g)}


def _edits(layout: Layout, row: torch.Tensor) -> list[torch.Tensor]:
    s = layout.unflatten(row)
    return [s[f"{m}.lora_B.weight"].reshape(s[f"{m}.lora_B.weight"].shape[0], 2) @ s[f"{m}.lora_A.weight"].reshape(2, -1)
            for m in ("conv", "lin")]


def test_the_svd_form_keeps_every_edit_and_removes_the_gauge() -> None:
    g = torch.Generator().manual_seed(0)
    states = [_state(g) for _ in range(3)]
    layout = Layout.from_state_dict(states[0], "float32")
    rows = torch.stack([layout.flatten(s) for s in states])
    canon = svd_form(layout, rows)
    for row, c in zip(rows, canon, strict=True):
        for want, got in zip(_edits(layout, row), _edits(layout, c), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layout.unflatten(canon[0])["norm.weight"], states[0]["norm.weight"])
    # another gauge of the same edits (B·M, M⁻¹·A, and a sign flip) has the same SVD form
    m = torch.tensor([[2.0, 1.0], [0.5, -3.0]])
    moved = dict(states[0])
    moved["lin.lora_B.weight"] = states[0]["lin.lora_B.weight"] @ m
    moved["lin.lora_A.weight"] = torch.linalg.inv(m) @ states[0]["lin.lora_A.weight"]
    moved["conv.lora_B.weight"], moved["conv.lora_A.weight"] = -states[0]["conv.lora_B.weight"], -states[0]["conv.lora_A.weight"]
    assert (layout.flatten(moved) - rows[0]).abs().max() > 0.5
    torch.testing.assert_close(svd_form(layout, layout.flatten(moved)[None])[0], canon[0], rtol=1e-4, atol=1e-4)
    # in the form, B and A carry the same singular values (balanced): |B's column| = |A's row|
    s = layout.unflatten(canon[1])
    torch.testing.assert_close(s["lin.lora_B.weight"].norm(dim=0), s["lin.lora_A.weight"].norm(dim=1))
    assert rows.shape == canon.shape == (3, layout.numel)


def test_the_mean_edit_is_the_rank_r_truncation_of_the_weighted_mean_of_the_edits() -> None:
    g = torch.Generator().manual_seed(1)
    states = [_state(g) for _ in range(4)]
    layout = Layout.from_state_dict(states[0], "float32")
    rows = torch.stack([layout.flatten(s) for s in states])
    idx, w = torch.tensor([[0, 2], [1, 1], [3, 0]]), torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    got = mean_edit(layout, rows, idx, w)
    for q in range(3):
        for e, want_parts in enumerate(zip(*(_edits(layout, rows[int(i)]) for i in idx[q]), strict=True)):
            full = sum(float(wk) * part for wk, part in zip(w[q], want_parts, strict=True)).double()
            u, s, vh = torch.linalg.svd(full, full_matrices=False)
            torch.testing.assert_close(_edits(layout, got[q])[e].double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-4)
    # one row with all the weight: its own edit, in the SVD form; the plain tensor is averaged
    torch.testing.assert_close(got[1], svd_form(layout, rows[1:2])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layout.unflatten(got[0])["norm.weight"], 0.25 * states[0]["norm.weight"] + 0.75 * states[2]["norm.weight"])


def test_rows_without_factor_pairs_are_refused_in_one_line() -> None:
    fixed = Layout.from_state_dict({"c.lora_B.weight": torch.zeros(4, 2)}, "float32",
                                   fixed=[FixedTensor("c.lora_A.weight", (2, 3), seed=0)])
    full = Layout.from_state_dict({"c.weight": torch.zeros(4, 3)}, "float32")
    for layout in (fixed, full):
        with pytest.raises(InputError, match="the SVD form needs LoRA rows that store both") as e:
            svd_form(layout, torch.zeros(1, layout.numel))
        assert "\n" not in str(e.value)


def test_the_recipe_gauge_keeps_every_edit_with_a_rows_of_the_stored_norm() -> None:
    g = torch.Generator().manual_seed(2)
    states = [_state(g) for _ in range(5)]
    layout = Layout.from_state_dict(states[0], "float32")
    rows = torch.stack([layout.flatten(s) for s in states])
    norms = a_norms(layout, rows)  # factor_pairs order: conv, lin
    assert norms == pytest.approx([float(torch.stack([s[f"{m}.lora_A.weight"].reshape(2, -1) for s in states]).norm(dim=2).median())
                                   for m in ("conv", "lin")])
    moved = svd_form(layout, rows, [3.0, 0.5])
    for row, c in zip(rows, moved, strict=True):
        for want, got in zip(_edits(layout, row), _edits(layout, c), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        s = layout.unflatten(c)
        for m, n in (("conv", 3.0), ("lin", 0.5)):  # A's rows orthogonal, each of the given norm
            a = s[f"{m}.lora_A.weight"].reshape(2, -1)
            torch.testing.assert_close(a @ a.T, n * n * torch.eye(2), rtol=1e-4, atol=1e-4)
    # the mean edit in that gauge: the same edit as in the SVD form, other factors
    idx, w = torch.tensor([[0, 3]]), torch.tensor([[0.5, 0.5]])
    got, canon = mean_edit(layout, rows, idx, w, [3.0, 0.5]), mean_edit(layout, rows, idx, w)
    for a, b in zip(_edits(layout, got[0]), _edits(layout, canon[0]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
