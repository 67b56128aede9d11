"""Units of work as plain functions, one sub-package per stage of the data's way.

``finetune/``: manifest rows + a base model in, flattened fine-tuned rows (one shard per batch) out.
``subspace/``: committed rows in, a PCA subspace and its weights2weights applications out.
``diffusion/``: committed rows (cut into blocks) in, a weight generator and generated LoRAs out.
``device`` and ``seeds`` are shared by all stages.
"""
