"""Helpers for the Stable Cascade notebooks: offline loading of the official checkpoints, the official
sampler, previews, ControlNet, LoRA, reconstruction — thin over diffusers, transformers and peft.

One module per concept, in layers that import only downward (``tests/test_layers.py`` keeps it so):

0. ``files`` (the registry of model files), ``sizes``, ``values`` (numbers checked at the boundary),
   ``atomic`` (safe writes), ``images``, ``effnet``, ``previewer``, ``upstream`` (every diffusers
   Stable Cascade import)
1. ``checkpoints`` (safetensors headers), ``devices``, ``download``
2. ``models`` (the loaded bundles), ``file_checks`` (a models folder before loading)
3. ``loading``
4. ``conditioning``, ``sampling``, ``request``
5. ``stages`` (the three stages, one function each), ``generation``, ``controlnet/``, ``lora/``
6. ``lora_training/``, ``reconstruction`` (with ``quality``: PSNR, SSIM, compression), ``display``, ``panel``, ``tiny``

Import from the modules (``from cascade_helpers.generation import text_to_image``): importing the
package itself loads nothing heavy.
"""
