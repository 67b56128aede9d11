"""Captioned image folders in (kohya .txt, HF imagefolder metadata.jsonl): a manifest, a build, and every
image trained with its own caption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from weightzoo.cli import main as cli
from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.denoise import encode_sd_prompt
from weightzoo.tasks.identity.engine import image_texts, prepare
from weightzoo.tasks.identity.synthetic import make_subjects

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kohya_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four subject folders of three drawn images: kohya names and .txt captions, one imagefolder with
    metadata.jsonl, labels in attributes.json."""
    drawn = tmp_path_factory.mktemp("drawn")
    rows = make_subjects(str(drawn), 4, images_per_subject=3, seed=0, size=32)
    root = tmp_path_factory.mktemp("kohya")
    for n, row in enumerate(rows):
        folder = root / (f"10_ohwx {['dog', 'cat', 'toy', 'cup'][n]}" if n < 3 else "plain-subject")
        folder.mkdir()
        meta = []
        for i, image in enumerate(row.images):
            shutil.copy(drawn / image, folder / f"img{i}.png")
            caption = f"ohwx {row.attributes['shape']} number {i} on a {row.attributes['background']} background"
            if n < 3:
                (folder / f"img{i}.txt").write_text(caption + "\n")
            else:
                meta.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
        if meta:
            (folder / "metadata.jsonl").write_text("\n".join(meta) + "\n")
        (folder / "attributes.json").write_text(json.dumps(row.attributes))
    return root


def test_a_kohya_folder_builds_end_to_end(kohya_folder: Path, tiny_base: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "manifest.jsonl"
    assert cli(["manifest", "--from-folder", str(kohya_folder), "--out", str(manifest)]) == 0
    assert "4 rows, 12 captioned images" in capsys.readouterr().out
    rows = {r.id: r for r in read_manifest(str(manifest))}
    assert set(rows) == {"10_ohwx-dog", "10_ohwx-cat", "10_ohwx-toy", "plain-subject"}
    dog = rows["10_ohwx-dog"]
    assert (dog.prompt, dog.class_prompt) == ("ohwx dog", "dog") and dog.attributes["shape"]
    assert dog.captions[1].startswith("ohwx") and "number 1" in dog.captions[1]
    assert rows["plain-subject"].prompt == "sks person" and "number 2" in rows["plain-subject"].captions[2]

    dataset = tmp_path / "ds"
    args = ["build", "--manifest", str(manifest), "--base", str(tiny_base), "--dataset", str(dataset),
            "--finetune-json", json.dumps({"steps": 2, "prior_preservation": False, "pack": 4, "resolution": 32})]
    assert cli(args) == 0
    ds = Dataset(str(dataset))
    assert sorted(ds.ids) == sorted(rows) and len(set(ds.ids)) == 4


def test_each_image_trains_with_its_own_caption(kohya_folder: Path, tiny_pipe, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    assert cli(["manifest", "--from-folder", str(kohya_folder), "--out", str(manifest)]) == 0
    rows = read_manifest(str(manifest))
    cfg = FinetuneConfig(steps=6, resolution=32, prior_preservation=False, pack=4)
    prepared = prepare(tiny_pipe, rows, cfg)
    with prepared.open_pack(rows) as pack:
        inputs, offsets = pack.inputs, [0, 3, 6, 9]  # three images a row, no class images
        active = list(range(len(rows)))
        act_t = torch.arange(len(rows))
        for step in range(cfg.steps):
            ehs = inputs.batch(step, active, act_t)[3]["encoder_hidden_states"]
            for k, row in enumerate(rows):
                image = int(inputs.index[step, k, 0]) - offsets[k]
                text = image_texts(row, 3)[image]
                assert row.captions[image] in text and text.startswith(row.prompt)
                torch.testing.assert_close(ehs[k], encode_sd_prompt(tiny_pipe, text)[0])
    assert len({int(i) for i in inputs.index[:, 0, 0]}) > 1  # the steps did visit several images of a row


def test_a_missing_caption_is_named_in_one_line(kohya_folder: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(kohya_folder, broken)
    (broken / "10_ohwx cat" / "img2.txt").unlink()
    out = tmp_path / "m.jsonl"
    assert cli(["manifest", "--from-folder", str(broken), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10_ohwx cat/img2.png: no caption" in err[0], err
    assert not out.exists()
    (broken / "10_ohwx cat" / "img2.txt").write_text("  \n")
    assert cli(["manifest", "--from-folder", str(broken), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10_ohwx cat/img2.png: the caption is empty" in err[0], err
    assert not out.exists()
