"""Recipes (tasks/identity/recipes/): the registry, Orthogonal Adaptation merging, Celeb Basis, and a
dataset of every recipe through shards, export and the PCA subspace.

Tiny model, a few steps, one torch thread. One module fixture builds a small committed dataset per
recipe with ``run_batch`` (the build path), which the dataset tests share.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from weightzoo.cli import main as cli
from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.batch import batch_id_for, run_batch
from weightzoo.tasks.finetune.export import export, merged_state_dict
from weightzoo.tasks.finetune.starts import load_lora_vector
from weightzoo.tasks.identity import recipes
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.engine import finetune_batch
from weightzoo.tasks.identity.perfusion_loader import load_perfusion, unload_perfusion
from weightzoo.tasks.identity.recipes.celeb_basis import KEY
from weightzoo.tasks.identity.recipes.perfusion import EMBEDDING, VALUE
from weightzoo.tasks.identity.synthetic import make_subjects, write_demo_manifest
from weightzoo.tasks.subspace.config import SubspaceConfig
from weightzoo.tasks.subspace.pca import fit_subspace, load_subspace

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # the interference measure is bench code
from interference import apply_lora, mean_kept, train_and_merge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"resolution": 32, "num_class_images": 2, "class_inference_steps": 2, "weights_dtype": "float32",
         "check_every": 5, "loss_window": 5}
METHODS = ("lora", "orthogonal", "lora_fa", "celeb_basis", "perfusion")
# A merged concept must keep at least this share of its single model's improvement over the base.
MERGE_MARGIN = 0.9


def _count(ds: Dataset, expected: int) -> None:
    ids = ds.metadata(["id"]).column("id").to_pylist()
    assert len(ids) == expected and len(set(ids)) == expected and len(ds) == expected


# -- registry ----------------------------------------------------------------------------------------------


def test_every_recipe_module_is_in_the_torch_free_name_registry() -> None:
    import importlib
    import pkgutil

    defined = {r.name: m.name for m in pkgutil.iter_modules(recipes.__path__)
               for r in getattr(importlib.import_module(f"{recipes.__name__}.{m.name}"), "RECIPES", ())}
    assert defined == {name: entry.module for name, entry in recipes.NAMES.items()}
    assert all(recipes.get(n).name == n for n in recipes.names())


def test_method_is_a_literal_of_registered_recipes_and_old_configs_keep_their_dump() -> None:
    assert {"lora", "orthogonal", "celeb_basis", "perfusion"} <= set(recipes.names())
    assert FinetuneConfig.model_fields["method"].annotation.__args__ == recipes.names()
    assert "recipe_options" not in FinetuneConfig().model_dump(mode="json")  # fingerprints of old datasets hold
    with pytest.raises(ValueError, match="recipe_options"):
        FinetuneConfig(method="lora", recipe_options={"words": 2})
    with pytest.raises(ValueError, match="basis_size"):
        FinetuneConfig(method="celeb_basis", recipe_options={"basis_size": 0})


# -- Orthogonal Adaptation: merge ----------------------------------------------------------------------------


def test_orthogonal_rows_merge_and_lora_rows_interfere(tiny_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    """Four concepts (own token each) trained alone, then summed: orthogonal keeps each concept, lora does not."""
    tokens = ["qzv", "xjk", "wvb", "kqz"]
    rows = [r.model_copy(update={"prompt": f"{t} person"})
            for r, t in zip(make_subjects(str(tmp_path), 4, images_per_subject=3, size=32), tokens, strict=True)]
    report = {}
    for method in ("orthogonal", "lora"):
        cfg = FinetuneConfig(method=method, steps=30, learning_rate=1e-3, prior_preservation=False, pack=4, **SMALL)
        report[method] = train_and_merge(tiny_pipe, rows, cfg, str(tmp_path), str(tmp_path / "cache"), draws=32)
    for r in report["orthogonal"]:
        assert r["single"] < r["base"] and r["kept"] >= MERGE_MARGIN, r
    assert mean_kept(report["orthogonal"]) > mean_kept(report["lora"]) + 0.3, report
    assert all(o["merged"] < lo["merged"] for o, lo in zip(report["orthogonal"], report["lora"], strict=True))


def test_merged_state_dict_is_the_exact_sum() -> None:
    from weightzoo.storage.layout import Layout

    g = torch.Generator().manual_seed(0)
    sd = {"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(3, 2, generator=g)}
    layout = Layout.from_state_dict(sd)
    rows = [(layout.flatten({k: torch.randn(v.shape, generator=g) for k, v in sd.items()}), {"alpha": a, "rank": 2})
            for a in (4.0, 1.0, 27.0)]
    merged = merged_state_dict(rows, layout, [1.0, 0.5, 2.0])
    want = sum(s * h["alpha"] / 2 * layout.unflatten(w)["m.lora_B.weight"] @ layout.unflatten(w)["m.lora_A.weight"]
               for (w, h), s in zip(rows, [1.0, 0.5, 2.0], strict=True))
    assert merged["unet.m.lora_A.weight"].shape == (6, 5)
    torch.testing.assert_close(merged["unet.m.lora_B.weight"] @ merged["unet.m.lora_A.weight"], want)


# -- a committed dataset per recipe --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """method → (dataset URI, cache dir): three subjects each, trained through ``run_batch``."""
    root = tmp_path_factory.mktemp("recipes")
    manifest = write_demo_manifest(str(root / "data"), 3, images_per_subject=2, size=32)
    ids = [f"subject-{i:05d}" for i in range(3)]
    out = {}
    for method in METHODS:
        cfg = FinetuneConfig(method=method, steps=4, learning_rate=1e-2, pack=3, **SMALL)
        ds, cache = str(root / method), str(root / method / "cache")
        outcome = run_batch(batch_id_for(ids), ids, manifest, str(tiny_base), ds, cfg, cache_dir=cache)
        assert sorted(outcome.committed) == ids, outcome
        out[method] = (ds, cache)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_fit_subspace_runs_on_a_dataset_of_each_recipe(datasets: dict, method: str, tmp_path: Path) -> None:
    ds = Dataset(datasets[method][0])
    result = fit_subspace(ds.uri, str(tmp_path / "sub"), SubspaceConfig(components=2, device="cpu"))
    sub = load_subspace(result.uri)
    assert result.rows == 3 and sub.k == 2 and sub.layout == ds.layout
    _count(ds, 3)


def test_merge_command_writes_a_lora_diffusers_loads(datasets: dict, tiny_base: Path, tmp_path: Path) -> None:
    uri = datasets["orthogonal"][0]
    ds = Dataset(uri)
    ids = ds.ids[:2]
    out = tmp_path / "merged.safetensors"
    assert cli(["merge", "--dataset", uri, "--ids", *ids, "--out", str(out)]) == 0
    rows = [ds.row(i) for i in ids]
    want = merged_state_dict([(w, m["hparams"]) for m, w in rows], ds.layout)
    file = load_file(str(out))
    assert file.keys() == want.keys() and all(torch.equal(file[k], want[k]) for k in want)
    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, ehs = torch.tensor([50, 700]), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, t, ehs).sample
        packed = apply_lora(pipe.unet, want)  # the rank-2 sum injected directly
        summed = pipe.unet(x, t, ehs).sample
        packed.remove()
        pipe.load_lora_weights(str(out))
        loaded = pipe.unet(x, t, ehs).sample
    torch.testing.assert_close(loaded, summed, rtol=1e-4, atol=1e-4)
    assert (loaded - base).abs().max() > 1e-3
    assert cli(["merge", "--dataset", datasets["celeb_basis"][0], "--ids", ids[0], "--out", str(out)]) == 2
    _count(ds, 3)


# -- LoRA-FA: A fixed by the layout, rows hold B -------------------------------------------------------------


def _unet_out(pipe: StableDiffusionPipeline) -> torch.Tensor:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([50, 700]), ehs).sample


def test_lora_fa_rows_hold_b_and_export_merge_sample_edit_load_in_diffusers(
    datasets: dict, tiny_base: Path, tmp_path: Path
) -> None:
    from weightzoo.tasks.identity.recipes.lora import fa_init
    from weightzoo.tasks.subspace import w2w

    uri, cache = datasets["lora_fa"]
    ds = Dataset(uri)
    layout = ds.layout
    assert layout.keys and all(k.endswith(".lora_B.weight") for k in layout.keys)
    assert [f.key for f in layout.fixed] == [k.replace("lora_B", "lora_A") for k in layout.keys]
    meta, w = ds.row(ds.ids[0])
    assert w.shape == (layout.numel,) and meta["method"] == "lora_fa"
    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared
    cfg, recipe = FinetuneConfig(method="lora_fa", **SMALL), recipes.get("lora_fa")
    for f in layout.fixed:  # A rebuilt from the footer's layout is the A the row was trained with, bit for bit
        name = f.key.removesuffix(".lora_A.weight")
        assert torch.equal(layout.unflatten(w)[f.key], fa_init(name, pipe.unet.get_submodule(name), ["x"], cfg)[0])
    sd, scale = layout.unflatten(w), meta["hparams"]["alpha"] / meta["hparams"]["rank"]
    deltas = w2w.lora_deltas(layout, torch.as_tensor(w).float(), scale)  # what invert applies
    assert deltas.keys() == {k.replace("lora_B.", "") for k in layout.keys}
    for k in layout.keys:
        torch.testing.assert_close(deltas[k.replace("lora_B.", "")], scale * sd[k].float() @ sd[k.replace("lora_B", "lora_A")])
    row = make_subjects(str(tmp_path / "s"), 1, images_per_subject=1, size=32)[0]
    with recipe.attach(pipe, cfg, [row], recipe.prepare(pipe, cfg, [row], cache)) as adapters:
        adapters.load_slot(0, layout.unflatten(torch.as_tensor(w)))
        trained = _unet_out(pipe)
    path = export(w, layout, meta["hparams"], str(tmp_path / "fa.safetensors"))
    pipe.load_lora_weights(path)
    torch.testing.assert_close(_unet_out(pipe), trained, rtol=1e-4, atol=1e-4)
    pipe.unload_lora_weights()
    base = _unet_out(pipe)
    assert cli(["merge", "--dataset", uri, "--ids", *ds.ids[:2], "--out", str(tmp_path / "m.safetensors")]) == 0
    pipe.load_lora_weights(str(tmp_path / "m.safetensors"))
    assert (_unet_out(pipe) - base).abs().max() > 1e-4
    pipe.unload_lora_weights()
    sub = load_subspace(fit_subspace(uri, str(tmp_path / "sub"), SubspaceConfig(components=2, device="cpu")).uri)
    sampled = w2w.sample(sub, 1)[0][0]
    attribute = next(iter(meta["attributes"]))
    value = w2w.attribute_directions(sub, attribute)
    edited = w2w.edit(sub, w, w2w.edit_direction(sub, attribute, next(iter(value))), 1.0)
    for name, vector in (("sampled", sampled), ("edited", edited)):
        pipe.load_lora_weights(w2w.export(sub, vector, str(tmp_path / f"{name}.safetensors")))
        assert torch.isfinite(_unet_out(pipe)).all()
        pipe.unload_lora_weights()
        back = load_lora_vector(str(tmp_path / f"{name}.safetensors"), layout)  # the fixed A checked, B back
        torch.testing.assert_close(back, vector.float(), rtol=1e-6, atol=1e-7)
    _count(ds, 3)


# -- Celeb Basis ---------------------------------------------------------------------------------------------


def test_celeb_basis_row_has_1024_values_with_defaults(tiny_pipe: StableDiffusionPipeline) -> None:
    layout = recipes.get("celeb_basis").layout(tiny_pipe, FinetuneConfig(method="celeb_basis"))
    assert layout.numel == 1024 and layout.keys == (KEY,)


def test_celeb_basis_packed_equals_sequential(tiny_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    rows = make_subjects(str(tmp_path), 3, images_per_subject=2, size=32)
    cfg = FinetuneConfig(method="celeb_basis", steps=10, learning_rate=1e-2, pack=3, **SMALL)
    kw = {"base_uri": str(tmp_path), "cache_dir": str(tmp_path / "cache")}
    flags = [p.requires_grad for p in tiny_pipe.text_encoder.parameters()]
    packed = finetune_batch(tiny_pipe, rows, cfg, **kw)
    seq = finetune_batch(tiny_pipe, rows, cfg.model_copy(update={"pack": 1}), **kw)
    assert [p.requires_grad for p in tiny_pipe.text_encoder.parameters()] == flags  # the encoder is left as it was
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())
    assert len(list((tmp_path / "cache" / "celeb_basis").iterdir())) == 1  # fitted once, then read back
    for p, s in zip(packed.results, seq.results, strict=True):
        assert p.ok and s.ok and p.weights.abs().max() > 1e-3
        assert (p.weights - s.weights).norm() / p.weights.norm() < 1e-5, p.id
    assert (packed.results[0].weights - packed.results[1].weights).abs().max() > 1e-4


def test_celeb_basis_row_round_trips_and_its_export_changes_the_image(
    datasets: dict, tiny_base: Path, tmp_path: Path
) -> None:
    uri, _ = datasets["celeb_basis"]
    ds = Dataset(uri)
    meta, w = ds.row(ds.ids[0])
    assert meta["method"] == "celeb_basis" and ds.layout.numel == 1024 and w.shape == (1024,)
    path = export(w, ds.layout, meta["hparams"], str(tmp_path / "emb"))
    emb = load_file(path)
    assert list(emb) == ["<sks>"] and emb["<sks>"].shape == (2, 32)
    basis = load_file(meta["hparams"]["celeb_basis"]["uri"])
    coefficients = ds.layout.unflatten(w)[KEY].float()
    torch.testing.assert_close(emb["<sks>"], basis["mean"] + torch.einsum("wk,wkd->wd", coefficients, basis["dirs"]))

    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared

    def image(prompt: str) -> torch.Tensor:
        return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image("a photo of <sks> person")
    pipe.load_textual_inversion(path, token="<sks>")
    assert (image("a photo of <sks> person") - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="peft"):
        export(w, ds.layout, meta["hparams"], str(tmp_path / "p"), "peft")
    _count(ds, 3)


# -- Perfusion -----------------------------------------------------------------------------------------------


def test_perfusion_row_holds_the_embedding_and_every_cross_attention_value(tiny_pipe: StableDiffusionPipeline) -> None:
    layout = recipes.get("perfusion").layout(tiny_pipe, FinetuneConfig(method="perfusion"))
    cross = [n for n, _ in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_v")]
    assert set(layout.keys) == {EMBEDDING, *(n + VALUE for n in cross)}
    out = {n: tiny_pipe.unet.get_submodule(n).out_features for n in cross}
    assert layout.numel == 32 + sum(out.values())


def test_perfusion_packed_equals_sequential(tiny_pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    rows = make_subjects(str(tmp_path), 3, images_per_subject=2, size=32)
    cfg = FinetuneConfig(method="perfusion", steps=10, learning_rate=1e-2, pack=3, **SMALL)
    kw = {"base_uri": str(tmp_path), "cache_dir": str(tmp_path / "cache")}
    types = {n: type(m) for n, m in tiny_pipe.unet.named_modules()}
    packed = finetune_batch(tiny_pipe, rows, cfg, **kw)
    seq = finetune_batch(tiny_pipe, rows, cfg.model_copy(update={"pack": 1}), **kw)
    assert {n: type(m) for n, m in tiny_pipe.unet.named_modules()} == types  # every K/V projection put back
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())
    for p, s in zip(packed.results, seq.results, strict=True):
        assert p.ok and s.ok
        assert (p.weights - s.weights).norm() / p.weights.norm() < 1e-5, p.id


def test_perfusion_row_round_trips_and_its_loader_applies_the_trained_edit(
    datasets: dict, tiny_base: Path, tmp_path: Path
) -> None:
    uri, _ = datasets["perfusion"]
    ds = Dataset(uri)
    meta, w = ds.row(ds.ids[0])
    assert meta["method"] == "perfusion" and w.shape == (ds.layout.numel,)
    path = export(w, ds.layout, meta["hparams"], str(tmp_path / "perf"))
    saved = load_file(path)
    trained = ds.layout.unflatten(w)
    assert all(torch.equal(saved[k], trained[k].float()) for k in trained) and "cinv" in saved

    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared

    def image() -> torch.Tensor:
        return pipe("a photo of <sks> person", num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    replaced = load_perfusion(pipe, path, token="<sks>", class_word="person")
    assert len(replaced) == len([k for k in trained if k.endswith(VALUE)])
    edited = image()
    assert (edited - before).abs().max() > 1e-3
    unload_perfusion(pipe, replaced)
    assert (image() - edited).abs().max() > 1e-3  # processors restored (the token stays, as with any inversion)
    _count(ds, 3)



def test_perfusion_loader_reproduces_the_trained_unet(datasets: dict, tiny_base: Path, tmp_path: Path) -> None:
    """The exported file through ``load_perfusion`` gives the UNet the training adapters gave, on "<sks> person"."""
    uri, cache = datasets["perfusion"]
    ds = Dataset(uri)
    meta, w = ds.row(ds.ids[0])
    path = export(w, ds.layout, meta["hparams"], str(tmp_path / "perf.safetensors"))
    pipe = load_base(str(tiny_base))  # a fresh copy: tiny_pipe is shared
    row = make_subjects(str(tmp_path / "s"), 1, images_per_subject=1, size=32)[0]  # prompt "sks person"
    cfg = FinetuneConfig(method="perfusion", **SMALL)
    recipe = recipes.get("perfusion")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300])
    with torch.no_grad():
        with recipe.attach(pipe, cfg, [row], recipe.prepare(pipe, cfg, [row], cache)) as adapters:
            adapters.load_slot(0, ds.layout.unflatten(torch.as_tensor(w)))
            ehs = adapters.condition(torch.zeros(1, 77, 32), torch.tensor([0]))
            trained = pipe.unet(x, t, ehs).sample
        load_perfusion(pipe, path, token="<sks>", class_word="person")
        ids = pipe.tokenizer("<sks> person", padding="max_length", max_length=77, return_tensors="pt").input_ids
        loaded_ehs = pipe.text_encoder(ids)[0]
        loaded = pipe.unet(x, t, loaded_ehs).sample
    torch.testing.assert_close(loaded_ehs, ehs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-4)
