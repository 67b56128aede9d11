"""Shared fixtures. Session-scoped where building costs seconds (the tiny model, the S3 server)."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

pytest_plugins = ["helpers"]  # tests/helpers.py: every fixture, loaded once per session
