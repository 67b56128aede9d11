"""Training curves out of a batch, for the people watching it: the compact loss curve every row stores, a
PNG of a batch's curves (its run's artifact), and TensorBoard event files (``--report-to tensorboard``).

The driver hands each row's per-step loss, learning rate and pre-clip gradient norm out in its
``ItemResult``; everything here runs after the batch trained, so a tracker never slows a step and the
driver never imports a tracking package. TensorBoard's layout follows the diffusers scripts'
``logging_dir``: one TensorBoard run per row, ``<logging dir>/<batch>/<row id>``, with the scalars
``loss``, ``lr`` and ``grad_norm`` against the step (1-based), so ``tensorboard --logdir <logging dir>``
overlays a batch's rows.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, is_local, join
from weightzoo.tasks.finetune.contract import ItemResult

REPORT_TO = ("none", "tensorboard")  # the diffusers scripts' ``--report_to`` values this project writes
TENSORBOARD_DIR = "_tensorboard"  # default logging dir, under the dataset ("_": no reader lists it)
INSTALL_HINT = "pip install 'weightzoo[tracking]'"


def window_means(values: Sequence[float], window: int) -> list[float]:
    """One value per full ``window`` steps, the mean of that window; a partial last window is left out,
    so a row of ``steps`` steps keeps ``steps // window`` values whatever it trained for."""
    return [math.fsum(values[i : i + window]) / window for i in range(0, len(values) - window + 1, window)]


def has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_report_to(report_to: str, label: str = "report_to") -> None:
    """Refuse, in one line, a tracker whose package is not installed (before anything trains)."""
    if report_to == "tensorboard" and not has_tensorboard():
        raise InputError(f"{label} tensorboard needs the tensorboard package: {INSTALL_HINT}")


def plot_curves(curves: Mapping[str, Sequence[float]], window: int, title: str) -> bytes:
    """A PNG of each row's windowed loss against the step at each window's end (log scale when every value
    is positive); rows with no full window are left out."""
    import matplotlib

    matplotlib.use("Agg")  # headless workers
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    drawn = {row: c for row, c in curves.items() if c}
    for row, curve in drawn.items():
        ax.plot([window * (i + 1) for i in range(len(curve))], curve, marker="." if len(curve) < 20 else None,
                linewidth=1, label=row)
    values = [v for c in drawn.values() for v in c if math.isfinite(v)]
    if values and min(values) > 0:
        ax.set_yscale("log")
    if 0 < len(drawn) <= 10:  # beyond ten, a legend hides the curves
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {window} steps)")
    ax.set_title(title if drawn else f"{title}: no row trained {window} steps", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class TensorBoardTracker:
    """Write each row's curves as TensorBoard events under ``logdir`` (any URI): one run per row.

    Local folders are written in place; elsewhere (S3) the event files are written to a temporary folder,
    then uploaded through fsspec like every other weightzoo write. A retried batch adds an event file to
    the same runs (TensorBoard merges a run's files).
    """

    def __init__(self, logdir: str) -> None:
        check_report_to("tensorboard")
        self.logdir = logdir

    def __call__(self, results: Sequence[ItemResult]) -> None:
        fs, root = filesystem(self.logdir)
        if is_local(fs):
            _write_events(root, results)
            return
        with tempfile.TemporaryDirectory(prefix="weightzoo-tb-") as tmp:
            _write_events(tmp, results)
            for folder, _, files in os.walk(tmp):
                for name in files:
                    rel = os.path.relpath(os.path.join(folder, name), tmp).replace(os.sep, "/")
                    fs.put_file(os.path.join(folder, name), join(root, rel))


def _write_events(root: str, results: Sequence[ItemResult]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for r in results:
        if not r.loss_history:
            continue  # failed before its first step (inputs, out of memory): nothing to draw
        with SummaryWriter(log_dir=os.path.join(root, r.id)) as writer:
            for name, values in (("loss", r.loss_history), ("lr", r.lr_history), ("grad_norm", r.grad_norm_history)):
                for step, value in enumerate(values, start=1):
                    writer.add_scalar(name, value, step)
