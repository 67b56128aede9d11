"""One prepared GPU measurement: every GPU-facing path of weightzoo, timed once, in one table.

    .venv/bin/python bench/gpu_check.py            # one GPU, under 8 minutes: SD 1.5-shaped model, w2w sizes
    .venv/bin/python bench/gpu_check.py --tiny     # the same code on CPU in about a minute (tiny model, small sizes)

Rows (``| check | value | unit | note |``):

- models/hour for the same identities trained three ways: packed (``pack=K``, the base loaded once),
  sequential (``pack=1``, same process) and one process per identity (a fresh process loads the base
  and trains one identity, as a per-identity script or job does; measured on ``proc_items`` identities);
- bf16: the packed rows against the sequential ones (max relative weight difference), with the stated
  tolerance (bf16 autocast on CUDA; on CPU the check runs in fp32);
- each registered recipe's seconds per step for a pack of K;
- the PCA subspace (``tasks/subspace/pca.py``) fitted on synthetic rows of weights2weights' width
  (99,648 values: SD 1.5, rank 1, to_q/to_v) on the GPU, seconds for the whole fit (q + 2 passes);
- weight-diffusion training (``tasks/diffusion/generator.py``) steps per second on those rows;
- SDXL and Flux (``bench/families.py``): the denoiser at its real architecture size (random weights, bf16),
  rows/s packed against sequential, their weight gap and peak memory.

The SD 1.5-architecture model is built from ``SD15_UNET`` with random weights (``bench/finetune.py``'s
``save_sd15_shaped``): no download. Figures with random weights time the same kernels as real ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
BF16_TOLERANCE = 5e-2  # max relative weight difference, packed vs sequential, bf16 autocast (fp32 on CPU: 1e-4)
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Sizes:
    model: str  # "sd15" or "tiny"
    device: str
    items: int  # identities trained packed and sequentially
    proc_items: int  # identities trained one process each
    steps: int
    pack: int
    resolution: int | None
    pca_rows: int
    pca_dim: int
    pca_components: int
    wd_steps: int
    wd_batch: int


GPU = Sizes("sd15", "cuda", items=8, proc_items=2, steps=20, pack=8, resolution=None, pca_rows=20_000,
            pca_dim=99_648, pca_components=64, wd_steps=200, wd_batch=32)
TINY = Sizes("tiny", "cpu", items=3, proc_items=1, steps=3, pack=3, resolution=32, pca_rows=300, pca_dim=2_000,
             pca_components=8, wd_steps=20, wd_batch=8)


def _load_bench(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _config(sizes: Sizes, **update):
    from weightzoo.tasks.identity.config import FinetuneConfig

    fields = {"steps": sizes.steps, "pack": sizes.pack, "resolution": sizes.resolution, "num_class_images": 4,
              "class_inference_steps": 2, "weights_dtype": "float32", "check_every": max(1, sizes.steps // 2),
              "loss_window": 1}
    return FinetuneConfig(**(fields | update))


def prepare(sizes: Sizes, work: Path) -> tuple[str, list, str, str]:
    """The base (saved), the synthetic identities, and the class latents cached once outside every timing."""
    from weightzoo.tasks.identity.base_model import load_base, save_tiny_pipeline
    from weightzoo.tasks.identity.engine import finetune_batch
    from weightzoo.tasks.identity.synthetic import make_subjects

    base = str(save_tiny_pipeline(work / "base") if sizes.model == "tiny"
               else _load_bench("finetune").save_sd15_shaped(work / "base"))
    pipe = load_base(base, device=sizes.device)
    res = sizes.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    root, cache = str(work / "data"), str(work / "cache")
    rows = make_subjects(root, max(sizes.items, sizes.proc_items), images_per_subject=2, size=res)
    finetune_batch(pipe, rows[:1], _config(sizes, steps=1, pack=1), base_uri=root, cache_dir=cache)
    return base, rows, root, cache


def worker(spec: dict) -> None:
    """One identity in a fresh process: load the base, train, print nothing but the final loss."""
    from weightzoo.tasks.finetune.row import ManifestRow
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import finetune_batch

    pipe = load_base(spec["base"], device=spec["device"])
    out = finetune_batch(pipe, [ManifestRow(**spec["row"])], FinetuneConfig(**spec["config"]),
                         base_uri=spec["root"], cache_dir=spec["cache"])
    print(json.dumps({"loss": out.results[0].loss}))


def training_rows(sizes: Sizes, base: str, rows: list, root: str, cache: str) -> list[tuple[str, str, str, str]]:
    """models/hour three ways, and packed-vs-sequential agreement in the device's precision."""
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.engine import finetune_batch

    out, weights = [], {}
    pipe = load_base(base, device=sizes.device)
    for pack in (sizes.pack, 1):
        start = time.perf_counter()
        res = finetune_batch(pipe, rows[: sizes.items], _config(sizes, pack=pack), base_uri=root, cache_dir=cache)
        _sync(sizes.device)
        secs = time.perf_counter() - start
        weights[pack] = torch.stack([r.weights.float() for r in res.results])
        name = f"models/hour packed (pack={pack})" if pack > 1 else "models/hour sequential (pack=1)"
        out.append((name, f"{sizes.items * 3600 / secs:.0f}", "models/h",
                    f"{sizes.items} identities x {sizes.steps} steps, base loaded once, {secs:.1f} s"))
    del pipe
    out.append(_per_process(sizes, base, rows, root, cache))
    bf16 = sizes.device.startswith("cuda")
    rel = float(((weights[sizes.pack] - weights[1]).norm(dim=1) / weights[1].norm(dim=1)).max())
    tol = BF16_TOLERANCE if bf16 else FP32_TOLERANCE
    out.append(("packed = sequential" + (" (bf16)" if bf16 else " (fp32)"), f"{rel:.1e}", "max rel. diff",
                f"tolerance {tol:.0e}: {'ok' if rel <= tol else 'EXCEEDED'}"))
    return out


def _per_process(sizes: Sizes, base: str, rows: list, root: str, cache: str) -> tuple[str, str, str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    config = _config(sizes, pack=1).model_dump(mode="json")
    start = time.perf_counter()
    for row in rows[: sizes.proc_items]:
        spec = {"base": base, "device": sizes.device, "row": row.model_dump(mode="json"), "config": config,
                "root": root, "cache": cache}
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, check=True,
                       capture_output=True, text=True)
    secs = time.perf_counter() - start
    return ("models/hour one process per identity", f"{sizes.proc_items * 3600 / secs:.0f}", "models/h",
            f"{sizes.proc_items} processes, each loading the base, {secs:.1f} s")


def recipe_rows(sizes: Sizes, base: str, rows: list, root: str, cache: str) -> list[tuple[str, str, str, str]]:
    """Seconds per training step of a pack of K, for every registered recipe (after a 1-step warm-up)."""
    from weightzoo.tasks.identity import recipes
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.engine import finetune_batch

    pipe = load_base(base, device=sizes.device)
    out = []
    for name in recipes.names():
        finetune_batch(pipe, rows[: sizes.pack], _config(sizes, method=name, steps=1), base_uri=root, cache_dir=cache)
        start = time.perf_counter()
        finetune_batch(pipe, rows[: sizes.pack], _config(sizes, method=name), base_uri=root, cache_dir=cache)
        _sync(sizes.device)
        per_step = (time.perf_counter() - start) / sizes.steps
        out.append((f"step time: {name}", f"{per_step:.3f}", "s/step", f"pack of {sizes.pack}, inputs cached"))
    return out


def subspace_rows(sizes: Sizes, base: str, work: Path) -> list[tuple[str, str, str, str]]:
    """The PCA fit, then weight-diffusion training, on synthetic rows of the stated width."""
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
    from weightzoo.tasks.diffusion.generator import train_weight_diffusion
    from weightzoo.tasks.subspace.config import SubspaceConfig
    from weightzoo.tasks.subspace.pca import fit_subspace

    uri = str(work / "rows")
    start = time.perf_counter()
    _load_bench("subspace").write_dataset(uri, sizes.pca_rows, sizes.pca_dim, 256 if sizes.model == "sd15" else 16,
                                          2_000, 128, "float16")
    written = time.perf_counter() - start
    opts = SubspaceConfig(components=sizes.pca_components, device=sizes.device)
    start = time.perf_counter()
    fit_subspace(uri, str(work / "subspace"), opts)
    _sync(sizes.device)
    fit = time.perf_counter() - start
    out = [("subspace fit", f"{fit:.1f}", "s", f"{sizes.pca_rows} x {sizes.pca_dim} fp16 rows, k={sizes.pca_components}, "
            f"q+2={opts.power_iters + 2} passes on {sizes.device} (writing the rows: {written:.0f} s)")]
    cfg = WeightDiffusionConfig(dataset=uri, base=base, out=str(work / "wdiff"), condition="prompt",
                                steps=sizes.wd_steps, batch_size=sizes.wd_batch, checkpoint_every=sizes.wd_steps,
                                lr_warmup_steps=1, device=sizes.device)
    start = time.perf_counter()
    train_weight_diffusion(cfg)
    _sync(sizes.device)
    secs = time.perf_counter() - start
    out.append(("weight diffusion training", f"{sizes.wd_steps / secs:.1f}", "steps/s",
                f"{sizes.wd_steps} steps of {sizes.wd_batch} models, blocks of 256 (setup and checkpoint included)"))
    return out


def family_rows(sizes: Sizes, work: Path) -> list[tuple[str, str, str, str]]:
    """SDXL and Flux (bench/families.py): the denoiser at its real architecture size on a GPU (the tiny
    bases with --tiny), rows/s packed against sequential, their weight gap and peak memory."""
    families = _load_bench("families")
    size = "tiny" if sizes.model == "tiny" else "real"
    out = []
    for family in ("sdxl", "flux"):
        r = families.measure(family, size, sizes.device, sizes.items, sizes.steps, sizes.pack, work / "families", repeats=1)
        peak = f"; peak {r[f'peak_gib_{sizes.pack}']:.1f} / {r['peak_gib_1']:.1f} GiB" if "peak_gib_1" in r else ""
        out.append((f"{family}: rows/s packed / sequential", f"{r['ratio']:.2f}", "x",
                    f"{r[f'rows_s_{sizes.pack}']:.3f} vs {r['rows_s_1']:.3f} rows/s, {size} size, pack={sizes.pack}, "
                    f"max rel. gap {r['max_rel_gap']:.1e}, {r['ok']}/{sizes.items} ok{peak}"))
    return out


def main() -> None:
    """Parse options, run every check once, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model and small sizes, on CPU")
    ap.add_argument("--device", help="override the device (default cuda, or cpu with --tiny)")
    ap.add_argument("--pca-rows", type=int, help="rows of the synthetic subspace dataset")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sizes = TINY if args.tiny else GPU
    sizes = replace(sizes, **{k: v for k, v in {"device": args.device, "pca_rows": args.pca_rows}.items() if v})
    if sizes.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or on a GPU machine")
    if sizes.device == "cpu":
        torch.set_num_threads(1)  # two torch threads on a shared small CPU spin-wait (tests/helpers.py, one_thread)
    work = Path(tempfile.mkdtemp(prefix="wz-gpu-check-"))
    started = time.perf_counter()
    try:
        base, rows, root, cache = prepare(sizes, work)
        table = training_rows(sizes, base, rows, root, cache) + recipe_rows(sizes, base, rows, root, cache)
        table += subspace_rows(sizes, base, work) + family_rows(sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # an SD 1.5-shaped base is ~4 GB
    device = torch.cuda.get_device_name() if sizes.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"# gpu_check: {sizes.model} model on {device}, {time.perf_counter() - started:.0f} s; sizes {asdict(sizes)}")
    print("\n| check | value | unit | note |\n|---|---:|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
