"""Stage C LoRA on diffusers' ``StableCascadeUNet`` through peft, in the three file formats people have.

- :mod:`.adapters` — peft LoRA layers: fresh ones to train (:func:`inject_lora`), given factors put on
  (:func:`apply_factors`), read back (:func:`lora_factors`), scaled (:func:`set_lora_strength`);
- :mod:`.tokens` — new words for the text encoder, initialized the official way;
- :mod:`.formats` — the official format, ComfyUI/kohya and ours, to and from per-module factors
  (the key layouts are documented there);
- :mod:`.load` — :func:`load_lora`: any of the three formats onto a loaded prior.

One LoRA per model at a time: load a fresh prior to change it (or set its strength to 0).
"""

from .adapters import (
    ADAPTER,
    ATTENTION_TARGETS,
    LoraError,
    LoraFactors,
    apply_factors,
    check_factors,
    inject_lora,
    lora_factors,
    lora_layers,
    refuse_second_lora,
    remove_lora,
    set_lora_strength,
)
from .formats import (
    COMFYUI_PREFIX,
    FORMAT_TAG,
    KOHYA_PREFIX,
    TEXT_ENCODER_PREFIXES,
    UNET_PREFIXES,
    comfyui_factors,
    comfyui_module_name,
    comfyui_state_dict,
    detect_format,
    lora_state_dict,
    official_factors,
    official_lora_layout,
    save_comfyui,
    save_lora,
)
from .load import (
    LoadedLora,
    all_or_nothing,
    load_comfyui_embedding,
    load_lora,
    load_official_lora,
    read_lora_file,
)
from .tokens import (
    NewToken,
    NewTokenEmbedding,
    add_tokens,
    append_token_rows,
    check_added_tokens,
    check_new_token_entries,
    check_new_tokens,
    initial_token_rows,
    install_new_tokens,
    token_embedding,
)

__all__ = [
    "ADAPTER",
    "ATTENTION_TARGETS",
    "COMFYUI_PREFIX",
    "FORMAT_TAG",
    "KOHYA_PREFIX",
    "TEXT_ENCODER_PREFIXES",
    "UNET_PREFIXES",
    "LoadedLora",
    "LoraError",
    "LoraFactors",
    "NewToken",
    "NewTokenEmbedding",
    "add_tokens",
    "all_or_nothing",
    "append_token_rows",
    "apply_factors",
    "check_added_tokens",
    "check_factors",
    "check_new_token_entries",
    "check_new_tokens",
    "comfyui_factors",
    "comfyui_module_name",
    "comfyui_state_dict",
    "detect_format",
    "initial_token_rows",
    "inject_lora",
    "install_new_tokens",
    "load_comfyui_embedding",
    "load_lora",
    "load_official_lora",
    "lora_factors",
    "lora_layers",
    "lora_state_dict",
    "official_factors",
    "official_lora_layout",
    "read_lora_file",
    "refuse_second_lora",
    "remove_lora",
    "save_comfyui",
    "save_lora",
    "set_lora_strength",
    "token_embedding",
]
