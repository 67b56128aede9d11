"""Sample, edit, invert and project on LoRA vectors of the real tiny layout (to_q/to_v, rank 1).

Rows are synthetic: a shared init plus one random direction per attribute label plus an identity
term, so the attribute each row carries is known and edits can be checked by a probe trained on the
coordinates. The export → ``load_lora_weights`` check ties the differentiable LoRA application used by
inversion to diffusers' own.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.finetune.starts import load_lora_vector
from weightzoo.tasks.subspace.config import SubspaceConfig
from weightzoo.tasks.subspace.pca import Subspace, fit_subspace, load_subspace
from weightzoo.tasks.subspace.w2w import (
    LoRAUNet,
    attribute_directions,
    edit,
    edit_direction,
    edit_to_label,
    export,
    invert,
    label_shift,
    predict_label,
    project,
    sample,
    subspace_hparams,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is steadiest

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")
N, K = 96, 10


def _label_dirs(d: int) -> dict[str, torch.Tensor]:
    """What each label adds to a row (drawn after the shared init, as ``write_lora_dataset`` draws them)."""
    g = torch.Generator().manual_seed(0)
    torch.randn(d, generator=g)  # the init
    return {v: 0.03 * torch.randn(d, generator=g) for v in COLOURS + SHAPES}


def write_lora_dataset(uri: str, pipe, n: int = N) -> None:
    """``n`` synthetic rows of ``pipe``'s real LoRA layout (see the module docstring), committed at ``uri``;
    also used by tests/test_terminal.py."""
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import resolved_hparams
    from weightzoo.tasks.identity.recipes.lora import lora_layout

    config = FinetuneConfig(prior_preservation=False)
    layout = lora_layout(pipe, config)
    hparams = resolved_hparams(pipe, config)
    g = torch.Generator().manual_seed(0)
    d = layout.numel
    init = 0.05 * torch.randn(d, generator=g)
    label_dirs = {v: 0.03 * torch.randn(d, generator=g) for v in COLOURS + SHAPES}
    identity = 0.01 * torch.randn(6, d, generator=g)
    rows, weights = [], []
    for i in range(n):
        colour, shape = COLOURS[i % 3], SHAPES[(i // 3) % 2]
        x = init + label_dirs[colour] + label_dirs[shape] + torch.randn(6, generator=g) @ identity
        weights.append(x + 1e-4 * torch.randn(d, generator=g))
        rows.append(RowMeta(f"s{i:03d}", prompt="sks person", attributes={"colour": colour, "shape": shape},
                            hparams=hparams))
    ledger = Ledger(uri)
    w = torch.stack(weights)
    for start in range(0, n, 40):
        batch = f"b{start}"
        commit_batch(ledger, batch, layout, rows[start : start + 40], w[start : start + 40], row_group_size=16)


@pytest.fixture(scope="module")
def lora_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_pipe) -> tuple[str, Subspace]:
    root = tmp_path_factory.mktemp("w2w")
    write_lora_dataset(str(root / "ds"), tiny_pipe)
    fit_subspace(str(root / "ds"), str(root / "sub"), SubspaceConfig(components=K))
    return str(root / "ds"), load_subspace(str(root / "sub"))


def _probe(sub: Subspace, attribute: str):
    """An independent probe (logistic regression on the coordinates) of one attribute."""
    from sklearn.linear_model import LogisticRegression

    meta, c = sub.dataset_coords()
    labels = [dict(a)[attribute] for a in meta.column("attributes").to_pylist()]
    return LogisticRegression(max_iter=2000).fit(c.numpy(), labels)


def test_project_rows_and_exported_files(lora_dataset: tuple[str, Subspace], tmp_path: Path) -> None:
    from weightzoo.storage.dataset import Dataset

    uri, sub = lora_dataset
    meta, coords = sub.dataset_coords()
    _, x = Dataset(uri).row("s007")
    p = project(sub, x)
    assert torch.allclose(p.coords, coords[7], atol=1e-3)
    assert p.rel_error < 0.01 and p.rel_error_standardised < 0.2
    # a LoRA file (alpha/rank baked into B by export) projects like its row
    path = export(sub, torch.from_numpy(x.astype(np.float32)), str(tmp_path / "s007.safetensors"))
    q = project(sub, load_lora_vector(path, sub.layout))
    assert torch.allclose(q.coords, p.coords, atol=1e-3)
    assert subspace_hparams(sub)["scale"] == 27.0


def test_sampled_lora_loads_in_diffusers_and_matches_functional_unet(
    lora_dataset: tuple[str, Subspace], tiny_base: Path, tiny_pipe, tmp_path: Path
) -> None:
    from weightzoo.tasks.identity.base_model import load_base

    _, sub = lora_dataset
    weights, c = sample(sub, 3, seed=1)
    mu, sigma = sub.dataset_coords()[1].mean(0), sub.dataset_coords()[1].std(0)
    assert weights.shape == (3, sub.layout.numel) and ((c - mu).abs() < 6 * sigma).all()
    assert not torch.allclose(weights[0], weights[1])
    path = export(sub, weights[0], str(tmp_path / "sample"))
    pipe = load_base(str(tiny_base))  # a private copy: the shared tiny_pipe must stay adapter-free
    pipe.load_lora_weights(path)
    g = torch.Generator().manual_seed(0)
    noisy, cond = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = LoRAUNet(tiny_pipe.unet, sub.layout, 27.0)(sub.layout.as_tensor(weights[0]).float(), noisy, t, cond)
        theirs = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        plain = tiny_pipe.unet(noisy, t, encoder_hidden_states=cond).sample
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(ours, theirs, atol=1e-4)  # and it is exactly diffusers' LoRA
    image = pipe("sks person", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_edit_moves_the_attribute_probe_and_keeps_the_others(lora_dataset: tuple[str, Subspace]) -> None:
    from weightzoo.storage.dataset import Dataset

    uri, sub = lora_dataset
    colour, shape = _probe(sub, "colour"), _probe(sub, "shape")
    red = list(colour.classes_).index("red")
    d = edit_direction(sub, "colour", "red", disentangle=["shape"])
    # disentangled: orthogonal to every shape direction
    for v in attribute_directions(sub, "shape").values():
        assert abs(float(d @ v) / float(v.norm())) < 1e-5
    ds = Dataset(uri)
    moved = 0
    for rid in ("s001", "s002", "s004", "s005"):  # green or blue rows
        _, x = ds.row(rid)
        before = project(sub, x).coords.numpy()[None]
        after = project(sub, edit(sub, x, d, 3.0)).coords.numpy()[None]
        assert colour.predict_proba(after)[0, red] > colour.predict_proba(before)[0, red] + 0.2
        moved += colour.predict(after)[0] == "red"
        assert shape.predict(after)[0] == shape.predict(before)[0]
    assert moved == 4
    with pytest.raises(KeyError, match="no label"):
        edit_direction(sub, "colour", "purple")


def test_an_edit_to_a_label_moves_a_row_by_what_the_label_adds(lora_dataset: tuple[str, Subspace]) -> None:
    """Rows here are init + colour + shape + identity: the label shift from green to red, fitted jointly on the
    rows, must be what red adds minus what green adds, so an edit at strength 1 lands on the red twin."""
    from weightzoo.storage.dataset import Dataset

    uri, sub = lora_dataset
    ds = Dataset(uri)
    truth = _label_dirs(sub.layout.numel)
    for rid in ("s001", "s004", "s007"):  # green rows, circle and square
        meta, x = ds.row(rid)
        assert predict_label(sub, x, "colour") == meta["attributes"]["colour"] == "green"
        x = torch.from_numpy(x.astype(np.float32))
        want = x + truth["red"] - truth["green"]
        got = edit_to_label(sub, x, label_shift(sub, "colour", "red", "green"), 1.0)
        # the shift is fitted from ~32 rows a label whose identity terms (norm ~1/4 of a label's) average out
        # to ~1/8 of the move: within 15 %
        assert (got - want).norm() < 0.15 * (want - x).norm()
        assert predict_label(sub, got, "colour") == "red" and predict_label(sub, got, "shape") == meta["attributes"]["shape"]
    # every row's own label is what the probe reads
    assert all(predict_label(sub, ds.row(i)[1], "shape") == ds.row(i)[0]["attributes"]["shape"] for i in ds.ids[:12])
    with pytest.raises(KeyError, match="no label 'purple'"):
        label_shift(sub, "colour", "purple", "red")
    with pytest.raises(KeyError, match="no fitted row has attribute 'hat'"):
        label_shift(sub, "hat", "on", "off")


def test_invert_lowers_the_loss_and_leaves_the_pipeline_alone(lora_dataset: tuple[str, Subspace], tiny_pipe) -> None:
    from weightzoo.tasks.identity.synthetic import _draw, _rng, _subject

    _, sub = lora_dataset
    rng = _rng(3, 0)
    image = _draw(_subject(rng), rng, 64)
    before = copy.deepcopy(tiny_pipe.unet.state_dict())
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[8:56, 8:56] = 1
    # 32 px (16×16 latents) keeps this affordable on 2 shared cores; the UNet is resolution-agnostic
    hparams = subspace_hparams(sub) | {"resolution": 32}
    inv = invert(sub, tiny_pipe, image, "sks person", mask=mask, steps=12, lr=0.3, batch=2, seed=0,
                 hparams=hparams, eval_samples=8)
    assert inv.final_loss < inv.initial_loss
    assert inv.weights.shape == (sub.layout.numel,) and torch.isfinite(inv.coords).all()
    after = tiny_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())


def test_cli_fit_sample_edit_project(lora_dataset: tuple[str, Subspace], tiny_base: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from weightzoo.cli import main
    from weightzoo.tasks.identity.base_model import load_base

    uri, _ = lora_dataset
    sub_uri = str(tmp_path / "sub")
    assert main(["fit-subspace", "--dataset", uri, "--out", sub_uri, "-k", str(K), "--no-prefect"]) == 0
    assert main(["sample", "--subspace", sub_uri, "--out", str(tmp_path / "samples"), "-n", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["sample-000", "sample-001"]
    # each sample is a folder diffusers loads by its default weight name, and it changes the UNet
    pipe = load_base(str(tiny_base))
    g = torch.Generator().manual_seed(0)
    noisy, cond, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500])
    with torch.no_grad():
        plain = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(tmp_path / "samples" / "sample-001"))
        with_lora = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
    assert pipe.get_active_adapters() and (with_lora - plain).abs().max() > 1e-4
    edited = str(tmp_path / "edited.safetensors")
    capsys.readouterr()
    assert main(["edit", "--subspace", sub_uri, "--id", "s001", "--attribute", "colour=red", "--strength", "2",
                 "--disentangle", "shape", "--out", edited]) == 0
    printed = capsys.readouterr()
    assert "s001 moved 2 x the average colour=green -> red difference" in printed.out
    assert main(["edit", "--subspace", sub_uri, "--id", "s000", "--attribute", "colour=red", "--direction", "probe",
                 "--out", str(tmp_path / "probe.safetensors")]) == 0
    probe_run = capsys.readouterr()
    assert "s000 moved +4 std towards colour=red" in probe_run.out and "already" not in probe_run.err
    assert main(["edit", "--subspace", sub_uri, "--id", "s000", "--attribute", "colour=red",
                 "--out", str(tmp_path / "same.safetensors")]) == 0
    assert "warning: s000 is already colour=red: the edit leaves it as it is" in capsys.readouterr().err
    stored = json.loads((tmp_path / "sub" / "directions.json").read_text())["colour"]
    assert f"colour: cross-validated accuracy {stored['cv_accuracy']:.2f}" in printed.out
    if stored["counts"]["red"] < 10:  # the few-rows warning names the count
        assert f"only {stored['counts']['red']} of" in printed.err
    assert main(["edit", "--subspace", sub_uri, "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in listed] == sorted(json.loads((tmp_path / "sub" / "directions.json").read_text()))
    assert main(["project", "--subspace", sub_uri, "--lora", edited, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["coords"]) == K and out["rel_error"] < 0.05
    assert main(["project", "--subspace", sub_uri, "--lora", str(tmp_path / "samples" / "sample-000")]) == 0
    capsys.readouterr()
    # user errors: one line each, before anything heavy
    for argv, message in [
        (["edit", "--subspace", sub_uri, "--id", "s001", "--attribute", "colour", "--out", edited],
         "--attribute must be NAME=VALUE"),
        (["edit", "--subspace", sub_uri, "--id", "s001", "--attribute", "colour=purple", "--out", edited], "no label"),
        (["edit", "--subspace", sub_uri, "--id", "nope", "--attribute", "colour=red", "--out", edited],
         "id 'nope' is not committed"),
        (["project", "--subspace", str(tmp_path / "nowhere"), "--id", "s001"], "no subspace at"),
        (["project", "--subspace", sub_uri, "--lora", str(tmp_path / "missing.safetensors")], "--lora not found at"),
        (["project", "--subspace", sub_uri, "--id", "s001", "--dataset", str(tmp_path / "gone")],
         "dataset not found at"),
        (["sample", "--subspace", sub_uri, "--out", str(tmp_path / "s"), "-n", "0"], "--num must be at least 1"),
        (["export", "--dataset", str(tmp_path / "gone"), "--id", "s001", "--out", edited], "dataset not found at"),
        (["export", "--dataset", uri, "--id", "nope", "--out", edited], "id 'nope' is not committed"),
        (["generate", "--model", str(tmp_path / "gone"), "--prompt", "x", "--out", edited], "no weight-diffusion model"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_cards_find_a_dataset_moved_with_them(tmp_path: Path, tiny_pipe, capsys: pytest.CaptureFixture[str]) -> None:
    """A subspace fitted beside its dataset keeps working when both folders move together; a dataset that
    is really gone is named as such, not reported as a missing id."""
    import json
    import shutil

    from weightzoo.cli import main

    write_lora_dataset(str(tmp_path / "a" / "ds"), tiny_pipe, n=12)
    assert main(["fit-subspace", "--dataset", str(tmp_path / "a" / "ds"), "--out", str(tmp_path / "a" / "sub"),
                 "-k", "3", "--no-prefect"]) == 0
    card = json.loads((tmp_path / "a" / "sub" / "card.json").read_text())
    assert card["dataset_relative"] == "../ds" and card["dataset"] == str(tmp_path / "a" / "ds")
    shutil.move(tmp_path / "a", tmp_path / "b")
    sub_uri, out = str(tmp_path / "b" / "sub"), str(tmp_path / "edited.safetensors")
    assert load_subspace(sub_uri).dataset == str(tmp_path / "b" / "ds")
    assert main(["edit", "--subspace", sub_uri, "--id", "s001", "--attribute", "colour=red", "--out", out]) == 0
    assert main(["project", "--subspace", sub_uri, "--id", "s001", "--json"]) == 0
    capsys.readouterr()
    shutil.rmtree(tmp_path / "b" / "ds")
    for argv in (["edit", "--subspace", sub_uri, "--id", "s001", "--attribute", "colour=red", "--out", out],
                 ["project", "--subspace", sub_uri, "--id", "s001"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"dataset not found at {tmp_path / 'b' / 'ds'}" in err and "not committed" not in err, err


def test_relative_refs_on_local_disk_and_buckets() -> None:
    from weightzoo.storage.fs import relative_ref, resolve_ref

    assert relative_ref("s3://bkt/data/ds", "s3://bkt/subs/one") == "../../data/ds"
    assert resolve_ref("../../data/ds", "s3://bkt/subs/one") == "s3://bkt/data/ds"
    assert relative_ref("s3://other/ds", "s3://bkt/sub") is None  # another bucket: kept absolute
    assert relative_ref("s3://bkt/ds", "/local/sub") is None
    assert resolve_ref(relative_ref("/x/y/ds", "/x/z/sub") or "", "/w/z/sub") == "/w/y/ds"


# -- on real fine-tuned rows of the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_subspace(tmp_path_factory: pytest.TempPathFactory, tiny_pipe) -> tuple[Subspace, list, str]:
    """8 synthetic subjects fine-tuned for 30 steps each (32 px, one pack), committed, fitted with k=4."""
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import finetune_batch
    from weightzoo.tasks.identity.synthetic import make_subjects

    root = str(tmp_path_factory.mktemp("real"))
    subjects = make_subjects(root, 8, images_per_subject=2, seed=0, size=32)
    # a high learning rate so 30 steps move the adapters; two 2-step class images keep prior preservation cheap
    cfg = FinetuneConfig(steps=30, learning_rate=5e-3, resolution=32, num_class_images=2, class_inference_steps=2,
                         pack=8, check_every=10, loss_window=5)
    out = finetune_batch(tiny_pipe, subjects, cfg, base_uri=root, cache_dir=str(tmp_path_factory.mktemp("cache")))
    assert all(r.ok for r in out.results)
    ledger = Ledger(f"{root}/ds")
    meta = [RowMeta(r.id, prompt=s.prompt, attributes=s.attributes, hparams=out.hparams, loss=r.loss, steps=r.steps)
            for r, s in zip(out.results, subjects, strict=True)]
    commit_batch(ledger, "b0", out.layout, meta, torch.stack([r.weights for r in out.results]))
    fit_subspace(f"{root}/ds", f"{root}/sub", SubspaceConfig(components=4))
    return load_subspace(f"{root}/sub"), subjects, root


def test_real_rows_edit_sample_invert(real_subspace: tuple[Subspace, list, str], tiny_base: Path, tiny_pipe,
                                      tmp_path: Path) -> None:
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.images import load_images
    from weightzoo.tasks.identity.base_model import load_base

    sub, subjects, root = real_subspace
    assert sub.card["rows"] == 8 and sub.explained_variance_ratio.sum() > 0.3
    # edit: the attribute's least-squares probe score rises along its direction, by the requested amount
    attr = next(a for a in ("background", "shape", "colour", "accessory")
                if len({s.attributes[a] for s in subjects}) > 1)
    subject = subjects[0]
    target = next(s.attributes[attr] for s in subjects if s.attributes[attr] != subject.attributes[attr])
    probe = attribute_directions(sub, attr)[target]
    _, x = Dataset(f"{root}/ds").row(subject.id)
    before = float(project(sub, x).coords @ probe)
    edited = edit(sub, x, edit_direction(sub, attr, target), 2.0)
    after = float(project(sub, edited).coords @ probe)
    assert after > before + 0.5 * float(probe.norm()) * float(sub.dataset_coords()[1].std(0).min())
    # sample: exported LoRAs load into diffusers and generate, and change the output
    path = export(sub, sample(sub, 1, seed=0)[0][0], str(tmp_path / "sampled"))
    pipe = load_base(str(tiny_base))
    plain = pipe("sks person", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(path)
    with_lora = pipe("sks person", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(with_lora).all() and np.abs(with_lora - plain).max() > 1e-4
    # invert: one training image of a subject, the loss on it drops from the mean model's
    image = load_images(subjects[1], root)[0]
    inv = invert(sub, tiny_pipe, image, "sks person", steps=40, lr=0.1, batch=8, seed=0, eval_samples=32)
    assert inv.final_loss < inv.initial_loss


def test_invert_checks_its_images_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--image and --mask are read and decoded first: nothing else exists here, so any load would fail otherwise."""
    from helpers import corrupt_image
    from PIL import Image

    from weightzoo.cli import main

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(good)
    Image.new("RGB", (8, 8)).save(bad)
    corrupt_image(bad)
    common = ["invert", "--subspace", str(tmp_path / "no-sub"), "--base", str(tmp_path / "no-base"),
              "--out", str(tmp_path / "o.safetensors")]
    for extra, message in [
        (["--image", str(tmp_path / "missing.png")], "--image not found at"),
        (["--image", str(bad)], "--image"),
        (["--image", str(good), "--mask", str(bad)], "--mask"),
        (["--image", str(good), "--steps", "0"], "--steps and --batch must be at least 1"),
        (["--image", str(good)], "--base: no diffusers pipeline"),
    ]:
        assert main(common + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)


def test_probes_are_chosen_by_cross_validation() -> None:
    """A label carried by two coordinates among many noisy ones: the CV probe finds it (accuracy near 1, few
    components); labels drawn at random: accuracy near chance, which the edit warning reports."""
    from weightzoo.tasks.subspace.probes import fit_probe

    g = torch.Generator().manual_seed(0)
    n, k = 240, 64
    c = torch.randn(n, k, generator=g) * torch.linspace(3, 0.5, k)
    labels = ["a" if x > 0 else "b" for x in (c[:, 0] + c[:, 1]).tolist()]
    probe = fit_probe(c, labels, "tone")
    assert probe.cv_accuracy > 0.9 and probe.components <= 4 and probe.counts == {
        "a": labels.count("a"), "b": labels.count("b")}
    d = probe.direction("a")
    assert float(d[:2].norm() / d.norm()) > 0.9  # the direction lies along the two informative coordinates
    noise = [("x", "y", "z")[int(i)] for i in torch.randint(0, 3, (n,), generator=g)]
    chance = fit_probe(c, noise, "noise")
    assert chance.cv_accuracy < chance.chance + 0.1
