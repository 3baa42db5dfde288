"""The three LoRA file formats people have, to and from per-module :class:`~.adapters.LoraFactors`.

**The official format** (``train/train_c_lora.py``; the example ``lora_fernando_10k.safetensors``)
is the state dict of a ``ModuleDict`` and names no modules:

- ``weights.<i>.lora_down`` (rank × in) and ``weights.<i>.lora_up`` (out × rank), scaled by
  alpha / rank with alpha = 1. ``i`` counts the ``LoRA`` modules in ``generator.modules()`` order
  after ``apply_lora(filters=['.attn'])``: for every attention block (down path, then up path) first
  ``attention.attn.out_proj.weight``, then ``attention.attn.in_proj_weight``, the stacked q/k/v
  (``lora_up`` is 3·width × rank, ``lora_down`` shared by the three). The out_proj comes first because
  it is a child module of the ``MultiheadAttention`` registered before the in_proj parametrization.
- ``embeddings.embeddings`` (n × text width) are deltas added to the token-embedding rows
  ``embeddings.indices``. New tokens (``[fernando]``) were appended to the tokenizer (id = old
  vocabulary size), their rows initialized to the mean of the rows whose token matches a regex
  (``^dog</w>``), or zeros when nothing matches.

diffusers splits ``in_proj`` into ``to_q/to_k/to_v`` and renames ``out_proj`` to ``to_out.0``, so
the official LoRA is exactly a peft LoRA with ``lora_A`` = ``lora_down`` on each of q/k/v,
``lora_B`` = the matching third of ``lora_up``, and scale 1 / rank.

**ComfyUI / kohya** (what ComfyUI's ``model_lora_keys_unet`` maps for Stable Cascade; kohya's
sd-scripts ``stable-cascade`` branch and OneTrainer write it): one entry per module,
``<prefix><module name with dots as underscores>`` + ``.lora_down.weight`` (rank × in),
``.lora_up.weight`` (out × rank), ``.alpha`` (scale alpha / rank; no alpha means scale 1). The
prefix is ``lora_prior_unet_`` (ComfyUI, OneTrainer) or ``lora_unet_`` (kohya; ComfyUI reads both);
text-encoder entries use ``lora_prior_te_`` / ``lora_te_`` and transformers' CLIP module names. The
module names are the official Stage C's, with attention as ComfyUI/kohya build it:
``attention.attn.to_q|to_k|to_v|out_proj`` (diffusers: ``attention.to_q|to_k|to_v|to_out.0``).

**Ours**: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` and the learned
tokens' full embedding rows as ``tokens.embeddings`` with the token strings in the metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import _save_safetensors
from .adapters import LoraError, LoraFactors, other_size_hint

COMFYUI_PREFIX = "lora_prior_unet_"
KOHYA_PREFIX = "lora_unet_"
UNET_PREFIXES = (COMFYUI_PREFIX, KOHYA_PREFIX)
TEXT_ENCODER_PREFIXES = ("lora_prior_te_", "lora_te_")
FORMAT_TAG = "cascade_helpers.lora"

_COMFY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# --- the official format -----------------------------------------------------------------------------


def official_lora_layout(unet: nn.Module) -> list[tuple[str, ...]]:
    """For each official index ``i``, the diffusers modules ``weights.<i>`` acts on: the attention
    output (``to_out.0``), then q/k/v (the stacked in_proj), block after block."""
    from ..upstream import _SDCascadeAttnBlock

    layout: list[tuple[str, ...]] = []
    for name, module in unet.named_modules():
        if isinstance(module, _SDCascadeAttnBlock):
            layout.append((f"{name}.attention.to_out.0",))
            layout.append(tuple(f"{name}.attention.to_{p}" for p in "qkv"))
    return layout


def _official_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    indices = {
        int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"weights\.(\d+)\.lora_(down|up)", k))
    }
    if indices != set(range(len(indices))):
        raise LoraError(
            f"the official LoRA's weights are numbered {sorted(indices)[:5]}...: the file is damaged"
        )
    for i in indices:
        if f"weights.{i}.lora_down" not in state_dict or f"weights.{i}.lora_up" not in state_dict:
            raise LoraError(f"the official LoRA lacks weights.{i}.lora_down or lora_up: the file is damaged")
    return len(indices)


def official_factors(unet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """The official ``weights.<i>`` as per-module factors for the diffusers UNet (q/k/v split).

    Args:
        unet: the loaded Stage C UNet (its attention blocks give the layout).
        state_dict: the official file's tensors (``weights.<i>.lora_down``/``lora_up``; the
            ``embeddings.*`` entries are read elsewhere: :mod:`.tokens`).

    Returns:
        diffusers module name → :class:`LoraFactors` with alpha 1 (official scale 1 / rank).

    Raises:
        LoraError: misnumbered or missing weights (damaged), or a LoRA for a Stage C of another size.
    """
    layout = official_lora_layout(unet)
    count = _official_count(state_dict)
    model_width = unet.config.block_out_channels[0]
    lora_width = state_dict["weights.0.lora_down"].shape[1] if count else model_width
    if count != len(layout) or lora_width != model_width:
        raise LoraError(
            f"this official LoRA has {count} layers of width {lora_width} ({count // 2} attention blocks), "
            f"the loaded Stage C has {len(layout) // 2} attention blocks of width {model_width}: "
            + other_size_hint(lora_width, model_width)
        )
    factors: dict[str, LoraFactors] = {}
    for i, names in enumerate(layout):
        down, up = state_dict[f"weights.{i}.lora_down"], state_dict[f"weights.{i}.lora_up"]
        if up.shape[0] != len(names) * model_width:
            raise LoraError(
                f"weights.{i}.lora_up is {tuple(up.shape)}, expected {len(names) * model_width} rows"
            )
        for name, part in zip(names, up.chunk(len(names)), strict=True):
            factors[name] = LoraFactors(down, part, alpha=1.0)  # official: scale = 1 / rank
    return factors


# --- ComfyUI / kohya ---------------------------------------------------------------------------------


def comfyui_module_name(diffusers_name: str) -> str:
    """diffusers' Stage C module name → the official / ComfyUI / kohya one."""
    name = re.sub(r"\.attention\.to_([qkv])$", r".attention.attn.to_\1", diffusers_name)
    return re.sub(r"\.attention\.to_out\.0$", ".attention.attn.out_proj", name)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def comfyui_state_dict(
    factors: Mapping[str, LoraFactors], prefix: str = COMFYUI_PREFIX
) -> dict[str, torch.Tensor]:
    """Our per-module factors (diffusers names) → ComfyUI/kohya keys.

    Args:
        factors: diffusers module name → :class:`LoraFactors` (Stage C's UNet).
        prefix: ``lora_prior_unet_`` (ComfyUI, OneTrainer; the default) or ``lora_unet_`` (kohya's
            sd-scripts; ComfyUI reads it too).

    Returns:
        ``<prefix><module>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (a 0-d tensor) per
        module, with the official module names.
    """
    state = {}
    for name, f in factors.items():
        base = prefix + _flat(comfyui_module_name(name))
        state[f"{base}.lora_down.weight"] = f.down.contiguous()
        state[f"{base}.lora_up.weight"] = f.up.contiguous()
        state[f"{base}.alpha"] = torch.tensor(float(f.alpha))
    return state


def _group_comfyui(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in _COMFY_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            kind = (
                "LoHa"
                if "hada_" in key
                else "LoKr"
                if "lokr_" in key
                else "DoRA"
                if "dora_scale" in key
                else None
            )
            what = f"{kind} weights" if kind else "a key we do not know"
            raise LoraError(f"{key!r} is {what}: only plain LoRA (lora_down / lora_up / alpha) is supported")
        groups.setdefault(key[: -len(suffix)], {})[suffix] = value
    return groups


def comfyui_factors(
    state_dict: Mapping[str, torch.Tensor], unet: nn.Module, text_encoder: nn.Module | None = None
) -> tuple[dict[str, LoraFactors], dict[str, LoraFactors]]:
    """ComfyUI/kohya keys → (UNet factors, text-encoder factors) in diffusers / transformers names.

    Args:
        state_dict: the file's tensors (every key ``<prefix><module>`` + ``.lora_down.weight``,
            ``.lora_up.weight`` or ``.alpha``; a missing alpha means scale 1).
        unet: the loaded Stage C UNet, whose modules the keys must name (official or diffusers
            names, flattened).
        text_encoder: the CLIP text encoder, needed only if the file has text-encoder entries.

    Returns:
        The UNet's and the text encoder's factors by module name.

    Raises:
        LoraError: LoHa, LoKr or DoRA weights, a key we do not know, a damaged entry, text-encoder
            entries without ``text_encoder``, or modules the UNet lacks (another size or model).
    """
    unet_names = {}
    for name in _weight_modules(unet):
        unet_names[_flat(comfyui_module_name(name))] = name
        unet_names.setdefault(_flat(name), name)  # also diffusers' own names, flattened
    te_names = {_flat(n): n for n in _weight_modules(text_encoder)} if text_encoder is not None else {}
    unet_factors, te_factors, unknown = {}, {}, []
    for base, parts in _group_comfyui(state_dict).items():
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise LoraError(f"{base} lacks lora_down or lora_up: the file is damaged")
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        alpha = float(parts[".alpha"]) if ".alpha" in parts else float(down.shape[0])  # no alpha: scale 1
        factors = LoraFactors(down, up, alpha)
        unet_prefix = next((p for p in UNET_PREFIXES if base.startswith(p)), None)
        te_prefix = next((p for p in TEXT_ENCODER_PREFIXES if base.startswith(p)), None)
        if unet_prefix and base[len(unet_prefix) :] in unet_names:
            unet_factors[unet_names[base[len(unet_prefix) :]]] = factors
        elif te_prefix and text_encoder is None:
            raise LoraError(
                f"{base} is for the text encoder: pass text_encoder= (load_lora(prior, ...) does)"
            )
        elif te_prefix and base[len(te_prefix) :] in te_names:
            te_factors[te_names[base[len(te_prefix) :]]] = factors
        else:
            unknown.append(base)
    if unknown:
        raise LoraError(_unknown_modules_message(unknown))
    return unet_factors, te_factors


def _unknown_modules_message(unknown: list[str]) -> str:
    examples = ", ".join(unknown[:3])
    if all(re.search(r"_(down|up)_blocks_\d+_\d+_", name) for name in unknown):
        return (
            f"{len(unknown)} LoRA modules do not exist in the loaded Stage C ({examples}, ...): the LoRA was made "
            "for a Stage C of another size (big has 24 layers per inner level, lite 12). Load the matching variant."
        )
    return (
        f"{len(unknown)} LoRA modules are not Stable Cascade Stage C modules ({examples}, ...): "
        "this LoRA was made for another model (an SD 1.5 / SDXL LoRA, or a Stage B LoRA?)"
    )


# --- ours --------------------------------------------------------------------------------------------


def lora_state_dict(
    unet_factors: Mapping[str, LoraFactors], tokens: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our format: tensors and safetensors metadata (strings).

    Args:
        unet_factors: diffusers module name → :class:`LoraFactors`.
        tokens: learned token → its full embedding row (text width), or None.

    Returns:
        The state dict (``unet.<module>.lora_A.weight``/``lora_B.weight``/``alpha``, and
        ``tokens.embeddings``, n × width float32, when there are tokens) and the metadata
        (``format``, ``tokens`` as a JSON list in the rows' order).
    """
    state = {}
    for name, f in unet_factors.items():
        state[f"unet.{name}.lora_A.weight"] = f.down.contiguous()
        state[f"unet.{name}.lora_B.weight"] = f.up.contiguous()
        state[f"unet.{name}.alpha"] = torch.tensor(float(f.alpha))
    tokens = dict(tokens or {})
    if tokens:
        state["tokens.embeddings"] = torch.stack([t.detach().float().cpu() for t in tokens.values()])
    return state, {"format": FORMAT_TAG, "tokens": json.dumps(list(tokens))}


def save_lora(
    path: str | Path,
    unet_factors: Mapping[str, LoraFactors],
    tokens: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a LoRA (and learned token embeddings, full rows) in our format, atomically: an
    interrupted save never leaves half a file under ``path`` (nor replaces a good one).

    Args:
        path: the ``.safetensors`` file.
        unet_factors, tokens: as for :func:`lora_state_dict`.

    Returns:
        ``path``.
    """
    state, metadata = lora_state_dict(unet_factors, tokens)
    return _save_safetensors(path, state, metadata)


def save_comfyui(
    path: str | Path,
    unet_factors: Mapping[str, LoraFactors],
    tokens: Mapping[str, torch.Tensor] | None = None,
    prefix: str = COMFYUI_PREFIX,
) -> list[Path]:
    """Write the LoRA in ComfyUI/kohya keys, and each learned token as a ComfyUI embedding
    (``{"clip_g": 1 × width}``, the key ComfyUI's Stable Cascade tokenizer reads) in
    ``<stem>_embeddings/<token without brackets>.safetensors``: in ComfyUI write ``embedding:<name>``
    where you trained ``[name]``. ComfyUI pools the prompt at the end token, the official model at
    the highest token id (the new token), so results there differ somewhat. Each file is written
    atomically.

    Args:
        path: the LoRA's ``.safetensors`` file.
        unet_factors, tokens: as for :func:`lora_state_dict`.
        prefix: as for :func:`comfyui_state_dict`.

    Returns:
        The files written: the LoRA first, then one embedding per token.
    """
    path = Path(path)
    written = [_save_safetensors(path, comfyui_state_dict(unet_factors, prefix))]
    for token, row in (tokens or {}).items():
        embedding = path.parent / f"{path.stem}_embeddings" / f"{token.strip('[]<>')}.safetensors"
        written.append(_save_safetensors(embedding, {"clip_g": row.float().reshape(1, -1)}))
    return written


def our_factors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors]:
    names = sorted(
        {k[len("unet.") : -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight")}
    )
    try:
        return {
            n: LoraFactors(
                state_dict[f"unet.{n}.lora_A.weight"],
                state_dict[f"unet.{n}.lora_B.weight"],
                float(state_dict[f"unet.{n}.alpha"]),
            )
            for n in names
        }
    except KeyError as error:
        raise LoraError(f"the LoRA lacks {error.args[0]}: the file is damaged") from None


def detect_format(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """'official', 'comfyui' (ComfyUI / kohya / OneTrainer keys) or 'cascade_helpers' (ours).

    Args:
        state_dict: the file's tensors (only the key names are read).
        metadata: the file's safetensors metadata; ``format`` = ``cascade_helpers.lora`` means ours.

    Returns:
        The format's name.

    Raises:
        LoraError: none of the three.
    """
    keys = list(state_dict)
    if (metadata or {}).get("format") == FORMAT_TAG or any(
        k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys
    ):
        return "cascade_helpers"
    if "weights.0.lora_down" in state_dict or "embeddings.indices" in state_dict:
        return "official"
    if keys and all(k.startswith(UNET_PREFIXES + TEXT_ENCODER_PREFIXES) for k in keys):
        return "comfyui"
    raise LoraError(
        f"not a Stable Cascade LoRA we can read (keys like {keys[:3]}): we read the official format "
        "(weights.<i>.lora_down), ComfyUI/kohya (lora_prior_unet_..., lora_unet_...) and ours (unet....lora_A.weight)"
    )
