"""Where the models run and in which precision, and how they share a small GPU.

Three memory modes, as in diffusers:

- ``"gpu"``: every model lives on the GPU. Fastest; needs the most memory.
- ``"model_offload"``: big models (text encoder, UNets, image encoder) wait in CPU RAM and move to
  the GPU when called, sending the previously active one back. Small ones (previewer, EfficientNet,
  Stage A) stay on the GPU. One big model on the GPU at a time (Stage C big: 7.18 GB of bf16 weights,
  plus activations; `weights_on_gpu` below gives the weight figures per mode).
- ``"sequential_offload"``: weights stream to the GPU layer by layer (accelerate's ``cpu_offload``).
  Slowest, smallest footprint.

Precision: Stage C in float16 overflows and produces NaNs (black images); we refuse it unless the
caller insists. bfloat16 where the GPU supports it, float32 otherwise.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from torch import nn

MemoryMode = Literal["gpu", "model_offload", "sequential_offload"]
MEMORY_MODES: tuple[str, ...] = ("gpu", "model_offload", "sequential_offload")

#: every precision word the package accepts (``files.Precision`` values among them) → its dtype
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def check_memory(memory: object) -> MemoryMode:
    """``memory`` if it names a memory mode, else a ValueError listing them: checked before any
    model is read, not after minutes of loading."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}: use one of {', '.join(MEMORY_MODES)}")
    return memory  # type: ignore[return-value]


class UnsupportedPrecisionError(ValueError):
    """A precision the model is known to break in."""


#: what people write for a device type torch calls otherwise
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "apple": "mps", "metal": "mps"}


def available_devices() -> list[str]:
    """The devices torch can compute on here: ``"cpu"``, each CUDA GPU (``"cuda:0"`` ...), ``"mps"``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def _unavailable(device: object, why: str) -> ValueError:
    return ValueError(
        f"device={device!r}: {why}. This machine has: {', '.join(available_devices())} "
        "(device=None picks the best of them)"
    )


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the caller's choice, else CUDA, else Apple MPS, else CPU.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a ``torch.device``, or None. A device
            this machine lacks (``"cuda"`` without a GPU, a CUDA index past the last GPU) or a name
            torch does not know (``"gpu"``) is refused with the list of the devices there are.

    Returns:
        The device, CUDA with its index (``"cuda"`` and ``"cuda:0"`` compare equal).
    """
    if device is None:
        best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        device = torch.device(best)
    elif not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            alias = _DEVICE_ALIASES.get(str(device).split(":")[0].lower())
            hint = f" (did you mean {alias!r}?)" if alias else ""
            raise _unavailable(device, f"torch knows no device of that name{hint}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise _unavailable(str(device), f"CUDA is not available ({why})")
        if device.index is None:  # "cuda" and "cuda:0" must compare equal
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise _unavailable(str(device), f"there is no CUDA GPU number {device.index}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise _unavailable(str(device), "Apple's MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise _unavailable(str(device), f"the package runs on cpu, cuda or mps, not {device.type}")
    return device


def pick_dtype(
    dtype: str | torch.dtype | None,
    device: torch.device,
    *,
    stage: str = "Stage C",
    allow_float16: bool = False,
) -> torch.dtype:
    """Resolve a dtype name, choose a default for the device, and refuse float16 for Stage C.

    Args:
        dtype: a ``torch.dtype``, a name from :data:`DTYPE_NAMES` ("bf16", "float32" ...), or None:
            bfloat16 on a CUDA GPU that supports it, float32 everywhere else (CPU, MPS, older GPUs).
        device: the device the model will compute on (from :func:`pick_device`).
        stage: the model, for the float16 rule: float16 is refused only for "Stage C".
        allow_float16: True lets Stage C run in float16 anyway (to reproduce its black pictures).

    Returns:
        torch.bfloat16, torch.float32 or torch.float16.

    Raises:
        UnsupportedPrecisionError: float16 for Stage C without ``allow_float16``.
        ValueError: an unknown name, or another dtype (float64, int8 ...).
    """
    if dtype is None:
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype]
    if dtype == torch.float16 and stage == "Stage C" and not allow_float16:
        raise UnsupportedPrecisionError(
            "Stage C overflows in float16: activations exceed float16's range and the images come out "
            "black (NaN). Use dtype=torch.bfloat16 (GPUs since Ampere) or torch.float32; pass "
            "allow_float16=True only to reproduce the problem."
        )
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}: use torch.bfloat16 or torch.float32")
    return dtype


class _ModelOffload:
    """Keeps at most one of the registered big models on the GPU: a model moves there when it is
    called and sends the previously active one back to the CPU. One group per process, so the
    prior's and the decoder's models take turns too.

    The move is an accelerate hook (``model._hf_hook``) that names its ``execution_device``, the way
    accelerate's and diffusers' own offloading do: a diffusers pipeline built from these models then
    computes on the GPU although the models wait in CPU RAM between calls."""

    def __init__(self) -> None:
        self._active: weakref.ref[nn.Module] | None = None

    def add(self, model: nn.Module, device: torch.device) -> None:
        from accelerate.hooks import ModelHook, add_hook_to_module

        group = self

        class MoveWhenCalled(ModelHook):
            execution_device = device

            def pre_forward(self, module: nn.Module, *args, **kwargs):
                group._activate(module, device)
                return args, kwargs

        model.to("cpu")
        add_hook_to_module(model, MoveWhenCalled())

    def _activate(self, model: nn.Module, device: torch.device) -> None:
        active = self._active() if self._active is not None else None
        if active is model:
            return
        if active is not None:
            active.to("cpu")
        model.to(device)
        self._active = weakref.ref(model)


_MODEL_OFFLOAD = _ModelOffload()


def place(
    model: nn.Module, device: torch.device, memory: MemoryMode = "gpu", *, small: bool = False
) -> nn.Module:
    """Put ``model`` on ``device`` the way ``memory`` says. ``small`` models always stay on the device.

    The bundles in :mod:`cascade_helpers.loading` remember the execution device: with offloading a
    model's own ``.device`` says "cpu" (or "meta") between calls.

    Args:
        model: the model, moved or hooked in place.
        device: where it computes. On the CPU every mode is plain ``.to(device)``.
        memory: "gpu", "model_offload" or "sequential_offload" (see the module's docstring).
        small: True for the small models (previewer, EfficientNet, Stage A), which stay on ``device``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unknown memory mode.
    """
    check_memory(memory)
    if device.type == "cpu" or memory == "gpu" or small:
        return model.to(device)
    if memory == "model_offload":
        _MODEL_OFFLOAD.add(model, device)
        return model
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=device)
    return model


# --- how much the weights take on the GPU ------------------------------------------------------------


def weights_on_gpu(
    stage_c: str, stage_b: str, precision: str, memory: MemoryMode, *, image_encoder: bool = True
) -> int:
    """Bytes of model weights on the GPU at the busiest moment of a generation, from the published
    file sizes in :mod:`cascade_helpers.files`. Weights only: activations, the CUDA context and the
    allocator's cache come on top and are not included.

    ``"gpu"``: every model. ``"model_offload"``: the biggest of the models that take turns (text
    encoder, image encoder, Stage C, Stage B) plus the small ones that stay (Stage A, EfficientNet,
    previewer). ``"sequential_offload"``: the small ones; the others stream through one layer at a time.

    Args:
        stage_c, stage_b: the stages' sizes, "big" or "lite".
        precision: "bf16" or "fp32" (the files' precision, for every big model alike).
        memory: the memory mode.
        image_encoder: False leaves out the CLIP image encoder (``load_prior(image_encoder=False)``).

    Returns:
        Bytes, from the published sizes (decimal units: divide by 1e9 for GB).
    """
    from . import files

    check_memory(memory)
    stage_c, stage_b = files.check_size_word(stage_c, "stage_c"), files.check_size_word(stage_b, "stage_b")
    precision = files.check_precision(precision)
    big = [
        files.STAGE_C[stage_c][precision],
        files.STAGE_B[stage_b][precision],
        files.TEXT_ENCODER[precision],
    ]
    big += [files.IMAGE_ENCODER[precision]] if image_encoder else []
    small = sum(f.size for f in (files.STAGE_A, files.EFFNET, files.PREVIEWER))
    if memory == "gpu":
        return small + sum(f.size for f in big)
    if memory == "model_offload":
        return small + max(f.size for f in big)
    return small
