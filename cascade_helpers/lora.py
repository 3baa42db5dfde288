"""Stage C LoRA on diffusers' ``StableCascadeUNet`` through peft, in the three file formats people have.

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

One LoRA per model at a time: load a fresh prior to change it (or set its strength to 0).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from . import files
from .checkpoints import CheckpointError, TruncatedCheckpointError, config_dir, read_header

ADAPTER = "lora"
#: what the official filter ``'.attn'`` selects, in diffusers' names: attention q, k, v and output
ATTENTION_TARGETS = r".*\.attention\.(to_q|to_k|to_v|to_out\.0)"
COMFYUI_PREFIX = "lora_prior_unet_"
KOHYA_PREFIX = "lora_unet_"
UNET_PREFIXES = (COMFYUI_PREFIX, KOHYA_PREFIX)
TEXT_ENCODER_PREFIXES = ("lora_prior_te_", "lora_te_")
FORMAT_TAG = "cascade_helpers.lora"
#: a token to add and the regex of existing tokens whose mean embedding initializes it (the official
#: ``train_tokens`` entries), e.g. ``("[fernando]", "^dog</w>")``
NewToken = tuple[str, str | None]

_COMFY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


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


@dataclass(frozen=True)
class LoadedLora:
    """What :func:`load_lora` applied."""

    format: str
    unet_modules: int
    text_encoder_modules: int
    tokens: tuple[str, ...]
    strength: float

    def __str__(self) -> str:
        tokens = f", new tokens {', '.join(self.tokens)}" if self.tokens else ""
        te = f" + {self.text_encoder_modules} text-encoder modules" if self.text_encoder_modules else ""
        return (
            f"{self.format} LoRA on {self.unet_modules} Stage C modules{te}{tokens}, strength {self.strength}"
        )


# --- peft adapters -----------------------------------------------------------------------------------


def lora_layers(model: nn.Module, adapter: str = ADAPTER) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` that carry ``adapter``, by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _refuse_streamed(model: nn.Module) -> None:
    """With ``memory="sequential_offload"`` accelerate keeps the weights off the model (on the "meta"
    device) and streams them in per layer: LoRA layers and new token rows added there would never
    reach the GPU (peft leaves them on the CPU, the embedding resize breaks the stream)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise LoraError(
            "this model was loaded with memory='sequential_offload', whose weights stream in layer by layer: "
            "a LoRA cannot be added to it. Load the prior with memory='model_offload' (one big model on the "
            "GPU at a time) or memory='gpu'"
        )


def _refuse_second_lora(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    _refuse_streamed(model)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError(
            "this model already carries a LoRA. Load a fresh prior (load_prior) to use another one, "
            "or turn the current one off with set_lora_strength(prior, 0)"
        )


def inject_lora(model: nn.Module, rank: int = 4, alpha: float = 1.0, targets=ATTENTION_TARGETS) -> list[str]:
    """Add a fresh, trainable LoRA (peft's init: B = 0, so the model is unchanged) to the modules
    ``targets`` names (a regex matched against full module names, or a list of name suffixes).
    Defaults are the official config's: attention only, rank 4, alpha 1. The LoRA weights are float32
    even on a bfloat16 model (small updates would round away in bfloat16). Returns the module names."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    _refuse_second_lora(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    cast_adapter_dtype(model, ADAPTER)
    return list(lora_layers(model))


def apply_factors(model: nn.Module, factors: Mapping[str, LoraFactors], strength: float = 1.0) -> None:
    """Put given LoRA factors on the named modules of ``model`` (each its own rank and alpha)."""
    from peft import LoraConfig, inject_adapter_in_model

    if not factors:
        return
    _refuse_second_lora(model)
    _check_factor_shapes(model, factors)
    ranks = Counter(f.rank for f in factors.values())
    config = LoraConfig(
        r=ranks.most_common(1)[0][0],
        lora_alpha=1.0,
        target_modules=list(factors),
        rank_pattern={re.escape(name): f.rank for name, f in factors.items()},
        alpha_pattern={re.escape(name): f.alpha for name, f in factors.items()},
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            layer.lora_A[ADAPTER].weight.copy_(f.down)
            layer.lora_B[ADAPTER].weight.copy_(f.up)
    set_lora_strength(model, strength)


def _check_factor_shapes(model: nn.Module, factors: Mapping[str, LoraFactors]) -> None:
    modules = dict(model.named_modules())
    for name, f in factors.items():
        if name not in modules or not hasattr(modules[name], "weight"):
            raise LoraError(
                f"the LoRA adapts {name}, which this model does not have: it was made for another model"
            )
        out_features, in_features = modules[name].weight.shape[:2]
        lora_out, lora_in = f.up.shape[0], f.down.shape[1]
        if (lora_out, lora_in) != (out_features, in_features) or f.up.shape[1] != f.rank:
            raise LoraError(
                f"the LoRA for {name} maps {lora_in} → {lora_out} features, the module {in_features} → "
                f"{out_features}: {_other_size_hint(lora_in, in_features)}"
            )


def lora_factors(model: nn.Module) -> dict[str, LoraFactors]:
    """The LoRA currently on ``model``, module by module (detached copies)."""
    factors = {}
    for name, layer in lora_layers(model).items():
        factors[name] = LoraFactors(
            layer.lora_A[ADAPTER].weight.detach().clone(),
            layer.lora_B[ADAPTER].weight.detach().clone(),
            float(layer.lora_alpha[ADAPTER]),
        )
    return factors


def set_lora_strength(model, strength: float) -> None:
    """Scale the LoRA's effect: 0 is the model without it, 1 as trained. Works on a UNet, a text
    encoder or a whole ``Prior`` (both). Learned token embeddings are not scaled (they are new words)."""
    models = [model.unet, model.text_encoder] if hasattr(model, "unet") else [model]
    for m in models:
        for layer in lora_layers(m).values():
            layer.set_scale(ADAPTER, strength)


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


def _other_size_hint(lora_width: int, model_width: int) -> str:
    return (
        f"the LoRA was made for {_describe_width(lora_width)}, the loaded model is {_describe_width(model_width)}. "
        "Load the Stage C it was trained for (load_prior(..., variant='big' or 'lite'))"
    )


# --- tokens ------------------------------------------------------------------------------------------


def token_embedding(text_encoder: nn.Module) -> nn.Embedding:
    return text_encoder.get_input_embeddings()


def initial_token_rows(
    text_encoder: nn.Module, tokenizer, new_tokens: Sequence[NewToken]
) -> dict[str, torch.Tensor]:
    """Add ``new_tokens`` to the tokenizer the official way (each gets id = current vocabulary size)
    and return their initial embedding rows: the mean of the rows whose token matches the regex, or
    zeros when nothing matches (the official code warns and does the same). The text encoder is not
    changed: call :func:`append_token_rows` (inference) or train the rows."""
    weight = token_embedding(text_encoder).weight.detach()
    rows: dict[str, torch.Tensor] = {}
    for token, pattern in new_tokens:
        if token in tokenizer.get_vocab():
            raise LoraError(f"the tokenizer already has the token {token!r}: was this LoRA loaded twice?")
        tokenizer.add_tokens([token])
        new_id = tokenizer.convert_tokens_to_ids(token)
        if new_id != weight.shape[0] + len(rows):
            raise LoraError(
                f"{token!r} got id {new_id}, expected {weight.shape[0] + len(rows)}: the tokenizer and text encoder disagree"
            )
        rows[token] = _initial_row(weight, list(rows.values()), tokenizer, pattern)
    return rows


def _initial_row(
    weight: torch.Tensor, added: list[torch.Tensor], tokenizer, pattern: str | None
) -> torch.Tensor:
    all_rows = torch.cat([weight, *[r[None] for r in added]]) if added else weight
    if pattern is None:
        return torch.zeros_like(weight[0])
    ids = [i for t, i in tokenizer.get_vocab().items() if re.search(pattern, t) and i < all_rows.shape[0]]
    if not ids:
        warnings.warn(f"no token matches {pattern!r}: the new token starts from zeros", stacklevel=3)
        return torch.zeros_like(weight[0])
    return all_rows[sorted(ids)].mean(dim=0)


def append_token_rows(text_encoder: nn.Module, rows: Sequence[torch.Tensor]) -> None:
    """Grow the text encoder's vocabulary by ``rows`` (in order: ids old size, old size + 1, ...)."""
    if not rows:
        return
    old = token_embedding(text_encoder).weight.shape[0]
    text_encoder.resize_token_embeddings(old + len(rows), mean_resizing=False)
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        weight[old:] = torch.stack([r.to(weight.device, weight.dtype) for r in rows])


def _check_token_width(rows: torch.Tensor, text_encoder: nn.Module) -> None:
    width = token_embedding(text_encoder).weight.shape[1]
    if rows.shape[-1] != width:
        raise LoraError(
            f"the LoRA's token embeddings are {rows.shape[-1]} wide, this text encoder's are {width}: "
            "it was made for another text encoder (Stable Cascade's CLIP bigG is 1280 wide)"
        )


# --- the official format -----------------------------------------------------------------------------


def official_lora_layout(unet: nn.Module) -> list[tuple[str, ...]]:
    """For each official index ``i``, the diffusers modules ``weights.<i>`` acts on: the attention
    output (``to_out.0``), then q/k/v (the stacked in_proj), block after block."""
    from .upstream import SDCascadeAttnBlock

    layout: list[tuple[str, ...]] = []
    for name, module in unet.named_modules():
        if isinstance(module, SDCascadeAttnBlock):
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
    """The official ``weights.<i>`` as per-module factors for the diffusers UNet (q/k/v split)."""
    layout = official_lora_layout(unet)
    count = _official_count(state_dict)
    model_width = unet.config.block_out_channels[0]
    lora_width = state_dict["weights.0.lora_down"].shape[1] if count else model_width
    if count != len(layout) or lora_width != model_width:
        raise LoraError(
            f"this official LoRA has {count} layers of width {lora_width} ({count // 2} attention blocks), "
            f"the loaded Stage C has {len(layout) // 2} attention blocks of width {model_width}: "
            + _other_size_hint(lora_width, model_width)
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


def load_official_lora(
    unet: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    text_encoder: nn.Module | None = None,
    tokenizer=None,
    new_tokens: Sequence[NewToken] = (),
    *,
    strength: float = 1.0,
) -> None:
    """Apply an official-format LoRA (the dict ``safetensors.torch.load_file`` returns) in place.

    ``new_tokens`` are the bracketed entries of the official config's ``train_tokens``, in order, e.g.
    ``[("[fernando]", "^dog</w>")]``. With a text encoder and tokenizer, each is added and
    initialized as official training did, then the stored deltas are added at the stored indices;
    afterwards the UNet and the text encoder compute what the official model with this LoRA computes.
    """
    factors = official_factors(unet, state_dict)
    deltas = state_dict.get("embeddings.embeddings")
    indices = [int(i) for i in state_dict.get("embeddings.indices", torch.zeros(0)).tolist()]
    if (text_encoder is None) != (tokenizer is None):
        raise LoraError("pass both text_encoder and tokenizer (or neither, to apply the UNet part only)")
    if text_encoder is None:
        if new_tokens:
            raise LoraError(
                "new_tokens need the text encoder and tokenizer: pass text_encoder= and tokenizer="
            )
        if indices:
            warnings.warn(
                f"the LoRA also trained token embeddings (ids {indices}); without text_encoder/tokenizer they are "
                "not applied and prompts will not know its tokens",
                stacklevel=2,
            )
        apply_factors(unet, factors, strength)
        return
    _check_official_tokens(deltas, indices, text_encoder, new_tokens)
    apply_factors(unet, factors, strength)
    rows = initial_token_rows(text_encoder, tokenizer, new_tokens)
    append_token_rows(text_encoder, list(rows.values()))
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        for delta, index in zip(deltas, indices, strict=True):
            weight[index] += delta.to(weight.device, weight.dtype)  # in the weight's dtype, as ReToken adds


def _check_official_tokens(
    deltas, indices: list[int], text_encoder: nn.Module, new_tokens: Sequence[NewToken]
) -> None:
    if not indices:
        return
    _check_token_width(deltas, text_encoder)
    vocabulary = token_embedding(text_encoder).weight.shape[0]
    available = vocabulary + len(new_tokens)
    missing = [i for i in indices if i >= available]
    if missing:
        raise LoraError(
            f"the LoRA trained token id(s) {missing}, beyond this tokenizer's {vocabulary} tokens"
            + (f" plus the {len(new_tokens)} new one(s) given" if new_tokens else "")
            + ": it adds new tokens. Pass them in order as in the official config's train_tokens, e.g. "
            "new_tokens=[('[fernando]', '^dog</w>')]"
        )


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
    """Our per-module factors (diffusers names) → ComfyUI/kohya keys. ``prefix``: ``lora_prior_unet_``
    (ComfyUI, OneTrainer) or ``lora_unet_`` (kohya's sd-scripts; ComfyUI reads it too)."""
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
    """ComfyUI/kohya keys → (UNet factors, text-encoder factors) in diffusers / transformers names."""
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
    """Our format: tensors and safetensors metadata (strings)."""
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
    """Write a LoRA (and learned token embeddings, full rows) in our format."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, metadata = lora_state_dict(unet_factors, tokens)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


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
    the highest token id (the new token), so results there differ somewhat."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in comfyui_state_dict(unet_factors, prefix).items()}
    save_file(state, str(path))
    written = [path]
    for token, row in (tokens or {}).items():
        embedding = path.parent / f"{path.stem}_embeddings" / f"{token.strip('[]<>')}.safetensors"
        embedding.parent.mkdir(parents=True, exist_ok=True)
        save_file({"clip_g": row.detach().float().cpu().reshape(1, -1).contiguous()}, str(embedding))
        written.append(embedding)
    return written


def _our_factors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraFactors]:
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


# --- any format, onto a prior ------------------------------------------------------------------------


def detect_format(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """'official', 'comfyui' (ComfyUI / kohya / OneTrainer keys) or 'cascade_helpers' (ours)."""
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


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with clear errors for a missing, cut or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == files.LORA_FERNANDO.name:
            hint = f" Fetch the official example with:\n  {files.download_command([files.LORA_FERNANDO])}"
        raise FileNotFoundError(f"no LoRA file at {path}.{hint}")
    try:
        read_header(path)
    except TruncatedCheckpointError as error:
        raise TruncatedCheckpointError(f"{error}. Download or copy the LoRA again.") from None
    except CheckpointError as error:
        raise LoraError(f"{error}: LoRA files must be .safetensors") from None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def load_lora(
    prior,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strength: float = 1.0,
    new_tokens: Sequence[NewToken] = (),
) -> LoadedLora:
    """Apply a LoRA file (or state dict) in any of the three formats to a loaded prior: UNet
    modules, text-encoder modules and new tokens. ``new_tokens`` is needed for official files only
    (they store deltas, not the tokens): e.g. ``[("[fernando]", "^dog</w>")]`` for the example."""
    for model in (prior.unet, prior.text_encoder):
        _refuse_streamed(model)
    if isinstance(source, Mapping):
        state_dict, metadata = dict(source), {}
    else:
        state_dict, metadata = read_lora_file(source)
    kind = detect_format(state_dict, metadata)
    if kind == "official":
        load_official_lora(
            prior.unet, state_dict, prior.text_encoder, prior.tokenizer, new_tokens, strength=strength
        )
        tokens = tuple(t for t, _ in new_tokens)
        return LoadedLora(kind, len(lora_layers(prior.unet)), 0, tokens, strength)
    if new_tokens:
        raise LoraError(f"new_tokens is for official-format files; this {kind} file carries its own tokens")
    if kind == "comfyui":
        unet_factors, te_factors = comfyui_factors(state_dict, prior.unet, prior.text_encoder)
        tokens: dict[str, torch.Tensor] = {}
    else:
        unet_factors, te_factors = _our_factors(state_dict), {}
        names = json.loads(metadata.get("tokens", "[]"))
        rows = state_dict.get("tokens.embeddings", torch.zeros(0, 0))
        if len(names) != rows.shape[0]:
            raise LoraError(
                f"the file names {len(names)} tokens but holds {rows.shape[0]} embeddings: it is damaged"
            )
        tokens = dict(zip(names, rows, strict=True))
        if tokens:
            _check_token_width(rows, prior.text_encoder)
    apply_factors(prior.unet, unet_factors, strength)
    apply_factors(prior.text_encoder, te_factors, strength)
    add_tokens(prior, tokens)
    return LoadedLora(kind, len(unet_factors), len(te_factors), tuple(tokens), strength)


def add_tokens(prior, tokens: Mapping[str, torch.Tensor]) -> None:
    """Teach the prior's tokenizer and text encoder new tokens with given embedding rows."""
    for token in tokens:
        if token in prior.tokenizer.get_vocab():
            raise LoraError(f"the tokenizer already has the token {token!r}: was this LoRA loaded twice?")
    prior.tokenizer.add_tokens(list(tokens))
    append_token_rows(prior.text_encoder, list(tokens.values()))


def load_comfyui_embedding(prior, path: str | Path, token: str) -> None:
    """Add a one-vector ComfyUI / A1111 textual-inversion embedding (key ``clip_g``, or a file with a
    single tensor) as the new token ``token``."""
    state, _ = read_lora_file(path)
    rows = state.get("clip_g", next(iter(state.values())) if len(state) == 1 else None)
    if rows is None or rows.dim() != 2 or rows.shape[0] != 1:
        raise LoraError(f"{path} is not a one-vector embedding with a 'clip_g' key (keys: {list(state)[:3]})")
    _check_token_width(rows, prior.text_encoder)
    add_tokens(prior, {token: rows[0]})
