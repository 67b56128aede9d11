"""Fine-tune stage: manifest rows and a base model in; per row, a flattened adapter out.

``manifest`` validates rows, ``base_model`` loads (or builds the tiny) base, ``engine`` trains packed
LoRAs, ``batch`` plans batches and turns one into a committed shard, ``export`` writes a row back as a
diffusers LoRA. ``synthetic`` draws offline demo subjects.
"""
