"""Third-party noise off by default (``-v`` shows it): library warnings, hub progress bars, info logs.

Called by the CLI before any command imports torch, diffusers or transformers: their verbosity is read
from the environment at import time. weightzoo's own output and Prefect's run logs are left as they are.
"""

from __future__ import annotations

import logging
import os
import warnings

_NOISY_LOGGERS = ("transformers", "diffusers", "peft", "torch", "urllib3", "botocore", "s3fs", "fsspec", "distributed")
_NOISY_MODULES = r"(transformers|diffusers|peft|torch|huggingface_hub|pydantic|moto|botocore|s3fs)(\.|$)"


def quiet(verbose: bool = False) -> None:
    """Silence third-party warnings and progress bars unless ``verbose``."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "Loading weights", diffusers' "Writing model shards"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_NOISY_MODULES)
