"""The concept workload (denoised-weights / E2GAN setting): image-editing concepts on a small image-to-image base.

``edits``/``spec``: edit families and one concept's spec; ``sources``: offline source images; ``zoo``:
concept manifests and the held-out split; ``base``: the ``SkipUNetGenerator`` base, pretrained offline;
``lora``/``engine``/``finetune``: the packed ``edit-lora`` engine (its pack trainer and batch, run by
the shared driver of ``tasks/finetune/driver.py``); ``rows``: its manifest rules; ``pairs``: a concept's image pairs and
PSNR; ``loading``: rows back into a working model; ``condition``: the structured condition of the
weight generator. docs/CONCEPTS.md explains the workload.
"""
