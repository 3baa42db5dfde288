"""How the cascade fits this machine: for each model where it lives, in which dtype, and what it takes on
the GPU and in RAM (:func:`plan_memory`; ``memory="auto"`` loads by it).

Weights count at their published file sizes; group offloading's share on the GPU is computed from the
shipped configs. Activations and libraries come on top as fixed allowances (``_WORKSPACE``,
``_RAM_RESERVE``): estimates, not measurements. A plan gives each model the fastest mode that leaves
the whole cascade room.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache

import psutil
import torch

from . import files
from .checkpoints import config_dir
from .devices import MemoryMode, _check_memory, _default_dtype, _native_bfloat16
from .files import Size

_GB = files._GB
#: GPU memory kept for activations (Stage B at 1024², batch 4, needs the most) and caches: an allowance
_WORKSPACE = 3 * _GB
#: RAM for Python, torch and the notebook besides the weights: an allowance
_RAM_RESERVE = 2 * _GB
#: the share of a disk-offloaded UNet still in RAM (diffusers leaves a placeholder per weight): measured,
#: big Stage C on the CPU, 3.7 of 8.0 GB (``python benchmarks/cascade.py --ram``)
_DISK_HELD = 0.5
#: every model, in the order the loaders read them (the prior's optional parts on first use)
_MODELS = ("Stage C", "text encoder", "Stage B", "Stage A", "image encoder", "EfficientNet", "previewer")
_UNETS = {"Stage C": "stage_c", "Stage B": "stage_b"}
_SMALL = {"Stage A": "stage_a", "EfficientNet": "effnet", "previewer": "previewer"}  # float32, on the GPU
#: what each mode costs per byte, relative (a plan minimizes the sum): model offload moves a model once
#: per call, group offload every step (overlapped with compute), disk offload reads it every step
_SLOWNESS = {
    "gpu": 0,
    "cpu": 0,
    "model_offload": 1,
    "group_offload": 3,
    "sequential_offload": 6,
    "disk_offload": 10,
}


@dataclass(frozen=True)
class Machine:
    """A machine as the planner sees it, in bytes (``gpu=None``: no GPU); describe another to plan for it."""

    gpu: str | None
    gpu_free: int = 0
    native_bfloat16: bool = False
    ram: int = 0
    disk: int = 0

    def __str__(self) -> str:
        bf16 = "native bfloat16" if self.native_bfloat16 else "no native bfloat16"
        gpu = f"{self.gpu} ({self.gpu_free / _GB:.1f} GB free, {bf16})" if self.gpu else "no CUDA GPU"
        return f"{gpu}, RAM {self.ram / _GB:.1f} GB available, disk {self.disk / _GB:.0f} GB free"


def describe_machine(device: str | torch.device | None = None) -> Machine:
    """This machine's GPU, RAM, and the free disk of the temporary folder (where disk offload writes).

    Args:
        device: the CUDA GPU to describe (default: the current one, if any); a CPU: ``gpu=None``.

    Returns:
        A :class:`Machine`; GPU memory this process's torch holds counts as free (the cascade plans its own).
    """
    ram, disk = psutil.virtual_memory().available, shutil.disk_usage(tempfile.gettempdir()).free
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return Machine(None, ram=ram, disk=disk)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    return Machine(torch.cuda.get_device_name(device), free, _native_bfloat16(device), ram, disk)


@dataclass(frozen=True)
class _Row:
    """One model of a plan; ``gpu``: bytes there while it computes, ``ram``: while it waits."""

    model: str
    mode: str
    dtype: torch.dtype
    size: int
    gpu: int
    ram: int


@dataclass(frozen=True)
class MemoryPlan:
    """Each model's place and dtype (:attr:`rows`), and the bytes needed at the busiest moment; print it."""

    stage_c: Size
    stage_b: Size
    machine: Machine
    rows: tuple[_Row, ...]
    gpu: int
    ram: int
    disk: int

    @property
    def variant(self) -> str:
        return files._variant_word(self.stage_b, self.stage_c)

    def fits(self) -> bool:
        m = self.machine
        return (not m.gpu or self.gpu <= m.gpu_free) and self.ram <= m.ram and self.disk <= m.disk

    def _row(self, model: str) -> _Row:
        """The plan of one model: what a loader places it by."""
        return next(row for row in self.rows if row.model == model)

    def __str__(self) -> str:
        gb = lambda n: f"{n / _GB:.2f}"  # noqa: E731
        rows = [
            f"| {r.model} | {r.mode} | {str(r.dtype)[6:]} | {gb(r.gpu)} | {gb(r.ram)} |" for r in self.rows
        ]
        disk = f"; {gb(self.disk)} GB on disk" if self.disk else ""
        lines = [
            f"Memory plan: {self.stage_c} Stage C, {self.stage_b} Stage B ({self.variant}) on {self.machine}",
            "| model | where | dtype | GB on the GPU | GB in RAM |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            f"| busiest moment | | | {gb(self.gpu)} | {gb(self.ram)} |",
            f"GPU with {gb(_WORKSPACE)} GB for activations{disk}; estimates, not measured",
        ]
        return "\n".join(lines)


@cache
def _streamed_share(kind: str, size: Size) -> float:
    """Group offloading holds two blocks (one computing, one arriving) and what is outside the blocks."""
    from accelerate import init_empty_weights

    from .upstream import StableCascadeUNet

    with init_empty_weights():
        unet = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir(kind, size)))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    blocks = [block for level in (*unet.down_blocks, *unet.up_blocks) for block in level]
    groups = [count(group) for group in (*blocks, *unet.down_downscalers, *unet.up_upscalers)]
    return (2 * max(groups) + count(unet) - sum(groups)) / count(unet)


def _row(model: str, mode: str, dtype: torch.dtype, stage_c: Size, stage_b: Size) -> _Row:
    """What one model takes in one mode: all of it where it waits, a share where it streams from."""
    if model in _SMALL:
        size, dtype = files._FILES[_SMALL[model]].size, torch.float32  # as published and loaded
    else:
        unets = {"Stage C": files.STAGE_C[stage_c], "Stage B": files.STAGE_B[stage_b]}
        by_precision = unets[model] if model in unets else files._WEIGHTS[model.replace(" ", "_")]
        size = by_precision["fp32" if dtype == torch.float32 else "bf16"].size
    gpu = size if mode in ("gpu", "model_offload") else 0
    ram = 0 if mode == "gpu" else int(size * _DISK_HELD) if mode == "disk_offload" else size
    if mode in ("group_offload", "disk_offload"):
        gpu = int(size * _streamed_share(_UNETS[model], stage_c if model == "Stage C" else stage_b))
    return _Row(model, mode, dtype, size, gpu, ram)


def _needs(rows: tuple[_Row, ...], machine: Machine) -> tuple[int, int, int]:
    """Busiest-moment bytes; RAM peaks in load order, as every model passes through it to the GPU."""
    resident = sum(r.gpu for r in rows if r.mode == "gpu")
    visiting = max((r.gpu for r in rows if r.mode != "gpu"), default=0)
    waiting = peak = 0
    for r in rows:
        peak = max(peak, waiting + r.size)
        waiting += r.ram
    gpu = resident + visiting + _WORKSPACE if machine.gpu else 0
    return gpu, max(peak, waiting) + _RAM_RESERVE, sum(r.size for r in rows if r.mode == "disk_offload")


def _modes(model: str, memory: str, gpu: bool) -> tuple[str, ...]:
    """Only the UNets stream blocks; the CLIP encoders (at most 1.4 GB) take turns on the GPU instead."""
    if not gpu:
        return ("cpu",)
    if model in _SMALL:
        return ("gpu",)
    if memory == "auto":
        return ("gpu", "model_offload", "group_offload", "disk_offload")[: 4 if model in _UNETS else 2]
    streamed = memory in ("group_offload", "disk_offload") and model not in _UNETS
    return ("model_offload",) if streamed else (memory,)


def _dtype_choices(machine: Machine, dtype: torch.dtype | None) -> list[tuple[torch.dtype, torch.dtype]]:
    """(prior, decoder) dtypes to try: a CPU short of RAM may halve either with bfloat16."""
    if dtype is not None:
        return [(dtype, dtype)]
    default = _default_dtype(gpu=bool(machine.gpu), native_bfloat16=machine.native_bfloat16)
    if machine.gpu:
        return [(default, default)]
    return list(itertools.product((default, torch.bfloat16), repeat=2))


def _plans(stage_c: Size, stage_b: Size, machine: Machine, dtype, memory: str, image_encoder: bool):
    """Every plan the choices allow, the fastest choices first."""
    models = [m for m in _MODELS if image_encoder or m != "image encoder"]
    for prior, decoder in _dtype_choices(machine, dtype):
        for modes in itertools.product(*(_modes(m, memory, bool(machine.gpu)) for m in models)):
            rows = tuple(
                _row(m, mode, decoder if m == "Stage B" else prior, stage_c, stage_b)
                for m, mode in zip(models, modes, strict=True)
            )
            yield MemoryPlan(stage_c, stage_b, machine, rows, *_needs(rows, machine))


def _cost(plan: MemoryPlan) -> float:
    """Plans are ranked by bytes moved per mode, plus bfloat16 on a CPU (slower there)."""
    cpu_bf16 = sum(r.size for r in plan.rows if plan.machine.gpu is None and r.dtype == torch.bfloat16)
    return sum(_SLOWNESS[r.mode] * r.size for r in plan.rows) + cpu_bf16


def _shortfall(plan: MemoryPlan) -> float:
    """The error names the plan nearest to fitting: the largest of its needs over what there is."""
    m = plan.machine
    return max(plan.gpu / max(m.gpu_free, 1), plan.ram / max(m.ram, 1), plan.disk / max(m.disk, 1))


def plan_memory(
    stage_c: Size = "big",
    stage_b: Size = "big",
    *,
    machine: Machine | None = None,
    dtype: torch.dtype | None = None,
    memory: MemoryMode = "auto",
    image_encoder: bool = True,
) -> MemoryPlan:
    """The fastest plan that fits: for each model where it lives and in which dtype.

    Args:
        stage_c, stage_b: the sizes, "big" or "lite".
        machine: what to plan for (default: :func:`describe_machine`, this machine).
        dtype: one dtype for every big model (default: ``pick_dtype``'s; a CPU short of RAM: bfloat16).
        memory: "auto" chooses a mode per model; another mode gives that mode's figures, fit or not.
        image_encoder: False leaves out the CLIP image encoder (``load_prior(image_encoder=False)``).

    Returns:
        The :class:`MemoryPlan`; ``print`` it for the table.

    Raises:
        MemoryError: with ``memory="auto"``, nothing fits (the message names the smallest plan).
    """
    stage_c, stage_b = files._check_size(stage_c, "stage_c"), files._check_size(stage_b, "stage_b")
    memory, machine = _check_memory(memory), machine or describe_machine()
    plans = list(_plans(stage_c, stage_b, machine, dtype, memory, image_encoder))
    fitting = [plan for plan in plans if plan.fits()]
    if memory != "auto" or fitting:
        return min(fitting, key=_cost) if memory == "auto" else plans[0]
    smallest = min(plans, key=_shortfall)
    disk = f" and {smallest.disk / _GB:.1f} GB of disk" if smallest.disk else ""
    gpu = f"{smallest.gpu / _GB:.1f} GB on the GPU, " if machine.gpu else ""
    raise MemoryError(
        f"{stage_c} Stage C with {stage_b} Stage B does not fit {machine}: the smallest plan needs {gpu}"
        f"{smallest.ram / _GB:.1f} GB of RAM{disk}:\n{smallest}\nChoose smaller sizes "
        "(choose_variant() picks ones that fit), free memory that other programs hold, or use another device."
    )


def choose_variant(
    machine: Machine | None = None, *, dtype: torch.dtype | None = None, image_encoder: bool = True
) -> MemoryPlan:
    """The largest sizes whose plan fits, Stage C first (it makes the picture; Stage B adds detail):
    big-big, small-big (lite Stage B), big-small, small-small; without disk offload where any fits so.

    Args:
        machine: what to plan for (default: this machine).
        dtype, image_encoder: as for :func:`plan_memory`.

    Returns:
        The chosen :class:`MemoryPlan` (``plan.variant``: the word for ``download_models.sh``).

    Raises:
        MemoryError: not even the lite models fit (the message of :func:`plan_memory`).
    """
    machine = machine or describe_machine()
    plans, options = [], {"machine": machine, "dtype": dtype, "image_encoder": image_encoder}
    for stage_c, stage_b in (("big", "big"), ("big", "lite"), ("lite", "big"), ("lite", "lite")):
        try:
            plans.append(plan_memory(stage_c, stage_b, **options))
        except MemoryError as error:
            smallest_error = error
    if not plans:
        raise smallest_error
    return next((plan for plan in plans if not plan.disk), plans[0])


def variant_table(machine: Machine | None = None, *, dtype: torch.dtype | None = None) -> str:
    """Where ``memory="auto"`` puts Stage C, Stage B and the text encoder for each variant, as Markdown.

    Args:
        machine: what to plan for (default: this machine).
        dtype: as for :func:`plan_memory`.

    Returns:
        The table, for ``print`` or ``IPython.display.Markdown``.
    """
    machine = machine or describe_machine()
    lines = ["| variant | Stage C | Stage B | text encoder | GB on the GPU | GB in RAM |", "| --- " * 6 + "|"]
    for word, (stage_b, stage_c) in files._VARIANTS.items():
        try:
            plan = plan_memory(stage_c, stage_b, machine=machine, dtype=dtype)
        except MemoryError:
            lines.append(f"| {word} | does not fit | | | | |")
            continue
        rows = map(plan._row, ("Stage C", "Stage B", "text encoder"))
        where = [f"{r.mode}, {str(r.dtype)[6:]}" for r in rows]
        lines.append(f"| {word} | {' | '.join(where)} | {plan.gpu / _GB:.1f} | {plan.ram / _GB:.1f} |")
    return "\n".join(lines)


_LOADED: list[tuple[str, torch.dtype | None, MemoryPlan]] = []  # memory="auto" plans made by loaders


def _plan_for_load(
    memory: str,
    device: torch.device,
    dtype: torch.dtype | None,
    sizes: dict[str, Size],
    known: str | None,
    image_encoder: bool = True,
    test_weights: bool = False,
) -> MemoryPlan:
    """With "auto" the prior's and decoder's loads share one plan, so that the two fit together."""
    memory = "gpu" if test_weights and memory == "auto" else memory
    if memory == "auto":
        key = (str(device), dtype)
        for where, asked, plan in reversed(_LOADED):
            if (where, asked) == key and (known is None or getattr(plan, known) == sizes[known]):
                return plan
    machine = describe_machine(device)
    plan = plan_memory(**sizes, machine=machine, dtype=dtype, memory=memory, image_encoder=image_encoder)
    if memory == "auto":
        print(plan)
        _LOADED.append((str(device), dtype, plan))
    return plan
