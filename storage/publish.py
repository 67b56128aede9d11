"""Publish a dataset as a clean snapshot in Hugging Face Hub dataset conventions.

    OUT/data/train-00000-of-0000N.parquet   visible rows only, one copy of each id
    OUT/layout.json                         the weight layout (keys, shapes, dtype)
    OUT/README.md                           dataset card: YAML header (configs, features), recipe, decode snippet

``datasets.load_dataset(OUT)`` loads it with no hand-written features, from the folder or from the Hub once
pushed (``--repo-id ORG/NAME`` names the repo in the card and gives the ``hf upload`` command). Columns use
only types ``datasets`` knows: ``attributes`` becomes a JSON string (``datasets`` has no map type) and
``weights`` becomes a fixed-size list of float16/float32 (``List(Value("float16"), length=D)``), so
``ds.with_format("torch")["weights"][:]`` is an (n, D) tensor; bf16, which Arrow has no float type for,
stays ``binary`` (the little-endian bytes of the shards; the card says how to view them as bf16).

**Why a list for fp16/fp32, though it is slower.** Measured on 2,000 rows × 100,000 fp16 (400 MB, one file,
datasets 5.2, 2 shared CPU cores, best of 3, three runs): ``load_dataset`` took 0.23–0.41 s with ``binary``,
0.40–0.88 s with ``fixed_size_binary``, 0.78–1.02 s with ``list<float16>`` and 0.85–1.47 s with
``fixed_size_list<float16>``; turning all weights into one (n, D) array afterwards took 0.3–0.8 s in every
form. A published copy is read by people with ``datasets``, torch format and the Hub viewer, not by
weightzoo's scans: typed values they can use without a decoder are worth ~2x on the load. The shards keep
``fixed_size_binary`` (docs/FORMAT.md), where speed matters.

The card holds no path of this machine: its snippet reads ``repo = "ORG/NAME"`` (the Hub, or a local copy
by the same variable), and recipe values that are local paths are shown by their file name only.

Verified: nothing leaves unchecked. Every shard is read once before anything is written, as ``Dataset``
reads do (size, layout, CRC32 of every weights byte, ids against the commit entry); a bad shard stops the
publish naming it, or (``skip_bad``) its rows are left out and listed. The check costs one more read of
the shards (the write pass then mostly hits the page cache); shipping a flipped bit to the Hub costs more.

Streaming: one row group in memory at a time. Resumable: output files are planned from the ledger
(deterministic names), each is written atomically and records in its footer which shards it holds,
so a rerun skips the files already complete and rewrites only the rest.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from weightzoo.errors import CorruptShardError, InputError
from weightzoo.storage.dataset import raise_bad, screen_files
from weightzoo.storage.fs import StorageOptions, atomic_write, filesystem, join, storage_step, write_bytes
from weightzoo.storage.layout import LORA_A, LORA_B, Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.listing import CommittedFile, committed_files
from weightzoo.storage.open import SHARD_COLUMN, files_dataset
from weightzoo.storage.shards import FORMAT_KEY, FORMAT_VERSION, LAYOUT_KEY, META_SCHEMA, WEIGHTS

DATA = "data"
SOURCE_KEY = b"weightzoo.publish.source"  # footer metadata: the shards (and their ids) a file holds
MAX_FILE_BYTES = 512 << 20  # weights bytes per output file; the Hub's usual order of magnitude
PLACEHOLDER_REPO = "ORG/NAME"  # the card's repo id when none is given: the card says to replace it
# The Hub's repo names: letters, digits, '-', '_', '.', at most 96, no '--' or '..', not ending in '.git'
# (huggingface_hub's validate_repo_id, stricter at the ends: a name starts and ends with a letter or digit).
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_OUTPUT_NAME = re.compile(r"train-\d{5}-of-\d{5}\.parquet(\.tmp-[0-9a-f]{12})?")


@dataclass(frozen=True)
class OutputFile:
    """One planned output file: consecutive committed shards, in ledger order."""

    name: str  # relative to the output root: data/train-00000-of-00003.parquet
    files: tuple[CommittedFile, ...]

    @property
    def rows(self) -> int:
        return sum(len(f.ids) for f in self.files)

    @property
    def source(self) -> bytes:
        """What the file holds, as recorded in its footer: equal iff the same rows from the same shards."""
        return json.dumps([[f.shard, f.nbytes, list(f.ids)] for f in self.files], separators=(",", ":")).encode()


@dataclass
class PublishReport:
    out: str
    rows: int
    files: list[str]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    removed: list[str] = field(default_factory=list)  # stale outputs of an earlier plan
    left_out: list[tuple[str, int, str]] = field(default_factory=list)  # (shard, visible ids, why): ``skip_bad``
    num_bytes: int = 0  # uncompressed size of the data (what ``datasets`` calls a split's num_bytes)
    download_size: int = 0  # bytes of the Parquet files
    repo_id: str | None = None  # the Hub dataset the card is written for (None: the card's placeholder)


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` as the Hub takes it, or one line saying what is wrong (before anything is read or written)."""
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise InputError(f"--repo-id {repo_id!r} is no Hub repo id: give ORG/NAME (letters, digits, '-', '_', '.'; "
                         "each part at most 96, starting and ending with a letter or digit; no '--' or '..')")
    return repo_id


def push_command(repo_id: str, out: str) -> str:
    """The command that uploads the snapshot at ``out`` to the Hub dataset ``repo_id`` (huggingface_hub's ``hf``
    CLI, which replaced ``huggingface-cli`` in huggingface_hub 1.0)."""
    return f"hf upload {repo_id} {shlex.quote(out)} . --repo-type dataset"


_LIST_TYPES = {"float16": pa.float16(), "float32": pa.float32()}  # bf16 has no Arrow float type: binary


def weights_type(layout: Layout) -> pa.DataType:
    """The published ``weights`` type: ``fixed_size_list<float16|float32>[D]`` (``datasets``: ``List(Value, length=D)``),
    or ``binary`` for bf16."""
    value = _LIST_TYPES.get(layout.dtype)
    return pa.binary() if value is None else pa.list_(value, layout.numel)


def publish_schema(layout: Layout) -> pa.Schema:
    """The published columns: the shard columns, with ``attributes`` as JSON and ``weights`` typed (``weights_type``)."""
    fields = [pa.field("attributes", pa.string()) if f.name == "attributes" else f for f in META_SCHEMA]
    return pa.schema([*fields, pa.field(WEIGHTS, weights_type(layout), nullable=False)]).with_metadata(
        {LAYOUT_KEY: layout.to_json().encode(), FORMAT_KEY: FORMAT_VERSION}
    )


def _weights(col: pa.Array, t: pa.DataType) -> pa.Array:
    """A shard's ``fixed_size_binary`` weights in the published type: the same buffer, no copy, for a list."""
    if not pa.types.is_fixed_size_list(t):
        return pc.cast(col, t)
    if col.null_count:
        raise CorruptShardError(f"{col.null_count} rows without weights")  # shards never hold one: a bug upstream
    size = t.list_size
    values = pa.Array.from_buffers(t.value_type, len(col) * size, [None, col.buffers()[1]], offset=col.offset * size)
    return pa.FixedSizeListArray.from_arrays(values, type=t)


def _type_key(t: pa.DataType) -> str:
    """A type as compared across files: a list's value type and size (Parquet renames its child field)."""
    return f"{t.value_type}[{t.list_size}]" if pa.types.is_fixed_size_list(t) else str(t)


def plan(files: list[CommittedFile], layout: Layout, max_file_bytes: int = MAX_FILE_BYTES) -> list[OutputFile]:
    """Group committed shards into output files of about ``max_file_bytes`` of weights each."""
    groups: list[list[CommittedFile]] = []
    size = 0
    for f in files:
        if not groups or size + len(f.ids) * layout.nbytes > max_file_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += len(f.ids) * layout.nbytes
    n = len(groups)
    return [OutputFile(f"{DATA}/train-{i:05d}-of-{n:05d}.parquet", tuple(g)) for i, g in enumerate(groups)]


def _convert(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A shard batch in published types: attributes as sorted-key JSON, weights typed, no ``shard``."""
    attrs = [None if a is None else json.dumps(dict(a), sort_keys=True) for a in batch.column("attributes").to_pylist()]
    cols = {name: batch.column(name) for name in schema.names}
    cols["attributes"] = pa.array(attrs, pa.string())
    cols[WEIGHTS] = _weights(batch.column(WEIGHTS), schema.field(WEIGHTS).type)
    return pa.RecordBatch.from_pydict(cols, schema=schema)


def _batches(dataset: ds.Dataset, out: OutputFile, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Visible rows of the output's shards, shard by shard, one bounded batch at a time."""
    for f in out.files:
        yield from dataset.to_batches(
            filter=ds.field(SHARD_COLUMN) == f.shard, batch_size=batch_size, batch_readahead=1, fragment_readahead=1
        )


def _write(dataset: ds.Dataset, out: OutputFile, fs: AbstractFileSystem, path: str, layout: Layout,
           batch_size: int) -> None:
    schema = publish_schema(layout).with_metadata({**publish_schema(layout).metadata, SOURCE_KEY: out.source})
    meta_cols = [n for n in schema.names if n != WEIGHTS]
    rows = 0
    with atomic_write(fs, path) as sink:
        with pq.ParquetWriter(
            sink, schema, compression={**dict.fromkeys(meta_cols, "zstd"), WEIGHTS: "none"},
            use_dictionary=meta_cols, write_statistics=meta_cols, write_page_index=False,
        ) as writer:
            for batch in _batches(dataset, out, batch_size):
                writer.write_batch(_convert(batch, schema), row_group_size=batch_size)
                rows += batch.num_rows
        if rows != out.rows:  # raising inside atomic_write leaves nothing behind
            raise CorruptShardError(f"{out.name}: read {rows} visible rows from its shards, the ledger says {out.rows}")


def _is_complete(fs: AbstractFileSystem, path: str, out: OutputFile, schema: pa.Schema) -> bool:
    """Written by an earlier run from the same shards and ids, with today's weights type (files appear whole,
    so existing = complete; a snapshot of an older weightzoo that wrote ``binary`` for fp16 is rewritten)."""
    if not fs.exists(path):
        return False
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f)
    found = meta.schema.to_arrow_schema()
    return (meta.num_rows == out.rows and (found.metadata or {}).get(SOURCE_KEY) == out.source
            and WEIGHTS in found.names and _type_key(found.field(WEIGHTS).type) == _type_key(schema.field(WEIGHTS).type))


def _sizes(fs: AbstractFileSystem, root: str, outputs: list[OutputFile]) -> tuple[int, int]:
    """(uncompressed data bytes, file bytes) of the published files, from their footers."""
    num_bytes = files = 0
    for o in outputs:
        path = join(root, o.name)
        files += fs.size(path)
        with fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return num_bytes, files


def _remove_stale(fs: AbstractFileSystem, root: str, planned: set[str]) -> list[str]:
    """Outputs of an earlier plan (another file count) and temporaries of a killed run; nothing else."""
    folder = join(root, DATA)
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return []
    stale = [p for p in fs.ls(folder, detail=False)
             if _OUTPUT_NAME.fullmatch(p.rsplit("/", 1)[-1]) and f"{DATA}/{p.rsplit('/', 1)[-1]}" not in planned]
    for p in stale:
        fs.rm(p)
    return stale


def publish(
    dataset_uri: str,
    out_uri: str,
    max_file_bytes: int = MAX_FILE_BYTES,
    batch_size: int = 128,
    storage_options: StorageOptions = None,
    skip_bad: bool = False,
    repo_id: str | None = None,
) -> PublishReport:
    """Write (or finish writing) the snapshot of ``dataset_uri``'s visible rows at ``out_uri``.

    Every shard is first read once as ``Dataset`` reads do (size, layout, CRC32, ids against its commit
    entry): a bad shard stops the publish before anything is written (``CorruptShardError`` naming it),
    or with ``skip_bad`` its rows are left out and listed in ``left_out``. ``repo_id`` (``ORG/NAME``, checked
    first): the Hub dataset the card's snippet loads; without it the card names ``ORG/NAME`` to replace.
    """
    if repo_id is not None:
        check_repo_id(repo_id)
    ledger = Ledger(dataset_uri, storage_options)
    files = committed_files(ledger)  # one ledger read: the plan and the rows agree
    src = ledger.fs
    bad = screen_files(ledger, files, verify=True)
    if not skip_bad or len(bad) == len(files):  # nothing verified is left to publish
        raise_bad(bad, ", or publish --skip-bad to leave its rows out")
    files = [f for f in files if f not in {b for b, _ in bad}]
    dataset = files_dataset(src, files, dataset_uri)
    layout = Layout.from_json(dataset.schema.metadata[LAYOUT_KEY])
    outputs = plan(files, layout, max_file_bytes)
    fs, root = filesystem(out_uri, storage_options)
    report = PublishReport(out_uri, sum(o.rows for o in outputs), [o.name for o in outputs], repo_id=repo_id)
    report.left_out = [(f.shard, len(f.ids), why) for f, why in bad]
    with storage_step(out_uri, "listing the snapshot's earlier files", retried=False):
        report.removed = _remove_stale(fs, root, set(report.files))
    for o in outputs:
        path = join(root, o.name)
        with storage_step(out_uri, f"reading {o.name}", retried=False):
            complete = _is_complete(fs, path, o, publish_schema(layout))
        if complete:
            report.skipped.append(o.name)
            continue
        _write(dataset, o, fs, path, layout, batch_size)  # reads the dataset and writes out: named at the top
        report.written.append(o.name)
    meta = dataset.to_table(columns=["kind", "method", "base_model", "hparams"])
    with storage_step(out_uri, "writing the snapshot's card and layout", retried=False):
        report.num_bytes, report.download_size = _sizes(fs, root, outputs)
        write_bytes(fs, join(root, "layout.json"), json.dumps(layout.to_dict(), indent=1).encode())
        card = dataset_card(meta, layout, publish_schema(layout), report)
        write_bytes(fs, join(root, "README.md"), card.encode())
    return report


# -- the dataset card -----------------------------------------------------------------------------------

_DTYPES = {pa.string(): "string", pa.float32(): "float32", pa.int32(): "int32", pa.binary(): "binary"}
# The pipeline attribute a model family's LoRA adapts, which prefixes the keys ``load_lora_weights`` takes:
# tasks/identity/families.py's ``Family.denoiser``, copied because storage imports no task (a test keeps
# them equal). Rows record their family in hparams; rows from before families are SD rows.
DENOISERS = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def feature_dtype(t: pa.DataType) -> str:
    """The ``datasets`` dtype name of a published scalar column's Arrow type (what ``Features`` would infer)."""
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}, tz={t.tz}]" if t.tz else f"timestamp[{t.unit}]"
    if pa.types.is_float16(t):
        return "float16"
    return _DTYPES[t]


def _feature_yaml(f: pa.Field) -> str:
    """One ``dataset_info.features`` entry, as ``datasets`` writes it (a list: ``list``, and ``length`` if fixed)."""
    if pa.types.is_fixed_size_list(f.type):
        return f"  - name: {f.name}\n    list: {feature_dtype(f.type.value_type)}\n    length: {f.type.list_size}\n"
    if pa.types.is_list(f.type):
        return f"  - name: {f.name}\n    list: {feature_dtype(f.type.value_type)}\n"
    return f"  - name: {f.name}\n    dtype: {feature_dtype(f.type)}\n"


def _yaml_header(schema: pa.Schema, report: PublishReport) -> str:
    features = "".join(_feature_yaml(f) for f in schema)
    name = "" if report.repo_id is None else f"pretty_name: {report.repo_id.split('/')[1]}\n"
    return (
        "---\nlicense: other  # placeholder: set the license of your images and base model\n"
        f"{name}tags:\n- weightzoo\n- lora\n- weight-space\n"
        f"configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {DATA}/train-*.parquet\n"
        f"dataset_info:\n  features:\n{features}  splits:\n  - name: train\n    num_bytes: {report.num_bytes}\n"
        f"    num_examples: {report.rows}\n  download_size: {report.download_size}\n"
        f"  dataset_size: {report.num_bytes}\n---\n"
    )


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k or '(none)'}: {n}" for k, n in counter.most_common())


def _local_path(text: str) -> bool:
    return text.startswith(("/", "~", "file:")) or bool(re.match(r"[A-Za-z]:[\\/]", text))


def _no_paths(value: object) -> object:
    """A recipe value with every local path cut to ``…/<file name>``: the card travels, this machine's paths do not
    (the rows' own ``hparams`` column keeps them)."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_paths(v) for v in value]
    if isinstance(value, str) and _local_path(value):
        return f"…/{value.rstrip('/').rsplit('/', 1)[-1]}"
    return value


def _recipe(meta: pa.Table) -> str:
    """Base-model fingerprints and each distinct fine-tune config of the rows, with counts."""
    lines = [f"- base model fingerprint(s): {_counts(Counter(meta.column('base_model').to_pylist()))}",
             f"- method(s): {_counts(Counter(meta.column('method').to_pylist()))}", ""]
    configs = Counter(meta.column("hparams").to_pylist())
    for i, (text, n) in enumerate(configs.most_common()):
        pretty = json.dumps(_no_paths(json.loads(text or "{}")), indent=2, sort_keys=True, ensure_ascii=False)
        lines += [f"Fine-tune config {i + 1} of {len(configs)} ({n} rows):", "", "```json", pretty, "```", ""]
    return "\n".join(lines)


_OPEN = '''import json
import math
import os

import torch
from datasets import load_dataset

repo = "{repo}"  # {repo_note}
if os.path.isdir(repo):  # a local copy
    layout_file = os.path.join(repo, "layout.json")
else:  # the Hub
    from huggingface_hub import hf_hub_download

    layout_file = hf_hub_download(repo, "layout.json", repo_type="dataset")
with open(layout_file) as f:
    layout = json.load(f)  # {{"dtype": ..., "entries": [[key, shape], ...], "fixed"?: [...]}}
'''

_WEIGHTS_LIST = '''# weights as float32 tensors (ds["weights"][:] is (n, D)); the other columns as they are (torch has no timestamps)
ds = load_dataset(repo, split="train").with_format("torch", columns=["weights"], output_all_columns=True)


def weights_of(row: dict) -> torch.Tensor:
    """A row's flat weights: `weights` is a list feature of {dtype}, a tensor in torch format."""
    return row["weights"]
'''

_WEIGHTS_BF16 = '''ds = load_dataset(repo, split="train")


def weights_of(row: dict) -> torch.Tensor:
    """A row's flat weights: Arrow has no bfloat16, so `weights` holds little-endian bf16 bytes (int16 bits)."""
    return torch.frombuffer(bytearray(row["weights"]), dtype=torch.int16).view(torch.bfloat16)
'''

_TENSORS = '''

def fixed(f: dict) -> torch.Tensor:  # a tensor every row shares, none stores (lora_fa's A): rule "orthogonal"
    g = torch.Generator().manual_seed(f["seed"])
    q, r = torch.linalg.qr(torch.randn(math.prod(f["shape"][1:]), f["shape"][0], generator=g, dtype=torch.float64))
    q = q * torch.where(r.diagonal() < 0, -1.0, 1.0)
    return (q.T * f["scale"]).float().reshape(f["shape"])


def tensors(row: dict) -> dict[str, torch.Tensor]:
    """A row's tensors by layout key, float32, as trained (a LoRA's A and B; a fixed A rebuilt)."""
    flat, out, start = weights_of(row).float(), {}, 0
    for key, shape in layout["entries"]:
        n = math.prod(shape)
        out[key] = flat[start : start + n].view(*shape)
        start += n
    return out | {f["key"]: fixed(f) for f in layout.get("fixed", [])}
'''

_LORA = '''

PREFIX = {prefixes}  # hparams "family" -> the part its LoRA adapts


def lora_state_dict(row: dict) -> dict[str, torch.Tensor]:
    """What `pipe.load_lora_weights` takes: keys prefixed by the family's denoiser, alpha / rank baked into B
    (diffusers loads a LoRA without alphas at scale 1)."""
    hparams = json.loads(row["hparams"])
    prefix, scale = PREFIX[hparams.get("family", "sd")], hparams["alpha"] / hparams["rank"]
    return {{f"{{prefix}}.{{k}}": t * scale if k.endswith(".lora_B.weight") else t for k, t in tensors(row).items()}}


row = ds[0]
lora = lora_state_dict(row)
'''

_NOT_LORA = '''

row = ds[0]
parts = tensors(row)
'''

_LOAD = '''from diffusers import DiffusionPipeline

base = "BASE_MODEL"  # replace: the Hub id or folder of the base the rows were trained on (Recipe, above)
pipe = DiffusionPipeline.from_pretrained(base)
pipe.load_lora_weights(lora)  # the row's LoRA, at the strength it was trained with
# image = pipe(row["prompt"]).images[0]
'''


def _is_lora(layout: Layout) -> bool:
    return all(k.endswith((LORA_A, LORA_B)) for k in (*layout.keys, *(f.key for f in layout.fixed)))


def decode_snippet(layout: Layout, repo_id: str | None) -> str:
    """The card's decode code, for this layout's dtype: a row → its tensors, and for a LoRA layout the state dict
    ``load_lora_weights`` takes. ``repo`` is the Hub repo id; a local copy's folder works in the same variable."""
    note = ("the Hub dataset; a local copy's folder works here too" if repo_id else
            "replace with the Hub repo id you push this folder to, or a local copy's folder")
    code = _OPEN.format(repo=repo_id or PLACEHOLDER_REPO, repo_note=note)
    code += _WEIGHTS_BF16 if layout.dtype == "bfloat16" else _WEIGHTS_LIST.format(dtype=layout.dtype)
    code += _TENSORS
    code += _LORA.format(prefixes=json.dumps(DENOISERS)) if _is_lora(layout) else _NOT_LORA
    return code


def _fixed_note(layout: Layout) -> str:
    """The fixed tensors a row does not store (``lora_fa``'s A): a reader must rebuild them (the snippet does)."""
    if not layout.fixed:
        return ""
    return (f"plus {len(layout.fixed)} fixed tensors every row shares and none stores, rebuilt from the rule, "
            "seed and scale in `layout.json`; ")


def _weights_text(layout: Layout) -> str:
    """What the ``weights`` column is and how to get an (n, D) tensor of all rows."""
    if layout.dtype == "bfloat16":
        return ("`weights`: the flattened tensors as little-endian bfloat16 bytes (`binary`: Arrow has no bfloat16 "
                "type, so no list feature can hold them). A row: `torch.frombuffer(bytearray(row[\"weights\"]), "
                "dtype=torch.int16).view(torch.bfloat16)`; all rows as (n, D): `torch.frombuffer(bytearray("
                "b\"\".join(ds[\"weights\"])), dtype=torch.int16).view(torch.bfloat16).view(len(ds), -1)`.")
    return (f"`weights`: the flattened tensors, a fixed-size list of {layout.numel:,} {layout.dtype} values. "
            "`ds.with_format(\"torch\")[\"weights\"][:]` is an (n, D) tensor (float32; "
            f"`with_format(\"torch\", dtype=torch.{layout.dtype})` keeps {layout.dtype}).")


_ABOUT = {  # what a published column holds, for the card (a column without an entry is named only)
    "attributes": "JSON object of labels",
    "base_model": "fingerprint of the base pipeline's files",
    "layout": "fingerprint of `layout.json`",
    "hparams": "JSON of the resolved fine-tune config",
    "loss_history": "the training loss, one mean per `loss_window` steps",
}


def _columns(schema: pa.Schema, layout: Layout) -> str:
    """The card's list of columns, from the published schema (so a new shard column is never left out)."""
    named = [f"`{n}` ({_ABOUT[n]})" if n in _ABOUT else f"`{n}`" for n in schema.names if n != WEIGHTS]
    return f"{', '.join(named)}, and {_weights_text(layout)}"


def _use(layout: Layout, repo_id: str | None) -> list[str]:
    """The card's how-to: decode a row and, for a LoRA layout, load it into the family's pipeline."""
    code = ["```python", decode_snippet(layout, repo_id).rstrip("\n"), "```", ""]
    if not _is_lora(layout):
        return ["## Decode a row", "",
                "These rows are not LoRA factors (their `method` trains other tensors): `tensors(row)` gives them by "
                "layout key; `weightzoo export --id ID` writes a row in the form its method's loader takes "
                "(weightzoo's docs/RECIPES.md).", "", *code]
    return ["## Load a row into diffusers", "",
            "`lora_state_dict(row)` is what the row's model family's pipeline takes with `pipe.load_lora_weights`: "
            "keys prefixed by the family's denoiser (`unet.` for SD and SDXL rows, `transformer.` for SD3 and Flux), "
            "float32, `alpha / rank` baked into `lora_B`. Fixed tensors are rebuilt from `layout.json` "
            "(`weightzoo.lora_state_dict` of a weightzoo dataset gives the same dict).", "", *code,
            "```python", _LOAD.rstrip("\n"), "```", ""]


def _push(repo_id: str | None) -> list[str]:
    repo = repo_id or PLACEHOLDER_REPO
    then = "" if repo_id else f" (replace `{PLACEHOLDER_REPO}`, and the `repo` above, with your repo id)"
    return ["## Push this folder to the Hub", "",
            f"From inside this folder{then}:", "", "```bash", f"hf upload {repo} . --repo-type dataset", "```", ""]


def dataset_card(meta: pa.Table, layout: Layout, schema: pa.Schema, report: PublishReport) -> str:
    """README.md: YAML header ``datasets`` reads, then what the rows are, how they were made, how to load one.
    It names no path of this machine: the snippet loads ``report.repo_id`` (or a placeholder to replace)."""
    kinds = _counts(Counter(meta.column("kind").to_pylist()))
    return "\n".join([
        _yaml_header(schema, report),
        f"# {report.repo_id or 'weightzoo LoRA dataset'}", "",
        f"{report.rows} fine-tuned models, one per row ({kinds}), in {len(report.files)} Parquet file(s) under "
        f"`{DATA}/`. Each row is one LoRA's weights flattened in the layout of `layout.json` "
        f"({len(layout.keys)} tensors, {layout.numel:,} values of {layout.dtype}, {layout.nbytes:,} bytes; "
        f"{_fixed_note(layout)}"
        f"layout fingerprint `{layout.fingerprint}`), published by `weightzoo publish` from the committed rows "
        "of a weightzoo dataset: each id appears once.", "",
        "## Columns", "", _columns(schema, layout), "",
        "## Recipe", "", _recipe(meta),
        *_use(layout, report.repo_id),
        *_push(report.repo_id),
    ])
