"""The command line: ``accelerate launch -m cascade_helpers.lora_training --config run.json``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import LoraTrainingConfig, TrainingError, _read_settings
from .trainer import LoraTrainer, _make_accelerator

#: the exit status of a run stopped by Ctrl-C (after saving a checkpoint), as shells report SIGINT
_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """The same training on every GPU accelerate starts (``argv`` default: the command line's), each with its
    share of the batches. Exit status 0 when complete, 130 when Ctrl-C stopped it (a checkpoint is saved: run
    the same command to continue), 1 when the settings or data are refused (``error: ...`` on stderr), 2 for
    a config file that cannot be read or is not JSON (argparse's usage error)."""
    from .. import lora_training

    parser = argparse.ArgumentParser(
        description=lora_training.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="a LoraTrainingConfig saved as JSON")
    parser.add_argument("--no-decoder", action="store_true", help="validate with the previewer (no Stage B)")
    args = parser.parse_args(argv)
    try:
        settings = _read_settings(args.config)
    except TrainingError as error:
        parser.error(str(error))
    try:
        config = LoraTrainingConfig.from_settings(settings, str(args.config))
        accelerator = _make_accelerator(config)
        result = LoraTrainer(*_models(config, accelerator, args.no_decoder), accelerator).train()
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if accelerator.is_main_process:
        lora = result.lora or "not yet (interrupted)"
        print(f"step {result.step}: LoRA in {lora}, checkpoint {result.checkpoint}")
    return _INTERRUPTED if result.interrupted else 0


def _models(config: LoraTrainingConfig, accelerator, no_decoder: bool) -> tuple:
    """Why: the command line loads what the settings name (a notebook passes loaded models)."""
    from ..loading import load_decoder, load_prior

    dtype = config.dtype or ("fp32" if config.precision == "fp32" else "bf16")
    on = {"dtype": dtype, "device": accelerator.device}
    prior = load_prior(
        config.models_dir, config.stage_c, image_encoder=config.image_embed_probability > 0, **on
    )
    decoder = None
    if config.validation_prompts and not no_decoder and accelerator.is_main_process:
        decoder = load_decoder(config.models_dir, config.stage_b, memory="model_offload", **on)
    return prior, config, decoder
