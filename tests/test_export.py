"""``weightzoo export --format diffusers|peft`` on a really trained row of a real dataset.

The two forms scale differently (diffusers: alpha/rank baked into lora_B, scale 1; peft: A and B as
trained, lora_alpha = alpha), so the test that matters is that both reproduce the same UNet, and that
it is not the base UNet.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import TINY_FINETUNE
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from weightzoo.cli import main
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.finetune.export import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHT_NAME, WEIGHT_NAME
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.engine import finetune_batch
from weightzoo.tasks.identity.synthetic import make_subjects

pytestmark = pytest.mark.usefixtures("one_thread")

# A high learning rate so two steps move B well away from its zero init: the adapter must change outputs.
CFG = FinetuneConfig(**{**TINY_FINETUNE, "learning_rate": 1e-2, "resolution": 32, "pack": 1})


@pytest.fixture(scope="module")
def trained(tiny_pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A dataset holding one fine-tuned row; returns (dataset URI, id)."""
    root = tmp_path_factory.mktemp("export")
    rows = make_subjects(str(root / "subjects"), 1, images_per_subject=2, seed=3, size=32)
    result = finetune_batch(tiny_pipe, rows, CFG, base_uri=str(root / "subjects"), cache_dir=str(root / "cache"))
    (item,) = result.results
    assert item.ok, item.reason
    ledger = Ledger(str(root / "dataset"))
    meta = RowMeta(id=item.id, hparams=result.hparams, loss=item.loss, steps=item.steps)
    commit_batch(ledger, "b0", result.layout, [meta], item.weights[None])
    return ledger.uri, item.id


def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([50, 700]), ehs).sample


def test_peft_export_matches_the_diffusers_load(
    trained: tuple[str, str], tiny_base: Path, tiny_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    dataset, item_id = trained
    peft_dir, diffusers_file = tmp_path / "peft", tmp_path / "lora" / WEIGHT_NAME
    assert main(["export", "--dataset", dataset, "--id", item_id, "--out", str(peft_dir), "--format", "peft"]) == 0
    assert main(["export", "--dataset", dataset, "--id", item_id, "--out", str(diffusers_file)]) == 0

    pipe = load_base(str(tiny_base))  # fresh: tiny_pipe is shared and must stay adapter-free
    base_out = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(diffusers_file))
    diffusers_out = _unet_out(pipe.unet)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_pipe.unet), str(peft_dir))
    peft_out = _unet_out(peft_model)

    torch.testing.assert_close(peft_out, diffusers_out, rtol=1e-5, atol=1e-5)
    assert (peft_out - base_out).abs().max() > 1e-2
    assert all("lora" not in n for n, _ in tiny_pipe.unet.named_modules())  # the shared pipe is untouched


def test_peft_folder_states_its_scale_once(trained: tuple[str, str], tmp_path: Path) -> None:
    dataset, item_id = trained
    assert main(["export", "--dataset", dataset, "--id", item_id, "--out", str(tmp_path), "--format", "peft"]) == 0
    ds = Dataset(dataset)
    meta, row = ds.row(item_id)
    config = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    lora = LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "peft_version")})
    assert (lora.r, lora.lora_alpha) == (meta["hparams"]["rank"], meta["hparams"]["alpha"]) == (1, 27.0)
    modules = sorted({k.rsplit(".", 2)[0] for k in ds.layout.keys})
    assert sorted(config["target_modules"]) == modules and config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / PEFT_WEIGHT_NAME)
    expected = ds.layout.unflatten(row)
    assert sorted(tensors) == sorted(f"{PEFT_PREFIX}{k}" for k in expected)
    for k, t in expected.items():  # unscaled: exactly the stored A and B
        assert torch.equal(tensors[f"{PEFT_PREFIX}{k}"], t.float())
    with safe_open(tmp_path / PEFT_WEIGHT_NAME, "pt") as f:
        assert json.loads(f.metadata()["weightzoo.hparams"])["alpha"] == 27.0
        assert "weightzoo.scale_baked_into_lora_B" not in f.metadata()


def test_diffusers_stays_the_default_and_bakes_the_scale(trained: tuple[str, str], tmp_path: Path) -> None:
    dataset, item_id = trained
    assert main(["export", "--dataset", dataset, "--id", item_id, "--out", str(tmp_path)]) == 0
    ds = Dataset(dataset)
    _, row = ds.row(item_id)
    tensors = load_file(tmp_path / WEIGHT_NAME)
    for k, t in ds.layout.unflatten(row).items():
        scale = 27.0 if k.endswith("lora_B.weight") else 1.0
        torch.testing.assert_close(tensors[f"unet.{k}"], t.float() * scale, rtol=0, atol=0)
    with safe_open(tmp_path / WEIGHT_NAME, "pt") as f:
        assert float(f.metadata()["weightzoo.scale_baked_into_lora_B"]) == 27.0


def test_unknown_format_is_a_usage_error(trained: tuple[str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    dataset, item_id = trained
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--dataset", dataset, "--id", item_id, "--out", str(tmp_path), "--format", "kohya"])
    assert exit_.value.code == 2 and "invalid choice: 'kohya'" in capsys.readouterr().err
    out = str(tmp_path / WEIGHT_NAME)  # peft is a folder: a file name is refused in one line
    assert main(["export", "--dataset", dataset, "--id", item_id, "--out", out, "--format", "peft"]) == 2
    assert "writes a folder" in capsys.readouterr().err and not (tmp_path / WEIGHT_NAME).exists()
