"""What the terminal shows: the CLI's own progress, results and warnings by default, on success and on failure
alike; ``-v`` adds Prefect's logs (run logs, and its own warnings and errors with their tracebacks), library
warnings and progress bars; ``--quiet`` leaves errors only; ``--log-format json`` for batch jobs.

Called by the CLI before any command imports torch, diffusers, transformers or prefect: their verbosity
is read from the environment at import time. Prefect's console handler is set through Prefect's own
``PREFECT_LOGGING_<path>`` overrides, so only the terminal is quieter: every run log (task-level INFO
lines included) still reaches the API and the UI, whose handlers are separate.
"""

from __future__ import annotations

import logging
import os
import warnings

LOG_FORMATS = ("text", "json")
_NOISY_LOGGERS = ("transformers", "diffusers", "peft", "torch", "urllib3", "botocore", "s3fs", "fsspec", "distributed")
_NOISY_MODULES = r"(transformers|diffusers|peft|torch|huggingface_hub|pydantic|moto|botocore|s3fs)(\.|$)"
CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"  # Prefect's terminal handler (logging.yml: handlers.console)
CONSOLE_FORMAT = "PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER"
CONSOLE_CLASS = "PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS"


def quiet(verbose: bool = False, errors_only: bool = False, log_format: str = "text") -> None:
    """Silence Prefect's INFO lines, third-party warnings and progress bars unless ``verbose``;
    with ``errors_only``, Prefect's warnings too."""
    if log_format == "json":
        os.environ.setdefault(CONSOLE_FORMAT, "json")
        os.environ.setdefault("TQDM_DISABLE", "1")  # a bar is no log line
    if verbose and not errors_only:
        return
    os.environ.setdefault(CONSOLE_LEVEL, "ERROR" if errors_only else "WARNING")
    # Prefect's records and user errors off the terminal: the command reports its own end (weightzoo.cli.console)
    os.environ.setdefault(CONSOLE_CLASS, "weightzoo.cli.console.ConsoleHandler")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' "Loading weights", diffusers' "Writing model shards"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_NOISY_MODULES)
