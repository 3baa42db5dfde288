"""Every import from diffusers' Stable Cascade code, in one place.

diffusers marked the Stable Cascade pipelines deprecated (no fixes after 0.35.2) and moved Stage A
(``PaellaVQModel``) under ``diffusers.pipelines.deprecated``. When a release moves or drops one of
these names, this module is the only one to change, and ``tests/test_upstream.py`` says which name
went missing instead of the notebooks failing somewhere in the middle.

We use only the models and the scheduler: the pipelines are imported so that the test notices when
they disappear (the notebooks, the tests and ``benchmarks/cascade.py`` compare against them, and users
may still reach for them).
"""

from __future__ import annotations

import importlib

#: name -> module it is imported from, for every diffusers object this project relies on.
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
    """The class from where diffusers keeps it, or an ImportError saying what to do when it moved."""
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
