"""Stage C ControlNet on diffusers' UNet: :mod:`.model` (the module, ``inject_controlnet``), :mod:`.kinds`
(``load_controlnet``), :mod:`.filters` (``control_input``, ``control_features``), :mod:`.preprocessors`."""
