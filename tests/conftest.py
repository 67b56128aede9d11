"""Shared fixtures. Session-scoped where building costs seconds (the tiny model, the S3 server)."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

pytest_plugins = ["helpers"]  # tests/helpers.py: every fixture, loaded once per session

# The longest files first (longest-processing-time order, from the durations of a sequential run): `make test`
# runs several processes (pytest-xdist, a file at a time, handed out in this order), and a long file handed out
# last would run alone at the end. Many of them mostly wait (heartbeats, worker polls, server starts), so
# they overlap well with the CPU-bound rest.
FIRST = ("test_trust.py", "test_production.py", "test_orchestration_e2e.py", "test_flows.py", "test_failures.py",
         "test_signals.py", "test_world.py", "test_rounds_e2e.py", "test_faults.py", "test_recipes.py",
         "test_ledger.py", "test_gpu_check.py", "test_w2w.py", "test_verify.py", "test_subspace.py",
         "test_terminal.py", "test_cli_plan.py", "test_finetune.py", "test_families.py", "test_tracking.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: within a file, as written
