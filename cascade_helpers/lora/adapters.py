"""peft LoRA layers on a diffusers model: add fresh ones to train, put given factors on, read them
back, scale their effect. What every LoRA file format becomes once loaded (:mod:`.formats`).
"""

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

ADAPTER = "lora"
#: what the official filter ``'.attn'`` selects, in diffusers' names: attention q, k, v and output
ATTENTION_TARGETS = r".*\.attention\.(to_q|to_k|to_v|to_out\.0)"


class LoraError(ValueError):
    """A LoRA that does not fit: made for another model, a token missing, an unknown format."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: weight += alpha / rank · up @ down."""

    down: torch.Tensor  # rank × in (× kh × kw for convolutions): peft's lora_A
    up: torch.Tensor  # out × rank (× 1 × 1): peft's lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` that carry ``adapter``, by module name.

    Args:
        model: a UNet or text encoder.
        adapter: the peft adapter name; the package uses one, "lora".

    Returns:
        Module name → peft ``LoraLayer``.
    """
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def refuse_streamed(model: nn.Module) -> None:
    """With ``memory="sequential_offload"`` accelerate keeps the weights off the model (on the "meta"
    device) and streams them in per layer: LoRA layers and new token rows added there would never
    reach the GPU (peft leaves them on the CPU, the embedding resize breaks the stream)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise LoraError(
            "this model was loaded with memory='sequential_offload', whose weights stream in layer by layer: "
            "a LoRA cannot be added to it. Load the prior with memory='model_offload' (one big model on the "
            "GPU at a time) or memory='gpu'"
        )


def refuse_second_lora(model: nn.Module) -> None:
    """Refuse a model that already carries LoRA layers (one LoRA per model: a second one would mix
    with the first), or whose weights stream in (:func:`refuse_streamed`), before anything changes.

    Raises:
        LoraError: naming what to load instead.
    """
    from peft.tuners.lora import LoraLayer

    refuse_streamed(model)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError(
            "this model already carries a LoRA. Load a fresh prior (load_prior) to use another one, "
            "or turn the current one off with set_lora_strength(prior, 0)"
        )


def inject_lora(model: nn.Module, rank: int = 4, alpha: float = 1.0, targets=ATTENTION_TARGETS) -> list[str]:
    """Add a fresh, trainable LoRA (peft's init: B = 0, so the model is unchanged) to the modules
    ``targets`` names (a regex matched against full module names, or a list of name suffixes).
    Defaults are the official config's: attention only, rank 4, alpha 1. The LoRA weights are float32
    even on a bfloat16 model (small updates would round away in bfloat16).

    Args:
        model: the model to adapt (Stage C's UNet).
        rank: the LoRA rank (official: 4).
        alpha: the LoRA alpha; the update is scaled by alpha / rank (official: 1).
        targets: the modules to adapt; default :data:`ATTENTION_TARGETS` (attention q, k, v, out).

    Returns:
        The names of the adapted modules.

    Raises:
        LoraError: the model already carries a LoRA, or was loaded with sequential offload.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    refuse_second_lora(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    cast_adapter_dtype(model, ADAPTER)
    return list(lora_layers(model))


def apply_factors(
    model: nn.Module, factors: Mapping[str, LoraFactors], strength: float = 1.0, *, checked: bool = False
) -> None:
    """Put given LoRA factors on the named modules of ``model`` (each its own rank and alpha).

    Args:
        model: a UNet or text encoder without a LoRA.
        factors: module name → :class:`LoraFactors`; empty does nothing.
        strength: the LoRA's weight (:func:`set_lora_strength`): 0 off, 1 as trained.
        checked: the caller ran :func:`check_factors` on these factors already (``load_lora`` checks
            everything before it changes anything): skip the second pass over every factor.

    Raises:
        LoraError: what :func:`check_factors` refuses (checked before anything changes).
        ValueError: a strength that is not a finite number.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    values.finite(strength, "strength", "the LoRA's weight: 0 off, 1 as trained")
    if not factors:
        return
    if not checked:
        check_factors(model, factors)
    ranks = Counter(f.rank for f in factors.values())
    config = LoraConfig(
        r=ranks.most_common(1)[0][0],
        lora_alpha=1.0,
        target_modules=list(factors),
        rank_pattern={re.escape(name): f.rank for name, f in factors.items()},
        alpha_pattern={re.escape(name): f.alpha for name, f in factors.items()},
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers, rows = lora_layers(model), _lora_rows(model)  # rows: a float16-rescaled layer's
    if rows or _stored_in_float8(model):  # float32: rescaled factors keep every bit; float8 ones would not
        cast_adapter_dtype(model, ADAPTER)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            layer.lora_A[ADAPTER].weight.copy_(f.down)
            layer.lora_B[ADAPTER].weight.copy_(f.up * rows.get(name, 1.0))
    set_lora_strength(model, strength)


def check_factors(model: nn.Module, factors: Mapping[str, LoraFactors]) -> None:
    """Refuse, before anything changes, factors that :func:`apply_factors` could not put on
    ``model``: a second LoRA, a streamed model, modules it lacks, shapes that differ.

    Args:
        model, factors: as for :func:`apply_factors`.

    Raises:
        LoraError: naming the module, and for another width the Stage C the LoRA was made for; also
            for NaN or infinite factors.
    """
    if not factors:
        return
    refuse_second_lora(model)
    modules = dict(model.named_modules())
    for name, f in factors.items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise LoraError(
                f"the LoRA adapts {name}, which this model does not have: it was made for another model"
            )
        if not (torch.isfinite(f.down).all() and torch.isfinite(f.up).all() and math.isfinite(f.alpha)):
            raise LoraError(f"the LoRA's factors for {name} hold NaN or infinite values: the file is damaged")
        out_features, in_features = modules[name].weight.shape[:2]
        lora_out, lora_in = f.up.shape[0], f.down.shape[1]
        if (lora_out, lora_in) != (out_features, in_features) or f.up.shape[1] != f.rank:
            raise LoraError(
                f"the LoRA for {name} maps {lora_in} → {lora_out} features, the module {in_features} → "
                f"{out_features}: {other_size_hint(lora_in, in_features)}"
            )


def lora_factors(model: nn.Module) -> dict[str, LoraFactors]:
    """The LoRA currently on ``model``, module by module (detached copies)."""
    factors, rows = {}, _lora_rows(model)
    for name, layer in lora_layers(model).items():
        up = layer.lora_B[ADAPTER].weight.detach()
        factors[name] = LoraFactors(
            layer.lora_A[ADAPTER].weight.detach().clone(),
            up / rows[name].to(up.device) if name in rows else up.clone(),  # without the float16 rescale
            float(layer.lora_alpha[ADAPTER]),
        )
    return factors


def set_lora_strength(model, strength: float) -> None:
    """Scale the LoRA's effect: 0 is the model without it, 1 as trained. Works on a UNet, a text
    encoder or a whole ``Prior`` (both). Learned token embeddings are not scaled (they are new words).

    Args:
        model: a UNet, a text encoder or a prior.
        strength: any finite number (negative ones reverse the LoRA); NaN would give black pictures.
    """
    strength = values.finite(strength, "strength", "the LoRA's weight: 0 off, 1 as trained")
    models = [model.unet, model.text_encoder] if hasattr(model, "unet") else [model]
    for m in models:
        for layer in lora_layers(m).values():
            layer.set_scale(ADAPTER, strength)


def remove_lora(model: nn.Module) -> None:
    """Take every peft LoRA layer off ``model``, each replaced by the layer it wraps: the model is
    again as loaded. What a failed :func:`~cascade_helpers.lora.load_lora` undoes."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)  # what inject_adapter_in_model leaves on the model


# --- sizes, for error messages -----------------------------------------------------------------------


@cache
def _stage_c_widths() -> dict[int, str]:
    """Attention width → Stage C architecture, from the shipped configs."""
    widths = {}
    for architecture in ("big", "lite", "tiny"):
        config = json.loads((config_dir("stage_c", architecture) / "config.json").read_text())
        widths[config["block_out_channels"][0]] = architecture
    return widths


def _describe_width(width: int) -> str:
    architecture = _stage_c_widths().get(width)
    return f"Stage C {architecture} (width {width})" if architecture else f"a model of width {width}"


def other_size_hint(lora_width: int, model_width: int) -> str:
    """The end of an error about a LoRA made for another model: which Stage C each width is, and
    what to load instead.

    Args:
        lora_width, model_width: the LoRA's and the loaded model's feature widths.

    Returns:
        The sentence, naming Stage C big, lite or tiny where a width is one of theirs.
    """
    return (
        f"the LoRA was made for {_describe_width(lora_width)}, the loaded model is {_describe_width(model_width)}. "
        "Load the Stage C it was trained for (load_prior(..., variant='big' or 'lite'))"
    )
