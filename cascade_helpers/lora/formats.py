"""The three LoRA file formats people have, to and from per-module factors (:mod:`.adapters`).

**Official** (``train/train_c_lora.py``; the example ``lora_fernando_10k.safetensors``), naming no
modules: ``weights.<i>.lora_down`` (rank × in), ``weights.<i>.lora_up`` (out × rank), scale 1 / rank,
``i`` counting the ``LoRA`` modules in ``generator.modules()`` order after ``apply_lora(filters=['.attn'])``:
per attention block (down path, then up path) ``attention.attn.out_proj`` (a child module, registered
before the in_proj parametrization), then ``in_proj_weight``, the stacked q/k/v (``lora_up`` 3·width ×
rank: diffusers' ``to_q``/``to_k``/``to_v`` each get ``lora_down`` and a third of it; out_proj is
``to_out.0``). ``embeddings.embeddings`` (n × text width): deltas added to the token rows
``embeddings.indices``; new tokens (``[fernando]``) were appended to the tokenizer (id = old vocabulary
size), each started from the mean row of the tokens a regex matches (``^dog</w>``).

**ComfyUI / kohya** (ComfyUI's ``model_lora_keys_unet``; kohya's ``stable-cascade`` branch, OneTrainer):
``<prefix><module, dots as underscores>`` + ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (scale
alpha / rank; none: 1); prefixes ``lora_prior_unet_`` (ComfyUI, OneTrainer) or ``lora_unet_`` (kohya),
``lora_prior_te_`` / ``lora_te_`` for the text encoder; Stage C modules by their official names.

**Ours**: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``, and the learned
tokens' full rows as ``tokens.embeddings``, their strings in the metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import _save_safetensors
from .adapters import LoraError, _describe_width, _LoraFactors, _other_size_hint

_COMFYUI_PREFIX = "lora_prior_unet_"
_UNET_PREFIXES = (_COMFYUI_PREFIX, "lora_unet_")  # ComfyUI / OneTrainer, kohya
_TEXT_ENCODER_PREFIXES = ("lora_prior_te_", "lora_te_")
_FORMAT_TAG = "cascade_helpers.lora"
_COMFY_PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")
_OUR_PARTS = (".lora_A.weight", ".lora_B.weight", ".alpha")
_OTHER_KINDS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA"}
_OUR_KEY = re.compile(r"unet\..+\.lora_A\.weight")


def _official_lora_layout(unet: nn.Module) -> list[tuple[str, ...]]:
    """Why: the official file names no modules: index i is the i-th of these (out_proj, then q/k/v)."""
    from ..upstream import _SDCascadeAttnBlock

    layout: list[tuple[str, ...]] = []
    for name, module in unet.named_modules():
        if isinstance(module, _SDCascadeAttnBlock):
            layout.append((f"{name}.attention.to_out.0",))
            layout.append(tuple(f"{name}.attention.to_{p}" for p in "qkv"))
    return layout


def _official_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Why: a gap in the numbering would shift every later layer onto the wrong module."""
    found = [re.fullmatch(r"weights\.(\d+)\.lora_(down|up)", k) for k in state_dict]
    indices = {int(m.group(1)) for m in found if m}
    if indices != set(range(len(indices))):
        raise LoraError(
            f"the official LoRA's weights are numbered {sorted(indices)[:5]}...: the file is damaged"
        )
    for i in indices:
        if f"weights.{i}.lora_down" not in state_dict or f"weights.{i}.lora_up" not in state_dict:
            raise LoraError(f"the official LoRA lacks weights.{i}.lora_down or lora_up: the file is damaged")
    return len(indices)


def _official_factors(unet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, _LoraFactors]:
    """Why: official ``weights.<i>`` as diffusers factors (q/k/v split, alpha 1), checked to fit first."""
    layout, count = _official_lora_layout(unet), _official_count(state_dict)
    model_width = unet.config.block_out_channels[0]
    lora_width = state_dict["weights.0.lora_down"].shape[1] if count else model_width
    if lora_width != model_width:
        raise LoraError(
            f"this official LoRA has {count} layers of width {lora_width} ({count // 2} attention blocks), "
            f"the loaded Stage C has {len(layout) // 2} attention blocks of width {model_width}: "
            + _other_size_hint(lora_width, model_width)
        )
    if count != len(layout):
        raise LoraError(
            f"this official LoRA holds {count} layers, {_describe_width(model_width)} needs {len(layout)} (two "
            f"per attention block): the file is cut short or damaged (download or copy it again), or was made "
            "for a Stage C of the same width with other blocks"
        )
    factors: dict[str, _LoraFactors] = {}
    for i, names in enumerate(layout):
        down, up = state_dict[f"weights.{i}.lora_down"], state_dict[f"weights.{i}.lora_up"]
        if up.shape[0] != len(names) * model_width:
            raise LoraError(
                f"weights.{i}.lora_up is {tuple(up.shape)}, expected {len(names) * model_width} rows"
            )
        for name, part in zip(names, up.chunk(len(names)), strict=True):
            factors[name] = _LoraFactors(down, part, alpha=1.0)
    return factors


def _comfyui_key(diffusers_name: str) -> str:
    """Why: ComfyUI/kohya keys use the official attention names (``attn.out_proj``), dots as underscores."""
    name = re.sub(r"\.attention\.to_([qkv])$", r".attention.attn.to_\1", diffusers_name)
    return re.sub(r"\.attention\.to_out\.0$", ".attention.attn.out_proj", name).replace(".", "_")


def _factor_tensors(factors: Mapping[str, _LoraFactors], base, parts: tuple[str, ...]) -> dict:
    """Why: both formats that name modules store down, up and alpha (0-d) under each module's key base."""
    state = {}
    for name, f in factors.items():
        values = (f.down.contiguous(), f.up.contiguous(), torch.tensor(float(f.alpha)))
        state |= {base(name) + part: value for part, value in zip(parts, values, strict=True)}
    return state


def _group_parts(state_dict: Mapping[str, torch.Tensor], parts: tuple[str, ...]) -> dict[str, dict]:
    """Why: a module's parts are separate keys; other kinds (LoHa, LoKr, DoRA) are named, not half-read."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        part = next((p for p in parts if key.endswith(p)), None)
        if part is None:
            kind = next((f"{kind} weights" for marker, kind in _OTHER_KINDS.items() if marker in key), None)
            raise LoraError(f"{key!r} is {kind or 'a key we do not know'}: only plain LoRA is supported")
        groups.setdefault(key[: -len(part)], {})[part] = value
    return groups


def _read_factors(state_dict: Mapping[str, torch.Tensor], parts: tuple[str, ...], needed: int) -> dict:
    """Why: both formats that name modules, the first ``needed`` parts required (no alpha: scale 1)."""
    factors = {}
    for base, found in _group_parts(state_dict, parts).items():
        missing = [p[1:] for p in parts[:needed] if p not in found]
        if missing:
            raise LoraError(f"{base} lacks {' and '.join(missing)}: the file is damaged")
        down, up = found[parts[0]], found[parts[1]]
        factors[base] = _LoraFactors(down, up, float(found.get(parts[2], down.shape[0])))
    return factors


def _comfyui_state_dict(factors: Mapping[str, _LoraFactors], prefix: str = _COMFYUI_PREFIX) -> dict:
    """Why: ComfyUI/kohya keys: ``<prefix><official module name, dots as underscores>`` + the parts."""
    return _factor_tensors(factors, lambda name: prefix + _comfyui_key(name), _COMFY_PARTS)


def _comfyui_names(unet: nn.Module, text_encoder: nn.Module) -> dict[str, tuple[str, str]]:
    """Why: each key base a ComfyUI/kohya file may use → (model, module), both prefixes, both UNet names."""
    names: dict[str, tuple[str, str]] = {}
    models = (("unet", unet, _UNET_PREFIXES), ("text_encoder", text_encoder, _TEXT_ENCODER_PREFIXES))
    for kind, model, prefixes in models:
        for name in (n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
            for prefix in prefixes:  # the text encoder's names are the same either way
                names[prefix + _comfyui_key(name)] = (kind, name)
                names.setdefault(prefix + name.replace(".", "_"), (kind, name))
    return names


def _comfyui_factors(
    state_dict: Mapping[str, torch.Tensor], unet: nn.Module, text_encoder: nn.Module
) -> tuple:
    """Why: ComfyUI/kohya keys → (UNet, text-encoder) factors; unknown modules are named together."""
    names, read = _comfyui_names(unet, text_encoder), _read_factors(state_dict, _COMFY_PARTS, 2)
    unknown = [base for base in read if base not in names]
    examples = ", ".join(unknown[:3])
    if unknown and all(re.search(r"_(down|up)_blocks_\d+_\d+_", name) for name in unknown):
        raise LoraError(  # a Stage C LoRA of another size needs another fix than one of another model
            f"{len(unknown)} LoRA modules do not exist in the loaded Stage C ({examples}, ...): the LoRA was made "
            "for a Stage C of another size (big has 24 layers per inner level, lite 12). Load the matching variant."
        )
    if unknown:
        raise LoraError(
            f"{len(unknown)} LoRA modules are not Stable Cascade Stage C modules ({examples}, ...): "
            "this LoRA was made for another model (an SD 1.5 / SDXL LoRA, or a Stage B LoRA?)"
        )
    factors: dict[str, dict[str, _LoraFactors]] = {"unet": {}, "text_encoder": {}}
    for base, f in read.items():
        factors[names[base][0]][names[base][1]] = f
    return factors["unet"], factors["text_encoder"]


def _save_comfyui(
    path: Path, unet_factors: Mapping[str, _LoraFactors], tokens: Mapping[str, torch.Tensor], prefix: str
) -> list[Path]:
    """Why: ComfyUI reads a LoRA and each token (``{"clip_g": 1 × width}``) as separate files."""
    written = [_save_safetensors(path, _comfyui_state_dict(unet_factors, prefix))]
    for token, row in tokens.items():
        embedding = path.parent / f"{path.stem}_embeddings" / f"{token.strip('[]<>')}.safetensors"
        written.append(_save_safetensors(embedding, {"clip_g": row.float().reshape(1, -1)}))
    return written


def _save_lora(
    path: Path, unet_factors: Mapping[str, _LoraFactors], tokens: Mapping[str, torch.Tensor]
) -> Path:
    """Why: our format keeps diffusers' names and the learned tokens, so a LoRA loads back exactly."""
    state = _factor_tensors(unet_factors, lambda name: f"unet.{name}", _OUR_PARTS)
    if tokens:
        state["tokens.embeddings"] = torch.stack([t.detach().float() for t in tokens.values()])
    return _save_safetensors(path, state, {"format": _FORMAT_TAG, "tokens": json.dumps(list(tokens))})


def _read_ours(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[dict, dict]:
    """Why: our file back to factors and tokens (names in the metadata, rows in a tensor: they must agree)."""
    modules = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    factors = _read_factors(modules, _OUR_PARTS, 3)
    try:
        tokens = json.loads(metadata.get("tokens", "[]"))
    except json.JSONDecodeError:
        tokens = None
    rows = state_dict.get("tokens.embeddings", torch.zeros(0, 0))
    if not isinstance(tokens, list) or len(tokens) != rows.shape[0]:
        raise LoraError(
            f"the file's metadata names the tokens {metadata.get('tokens')!r} but it holds {rows.shape[0]} "
            "token embeddings: it is damaged"
        )
    return factors, dict(zip(tokens, rows, strict=True))


def _detect_format(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Why: a LoRA file does not say its format; its keys (or our metadata tag) do."""
    keys = list(state_dict)
    if metadata.get("format") == _FORMAT_TAG or any(map(_OUR_KEY.fullmatch, keys)):
        return "cascade_helpers"
    if "weights.0.lora_down" in state_dict or "embeddings.indices" in state_dict:
        return "official"
    if keys and all(k.startswith(_UNET_PREFIXES + _TEXT_ENCODER_PREFIXES) for k in keys):
        return "comfyui"
    raise LoraError(
        f"not a Stable Cascade LoRA we can read (keys like {keys[:3]}): we read the official format "
        "(weights.<i>.lora_down), ComfyUI/kohya (lora_prior_unet_..., lora_unet_...) and ours (unet....lora_A.weight)"
    )
