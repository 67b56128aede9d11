"""Weight-diffusion stage: committed rows in; a block-wise, text-conditioned weight generator out.

``blocks`` cuts flat rows into equal blocks, ``denoiser`` is the network and its noise schedule,
``generator`` trains it on a dataset and samples new rows (LoRAs) from a prompt.
"""
