"""Stage C LoRA on diffusers' ``StableCascadeUNet`` through peft, in the three file formats people have:
:mod:`.adapters` (peft layers, strength), :mod:`.tokens` (new words), :mod:`.formats` (official,
ComfyUI/kohya, ours), :mod:`.load` (``load_lora``, ``load_comfyui_embedding``: all or nothing)."""
