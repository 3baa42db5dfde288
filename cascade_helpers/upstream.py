"""Every import from diffusers' Stable Cascade code, in one place.

diffusers marked the Stable Cascade pipelines deprecated (no fixes after 0.35.2) and moved Stage A
(``PaellaVQModel``) under ``diffusers.pipelines.deprecated``. When a release moves or drops one of these
names, only this module changes, and ``tests/test_upstream.py`` names what went missing.
"""

from __future__ import annotations

import importlib

_UPSTREAM_LOCATIONS: dict[str, str] = {
    "StableCascadeUNet": "diffusers.models.unets.unet_stable_cascade",
    "SDCascadeResBlock": "diffusers.models.unets.unet_stable_cascade",
    "SDCascadeAttnBlock": "diffusers.models.unets.unet_stable_cascade",
    "SDCascadeTimestepBlock": "diffusers.models.unets.unet_stable_cascade",
    "PaellaVQModel": "diffusers.pipelines.deprecated.wuerstchen",
    "DDPMWuerstchenScheduler": "diffusers.schedulers.scheduling_ddpm_wuerstchen",
    "StableCascadePriorPipeline": "diffusers.pipelines.stable_cascade",
    "StableCascadeDecoderPipeline": "diffusers.pipelines.stable_cascade",
    "StableCascadeCombinedPipeline": "diffusers.pipelines.stable_cascade",
}


def _load(name: str):
    """A moved class fails at import with what to do, not somewhere in a notebook."""
    module_name = _UPSTREAM_LOCATIONS[name]
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        import diffusers

        raise ImportError(
            f"diffusers {diffusers.__version__} has no `{name}` in `{module_name}`. "
            "Stable Cascade is deprecated upstream and this release moved or removed it. "
            "Install a tested diffusers release (see the range in pyproject.toml), "
            "or update cascade_helpers/upstream.py to the new location."
        ) from error


StableCascadeUNet = _load("StableCascadeUNet")
_SDCascadeResBlock = _load("SDCascadeResBlock")
_SDCascadeAttnBlock = _load("SDCascadeAttnBlock")
_SDCascadeTimestepBlock = _load("SDCascadeTimestepBlock")
PaellaVQModel = _load("PaellaVQModel")
DDPMWuerstchenScheduler = _load("DDPMWuerstchenScheduler")
StableCascadePriorPipeline = _load("StableCascadePriorPipeline")
StableCascadeDecoderPipeline = _load("StableCascadeDecoderPipeline")
StableCascadeCombinedPipeline = _load("StableCascadeCombinedPipeline")
