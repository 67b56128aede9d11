"""Failure paths of issue 30 as a user meets them: rows whose training overflows, a full disk, a temporary Prefect
server that starts slowly. Real faults (a learning rate AdamW cannot take, a real tmpfs with no room left, a real
server start), real ``weightzoo`` processes where the terminal is what is checked: the exit code and every line
printed, then the visible rows and unique ids.

Before: the overflowing build printed about 100 traceback lines and counted its rows "0 failed, 2 pending" (so
every rerun trained them again); the full disk printed 515 lines of Prefect ERROR records and a BuildIncomplete
traceback; a loaded machine's build failed with "did not answer in time" after Prefect's 20 s start timeout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_FINETUNE, can_mount, tmpfs

from weightzoo.cli import main as cli
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.ledger import Ledger
from weightzoo.tasks.device import cpu_threads, use_free_cores
from weightzoo.tasks.identity.synthetic import write_demo_manifest

FINETUNE = json.dumps(TINY_FINETUNE)
ROWS = ("subject-00000", "subject-00001")


def _visible(dataset: str) -> tuple[int, int]:
    """(rows, unique ids) a reader sees; an absent dataset has none."""
    if not Ledger(dataset).exists():
        return 0, 0
    ids = Dataset(dataset).ids
    return len(ids), len(set(ids))


def _weightzoo(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A real ``weightzoo`` process on the embedded default (its own temporary Prefect server), as a user runs it."""
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "weightzoo.cli", *argv], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=600)


def _own_lines_only(stderr: str) -> None:
    """Nothing on stderr but weightzoo's own progress (a slow temporary server start is told while it lasts)."""
    # (as text, or as JSON where an earlier in-process --log-format json run left its setting in the environment)
    assert all("weightzoo.cli.server" in line and "waiting for Prefect's temporary server" in line
               for line in stderr.splitlines()), stderr[-3000:]


def _build_args(manifest: str, base: Path, dataset: str) -> list[str]:
    return ["build", "--manifest", manifest, "--base", str(base), "--dataset", dataset, "--finetune-json", FINETUNE]


# -- rows that fail count as failed, with their reason ----------------------------------------------------------


def test_rows_whose_update_overflows_are_failed_with_their_reason_and_not_retrained_unless_asked(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    """AdamW's first step at learning rate 1e38 is 1e39, past float32: torch raises in ``opt.step()``. Before, that
    failed the batch (a traceback; its rows "0 failed, 2 pending"). Now both rows are failed with that reason, the
    build prints its summary and exits 1 (its terminal, no -v, is checked in a real process below)."""
    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=32)
    dataset = str(tmp_path / "ds")
    args = [*_build_args(manifest, tiny_base, dataset), "--learning-rate", "1e38"]
    reason = "non-finite update at step 1: value cannot be converted to type float without overflow (learning_rate 1e+38)"
    assert cli(args) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert out.out.splitlines() == [f"built {dataset}: 1 batch runs", "committed 0, failed 2, pending 0 of 2 (0 shards)",
                                    *(f"  failed {i} (attempt 1): {reason}" for i in ROWS)]
    assert cli(["status", "--dataset", dataset, "--manifest", manifest]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{dataset}: 0 committed in 0 shards, 2 failed, 0 pending of 2",
                                                    *(f"  failed {i} (attempt 1): {reason}" for i in ROWS)]
    # A rerun that is not asked to retry trains nothing: the rows stay failed at attempt 1.
    assert cli([*args, "--no-retry-failed"]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [f"built {dataset}: 0 batch runs",
                                                        "committed 0, failed 2, pending 0 of 2 (0 shards)"]
    assert {f.attempt for f in Ledger(dataset).failed().values()} == {1}
    # Asked (the same learning rate through --finetune-json this time): trained again, failed again, attempt 2.
    ft = json.dumps({**TINY_FINETUNE, "learning_rate": 1e38})
    assert cli(["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", dataset, "--finetune-json", ft,
                "--retry-failed"]) == 1
    assert capsys.readouterr().out.splitlines()[2:] == [f"  failed {i} (attempt 2): {reason}" for i in ROWS]
    assert _visible(dataset) == (0, 0)


# -- Prefect's logs stay off the terminal on failure paths ------------------------------------------------------

needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")


@needs_mount
def test_a_full_disk_prints_only_weightzoos_lines_and_a_rerun_with_room_commits(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    """A tmpfs left with 24 KiB: the batch's flow raises (no space for its cache), the build flow raises
    BuildIncomplete. Without -v the terminal shows the command's summary only."""
    manifest = write_demo_manifest(str(tmp_path / "m"), 2, images_per_subject=1, size=32)
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (24 << 10)))
        dataset = str(mnt / "ds")
        out = _weightzoo(*_build_args(manifest, tiny_base, dataset))
        assert out.returncode == 1, out.stderr[-3000:]
        _own_lines_only(out.stderr)
        lines = out.stdout.splitlines()
        assert lines[:2] == [f"built {dataset}: 1 batch runs (1 not completed)",
                             "committed 0, failed 2, pending 0 of 2 (0 shards)"]
        assert len(lines) == 5 and lines[2].startswith("  batch b-") and " FAILED: " in lines[2]
        assert all("no space left" in line.lower() for line in lines[2:]), lines
        (mnt / "filler").unlink()  # room again: the rerun (re-attempting failed ids, the default) commits both
        assert cli(_build_args(manifest, tiny_base, dataset)) == 0
        assert capsys.readouterr().out.splitlines()[1] == "committed 2, failed 0, pending 0 of 2 (1 shards)"
        assert _visible(dataset) == (2, 2)


# -- under load: the temporary server is given time, and the wait is told ----------------------------------------


def test_a_temporary_server_that_does_not_start_in_time_is_one_line(tmp_path: Path, tiny_base: Path) -> None:
    """Prefect's start timeout (here 1 s, far below any real start) runs out: one line naming the setting."""
    manifest = write_demo_manifest(str(tmp_path / "m"), 1, images_per_subject=1, size=32)
    dataset = str(tmp_path / "ds")
    out = _weightzoo(*_build_args(manifest, tiny_base, dataset),
                     env={"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"})
    assert (out.returncode, out.stdout) == (2, ""), out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        "weightzoo build: error: Prefect's temporary server did not start within 1 s, likely under load; start a "
        "lasting server with `weightzoo serve` and set PREFECT_API_URL to it, or raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
    assert _visible(dataset) == (0, 0)


def test_a_slow_temporary_server_start_is_reported_while_it_waits_and_its_time_out_is_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, prefect_home: Path
) -> None:
    """A real temporary server given 1 s (no real start is that fast), watched every 0.2 s: warnings while it
    starts, then Prefect's time-out, which the CLI turns into one line naming the setting to raise."""
    from prefect.server.api.server import SubprocessASGIServer

    from weightzoo.cli import server
    from weightzoo.deployments.net import free_port

    monkeypatch.setattr(server, "PROGRESS_EVERY_S", 0.2)
    monkeypatch.setenv(server.STARTUP_TIMEOUT_ENV, "1")
    server.patient_server()
    slow = SubprocessASGIServer(free_port())
    with caplog.at_level(logging.WARNING, logger=server.__name__), pytest.raises(RuntimeError) as raised:
        try:
            slow.start(timeout=1)  # in-process, Prefect read its settings at import: the argument, not the env
        finally:
            slow.stop()
    waits = [r.getMessage() for r in caplog.records if r.name == server.__name__]
    assert waits and waits[0].startswith("waiting for Prefect's temporary server to start: ")
    assert "(up to 1 s; a busy machine?)" in waits[0] and "weightzoo serve" in waits[0]
    assert str(server.prefect_fault(raised.value)).startswith("Prefect's temporary server did not start within 1 s")


def test_torch_threads_leave_busy_cores_to_their_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 cores: both when idle, one beside one or two busy processes; a user's OMP_NUM_THREADS wins."""
    assert [cpu_threads(2, busy) for busy in (0.0, 0.4, 0.6, 1.0, 2.0, 4.7)] == [2, 2, 1, 1, 1, 1]
    assert [cpu_threads(8, busy) for busy in (0.0, 3.2, 9.0)] == [8, 5, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert use_free_cores() is None and os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads = use_free_cores()
    assert threads is not None and os.environ["OMP_NUM_THREADS"] == str(threads) and threads >= 1
