"""Stage C ControlNet, the official checkpoints on diffusers' UNet: :mod:`.model` (the module and
``inject_controlnet``), :mod:`.kinds` (``CONTROLNET_TYPES``, ``load_controlnet``), :mod:`.filters`
(``control_input``, ``control_features``), :mod:`.preprocessors` (controlnet_aux's detectors)."""
