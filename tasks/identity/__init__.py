"""The identity workload (weightzoo's ``diffusers-lora`` engine): one DreamBooth-style LoRA per identity on a
diffusers text-to-image base of any supported family (SD 1.x/2.x, SDXL, SD3, Flux).

``families`` tells the family from ``model_index.json`` and ``denoise`` holds each family's objective
(conditioning, timestep draw, loss); ``config`` (``FinetuneConfig``), ``base_model`` (loads a base, builds the
tiny SD one), ``tiny_bases`` (tiny bases of every family), ``engine`` (inputs and the pack trainer),
``recipes/`` (the methods), ``class_images`` (shared prior-preservation latents), ``perfusion_loader``,
``synthetic`` (offline demo subjects), ``workload`` (the engine's base check, toy base and demo rows) and
``tokenizers`` (offline tokenizers).
"""
