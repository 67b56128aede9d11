"""The edit workload's manifest rules (``EditRowRules``, the ``edit-lora`` engine's ``Engine.rows``).

A kind-'edit' row names an edit (its spec in ``attributes``) and, optionally, source→target image
pairs; with no pairs weightzoo renders them, so it may have no images at all. ``edit_pairs`` lists a
row's pairs; the manifest validator asks ``EditRowRules`` for the problems and images of each row.
"""

from __future__ import annotations

from weightzoo.storage.fs import filesystem, join
from weightzoo.tasks.finetune.contract import RowRules
from weightzoo.tasks.finetune.row import IMAGE_SUFFIXES, ManifestRow, resolve


def edit_pairs(row: ManifestRow, base_uri: str | None = None) -> list[tuple[str, str | None]]:
    """A kind-'edit' row's (source, target) image URIs; target None = rendered from the spec; [] = all rendered.

    Sources are ``images`` (targets paired by position) and, under ``image_dir``, the images in its
    ``source/`` folder, each paired with the file of the same relative name in its ``target/`` folder.
    """
    targets = [resolve(u, base_uri) for u in row.targets] if row.targets is not None else None
    pairs: list[tuple[str, str | None]] = [
        (resolve(u, base_uri), targets[i] if targets is not None and i < len(targets) else None)
        for i, u in enumerate(row.images)
    ]
    if row.image_dir:
        folder = resolve(row.image_dir, base_uri)
        fs, path = filesystem(folder)
        protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
        src_root = join(path, "source")
        for p in sorted(fs.find(src_root)):
            if p.lower().endswith(IMAGE_SUFFIXES):
                pairs.append((protocol + p, protocol + join(path, "target") + p[len(src_root):]))
    return pairs




class EditRowRules(RowRules):
    """Kind-'edit' rows: pairs one to one, a spec weightzoo can render, images listed as pairs."""

    def problems(self, row: ManifestRow, base_uri: str | None) -> list[str]:
        """Targets outside kind 'edit', unpaired targets, a bad spec.

        A row whose targets are rendered needs a spec weightzoo can render (known family, every parameter in
        range); a row of given pairs only needs a family, which conditions the weight generator.
        """
        if row.kind != "edit":
            return super().problems(row, base_uri)
        if row.targets is not None and len(row.targets) != len(row.images):
            return [f"{len(row.targets)} targets for {len(row.images)} source images; pair them one to one"]
        if row.targets is not None or row.image_dir:
            return [] if "family" in row.attributes else ["edit attributes have no 'family'"]
        from weightzoo.tasks.concepts.spec import spec_problems  # its edits import torch: not at ``--help``

        return spec_problems(row.attributes)

    def images(self, row: ManifestRow, base_uri: str | None) -> tuple[list[str], str | None] | None:
        """Every source and given target of a kind-'edit' row (none: all rendered); other kinds: the shared rule."""
        if row.kind != "edit":
            return None
        pairs = edit_pairs(row, base_uri)
        if row.image_dir and not any(u for u, _ in pairs if u.startswith(resolve(row.image_dir, base_uri))):
            return [], f"no images: image_dir {row.image_dir!r} has no source/ images"
        return [u for pair in pairs for u in pair if u is not None], None
