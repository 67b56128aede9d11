"""The concept workload on a tiny base (16 px, CPU): edits, manifest validation, the edit-lora engine through
``run_batch``, export through peft, and the structured condition of the weight generator.

One module-scoped base (pretrained for a few steps) and one committed dataset feed every test.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from weightzoo.errors import InputError
from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.concepts.base import SkipUNetConfig, base_fingerprint, load_base, make_base
from weightzoo.tasks.concepts.condition import StructuredCondition
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.edits import FAMILIES
from weightzoo.tasks.concepts.engine import edit_layout, train_concepts
from weightzoo.tasks.concepts.finetune import edit_finetune_batch
from weightzoo.tasks.concepts.loading import load_peft_adapter, merged
from weightzoo.tasks.concepts.pairs import concept_pairs, psnr
from weightzoo.tasks.concepts.rows import EditRowRules
from weightzoo.tasks.concepts.sources import source_images
from weightzoo.tasks.concepts.spec import EditSpec
from weightzoo.tasks.concepts.task_loss import edit_task_loss
from weightzoo.tasks.concepts.zoo import concept_rows, heldout_rows, write_concept_manifest, write_pairs
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.diffusion.generator import WeightDiffusionModel, train_weight_diffusion
from weightzoo.tasks.finetune.batch import run_batch
from weightzoo.tasks.finetune.export import export
from weightzoo.tasks.finetune.manifest import validate_manifest
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.finetune.row import ManifestError, ManifestRow

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is steadiest

SIZE = 16
CFG = EditFinetuneConfig(steps=120, learning_rate=1e-2, train_pairs=8, eval_pairs=4, pack=4, check_every=5)
# A 120-step LoRA on a 60-step pretrained 16 px base: measured 19.9-26.9 dB on held-out pairs for these
# concepts, against 10-19 dB for the base alone; the floor and the 5 dB gain leave room for float noise.
PSNR_FLOOR = 18.0


def _mid(family: str) -> dict[str, float]:
    params = {}
    for name, p in FAMILIES[family].params.items():
        x = (p.lo + p.hi) / 2
        params[name] = float(round(x)) if p.integer else x
    return {"family": family, **params}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("edit-base"))
    return make_base(uri, steps=60, config=SkipUNetConfig(channels=(8, 16, 32), image_size=SIZE), batch=16, pool=64)


@pytest.fixture(scope="module")
def built(base: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[ManifestRow]]:
    """Five concepts (one as rendered files, the rest procedural) trained by run_batch into a dataset."""
    root = tmp_path_factory.mktemp("concepts")
    specs = [{"family": "sepia", "strength": 0.9}, {"family": "contrast", "contrast": 0.5},
             {"family": "saturation", "saturation": 0.3}, {"family": "hue+blur", "degrees": 120, "radius": 1.0},
             {"family": "channels", "order": 2}]
    rows = [ManifestRow(id=f"c{i}", kind="edit", prompt=EditSpec.parse(a).describe(), attributes=a)
            for i, a in enumerate(specs)]
    rows[-1:] = write_pairs(rows[-1:], str(root), n=8, size=SIZE)
    manifest = write_concept_manifest(rows, str(root / "manifest.jsonl"))
    dataset = str(root / "dataset")
    out = run_batch("b-test", [r.id for r in rows], manifest, base, dataset, CFG, engine="edit-lora")
    assert sorted(out.committed) == sorted(r.id for r in rows), out.failed
    return manifest, dataset, read_manifest(manifest)


def test_edit_families_are_deterministic_and_distinct() -> None:
    x = source_images(6, SIZE, seed=1)
    assert torch.equal(x, source_images(6, SIZE, seed=1))
    outs = {}
    for family in FAMILIES:
        spec = EditSpec.parse(_mid(family))
        y = spec.apply(x)
        assert y.shape == x.shape and torch.equal(y, spec.apply(x.clone())), family
        assert float(y.min()) >= 0 and float(y.max()) <= 1, family
        outs[family] = y
    for a, b in itertools.combinations(outs, 2):
        assert (outs[a] - outs[b]).abs().mean() > 1e-2, (a, b)
    assert len(FAMILIES) >= 12
    composed = EditSpec.parse({"family": "sepia+blur", "strength": 0.5, "radius": 1.0})
    assert torch.equal(composed.apply(x), EditSpec.parse(_mid("blur") | {"radius": 1.0}).apply(
        EditSpec.parse({"family": "sepia", "strength": 0.5}).apply(x)))
    assert composed.describe() == "sepia tone, strength 0.5, then gaussian blur, radius 1"


def test_bad_edit_spec_is_refused_in_validation_naming_the_row(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "kind": "edit", "attributes": {"family": "sepia", "strength": 0.5}},
        {"id": "unknown", "kind": "edit", "attributes": {"family": "vignette"}},
        {"id": "range", "kind": "edit", "attributes": {"family": "blur", "radius": 9}},
        {"id": "missing", "kind": "edit", "attributes": {"family": "tint", "tint_hue": 10}},
        {"id": "nums", "kind": "identity", "images": ["x.png"], "attributes": {"colour": 1}},
    ]
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows, str(tmp_path), rules=EditRowRules())
    got = [(p.id, p.reason) for p in info.value.problems]
    assert got[0] == ("unknown", "unknown edit family 'vignette' (known: " + ", ".join(FAMILIES) + ")")
    assert got[1] == ("range", "parameter 'radius' = 9 is out of range [0.5, 2.5]")
    assert got[2] == ("missing", "missing parameter 'tint_strength' of family 'tint'")
    assert [i for i, _ in got[3:]] == ["nums", "nums"]  # old kinds keep string attributes; and its image is missing
    assert "row 2 (id 'unknown')" in str(info.value)


def test_numeric_attributes_round_trip_as_numbers(tmp_path: Path) -> None:
    rows = concept_rows(3, seed=2)
    path = write_concept_manifest(rows, str(tmp_path / "m.jsonl"))
    first = json.loads(Path(path).read_text().splitlines()[0])
    assert all(isinstance(v, float) for k, v in first["attributes"].items() if k != "family")
    assert read_manifest(path) == rows
    assert validate_manifest(rows, str(tmp_path), rules=EditRowRules()) == rows
    held = heldout_rows(4, seed=2)
    assert {r.attributes["family"] for r in held[1::2]}.isdisjoint({r.attributes["family"] for r in concept_rows(300)})


def test_packed_training_equals_sequential(base: str) -> None:
    model = load_base(base)
    config = CFG.model_copy(update={"steps": 12})
    rows = concept_rows(3, seed=5)
    pairs = [concept_pairs(r, None, train=8, held_out=4, size=SIZE, data_seed=0) for r in rows]
    layout = edit_layout(model, config)
    together = train_concepts(model, pairs, config, layout)
    alone = [train_concepts(model, [p], config, layout)[0] for p in pairs]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-4, atol=1e-5)
        assert a.losses == pytest.approx(b.losses, rel=1e-4)
    assert any(not torch.equal(together[0].weights, t.weights) for t in together[1:])


def test_run_batch_commits_rows_that_reproduce_their_edit_after_export(built, base: str, tmp_path: Path) -> None:
    manifest, dataset, rows = built
    ds = Dataset(dataset)
    assert sorted(ds.ids) == sorted(r.id for r in rows)
    model = load_base(base)
    for row in rows:
        meta, w = ds.row(row.id)
        assert meta["method"] == "edit-lora" and meta["base_model"] == base_fingerprint(base)
        assert meta["attributes"] == row.attributes
        pairs = concept_pairs(row, str(Path(manifest).parent), train=8, held_out=4, size=SIZE, data_seed=0)
        folder = export(w, ds.layout, meta["hparams"], str(tmp_path / row.id), fmt="peft")
        with torch.no_grad():
            loaded = float(psnr(load_peft_adapter(base, folder)(pairs.eval_src), pairs.eval_tgt).mean())
            direct = float(psnr(merged(model, w, ds.layout, meta["hparams"])(pairs.eval_src), pairs.eval_tgt).mean())
            plain = float(psnr(model(pairs.eval_src), pairs.eval_tgt).mean())
        assert loaded == pytest.approx(direct, abs=1e-3)
        assert loaded > PSNR_FLOOR and loaded > plain + 5, (row.id, loaded, plain)
    again = run_batch("b-test", [r.id for r in rows], manifest, base, dataset, CFG, engine="edit-lora")
    assert sorted(again.skipped) == sorted(r.id for r in rows) and not again.committed  # resume: nothing retrained


def test_structured_condition_interpolates_and_refuses_unseen_values(built, base: str, tmp_path: Path) -> None:
    _, dataset, rows = built
    cond = StructuredCondition.fit([r.attributes for r in rows])
    assert "sepia" in cond.categorical["family"] and "strength" in cond.numeric
    assert cond.encode({"family": "sepia+contrast", "strength": "0.9", "contrast": "1"}).shape == (cond.dim,)
    with pytest.raises(InputError, match=r"family 'vignette' was never seen in training; valid family values: blur, "):
        cond.check({"family": "vignette"})
    out = str(tmp_path / "wdiff")
    train_weight_diffusion(WeightDiffusionConfig(dataset=dataset, base=base, out=out, condition="structured",
                                                 steps=20, block_size=256, width=32, depth=1, batch_size=4))
    model = WeightDiffusionModel.load(out)
    assert model.tokenizer is None and model.structured.categorical == cond.categorical
    vec = model.generate_attributes([{"family": "sepia", "strength": 0.7}])
    assert vec.shape == (1, Dataset(dataset).layout.numel) and torch.isfinite(vec).all()
    with pytest.raises(InputError, match="valid family values"):
        model.generate_attributes([{"family": "vignette"}])


def test_edit_engine_takes_the_shared_optimiser_fields_and_splits_on_out_of_memory(base: str) -> None:
    """Warm-up and betas reach the edit engine's AdamW (the shared driver); an OOM pack is split, not failed."""
    model = load_base(base)
    rows = concept_rows(2, seed=5)
    config = CFG.model_copy(update={"steps": 4, "check_every": 2})
    pairs = [concept_pairs(r, None, train=8, held_out=4, size=SIZE, data_seed=0) for r in rows]
    layout = edit_layout(model, config)
    plain = train_concepts(model, pairs, config, layout)
    for update in ({"lr_warmup_steps": 4}, {"adam_beta1": 0.5}):
        other = train_concepts(model, pairs, config.model_copy(update=update), layout)
        assert not torch.allclose(plain[0].weights, other[0].weights), update

    def fake_oom(module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args[0].shape[0] > config.pairs_per_step:  # more than one concept
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.register_forward_pre_hook(fake_oom)
    try:
        split = edit_finetune_batch(model, rows, config.model_copy(update={"pack": 2}))
    finally:
        handle.remove()
    assert [r.ok for r in split.results] == [True, True]
    for got, want in zip(split.results, plain, strict=True):
        torch.testing.assert_close(got.weights.float(), want.weights, rtol=1e-4, atol=1e-5)
    assert len({r.id for r in split.results}) == len(rows)


def test_edit_lora_fa_trains_b_only_and_its_peft_export_rebuilds_the_fixed_a(
    base: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from weightzoo.cli import main as cli
    from weightzoo.tasks.concepts.finetune import resolved_hparams
    from weightzoo.tasks.concepts.lora import shared_fixed_a

    model = load_base(base)
    config = CFG.model_copy(update={"method": "edit-lora-fa"})
    layout = edit_layout(model, config)
    assert all(k.endswith(".lora_B.weight") for k in layout.keys)
    assert [f.key for f in layout.fixed] == [k.replace("lora_B", "lora_A") for k in layout.keys]
    assert layout.numel == sum(model.get_submodule(k.rsplit(".", 2)[0]).weight.shape[0] * config.rank for k in layout.keys)
    rows = concept_rows(2, seed=5)
    pairs = [concept_pairs(r, None, train=8, held_out=4, size=SIZE, data_seed=0) for r in rows]
    runs = train_concepts(model, pairs, config, layout)
    hparams, gains = resolved_hparams(model, config), []
    for i, (p, run) in enumerate(zip(pairs, runs, strict=True)):
        assert run.weights is not None and run.weights.shape == (layout.numel,)
        for f in layout.fixed:  # A: the same seeded orthogonal rows, untouched by training
            a = layout.unflatten(run.weights)[f.key]
            name = f.key.removesuffix(".lora_A.weight")
            assert torch.equal(a, shared_fixed_a(name, model.get_submodule(name), config.rank, config.seed).build())
            torch.testing.assert_close(a.flatten(1) @ a.flatten(1).T, torch.eye(config.rank) / 3)
        folder = export(run.weights, layout, hparams, str(tmp_path / f"c{i}"), fmt="peft")
        with torch.no_grad():
            loaded = float(psnr(load_peft_adapter(base, folder)(p.eval_src), p.eval_tgt).mean())
            direct = float(psnr(merged(model, run.weights, layout, hparams)(p.eval_src), p.eval_tgt).mean())
            plain = float(psnr(model(p.eval_src), p.eval_tgt).mean())
        assert loaded == pytest.approx(direct, abs=1e-3)
        gains.append(loaded - plain)
    # B alone learns slower than A and B on this tiny base (measured +0.2 and +0.9 dB in 120 steps; lora: +0.1, +6.7)
    assert max(gains) > 0.5 and min(gains) > 0, gains
    with pytest.raises(SystemExit):
        cli(["build", "--engine", "edit-lora", "--help"])
    assert "edit-lora-fa" in capsys.readouterr().out


def test_old_config_keys_still_load() -> None:
    """Stored hparams from before the shared TrainingConfig name pairs per step and image size the old way."""
    old = EditFinetuneConfig.model_validate({"batch_size": 3, "image_size": 16})
    assert (old.pairs_per_step, old.resolution) == (3, 16)
    assert "batch_size" not in old.model_dump() and "image_size" not in old.model_dump()
    assert {"pack", "mixed_precision", "check_every", "loss_window"} <= EditFinetuneConfig.EXECUTION_FIELDS
    defaults = EditFinetuneConfig()
    assert (defaults.learning_rate, defaults.rank, defaults.alpha, defaults.pack, defaults.weight_decay,
            defaults.weights_dtype) == (5e-3, 2, 2.0, 16, 0.0, "float32")


# -- the generator's task objective (tasks/diffusion/objective.py, tasks/concepts/task_loss.py) ------------


def test_edit_task_loss_applies_rows_as_their_adapters_with_gradients_to_the_rows(built, base: str) -> None:
    """A stored row scores exactly what its merged adapter does on the same pairs; the gradient reaches the rows."""
    _, dataset, rows = built
    ds = Dataset(dataset)
    loss = edit_task_loss(base, ds, "cpu", pairs_per_step=3)
    ids = [r.id for r in rows]
    stored = torch.stack([ds.layout.as_tensor(ds.row(i)[1]).float() for i in ids]).requires_grad_(True)
    value = loss(ids, stored, torch.Generator().manual_seed(0))
    value.backward()
    value = value.detach()
    assert torch.isfinite(value) and stored.grad is not None and stored.grad.abs().sum() > 0
    raw = torch.randint(0, 2**31 - 1, (3,), generator=torch.Generator().manual_seed(0))
    per_row = []
    for row in rows:
        pairs = concept_pairs(ManifestRow(id=row.id, kind="edit", attributes=row.attributes), None, train=8,
                              held_out=4, size=SIZE, data_seed=0)
        meta, w = ds.row(row.id)
        with torch.no_grad():
            out = merged(load_base(base), w, ds.layout, meta["hparams"])(pairs.train_src[raw % 8])
        per_row.append(float((out - pairs.train_tgt[raw % 8]).abs().mean()))
    assert float(value) == pytest.approx(sum(per_row) / len(per_row), rel=1e-4)
    zero = loss(ids, torch.zeros_like(stored), torch.Generator().manual_seed(0))
    assert float(zero) > float(value)  # the base alone edits worse than the trained rows


def test_edit_task_loss_of_lora_fa_rows_uses_the_layouts_fixed_a(base: str) -> None:
    """An edit-lora-fa row stores B only: the task loss rebuilds the fixed A and scores what the merged adapter
    does (without it no conv would be adapted and the loss would not depend on the rows at all)."""
    from weightzoo.tasks.concepts.task_loss import EditTaskLoss

    model, config = load_base(base), CFG.model_copy(update={"method": "edit-lora-fa"})
    layout = edit_layout(model, config)
    rows = concept_rows(2, seed=5)
    attributes = {r.id: dict(r.attributes) for r in rows}
    weights = torch.randn(len(rows), layout.numel, generator=torch.Generator().manual_seed(0)) * 0.3
    weights.requires_grad_(True)
    loss = EditTaskLoss(model.requires_grad_(False), layout, config, attributes, pairs_per_step=3)
    value = loss([r.id for r in rows], weights, torch.Generator().manual_seed(0))
    value.backward()
    value = value.detach()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    raw = torch.randint(0, 2**31 - 1, (3,), generator=torch.Generator().manual_seed(0))
    per_row = []
    for r, w in zip(rows, weights.detach(), strict=True):
        p = concept_pairs(r, None, train=config.train_pairs, held_out=config.eval_pairs, size=SIZE, data_seed=0)
        with torch.no_grad():
            out = merged(load_base(base), w, layout, {"alpha": config.alpha, "rank": config.rank})(p.train_src[raw % 8])
        per_row.append(float((out - p.train_tgt[raw % 8]).abs().mean()))
    assert float(value) == pytest.approx(sum(per_row) / len(per_row), rel=1e-4)


def test_task_objective_scores_a_residual_generators_rows_as_retrieval_plus_correction(base: str) -> None:
    """residual_k: the denoiser predicts scaled residuals, so the scored rows are (near + pred · scale) · std + mean,
    each training row's own leave-one-out retrieval ``near`` picked by the batch's indices."""
    from weightzoo.tasks.concepts.task_loss import EditTaskLoss
    from weightzoo.tasks.diffusion.blocks import BlockSpec, Stats
    from weightzoo.tasks.diffusion.objective import TaskObjective
    from weightzoo.tasks.seeds import stable_seed

    model, config = load_base(base), CFG.model_copy(update={"method": "edit-lora-fa"})
    layout = edit_layout(model, config)
    rows = concept_rows(3, seed=5)
    ids = [r.id for r in rows]
    loss = EditTaskLoss(model.requires_grad_(False), layout, config, {r.id: dict(r.attributes) for r in rows}, 2)
    g = torch.Generator().manual_seed(1)
    d = layout.numel
    stats = Stats(torch.randn(d, generator=g) * 0.1, torch.rand(d, generator=g) + 0.5)
    near, scale, pred = torch.randn(3, d, generator=g), torch.rand(d, generator=g) + 0.5, torch.randn(3, d, generator=g)
    spec, idx = BlockSpec(d, 64), torch.tensor([2, 0])
    objective = TaskObjective(loss, spec, stats, ids, 2.0, seed=0, residual=(near, scale))
    got = objective(spec.cut(pred[idx]), idx, step=4)
    scored = stats.denormalise(near[idx] + pred[idx] * scale)
    want = 2.0 * loss([ids[2], ids[0]], scored, torch.Generator().manual_seed(stable_seed(0, "task", 4)))
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_inner_steps_move_each_row_as_its_own_adamw_fine_tune_and_the_gradient_is_taken_there(base: str) -> None:
    """``InnerAdam`` moves every row as torch's AdamW would train it alone (same examples, warm-up); the
    objective then scores the moved rows and hands their gradient to the start (first-order)."""
    from weightzoo.tasks.concepts.task_loss import EditTaskLoss
    from weightzoo.tasks.diffusion.blocks import BlockSpec, Stats
    from weightzoo.tasks.diffusion.objective import InnerAdam, TaskObjective
    from weightzoo.tasks.seeds import stable_seed

    model = load_base(base).requires_grad_(False)
    layout = edit_layout(model, CFG)
    rows = concept_rows(2, seed=5)
    ids = [r.id for r in rows]
    loss = EditTaskLoss(model, layout, CFG, {r.id: dict(r.attributes) for r in rows}, 2)
    start = torch.randn(2, layout.numel, generator=torch.Generator().manual_seed(1)) * 0.05
    inner = InnerAdam(3, 1e-2, (0.9, 0.999), 1e-8, warmup=2)
    moved = inner.run(loss, ids, start, torch.Generator().manual_seed(7))
    for k, rid in enumerate(ids):
        x = start[k : k + 1].clone().requires_grad_(True)
        opt, gen = torch.optim.AdamW([x], lr=1e-2, weight_decay=0.0, eps=1e-8), torch.Generator().manual_seed(7)
        for step in range(3):
            opt.param_groups[0]["lr"] = 1e-2 * min(1.0, (step + 1) / 2)
            opt.zero_grad()
            loss([rid], x, gen).backward()
            opt.step()
        torch.testing.assert_close(moved[k], x.detach()[0], rtol=1e-4, atol=1e-5)
    assert float(loss(ids, moved, torch.Generator().manual_seed(0))) < float(loss(ids, start, torch.Generator().manual_seed(0)))
    d, idx = layout.numel, torch.tensor([1, 0])
    spec = BlockSpec(d, 64)
    objective = TaskObjective(loss, spec, Stats(torch.zeros(d), torch.ones(d)), ids, 2.0, seed=0, inner=inner)
    pred = spec.cut(start[idx]).requires_grad_(True)
    got = objective(pred, idx, step=4)
    got.backward()
    g = torch.Generator().manual_seed(stable_seed(0, "task", 4))
    there = inner.run(loss, [ids[1], ids[0]], start[idx], g).requires_grad_(True)
    want = 2.0 * loss([ids[1], ids[0]], there, g)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(spec.reassemble(pred.grad), there.grad, rtol=1e-4, atol=1e-7)


def _task_config(dataset: str, base: str, out: Path, **kw) -> WeightDiffusionConfig:
    return WeightDiffusionConfig(dataset=dataset, base=base, out=str(out), condition="structured", block_size=256,
                                 width=32, depth=1, batch_size=4, lr_warmup_steps=0, checkpoint_every=3, device="cpu",
                                 **kw)


def test_task_objective_trains_the_generator_through_the_base_and_resumes(built, base: str, tmp_path: Path) -> None:
    """Same seed, same first batch: the task objective's first loss is the weight loss plus a finite task loss,
    and its gradient changes the denoiser; a resumed task run follows the uninterrupted one. A residual, an SVD-form
    and an inner-steps run train too."""
    _, dataset, rows = built
    plain = train_weight_diffusion(_task_config(dataset, base, tmp_path / "weights", steps=6))
    task = train_weight_diffusion(_task_config(dataset, base, tmp_path / "task", steps=6, objective="task",
                                               task_weight=10.0))
    lw = json.loads((tmp_path / "weights" / "losses.json").read_text())
    lt = json.loads((tmp_path / "task" / "losses.json").read_text())
    assert all(math.isfinite(x) for x in lt) and lt[0] > lw[0] + 0.1  # 10 x an L1 edit loss of ~0.05-0.2
    a = WeightDiffusionModel.load(plain.uri).denoiser.state_dict()
    b = WeightDiffusionModel.load(task.uri).denoiser.state_dict()
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    first = train_weight_diffusion(_task_config(dataset, base, tmp_path / "resumed", steps=3, objective="task",
                                                task_weight=10.0))
    assert first.step == 3
    resumed = train_weight_diffusion(_task_config(dataset, base, tmp_path / "resumed", steps=6, objective="task",
                                                  task_weight=10.0))
    assert resumed.resumed_from == 3
    c = WeightDiffusionModel.load(resumed.uri).denoiser.state_dict()
    for k in b:
        torch.testing.assert_close(b[k], c[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"different config \(objective\)"):
        train_weight_diffusion(_task_config(dataset, base, tmp_path / "resumed", steps=8))
    # a residual generator scores retrieval + correction: its one k-nearest search feeds both
    train_weight_diffusion(_task_config(dataset, base, tmp_path / "residual", steps=2, objective="task",
                                        task_weight=10.0, residual_k=2))
    lr = json.loads((tmp_path / "residual" / "losses.json").read_text())
    assert len(lr) == 2 and all(math.isfinite(x) for x in lr) and lr[0] > 0.1
    # the SVD form with simulated inner steps: its index and its generated rows are rows in that form
    from weightzoo.tasks.finetune.gauge import svd_form

    svd = train_weight_diffusion(_task_config(dataset, base, tmp_path / "svd", steps=2, objective="task",
                                              task_weight=10.0, residual_k=2, form="svd", inner_steps=1))
    model = WeightDiffusionModel.load(svd.uri)
    gen = model.generate_attributes([r.attributes for r in rows[:2]])
    torch.testing.assert_close(svd_form(model.layout, gen), gen, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(svd_form(model.layout, model.retrieval.rows.float()), model.retrieval.rows.float(),
                               rtol=1e-4, atol=1e-5)
    ls = json.loads((tmp_path / "svd" / "losses.json").read_text())
    assert len(ls) == 2 and all(math.isfinite(x) for x in ls)


def test_task_objective_refuses_a_base_the_rows_were_not_trained_on(built, tmp_path: Path) -> None:
    _, dataset, _ = built
    other = make_base(str(tmp_path / "other-base"), steps=1, config=SkipUNetConfig(channels=(8, 16, 32), image_size=SIZE),
                      batch=2, pool=4, seed=3)
    with pytest.raises(InputError, match="scores rows through the base they were trained on") as e:
        train_weight_diffusion(_task_config(dataset, other, tmp_path / "gen", steps=2, objective="task"))
    assert "\n" not in str(e.value) and not (tmp_path / "gen").exists()
    assert len(Dataset(dataset).ids) == len(set(Dataset(dataset).ids)) == 5
