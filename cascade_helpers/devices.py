"""Where the models run and in which precision, and how they share a small GPU.

Memory modes, each a library's hooks (:mod:`cascade_helpers.memory` plans which model gets which):

- ``"gpu"``: the model lives on the GPU. Fastest; needs the most memory.
- ``"model_offload"``: the model waits in CPU RAM and moves to the GPU when called, sending the big
  model that ran before it back: one big model on the GPU at a time.
- ``"group_offload"``: diffusers' group offloading: the UNets' blocks (the CLIP encoders' layers) move
  from CPU RAM to the GPU as they run, the next over a CUDA stream: much faster than sequential.
- ``"disk_offload"``: the same, the weights waiting on disk instead (little RAM: Colab's 12.7 GB).
- ``"sequential_offload"``: weights stream to the GPU layer by layer (accelerate's ``cpu_offload``).
- ``"auto"``: :func:`cascade_helpers.memory.plan_memory` chooses for each model.

Small models (previewer, EfficientNet, Stage A) always stay on the device. Precision: bfloat16 on GPUs
that have it natively (Ampere and newer); float16 on older ones (Colab's T4; Stage C through the rescale
of :mod:`cascade_helpers.float16`); float32 on CPUs and Apple GPUs.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Literal, get_args

import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload, add_hook_to_module
from torch import nn

MemoryMode = Literal["gpu", "model_offload", "group_offload", "disk_offload", "sequential_offload", "auto"]
_MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)

#: every precision word the package accepts (``files._Precision`` values among them) → its dtype
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class UnsupportedPrecisionError(ValueError):
    """A precision this model cannot compute in (float16 for a Stage C the rescale cannot help)."""


def _check_memory(memory: object) -> MemoryMode:
    """Checked before any model is read, not after minutes of loading."""
    if memory not in _MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}: use one of {', '.join(_MEMORY_MODES)}")
    return memory  # type: ignore[return-value]


def _available_devices() -> list[str]:
    """What this machine computes on, for messages: ``cpu``, each GPU (``cuda:0`` ...), ``mps``."""
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [kind] if kind == "mps" else [f"{kind}:{i}" for i in range(backend.device_count())]
    return found


def _why_missing(device: torch.device) -> str | None:
    """Why this machine cannot compute on ``device`` (None: it can)."""
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    if backend is None or not hasattr(backend, "is_available"):
        return f"the package computes on cpu, cuda, mps or xpu, not {device.type}"
    if not backend.is_available():
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            return "this torch was built without CUDA"
        return f"no {device.type} device is available"
    if device.index is not None and device.index >= backend.device_count():
        return f"there is no {device.type} device number {device.index}"
    return None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the caller's choice, else CUDA, else Apple MPS, else CPU.

    Args:
        device: anything ``torch.device`` accepts (``"cpu"``, ``"cuda:1"``, ``"mps"``), or None / ``"auto"``:
            the best there is. One this machine lacks is refused with the list of those there are.

    Returns:
        The device, CUDA with its index (``"cuda"`` and ``"cuda:0"`` compare equal).
    """
    if device is None or device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved, why = None, "torch knows no device of that name"
    else:
        why = _why_missing(resolved)
    if why:
        raise ValueError(
            f"device={str(device)!r}: {why}. This machine has: {', '.join(_available_devices())} "
            "(device=None picks the best of them)"
        )
    if resolved.type == "cuda" and resolved.index is None:  # "cuda" and "cuda:0" must compare equal
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _default_dtype(*, gpu: bool, native_bfloat16: bool) -> torch.dtype:
    """The one precision rule (the memory planner applies it to machines it is told of)."""
    if not gpu:
        return torch.float32
    return torch.bfloat16 if native_bfloat16 else torch.float16


def _native_bfloat16(device: torch.device) -> bool:
    """bfloat16 in hardware (CUDA capability ≥ 8.0); torch's default check also counts emulation."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Resolve a dtype name, or choose the default for the device.

    Args:
        dtype: a ``torch.dtype``, a name ("bf16", "bfloat16", "fp32", "float32", "fp16", "float16"), or
            None: the device's default (the module docstring's rule).
        device: the device the model will compute on (from :func:`pick_device`).

    Returns:
        torch.bfloat16, torch.float32 or torch.float16.

    Raises:
        ValueError: an unknown name, or another dtype (float64, int8 ...).
    """
    if dtype is None:
        return _default_dtype(gpu=device.type == "cuda", native_bfloat16=_native_bfloat16(device))
    if isinstance(dtype, str) and dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPE_NAMES)}")
    dtype = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}: use torch.bfloat16, torch.float16 or torch.float32")
    return dtype


class _OneBigModelOnTheGpu(CpuOffload):
    """accelerate's hook offloads one fixed model; ours whichever ran last, so models called in any order."""

    last: weakref.ref[nn.Module] | None = None  # one group per process: the prior's and decoder's models

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        last = _OneBigModelOnTheGpu.last() if _OneBigModelOnTheGpu.last is not None else None
        if last is not None and last is not module:
            last.to("cpu")
        _OneBigModelOnTheGpu.last = weakref.ref(module)
        return super().pre_forward(module, *args, **kwargs)


def _group_offload(model: nn.Module, device: torch.device, *, to_disk: bool) -> None:
    """UNets go block by block (a whole level, diffusers' default, is 40 % of Stage C); ``low_cpu_mem_usage``
    pins as groups move, so RAM holds one copy. On disk a folder each: diffusers reuses files it finds."""
    from diffusers.hooks import apply_group_offloading

    from .upstream import StableCascadeUNet

    blocks = isinstance(model, StableCascadeUNet)
    folder = tempfile.mkdtemp(prefix="cascade-offload-") if to_disk else None
    if folder:
        weakref.finalize(model, shutil.rmtree, folder, True)
    apply_group_offloading(
        model,
        onload_device=device,
        offload_type="block_level" if blocks else "leaf_level",
        num_blocks_per_group=1 if blocks else None,
        block_modules=["down_blocks", "up_blocks"] if blocks else None,
        use_stream=device.type == "cuda",
        low_cpu_mem_usage=True,
        offload_to_disk_path=folder,
    )


def _place(model: nn.Module, device: torch.device, memory: str = "gpu") -> nn.Module:
    """On the CPU every mode is plain ``.to(device)``: there is nothing to offload to."""
    _check_memory(memory)
    if device.type == "cpu" or memory == "gpu":
        return model.to(device)
    if memory == "model_offload":
        add_hook_to_module(model, _OneBigModelOnTheGpu(execution_device=device))
    elif memory in ("group_offload", "disk_offload"):
        _group_offload(model, device, to_disk=memory == "disk_offload")
    else:
        cpu_offload(model, execution_device=device)
    return model
