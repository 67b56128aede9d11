"""weightzoo: build datasets of fine-tuned model weights, store them as Parquet, learn from them.

The API (``open_dataset``, ``build``, ``weights``, ``lora_state_dict``; docs/READING.md) is loaded on
first use (module ``__getattr__``), so ``import weightzoo`` stays light: no pyarrow, torch, fsspec or
prefect until one of them is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["build", "lora_state_dict", "open_dataset", "weights"]
_API = {"open_dataset": "weightzoo.storage.open", "build": "weightzoo.api", "weights": "weightzoo.api",
        "lora_state_dict": "weightzoo.api"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'weightzoo' has no attribute {name!r}")
