"""The fine-tune core every engine shares: manifest rows in; per row, a flattened adapter out.

``contract`` is what every engine shares (``TrainingConfig``, ``ItemResult``/``BatchResult``, ``Engine``,
``RowRules``) and ``driver`` the one batch driver every engine runs (packs, AdamW, per-row clip, NaN
drops, OOM splits). The manifest: ``row`` (the row model), ``readers`` (JSONL/CSV/Parquet), ``folders``
(captioned image folders → rows), ``images`` (decoding), ``manifest`` (validation). ``engines`` names the
engines (the workloads live beside this package: ``tasks/identity/``, ``tasks/concepts/``), ``batch`` plans
batches and turns one into a committed shard, ``packed_lora`` trains K LoRAs in one forward, ``export``
writes rows back as loadable files.
"""
