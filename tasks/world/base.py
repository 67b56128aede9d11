"""A tiny text-to-image base that draws the world (``render.py``): the same diffusers classes as the random
tiny base (``UNet2DConditionModel``, ``CLIPTextModel``, ``AutoencoderKL``, ``CLIPTokenizer``, saved as a
``StableDiffusionPipeline``), so LoRA training, export, ``load_lora_weights`` and sampling stay the real code.

Pretrained offline in two phases, each seeded:

1. the VAE: two narrow blocks, 2x downsampling (latents 4×16×16 for 32 px images), trained 1200 steps
   to reconstruct renders (its reconstructions read back 97-100 % per attribute; 400 steps lost the stripes
   and shifted hues); its ``scaling_factor`` is set to 1 / latent std;
2. the UNet and the text encoder together, on v-prediction (at high noise epsilon is nearly the input,
   leaving text little to explain) over a pool of captioned renders whose latents are encoded once. Captions drop attributes at random (and are sometimes empty), so vaguer
   prompts ("a photo of sks subject") mean "some subject" and classifier-free guidance works.

The tokenizer is a CLIP BPE whose merges spell every world word as one token (other text falls back to
bytes, so a rare token like "sks" stays rare). ``build_world_base`` caches the result in a folder named by
its settings, and records the settings, losses and seconds in ``world_base.json`` beside the model, and the
SHA-256 of every file in ``world_base.sha256.json``: a base is checked against them when it is kept, copied
(the shipped one) or loaded (``check_world_base``), so a flipped byte is refused, not trained on. (A base made
before the hashes were recorded has no such file, and nothing to be checked against.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from weightzoo.errors import InputError, short
from weightzoo.storage.fs import filesystem, join
from weightzoo.tasks import stop
from weightzoo.tasks.identity.base_model import TINY_TEXT, TINY_UNET
from weightzoo.tasks.identity.tokenizers import bytes_to_unicode
from weightzoo.tasks.progress import report
from weightzoo.tasks.seeds import stable_seed
from weightzoo.tasks.world.config import VERSION, WorldBaseSettings
from weightzoo.tasks.world.render import ATTRIBUTES, WORLD_RESOLUTION, caption, jitter, random_subject, render

INFO_FILE = "world_base.json"
# {path relative to the base: sha256 hex} of every other file of the base. A sidecar, not a key of INFO_FILE:
# ``weightzoo base`` prints that file's settings, and the packaging ships `shipped/*.json`.
HASHES_FILE = "world_base.sha256.json"
# The default settings' base, made by this module on one thread (the code path of `OMP_NUM_THREADS=1 weightzoo
# base --kind world --rebuild`; its world_base.json says how long it took): shipped so the demo draws in
# minutes, not after a ~20-minute pretraining.
SHIPPED = Path(__file__).with_name("shipped")
WORDS = ("a", "photo", "of", "subject", "on", *(v for vs in ATTRIBUTES.values() for v in vs))

WORLD_UNET: dict = {**TINY_UNET, "sample_size": WORLD_RESOLUTION // 2}  # the tiny UNet, at the world's size
# Two narrow blocks (vae_scale_factor 2, latents 4x16x16 for 32 px) and no mid-block attention: flat shapes
# need neither width nor global context, and attention over every pixel would dominate its cost.
WORLD_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32), "latent_channels": 4, "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 8, "sample_size": WORLD_RESOLUTION, "mid_block_add_attention": False,
}


def write_world_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP's byte-level BPE whose merges join each world word into one token.

    A merge for every split of every substring of every word: whichever merge BPE applies first, the
    pieces stay substrings of the word and the next merge exists, so each word ends as one token.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        for length in range(2, len(symbols) + 1):
            for i in range(len(symbols) - length + 1):
                piece = symbols[i : i + length]
                merges += [f"{''.join(piece[:s])} {''.join(piece[s:])}" for s in range(1, length)]
                tokens.append("".join(piece))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _modules(seed: int) -> StableDiffusionPipeline:
    """The untrained pipeline (seeded initialisation)."""
    torch.manual_seed(stable_seed(seed, "world-init"))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_world_tokenizer(Path(tmp))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        prediction_type="v_prediction",  # at high noise epsilon is ~ the input: v keeps a signal to learn text from
    )
    return StableDiffusionPipeline(vae=AutoencoderKL(**WORLD_VAE), text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(**WORLD_UNET), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _pool(n: int, seed: int) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """``n`` renders of random subjects in [-1, 1], (n, 3, R, R), and their labels."""
    rng = random.Random(f"world-pool:{seed}")
    subs = [random_subject(rng) for _ in range(n)]
    ims = [np.asarray(render(s, shift=jitter(rng)), np.float32) for s in subs]
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x.contiguous(), [s.labels for s in subs]


def pretrain_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, seed: int, batch: int = 16) -> list[float]:
    """Reconstruction (MSE on the posterior mean) plus a small KL; sets ``scaling_factor`` to 1 / latent std."""
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-3, weight_decay=0.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(stable_seed(seed, "world-vae"))
    losses = []
    vae.train()
    for _ in range(steps):
        stop.check()  # an interrupted command ends here, within a step
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.mean).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        losses.append(float(loss.detach()))
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(images[:256]).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


@torch.no_grad()
def _latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, len(images), 64)]) \
        * vae.config.scaling_factor


def _captions(labels: list[dict[str, str]], rng: random.Random) -> list[str]:
    """Each caption keeps each attribute with probability 0.9; one in ten is empty (for guidance)."""
    out = []
    for lab in labels:
        keep = {a for a in ATTRIBUTES if rng.random() < 0.9}
        out.append("" if rng.random() < 0.1 else caption(lab, keep))
    return out


def pretrain_unet(pipe: StableDiffusionPipeline, images: torch.Tensor, labels: list[dict[str, str]], steps: int,
                  seed: int, batch: int = 16, lr: float = 2e-3) -> list[float]:
    """Noise prediction over the pool (UNet and text encoder trained together), one-cycle learning rate."""
    latents = _latents(pipe.vae, images)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    g = torch.Generator().manual_seed(stable_seed(seed, "world-unet"))
    rng = random.Random(f"world-captions:{seed}")
    pipe.unet.train()
    pipe.text_encoder.train()
    losses = []
    for _ in range(steps):
        stop.check()  # an interrupted command ends here, within a step
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        tok = pipe.tokenizer(_captions([labels[i] for i in idx], rng), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt")
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        cond = pipe.text_encoder(tok.input_ids)[0]
        pred = pipe.unet(sched.add_noise(latents[idx], noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, sched.get_velocity(latents[idx], noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        cycle.step()
        losses.append(float(loss.detach()))
        if len(losses) % 50 == 0:
            report(len(losses), steps, losses[-1])
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return losses


class DamagedBaseError(InputError):
    """A world base whose files are not the ones its recorded hashes name: changed after it was made."""


def file_hashes(uri: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file of the base at ``uri`` (a folder or an fsspec URI), by its relative path,
    the hashes file itself left out."""
    fs, root = filesystem(str(uri))
    root = root.rstrip("/")
    out = {}
    for f in sorted(fs.find(root)):
        rel = f[len(root) + 1:]
        if rel != HASHES_FILE:
            out[rel] = hashlib.sha256(fs.cat_file(f)).hexdigest()
    return out


def record_hashes(folder: Path) -> None:
    """Write ``HASHES_FILE`` for the base just saved in ``folder`` (last, over every other file)."""
    (folder / HASHES_FILE).write_text(json.dumps(file_hashes(folder), indent=1, sort_keys=True) + "\n")


def check_world_base(uri: str | os.PathLike, cure: str = "make it again with weightzoo base --kind world") -> None:
    """Refuse a world base whose files differ from its recorded hashes (one line, the first difference named).

    Any other base (no ``world_base.json``) and a world base made before hashes were recorded pass: there is
    nothing to check them against. Reads every file once (a world base is ~5 MB)."""
    fs, root = filesystem(str(uri))
    try:
        recorded = json.loads(fs.cat_file(join(root, HASHES_FILE)))
    except FileNotFoundError:
        return
    except ValueError as e:
        raise DamagedBaseError(f"world base {uri}: {HASHES_FILE} cannot be read ({short(e, 120)}); {cure}") from e
    found = file_hashes(uri)
    changed = [f"{rel} has changed (sha256 {found[rel][:12]}…, {HASHES_FILE} records {want[:12]}…)"
               for rel, want in recorded.items() if rel in found and found[rel] != want]
    problems = changed + [f"{rel} is missing" for rel in recorded if rel not in found] \
        + [f"{rel} is not one of its files" for rel in found if rel not in recorded]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedBaseError(f"world base {uri} is not the base that was made there: {problems[0]}{more}; {cure}")


def world_base_dir(out_dir: str | os.PathLike, seed: int, steps: int, vae_steps: int, pool: int) -> Path:
    """Where ``build_world_base`` keeps the base made with these settings."""
    return Path(out_dir) / WorldBaseSettings(seed, steps, vae_steps, pool).name()


def build_world_base(out_dir: str | os.PathLike, seed: int = WorldBaseSettings.seed, steps: int = WorldBaseSettings.steps,
                     vae_steps: int = WorldBaseSettings.vae_steps, pool: int = WorldBaseSettings.pool) -> Path:
    """``save_world_base`` into a folder of ``out_dir`` named by the settings, so bases of other settings
    sit side by side. Returns the folder."""
    settings = WorldBaseSettings(seed, steps, vae_steps, pool)
    return save_world_base(Path(out_dir) / settings.name(), settings)


def shipped_base(settings: WorldBaseSettings) -> Path | None:
    """The base shipped with weightzoo (``SHIPPED``) if it was made with ``settings`` by this version."""
    info = SHIPPED / INFO_FILE
    if not info.is_file():
        return None
    made = json.loads(info.read_text())
    same = made.get("version") == VERSION and all(made.get(k) == v for k, v in settings.as_dict().items())
    return SHIPPED if same else None


def save_world_base(dest: str | os.PathLike, settings: WorldBaseSettings, rebuild: bool = False) -> Path:
    """Pretrain the world base (VAE ``vae_steps``, UNet + text ``steps``, on ``pool`` renders) and save it as
    a diffusers pipeline at ``dest``; kept if a base of the same settings is already there, refused if
    one of other settings is (the folder would no longer say what it holds). The default settings' base
    ships with weightzoo and is copied in seconds unless ``rebuild``.

    Deterministic in ``seed`` on one machine and thread count (torch's CPU kernels are). Returns ``dest``.
    """
    dest = Path(dest)
    if (dest / INFO_FILE).exists():
        made = {k: json.loads((dest / INFO_FILE).read_text()).get(k) for k in settings.as_dict()}
        if made != settings.as_dict():
            raise InputError(f"{dest} holds a world base made with {made}, not {settings.as_dict()}; "
                             "choose another folder")
        check_world_base(dest, "remove the folder and run weightzoo base again")
        return dest
    if dest.is_file() or (dest.exists() and any(dest.iterdir())):
        raise InputError(f"{dest} is a file or a folder that holds something other than a world base; "
                         "choose another folder")
    shipped = None if rebuild else shipped_base(settings)
    if shipped is not None:
        check_world_base(shipped, "reinstall weightzoo, or make the base with --rebuild")

        def copy(tmp: Path) -> None:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
            check_world_base(tmp, "the copy differs from the shipped files; run weightzoo base again")
        return _publish(dest, copy)
    t0 = time.perf_counter()
    pipe = _modules(settings.seed)
    images, labels = _pool(settings.pool, settings.seed)
    vae_losses = pretrain_vae(pipe.vae, images, settings.vae_steps, settings.seed)
    t1 = time.perf_counter()
    losses = pretrain_unet(pipe, images, labels, settings.steps, settings.seed)
    info = settings.as_dict() | {
        "version": VERSION, "threads": torch.get_num_threads(),
        "vae_final_mse": float(np.mean(vae_losses[-20:])) if vae_losses else None,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "vae_seconds": round(t1 - t0, 1), "seconds": round(time.perf_counter() - t0, 1)}

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        record_hashes(tmp)
    return _publish(dest, write)


def _publish(dest: Path, write: Callable[[Path], object]) -> Path:
    """``write`` the base into a temporary folder beside ``dest``, then rename it to ``dest`` (empty or absent):
    a crash leaves no half base under the name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".building-"))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        dest.rmdir()  # empty (checked above): os.replace needs the name free
    os.replace(tmp, dest)
    return dest
