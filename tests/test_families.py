"""SDXL, SD3 and Flux bases: a build commits every row, packed rows equal sequential ones, the export loads
in the family's own pipeline and changes its picture, and a base of another family is refused in one line.

SD 1.x/2.x is covered by test_finetune.py and test_flows.py. Each family's tiny pipeline is made with
diffusers' own classes and ``save_pretrained`` (tasks/identity/tiny_bases.py), as a user would make one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightzoo.cli import main as cli
from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig
from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.export import export_lora
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.engine import finetune_batch
from weightzoo.tasks.identity.families import detect
from weightzoo.tasks.identity.synthetic import write_demo_manifest
from weightzoo.tasks.identity.tiny_bases import save_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("sdxl", "sd3", "flux")
RESOLUTION = 32  # every tiny base trains at 32 px here: 16x16 latents, cheap for all three denoisers
# lr 1e-3 so a few steps move the weights visibly; fp32 rows for an exact packed/sequential comparison.
CFG = {"steps": 6, "learning_rate": 1e-3, "resolution": RESOLUTION, "prior_preservation": False,
       "weights_dtype": "float32", "check_every": 2, "loss_window": 2, "pack": 2}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per family: its base folder and a two-row dataset built through the build flow (one pack of 2)."""
    root = tmp_path_factory.mktemp("families")
    manifest = write_demo_manifest(str(root / "manifest"), 2)
    runs = {}
    for family in FAMILIES:
        base = save_tiny_pipeline(root / f"base-{family}", family=family)
        dataset = root / f"ds-{family}"
        summary = build_dataset(BuildConfig(manifest=manifest, base=str(base), dataset=str(dataset),
                                            finetune=FinetuneConfig(**CFG)))
        runs[family] = {"base": base, "dataset": dataset, "summary": summary, "manifest": manifest}
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_build_commits_every_row_and_packed_equals_sequential(family_runs: dict, family: str) -> None:
    run = family_runs[family]
    assert detect(str(run["base"])).name == family
    assert (run["summary"]["committed"], run["summary"]["failed"]) == (2, 0), run["summary"]
    ds = Dataset(str(run["dataset"]))
    rows = read_manifest(run["manifest"])
    assert sorted(ds.ids) == sorted(r.id for r in rows) and len(set(ds.ids)) == 2
    meta, _ = ds.row(rows[0].id)
    assert meta["hparams"]["family"] == family and meta["base_model"].startswith(f"{family}-")

    pipe = load_base(str(run["base"]))
    seq = finetune_batch(pipe, rows, FinetuneConfig(**{**CFG, "pack": 1}), base_uri=str(Path(run["manifest"]).parent))
    for row in seq.results:
        assert row.ok, row.reason
        _, stored = ds.row(row.id)
        stored = torch.as_tensor(stored, dtype=torch.float32)
        rel = (stored - row.weights).norm() / stored.norm()
        assert rel < 1e-4, (family, row.id, float(rel))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_the_family_pipeline_and_changes_the_picture(family_runs: dict, family: str,
                                                                      tmp_path: Path) -> None:
    run = family_runs[family]
    ds = Dataset(str(run["dataset"]))
    meta, weights = ds.row(ds.ids[0])
    path = export_lora(weights, ds.layout, meta["hparams"], str(tmp_path / "lora"))
    prefix = "unet." if family == "sdxl" else "transformer."
    keys = load_file(path).keys()
    assert keys and all(k.startswith(prefix) for k in keys)

    pipe = load_base(str(run["base"]))

    def picture() -> torch.Tensor:
        return pipe("a photo of a subject", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    before = picture()
    pipe.load_lora_weights(path)
    lora_layers = sum(1 for _, m in pipe.components[prefix[:-1]].named_modules() if hasattr(m, "lora_A"))
    assert lora_layers == len(ds.layout.keys) // 2
    assert (picture() - before).abs().max() > 1e-4
    assert len(Dataset(str(run["dataset"])).ids) == 2


def test_a_base_of_another_family_is_refused_in_one_line(family_runs: dict, tiny_base: Path, capsys) -> None:
    """An SD base building one more row into each family's dataset: one line naming both families, exit
    code not 0, nothing added."""
    for family in FAMILIES:
        run = family_runs[family]
        extra = write_demo_manifest(str(run["dataset"].parent / f"more-{family}"), 3)
        before = Dataset(str(run["dataset"])).ids
        args = ["build", "--manifest", extra, "--base", str(tiny_base), "--dataset", str(run["dataset"]),
                "--finetune-json", '{"steps": 2, "prior_preservation": false}']
        assert cli(args) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"model family: {family} ≠ sd" in err[0], err
        after = Dataset(str(run["dataset"])).ids
        assert sorted(after) == sorted(before) and len(set(after)) == 2


def test_downstream_commands_work_on_every_family(family_runs: dict, tmp_path: Path) -> None:
    """fit-subspace, sample, edit, invert, project, train-diffusion and generate on each family's rows; the
    sampled, edited, inverted and generated LoRAs load into the family's pipeline (keys under its denoiser)."""
    for family in FAMILIES:
        run, work = family_runs[family], tmp_path / family
        dataset, sub = str(run["dataset"]), str(work / "sub")
        ids = Dataset(dataset).ids
        assert cli(["fit-subspace", "--dataset", dataset, "--out", sub, "--components", "1", "--no-prefect"]) == 0
        assert cli(["sample", "--subspace", sub, "--out", str(work / "samples"), "-n", "1"]) == 0
        assert cli(["project", "--subspace", sub, "--id", ids[0]]) == 0
        assert cli(["edit", "--subspace", sub, "--id", ids[0], "--attribute", "colour=blue",
                    "--out", str(work / "edit.safetensors")]) == 0
        image = next(Path(run["manifest"]).parent.rglob("*.png"))
        assert cli(["invert", "--subspace", sub, "--base", str(run["base"]), "--image", str(image), "--steps", "2",
                    "--batch", "1", "--device", "cpu", "--out", str(work / "invert.safetensors")]) == 0
        assert cli(["train-diffusion", "--dataset", dataset, "--base", str(run["base"]), "--out", str(work / "wd"),
                    "--no-prefect", "--steps", "2", "--width", "16", "--depth", "1", "--block-size", "512",
                    "--device", "cpu"]) == 0
        generated = str(work / "gen" / "pytorch_lora_weights.safetensors")
        assert cli(["generate", "--model", str(work / "wd"), "--prompt", "a photo of a subject", "--out", generated]) == 0
        pipe = load_base(str(run["base"]))
        model = pipe.components["unet" if family == "sdxl" else "transformer"]
        loras = [next((work / "samples").rglob("*.safetensors")), work / "edit.safetensors",
                 work / "invert.safetensors", Path(generated)]
        for i, lora in enumerate(loras):
            pipe.load_lora_weights(str(lora), adapter_name=f"a{i}")
            assert sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A")) == len(Dataset(dataset).layout.keys) // 2
        after = Dataset(dataset).ids
        assert sorted(after) == sorted(ids) and len(set(after)) == 2
