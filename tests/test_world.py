"""The world: the reader reads every render exactly, the world base is a real diffusers pipeline that
loads offline, its manifests validate, and a LoRA trained on a world identity previews through diffusers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from weightzoo.tasks.finetune.images import load_images
from weightzoo.tasks.finetune.manifest import load_and_validate
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.world.base import (
    HASHES_FILE,
    INFO_FILE,
    SHIPPED,
    build_world_base,
    check_world_base,
    shipped_base,
)
from weightzoo.tasks.world.config import VERSION, WorldBaseSettings
from weightzoo.tasks.world.evaluate import prompt_accuracy
from weightzoo.tasks.world.identities import PROMPT, preview_grid, world_finetune_config, write_world_manifest
from weightzoo.tasks.world.render import (
    ATTRIBUTES,
    WORLD_RESOLUTION,
    caption,
    is_valid,
    jitter,
    nominal,
    random_subject,
    read,
    render,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [WORLD_RESOLUTION, 64])
def test_reader_reads_every_render_exactly(size: int) -> None:
    rng = random.Random(1)
    subjects = [random_subject(rng) for _ in range(500)]
    misread = [(s.labels, got) for s in subjects if (got := read(render(s, size, jitter(rng)))) != s.labels]
    assert misread == []
    assert all(is_valid(render(s, size)) for s in subjects)


def test_every_label_combination_round_trips_and_blank_pictures_are_invalid() -> None:
    import itertools

    combos = [dict(zip(ATTRIBUTES, values, strict=True)) for values in itertools.product(*ATTRIBUTES.values())]
    assert len(combos) == 144
    assert [c for c in combos if read(render(nominal(c))) != c] == []
    blank = Image.new("RGB", (WORLD_RESOLUTION,) * 2, (240, 240, 240))
    assert not is_valid(blank) and read(blank)["shape"] == "none"
    assert caption(combos[1]) == "a photo of a small red circle on black"
    assert caption(combos[1], keep={"colour"}) == "a photo of a red subject"


@pytest.fixture(scope="module")
def world_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world_base(tmp_path_factory.mktemp("world"), seed=0, steps=3, vae_steps=3, pool=64)


def test_world_base_is_a_diffusers_pipeline_that_loads_offline_and_is_cached(world_base: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(world_base, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == WORLD_RESOLUTION
    assert pipe.tokenizer.tokenize("a red striped circle") == ["a</w>", "red</w>", "striped</w>", "circle</w>"]
    assert len(pipe.tokenizer.tokenize("sks")) == 3  # the rare token stays bytes
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red circle on white", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (WORLD_RESOLUTION, WORLD_RESOLUTION)
    before = (world_base / INFO_FILE).stat().st_mtime_ns
    assert build_world_base(world_base.parent, seed=0, steps=3, vae_steps=3, pool=64) == world_base
    assert (world_base / INFO_FILE).stat().st_mtime_ns == before
    hashes = json.loads((world_base / HASHES_FILE).read_text())  # a pretrained base records its files' hashes
    assert set(hashes) == {p.relative_to(world_base).as_posix() for p in world_base.rglob("*")
                           if p.is_file() and p.name != HASHES_FILE}
    check_world_base(world_base)


def test_world_base_is_reproducible_from_its_seed(world_base: Path, tmp_path: Path) -> None:
    again = build_world_base(tmp_path, seed=0, steps=3, vae_steps=3, pool=64)
    for part in ("unet", "vae", "text_encoder"):
        (first,) = (world_base / part).glob("*.safetensors")
        assert (again / part / first.name).read_bytes() == first.read_bytes()


def test_the_shipped_default_base_is_copied_not_pretrained_and_draws_what_it_is_told(tmp_path: Path) -> None:
    """The default settings' base ships with the package: made by this version with these settings, copied
    byte for byte in place of a ~20 min pretraining, and it draws a prompt's colour, size and background."""
    settings = WorldBaseSettings()
    assert shipped_base(settings) == SHIPPED and shipped_base(WorldBaseSettings(steps=settings.steps + 1)) is None
    info = json.loads((SHIPPED / INFO_FILE).read_text())
    assert info["version"] == VERSION and {k: info[k] for k in settings.as_dict()} == settings.as_dict()
    base = build_world_base(tmp_path, **settings.as_dict())
    assert base.name == settings.name()
    for f in SHIPPED.rglob("*"):
        assert f.is_dir() or (base / f.relative_to(SHIPPED)).read_bytes() == f.read_bytes()
    pipe = load_base(str(base))
    pipe.set_progress_bar_config(disable=True)
    acc = prompt_accuracy(pipe, n=8)
    assert min(acc["colour"], acc["size"], acc["background"]) >= 0.75, acc
    assert sorted(p.name for p in tmp_path.iterdir()) == [base.name]  # no temporary folder left


def test_world_manifest_validates_and_its_images_read_as_its_labels(tmp_path: Path) -> None:
    manifest = write_world_manifest(str(tmp_path), 6, images_per_identity=3, seed=2)
    rows = load_and_validate(manifest)
    assert len(rows) == 6 and len({r.id for r in rows}) == 6
    for row in rows:
        assert row.prompt == PROMPT and set(row.attributes) == set(ATTRIBUTES)
        assert all(read(im) == row.attributes for im in load_images(row, str(tmp_path)))


def test_a_world_lora_trains_and_previews_through_diffusers(world_base: Path, tmp_path: Path) -> None:
    """One trained row: its preview grid, the PNG beside its exported file (--preview) and the card's
    previews (publish --preview), all through diffusers' own LoRA loading."""
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.batch import run_batch
    from weightzoo.tasks.finetune.export import export_lora
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.world.previews import card_previews, lora_file_preview

    pipe = load_base(str(world_base))
    manifest = write_world_manifest(str(tmp_path / "m"), 1, images_per_identity=2)
    rows = load_and_validate(manifest)
    config = world_finetune_config(steps=2, num_class_images=2, class_inference_steps=2, pack=1)
    run_batch("b-1", [rows[0].id], manifest, str(world_base), str(tmp_path / "ds"), config)
    ds = Dataset(str(tmp_path / "ds"))
    meta, weights = ds.row(rows[0].id)
    scores = preview_grid(pipe, rows[0], weights, ds.layout, meta["hparams"],
                          load_images(rows[0], str(tmp_path / "m")), str(tmp_path / "grid.png"), n=2)
    assert set(scores) == {"without", "with"} and all(0.0 <= s <= 1.0 for s in scores.values())
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width >= 2 * 96 and grid.height > 3 * 96
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())  # the LoRA was unloaded

    lora = export_lora(torch.as_tensor(weights), ds.layout, meta["hparams"], str(tmp_path / "lora"))
    assert lora_file_preview(str(world_base), lora, PROMPT, n=2) == lora.rsplit(".", 1)[0] + ".preview.png"
    assert Image.open(lora.rsplit(".", 1)[0] + ".preview.png").width == 2 * 100
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("# card\n")
    for _ in range(2):  # a second publish replaces the section, never stacks it
        (grid_info,) = card_previews(str(world_base), str(tmp_path / "ds"), str(card), limit=4)
    text = (card / "README.md").read_text()
    assert text.startswith("# card\n") and text.count("## Previews") == 1
    assert f"![{rows[0].id}](previews/{rows[0].id}.png)" in text and Path(grid_info["png"]).exists()
    assert len(ds.ids) == 1 and len(set(ds.ids)) == 1


def test_base_command_makes_each_kind_once_and_refuses_other_settings(tmp_path: Path, capsys) -> None:
    from weightzoo.cli import main

    args = ["base", "--out", str(tmp_path / "w"), "--steps", "1", "--vae-steps", "1", "--pool", "8"]
    assert main(args) == 0
    info = json.loads((tmp_path / "w" / INFO_FILE).read_text())
    assert (info["steps"], info["vae_steps"], info["pool"], info["seed"]) == (1, 1, 8, 0)
    before = (tmp_path / "w" / INFO_FILE).stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "w" / INFO_FILE).stat().st_mtime_ns == before  # kept
    capsys.readouterr()
    assert main([*args[:-1], "9"]) == 2
    assert "holds a world base made with" in capsys.readouterr().err
    assert main(["base", "--out", str(tmp_path / "x"), "--pool", "0"]) == 2
    assert capsys.readouterr().err == "weightzoo base: error: --pool must be at least 1, got 0\n"
    (tmp_path / "f").write_text("not a base")  # an --out that is a file: one line, nothing written
    assert main(["base", "--out", str(tmp_path / "f")]) == 2
    assert "is a file or a folder that holds something other than a world base" in capsys.readouterr().err
    (tmp_path / "f").unlink()
    assert main(["base", "--kind", "toy", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model_index.json").exists() and not (tmp_path / "t" / INFO_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "w"]


def test_subspace_traversal_and_edit_previews_are_drawn(world_base: Path, tmp_path: Path, capsys) -> None:
    """fit-subspace --preview draws each top component at -2, 0, +2 std; edit --preview draws the row before
    and after its edit side by side; both through diffusers' own LoRA loading."""
    from weightzoo.cli import main
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.batch import run_batch

    manifest = write_world_manifest(str(tmp_path / "m"), 4, images_per_identity=1)
    rows = load_and_validate(manifest)
    config = world_finetune_config(steps=2, prior_preservation=False, pack=4)
    run_batch("b-1", [r.id for r in rows], manifest, str(world_base), str(tmp_path / "ds"), config)
    sub = str(tmp_path / "sub")
    assert main(["fit-subspace", "--dataset", str(tmp_path / "ds"), "--out", sub, "-k", "2", "--no-prefect",
                 "--preview", str(world_base)]) == 0
    traversal = Image.open(tmp_path / "sub" / "traversal.png")
    assert traversal.width == 3 * 100 and traversal.height == 2 * (96 + 14)  # 2 components x 3 strengths
    attribute = next(a for a in rows[0].attributes if len({r.attributes[a] for r in rows}) > 1)
    target = next(r.attributes[attribute] for r in rows if r.attributes[attribute] != rows[0].attributes[attribute])
    out = str(tmp_path / "edit.safetensors")
    capsys.readouterr()
    assert main(["edit", "--subspace", sub, "--id", rows[0].id, "--attribute", f"{attribute}={target}",
                 "--out", out, "--preview", str(world_base)]) == 0
    printed = capsys.readouterr()
    assert f"only 1 of 4 fitted rows are {attribute}={target}" in printed.err or "fitted rows are" in printed.err
    preview = Image.open(tmp_path / "edit.preview.png")
    assert preview.height == 2 * (96 + 14) and preview.width == 4 * 100
    assert sorted(Dataset(str(tmp_path / "ds")).ids) == sorted(r.id for r in rows)
