"""Stage C ControlNet: the official checkpoints (canny, inpainting, super-resolution) on diffusers' UNet.

diffusers has no ControlNet for Stable Cascade; the official code has a small one. It encodes a control
picture with a "bottleneck" (EfficientNetV2-S features; two convolutions; or, for the super-resolution
model, 1×1 convolutions around eight residual blocks of 3×3 convolutions), then one projection per
chosen Stage C ResBlock; each projection is added to the input of its ResBlock, resized bilinearly to
the block's resolution. The ResBlocks are numbered in the order a forward pass runs them, down path
then up path: the big Stage C has 64, and the released ControlNets feed blocks 0, 4, 8, 12, 51, 55,
59 and 63.

- :mod:`.model` — :class:`ControlNet` with the official parameter names and shapes (the released files
  load strictly), and :func:`inject_controlnet`, which adds its outputs to a diffusers
  ``StableCascadeUNet`` with forward pre-hooks, giving the official Stage C's output;
- :mod:`.kinds` — :data:`CONTROLNET_TYPES`, the official configs (checkpoint, filter, blocks) in one
  place, and :func:`load_controlnet`, which checks a file before loading it;
- :mod:`.filters` — what each ControlNet sees (the official ``CannyFilter``, ``InpaintFilter`` and
  ``SREffnetFilter``), the mask helpers, and :func:`control_features`, which runs the ControlNet once
  per generation, as the official notebook does;
- :mod:`.preprocessors` — controlnet_aux's weight-free line detectors as control pictures for the canny
  ControlNet (:func:`aux_control_input`), and :func:`edge_agreement` to measure how far their edges are
  from the official filter's (controlnet_aux is imported only when they are used).
"""

from .filters import (
    Box,
    ControlInput,
    border_mask,
    canny_edges,
    control_features,
    control_input,
    control_size,
    ellipse_mask,
    inpaint_control,
    mask_tensor,
    outpainting_canvas,
    rectangle_mask,
    super_resolution_control,
)
from .kinds import (
    CONTROLNET_TYPES,
    TINY_BLOCKS,
    ControlNetNotReleasedError,
    ControlNetShape,
    ControlNetType,
    Filter,
    controlnet_shape,
    controlnet_type,
    load_controlnet,
)
from .model import (
    OFFICIAL_BLOCKS,
    BottleneckMode,
    CNetResBlock,
    ControlNet,
    ControlOutputs,
    LargeBottleneck,
    controlled_denoiser,
    inject_controlnet,
    resblock_order,
)
from .preprocessors import (
    WEIGHT_FREE,
    DetectorWeightsNeededError,
    EdgeAgreement,
    aux_control_input,
    aux_detector,
    edge_agreement,
)

__all__ = [
    "CONTROLNET_TYPES",
    "OFFICIAL_BLOCKS",
    "TINY_BLOCKS",
    "WEIGHT_FREE",
    "BottleneckMode",
    "Box",
    "CNetResBlock",
    "ControlInput",
    "ControlNet",
    "ControlNetNotReleasedError",
    "ControlNetShape",
    "ControlNetType",
    "ControlOutputs",
    "DetectorWeightsNeededError",
    "EdgeAgreement",
    "Filter",
    "LargeBottleneck",
    "aux_control_input",
    "aux_detector",
    "border_mask",
    "canny_edges",
    "control_features",
    "control_input",
    "control_size",
    "controlled_denoiser",
    "controlnet_shape",
    "controlnet_type",
    "edge_agreement",
    "ellipse_mask",
    "inject_controlnet",
    "inpaint_control",
    "load_controlnet",
    "mask_tensor",
    "outpainting_canvas",
    "rectangle_mask",
    "resblock_order",
    "super_resolution_control",
]
