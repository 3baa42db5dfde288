"""``python -m cascade_helpers.lora_training`` / ``accelerate launch -m cascade_helpers.lora_training``."""

from .cli import main

raise SystemExit(main())
