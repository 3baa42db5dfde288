"""Helpers for the Stable Cascade notebooks: offline loading of the official checkpoints, the official
sampler, previews, ControlNet, LoRA, reconstruction — thin over diffusers, transformers and peft.

One module per concept, in layers that import only downward: ``tests/test_layers.py`` lists the layers
and keeps it so (README's module map describes them). Import from the modules
(``from cascade_helpers.generation import text_to_image``): importing the package itself loads nothing heavy.
"""
