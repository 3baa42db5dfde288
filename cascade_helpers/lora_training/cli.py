"""The command line: ``accelerate launch -m cascade_helpers.lora_training --config run.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import LoraTrainingConfig
from .trainer import LoraTrainer


def main(argv: list[str] | None = None) -> None:
    """``accelerate launch -m cascade_helpers.lora_training --config run.json``: the same training
    on every GPU accelerate starts, each with its share of the batches."""
    from accelerate import Accelerator

    from .. import lora_training
    from ..loading import load_decoder, load_prior

    parser = argparse.ArgumentParser(
        description=lora_training.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="a LoraTrainingConfig saved as JSON")
    parser.add_argument(
        "--no-decoder", action="store_true", help="validate with the previewer (no Stage B in memory)"
    )
    args = parser.parse_args(argv)
    config = LoraTrainingConfig.load(args.config)
    accelerator = Accelerator()
    device = accelerator.device
    prior = load_prior(
        config.models_dir,
        config.stage_c,
        dtype=config.dtype,
        device=device,
        image_encoder=config.image_embed_probability > 0,
    )
    decoder = None
    if config.validation_prompts and not args.no_decoder and accelerator.is_main_process:
        decoder = load_decoder(
            config.models_dir, config.stage_b, dtype=config.dtype, device=device, memory="model_offload"
        )
    trainer = LoraTrainer(prior, config, decoder, accelerator)
    result = trainer.train()
    if accelerator.is_main_process:
        print(
            f"step {result.step}: LoRA in {result.lora or 'not yet (interrupted)'}, checkpoint {result.checkpoint}"
        )
