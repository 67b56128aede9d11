"""Synthetic subjects: deterministic, decodable, labelled from the documented sets, labels visible in pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import corrupt_image
from PIL import Image

from weightzoo.tasks.finetune.images import load_image, load_images
from weightzoo.tasks.finetune.manifest import load_and_validate
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity.synthetic import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    make_subjects,
    write_demo_manifest,
)

N = 24


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ManifestRow]]:
    out = tmp_path_factory.mktemp("demo")
    return out, make_subjects(str(out), N, images_per_subject=3, seed=7)


def _pixels(root: Path, rel: str) -> np.ndarray:
    return np.asarray(load_image(str(root / rel)), dtype=np.int16)


def test_rows_have_ids_prompts_relative_images_and_documented_attributes(demo: tuple[Path, list[ManifestRow]]) -> None:
    root, rows = demo
    assert [r.id for r in rows] == [f"subject-{i:05d}" for i in range(N)]
    for r in rows:
        assert (r.kind, r.prompt, r.class_prompt) == ("identity", "sks person", "person")
        assert r.images == [f"images/{r.id}/{k}.png" for k in range(3)]
        assert set(r.attributes) == set(ATTRIBUTES)
        assert all(r.attributes[name] in values for name, values in ATTRIBUTES.items())
    assert sorted(p.name for p in (root / "images" / rows[0].id).iterdir()) == ["0.png", "1.png", "2.png"]


def test_images_decode_as_rgb_of_the_requested_size(demo: tuple[Path, list[ManifestRow]], tmp_path: Path) -> None:
    root, rows = demo
    images = load_images(rows[0], str(root))
    assert [(im.mode, im.size) for im in images] == [("RGB", (64, 64))] * 3
    small = make_subjects(str(tmp_path), 1, images_per_subject=1, size=32)
    assert load_images(small[0], str(tmp_path))[0].size == (32, 32)


def test_same_seed_gives_the_same_subjects_and_pixels(demo: tuple[Path, list[ManifestRow]], tmp_path: Path) -> None:
    root, rows = demo
    again = make_subjects(str(tmp_path), N, images_per_subject=3, seed=7)
    assert again == rows
    for r in rows[:5]:
        for rel in r.images:
            assert np.array_equal(_pixels(root, rel), _pixels(tmp_path, rel))


def test_subject_i_does_not_depend_on_n_and_seeds_differ(demo: tuple[Path, list[ManifestRow]], tmp_path: Path) -> None:
    root, rows = demo
    fewer = make_subjects(str(tmp_path / "fewer"), 3, images_per_subject=3, seed=7)
    assert fewer == rows[:3]
    assert np.array_equal(_pixels(root, rows[2].images[1]), _pixels(tmp_path / "fewer", rows[2].images[1]))
    other = make_subjects(str(tmp_path / "other"), N, images_per_subject=3, seed=8)
    assert [r.attributes for r in other] != [r.attributes for r in rows]


def test_images_of_one_subject_differ_but_are_closer_than_other_subjects(demo: tuple[Path, list[ManifestRow]]) -> None:
    root, rows = demo
    same, different = [], []
    for a in rows[:8]:
        first, second = (_pixels(root, rel) for rel in a.images[:2])
        assert not np.array_equal(first, second)  # jitter: not one picture copied
        same.append(np.abs(first - second).mean())
        for b in rows[:8]:
            if b.attributes != a.attributes:
                different.append(np.abs(first - _pixels(root, b.images[0])).mean())
    assert np.median(same) < np.median(different)


def test_colour_and_background_labels_are_what_the_pixels_show(demo: tuple[Path, list[ManifestRow]]) -> None:
    """The labels are ground truth for edit directions, so they must match the drawing."""
    root, rows = demo
    names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in names], dtype=np.int16)
    for r in rows:
        px = _pixels(root, r.images[0])
        corners = np.stack([px[0, 0], px[0, -1], px[-1, 0], px[-1, -1]])
        want_bg = np.array(BACKGROUNDS[r.attributes["background"]])
        assert np.abs(corners - want_bg).max() <= 15, r.id
        # the face colour is the palette colour most pixels lie close to
        dist = np.abs(px.reshape(-1, 1, 3) - palette[None]).sum(-1)
        close = (dist <= 45).sum(0)
        assert names[int(close.argmax())] == r.attributes["colour"], r.id
        assert close.max() > 0.03 * px.shape[0] * px.shape[1], r.id


def test_all_attribute_values_occur(tmp_path: Path) -> None:
    rows = make_subjects(str(tmp_path), 60, images_per_subject=1)
    for name, values in ATTRIBUTES.items():
        assert {r.attributes[name] for r in rows} == set(values), name


def test_demo_manifest_validates_and_corrupt_image_fails_only_on_full_decode(tmp_path: Path) -> None:
    path = write_demo_manifest(str(tmp_path), 4, images_per_subject=2, seed=3)
    assert path == str(tmp_path / "manifest.jsonl")
    rows = load_and_validate(path)
    assert rows == make_subjects(str(tmp_path / "again"), 4, images_per_subject=2, seed=3)

    target = tmp_path / rows[1].images[0]
    corrupt_image(target)
    with Image.open(target) as im:  # the header still reads ...
        assert im.size == (64, 64)
    with pytest.raises(OSError):  # ... but the pixels do not
        load_image(str(target))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images_per_subject >= 1"):
        make_subjects(str(tmp_path), 2, images_per_subject=0)
