"""weightzoo: build datasets of fine-tuned model weights, store them as Parquet, learn from them.

``weightzoo.open_dataset(uri)`` is loaded on first use (module ``__getattr__``), so ``import
weightzoo`` stays light: no pyarrow, torch or fsspec until a dataset is opened.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_dataset"]


def __getattr__(name: str) -> Any:
    if name == "open_dataset":
        from weightzoo.storage.open import open_dataset

        return open_dataset
    raise AttributeError(f"module 'weightzoo' has no attribute {name!r}")
