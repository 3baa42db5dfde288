"""peft LoRA layers on a diffusers model: fresh ones to train, given factors put on, read back, scaled:
what every LoRA file format becomes once loaded (:mod:`.formats`)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from .. import values
from ..checkpoints import config_dir
from ..float8 import _stored_in_float8
from ..float16 import _lora_rows

_ADAPTER = "lora"
#: what the official filter ``'.attn'`` selects, in diffusers' names: attention q, k, v and output
ATTENTION_TARGETS = r".*\.attention\.(to_q|to_k|to_v|to_out\.0)"
_STRENGTH = "the LoRA's weight: 0 off, 1 as trained"


class LoraError(ValueError):
    """A LoRA that does not fit: made for another model, a token missing, an unknown format."""


@dataclass(frozen=True)
class _LoraFactors:
    """One module's LoRA, whichever file format it came from: weight += alpha / rank · up @ down."""

    down: torch.Tensor  # rank × in: peft's lora_A
    up: torch.Tensor  # out × rank: peft's lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name: what a LoRA put on it consists of."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and _ADAPTER in m.lora_A}


def _refuse_unadaptable(model: nn.Module) -> None:
    """Why: one LoRA per model (a second mixes in), none where offloading hooks would leave its weights behind."""
    from peft.tuners.lora import LoraLayer

    if any(p.device.type == "meta" for p in model.parameters()):
        raise LoraError(
            "this model was loaded with memory='sequential_offload', whose weights stream in layer by layer: "
            "a LoRA cannot be added to it. Load the prior with memory='model_offload' (one big model on the "
            "GPU at a time) or memory='gpu'"
        )
    registries = [getattr(m, "_diffusers_hook", None) for m in model.modules()]  # diffusers' hooks
    if any(r is not None and r.get_hook("group_offloading") is not None for r in registries):
        raise LoraError(
            "this model was loaded with memory='group_offload' or 'disk_offload', whose hooks move only the "
            "weights they found when the model loaded: a LoRA's would stay behind. Load the prior with "
            "memory='model_offload' (one big model on the GPU at a time) or memory='gpu'"
        )
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError(
            "this model already carries a LoRA. Load a fresh prior (load_prior) to use another one, "
            "or turn the current one off with set_lora_strength(prior, 0)"
        )


def inject_lora(model: nn.Module, rank: int = 4, alpha: float = 1.0, targets=ATTENTION_TARGETS) -> list[str]:
    """Add a fresh, trainable LoRA (peft's init: B = 0, so the model is unchanged), as the official
    config does by default. Its weights are float32 even on a bfloat16 model (small updates would round away).

    Args:
        model: the model to adapt (Stage C's UNet).
        rank: the LoRA rank (official: 4).
        alpha: the LoRA alpha; the update is scaled by alpha / rank (official: 1).
        targets: a regex matched against full module names, or a list of name suffixes (official: attention).

    Returns:
        The names of the adapted modules.

    Raises:
        LoraError: the model already carries a LoRA, or was loaded with sequential or group offload.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    _refuse_unadaptable(model)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model, _ADAPTER)
    cast_adapter_dtype(model, _ADAPTER)
    return list(_lora_layers(model))


def _check_factors(model: nn.Module, factors: Mapping[str, _LoraFactors]) -> None:
    """Why: a LoRA made for another model is named before anything changes (peft would fail halfway)."""
    modules = dict(model.named_modules())
    for name, f in factors.items():
        if not hasattr(modules.get(name), "weight"):
            raise LoraError(f"the LoRA adapts {name}, which this model lacks: it was made for another model")
        if not (torch.isfinite(f.down).all() and torch.isfinite(f.up).all() and math.isfinite(f.alpha)):
            raise LoraError(f"the LoRA's factors for {name} hold NaN or infinite values: the file is damaged")
        if f.up.shape[1] != f.rank:
            raise LoraError(f"the LoRA's factors for {name} have ranks {f.rank} and {f.up.shape[1]}: damaged")
        out_features, in_features = modules[name].weight.shape[:2]
        lora_out, lora_in = f.up.shape[0], f.down.shape[1]
        if (lora_out, lora_in) != (out_features, in_features):
            raise LoraError(
                f"the LoRA for {name} maps {lora_in} → {lora_out} features, the module {in_features} → "
                f"{out_features}: {_other_size_hint(lora_in, in_features)}"
            )


def _apply_factors(model: nn.Module, factors: Mapping[str, _LoraFactors], strength: float) -> None:
    """Why: peft cannot put given factors (per-module rank and alpha) on a model: inject, then copy in."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    if not factors:
        return
    config = LoraConfig(
        r=Counter(f.rank for f in factors.values()).most_common(1)[0][0],
        lora_alpha=1.0,
        target_modules=list(factors),
        rank_pattern={re.escape(name): f.rank for name, f in factors.items()},
        alpha_pattern={re.escape(name): f.alpha for name, f in factors.items()},
    )
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    layers, rows = _lora_layers(model), _lora_rows(model)  # rows: a float16-rescaled layer's
    if rows or _stored_in_float8(model):  # float32: rescaled factors keep every bit; float8 ones would not
        cast_adapter_dtype(model, _ADAPTER)
    with torch.no_grad():
        for name, f in factors.items():
            layers[name].lora_A[_ADAPTER].weight.copy_(f.down)
            layers[name].lora_B[_ADAPTER].weight.copy_(f.up * rows.get(name, 1.0))
    set_lora_strength(model, strength)


def _lora_factors(model: nn.Module) -> dict[str, _LoraFactors]:
    """The LoRA on ``model``, module by module (detached copies): what every file format writes."""
    factors, rows = {}, _lora_rows(model)
    for name, layer in _lora_layers(model).items():
        down, up = (weights[_ADAPTER].weight.detach().clone() for weights in (layer.lora_A, layer.lora_B))
        up = up / rows[name].to(up.device) if name in rows else up  # without the float16 rescale
        factors[name] = _LoraFactors(down, up, float(layer.lora_alpha[_ADAPTER]))
    return factors


def set_lora_strength(model, strength: float) -> None:
    """Scale the LoRA's effect: 0 is the model without it, 1 as trained. Learned token embeddings are
    not scaled (they are new words).

    Args:
        model: a UNet, a text encoder or a prior.
        strength: any finite number (negative ones reverse the LoRA); NaN would give black pictures.
    """
    strength = values._finite(strength, "strength", _STRENGTH)
    for m in [model.unet, model.text_encoder] if hasattr(model, "unet") else [model]:
        for layer in _lora_layers(m).values():
            layer.set_scale(_ADAPTER, strength)


def _remove_lora(model: nn.Module) -> None:
    """Why: a load that fails midway must leave the model as loaded: each peft layer back to its base."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)  # what inject_adapter_in_model leaves on the model


@cache
def _describe_width(width: int) -> str:
    """Why: "Stage C lite (width 1536)" says more to a user than a bare number."""
    for architecture in ("big", "lite", "tiny"):
        config = json.loads((config_dir("stage_c", architecture) / "config.json").read_text())
        if config["block_out_channels"][0] == width:
            return f"Stage C {architecture} (width {width})"
    return f"a model of width {width}"


def _other_size_hint(lora_width: int, model_width: int) -> str:
    """Why: the one ending of every "made for another Stage C" error: both models, and what to load."""
    return (
        f"the LoRA was made for {_describe_width(lora_width)}, the loaded model is {_describe_width(model_width)}. "
        "Load the Stage C it was trained for (load_prior(..., variant='big' or 'lite'))"
    )
