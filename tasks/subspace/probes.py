"""Attribute directions fitted to the sample: ridge probes whose size and penalty are chosen by cross-validation.

weights2weights regresses 64,974 identities' labels on 1,000 components (about 65 identities per component).
With a few hundred rows an unregularised fit over every component interpolates the labels and its directions
are mostly noise (docs/SUBSPACE.md). So each attribute's probe is a multi-output ridge regression of its
one-hot labels on the first ``k'`` coordinates (standardised per component), with ``k'`` and the penalty λ
chosen by ``FOLDS``-fold cross-validated accuracy (argmax over labels) on the fitted rows. Its direction for
label v, in coefficient space, is the ridge weight of v divided by the components' std (zero past ``k'``), so
``(c − c̄) · d_v`` is the probe's score. The cross-validated accuracy is stored with the subspace
(``directions.json``, ``directions.safetensors``) and shown by ``weightzoo edit``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from weightzoo.storage.fs import filesystem, join, write_bytes

FOLDS = 5
PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # λ on standardised coordinates (units of rows)
MIN_ROWS = 10  # a label carried by fewer fitted rows gets a warning: its direction is a guess
DIRECTIONS_JSON, DIRECTIONS_FILE = "directions.json", "directions.safetensors"


@dataclass
class Probe:
    """One attribute's fitted directions and how well they predict held-out rows."""

    attribute: str
    labels: list[str]
    counts: dict[str, int]  # fitted rows per label
    components: int  # k' coordinates used
    penalty: float  # ridge λ
    cv_accuracy: float  # FOLDS-fold cross-validated accuracy of argmax over labels
    chance: float  # share of the most common label: what always guessing it scores
    directions: torch.Tensor  # (labels, k) in coefficient space

    def direction(self, label: str) -> torch.Tensor:
        return self.directions[self.labels.index(label)]

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "directions"}


def _candidates(k: int) -> list[int]:
    sizes, n = [], 1
    while n < k:
        sizes.append(n)
        n *= 2
    return [*sizes, k]


def _ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """Ridge weights (d, m) of centred ``y`` on centred ``x``."""
    gram = x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ y)


def _accuracy(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, penalty: float) -> float:
    mx, my = x_tr.mean(0), y_tr.mean(0)
    beta = _ridge(x_tr - mx, y_tr - my, penalty)
    pred = ((x_te - mx) @ beta + my).argmax(1)
    return float((pred == y_te.argmax(1)).double().mean())


def fit_probe(coords: torch.Tensor, labels: list[str | None], attribute: str, seed: int = 0) -> Probe:
    """The cross-validated ridge probe of ``attribute`` on ``coords`` (n, k); rows labelled None are left out."""
    keep = [i for i, v in enumerate(labels) if v is not None]
    values = sorted({labels[i] for i in keep})  # type: ignore[type-var]
    x = coords[keep].double()
    scale = x.std(0, correction=1).clamp_min(1e-12)
    x = x / scale
    y = torch.tensor([[float(labels[i] == v) for v in values] for i in keep], dtype=torch.float64)
    n, k = x.shape
    counts = {v: int(sum(labels[i] == v for i in keep)) for v in values}
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % min(FOLDS, n)
    best = (-1.0, 0, 0.0)
    if len(values) > 1 and n >= 2 * min(FOLDS, n) and min(FOLDS, n) > 1:
        for size in _candidates(k):
            for penalty in PENALTIES:
                accs = [_accuracy(x[folds != f, :size], y[folds != f], x[folds == f, :size], y[folds == f], penalty)
                        for f in range(int(folds.max()) + 1)]
                acc = sum(accs) / len(accs)
                # ties: fewer components, then the larger penalty (the simpler probe)
                if acc > best[0] + 1e-12 or (abs(acc - best[0]) <= 1e-12 and size == best[1] and penalty > best[2]):
                    best = (acc, size, penalty)
    else:  # too few rows to cross-validate: every component, a middle penalty, no accuracy claimed
        best = (float("nan"), k, 1.0)
    acc, size, penalty = best
    beta = _ridge(x[:, :size] - x[:, :size].mean(0), y - y.mean(0), penalty)  # (size, m)
    directions = torch.zeros(len(values), k, dtype=torch.float64)
    directions[:, :size] = (beta / scale[:size, None]).T
    return Probe(attribute, values, counts, size, penalty, acc, max(counts.values()) / n, directions.float())


def fit_probes(coords: torch.Tensor, attributes: list[dict[str, str]], seed: int = 0) -> dict[str, Probe]:
    """A probe for every attribute that at least two labels of the fitted rows carry."""
    names = sorted({a for row in attributes for a in row})
    out = {}
    for name in names:
        labels = [row.get(name) for row in attributes]
        if len({v for v in labels if v is not None}) > 1:
            out[name] = fit_probe(coords, labels, name, seed)
    return out


def save_probes(uri: str, probes: dict[str, Probe]) -> None:
    """Write the probes beside the subspace: their summaries as JSON, their directions as safetensors."""
    import safetensors.torch

    fs, root = filesystem(uri)
    tensors = {name: p.directions.contiguous() for name, p in probes.items()}
    write_bytes(fs, join(root, DIRECTIONS_FILE), safetensors.torch.save(tensors) if tensors else
                safetensors.torch.save({"_": torch.zeros(0)}))
    body = {name: p.summary() for name, p in probes.items()}
    write_bytes(fs, join(root, DIRECTIONS_JSON), json.dumps(body, indent=2, sort_keys=True).encode())


def load_probes(uri: str) -> dict[str, Probe] | None:
    """The probes stored with a subspace, or None for a subspace fitted before they were stored."""
    import safetensors.torch

    fs, root = filesystem(uri)
    try:
        summaries = json.loads(fs.cat_file(join(root, DIRECTIONS_JSON)))
        tensors = safetensors.torch.load(fs.cat_file(join(root, DIRECTIONS_FILE)))
    except FileNotFoundError:
        return None
    return {name: Probe(**s, directions=tensors[name]) for name, s in summaries.items()}
