"""Weight diffusion (Gong et al., ECCV 2024): learn to generate a concept's LoRA from its text.

``train_weight_diffusion(config)`` reads a dataset, holds out a split, standardises and cuts every
training row into blocks (``weight_blocks``) and trains the block denoiser (``denoiser``) on them.
With ``residual_k`` > 0 it generates ``retrieval + correction`` (``retrieval``): the denoiser's targets are
each row's leave-one-out residual from the k-nearest interpolation, and untrained it adds exactly nothing.
Everything ``generate`` needs lives in the model folder, so a model folder is all you ship::

    config.json         the resolved training config, the denoiser's shape, format version
    layout.json         the dataset's weight layout        hparams.json   the rows' fine-tune hparams
    stats.safetensors   per-parameter mean / std, and text_mean / text_std of the pooled conditions
    split.json          train and held-out ids
    retrieval.safetensors   residual models only (residual_k > 0): training rows (split order), keys, k
    text_encoder/, tokenizer/   the base model's own text encoder (the condition), save_pretrained
    checkpoints/step-XXXXXXX.safetensors   denoiser + AdamW state (safetensors; never pickle)
    checkpoints/latest.json     written last: the commit of a checkpoint (step, file, loss history)
    losses.json, loss.png       the loss curve
    condition_check.json        how far generations for different training conditions are apart, against
                                one condition's two seeds (``generate`` warns when the condition has no effect)

Resume: a rerun with the same ``out`` continues from ``latest.json`` up to ``steps``; a config that
differs in anything but ``steps``/``checkpoint_every``/``device`` is refused, never silently restarted.
Batches, timesteps and noise of step ``k`` come from a generator seeded by ``(seed, k)``, so a
resumed run follows the uninterrupted run's trajectory exactly (on the same device).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import (
    filesystem,
    is_local,
    join,
    relative_ref,
    resolve_ref,
    same_uri,
    uri_exists,
    write_bytes,
)
from weightzoo.storage.layout import Layout
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks import stop
from weightzoo.tasks.device import autocast, resolve_device
from weightzoo.tasks.diffusion.blocks import (
    BlockSpec,
    RowForm,
    Stats,
    compute_stats,
    condition_text,
    dump_json,
    encode_texts,
    load_rows,
    load_stats,
    pool_text,
    split_ids,
    text_stats,
)
from weightzoo.tasks.diffusion.config import DenoiserSize, WeightDiffusionConfig
from weightzoo.tasks.diffusion.denoiser import (
    Denoiser,
    DenoiserConfig,
    ddim_sample,
    masked_mse,
    noisy,
)
from weightzoo.tasks.diffusion.objective import TaskObjective, engine_task_loss
from weightzoo.tasks.diffusion.retrieval import FILE as RETRIEVAL_FILE
from weightzoo.tasks.diffusion.retrieval import RetrievalIndex, loo_residuals
from weightzoo.tasks.finetune import gauge
from weightzoo.tasks.seeds import stable_seed
from weightzoo.tasks.subspace.pca import card_dataset

FORMAT_VERSION = 1
# Attributes as numbers and one-hots (tasks/concepts/condition.py) instead of text: for editing concepts,
# whose attributes are the concept. The features enter where the text states do, as one "token".
STRUCTURED = "structured"
CONDITION_NAME = "condition.json"
CONDITION_CHECK = "condition_check.json"
# Generations for different conditions closer than this many times one condition's two seeds: the model
# ignores its condition (a plain generator that learnt the rows' mean; e.g. 16 rows, a text condition).
FOLLOWS = 1.5
CHECK_CONDITIONS = 8  # distinct training conditions the check generates for
# Changing these does not change what is learnt, so a resume may change them.
_RESUMABLE = {"steps", "checkpoint_every", "device", "out"}


@dataclass(frozen=True)
class TrainResult:
    uri: str
    step: int
    loss: float
    resumed_from: int
    train_ids: int
    holdout_ids: int


# -- small helpers -------------------------------------------------------------------------------------


def _read_json(uri: str) -> dict:
    fs, path = filesystem(uri)
    return json.loads(fs.cat_file(path))


def _local_folder(uri: str) -> tuple[str, Callable[[], None]]:
    """A local folder for ``uri`` and a function that uploads it if ``uri`` is remote."""
    fs, path = filesystem(uri)
    if is_local(fs):
        os.makedirs(path, exist_ok=True)
        return path, lambda: None
    tmp = tempfile.mkdtemp()
    return tmp, lambda: fs.put(tmp.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def load_text_encoder(uri: str, device: torch.device | str = "cpu"):
    """(tokenizer, text encoder) from a diffusers pipeline folder or a model folder; local or fsspec.

    A remote folder's ``tokenizer/`` and ``text_encoder/`` alone are fetched into a temporary folder
    (never the UNet or VAE), fresh each time, so a rewritten folder is never read from a stale cache.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if not is_local(fs):
            local = tmp
            for sub in ("tokenizer", "text_encoder"):
                fs.get(join(path, sub) + "/", os.path.join(tmp, sub) + "/", recursive=True)
        tok = CLIPTokenizer.from_pretrained(local, subfolder="tokenizer", local_files_only=True)
        enc = CLIPTextModel.from_pretrained(local, subfolder="text_encoder", local_files_only=True)
    return tok, enc.to(device).eval()


# -- checkpoints ---------------------------------------------------------------------------------------


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW state as flat tensors (for safetensors) plus its param groups (for JSON)."""
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: str, step: int, model: Denoiser, opt: torch.optim.Optimizer, losses: Sequence[float]) -> str:
    """Write the step's tensors, then ``latest.json`` (the commit), then drop older checkpoint files."""
    name = f"step-{step:07d}.safetensors"
    opt_tensors, groups = _optimizer_tensors(opt)
    save_tensors(join(out, "checkpoints", name), {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors})
    fs, root = filesystem(out)
    write_bytes(fs, join(root, "checkpoints", "latest.json"),
                dump_json({"step": step, "file": name, "param_groups": groups, "losses": list(losses)}))
    for old in fs.ls(join(root, "checkpoints"), detail=False):
        if old.endswith(".safetensors") and not old.endswith(name):
            fs.rm(old)
    return join(out, "checkpoints", name)


def latest_checkpoint(out: str) -> dict | None:
    uri = join(out, "checkpoints", "latest.json")
    return _read_json(uri) if uri_exists(uri) else None


def _model_tensors(out: str, latest: dict) -> dict[str, torch.Tensor]:
    return load_tensors(join(out, "checkpoints", latest["file"]))


# -- training -------------------------------------------------------------------------------------------


# Field names of model folders written before the names were shared with FinetuneConfig.
_RENAMED_FIELDS = {"lr": "learning_rate", "warmup_steps": "lr_warmup_steps"}


def _renamed(saved: dict) -> dict:
    return {_RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}


def _check_resumable(out: str, config: WeightDiffusionConfig) -> None:
    card = _read_json(join(out, "config.json"))
    now = config.model_dump(mode="json")
    # A field added since the folder was written holds its default there (its run knew no other value).
    saved = {**WeightDiffusionConfig(dataset="", base="", out="").model_dump(mode="json"), **_renamed(card["config"])}
    diff = sorted(k for k in now if k not in _RESUMABLE and saved.get(k) != now[k]
                  and not (k == "dataset" and _moved_dataset(out, card, now[k])))
    if diff:
        raise InputError(f"{out} holds a run with a different config ({', '.join(diff)}); use a new --out to start over")


def _moved_dataset(out: str, card: dict, dataset: str) -> bool:
    """Whether ``dataset`` is the run's dataset where the model folder's card finds it (moved together)."""
    relative = card.get("dataset_relative")
    return bool(relative) and same_uri(resolve_ref(relative, out), dataset)


def model_dataset(uri: str, card: dict) -> str:
    """The dataset a model folder was trained on: beside the folder as recorded (the two moved together),
    else where it was; ``NotFoundError`` if neither exists."""
    recorded = {"dataset": card["config"]["dataset"], "dataset_relative": card.get("dataset_relative")}
    return card_dataset(uri, recorded, "config.json")


def _dataset_if_found(uri: str, card: dict) -> str:
    """``model_dataset``, or the recorded URI when the dataset is gone (generating needs no dataset)."""
    try:
        return model_dataset(uri, card)
    except FileNotFoundError:
        return card["config"]["dataset"]


def row_form(config: WeightDiffusionConfig, layout: Layout) -> RowForm | None:
    """How rows are re-expressed before the run learns from them: None as stored, or the SVD form (refused
    in one line for rows that have no LoRA factors, or with ``stats`` computed on rows as stored)."""
    if config.form == "rows":
        return None
    gauge.factor_pairs(layout)  # the refusal, before anything is read or written
    if config.stats:
        raise InputError("form 'svd' computes its own statistics (of the rows in that form); leave stats unset")
    return functools.partial(gauge.svd_form, layout)


def _structured_inputs(ds: Dataset, train: list[str], stats: Stats, residual: bool, form: RowForm | None):
    """Rows, condition keys, (n, 1, F) feature "states", masks and the fitted encoder of a structured condition."""
    from weightzoo.tasks.concepts.condition import StructuredCondition

    data = load_rows(ds, train, stats, "prompt", raw=residual, form=form)
    meta = ds.metadata(["id", "attributes"])
    attrs = dict(zip(meta.column("id").to_pylist(), (dict(a or []) for a in meta.column("attributes").to_pylist()),
                     strict=True))
    encoder = StructuredCondition.fit([attrs[i] for i in train])
    data.texts = [json.dumps(attrs[i], sort_keys=True) for i in train]
    texts = sorted(set(data.texts))
    feats = encoder.encode_many([json.loads(t) for t in texts])
    return data, texts, feats[:, None, :], torch.ones(len(texts), 1, dtype=torch.bool), encoder


def _condition_inputs(config: WeightDiffusionConfig, ds: Dataset, train: list[str], stats: Stats,
                      form: RowForm | None):
    """(rows, distinct condition texts, states, masks, encoder): text-encoder states, or structured features."""
    residual = config.residual_k > 0  # the retrieval index keeps the rows as stored
    if config.condition == STRUCTURED:
        return _structured_inputs(ds, train, stats, residual, form)
    data = load_rows(ds, train, stats, config.condition, raw=residual, form=form)
    tok, enc = load_text_encoder(config.base)
    texts = sorted(set(data.texts))  # each distinct condition is encoded once
    states, masks = encode_texts(tok, enc, texts)
    return data, texts, states, masks, (tok, enc)


def _save_encoder(out: str, encoder) -> None:
    """The condition's encoder into the model folder: condition.json, or the text encoder's folders."""
    if not isinstance(encoder, tuple):
        fs, root = filesystem(out)
        write_bytes(fs, join(root, CONDITION_NAME), encoder.to_json())
        return
    tok, enc = encoder
    local, upload = _local_folder(out)
    tok.save_pretrained(Path(local, "tokenizer"))
    enc.save_pretrained(Path(local, "text_encoder"), safe_serialization=True)
    upload()


def _prepare_folder(config: WeightDiffusionConfig, ds: Dataset, train: list[str], holdout: list[str],
                    stats: Stats, tstats: Stats, denoiser: DenoiserConfig, encoder,
                    retrieval: RetrievalIndex | None) -> None:
    """Write everything ``generate`` needs besides the denoiser weights (once, at the first run)."""
    out = config.out
    fs, root = filesystem(out)
    meta = ds.metadata(["id", "hparams"])
    hparams = json.loads(meta.column("hparams")[0].as_py() or "{}") if meta.num_rows else {}
    write_bytes(fs, join(root, "layout.json"), ds.layout.to_json().encode())
    write_bytes(fs, join(root, "hparams.json"), dump_json(hparams))
    write_bytes(fs, join(root, "split.json"), dump_json({"train": train, "holdout": holdout}))
    save_tensors(join(out, "stats.safetensors"),
                 {"mean": stats.mean, "std": stats.std, "text_mean": tstats.mean, "text_std": tstats.std})
    _save_encoder(out, encoder)
    if retrieval is not None:
        retrieval.save(join(out, RETRIEVAL_FILE))
    # config.json last: its presence says the folder is complete.
    write_bytes(fs, join(root, "config.json"), dump_json({
        "format": FORMAT_VERSION, "config": config.model_dump(mode="json"), "denoiser": denoiser.model_dump(),
        "numel": ds.layout.numel, "layout_fingerprint": ds.layout.fingerprint,
        "dataset_relative": relative_ref(config.dataset, out),  # a dataset moved with the folder is found
    }))


@dataclass
class _Prepared:
    """A run's inputs, computed once: the standardised rows as blocks, the conditions, the denoiser shape."""

    spec: BlockSpec
    blocks: torch.Tensor  # (n, B, S) targets: standardised training rows, or their scaled residuals
    states: torch.Tensor  # (m, L, d) condition states, one per distinct condition
    masks: torch.Tensor
    pooled: torch.Tensor  # (m, d) normalised pooled conditions
    text_index: torch.Tensor  # (n,) row → condition
    dcfg: DenoiserConfig
    train: list[str]
    holdout: list[str]
    texts: list[str]  # the distinct condition texts, in the order of ``states``
    residual: tuple[torch.Tensor, torch.Tensor] | None = None  # objective 'task': (LOO retrievals, scale)
    form: RowForm | None = None  # how the rows were re-expressed (``row_form``)


def condition_keys(states: torch.Tensor, pooled: torch.Tensor, structured: bool) -> torch.Tensor:
    """(n, F) what retrieval compares: the structured features, or the standardised pooled text."""
    return states[:, 0, :] if structured else pooled


def _targets(config: WeightDiffusionConfig, data, keys: torch.Tensor,
             spec: BlockSpec) -> tuple[torch.Tensor, RetrievalIndex | None, torch.Tensor | None]:
    """The denoiser's blocks: the standardised rows, or (``residual_k`` > 0) their leave-one-out
    residuals from the k-nearest retrieval, scaled to unit std (computed in ``data.z``'s memory), with the
    index ``generate`` needs and, for objective 'task', the standardised leave-one-out retrievals."""
    if not config.residual_k:
        return spec.cut(data.z), None, None
    # objective 'task' scores whole rows: it adds each target back onto its leave-one-out retrieval, kept
    # (n × D float32) on the training device for the whole run
    targets, scale, near = loo_residuals(data.z, keys, config.residual_k, keep_retrieval=config.objective == "task")
    return spec.cut(targets), RetrievalIndex(data.raw, keys, config.residual_k, scale), near


def _prepare(config: WeightDiffusionConfig, ds: Dataset, resuming: bool) -> _Prepared:
    """Split, statistics and conditions; a first run writes the model folder, a resumed one is checked
    against it (same split, same statistics), never silently restarted."""
    train, holdout = split_ids(ds.ids, config.holdout_ids, config.holdout_fraction, config.split_seed)
    spec = BlockSpec(ds.layout.numel, config.block_size)
    form = row_form(config, ds.layout)
    if resuming:
        _check_resumable(config.out, config)
        if _read_json(join(config.out, "split.json"))["train"] != train:
            raise InputError(f"the dataset's rows changed since {config.out} was started; use a new --out")
        saved = load_tensors(join(config.out, "stats.safetensors"))
        stats = Stats(saved["mean"], saved["std"])
    else:
        stats = load_stats(config.stats, spec.numel) if config.stats else compute_stats(ds, train, form)
    data, texts, states, masks, encoder = _condition_inputs(config, ds, train, stats, form)
    size = {k: getattr(config, k) for k in DenoiserSize.model_fields}
    dcfg = DenoiserConfig(n_blocks=spec.n_blocks, block_size=spec.block_size, text_dim=states.shape[-1],
                          residual=config.residual_k > 0, **size)
    tstats = Stats(saved["text_mean"], saved["text_std"]) if resuming else text_stats(pool_text(states, masks))
    pooled = tstats.normalise(pool_text(states, masks))
    text_index = torch.tensor([texts.index(t) for t in data.texts])
    keys = condition_keys(states, pooled, config.condition == STRUCTURED)[text_index]
    blocks, retrieval, near = _targets(config, data, keys, spec)
    if not resuming:
        _prepare_folder(config, ds, train, holdout, stats, tstats, dcfg, encoder, retrieval)
    residual = None if near is None else (near, retrieval.scale)
    return _Prepared(spec, blocks, states, masks, pooled, text_index, dcfg, train, holdout, texts, residual, form)


def _resume(config: WeightDiffusionConfig, prep: _Prepared, device: torch.device,
            latest: dict | None) -> tuple[Denoiser, torch.optim.Optimizer, int, list[float]]:
    """The seeded model and optimiser, restored from the latest checkpoint when there is one."""
    torch.manual_seed(stable_seed(config.seed, "init"))
    model = Denoiser(prep.dcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if latest is None:
        return model, opt, 0, []
    tensors = _model_tensors(config.out, latest)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer(opt, tensors, latest["param_groups"])
    return model, opt, int(latest["step"]), list(latest["losses"])


def _train_loop(config: WeightDiffusionConfig, prep: _Prepared, model: Denoiser, opt: torch.optim.Optimizer,
                start: int, losses: list[float], device: torch.device,
                progress: Callable[[int, int, float], None] | None, task: TaskObjective | None = None) -> list[float]:
    """Steps ``start`` .. ``config.steps``; each step's batch, timesteps and noise come from ``(seed, step)``;
    ``task`` (objective 'task') adds the task loss of the batch's one-step generations to the weight loss."""
    spec, blocks, mask = prep.spec, prep.blocks.to(device), prep.spec.mask().to(device)
    states, masks, pooled = prep.states.to(device), prep.masks.to(device), prep.pooled.to(device)
    text_index = prep.text_index.to(device)
    model.train()
    pending: list[torch.Tensor] = []
    for step in range(start, config.steps):
        stop.check()  # an interrupted command ends here, within a step
        g = torch.Generator().manual_seed(stable_seed(config.seed, "step", step))
        idx = torch.randint(0, len(blocks), (config.batch_size,), generator=g).to(device)
        t = torch.rand(config.batch_size, generator=g).to(device)
        noise = torch.randn(config.batch_size, spec.n_blocks, spec.block_size, generator=g).to(device)
        warm = config.lr_warmup_steps
        for group in opt.param_groups:
            group["lr"] = config.learning_rate * (min(1.0, (step + 1) / warm) if warm else 1.0)
        with autocast(config.mixed_precision, device):
            c = text_index[idx]
            cond = (states[c], masks[c], pooled[c])
            pred = model(noisy(blocks[idx], t, noise) * mask, t, *cond)
        loss = masked_mse(pred, blocks[idx], mask)
        if task is not None:  # scores what one-step `generate` outputs: x0 predicted from pure noise at t = 1
            start_noise = torch.randn(noise.shape, generator=g).to(device)  # drawn last: batch, t, noise as objective 'weights'
            with autocast(config.mixed_precision, device):
                first = model(start_noise * mask, torch.ones_like(t), *cond)
            loss = loss + task(first, idx, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        pending.append(loss.detach())
        done = step + 1
        checkpoint = done % config.checkpoint_every == 0 or done == config.steps
        if checkpoint or done % 10 == 0:  # reading losses back syncs the GPU: every 10 steps, not every step
            losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            if progress is not None:
                progress(done, config.steps, losses[-1])
        if checkpoint:
            save_checkpoint(config.out, done, model, opt, losses)
    return losses


def train_weight_diffusion(
    config: WeightDiffusionConfig, progress: Callable[[int, int, float], None] | None = None
) -> TrainResult:
    """Train (or resume) the weight denoiser on ``config.dataset`` minus the held-out ids; returns the model URI.

    ``progress(step, total, loss)`` is called every 10 steps and at each checkpoint.
    """
    device = resolve_device(config.device)
    ds = Dataset(config.dataset)
    task_loss = engine_task_loss(config, ds, device)  # objective 'task': refused here, before anything is written
    resuming = uri_exists(join(config.out, "config.json"))
    prep = _prepare(config, ds, resuming)
    task = None if task_loss is None else TaskObjective.bind(task_loss, config, prep.spec, prep.train, device,
                                                                   prep.residual, prep.form)
    latest = latest_checkpoint(config.out) if resuming else None
    model, opt, start, losses = _resume(config, prep, device, latest)
    losses = _train_loop(config, prep, model, opt, start, losses, device, progress, task)
    write_loss_curve(config.out, losses)
    write_condition_check(config.out, prep.texts[:CHECK_CONDITIONS], config.seed)
    return TrainResult(config.out, max(start, config.steps), _smoothed(losses)[-1] if losses else math.nan,
                       start, len(prep.train), len(prep.holdout))


def _smoothed(losses: Sequence[float], window: int = 50) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(losses):
        acc += x - (losses[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def write_loss_curve(out: str, losses: Sequence[float]) -> str:
    """``losses.json`` and ``loss.png`` (raw and 50-step moving average, log scale) in the model folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs, root = filesystem(out)
    write_bytes(fs, join(root, "losses.json"), json.dumps(list(losses)).encode())
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, label="step")
    ax.plot(range(1, len(losses) + 1), _smoothed(losses), lw=1.5, label="moving average (50)")
    ax.set(xlabel="step", ylabel="masked x0 MSE (normalised weights)", yscale="log", title="weight diffusion")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(fs, join(root, "loss.png"), buf.getvalue())
    return join(out, "loss.png")


# -- generation -----------------------------------------------------------------------------------------


@dataclass
class WeightDiffusionModel:
    """A trained model folder, loaded: denoiser, statistics, layout, fine-tune hparams, text encoder."""

    uri: str
    config: WeightDiffusionConfig
    denoiser: Denoiser
    spec: BlockSpec
    stats: Stats
    text_stats: Stats
    layout: Layout
    hparams: dict
    tokenizer: object
    text_encoder: object
    step: int
    structured: object = None  # tasks.concepts.condition.StructuredCondition when condition == "structured"
    retrieval: RetrievalIndex | None = None  # residual models (residual_k > 0): the base their correction adds to

    @classmethod
    def load(cls, uri: str, device: str = "cpu") -> WeightDiffusionModel:
        if not uri_exists(join(uri, "config.json")):
            raise NotFoundError(f"no weight-diffusion model (config.json) at {uri}")
        card = _read_json(join(uri, "config.json"))
        latest = latest_checkpoint(uri)
        if latest is None:
            raise NotFoundError(f"{uri} has no checkpoint yet (training has not saved one)")
        dev = resolve_device(device)
        dcfg = DenoiserConfig(**card["denoiser"])
        model = Denoiser(dcfg)
        tensors = _model_tensors(uri, latest)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        st = load_tensors(join(uri, "stats.safetensors"))
        fs, root = filesystem(uri)
        layout = Layout.from_json(fs.cat_file(join(root, "layout.json")))
        config = WeightDiffusionConfig(**{**_renamed(card["config"]), "dataset": _dataset_if_found(uri, card)})
        tok = enc = structured = None
        if config.condition == STRUCTURED:
            from weightzoo.tasks.concepts.condition import StructuredCondition

            structured = StructuredCondition.from_json(fs.cat_file(join(root, CONDITION_NAME)))
        else:
            tok, enc = load_text_encoder(uri, dev)
        retrieval = RetrievalIndex.load(join(uri, RETRIEVAL_FILE)) if config.residual_k else None
        return cls(uri, config, model.to(dev).eval(),
                   BlockSpec(card["numel"], dcfg.block_size), Stats(st["mean"], st["std"]),
                   Stats(st["text_mean"], st["text_std"]), layout,
                   _read_json(join(uri, "hparams.json")), tok, enc, int(latest["step"]), structured, retrieval)

    def text(self, prompt: str, attributes: Mapping[str, str] | None = None) -> str:
        """The condition text, built the way training built it (structured: the attributes as JSON)."""
        if self.config.condition == STRUCTURED:
            return json.dumps(dict(attributes or {}), sort_keys=True)
        return condition_text(prompt, attributes, self.config.condition)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], steps: int = 1, seed: int = 0) -> torch.Tensor:
        """(n, D) float32 weight vectors (un-normalised, in layout order) for condition ``texts``."""
        if self.structured is not None:
            return self.generate_attributes([json.loads(t) for t in texts], steps, seed)
        states, masks = encode_texts(self.tokenizer, self.text_encoder, texts)
        return self._sample(states, masks, steps, seed)

    @torch.no_grad()
    def retrieve(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D) float32: a residual model's retrieval baseline alone (what ``generate`` adds its correction to)."""
        if self.retrieval is None:
            raise InputError(f"{self.uri} is not a residual generator (residual_k = 0): it has no retrieval")
        if self.structured is not None:
            feats = self.structured.encode_many([json.loads(t) for t in texts])
            states, masks = feats[:, None, :], torch.ones(len(texts), 1, dtype=torch.bool)
        else:
            states, masks = encode_texts(self.tokenizer, self.text_encoder, texts)
        return self._in_form(self._base(states, self.text_stats.normalise(pool_text(states, masks))))

    def export(self, vector: torch.Tensor, out: str) -> str:
        """One vector of this model (``generate``, ``retrieve``) as a diffusers LoRA file in its rows' layout."""
        from weightzoo.tasks.finetune.export import export_lora

        return export_lora(self.layout.as_tensor(vector), self.layout, self.hparams, out)

    def _base(self, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.retrieval.interpolate(condition_keys(states, pooled, self.structured is not None))

    @torch.no_grad()
    def generate_attributes(self, rows: Sequence[Mapping[str, object]], steps: int = 1, seed: int = 0) -> torch.Tensor:
        """(n, D) vectors for attribute dicts (structured models; an unseen categorical value is refused)."""
        if self.structured is None:
            return self.generate([self.text("", {k: str(v) for k, v in r.items()}) for r in rows], steps, seed)
        feats = self.structured.encode_many(rows)
        return self._sample(feats[:, None, :], torch.ones(len(rows), 1, dtype=torch.bool), steps, seed)

    def _sample(self, states: torch.Tensor, masks: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(stable_seed(seed, "generate"))
        pooled = self.text_stats.normalise(pool_text(states, masks))
        blocks = ddim_sample(self.denoiser, states, masks, pooled, steps=steps, generator=g, mask=self.spec.mask())
        out = self.spec.reassemble(blocks.float().cpu())
        if self.retrieval is None:
            return self._in_form(self.stats.denormalise(out))
        # An untrained correction is exactly 0, so this is then exactly the retrieval.
        return self._in_form(self._base(states, pooled) + out * (self.retrieval.scale * self.stats.std))

    def _in_form(self, rows: torch.Tensor) -> torch.Tensor:
        """A model of the SVD form returns its rows in that form (an average or a correction of rows in the form
        leaves it: the same rank-r edit, re-balanced); otherwise the rows as they are."""
        return rows if self.config.form == "rows" else gauge.svd_form(self.layout, rows)


def write_condition_check(uri: str, texts: Sequence[str], seed: int) -> dict | None:
    """``condition_check.json``: mean distance between the generations for ``texts`` (distinct training
    conditions) over the mean distance between each one's generations from two seeds. Near 1 or below, the
    condition changes the output no more than the noise does. None (nothing written) for fewer than 2 texts."""
    if len(texts) < 2:
        return None
    model = WeightDiffusionModel.load(uri)
    a, b = model.generate(list(texts), seed=seed), model.generate(list(texts), seed=seed + 1)
    between = float(torch.pdist(a).mean())
    # a model that ignores the noise too gives two equal seeds: then 1% of a row's norm stands for "one condition"
    within = max(float((a - b).norm(dim=1).mean()), 0.01 * float(a.norm(dim=1).mean()), 1e-12)
    check = {"conditions": len(texts), "between": between, "within": within, "ratio": between / within,
             "step": model.step}
    fs, root = filesystem(uri)
    write_bytes(fs, join(root, CONDITION_CHECK), dump_json(check))
    return check


def condition_warning(uri: str) -> str | None:
    """A one-line warning when the model folder's condition check says its condition has no effect."""
    path = join(uri, CONDITION_CHECK)
    if not uri_exists(path):
        return None
    check = _read_json(path)
    if check["ratio"] >= FOLLOWS:
        return None
    return (f"warning: {uri} ignores its condition: generations for {check['conditions']} training conditions are "
            f"{check['ratio']:.2f}x as far apart as one condition's two seeds (under {FOLLOWS}); what it generates "
            "is about the same for any prompt or attributes. Train longer, or use condition 'structured' with "
            "residual_k (docs/WEIGHT_DIFFUSION.md)")


def generate_lora(model_uri: str, prompt: str, out: str, attributes: Mapping[str, str] | None = None,
                  steps: int = 1, seed: int = 0) -> str:
    """Sample one LoRA for ``prompt`` (+ ``attributes``) and export it as diffusers safetensors; returns ``out``."""
    model = WeightDiffusionModel.load(model_uri)
    return model.export(model.generate([model.text(prompt, attributes)], steps=steps, seed=seed)[0], out)
