"""The Celeb Basis: a basis of word embeddings fitted on celebrity names, once per base text encoder.

Celeb Basis (Yuan et al. 2023, "Inserting Anybody in Diffusion Models via Celeb Basis") writes a new
identity's words as ``mean_w + Σ_j c_wj · d_wj``, where word w (first name, last name) has a mean and
directions fitted on the base text encoder's input embeddings of many celebrities' names. A name word's
embedding is the mean of its tokens' embeddings (one token for most names in CLIP's BPE vocabulary).

Directions: the top ``basis_size`` principal directions of the centred name embeddings, each scaled
by its standard deviation (the paper's PCA; SD 1.5's 768-wide encoder gives 512 of them from ~700
names). A base whose embedding width (or name count) is below ``basis_size`` cannot have that many
principal directions, so the directions are then the first ``basis_size`` centred name embeddings
themselves, an over-complete basis of the same span: the row keeps its ``words × basis_size``
coefficients (1,024 by default) on every base, which is what a dataset of rows needs.

The fit is cached as safetensors (``mean``, ``dirs``) under ``<cache_dir>/celeb_basis/<key>``, the key
hashing the names, the options and the embeddings themselves; a row records the file and its hash so
that ``export`` turns its coefficients back into embeddings with exactly the basis it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib.resources import files

import torch

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.fs import filesystem, join
from weightzoo.storage.tensors import load_tensors, save_tensors

DEFAULT_NAMES = "celeb_names.txt"  # package data beside this module


@dataclass(frozen=True)
class Basis:
    mean: torch.Tensor  # (words, D)
    dirs: torch.Tensor  # (words, basis_size, D)
    fit: str  # "pca" or "names" (over-complete: the centred name embeddings)
    names: int  # names used
    uri: str | None  # the cached file, None when no cache_dir was given
    fingerprint: str  # sha256 prefix of (mean, dirs)

    def embed(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(…, words, basis_size) coefficients → (…, words, D) word embeddings."""
        return self.mean + torch.einsum("...wk,wkd->...wd", coefficients, self.dirs)


def read_names(uri: str | None) -> list[str]:
    """Names from a text file (one per line, ``#`` comments) at an fsspec URI, or the shipped list; deduplicated."""
    if uri is None:
        text = files("weightzoo.tasks.identity.recipes").joinpath(DEFAULT_NAMES).read_text(encoding="utf-8")
    else:
        fs, path = filesystem(uri)
        if not fs.exists(path):
            raise NotFoundError(f"celeb_basis names file {uri} does not exist")
        text = fs.cat_file(path).decode("utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line))


@torch.no_grad()
def name_embeddings(tokenizer, encoder, names: list[str], words: int) -> torch.Tensor:
    """(words, n, D): word w of each name with at least ``words`` words, as the mean of its token embeddings."""
    table = encoder.get_input_embeddings().weight.detach().float().cpu()
    out: list[list[torch.Tensor]] = [[] for _ in range(words)]
    for name in names:
        parts = name.split()
        if len(parts) < words:
            continue
        for w, part in enumerate(parts[:words]):
            ids = tokenizer(part, add_special_tokens=False).input_ids
            out[w].append(table[ids].mean(0))
    if not out[0]:
        raise InputError(f"no name has {words} words; celeb_basis needs names like 'First Last'")
    return torch.stack([torch.stack(col) for col in out])


def fit_directions(emb: torch.Tensor, basis_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Mean (words, D) and directions (words, basis_size, D) of name embeddings (words, n, D); see the module doc."""
    words, n, dim = emb.shape
    x = emb.double()
    mean = x.mean(1)
    centred = x - mean[:, None]
    if basis_size <= min(n - 1, dim):
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        dirs = vh[:, :basis_size] * (s[:, :basis_size] / math.sqrt(n - 1))[..., None]
        return mean.float(), dirs.float(), "pca"
    if n < basis_size:
        raise InputError(f"celeb_basis: basis_size {basis_size} needs at least that many names, got {n}")
    return mean.float(), centred[:, :basis_size].float(), "names"


def _key(names: list[str], words: int, basis_size: int, emb: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps([names, words, basis_size]).encode())
    h.update(emb.numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(mean: torch.Tensor, dirs: torch.Tensor) -> str:
    h = hashlib.sha256(mean.contiguous().numpy().tobytes())
    h.update(dirs.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fitted_basis(tokenizer, encoder, names_uri: str | None, words: int, basis_size: int,
                 cache_dir: str | None) -> Basis:
    """The basis for this text encoder and names: read from the cache, or fitted and cached."""
    names = read_names(names_uri)
    emb = name_embeddings(tokenizer, encoder, names, words)
    uri = join(cache_dir, "celeb_basis", f"{_key(names, words, basis_size, emb)}.safetensors") if cache_dir else None
    if uri is not None and filesystem(uri)[0].exists(filesystem(uri)[1]):
        saved = load_tensors(uri)
        mean, dirs, fit = saved["mean"], saved["dirs"], "pca" if saved["pca"].item() else "names"
    else:
        mean, dirs, fit = fit_directions(emb, basis_size)
        if uri is not None:
            save_tensors(uri, {"mean": mean, "dirs": dirs, "pca": torch.tensor(fit == "pca")})
    return Basis(mean, dirs, fit, emb.shape[1], uri, _fingerprint(mean, dirs))


def load_basis(record: dict) -> Basis:
    """The basis a row was trained with, from its hparams record (``uri``, ``fingerprint``), checked."""
    uri = record.get("uri")
    if not uri:
        raise InputError("this celeb_basis row's basis was not cached (trained without cache_dir); "
                         "retrain with a cache_dir to export it")
    saved = load_tensors(uri)
    mean, dirs = saved["mean"], saved["dirs"]
    if _fingerprint(mean, dirs) != record.get("fingerprint"):
        raise InputError(f"celeb_basis file {uri} is not the basis this row was trained with (fingerprint differs)")
    return Basis(mean, dirs, "pca" if saved["pca"].item() else "names", int(record.get("names", 0)), uri,
                 record["fingerprint"])
