"""Edit LoRA rows: speed of the packed forward, and smoothness of rows in the edit, each against a baseline.

**Speed.**
``tasks/concepts/lora.PackedConvLoRA`` runs ``conv(x, W + s·B_k A_k)`` per concept as one grouped conv.
The baseline is peft's form, ``base(x) + s·B_k(A_k(x))``: the frozen conv on every sample plus two
grouped convs. Both train the same packs of held-out concepts on the default edit base (random init
here: speed does not depend on the weights) for the same steps; the table gives milliseconds per
concept-step and the ratio, and the largest difference of the trained rows (the two must agree).

**Smoothness.** A weight generator can only interpolate rows that are a smooth function of the edit.
For each family in ``--families``, five concepts at nearby parameter values (the family's midpoint, then
+0.5 %, +2 %, +10 %, +30 % of its range) are trained on the ``--base`` (a pretrained edit base) with each
method in ``--methods`` (``edit-lora``: A and B trained; ``edit-lora-fa``: A frozen and shared, rows hold B)
and each Adam epsilon in ``--epsilons`` (torch's default 1e-8; ``--epsilons 1e-8 1e-3 1e-2`` gives the
earlier epsilon table). The table gives each row's distance to the midpoint row relative to the midpoint
row's norm, the same in update space (ΔW = B·A of every conv, concatenated), and the rows' held-out PSNR.
For ``edit-lora-fa`` the two distances are equal: A's rows are orthonormal times one scale s, so
‖ΔB·A‖ = s·‖ΔB‖ in every layer; the row distance is the honest figure. For ``edit-lora`` the ΔW distance
removes the factors' ambiguity (B A = B M⁻¹ M A) from the row distance.
Run: ``.venv/bin/python bench/edit_lora.py --base /tmp/czoo/base-2000 --smooth-only`` (the full
measurement); the speed table: ``--steps 30 --packs 1 8 32`` without ``--smooth-only``. A small setting
(16 px base made by ``make_base(uri, steps=60, config=SkipUNetConfig(channels=(8, 16, 32), image_size=16))``,
one thread, < 1 min): ``--base BASE --smooth-only --families hue sepia --smooth-steps 100 --threads 1``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from weightzoo.storage.layout import Layout
from weightzoo.tasks.concepts import lora
from weightzoo.tasks.concepts.base import build_base, load_base
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.edits import FAMILIES
from weightzoo.tasks.concepts.engine import edit_layout, train_concepts
from weightzoo.tasks.concepts.pairs import concept_pairs
from weightzoo.tasks.concepts.spec import EditSpec
from weightzoo.tasks.concepts.zoo import heldout_rows
from weightzoo.tasks.finetune.row import ManifestRow

OFFSETS = (0.0, 0.005, 0.02, 0.10, 0.30)  # shares of the parameter's range away from the midpoint


class PeftFormConvLoRA(lora.PackedConvLoRA):
    """The baseline: the frozen conv once for everyone, then ``B_k(A_k(x_k))`` as two grouped convs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        n, c, h, w = x.shape
        k, b = self.k, n // self.k
        xk = x.view(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)
        a = F.conv2d(xk, self.A.reshape(k * self.rank, c, *self.A.shape[-2:]), stride=self.base.stride,
                     padding=self.base.padding, dilation=self.base.dilation, groups=k)
        z = F.conv2d(a, self.B.reshape(-1, self.rank, 1, 1), groups=k)
        z = z.view(b, k, -1, *z.shape[-2:]).transpose(0, 1).reshape(n, -1, *z.shape[-2:])
        return y + self.scale * z


def timed(model, pairs, cfg, layout, pack: int) -> tuple[float, torch.Tensor]:
    """Milliseconds per concept-step over all ``pairs`` in packs of ``pack``, and the trained rows."""
    train_concepts(model, pairs[:pack], cfg.model_copy(update={"steps": 3}), layout)  # warm-up
    t0 = time.perf_counter()
    rows = [r.weights for i in range(0, len(pairs), pack) for r in train_concepts(model, pairs[i : i + pack], cfg, layout)]
    return 1000 * (time.perf_counter() - t0) / (len(pairs) * cfg.steps), torch.stack(rows)


def nearby_rows(family: str) -> list[ManifestRow]:
    """Concepts of ``family`` at its midpoint and at ``OFFSETS`` from it (first parameter moved)."""
    params = FAMILIES[family].params
    first = next(iter(params))
    rows = []
    for i, off in enumerate(OFFSETS):
        values = {n: p.lo + (0.5 + (off if n == first else 0.0)) * (p.hi - p.lo) for n, p in params.items()}
        spec = EditSpec.parse({"family": family, **values})
        rows.append(ManifestRow(id=f"{family}-{i}", kind="edit", prompt=spec.describe(), class_prompt="image",
                                attributes=spec.attributes()))
    return rows


def update_vector(layout: Layout, row: torch.Tensor, scale: float) -> torch.Tensor:
    """Every conv's update ``scale · B A`` (the layout's fixed A where it has one), flattened and concatenated."""
    sd = layout.unflatten(row.float())
    return torch.cat([scale * (sd[k].flatten(1) @ sd[k.replace("lora_B", "lora_A")].flatten(1)).flatten()
                      for k in layout.keys if k.endswith(".lora_B.weight")])


def relative(w: torch.Tensor) -> str:
    """Each row's distance to row 0, over row 0's norm."""
    return " / ".join(f"{x:.3f}" for x in ((w[1:] - w[0]).norm(dim=1) / w[0].norm()).tolist())


def smoothness(base: str, families: list[str], methods: list[str], epsilons: list[float], steps: int) -> None:
    model = load_base(base)
    offsets = ", +".join(f"{100 * o:g}" for o in OFFSETS[1:])
    print(f"\n| family | method | Adam epsilon | row distance / norm at +{offsets} % of the range "
          "| ΔW distance / norm | PSNR dB (min-max) |")
    print("|---|---|---:|---|---|---:|")
    for family in families:
        rows = nearby_rows(family)
        pairs = [concept_pairs(r, None, train=16, held_out=8, size=model.config.image_size, data_seed=0) for r in rows]
        for spec, eps in itertools.product(methods, epsilons):
            method, _, rank = spec.partition(":")
            r = int(rank or 2)
            cfg = EditFinetuneConfig(method=method, rank=r, alpha=r, steps=steps, learning_rate=1e-2, adam_epsilon=eps,
                                     check_every=steps)
            layout = edit_layout(model, cfg)
            runs = train_concepts(model, pairs, cfg, layout, eval_every=steps)
            w = torch.stack([r.weights for r in runs])
            dw = torch.stack([update_vector(layout, r, cfg.alpha / cfg.rank) for r in w])
            dbs = [r.psnr[-1][1] for r in runs]
            print(f"| {family} | {method} r{r} | {eps:g} | {relative(w)} | {relative(dw)} | {min(dbs):.1f}-{max(dbs):.1f} |",
                  flush=True)


def speed(packs: list[int], steps: int) -> None:
    """The speed table: the merged grouped conv against peft's form, on the default base (random init)."""
    model = build_base().eval()
    cfg = EditFinetuneConfig(steps=steps, check_every=steps)
    layout = edit_layout(model, cfg)
    pairs = [concept_pairs(r, None, train=16, held_out=8, size=32, data_seed=0) for r in heldout_rows(max(packs))]
    print("| pack | peft form ms/concept-step | merged ms/concept-step | speed-up | max row difference |")
    print("|---:|---:|---:|---:|---:|")
    merged_cls = lora.PackedConvLoRA
    for pack in packs:
        lora.PackedConvLoRA = PeftFormConvLoRA  # packed() builds whatever class the module names
        try:
            base_ms, base_rows = timed(model, pairs, cfg, layout, pack)
        finally:
            lora.PackedConvLoRA = merged_cls
        ms, rows = timed(model, pairs, cfg, layout, pack)
        diff = float((rows - base_rows).abs().max())
        print(f"| {pack} | {base_ms:.2f} | {ms:.2f} | {base_ms / ms:.2f}x | {diff:.1e} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--packs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="A pretrained edit base (bench/concept_zoo.py makes one); enables the smoothness table")
    p.add_argument("--families", nargs="+", default=["hue", "sepia", "blur", "emboss"])
    p.add_argument("--methods", nargs="+", default=["edit-lora", "edit-lora-fa"],
                   help="METHOD[:RANK] (rank 2 if omitted; alpha = rank), e.g. edit-lora-fa:16")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1e-8])
    p.add_argument("--smooth-steps", type=int, default=300, help="fine-tune steps of the smoothness rows")
    p.add_argument("--smooth-only", action="store_true", help="skip the speed table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.smooth_only:
        speed(args.packs, args.steps)
    if args.base:
        smoothness(args.base, args.families, args.methods, args.epsilons, args.smooth_steps)


if __name__ == "__main__":
    main()
