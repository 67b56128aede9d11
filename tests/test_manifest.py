"""Manifest reading (JSONL / CSV / Parquet), writing, and validation that reports every bad row at once."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import corrupt_image
from PIL import Image

from weightzoo.errors import InputError, NotFoundError
from weightzoo.tasks.finetune.images import ImageConfig, load_image, load_images
from weightzoo.tasks.finetune.manifest import load_and_validate, validate_manifest
from weightzoo.tasks.finetune.readers import read_manifest, read_raw_manifest, write_manifest
from weightzoo.tasks.finetune.row import (
    ManifestError,
    ManifestProblem,
    ManifestRow,
    image_uris,
    manifest_folder,
)
from weightzoo.tasks.identity.synthetic import make_subjects


@pytest.fixture
def subjects(tmp_path: Path) -> list[ManifestRow]:
    """Three good subjects with images under tmp_path/images, paths relative to tmp_path."""
    return make_subjects(str(tmp_path), 3, images_per_subject=2)


def _raw(row: ManifestRow, **changes: object) -> dict[str, object]:
    return {**row.model_dump(exclude_none=True), **changes}


# --- reading and writing -------------------------------------------------------------------------


def _write_csv(rows: list[ManifestRow], path: Path) -> None:
    """CSV as a person would write it: ';'-joined images; attributes alternate JSON and key=value."""
    lines = ["id,kind,prompt,class_prompt,images,attributes"]
    for i, r in enumerate(rows):
        attrs = json.dumps(r.attributes) if i % 2 else ";".join(f"{k}={v}" for k, v in r.attributes.items())
        cells = [r.id, r.kind, r.prompt, r.class_prompt, ";".join(r.images), attrs]
        lines.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
    path.write_text("\n".join(lines) + "\n")


def _write_parquet(rows: list[ManifestRow], path: Path) -> None:
    """Parquet with a list column for images and a map column for attributes, as a pipeline would write it."""
    schema = pa.schema([
        ("id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("class_prompt", pa.string()),
        ("images", pa.list_(pa.string())), ("image_dir", pa.string()), ("attributes", pa.map_(pa.string(), pa.string())),
    ])
    records = [{**r.model_dump(), "attributes": list(r.attributes.items())} for r in rows]
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def test_jsonl_csv_and_parquet_read_to_equal_rows(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    write_manifest(subjects, str(tmp_path / "m.jsonl"))
    _write_csv(subjects, tmp_path / "m.csv")
    _write_parquet(subjects, tmp_path / "m.parquet")
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        assert read_manifest(str(tmp_path / name)) == subjects, name
        assert load_and_validate(str(tmp_path / name)) == subjects, name


def test_csv_empty_cells_take_defaults_and_image_dir_lists_a_folder(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    (tmp_path / "m.csv").write_text(
        "id,kind,prompt,images,image_dir,attributes\n"
        "a,,,images/subject-00000/0.png; images/subject-00000/1.png,,\n"
        "b,concept,a sks dog,,images/subject-00001,\"{\"\"colour\"\": \"\"red\"\"}\"\n"
    )
    a, b = load_and_validate(str(tmp_path / "m.csv"))
    assert a == ManifestRow(id="a", images=["images/subject-00000/0.png", "images/subject-00000/1.png"])
    assert (b.kind, b.prompt, b.class_prompt, b.attributes) == ("concept", "a sks dog", "person", {"colour": "red"})
    assert image_uris(b, str(tmp_path)) == [
        str(tmp_path / "images/subject-00001/0.png"), str(tmp_path / "images/subject-00001/1.png")
    ]


def test_write_manifest_round_trips_and_replaces_whole(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    uri = str(tmp_path / "out" / "manifest.jsonl")
    assert write_manifest(subjects, uri) == uri
    write_manifest(subjects[:1], uri)
    assert read_manifest(uri) == subjects[:1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.jsonl"]  # no temporary left behind


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("{}\n")
    with pytest.raises(ValueError, match=r"cannot tell the manifest format .*\.jsonl"):
        read_manifest(str(tmp_path / "m.txt"))


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(
    tmp_path: Path, subjects: list[ManifestRow], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_manifest(subjects, str(tmp_path / "manifest.jsonl"))
    monkeypatch.chdir(tmp_path.parent)
    rows = load_and_validate(str(tmp_path / "manifest.jsonl"))
    assert image_uris(rows[0], manifest_folder(str(tmp_path / "manifest.jsonl")))[0] == str(
        tmp_path / "images/subject-00000/0.png"
    )
    assert [im.size for im in load_images(rows[0], str(tmp_path))] == [(64, 64), (64, 64)]
    # and a relative manifest path takes its folder relative to the cwd
    monkeypatch.chdir(tmp_path)
    assert load_and_validate("manifest.jsonl") == subjects
    assert manifest_folder("s3://bucket/sub/manifest.jsonl") == "s3://bucket/sub"


# --- validation: one clear message per kind of bad row --------------------------------------------


def _bad_cases(tmp_path: Path, good: ManifestRow) -> dict[str, tuple[dict[str, object], str]]:
    """Each kind of bad row (as raw dicts) with the reason it must produce."""
    missing = str(tmp_path / "images" / "nope.png")
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes((tmp_path / good.images[0]).read_bytes())
    corrupt_image(broken)
    return {
        "separator": (_raw(good, id="a/b"), "id contains a path separator"),
        "dotdot": (_raw(good, id="a..b"), "id contains '..'"),
        "empty-id": (_raw(good, id=""), "id is empty"),
        "kind": (_raw(good, id="k", kind="animal"), "unknown kind 'animal' (expected 'identity', 'concept' or 'edit')"),
        "no-images": (_raw(good, id="n", images=[]), "no images (neither 'images' nor 'image_dir' is given)"),
        "empty-dir": (_raw(good, id="e", images=[], image_dir="images/none"), "no images: image_dir 'images/none'"),
        "missing": (_raw(good, id="m", images=[missing]), f"image not found: {missing}"),
        "corrupt": (_raw(good, id="c", images=["images/broken.png"]), f"image cannot be decoded: {broken}"),
        "extra-field": (_raw(good, id="x", colour="red"), "unknown field 'colour'"),
        "bad-attributes": (_raw(good, id="t", attributes="colour"), "attributes must be a JSON object or key=value"),
    }


@pytest.mark.parametrize(
    "case",
    ["separator", "dotdot", "empty-id", "kind", "no-images", "empty-dir", "missing", "corrupt", "extra-field",
     "bad-attributes"],
)
def test_each_bad_row_gets_its_own_message(tmp_path: Path, subjects: list[ManifestRow], case: str) -> None:
    raw, reason = _bad_cases(tmp_path, subjects[0])[case]
    rows = [_raw(subjects[1]), raw, _raw(subjects[2])]
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows, str(tmp_path))
    [problem] = info.value.problems
    assert (problem.row, problem.id) == (2, raw["id"])
    assert problem.reason.startswith(reason)
    assert f"row 2 (id {raw['id']!r}): {reason}" in str(info.value)


def test_all_bad_rows_are_reported_at_once(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    cases = _bad_cases(tmp_path, subjects[0])
    rows = [_raw(s) for s in subjects] + [raw for raw, _ in cases.values()] + [_raw(subjects[1])]
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows, str(tmp_path), max_workers=4)
    got = [(p.row, p.id, p.reason) for p in info.value.problems]
    expected = [(4 + i, raw["id"], reason) for i, (raw, reason) in enumerate(cases.values())]
    expected.append((len(rows), subjects[1].id, "duplicate id: already used by row 2"))
    assert [(r, i) for r, i, _ in got] == [(r, i) for r, i, _ in expected]
    for (_, _, reason), (_, _, want) in zip(got, expected, strict=True):
        assert reason.startswith(want)
    message = str(info.value)
    assert message.startswith(f"{len(expected)} problem(s) in {len(expected)} row(s)")
    assert all(str(p) in message for p in info.value.problems)


def test_a_row_with_several_problems_lists_them_all(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    rows = [_raw(subjects[0]), _raw(subjects[0], kind="animal", images=["images/gone.png"])]
    rows[1]["id"] = "../" + subjects[0].id
    rows.append(_raw(subjects[1], id=subjects[1].id, images=["gone.png"]))
    rows.append(_raw(subjects[1], id=subjects[1].id))
    with pytest.raises(ManifestError) as info:
        validate_manifest(rows, str(tmp_path))
    assert [(p.row, p.reason.split(":")[0]) for p in info.value.problems] == [
        (2, "unknown kind 'animal' (expected 'identity', 'concept' or 'edit')"),
        (2, "id contains a path separator"),
        (2, "image not found"),  # checked even though the row does not parse, so one pass finds everything
        (3, "image not found"),
        (4, "duplicate id"),
    ]


def test_bad_jsonl_lines_are_reported_with_the_other_rows(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    good = [json.dumps(_raw(s)) for s in subjects]
    (tmp_path / "m.jsonl").write_text(
        "\n".join([good[0], "{not json", "", good[1], "[1, 2]", json.dumps(_raw(subjects[2], id="a/b"))]) + "\n"
    )
    raw = read_raw_manifest(str(tmp_path / "m.jsonl"))
    assert isinstance(raw[1], ManifestProblem) and isinstance(raw[0], dict)
    with pytest.raises(ManifestError) as info:
        load_and_validate(str(tmp_path / "m.jsonl"))
    assert [(p.row, p.id) for p in info.value.problems] == [(2, None), (4, None), (5, "a/b")]
    assert "row 2 (no id): not valid JSON" in str(info.value)
    assert "row 4 (no id): not a JSON object but list" in str(info.value)
    assert str(tmp_path / "m.jsonl") in str(info.value)


def test_read_manifest_reports_every_unparseable_row(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    (tmp_path / "m.csv").write_text("id,kind,images\na,animal,x.png\nb,identity,x.png\nc,plant,x.png,extra\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.csv"))
    assert [str(p) for p in info.value.problems] == [
        "row 1 (id 'a'): unknown kind 'animal' (expected 'identity', 'concept' or 'edit')",
        "row 3 (id 'c'): 1 more cell(s) than the header has columns",
    ]


def test_empty_manifest_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="has no rows"):
        load_and_validate(str(tmp_path / "m.jsonl"))


def test_typed_rows_validate_too(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    assert validate_manifest(subjects, str(tmp_path)) == subjects
    with pytest.raises(ManifestError, match=r"row 2 \(id 'subject-00000'\): duplicate id: already used by row 1"):
        validate_manifest([subjects[0], subjects[0]], str(tmp_path))


# --- manifest files that cannot be read at all -----------------------------------------------------


def _unreadable_manifests(tmp_path: Path) -> dict[str, tuple[Path, type[Exception], str]]:
    """Each kind of manifest file that cannot be read, with the error class and message it must raise."""
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not a parquet file" * 4)
    (tmp_path / "latin1.csv").write_bytes("id,images\ncaf\u00e9,a.png\n".encode("latin-1"))
    folder_hint = "is a directory; give the manifest file in it"
    return {
        "dir-with-suffix": (tmp_path / "folder.jsonl", ManifestError, folder_hint),
        "dir": (tmp_path, ManifestError, folder_hint),
        "missing": (tmp_path / "nope.jsonl", NotFoundError, "manifest not found"),
        "garbage-parquet": (tmp_path / "garbage.parquet", ManifestError, "is not a readable Parquet file (Parquet magic bytes"),
        "not-utf8": (tmp_path / "latin1.csv", ManifestError, "is not UTF-8 text (byte 0xe9 on line 2)"),
    }


@pytest.mark.parametrize("case", ["dir-with-suffix", "dir", "missing", "garbage-parquet", "not-utf8"])
def test_an_unreadable_manifest_file_is_one_line_naming_it(tmp_path: Path, case: str) -> None:
    path, error, reason = _unreadable_manifests(tmp_path)[case]
    for read in (read_raw_manifest, read_manifest, load_and_validate):
        with pytest.raises(error) as info:
            read(str(path))
        message = str(info.value)
        assert str(path) in message and reason in message, (read.__name__, message)
        assert "\n" not in message
        assert isinstance(info.value, InputError | NotFoundError)  # what the CLI prints in one line
    if error is ManifestError:
        assert info.value.problems == []  # the file, not a row, is at fault


# --- images: as trained on, or refused with the row named -----------------------------------------


def _png(path: Path, width: int, height: int, depth: int, colour_type: int, rows: bytes) -> Path:
    """A PNG written chunk by chunk, for pixel formats (16-bit RGB) or headers (huge sizes) PIL will not write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def _save(image: Image.Image, path: Path, **kwargs: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def _validate_counting(rows: list[dict[str, object]], base: Path, options: ImageConfig) -> tuple[int, list[ManifestProblem]]:
    """(rows that validate, problems): rows without a problem are validated again alone, to count them for real."""
    try:
        return len(validate_manifest(rows, str(base), image_options=options)), []
    except ManifestError as e:
        bad = {p.row for p in e.problems}
        rest = [r for n, r in enumerate(rows, start=1) if n not in bad]
        return len(validate_manifest(rest, str(base), image_options=options)), e.problems


def test_16bit_grey_png_scales_to_the_8bit_gradient_not_white(tmp_path: Path) -> None:
    gradient = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = _save(Image.fromarray(gradient.astype(np.uint16) * 257), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what Pillow opens a 16-bit grey PNG as; convert("RGB") would clip it to white
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.repeat(gradient[..., None], 3, axis=2))


def test_16bit_rgb_png_keeps_its_colour(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 3), dtype=">u2")
    pixels[...] = (65535, 128 * 257, 7 * 257)
    path = _png(tmp_path / "rgb16.png", 4, 4, 16, 2, b"".join(b"\x00" + row.tobytes() for row in pixels))
    assert np.array_equal(np.asarray(load_image(str(path))), np.broadcast_to([255, 128, 7], (4, 4, 3)))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    source = np.zeros((32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high: a red left half, a blue bottom-right
    source[:, :24] = (255, 0, 0)
    source[16:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(source), tmp_path / "photo.jpg", exif=exif, quality=95, subsampling=0)
    image = np.asarray(load_image(path)).astype(int)
    upright = np.rot90(source, k=-1).astype(int)  # clockwise
    assert image.shape == upright.shape == (48, 32, 3)
    assert np.abs(image - upright).mean() < 4  # JPEG noise only; unrotated, the halves would not line up
    assert tuple(image[10, 16]) == pytest.approx((255, 0, 0), abs=12)  # the red left half is now on top ...
    assert tuple(image[40, 8]) == pytest.approx((0, 0, 255), abs=12)  # ... and the blue corner bottom-left


def _expected_composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    alpha = rgba[..., 3:].astype(float) / 255
    return np.rint(rgba[..., :3] * alpha + np.array(background) * (1 - alpha)).astype(np.uint8)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 40, 200)])
def test_rgba_is_composited_on_the_background(tmp_path: Path, background: tuple[int, int, int]) -> None:
    rgba = np.array([[[255, 0, 0, 128], [0, 0, 255, 0]], [[0, 255, 0, 255], [10, 20, 30, 64]]], dtype=np.uint8)
    path = _save(Image.fromarray(rgba), tmp_path / "cutout.png")
    image = np.asarray(load_image(path, ImageConfig(background=background)))
    assert np.array_equal(image, _expected_composite(rgba, background))
    if background == (255, 255, 255):
        assert tuple(image[0, 0]) == (255, 127, 127)  # half-transparent red over white is pink, not red


def test_grey_alpha_and_palette_transparency_are_composited_too(tmp_path: Path) -> None:
    grey_alpha = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8))  # LA: transparent, then black
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    options = ImageConfig(background=(0, 0, 255))
    assert np.asarray(load_image(_save(grey_alpha, tmp_path / "la.png"), options)).tolist() == [[[0, 0, 255], [0, 0, 0]]]
    path = _save(palette, tmp_path / "p.png", transparency=0)  # palette entry 0 (black) is transparent
    assert np.asarray(load_image(path, options)).tolist() == [[[0, 0, 255], [255, 0, 0]]]


def test_transparent_image_is_refused_under_refuse_and_its_row_is_named(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    transparent = np.full((8, 8, 4), 200, dtype=np.uint8)
    transparent[0, 0, 3] = 0
    opaque = np.full((8, 8, 4), 255, dtype=np.uint8)
    _save(Image.fromarray(transparent), tmp_path / "images" / "cutout.png")
    _save(Image.fromarray(opaque), tmp_path / "images" / "opaque.png")
    rows = [_raw(subjects[0]), _raw(subjects[1], images=["images/cutout.png"]), _raw(subjects[2], images=["images/opaque.png"])]

    validated, problems = _validate_counting(rows, tmp_path, ImageConfig(alpha="refuse"))
    assert [str(p) for p in problems] == [
        f"row 2 (id {subjects[1].id!r}): image has transparent pixels: {tmp_path / 'images/cutout.png'} (the alpha policy is 'refuse')"
    ]
    assert validated == 2  # an alpha channel with no transparent pixel is accepted
    assert _validate_counting(rows, tmp_path, ImageConfig()) == (3, [])


def test_an_image_over_max_pixels_is_that_rows_problem(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    _save(Image.new("RGB", (10, 10)), tmp_path / "images" / "at-limit.png")
    _save(Image.new("RGB", (11, 10)), tmp_path / "images" / "over.png")
    rows = [_raw(subjects[0], images=["images/at-limit.png"]), _raw(subjects[1], images=["images/over.png"]),
            _raw(subjects[2], id="a/b", images=["images/at-limit.png"])]
    validated, problems = _validate_counting(rows, tmp_path, ImageConfig(max_pixels=100))
    assert [str(p) for p in problems] == [
        f"row 2 (id {subjects[1].id!r}): image too large: {tmp_path / 'images/over.png'} is 11x10 = 110 pixels, "
        "over the limit of 100 (max_pixels)",
        "row 3 (id 'a/b'): id contains a path separator",  # reported in the same pass as the image
    ]
    assert validated == 1


@pytest.mark.parametrize(("size", "said"), [((20_000, 20_000), "is 20000x20000 = 400,000,000 pixels"),
                                            ((100_000, 100_000), "is 10,000,000,000 pixels")])
def test_a_decompression_bomb_gets_our_error_not_pils(tmp_path: Path, size: tuple[int, int], said: str) -> None:
    """Headers PIL would warn about (400 MP) or refuse (10 GP) with its own message, naming no file."""
    path = _png(tmp_path / "images" / "bomb.png", *size, 8, 2, b"\x00" * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        validated, problems = _validate_counting([{"id": "bomb", "images": ["images/bomb.png"]}], tmp_path, ImageConfig())
    assert [str(p) for p in problems] == [
        f"row 1 (id 'bomb'): image too large: {path} {said}, over the limit of 50,000,000 (max_pixels)"
    ]
    assert validated == 0


def test_an_id_ending_in_a_newline_is_refused(tmp_path: Path, subjects: list[ManifestRow]) -> None:
    rows = [_raw(subjects[0]), _raw(subjects[1], id="subject-x\n"), _raw(subjects[2])]
    validated, problems = _validate_counting(rows, tmp_path, ImageConfig())
    assert [(p.row, p.id) for p in problems] == [(2, "subject-x\n")]
    assert str(problems[0]).startswith("row 2 (id 'subject-x\\n'): id must be 1-128 characters")
    assert validated == 2


# --- S3 ------------------------------------------------------------------------------------------


def test_validation_reads_manifest_and_images_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    import s3fs

    rows = make_subjects(str(tmp_path), 4, images_per_subject=2)
    corrupt_image(tmp_path / rows[2].images[1])
    write_manifest(rows, str(tmp_path / "manifest.jsonl"))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tmp_path) + "/", f"{s3_bucket}/demo/", recursive=True)
    fs.rm(f"{s3_bucket}/demo/{rows[3].images[0]}")

    with pytest.raises(ManifestError) as info:
        load_and_validate(f"{s3_bucket}/demo/manifest.jsonl")
    problems = info.value.problems
    assert [(p.row, p.id) for p in problems] == [(3, "subject-00002"), (4, "subject-00003")]
    assert problems[0].reason.startswith(f"image cannot be decoded: {s3_bucket}/demo/{rows[2].images[1]} (")
    assert problems[1].reason == f"image not found: {s3_bucket}/demo/{rows[3].images[0]}"

    write_manifest(rows[:2], f"{s3_bucket}/demo/good.jsonl")
    assert load_and_validate(f"{s3_bucket}/demo/good.jsonl") == rows[:2]
    assert load_images(rows[0], f"{s3_bucket}/demo")[1].size == (64, 64)
