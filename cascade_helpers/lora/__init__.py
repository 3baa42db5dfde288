"""Stage C LoRA on diffusers' ``StableCascadeUNet`` through peft, in the three file formats people have.

- :mod:`.adapters` — peft LoRA layers: fresh ones to train (``inject_lora``), strength
  (``set_lora_strength``), ``LoraError``;
- :mod:`.tokens` — new words for the text encoder, initialized the official way;
- :mod:`.formats` — the official format, ComfyUI/kohya and ours (the key layouts are documented there);
- :mod:`.load` — ``load_lora``: any of the three formats onto a loaded prior, all or nothing;
  ``load_comfyui_embedding``.

One LoRA per model at a time: load a fresh prior to change it (or set its strength to 0).
"""
