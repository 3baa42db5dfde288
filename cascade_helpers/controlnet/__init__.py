"""Stage C ControlNet: the official checkpoints (canny, inpainting, super-resolution) on diffusers' UNet.

- :mod:`.model` — the official ControlNet module (the released files load strictly) and
  ``inject_controlnet``, which adds its outputs to a diffusers ``StableCascadeUNet``;
- :mod:`.kinds` — ``CONTROLNET_TYPES``, the official configs in one place, and ``load_controlnet``;
- :mod:`.filters` — what each ControlNet sees (``control_input``: the official filters), the
  outpainting canvas, and ``control_features``, which runs the ControlNet once per generation;
- :mod:`.preprocessors` — controlnet_aux's weight-free line detectors as control pictures
  (``aux_control_input``) and ``edge_agreement``.
"""
