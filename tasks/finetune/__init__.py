"""Fine-tune stage: manifest rows and a base model in; per row, a flattened adapter out.

``contract`` is what every engine shares (``TrainingConfig``, ``ItemResult``/``BatchResult``, ``Engine``,
``RowRules``) and ``driver`` the one batch driver every engine runs (packs, AdamW, per-row clip, NaN
drops, OOM splits). The manifest: ``row`` (the row model), ``readers`` (JSONL/CSV/Parquet), ``images``
(decoding), ``manifest`` (validation). The ``diffusers-lora`` engine: ``config`` (``FinetuneConfig``),
``base_model`` (loads, or builds the tiny, base), ``engine`` (inputs and the pack trainer), ``recipes/``
(the methods), ``export`` and ``perfusion_loader`` (rows back as loadable files). ``engines`` names the
engines, ``batch`` plans batches and turns one into a committed shard, ``synthetic`` draws offline demo
subjects.
"""
