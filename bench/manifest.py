"""Manifest validation at scale: N rows that share a few images, wall seconds and peak RSS, in one run.

    python bench/manifest.py [--rows 100000] [--images 4] [--size 512] [--baseline REF --baseline-rows 5000]

Writes ``--images`` PNGs and a JSONL manifest of ``--rows`` rows, each naming every image (the probe's case:
the same 4 images on every row), then validates it with ``load_and_validate`` in a child process and prints
wall seconds and the child's peak RSS (``VmHWM``: its own address space, not the parent's at the fork).
With ``--baseline REF`` it validates the same kind of manifest (``--baseline-rows`` rows, since the old
method is slow) with the code of git commit REF, checked out into a temp folder, and prints the ratios
per row. Target (issue #21): 100,000 rows in under 30 s and under 500 MB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The child validates and reports its own peak RSS; it imports whichever weightzoo comes first on its path.
CHILD = """
import sys, time
import weightzoo.tasks.finetune.manifest as m
from weightzoo.tasks.finetune.manifest import load_and_validate
print(m.__file__, file=sys.stderr)
t = time.perf_counter()
rows = load_and_validate(sys.argv[1])
wall = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
print(len(rows), len({r.id for r in rows}), wall, hwm)
"""


def write_manifest(folder: str, rows: int, images: int, size: int) -> str:
    """``images`` random PNGs of ``size`` px and a JSONL manifest of ``rows`` rows naming all of them."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(images):
        name = f"img-{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        names.append(name)
    path = os.path.join(folder, f"manifest-{rows}.jsonl")
    with open(path, "w") as f:
        for n in range(rows):
            f.write(json.dumps({"id": f"subject-{n:06d}", "images": names, "prompt": "a photo of sks person"}) + "\n")
    return path


def baseline_tree(ref: str, into: str) -> str:
    """A folder importable as ``weightzoo`` with the code of ``ref`` (the package maps storage/, tasks/, flows/)."""
    src = os.path.join(into, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", REPO, "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(into, "pkg")
    shutil.copytree(os.path.join(src, "weightzoo"), os.path.join(pkg, "weightzoo"))
    for sub in ("storage", "tasks", "flows"):
        os.symlink(os.path.join(src, sub), os.path.join(pkg, "weightzoo", sub))
    return pkg


def validate(manifest: str, pythonpath: str | None) -> tuple[int, int, float, float]:
    """(rows, unique ids, seconds, peak MB) of one validation in a fresh child process."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, manifest], check=True, capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(manifest))  # not the repository: its weightzoo/ would come first
    assert pythonpath is None or pythonpath in out.stderr, out.stderr  # the baseline ran the baseline's code
    rows, ids, wall, hwm = out.stdout.split()
    return int(rows), int(ids), float(wall), float(hwm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="Side of each square test image in pixels.")
    ap.add_argument("--baseline", default=None, help="A git commit whose validation to compare with.")
    ap.add_argument("--baseline-rows", type=int, default=5_000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        t = time.perf_counter()
        manifest = write_manifest(tmp, args.rows, args.images, args.size)
        print(f"# {args.rows:,} rows over {args.images} images of {args.size}x{args.size} px, "
              f"written in {time.perf_counter() - t:.1f} s; {os.cpu_count()} cpus")
        print(f"{'method':<24} {'rows':>8} {'ids':>8} {'wall s':>8} {'peak MB':>8} {'rows/s':>9}")
        results = [("this tree", *validate(manifest, None))]
        if args.baseline:
            small = write_manifest(tmp, args.baseline_rows, args.images, args.size)
            results.append((f"{args.baseline[:10]} (before)", *validate(small, baseline_tree(args.baseline, tmp))))
        for name, rows, ids, wall, hwm in results:
            print(f"{name:<24} {rows:>8,} {ids:>8,} {wall:>8.1f} {hwm:>8.0f} {rows / wall:>9,.0f}")
        if args.baseline:
            (_, r1, _, w1, _), (_, r0, _, w0, _) = results
            print(f"speed-up per row: {(r1 / w1) / (r0 / w0):.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
