"""The sampling loop for Stage C and Stage B, with the official maths by default.

Every sampler but ``"diffusers"`` runs on the official schedule (a cosine logSNR schedule that ``shift``
moves: + 2·log(1/shift), clamped), conditions the model on the cosine time of each logSNR, and guides
as the official code does (classifier-free guidance, then the ``cfg_rho`` rescale toward the conditional
prediction's std); they differ in the step (:class:`StageSettings`). ``"dpmpp_2m"`` (Lu et al. 2022)
returns the last sample over its signal scale (k-diffusion's convention), the others the last denoised
estimate. The official loop's pieces are public so a notebook can write it out: :func:`schedule`,
:func:`noise_condition`, :func:`classifier_free_guidance`, :func:`predict_clean`, :func:`ddpm_step`.
Nothing here knows ControlNets: list inputs (``cnet``) are joined for the guidance batch like any other.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from tqdm.auto import tqdm

from . import values

_S = 0.008  # offset of the cosine schedule (Nichol & Dhariwal), as in the official code
_VAR_RANGE = (1e-4, 0.9999)  # the official schedule clamps the signal variance to this range
_MIN_VAR = math.cos(_S / (1 + _S) * math.pi / 2) ** 2

Denoiser = Callable[..., torch.Tensor]
#: a conditioning input: a tensor, or a list of optional tensors (ControlNet features, ``cnet``)
_Input = torch.Tensor | Sequence[torch.Tensor | None]
#: called after every step with (step index, denoised estimate, current sample)
_StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

_SAMPLERS = ("official", "ddim", "dpmpp_2m", "diffusers")


@dataclass(frozen=True)
class StageSettings:
    """How one stage is sampled, checked on construction: a NaN guidance would otherwise give black
    pictures without a word, an unknown sampler name run another sampler than the saved settings claim.

    Attributes:
        steps: denoising steps, 1 to 1000 (official: 20 for Stage C, 10 for Stage B).
        guidance: classifier-free guidance scale, ≥ 0; ≤ 1 is off (official: 4 Stage C, 1.1 Stage B).
        shift: > 0; moves the schedule toward noise (official: 2 for Stage C, 1 for Stage B).
        guidance_rescale: the official ``cfg_rho``, 0 to 1 (official: 0.7 for both).
        sampler: "official" (gdf's DDPM), "ddim" (gdf's DDIM), "dpmpp_2m" (DPM-Solver++(2M)) or "diffusers".
        t_start: the starting noise level in (0, 1]; 1 is pure noise, < 1 a partly noised latent.
        eta: the "ddim" sampler's share of fresh noise per step, 0 (deterministic) to 1 (= "official").
    """

    steps: int
    guidance: float
    shift: float = 1.0
    guidance_rescale: float = 0.0
    sampler: Literal["official", "ddim", "dpmpp_2m", "diffusers"] = "official"
    t_start: float = 1.0
    eta: float = 0.0

    def __post_init__(self) -> None:
        values._whole(self.steps, "steps", 1, 1000)
        values._at_least(
            self.guidance, "guidance", 0.0, "≤ 1 turns guidance off; the official Stage C uses 4"
        )
        values._at_least(
            self.shift,
            "shift",
            0.0,
            "1 leaves the schedule as it is; the official Stage C uses 2",
            strict=True,
        )
        values._fraction(self.guidance_rescale, "guidance_rescale", "the official cfg_rho, 0.7")
        t_start = values._finite(self.t_start, "t_start", "the starting noise level, in (0, 1]")
        if not 0.0 < t_start <= 1.0:
            raise ValueError(f"t_start (the starting noise level) must be in (0, 1], not {self.t_start}")
        _check_sampler(self.sampler, self.shift, self.guidance_rescale, self.eta)
        set_ = object.__setattr__  # a frozen dataclass normalizing its own fields (numpy numbers → Python)
        set_(self, "steps", int(self.steps))
        for name in ("guidance", "shift", "guidance_rescale", "t_start", "eta"):
            set_(self, name, float(getattr(self, name)))

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def with_(self, **changes) -> StageSettings:
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """The settings as plain values (PNG metadata); ``StageSettings(**d)`` rebuilds them."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_sampler(sampler: object, shift: float, guidance_rescale: float, eta: object) -> None:
    """An unknown sampler, or an option it has not got, would silently run another than the PNGs claim."""
    if sampler not in _SAMPLERS:
        close = difflib.get_close_matches(str(sampler).lower(), _SAMPLERS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sampler {sampler!r}{hint}: use one of {', '.join(map(repr, _SAMPLERS))}")
    if sampler == "diffusers" and (shift != 1.0 or guidance_rescale != 0.0):
        raise ValueError(
            "the diffusers sampler has neither shift nor guidance rescale: set shift=1, guidance_rescale=0"
        )
    values._fraction(eta, "eta", "the ddim sampler's fresh noise per step: 0 deterministic, 1 = DDPM")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} is an option of sampler='ddim' only, not of {sampler!r}: leave eta at 0")


# The official notebooks' settings, and what diffusers' documentation uses.
OFFICIAL_PRIOR = StageSettings(steps=20, guidance=4.0, shift=2.0, guidance_rescale=0.7)
OFFICIAL_DECODER = StageSettings(steps=10, guidance=1.1, shift=1.0, guidance_rescale=0.7)
DIFFUSERS_PRIOR = StageSettings(steps=20, guidance=4.0, sampler="diffusers")
DIFFUSERS_DECODER = StageSettings(steps=10, guidance=0.0, sampler="diffusers")


def _unshifted_log_snr(t: torch.Tensor) -> torch.Tensor:
    """The official ``CosineSchedule``'s logSNR before any shift: :func:`log_snr` moves and clamps it."""
    var = (torch.cos((t + _S) / (1 + _S) * math.pi / 2).clamp(0, 1) ** 2 / _MIN_VAR).clamp(*_VAR_RANGE)
    return torch.log(var / (1 - var))


_LOG_SNR_RANGE = (float(_unshifted_log_snr(torch.tensor(1.0))), float(_unshifted_log_snr(torch.tensor(0.0))))


def log_snr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """logSNR at diffusion time ``t`` ∈ [0, 1] (1 = pure noise); ``shift`` > 1 spends more steps at high
    noise (− 2·log(shift), clamped to the unshifted range).

    Args:
        t, shift: times of any shape; 1 leaves the cosine schedule as it is (official: 2 Stage C, 1 Stage B).

    Returns:
        The logSNR, float32, shaped like ``t``.
    """
    value = _unshifted_log_snr(t.float().clamp(0, 1))
    if shift != 1:
        value = value + 2 * math.log(1 / shift)
    return value.clamp(*_LOG_SNR_RANGE)


def noise_condition(log_snr_value: torch.Tensor) -> torch.Tensor:
    """The timestep ratio the models are conditioned on: the cosine time that gives this logSNR."""
    var = log_snr_value.sigmoid().clamp(0, 1)
    return torch.acos((var * _MIN_VAR).sqrt()) / (math.pi / 2) * (1 + _S) - _S


def _signal_noise_scales(log_snr_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``VPScaler``: variance-preserving scales (a, b) with x_t = a·x0 + b·noise."""
    a2 = log_snr_value.sigmoid()
    return a2.sqrt(), (1 - a2).sqrt()


def diffuse(
    x0: torch.Tensor, t: float | torch.Tensor, noise: torch.Tensor, shift: float = 1.0
) -> torch.Tensor:
    """Noise clean latents to time ``t`` the way the official training and image-to-image do.

    Args:
        x0, noise: the clean latents (B×C×h×w) and Gaussian noise of their shape.
        t: one time for all, or one per latent (a B tensor), in [0, 1].
        shift: the schedule's shift; 1 (unshifted) is what official image-to-image and training use.

    Returns:
        a·x0 + b·noise at that time's logSNR.
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    per_latent = (-1, *[1] * (x0.dim() - 1))  # one time per latent, broadcast over C×h×w
    a, b = (scale.reshape(per_latent) for scale in _signal_noise_scales(log_snr(t, shift)))
    return a * x0 + b * noise


def schedule(settings: StageSettings) -> torch.Tensor:
    """The logSNR at each of the ``settings.steps + 1`` times from ``t_start`` down to 0, evenly spaced
    in time and moved by ``settings.shift``: step ``i`` goes from ``schedule[i]`` to ``schedule[i + 1]``."""
    return log_snr(torch.linspace(settings.t_start, 0.0, settings.steps + 1), settings.shift)


def predict_clean(x: torch.Tensor, eps: torch.Tensor, log_snr_value: torch.Tensor) -> torch.Tensor:
    """The denoised estimate x0 = (x − b·eps) / a that a noise prediction implies at this logSNR.

    Args:
        x, eps, log_snr_value: the current sample, its (guided) noise prediction, its logSNR.

    Returns:
        The denoised estimate, shaped like ``x``.
    """
    a, b = _signal_noise_scales(log_snr_value)
    return (x - eps * b) / a


def ddpm_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    log_snr_now: torch.Tensor,
    log_snr_next: torch.Tensor,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """One official DDIM step from logSNR ``now`` to ``next``, with a share ``eta`` of fresh noise drawn
    on the CPU: ``eta`` = 1 is the official DDPM step (the default sampler), 0 deterministic DDIM.

    Args:
        x, x0, eps: the current sample, its denoised estimate (:func:`predict_clean`), the noise prediction.
        log_snr_now, log_snr_next: ``schedule[i]`` and ``schedule[i + 1]``.
        generator, eta: the noise's CPU generator (None: torch's global one), and 0 to 1.

    Returns:
        The next sample, on ``x``'s device.
    """
    a, b = _signal_noise_scales(log_snr_now)
    a_next, b_next = _signal_noise_scales(log_snr_next)
    sigma = eta * (b_next**2 / b**2).sqrt() * (1 - a**2 / a_next**2).sqrt()
    x_next = a_next * x0 + (b_next**2 - sigma**2).sqrt() * eps
    if eta == 0:
        return x_next
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x_next + sigma * noise


def training_times(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random diffusion times for a training batch as the official ``CosineSchedule`` draws them:
    ``(1 - U[0, 1)) + 0.001``, clamped to [0.001, 1] (never exactly clean).

    Args:
        batch, generator: B, and a CPU random generator (None: torch's global one).

    Returns:
        B times, float32, on the CPU.
    """
    uniform = torch.rand(batch, generator=generator)
    return (1 - uniform).add(0.001).clamp(0.001, 1.0)


def p2_loss_weight(log_snr_value: torch.Tensor) -> torch.Tensor:
    """The official ``P2LossWeight()`` (k=1, γ=1, s=1): 1 / (1 + SNR). Noisy steps count fully,
    nearly clean ones hardly at all."""
    return 1.0 / (1.0 + log_snr_value.exp())


def _cat(cond: _Input | None, uncond: _Input | None) -> _Input | None:
    """The official sampler's doubled guidance batch: lists (ControlNet features) entry by entry."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([cond, uncond])
    if cond is None or uncond is None:
        return None
    both = zip(cond, uncond, strict=True)
    return [torch.cat([c, u]) if c is not None and u is not None else None for c, u in both]


def _guided(
    denoiser: Denoiser,
    cond: Mapping[str, _Input],
    uncond: Mapping[str, _Input] | None,
    settings: StageSettings,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The float32 noise prediction ``predict(x, r)`` every sampler steps with, guided as officially."""
    if not settings.guided:
        return lambda x, r: denoiser(x, r, **cond).float()
    doubled = {k: _cat(cond[k], uncond[k]) for k in cond}

    def predict(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        pred, pred_uncond = denoiser(torch.cat([x, x]), torch.cat([r, r]), **doubled).chunk(2)
        guided = classifier_free_guidance(pred, pred_uncond, settings.guidance, settings.guidance_rescale)
        return guided.float()

    return predict


def classifier_free_guidance(
    pred: torch.Tensor, pred_uncond: torch.Tensor, guidance: float, rescale: float = 0.0
) -> torch.Tensor:
    """Push the conditional prediction away from the unconditional one (``guidance`` × the difference),
    then with ``rescale`` > 0 pull it back toward the conditional prediction's std (the official
    ``cfg_rho``, std over the whole batch): strong guidance otherwise burns the colours.

    Args:
        pred, pred_uncond: the conditional and unconditional predictions.
        guidance, rescale: 1 returns ``pred`` (official: 4 Stage C, 1.1 Stage B); 0 to 1 (official 0.7).

    Returns:
        The guided prediction.
    """
    guided = torch.lerp(pred_uncond, pred, guidance)
    if rescale > 0:
        rescaled = guided * (pred.std() / (guided.std() + 1e-9))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Gaussian noise drawn on the CPU, so a seed gives the same picture on every device.

    Args:
        shape, generator, device: the latents' shape, a CPU generator (None: the global one), its target.

    Returns:
        float32 noise on ``device``.
    """
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def _sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor] | None,
    settings: StageSettings,
    device: torch.device,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    callback: _StepCallback | None = None,
    progress: bool | str = True,
) -> torch.Tensor:
    """The loop both stages share, so every sampler gets the same guidance, progress bar and callback."""
    if settings.guided and uncond is None:
        raise ValueError("guidance needs unconditional inputs")
    if callback is not None and not callable(callback):  # else it fails only after the first step
        raise TypeError(f"callback must be callable as callback(step, denoised, sample), not {callback!r}")
    predict = _guided(denoiser, cond, uncond, settings)
    x = initial_noise(shape, generator, device) if x_init is None else x_init.float().to(device)
    desc = progress if isinstance(progress, str) else None
    bar = tqdm(range(settings.steps), desc=desc, disable=progress is False, leave=False)
    steps = _STEPPERS[settings.sampler](predict, x, settings, generator)
    for i in bar:
        denoised, current, result = next(steps)
        if callback is not None:
            callback(i, denoised, current)
    return result


def _ddim(predict, x, settings, generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The official gdf loop (DDPM = DDIM with eta 1): (denoised, sample, result) after each step."""
    eta = 1.0 if settings.sampler == "official" else settings.eta
    log_snrs = schedule(settings).to(x.device)
    for i in range(settings.steps):
        eps = predict(x, noise_condition(log_snrs[i]).expand(x.shape[0]))
        x0 = predict_clean(x, eps, log_snrs[i])
        x = ddpm_step(x, x0, eps, log_snrs[i], log_snrs[i + 1], generator, eta)
        yield x0, x, x0


def _dpmpp_2m(predict, x, settings, generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """DPM-Solver++(2M), variance-preserving (x = a·x0 + b·noise, λ = logSNR / 2): each step extrapolates
    x0 from this step's and the previous one's (the first is first order); deterministic."""
    log_snrs = schedule(settings).to(x.device)
    half = log_snrs / 2
    previous = None
    for i in range(settings.steps):
        eps = predict(x, noise_condition(log_snrs[i]).expand(x.shape[0]))
        x0 = predict_clean(x, eps, log_snrs[i])
        h = half[i + 1] - half[i]
        target = x0
        if previous is not None:
            r = (half[i] - half[i - 1]) / h
            target = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        (_, b), (a_next, b_next) = _signal_noise_scales(log_snrs[i]), _signal_noise_scales(log_snrs[i + 1])
        x = (b_next / b) * x - a_next * torch.expm1(-h) * target
        previous = x0
        yield x0, x, x / a_next


def _diffusers(predict, x, settings, generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """diffusers' ``DDPMWuerstchenScheduler`` on the plain times (no shift, no rescale: checked)."""
    from .upstream import DDPMWuerstchenScheduler

    scheduler = DDPMWuerstchenScheduler()
    times = torch.linspace(settings.t_start, 0.0, settings.steps + 1)
    scheduler.set_timesteps(timesteps=times.tolist(), device=x.device)
    for i in range(settings.steps):
        r = scheduler.timesteps[i].expand(x.shape[0])
        x = scheduler.step(predict(x, r), r, x, generator=generator).prev_sample
        yield x, x, x


_STEPPERS = {"official": _ddim, "ddim": _ddim, "dpmpp_2m": _dpmpp_2m, "diffusers": _diffusers}


def unet_denoiser(unet: torch.nn.Module, dtype: torch.dtype) -> Denoiser:
    """A diffusers ``StableCascadeUNet`` as ``denoiser(x, r, **inputs)``: inputs in the model's dtype,
    the noise prediction back in float32.

    Args:
        unet, dtype: Stage C's or Stage B's UNet and the dtype it was loaded in.

    Returns:
        The denoiser the stages sample with.
    """

    def denoise(x: torch.Tensor, r: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = {k: v.to(dtype) for k, v in inputs.items()}
        return unet(x.to(dtype), r.to(dtype), return_dict=False, **inputs)[0].float()

    return denoise
