"""weightzoo: build datasets of fine-tuned model weights, store them as Parquet, learn from them."""

__version__ = "0.1.0"
