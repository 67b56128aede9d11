"""The manifest's row model: one typed row per identity or concept to fine-tune, and the one list of
everything wrong with a manifest (``ManifestError``).

Image references are URIs (any fsspec URL) or paths relative to the manifest's own folder
(``resolve``, ``manifest_folder``). ``parse_rows`` types raw rows one by one, so every bad row is
reported together. The format is documented in docs/MANIFEST.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

from weightzoo.errors import InputError, short
from weightzoo.storage.fs import filesystem, join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RawRow = dict[str, Any]
class ManifestRow(BaseModel):
    """One fine-tune to run: who or what, with which prompt, from which images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Unique id; becomes part of file names, so letters, digits, '.', '_', '-' only.")
    kind: Literal["identity", "concept", "edit"] = Field(
        "identity", description="A person-like identity, a concept, or an image-editing concept ('edit')."
    )
    prompt: str = Field("sks person", description="Instance prompt with the rare token, e.g. 'sks person'.")
    class_prompt: str = Field("person", description="Class prompt for prior preservation, e.g. 'person'.")
    images: list[str] = Field(default_factory=list, description="Image URIs, absolute or relative to the manifest.")
    image_dir: str | None = Field(None, description="A folder URI whose images are all used (instead of, or as well as, images).")
    # Kohya/ai-toolkit folders caption each image; ``weightzoo manifest --from-folder`` fills this from them.
    captions: list[str] | None = Field(
        None, description="One caption per image in `images` (same order): each image trains with its own caption, "
        "the row's prompt put first where the caption lacks it. Default: every image trains with `prompt`.",
        exclude_if=lambda v: v is None,
    )
    # `weightzoo init` writes one for a new concept from a trained weight generator (docs/WEIGHT_DIFFUSION.md).
    init: str | None = Field(
        None, description="A LoRA file (diffusers .safetensors, e.g. from `weightzoo init` or `export`) this row's "
        "training starts from instead of the shared init; absolute or relative to the manifest.",
        exclude_if=lambda v: v is None,
    )
    attributes: dict[str, str] = Field(
        default_factory=dict,
        description="Labels (e.g. colour=red) for edit directions; for kind 'edit', the edit spec: 'family' and its "
        "numeric parameters (numbers accepted, kept as canonical text like every stored attribute).",
    )
    # Kind 'edit' only: paired by position with `images` (the sources). None: weightzoo renders the targets.
    targets: list[str] | None = Field(
        None, description="Kind 'edit': target image URIs, one per source in `images` (default: rendered from the spec)."
    )

    @model_validator(mode="before")
    @classmethod
    def _edit_numbers(cls, data: Any) -> Any:
        """Kind 'edit' accepts numeric parameters as numbers; they are stored as canonical text.

        The dataset's ``attributes`` column is a string map (docs/FORMAT.md), so the row holds exactly what
        a shard will; ``tasks.concepts.spec.EditSpec.parse`` reads the numbers back.
        """
        if isinstance(data, Mapping) and data.get("kind") == "edit" and isinstance(data.get("attributes"), Mapping):
            attrs = {k: canonical_number(v) if _is_number(v) else v for k, v in data["attributes"].items()}
            data = {**data, "attributes": attrs}
        return data

    @model_validator(mode="after")
    def _captions_pair_with_images(self) -> ManifestRow:
        """Captions pair with the listed images by position: counts must match and none may be empty."""
        if self.captions is None:
            return self
        if self.image_dir is not None:
            raise ValueError("captions pair with 'images' by position; list the images instead of giving image_dir")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.captions)} captions for {len(self.images)} images")
        empty = [i for i, c in enumerate(self.captions) if not c.strip()]
        if empty:
            raise ValueError(f"the caption of image {empty[0] + 1} ({short(self.images[empty[0]])}) is empty")
        return self

    @field_serializer("attributes")
    def _numbers_out(self, attributes: dict[str, str]) -> dict[str, str | float]:
        """Kind 'edit' rows write their numeric parameters as numbers again (other kinds: text as given)."""
        if self.kind != "edit":
            return attributes
        return {k: float(v) if k != "family" and _numeric_text(v) else v for k, v in attributes.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def canonical_number(value: float) -> str:
    """The text a numeric attribute is stored as: up to 10 significant digits ('0.7', '3', '1e-05')."""
    return format(float(value), ".10g")


def _numeric_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ManifestProblem(NamedTuple):
    """One thing wrong with one row; ``row`` counts data rows from 1 (no CSV header, no blank lines)."""

    row: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        who = f"id {short(repr(self.id))}" if self.id is not None else "no id"
        return f"row {self.row} ({who}): {self.reason}"


class ManifestError(InputError):
    """A manifest that must not run; ``problems`` lists every bad row, not just the first."""

    def __init__(self, problems: Sequence[ManifestProblem], source: str | None = None, message: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if message is None:
            rows = len({p.row for p in self.problems})
            head = f"{len(self.problems)} problem(s) in {rows} row(s) of the manifest{where}:"
            message = "\n  ".join([head, *(str(p) for p in self.problems)])
        super().__init__(message)


def resolve(uri: str, base_uri: str | None) -> str:
    """``uri`` as an absolute URI: relative paths are taken against the manifest's folder ``base_uri``."""
    if "://" in uri or uri.startswith("/") or base_uri is None:
        return uri
    return join(base_uri, uri)


def manifest_folder(uri: str) -> str:
    """The folder that relative image paths in the manifest at ``uri`` are taken against."""
    uri = str(uri)
    if "/" not in uri:
        return "."
    return uri.rsplit("/", 1)[0] or "/"


def image_uris(row: ManifestRow, base_uri: str | None = None) -> list[str]:
    """Every image URI of a row: its listed images, then the images in its folder (sorted)."""
    uris = [resolve(u, base_uri) for u in row.images]
    if row.image_dir:
        folder = resolve(row.image_dir, base_uri)
        fs, path = filesystem(folder)
        protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
        uris += [protocol + p for p in sorted(fs.find(path)) if p.lower().endswith(IMAGE_SUFFIXES)]
    return uris


def _describe(error: Mapping[str, Any]) -> str:
    """One pydantic error as a sentence a manifest author can act on."""
    loc = ".".join(str(p) for p in error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"missing required field {loc!r}"
    if kind == "extra_forbidden":
        return f"unknown field {loc!r} (allowed: {', '.join(ManifestRow.model_fields)})"
    if kind == "literal_error":
        return f"unknown {loc} {value!r} (expected {error['ctx']['expected']})"
    if kind == "value_error" and not loc:  # a whole-row rule (model validator): its own sentence
        return str(error["msg"]).removeprefix("Value error, ")
    if loc == "attributes" and kind == "dict_type":
        return f"attributes must be a JSON object or key=value;key=value pairs, got {value!r}"
    return f"field {loc!r}: {error['msg']} (got {short(repr(value))})"


def parse_rows(entries: Sequence[ManifestRow | Mapping[str, Any] | ManifestProblem]) -> tuple[
    list[ManifestRow | None], list[list[ManifestProblem]], list[str | None]
]:
    """Parse each entry on its own: the rows (None where unparseable), each row's problems, each row's raw id."""
    rows: list[ManifestRow | None] = []
    problems: list[list[ManifestProblem]] = []
    ids: list[str | None] = []
    for n, entry in enumerate(entries, start=1):
        if isinstance(entry, ManifestProblem):
            rows.append(None)
            problems.append([entry._replace(row=n)])
            ids.append(entry.id)
            continue
        if isinstance(entry, ManifestRow):
            rows.append(entry)
            problems.append([])
            ids.append(entry.id)
            continue
        rid = entry.get("id") if isinstance(entry.get("id"), str) else None
        ids.append(rid)
        try:
            rows.append(ManifestRow.model_validate(dict(entry)))
            problems.append([])
        except ValidationError as e:
            rows.append(None)
            problems.append([ManifestProblem(n, rid, _describe(err)) for err in e.errors()])
    return rows, problems, ids
