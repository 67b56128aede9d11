"""Orchestration overhead of build_dataset, per item and per batch, with an engine that trains nothing.

    .venv/bin/python bench/orchestration.py --items 1000 10000 [--batch-size 16] [--executor local]
    PREFECT_API_URL=... .venv/bin/python bench/orchestration.py --items 64 --executor deployment --deployment finetune-batch/gpu

The null engine (``bench/null_engine.py``, registered in this process only) returns zero weights of the weights2weights
SD 1.5 size (99,648 fp16 values) instantly, injected by name exactly as the real engine is. So each
batch still validates, plans, loads the (tiny) base, writes and commits a real shard, records its
items and runs as a Prefect child flow: everything but training. Manifest validation (every image
decoded) is timed separately: it runs once per build, not per batch.

The ratio compares orchestration per item with a real fine-tune per item: 800 steps x seconds per
step, measured here on the tiny model (``--measure-steps``) and, as a fixed reference, 0.12 s/step
(DESIGN.md's quiet-CPU figure for the tiny model; an SD 1.5 step on an H100 is of the same order).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_S_PER_STEP = 0.12
STEPS = 800


def measure_step_seconds(base: str, manifest: str, steps: int) -> float:
    """Seconds per optimiser step of the real engine on the tiny model, one item, class latents cached."""
    from weightzoo.tasks.finetune.base_model import load_base
    from weightzoo.tasks.finetune.engine import FinetuneConfig, finetune_batch
    from weightzoo.tasks.finetune.manifest import manifest_folder, read_manifest

    pipe = load_base(base)
    row = read_manifest(manifest)[:1]
    cfg = FinetuneConfig(steps=steps, num_class_images=4, class_inference_steps=2, pack=1)
    cache = tempfile.mkdtemp()
    finetune_batch(pipe, row, cfg.model_copy(update={"steps": 1}), base_uri=manifest_folder(manifest), cache_dir=cache)
    t0 = time.perf_counter()
    finetune_batch(pipe, row, cfg, base_uri=manifest_folder(manifest), cache_dir=cache)
    return (time.perf_counter() - t0) / steps


def run_build(args: argparse.Namespace, items: int, work: Path, base: str) -> dict:
    from null_engine import register_null_engine

    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.flows.config import BuildRequest
    from weightzoo.tasks.finetune.manifest import load_and_validate
    from weightzoo.tasks.finetune.synthetic import write_demo_manifest

    manifest = write_demo_manifest(str(work / f"m{items}"), items, images_per_subject=1, size=32)
    t0 = time.perf_counter()
    load_and_validate(manifest)
    validate_s = time.perf_counter() - t0
    req = BuildRequest(manifest=manifest, base=base, dataset=str(work / f"ds{items}"), batch_size=args.batch_size,
                       executor=args.executor, deployment=args.deployment, engine=register_null_engine(), poll_s=1)
    t0 = time.perf_counter()
    summary = build_dataset(req)
    total_s = time.perf_counter() - t0
    assert summary["committed"] == items, summary
    batches = len(summary["batches"])
    shutil.rmtree(work / f"ds{items}", ignore_errors=True)  # 200 KB per row adds up
    return {"items": items, "batches": batches, "validate_s": validate_s, "total_s": total_s,
            "per_batch_s": (total_s - validate_s) / batches, "per_item_s": total_s / items}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch-size", type=int, default=None, help="Default: the flows' default batch size.")
    ap.add_argument("--executor", choices=["local", "deployment"], default="local")
    ap.add_argument("--deployment", default="finetune-batch/gpu")
    ap.add_argument("--measure-steps", type=int, default=10, help="Real-engine steps timed for s/step (0: skip).")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # console logging is not what is measured
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: telemetry only errors
    if args.executor == "local":  # a private home: ~/.prefect's SQLite file may be busy with other runs
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="wz-bench-prefect-")
    from weightzoo.tasks.finetune.base_model import save_tiny_pipeline
    from weightzoo.tasks.finetune.batch import DEFAULT_BATCH_SIZE
    from weightzoo.tasks.finetune.synthetic import write_demo_manifest

    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wz-bench-"))
    base = str(save_tiny_pipeline(work / "base"))
    s_per_step = measure_step_seconds(base, write_demo_manifest(str(work / "m-step"), 1), args.measure_steps) \
        if args.measure_steps else float("nan")
    real_item = {"measured": STEPS * s_per_step, "reference": STEPS * REFERENCE_S_PER_STEP}

    def run(items: int) -> dict:
        if args.executor == "local":
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=240):  # a private ephemeral API per size
                return run_build(args, items, work, base)
        return run_build(args, items, work, base)

    rows = [run(n) for n in args.items]
    print(f"\nexecutor={args.executor}  batch size={args.batch_size}  cores={os.cpu_count()}  "
          f"real fine-tune/item: {real_item['measured']:.1f} s measured ({s_per_step:.3f} s/step x {STEPS}), "
          f"{real_item['reference']:.0f} s reference ({REFERENCE_S_PER_STEP} s/step x {STEPS})")
    print("| items | batches | validate s | total s | s/batch | s/item | % of measured fine-tune | % of reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['items']:,} | {r['batches']} | {r['validate_s']:.1f} | {r['total_s']:.1f} | {r['per_batch_s']:.2f} "
              f"| {r['per_item_s']:.3f} | {100 * r['per_item_s'] / real_item['measured']:.3f}% "
              f"| {100 * r['per_item_s'] / real_item['reference']:.3f}% |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
