"""bench/gpu_check.py --tiny: the prepared GPU measurement's own code, end to end on CPU with the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

from weightzoo.tasks.identity import recipes


def test_gpu_check_tiny_prints_every_row() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    expected = ["models/hour packed (pack=3)", "models/hour sequential (pack=1)", "models/hour one process per identity",
                "packed = sequential (fp32)", *[f"step time: {n}" for n in recipes.names()], "subspace fit",
                "weight diffusion training", "sdxl: rows/s packed / sequential", "flux: rows/s packed / sequential"]
    assert list(rows) == expected
    for name in expected:
        assert float(rows[name][0]) >= 0 and rows[name][1], (name, rows[name])
    assert all(float(rows[n][0]) > 0 for n in expected if n != "packed = sequential (fp32)")
    assert rows["packed = sequential (fp32)"][2].endswith("ok")
