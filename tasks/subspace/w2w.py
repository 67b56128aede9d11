"""weights2weights applications of a fitted subspace: sample, edit, invert, project (Dravid et al. 2024).

A model in the subspace is x = mean + std ⊙ (c @ components) for k coefficients c. Every function
returns a flat float32 weight vector in the subspace's layout, which ``export`` writes as a diffusers
LoRA. Rows hold A and B unscaled; the LoRA update is ``scale · B @ A`` with ``scale = alpha / rank``
from the rows' ``hparams`` (kept in coords.parquet, so a subspace works without its dataset).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import LORA_A, LORA_B, Layout
from weightzoo.tasks import stop
from weightzoo.tasks.subspace.config import SAMPLE_TEMPERATURE
from weightzoo.tasks.subspace.pca import Subspace

# -- shared helpers --------------------------------------------------------------------------------------


def subspace_hparams(sub: Subspace) -> dict:
    """The fine-tune hparams of the fitted rows (the first row's; a dataset is trained with one config)."""
    t = sub.coords_table()
    text = t.column("hparams")[0].as_py() if "hparams" in t.column_names and t.num_rows else None
    return json.loads(text or "{}")


def lora_scale(hparams: dict) -> float:
    if "scale" in hparams:
        return float(hparams["scale"])
    return float(hparams.get("alpha", 1.0)) / float(hparams.get("rank", 1))


def export(sub: Subspace, weights: torch.Tensor, out_path: str, hparams: dict | None = None) -> str:
    """Write a weight vector as a diffusers LoRA (safetensors) with the subspace's layout and hparams."""
    from weightzoo.tasks.finetune.export import export_lora

    layout = sub.layout
    return export_lora(weights.detach().float().to(layout.torch_dtype), layout, hparams or subspace_hparams(sub),
                       out_path)


def dataset_row(sub: Subspace, item_id: str, dataset: str | None = None) -> tuple[dict, np.ndarray]:
    """One row of ``dataset`` (default: the subspace's own, found through its card), with errors that say
    which is missing: the dataset (``dataset not found at …``) or the id in it."""
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.dataset import Dataset

    uri = dataset or sub.dataset
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise NotFoundError(f"dataset not found at {uri}")
    try:
        return Dataset(uri).row(item_id)
    except KeyError:
        raise NotFoundError(f"id {item_id!r} is not committed in {uri}") from None


# -- project ---------------------------------------------------------------------------------------------


@dataclass
class Projection:
    """Coordinates of a model and how much of it the subspace explains."""

    coords: torch.Tensor  # (k,)
    weights: torch.Tensor  # (D,) float32 reconstruction mean + std ⊙ (coords @ components)
    rel_error: float  # ‖x − x̂‖ / ‖x‖ in weight space
    rel_error_standardised: float  # ‖z − ẑ‖ / ‖z‖, z = (x − mean) / std: what the PCA minimises


def project(sub: Subspace, weights: torch.Tensor | np.ndarray) -> Projection:
    """Project one weight vector (a row, or ``starts.load_lora_vector`` of a file) onto the subspace."""
    x = sub.layout.as_tensor(weights).float() if isinstance(weights, np.ndarray) else weights.float()
    z = (x - sub.mean) / sub.std
    c = z @ sub.components.T
    z_hat = c @ sub.components
    x_hat = sub.mean + sub.std * z_hat
    return Projection(
        c, x_hat, float((x - x_hat).norm() / x.norm().clamp_min(1e-30)),
        float((z - z_hat).norm() / z.norm().clamp_min(1e-30)),
    )


# -- sample ----------------------------------------------------------------------------------------------


def coefficient_gaussians(sub: Subspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component mean and std of the dataset's coordinates (w2w samples each independently)."""
    _, c = sub.dataset_coords()
    return c.mean(0), c.std(0, correction=1)


def sample(sub: Subspace, n: int = 1, seed: int = 0,
           temperature: float = SAMPLE_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` new models: coefficients drawn from the per-component Gaussians → ((n, D) weights, (n, k) coords).

    ``temperature`` scales each Gaussian's std (1: w2w's draw; below 1: closer to the average identity, where
    fewer draws land off the rows into pictures with no subject).
    """
    mu, sigma = coefficient_gaussians(sub)
    g = torch.Generator().manual_seed(seed)
    c = mu + temperature * sigma * torch.randn(n, sub.k, generator=g)
    return sub.to_weights(c), c


# -- edit ------------------------------------------------------------------------------------------------


def probes(sub: Subspace) -> dict:
    """The subspace's attribute probes (tasks/subspace/probes.py): stored at fit time, or fitted now for a
    subspace from before they were stored. Cached per subspace object."""
    from weightzoo.tasks.subspace.probes import fit_probes, load_probes

    cached = sub.__dict__.get("_probes")
    if cached is None:
        cached = load_probes(sub.uri)
        if cached is None:
            meta, c = sub.dataset_coords()
            cached = fit_probes(c, [dict(a or []) for a in meta.column("attributes").to_pylist()])
        sub.__dict__["_probes"] = cached
    return cached


def attribute_directions(sub: Subspace, attribute: str) -> dict[str, torch.Tensor]:
    """One direction per label of ``attribute``: its cross-validated ridge probe's weights in coefficient
    space (rows without the attribute are left out). Probe score of value v: ``(c − c̄) · d_v``."""
    found = probes(sub)
    if attribute not in found:
        raise KeyError(f"no fitted row has attribute {attribute!r} with two labels or more"
                       + (f"; attributes: {', '.join(sorted(found))}" if found else ""))
    p = found[attribute]
    return {v: p.direction(v) for v in p.labels}


ALL_OTHERS = ("*",)  # ``disentangle``: every other attribute of the fitted rows


def edit_direction(sub: Subspace, attribute: str, value: str, disentangle: Sequence[str] = ALL_OTHERS) -> torch.Tensor:
    """Unit direction (k,) towards ``attribute=value``. ``disentangle`` names attributes whose directions
    are projected out first, jointly (w2w: so that editing e.g. colour does not also move shape); by
    default every other attribute, ``()`` none; where the other attributes' directions span every
    direction of this one (a subspace of few components), the default leaves them in."""
    if tuple(disentangle) == ALL_OTHERS:
        try:
            return edit_direction(sub, attribute, value, [a for a in probes(sub) if a != attribute])
        except ValueError:
            return edit_direction(sub, attribute, value, ())
    dirs = attribute_directions(sub, attribute)
    if value not in dirs:
        raise KeyError(f"attribute {attribute!r} has no label {value!r}; labels: {sorted(dirs)}")
    d = dirs[value].double()
    others = [v.double() for a in disentangle if a != attribute for v in attribute_directions(sub, a).values()]
    if others:
        q, r = torch.linalg.qr(torch.stack(others, 1))
        q = q[:, r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()]  # drop dependent directions
        d = d - q @ (q.T @ d)
    if d.norm() < 1e-6 * dirs[value].double().norm().clamp_min(1e-30):
        raise ValueError(f"direction {attribute}={value} vanishes after projecting out {list(disentangle)}")
    return (d / d.norm()).float()


def edit(sub: Subspace, weights: torch.Tensor | np.ndarray, direction: torch.Tensor, strength: float) -> torch.Tensor:
    """Move a model along a unit coefficient direction by ``strength`` dataset standard deviations along it.

    The edit is added to the model's own weights (x + std ⊙ (Δc @ components)), so what the subspace
    does not explain about this model is kept, as w2w keeps identity detail.
    """
    _, c = sub.dataset_coords()
    return edit_to_label(sub, weights, float((c @ direction).std()) * direction, strength)


def _label_effects(sub: Subspace, names: tuple[str, ...]) -> dict[str, dict[str | None, torch.Tensor]]:
    """Each label's average effect on the coordinates, from one least-squares fit of every coordinate on the
    one-hot labels of ``names`` jointly (the first label of each attribute is the reference, effect 0; a row
    without an attribute counts as label None). Fitted jointly, a label's effect holds the other named
    attributes fixed, so it is the average difference a label makes, not what correlated labels bring."""
    cache = sub.__dict__.setdefault("_label_effects", {})
    if names not in cache:
        meta, c = sub.dataset_coords()
        rows = [dict(a or []) for a in meta.column("attributes").to_pylist()]
        labels = {a: ([None] if any(a not in r for r in rows) else [])
                  + sorted({r[a] for r in rows if a in r}) for a in names}
        cols = [(a, v) for a in names for v in labels[a][1:]]
        x = torch.tensor([[1.0] + [float(r.get(a) == v) for a, v in cols] for r in rows], dtype=torch.float64)
        beta = torch.linalg.lstsq(x, c.double()).solution
        effects: dict[str, dict[str | None, torch.Tensor]] = {a: {labels[a][0]: torch.zeros(sub.k, dtype=torch.float64)}
                                                             for a in names}
        for i, (a, v) in enumerate(cols):
            effects[a][v] = beta[1 + i]
        cache[names] = effects
    return cache[names]


def predict_label(sub: Subspace, weights: torch.Tensor | np.ndarray, attribute: str) -> str:
    """The label the attribute's probe reads from a model's coordinates (for a model whose label is unknown)."""
    found = probes(sub)
    if attribute not in found:
        raise KeyError(f"no fitted row has attribute {attribute!r} with two labels or more")
    p = found[attribute]
    _, c = sub.dataset_coords()
    centred, n = project(sub, weights).coords - c.mean(0), sum(p.counts.values())
    scores = [float(centred @ p.direction(v)) + p.counts[v] / n for v in p.labels]
    return p.labels[int(np.argmax(scores))]


def label_shift(sub: Subspace, attribute: str, value: str, current: str,
                disentangle: Sequence[str] = ALL_OTHERS) -> torch.Tensor:
    """The coefficient move (k,) from ``attribute=current`` to ``attribute=value``: the average difference
    between the two labels' rows with the ``disentangle`` attributes held fixed (default every other one; ``()``
    none), from their joint least-squares fit (``_label_effects``). Unlike a probe's unit direction it says how
    far to move: rows of the two labels lie that far apart on average (docs/SUBSPACE.md)."""
    attribute_directions(sub, attribute)  # the same error as edit_direction's for an attribute the rows lack
    others = sorted(probes(sub)) if tuple(disentangle) == ALL_OTHERS else sorted(set(disentangle))
    effects = _label_effects(sub, (attribute, *[a for a in others if a != attribute]))[attribute]
    for label in (value, current):
        if label not in effects:
            raise KeyError(f"attribute {attribute!r} has no label {label!r}; labels: "
                           f"{sorted(str(v) for v in effects if v is not None)}")
    return (effects[value] - effects[current]).float()


def edit_to_label(sub: Subspace, weights: torch.Tensor | np.ndarray, shift: torch.Tensor, strength: float) -> torch.Tensor:
    """Move a model by ``strength`` times a ``label_shift`` (1: as far as the labels' rows lie apart on average),
    added to the model's own weights as ``edit`` does."""
    x = sub.layout.as_tensor(weights).float() if isinstance(weights, np.ndarray) else weights.float()
    return x + sub.std * ((strength * shift) @ sub.components)


# -- invert ----------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """The inverted model and the loss on the image before (at the mean) and after."""

    weights: torch.Tensor  # (D,) float32
    coords: torch.Tensor  # (k,)
    initial_loss: float  # on a fixed set of timesteps and noises
    final_loss: float
    history: list[float] = field(default_factory=list)  # per-step training loss


def lora_deltas(layout: Layout, weights: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """``{module.weight: scale · B @ A}`` for every LoRA pair of a flat vector (a fixed A rebuilt from the
    layout); differentiable in ``weights``."""
    parts = torch.split(weights, [int(np.prod(s)) for s in layout.shapes])
    sd = {k: p.view(s) for k, p, s in zip(layout.keys, parts, layout.shapes, strict=True)}
    sd |= {k: t.to(weights) for k, t in layout.fixed_tensors(weights.device).items()}
    out = {}
    for key in sd:
        if key.endswith(LORA_B):
            module = key.removesuffix(LORA_B)
            out[f"{module}.weight"] = scale * (sd[key] @ sd[module + LORA_A])
    return out


class LoRAUNet:
    """Calls the shared pipeline's UNet (or any family's denoiser, through ``params``) with W + ΔW via ``torch.func.functional_call``: gradients reach the
    coefficients, never the UNet's parameters, and the pipeline is left unmodified."""

    def __init__(self, unet: torch.nn.Module, layout: Layout, scale: float) -> None:
        self.unet, self.layout, self.scale = unet, layout, scale
        self.base = {n: p.detach() for n, p in unet.named_parameters()}

    def params(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's parameters with the LoRA of ``weights`` added (differentiable in ``weights``)."""
        params = dict(self.base)
        for name, delta in lora_deltas(self.layout, weights, self.scale).items():
            params[name] = self.base[name] + delta.to(self.base[name].dtype)
        return params

    def __call__(self, weights: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.unet, self.params(weights), (noisy, t),
                                          {"encoder_hidden_states": cond}).sample


def _mask_latent(mask: Image.Image | np.ndarray | None, shape: torch.Size) -> torch.Tensor | None:
    """An (H, W) image mask (nonzero = fit) resized to the latent grid, as (1, 1, h, w) weights in [0, 1]."""
    if mask is None:
        return None
    m = torch.from_numpy(np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask, dtype=np.float32))
    m = (m / m.max().clamp_min(1e-12))[None, None]
    return F.interpolate(m, size=tuple(shape[-2:]), mode="area")


Draw = Callable[[torch.Generator, int], torch.Tensor]  # (generator, n) -> n timestep indices


def _family_inversion_loss(sub: Subspace, pipe, image: Image.Image, prompt: str, mask: Image.Image | np.ndarray | None,
                           hparams: dict) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                                               tuple[int, ...], Draw]:
    """``_inversion_loss`` for SDXL, SD3 and Flux bases: the family's own training objective
    (tasks/identity/denoise.py), with the LoRA applied functionally to its denoiser."""
    from contextlib import nullcontext

    from weightzoo.errors import InputError
    from weightzoo.tasks.identity.class_images import encode_images
    from weightzoo.tasks.identity.denoise import default_resolution, denoiser, objective

    if mask is not None:
        raise InputError("--mask is supported on SD 1.x/2.x bases only")
    model = denoiser(pipe)
    device = model.device
    resolution = int(hparams.get("resolution") or default_resolution(pipe))
    goal = objective(pipe, resolution)
    with torch.no_grad():
        latents = encode_images(pipe, [image.convert("RGB")], resolution).to(device)
        cond = {k: v.to(device) for k, v in goal.encode(prompt).items()}
    lora = LoRAUNet(model, sub.layout, lora_scale(hparams))  # its parameters with a row's LoRA added
    mu, sigma = (t.to(device) for t in coefficient_gaussians(sub))
    comps, mean, std = sub.components.to(device), sub.mean.to(device), sub.std.to(device)

    def loss_fn(u: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        params = lora.params(mean + std * ((mu + sigma * u) @ comps))

        def forward(*args, **kwargs):
            return torch.func.functional_call(model, params, args, kwargs)

        batch = {k: v.expand(len(t), *v.shape[1:]) for k, v in cond.items()}
        lat = latents.expand(len(t), -1, -1, -1)
        return goal.losses(forward, lat, noise, t, batch, nullcontext).mean()

    return loss_fn, tuple(latents.shape[1:]), lambda g, n: goal.draw(g, (n,))


def _inversion_loss(sub: Subspace, pipe, image: Image.Image, prompt: str, mask: Image.Image | np.ndarray | None,
                    hparams: dict) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                                        tuple[int, ...], Draw]:
    """The inversion objective ``loss(u, t, noise)`` over standardised coefficients ``u``, the latent shape
    and the timestep draw: image and prompt encoded once, the LoRA applied functionally."""
    from diffusers import DDPMScheduler

    from weightzoo.tasks.identity.class_images import encode_images
    from weightzoo.tasks.identity.engine import default_resolution, encode_prompt
    from weightzoo.tasks.identity.families import detect_pipeline

    if detect_pipeline(pipe).name != "sd":
        return _family_inversion_loss(sub, pipe, image, prompt, mask, hparams)
    device = pipe.unet.device
    resolution = int(hparams.get("resolution") or default_resolution(pipe))
    with torch.no_grad():
        latents = encode_images(pipe, [image.convert("RGB")], resolution).to(device)
        cond = encode_prompt(pipe, prompt).to(device)
    weight = _mask_latent(mask, latents.shape)
    weight = None if weight is None else weight.to(device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = scheduler.config.prediction_type
    model = LoRAUNet(pipe.unet, sub.layout, lora_scale(hparams))
    mu, sigma = (t.to(device) for t in coefficient_gaussians(sub))
    comps, mean, std = sub.components.to(device), sub.mean.to(device), sub.std.to(device)

    def loss_fn(u: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        w = mean + std * ((mu + sigma * u) @ comps)
        lat = latents.expand(len(t), -1, -1, -1)
        noisy = scheduler.add_noise(lat, noise, t)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(lat, noise, t)
        err = (model(w, noisy, t, cond.expand(len(t), -1, -1)) - target).square()
        return err.mean() if weight is None else (err * weight).sum() / (weight.sum() * err.shape[1] * len(t))

    n_t = int(scheduler.config.num_train_timesteps)
    return loss_fn, tuple(latents.shape[1:]), lambda g, n: torch.randint(0, n_t, (n,), generator=g)


def invert(
    sub: Subspace, pipe, image: Image.Image, prompt: str, *, mask: Image.Image | np.ndarray | None = None,
    steps: int = 200, lr: float = 0.1, batch: int = 4, seed: int = 0, hparams: dict | None = None,
    eval_samples: int = 16, progress: Callable[[int, int, float], None] | None = None,
) -> Inversion:
    """Fit k coefficients so the base model with the resulting LoRA denoises ``image`` (prompted with
    ``prompt``) well: the standard noise-prediction loss with the base's noise scheduler, optionally
    masked; starts from the mean model. Coefficients are optimised in units of each component's dataset
    std, so one learning rate suits every component. ``progress(step, steps, loss)`` follows every step
    (the loss is read back each step anyway)."""
    from weightzoo.tasks.identity.denoise import denoiser

    loss_fn, shape, draw = _inversion_loss(sub, pipe, image, prompt, mask, hparams or subspace_hparams(sub))
    mu, sigma = coefficient_gaussians(sub)
    device = denoiser(pipe).device
    g = torch.Generator().manual_seed(seed)
    eval_t = draw(g, eval_samples).to(device)
    eval_noise = torch.randn((eval_samples, *shape), generator=g).to(device)
    u = torch.zeros(sub.k, device=device, requires_grad=True)
    with torch.no_grad():
        initial = float(loss_fn(u, eval_t, eval_noise))
    opt = torch.optim.Adam([u], lr=lr)
    history = []
    for step in range(steps):
        stop.check()  # an interrupted command ends here, within a step
        t = draw(g, batch).to(device)
        noise = torch.randn((batch, *shape), generator=g).to(device)
        loss = loss_fn(u, t, noise)
        opt.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad(loss, [u])
        u.grad = grad
        opt.step()
        history.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, history[-1])
    with torch.no_grad():
        final = float(loss_fn(u, eval_t, eval_noise))
        coords = (mu.to(device) + sigma.to(device) * u).detach().cpu()
    return Inversion(sub.to_weights(coords), coords, initial, final, history)
