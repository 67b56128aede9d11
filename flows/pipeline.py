"""``pipeline``: a workload end to end, as one parent run the Prefect UI shows with its stages.

base model → manifest → ``build_dataset`` → previews (world base) → ``fit_subspace`` (identity only) →
``train_weight_diffusion``.
The workload (``PipelineConfig.workload``) names its engine and the generator's condition (flows/config.py
``WORKLOADS``); the engine makes the base (``Engine.toy_base``) and the manifest (``Engine.demo_rows``), unless
the identity workload draws on the shipped world base and its subjects. The stages and their order are the same.
``weightzoo demo`` runs it on the embedded default (the shipped world base, or ``--base toy``; local disk, ephemeral API);
``weightzoo demo --kind edit`` runs the image-editing concepts (docs/CONCEPTS.md).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from weightzoo.errors import InputError
from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.common import tag_run
from weightzoo.flows.config import WORLD, PipelineConfig
from weightzoo.flows.fit_subspace import fit_subspace
from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow
from weightzoo.tasks.finetune import engines


@task(name="make-base", task_run_name="make-{kind}-base")
def make_base(kind: str, uri: str, options: dict[str, Any]) -> str:
    """The world base at its defaults, or the engine ``kind``'s toy base with ``options``, at ``uri``; kept
    if already there (tasks/bases.py)."""
    from weightzoo.tasks.bases import make_base as make_kind_base

    return make_kind_base(kind, uri, **options)[0]


@task(name="make-manifest", task_run_name="make-{items}-{kind}-rows")
def make_manifest(kind: str, workdir: str, items: int, options: dict[str, Any]) -> str:
    """World subjects, or the engine ``kind``'s demo rows (``Engine.demo_rows``), as ``workdir/manifest.jsonl``
    (deterministic, so reruns resume)."""
    if kind == WORLD:
        from weightzoo.tasks.world.identities import write_world_manifest

        return write_world_manifest(workdir, items, images_per_identity=options.get("images_per_subject", 4))
    engine = engines.get(kind)
    if engine.demo_rows is None:
        raise InputError(f"engine {engine.name!r} has no demo rows (its Engine.demo_rows is None)")
    return engine.demo_rows(workdir, items, **options)


@task(name="preview-rows", task_run_name="preview-{limit}-rows")
def preview_rows(base: str, manifest: str, dataset: str, out_dir: str, limit: int) -> list[dict]:
    """A PNG grid per row (prompt without / with its LoRA, training images) and a markdown artifact listing
    them with the reader's scores: what each LoRA draws, where people look."""
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact

    from weightzoo.flows.common import artifact_key, png_artifact
    from weightzoo.tasks.finetune.readers import read_manifest
    from weightzoo.tasks.world.previews import row_previews

    folder = manifest.rsplit("/", 1)[0]
    grids = row_previews(base, dataset, out_dir, read_manifest(manifest), folder, limit)
    for g in grids:
        png_artifact(Path(g["png"]).read_bytes(), artifact_key("preview", g["id"]),
                     f"{g['id']}: '{g['prompt']}' without its LoRA, with it, its training images")
    lines = ["| row | reader agreement without LoRA | with LoRA | grid |", "|---|---|---|---|"]
    lines += [f"| {g['id']} | {g.get('without', float('nan')):.2f} | {g.get('with', float('nan')):.2f} | {g['png']} |"
              for g in grids]
    create_markdown_artifact("\n".join(lines), key="row-previews", description="What each row's LoRA draws")
    return grids


@flow(name="pipeline", flow_run_name="pipeline-{config.workload}-{config.items}")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Build a dataset from scratch and learn from it: every stage is its own task or subflow run, each
    tagged with the dataset (as this run is)."""
    tag_run(config.path("dataset"))
    kind = config.base_kind()
    base = make_base(kind, config.path("base"), config.base_options())
    manifest = make_manifest(kind, config.workdir, config.items, config.row_options())
    built = build_dataset(config.build(base, manifest))
    previews = preview_rows(base, manifest, config.path("dataset"), config.path("previews"), config.previews) \
        if kind == WORLD and config.previews and built["committed"] else []
    subspace = config.fit_subspace(built["committed"])
    if subspace is not None:
        fit_subspace(subspace)
    generator = config.generator(base)
    train_weight_diffusion_flow(generator)
    return {"base": base, "manifest": manifest, "dataset": config.path("dataset"), "build": built, "wdiff": generator.out,
            "subspace": subspace.out if subspace else None, "previews": previews}
