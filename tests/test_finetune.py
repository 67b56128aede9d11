"""The fine-tune engine on the tiny model (CPU): training, failures, packing, export, methods.

Runs at 32 px (16x16 latents) with a few steps, so the whole module stays around a minute on two
shared cores. One packed run of four subjects (module fixture) feeds several tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import corrupt_image
from PIL import Image
from safetensors.torch import load_file

from weightzoo.storage.card import Recipe
from weightzoo.tasks.finetune.driver import clip_per_item
from weightzoo.tasks.finetune.export import WEIGHT_NAME, export_lora
from weightzoo.tasks.finetune.packed_lora import PackedLoRA, find_targets
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity import engine as finetune
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.identity.class_images import class_latents
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.engine import finetune_batch
from weightzoo.tasks.identity.recipes.lora import lora_layout
from weightzoo.tasks.identity.synthetic import make_subjects

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is steadiest

# lr 1e-3 (10x the default) so 20 steps visibly move the loss. Not higher: at 5e-3 training is chaotic
# enough that float noise (conv kernels pick different accumulation orders per batch size) grows to
# ~1e-2 relative in 30 steps, which would hide a real packing bug. fp32 rows for exact comparisons.
CFG = FinetuneConfig(
    steps=20, learning_rate=1e-3, resolution=32, num_class_images=2, class_inference_steps=2,
    weights_dtype="float32", check_every=5, loss_window=5, pack=4,
)




@pytest.fixture(scope="module")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    root = tmp_path_factory.mktemp("subjects")
    return str(root), make_subjects(str(root), 4, images_per_subject=3, seed=0, size=32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _snapshot(unet: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
        "types": {n: type(m) for n, m in unet.named_modules()},
        "grad": [p.requires_grad for p in unet.parameters()],
        "training": unet.training,
    }


@pytest.fixture(scope="module")
def packed_run(tiny_pipe: StableDiffusionPipeline, subjects: tuple[str, list], cache_dir: str) -> tuple:
    """Four subjects trained in one pack of 4; also the pipeline's state before and after."""
    root, rows = subjects
    before = _snapshot(tiny_pipe.unet)
    calls: list[tuple[int, int]] = []
    result = finetune_batch(tiny_pipe, rows, CFG, base_uri=root, cache_dir=cache_dir,
                            progress=lambda d, t, *loss: calls.append((d, t)))
    return result, before, _snapshot(tiny_pipe.unet), calls


def test_batch_of_four_trains_and_loss_drops(packed_run: tuple, tiny_pipe: StableDiffusionPipeline) -> None:
    result, _, _, calls = packed_run
    assert result.layout == lora_layout(tiny_pipe, CFG)
    assert result.hparams["method"] == "lora" and result.hparams["rank"] == 1 and result.hparams["alpha"] == 27.0
    assert result.hparams["resolution"] == 32
    for r in result.results:
        assert r.ok and r.reason is None and r.steps == CFG.steps
        assert r.weights.shape == (result.layout.numel,) and r.weights.dtype == torch.float32
        assert torch.isfinite(r.weights).all()
        first, last = sum(r.loss_history[:5]) / 5, sum(r.loss_history[-5:]) / 5
        assert last < first, (r.id, first, last)
        assert r.loss == pytest.approx(last)
    # Different subjects, different weights; every lora_B moved off its zero init.
    w = torch.stack([r.weights for r in result.results])
    assert (w[0] - w[1]).abs().max() > 1e-3
    sd = result.layout.unflatten(w[0])
    assert all(t.abs().max() > 0 for k, t in sd.items() if k.endswith("lora_B.weight"))
    assert calls[-1] == (4 * CFG.steps, 4 * CFG.steps)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_pipeline_is_left_unmodified(packed_run: tuple) -> None:
    _, before, after, _ = packed_run
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"] and after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


def test_packed_equals_sequential(
    packed_run: tuple, tiny_pipe: StableDiffusionPipeline, subjects: tuple[str, list], cache_dir: str
) -> None:
    root, rows = subjects
    packed, *_ = packed_run
    cached = list((Path(cache_dir) / "class_latents").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in cached]
    seq = finetune_batch(tiny_pipe, rows, CFG.model_copy(update={"pack": 1}), base_uri=root, cache_dir=cache_dir)
    # The shared class latents were generated once (first run) and only read back here.
    assert len(cached) == 1 and [f.stat().st_mtime_ns for f in cached] == mtimes
    for p, s in zip(packed.results, seq.results, strict=True):
        assert p.id == s.id and s.ok
        rel = (p.weights - s.weights).norm() / p.weights.norm()
        assert rel < 1e-5, (p.id, float(rel))
        assert p.loss == pytest.approx(s.loss, rel=1e-5)


def test_stacked_adamw_and_clipping_are_per_item() -> None:
    """The optimiser claim in isolation: K adapters trained stacked == each trained alone (with clipping)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).requires_grad_(False)
    model = torch.nn.Sequential(base)
    data = [torch.randn(8, 3, 6) * (i + 1) for i in range(3)]  # different scales, so clipping differs per item
    init = torch.randn(1, 2, 6)

    def train(slots: list[int]) -> list[dict[str, torch.Tensor]]:
        with PackedLoRA(model, ["0"], len(slots), 2, 2.0, lambda n, m: init.expand(len(slots), -1, -1)) as p:
            opt = torch.optim.AdamW(list(p.parameters()), lr=0.05, weight_decay=0.1)
            for step in range(8):
                x = torch.cat([data[s][step] for s in slots])  # item-major groups of 3 samples
                out = model(x).view(len(slots), 3, -1)
                torch.stack([(o - 1).pow(2).mean() for o in out]).sum().backward()
                clip_per_item(p.parameters(), len(slots), 0.5)
                opt.step()
                opt.zero_grad()
            return [p.state_dict_for(i) for i in range(len(slots))]

    stacked = train([0, 1, 2])
    for i in range(3):
        alone = train([i])[0]
        for k in alone:
            torch.testing.assert_close(stacked[i][k], alone[k], rtol=1e-5, atol=1e-6)
    assert isinstance(model[0], torch.nn.Linear)  # removed on exit


def test_bad_image_and_nan_loss_are_recorded_failures(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = make_subjects(str(tmp_path), 4, images_per_subject=2, seed=1, size=32)
    corrupt_image(tmp_path / rows[1].images[0])
    nan_id = rows[2].id
    real = finetune.instance_latents

    def poisoned(pipe: StableDiffusionPipeline, row: ManifestRow, images: list, resolution: int) -> torch.Tensor:
        lat = real(pipe, row, images, resolution)
        return torch.full_like(lat, math.nan) if row.id == nan_id else lat

    monkeypatch.setattr(finetune, "instance_latents", poisoned)
    cfg = CFG.model_copy(update={"steps": 10})
    out = finetune_batch(tiny_pipe, rows, cfg, base_uri=str(tmp_path), cache_dir=cache_dir)
    by_id = {r.id: r for r in out.results}
    assert [r.id for r in out.results] == [r.id for r in rows]
    bad = by_id[rows[1].id]
    assert not bad.ok and bad.weights is None and bad.reason.startswith("images:")
    nan = by_id[nan_id]
    assert not nan.ok and nan.weights is None and "non-finite loss" in nan.reason and nan.steps == 1
    for row in (rows[0], rows[3]):
        r = by_id[row.id]
        assert r.ok and r.steps == 10 and torch.isfinite(r.weights).all()
    # The survivors trained exactly as they would have without the NaN row in their pack.
    alone = finetune_batch(tiny_pipe, [rows[0]], cfg, base_uri=str(tmp_path), cache_dir=cache_dir).results[0]
    assert (alone.weights - by_id[rows[0].id].weights).norm() / alone.weights.norm() < 1e-5


def test_class_latents_from_a_folder_are_cached_per_content(
    tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 48), (60 * i, 120, 30)).save(folder / f"{i}.png")
    kw = {"n": 2, "resolution": 32, "steps": 1, "guidance": 1.0, "seed": 0, "folder": str(folder),
          "cache_dir": str(tmp_path / "cache"), "fingerprint": lambda: "fixed"}
    first = class_latents(tiny_pipe, "person", **kw)
    assert first.shape == (2, 4, 16, 16)
    torch.testing.assert_close(class_latents(tiny_pipe, "person", **kw), first, rtol=0, atol=0)
    assert len(list((tmp_path / "cache" / "class_latents").iterdir())) == 1
    Image.new("RGB", (40, 48), (255, 0, 0)).save(folder / "0.png")  # new content, new key
    changed = class_latents(tiny_pipe, "person", **kw)
    assert len(list((tmp_path / "cache" / "class_latents").iterdir())) == 2
    assert not torch.equal(changed[0], first[0]) and torch.equal(changed[1], first[1])


def test_out_of_memory_splits_the_pack_then_fails_alone(
    tiny_pipe: StableDiffusionPipeline, subjects: tuple[str, list], cache_dir: str
) -> None:
    root, rows = subjects
    limit = {"samples": 4}  # "fits" at most two rows (instance + class sample each)

    def fake_oom(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and args[0].shape[0] > limit["samples"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")

    handle = tiny_pipe.unet.register_forward_pre_hook(fake_oom, with_kwargs=True)
    try:
        cfg = CFG.model_copy(update={"steps": 3})
        split = finetune_batch(tiny_pipe, rows[:3], cfg, base_uri=root, cache_dir=cache_dir)
        limit["samples"] = 0
        failed = finetune_batch(tiny_pipe, rows[:2], cfg, base_uri=root, cache_dir=cache_dir)
    finally:
        handle.remove()
    assert all(r.ok for r in split.results)
    assert all(not r.ok and "out of memory at pack size 1" in r.reason for r in failed.results)
    assert all(isinstance(m, torch.nn.Linear) for n, m in tiny_pipe.unet.named_modules() if n.endswith("to_q"))


def test_export_loads_in_diffusers_and_reproduces_the_trained_unet(
    packed_run: tuple, tiny_base: Path, tmp_path: Path
) -> None:
    result, *_ = packed_run
    row = result.results[0]
    path = export_lora(row.weights, result.layout, result.hparams, str(tmp_path / "lora"))
    assert path.endswith(WEIGHT_NAME)
    keys = load_file(path).keys()
    assert all(k.startswith("unet.") for k in keys) and len(keys) == len(result.layout.keys)

    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, ehs = torch.tensor([50, 700]), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    sd = result.layout.unflatten(row.weights)
    names = find_targets(pipe.unet, CFG.target_modules)
    with torch.no_grad():
        base_out = pipe.unet(x, t, ehs).sample
        with PackedLoRA(pipe.unet, names, 1, 1, 27.0, lambda n, m: torch.zeros(1, 1, m.in_features)) as packed:
            packed.load_slot(0, sd)
            trained_out = pipe.unet(x, t, ehs).sample
        pipe.load_lora_weights(path)
        loaded_out = pipe.unet(x, t, ehs).sample
    torch.testing.assert_close(loaded_out, trained_out, rtol=1e-4, atol=1e-4)
    assert (loaded_out - base_out).abs().max() > 1e-2

    def image() -> torch.Tensor:
        return pipe("sks person", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    with_lora = image()
    pipe.unload_lora_weights()
    assert (with_lora - image()).abs().max() > 1e-3


def test_orthogonal_method_fixes_a_and_models_sum(
    tiny_pipe: StableDiffusionPipeline, subjects: tuple[str, list], cache_dir: str
) -> None:
    root, rows = subjects
    cfg = CFG.model_copy(update={"method": "orthogonal", "steps": 8, "pack": 2})
    out = finetune_batch(tiny_pipe, rows[:2], cfg, base_uri=root, cache_dir=cache_dir)
    assert out.hparams["method"] == "orthogonal" and all(r.ok for r in out.results)
    sds = [out.layout.unflatten(r.weights) for r in out.results]
    separate = 0
    for name in find_targets(tiny_pipe.unet, cfg.target_modules):
        layer = tiny_pipe.unet.get_submodule(name)
        a_init = finetune.METHODS["orthogonal"].init_a(name, layer, [r.id for r in rows[:2]], cfg)
        a = [sd[f"{name}.lora_A.weight"] for sd in sds]
        b = [sd[f"{name}.lora_B.weight"] for sd in sds]
        torch.testing.assert_close(torch.stack(a), a_init)  # A never trained
        torch.testing.assert_close(a[0] @ a[0].T, torch.eye(cfg.rank), atol=1e-5, rtol=0)
        if not torch.equal(a[0], a[1]):  # different blocks of the same orthogonal basis
            separate += 1
            merged = b[0] @ a[0] + b[1] @ a[1]
            # Summing two models leaves each one's update intact on its own input subspace.
            torch.testing.assert_close(merged @ a[0].T, b[0], atol=1e-5, rtol=1e-4)
        assert b[0].abs().max() > 0
    assert separate >= len(sds[0]) // 2 // 2  # most layers got different blocks


def test_sd15_layout_matches_weights2weights() -> None:
    """SD 1.5's UNet (meta tensors, no memory) gives w2w's 99,648 values at rank 1, to_q/to_v."""
    from diffusers import UNet2DConditionModel

    from weightzoo.tasks.identity.base_model import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    assert lora_layout(SimpleNamespace(unet=unet), FinetuneConfig()).numel == 99_648
    cfg = FinetuneConfig(target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    assert lora_layout(SimpleNamespace(unet=unet), cfg).numel == 199_296


def test_init_weights_start_an_item_from_given_weights(
    packed_run: tuple, tiny_pipe: StableDiffusionPipeline, subjects: tuple[str, list]
) -> None:
    """One step at a negligible learning rate returns (almost) the starting point: given, or the shared init."""
    root, rows = subjects
    packed, *_ = packed_run
    given = packed.results[0].weights
    cfg = CFG.model_copy(update={"steps": 1, "learning_rate": 1e-12, "prior_preservation": False, "loss_window": 1})
    out = finetune_batch(tiny_pipe, rows[:2], cfg, base_uri=root, init_weights={rows[0].id: given})
    started, fresh = out.results
    assert started.ok and fresh.ok
    assert torch.allclose(started.weights, given, atol=1e-6)
    fresh_sd = out.layout.unflatten(fresh.weights)
    assert all(t.abs().max() < 1e-6 for k, t in fresh_sd.items() if k.endswith("lora_B.weight"))  # zero init
    assert out.hparams["prior_preservation"] is False


def test_old_config_keys_load_and_the_recipe_ignores_execution_fields() -> None:
    """Stored hparams with `batch_size` (images per step) still load; the dataset recipe keeps ignoring
    the execution fields, including those the shared TrainingConfig declares."""
    old = FinetuneConfig.model_validate({"batch_size": 2})
    assert old.images_per_step == 2 and "batch_size" not in old.model_dump()
    fast = old.model_copy(update={"pack": 8, "mixed_precision": "no", "check_every": 3, "compile": True})
    assert Recipe.of("diffusers-lora", "fp", old) == Recipe.of("diffusers-lora", "fp", fast)
    assert Recipe.of("diffusers-lora", "fp", old) != Recipe.of("diffusers-lora", "fp", FinetuneConfig())
