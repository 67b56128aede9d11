"""Weight diffusion: blocks, statistics, split, training, resume, generation and the CLI.

The dataset here is synthetic rows of the tiny model's real LoRA layout (``lora_layout``): each row is
a shared offset plus one direction per attribute value plus noise, so what the condition says about a
row is actually in its weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.card import Recipe
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.diffusion.blocks import (
    BlockSpec,
    compute_stats,
    condition_text,
    encode_texts,
    load_rows,
    load_stats,
    pool_text,
    split_ids,
)
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.diffusion.denoiser import (
    Denoiser,
    DenoiserConfig,
    alpha_bar,
    ddim_sample,
    masked_mse,
    noisy,
)
from weightzoo.tasks.diffusion.generator import (
    CONDITION_CHECK,
    FOLLOWS,
    WeightDiffusionModel,
    condition_warning,
    latest_checkpoint,
    train_weight_diffusion,
    write_condition_check,
)
from weightzoo.tasks.diffusion.retrieval import FILE as RETRIEVAL_FILE
from weightzoo.tasks.diffusion.retrieval import knn_weights, loo_residuals
from weightzoo.tasks.identity.config import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread is steadiest

COLOURS = ("red", "green", "blue", "yellow")
HATS = ("none", "hat")


def _rows(layout, n: int, seed: int = 0) -> tuple[list[RowMeta], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = layout.numel
    offset = 0.02 * torch.randn(d, generator=g)
    directions = {v: 0.01 * torch.randn(d, generator=g) for v in COLOURS + HATS}
    rows, vecs = [], []
    for i in range(n):
        attrs = {"colour": COLOURS[i % 4], "accessory": HATS[(i // 4) % 2]}
        vecs.append(offset + directions[attrs["colour"]] + directions[attrs["accessory"]]
                    + 0.002 * torch.randn(d, generator=g))
        rows.append(RowMeta(id=f"subject-{i:05d}", prompt="sks person", attributes=attrs,
                            hparams={"rank": 1, "alpha": 27.0, "method": "lora"}))
    return rows, torch.stack(vecs)


@pytest.fixture(scope="module")
def layout(tiny_pipe):
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.recipes.lora import lora_layout

    return lora_layout(tiny_pipe, FinetuneConfig())


@pytest.fixture(scope="module")
def dataset(layout, tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 rows in two committed shards (so statistics and loading cross shard boundaries)."""
    uri = str(tmp_path_factory.mktemp("wd") / "dataset")
    rows, vecs = _rows(layout, 24)
    ledger = Ledger(uri)
    for b, part in enumerate((slice(0, 10), slice(10, 24))):
        commit_batch(ledger, f"b{b}", layout, rows[part], vecs[part], row_group_size=4)
    return uri




def _config(dataset: str, base: Path, out: Path, **kw) -> WeightDiffusionConfig:
    opts = dict(block_size=128, width=64, depth=1, heads=2, batch_size=16, learning_rate=1e-2, lr_warmup_steps=10,
                checkpoint_every=10, device="cpu", holdout_ids=("subject-00000",), holdout_fraction=0.1)
    return WeightDiffusionConfig(dataset=dataset, base=str(base), out=str(out), **{**opts, **kw})


# -- blocks, statistics, split ------------------------------------------------------------------------


@pytest.mark.parametrize(("numel", "block"), [(2688, 256), (2688, 2688), (10, 3), (7, 16), (12, 4)])
def test_blocks_round_trip_exactly(numel: int, block: int) -> None:
    spec = BlockSpec(numel, block)
    x = torch.randn(5, numel, dtype=torch.float64)
    blocks = spec.cut(x)
    assert blocks.shape == (5, -(-numel // block), block)
    assert torch.equal(spec.reassemble(blocks), x)
    mask = spec.mask()
    assert int(mask.sum()) == numel
    assert torch.all(blocks[:, ~mask] == 0)  # padding is zeros, only in the last block
    assert mask[:-1].all()


def test_statistics_stream_over_shards_and_subsets(dataset: str) -> None:
    ds = Dataset(dataset)
    ids = ds.ids[3:19]
    rows = {i: ds.layout.as_tensor(ds.row(i)[1]).double().numpy() for i in ids}
    x = np.stack([rows[i] for i in ids])
    stats = compute_stats(ds, ids)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.std.numpy(), x.std(0), rtol=1e-3, atol=1e-6)


def test_statistics_from_a_subspace_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"mean": torch.arange(6.0), "std": torch.ones(6) * 2, "components": torch.zeros(2, 6)},
              tmp_path / "subspace.safetensors")
    stats = load_stats(str(tmp_path / "subspace.safetensors"), 6)
    x = torch.randn(3, 6)
    assert torch.allclose(stats.denormalise(stats.normalise(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="layout has 7"):
        load_stats(str(tmp_path / "subspace.safetensors"), 7)


def test_split_is_seeded_and_honours_named_ids() -> None:
    ids = [f"s{i:02d}" for i in range(20)]
    train, hold = split_ids(ids, ["s03"], 0.25, seed=1)
    assert "s03" in hold and len(hold) == 6 and set(train).isdisjoint(hold) and len(train) + len(hold) == 20
    assert split_ids(list(reversed(ids)), ["s03"], 0.25, seed=1) == (train, hold)
    assert split_ids(ids, ["s03"], 0.25, seed=2)[1] != hold
    with pytest.raises(NotFoundError):
        split_ids(ids, ["nope"])


def test_condition_text_lists_attributes_canonically() -> None:
    attrs = {"shape": "circle", "colour": "red"}
    assert condition_text("sks person", attrs, "prompt") == "sks person"
    assert condition_text("sks person", attrs, "prompt+attributes") == "sks person, colour red, shape circle"
    assert condition_text("sks person", {}, "prompt+attributes") == "sks person"


def test_one_step_and_ddim_sampling_shapes_and_padding() -> None:
    spec = BlockSpec(50, 16)
    model = Denoiser(DenoiserConfig(n_blocks=spec.n_blocks, block_size=16, text_dim=8, width=16, depth=1, heads=2))
    text, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    for steps in (1, 4):
        pooled = torch.randn(3, 8)
        out = ddim_sample(model, text, mask, pooled, steps=steps, generator=torch.Generator().manual_seed(0), mask=spec.mask())
        assert out.shape == (3, 4, 16) and torch.isfinite(out).all()
        assert torch.all(out[:, ~spec.mask()] == 0)
    assert alpha_bar(torch.tensor(0.0)) > 0.999 and alpha_bar(torch.tensor(1.0)) < 1e-6


# -- training, resume, generation ----------------------------------------------------------------------


@torch.no_grad()
def _fixed_loss(model: WeightDiffusionModel, denoiser: Denoiser, dataset: str) -> float:
    """The training objective on every training row at fixed noise levels and noise (no sampling noise)."""
    split = json.loads((Path(model.uri) / "split.json").read_text())
    data = load_rows(Dataset(dataset), split["train"], model.stats, model.config.condition)
    states, masks = encode_texts(model.tokenizer, model.text_encoder, data.texts)
    pooled = model.text_stats.normalise(pool_text(states, masks))
    x0, mask = model.spec.cut(data.z), model.spec.mask()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for level in (0.25, 0.5, 0.75, 1.0):
        t = torch.full((len(x0),), level)
        x_t = noisy(x0, t, torch.randn(x0.shape, generator=g)) * mask
        total += float(masked_mse(denoiser(x_t, t, states, masks, pooled), x0, mask))
    return total / 4


@pytest.fixture(scope="module")
def trained(dataset: str, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[WeightDiffusionConfig, object]:
    out = tmp_path_factory.mktemp("wd-model") / "model"
    config = _config(dataset, tiny_base, out, steps=120)
    return config, train_weight_diffusion(config)


def test_training_lowers_the_loss_and_saves_a_complete_folder(trained) -> None:
    config, result = trained
    out = Path(config.out)
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 120 and result.step == 120
    model = WeightDiffusionModel.load(config.out)
    torch.manual_seed(0)
    untrained = Denoiser(model.denoiser.config)
    assert _fixed_loss(model, model.denoiser, config.dataset) < 0.7 * _fixed_loss(model, untrained, config.dataset)
    split = json.loads((out / "split.json").read_text())
    assert "subject-00000" in split["holdout"] and len(split["holdout"]) == 3 and len(split["train"]) == 21
    for name in ("layout.json", "hparams.json", "stats.safetensors", "loss.png", "tokenizer", "text_encoder"):
        assert (out / name).exists(), name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step-0000120.safetensors"]  # older checkpoints are dropped


def test_resume_continues_the_same_trajectory(dataset: str, tiny_base: Path, tmp_path: Path) -> None:
    train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "a", steps=16))
    first = train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "b", steps=10))
    assert first.step == 10 and latest_checkpoint(str(tmp_path / "b"))["step"] == 10
    resumed = train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "b", steps=16))
    assert resumed.resumed_from == 10 and resumed.step == 16
    a = WeightDiffusionModel.load(str(tmp_path / "a")).denoiser.state_dict()
    b = WeightDiffusionModel.load(str(tmp_path / "b")).denoiser.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = json.loads((tmp_path / "a" / "losses.json").read_text())
    lb = json.loads((tmp_path / "b" / "losses.json").read_text())
    assert len(lb) == 16 and np.allclose(la, lb, rtol=1e-4)
    with pytest.raises(ValueError, match="different config"):
        train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "b", steps=20, learning_rate=3e-3))


def test_a_folder_from_before_a_config_field_existed_still_resumes(dataset: str, tiny_base: Path, tmp_path: Path) -> None:
    """A field added since (here the objective's) counts as its default in an older folder's config.json."""
    train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "m", steps=2))
    card = json.loads((tmp_path / "m" / "config.json").read_text())
    for k in ("objective", "task_weight", "task_pairs"):
        del card["config"][k]
    (tmp_path / "m" / "config.json").write_text(json.dumps(card))
    assert train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "m", steps=3)).resumed_from == 2
    with pytest.raises(InputError, match=r"different config \(task_weight\)"):
        train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "m", steps=4, task_weight=2.0))


def test_task_objective_is_refused_for_a_dataset_whose_engine_makes_no_examples(
        dataset: str, layout, tiny_base: Path, tmp_path: Path) -> None:
    """Identity rows (diffusers-lora, or no card at all) have no task loss: one line, before anything is written."""
    carded = str(tmp_path / "carded")
    rows, vecs = _rows(layout, 4)
    commit_batch(Ledger(carded), "b0", layout, rows, vecs, Recipe.of("diffusers-lora", "fp", FinetuneConfig()))
    for uri, reason in ((carded, "engine 'diffusers-lora' of .* offers no task loss"), (dataset, "has no dataset card")):
        out = tmp_path / f"out-{Path(uri).name}"
        with pytest.raises(InputError, match=f"objective 'task'.*{reason}") as e:
            train_weight_diffusion(_config(uri, tiny_base, out, steps=2, objective="task"))
        assert "\n" not in str(e.value) and not out.exists()
    assert len(Dataset(carded)) == len(set(Dataset(carded).ids)) == 4

def test_generation_is_seeded_and_un_normalised(trained) -> None:
    """Seeds make generation reproducible; outputs are whole layout vectors on the data's scale."""
    config, _ = trained
    model = WeightDiffusionModel.load(config.out)
    texts = [model.text("sks person", {"colour": "red", "accessory": "hat"}), "sks person"]
    a = model.generate(texts, steps=3, seed=1)
    assert a.shape == (2, model.layout.numel) and torch.isfinite(a).all()
    assert torch.equal(a, model.generate(texts, steps=3, seed=1))
    assert not torch.equal(a, model.generate(texts, steps=3, seed=2))
    one = model.generate(texts, steps=1, seed=0)
    # un-normalised: close to the data's scale, not to unit scale
    assert (one - model.stats.mean).abs().mean() < 3 * model.stats.std.mean()


def test_generate_cli_writes_a_lora_diffusers_loads(trained, tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("weightzoo.tasks.finetune.export")
    from weightzoo.cli import main
    from weightzoo.tasks.identity.base_model import load_base

    config, _ = trained
    out = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert main(["generate", "--model", config.out, "--prompt", "sks person", "--attr", "colour=red",
                 "--attr", "accessory=hat", "--steps", "2", "--out", str(out)]) == 0
    pipe = load_base(str(tiny_base))  # a fresh pipeline: never leave adapters on the shared one
    before = pipe.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.ones(1, 3, 32)).sample
    pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    after = pipe.unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.ones(1, 3, 32)).sample
    assert not torch.allclose(before, after)
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(out)]) == 2


@pytest.mark.usefixtures("prefect_harness")
def test_flow_trains_and_publishes_curve_and_checkpoint(dataset: str, tiny_base: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow

    result = train_weight_diffusion_flow(_config(dataset, tiny_base, tmp_path / "m", steps=4))
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert result.step == 4 and (tmp_path / "m" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert {"weight-diffusion-progress", "weight-diffusion-loss", "weight-diffusion-summary"} <= keys


def test_train_cli_and_a_model_folder_on_s3(dataset: str, tiny_base: Path, s3_bucket: str, tmp_path: Path) -> None:
    """The CLI trains in-process into an s3:// folder; generation reads it back from there."""
    from weightzoo.cli import main

    out = f"{s3_bucket}/wd"
    assert main(["train-diffusion", "--dataset", dataset, "--base", str(tiny_base), "--out", out, "--no-prefect",
                 "--steps", "3", "--width", "16", "--depth", "1", "--block-size", "512", "--holdout-fraction", "0.25",
                 "--checkpoint-every", "2", "--device", "cpu"]) == 0
    model = WeightDiffusionModel.load(out)
    assert model.step == 3 and len(json.loads(_cat(f"{out}/split.json"))["holdout"]) == 6
    assert model.generate(["sks person"]).shape == (1, model.layout.numel)


def _cat(uri: str) -> bytes:
    from weightzoo.storage.fs import filesystem

    fs, path = filesystem(uri)
    return fs.cat_file(path)


# -- residual generator: k-nearest retrieval + a learnt correction ------------------------------------


def test_knn_weights_are_inverse_distance_an_exact_match_takes_all_and_leave_one_out_skips_self() -> None:
    keys = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    idx, w = knn_weights(torch.tensor([[0.25], [3.0]]), keys, k=2)
    assert idx.tolist() == [[0, 1], [2, 3]]  # distances 0.25, 0.75: weights 3 : 1; two exact matches share
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    idx, w = knn_weights(torch.tensor([[2.9]]), keys, k=3)
    assert idx.tolist() == [[2, 3, 1]] and w[0, 0] == w[0, 1] and w[0, 2] < w[0, 0]  # ties: row order
    idx, w = knn_weights(keys, keys, k=1, leave_one_out=True)
    assert idx[:, 0].tolist() == [1, 0, 3, 2] and torch.equal(w, torch.ones(4, 1))
    assert knn_weights(keys[:1], keys, k=10, leave_one_out=True)[0].shape == (1, 3)  # k capped at n - 1
    with pytest.raises(InputError):
        knn_weights(keys[:1], keys[:1], k=2, leave_one_out=True)


def test_residual_targets_are_leave_one_out_and_unit_scale() -> None:
    keys, z = torch.tensor([[0.0], [1.0], [3.0]]), torch.randn(3, 5, dtype=torch.float32)
    expected = torch.stack([z[0] - z[1], z[1] - z[0], z[2] - z[1]])  # each row's nearest *other* row
    targets, scale, near = loo_residuals(z.clone(), keys, k=1)
    torch.testing.assert_close(targets * scale, expected)
    torch.testing.assert_close(targets.std(0, unbiased=False), torch.ones(5))
    assert near is None
    targets, scale, near = loo_residuals(z.clone(), keys, k=1, keep_retrieval=True)  # objective 'task' keeps them
    torch.testing.assert_close(near, z - expected)


@pytest.fixture(scope="module", params=["structured", "prompt+attributes"])
def residual(request, dataset: str, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> WeightDiffusionConfig:
    out = tmp_path_factory.mktemp("wd-residual") / "model"
    config = _config(dataset, tiny_base, out, steps=30, residual_k=4, condition=request.param)
    train_weight_diffusion(config)
    return config


def _expected_knn(model: WeightDiffusionModel, dataset: str, queries: list[dict], k: int) -> torch.Tensor:
    """The k-nearest interpolation computed from scratch: training rows from the dataset, keys from the encoder."""
    ds = Dataset(dataset)
    train = json.loads((Path(model.uri) / "split.json").read_text())["train"]
    rows = torch.stack([ds.layout.as_tensor(ds.row(i)[1]).float() for i in train])
    attrs = [dict(ds.row(i)[0]["attributes"]) for i in train]
    if model.structured is not None:
        keys, q = model.structured.encode_many(attrs), model.structured.encode_many(queries)
    else:
        def pooled(rows_: list[dict]) -> torch.Tensor:
            states, masks = encode_texts(model.tokenizer, model.text_encoder, [model.text("sks person", a) for a in rows_])
            return model.text_stats.normalise(pool_text(states, masks))
        keys, q = pooled(attrs), pooled(queries)
    out = []
    for d in torch.cdist(q.double(), keys.double()):
        near = sorted(range(len(d)), key=lambda j: (float(d[j]), j))[:k]
        exact = [j for j in near if d[j] <= 1e-9]
        w = {j: 1.0 for j in exact} if exact else {j: 1.0 / float(d[j]) for j in near}
        out.append(sum(rows[j] * (v / sum(w.values())) for j, v in w.items()))
    return torch.stack(out)


def test_untrained_residual_generator_is_exactly_the_knn_interpolation(residual, dataset: str) -> None:
    model = WeightDiffusionModel.load(residual.out)
    torch.manual_seed(0)
    model.denoiser = Denoiser(model.denoiser.config)  # the denoiser as training starts it
    queries = [{"accessory": "hat", "colour": "red"}, {"accessory": "none", "colour": "blue"}]
    # no exact match: between two conditions (structured), or the bare prompt (text)
    queries.append({"accessory": "hat", "colour": "red+blue"} if model.structured is not None else {})
    texts = [model.text("sks person", q) for q in queries]
    base = model.retrieve(texts)
    torch.testing.assert_close(base, _expected_knn(model, dataset, queries, 4), rtol=1e-5, atol=1e-7)
    for steps in (1, 3):
        assert torch.equal(model.generate(texts, steps=steps), base)


def test_residual_generator_learns_a_correction_resumes_and_loads_from_a_copied_folder(
        dataset: str, tiny_base: Path, tmp_path: Path) -> None:
    opts = {"residual_k": 4, "condition": "structured"}
    train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "a", steps=16, **opts))
    train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "b", steps=10, **opts))
    resumed = train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "b", steps=16, **opts))
    assert resumed.resumed_from == 10 and resumed.step == 16
    shutil.copytree(tmp_path / "b", tmp_path / "copy")
    shutil.rmtree(tmp_path / "b")
    a, copy = WeightDiffusionModel.load(str(tmp_path / "a")), WeightDiffusionModel.load(str(tmp_path / "copy"))
    for k, v in a.denoiser.state_dict().items():
        torch.testing.assert_close(v, copy.denoiser.state_dict()[k], rtol=1e-5, atol=1e-6)
    texts = [copy.text("", {"accessory": "hat", "colour": "red+green"}), copy.text("", {"accessory": "none", "colour": "blue"})]
    gen = copy.generate(texts)
    torch.testing.assert_close(gen, a.generate(texts), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(gen).all() and not torch.allclose(gen, copy.retrieve(texts))  # a correction was learnt
    assert copy.retrieval.rows.dtype == copy.layout.torch_dtype and len(copy.retrieval.rows) == 21
    assert not [p for p in (tmp_path / "copy").rglob("*") if p.suffix in (".pt", ".pkl", ".bin", ".pickle")]
    with pytest.raises(ValueError, match="different config.*residual_k"):
        train_weight_diffusion(_config(dataset, tiny_base, tmp_path / "copy", steps=20, **{**opts, "residual_k": 2}))


def test_a_plain_generator_has_no_retrieval_and_the_cli_takes_residual_k(trained) -> None:
    from weightzoo.cli import build_parser

    with pytest.raises(InputError, match="not a residual generator"):
        WeightDiffusionModel.load(trained[0].out).retrieve(["sks person"])
    args = build_parser("train-diffusion").parse_args(["train-diffusion", "--dataset", "D", "--base", "B", "--out", "O",
                                                       "--residual-k", "3", "--form", "svd", "--inner-steps", "2"])
    assert (args.residual_k, args.form, args.inner_steps, args.inner_lr) == (3, "svd", 2, None)


@pytest.mark.parametrize("residual", ["structured"], indirect=True)
def test_generate_warns_when_the_model_ignores_its_condition(residual, tmp_path: Path, capsys) -> None:
    """The condition check of a model that follows its condition (the k-nearest retrieval does by construction)
    says so; the same folder with the condition's paths zeroed (cross-attention out, pooled MLP out) gives
    generations equal for every condition, and `generate` warns in one line."""
    from safetensors.torch import load_file, save_file

    from weightzoo.cli import main

    check = json.loads((Path(residual.out) / CONDITION_CHECK).read_text())
    assert check["conditions"] == 8 and check["ratio"] > FOLLOWS and condition_warning(residual.out) is None
    deaf = tmp_path / "deaf"
    shutil.copytree(residual.out, deaf)
    ckpt = next((deaf / "checkpoints").glob("step-*.safetensors"))
    tensors = load_file(ckpt)
    for name in tensors:
        if ".cross_attn.out_proj." in name or name.startswith("model.pooled.2."):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, ckpt)
    model = WeightDiffusionModel.load(str(deaf))
    model.retrieval = None  # what its denoiser alone makes of each condition
    texts = [model.text("sks person", {"accessory": "hat", "colour": c}) for c in ("red", "blue")]
    torch.testing.assert_close(model.generate(texts[:1]), model.generate(texts[1:]))  # same noise, either condition
    (deaf / RETRIEVAL_FILE).unlink()
    config = json.loads((deaf / "config.json").read_text())
    config["config"]["residual_k"] = 0
    (deaf / "config.json").write_text(json.dumps(config))
    check = write_condition_check(str(deaf), texts, seed=0)
    assert check is not None and check["ratio"] < FOLLOWS  # ~1: two conditions differ as two noises do
    out = tmp_path / "lora.safetensors"
    assert main(["generate", "--model", str(deaf), "--prompt", "sks person", "--attr", "colour=red",
                 "--attr", "accessory=hat", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert out.exists() and len(err) == 1 and "ignores its condition" in err[0] and "structured" in err[0]


@pytest.mark.parametrize("residual", ["structured"], indirect=True)
def test_init_writes_a_start_a_manifest_row_trains_from(residual, tiny_base: Path, tmp_path: Path) -> None:
    """`weightzoo init` writes the retrieval (auto, a residual model) as a LoRA file; a build row naming it as
    `init` starts from it, a row naming a LoRA of another layout fails alone, named, and a missing file is
    refused before anything loads."""
    from helpers import TINY_FINETUNE
    from safetensors.torch import save_file

    from weightzoo.cli import main
    from weightzoo.tasks.finetune.batch import run_batch
    from weightzoo.tasks.finetune.manifest import load_and_validate
    from weightzoo.tasks.finetune.row import ManifestError
    from weightzoo.tasks.finetune.starts import load_lora_vector
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    folder = tmp_path / "m"
    manifest = Path(write_demo_manifest(str(folder), 3, images_per_subject=1, size=32))
    attrs = {"accessory": "hat", "colour": "red+blue"}  # no training row has it: an interpolation
    assert main(["init", "--model", residual.out, *[a for k, v in attrs.items() for a in ("--attr", f"{k}={v}")],
                 "--out", str(folder / "start.safetensors")]) == 0
    model = WeightDiffusionModel.load(residual.out)
    start = load_lora_vector(str(folder / "start.safetensors"), model.layout)
    stored = model.retrieve([model.text("", attrs)])[0].to(model.layout.torch_dtype).float()  # in the rows' dtype
    torch.testing.assert_close(start, stored, rtol=1e-6, atol=1e-8)
    save_file({"other.lora_A.weight": torch.zeros(1, 4)}, folder / "other.safetensors")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["init"], rows[1]["init"] = "start.safetensors", "other.safetensors"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = FinetuneConfig(**{**TINY_FINETUNE, "learning_rate": 1e-12})  # the start, moved by nothing visible
    ids = [r["id"] for r in rows]
    out = run_batch("b-init", ids, str(manifest), str(tiny_base), str(tmp_path / "ds"), config)
    assert out.committed == [ids[0], ids[2]] and [i for i, _ in out.failed] == [ids[1]]
    assert "other.safetensors is not a LoRA of this layout" in out.failed[0][1]
    ds = Dataset(str(tmp_path / "ds"))
    assert sorted(ds.ids) == sorted([ids[0], ids[2]]) and len(set(ds.ids)) == 2
    torch.testing.assert_close(torch.from_numpy(ds.row(ids[0])[1]).float(), start.to(torch.float16).float())
    assert not torch.allclose(torch.from_numpy(ds.row(ids[2])[1]).float(), start.to(torch.float16).float())
    rows[2]["init"] = "missing.safetensors"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=rf"row 3 \(id '{ids[2]}'\): init file not found: .*missing\.safetensors"):
        load_and_validate(str(manifest))
