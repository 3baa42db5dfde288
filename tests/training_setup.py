"""What the LoRA training tests share besides their fixtures (``tests/conftest.py``): the new token
and the settings of a short run on the tiny models."""

from __future__ import annotations

from cascade_helpers.lora_training.config import LoraTrainingConfig

TOKEN = [("[chelsea]", "^cat</w>")]


def make_config(pictures, output, cache, **changes) -> LoraTrainingConfig:
    """A short run on the tiny models: 3 updates of batch 2, float32, a checkpoint every 2."""
    settings = dict(
        images=str(pictures), output_dir=str(output), cache_dir=str(cache), new_tokens=TOKEN, resolution=256,
        batch_size=2, gradient_accumulation=1, steps=3, precision="fp32", checkpoint_every=2, learning_rate=1e-2,
        gradient_checkpointing=False, image_embed_probability=0.0,
    )  # fmt: skip
    return LoraTrainingConfig(**(settings | changes))
