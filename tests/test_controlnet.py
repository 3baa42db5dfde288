"""The ControlNet: official parameter layout and outputs, injection into diffusers' UNet, the doubled
guidance batch, loading checks, filters and masks.

``fixtures/official_controlnet.json`` was recorded from the official modules (``modules/controlnet.py``,
``modules/stage_c.py``) for the deterministic weights made by :func:`_deterministic` below.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from cascade_helpers.checkpoints import _official_shapes, _TruncatedCheckpointError, _WrongCheckpointError
from cascade_helpers.controlnet.filters import (
    _canny_edges,
    control_features,
    control_input,
    outpainting_canvas,
)
from cascade_helpers.controlnet.kinds import CONTROLNET_TYPES, load_controlnet
from cascade_helpers.controlnet.model import ControlNet, inject_controlnet, resblock_order
from cascade_helpers.file_checks import MissingModelFileError
from cascade_helpers.loading import _load_unet
from cascade_helpers.sampling import StageSettings
from cascade_helpers.tiny import _write_controlnets, _write_unet
from tests.sparse import write_sparse_checkpoint

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official_controlnet.json").read_text())
OFFICIAL_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # configs/inference/controlnet_c_3b_*.yaml
FOUR_BLOCKS = (0, 2, 5, 7)  # of the tiny Stage C's 8 ResBlocks: the fixture's recordings
TINY_FED = [0, 4]  # the official blocks the tiny Stage C has: what its ControlNets feed
OFFICIAL_CONFIGS = {
    "canny": dict(c_in=1, c_proj=2048, proj_blocks=OFFICIAL_BLOCKS),
    "inpainting": dict(c_in=4, c_proj=2048, proj_blocks=OFFICIAL_BLOCKS),
    "super_resolution": dict(c_in=16, c_proj=2048, proj_blocks=OFFICIAL_BLOCKS, bottleneck_mode="large"),
    "effnet_rgb": dict(c_in=3, c_proj=2048, proj_blocks=OFFICIAL_BLOCKS),
}
OUTPUT_CASES = {
    "effnet_c1": dict(c_in=1, c_proj=32, proj_blocks=FOUR_BLOCKS),
    "effnet_c3": dict(c_in=3, c_proj=32, proj_blocks=[1, 3]),
    "effnet_c4": dict(c_in=4, c_proj=32, proj_blocks=FOUR_BLOCKS),
    "large_c16": dict(c_in=16, c_proj=32, proj_blocks=FOUR_BLOCKS, bottleneck_mode="large"),  # official size
}


def _digest(shapes: dict[str, tuple[int, ...]]) -> str:
    return hashlib.sha256("\n".join(f"{k} {list(v)}" for k, v in sorted(shapes.items())).encode()).hexdigest()


def _deterministic(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key i in sorted order from seed i: randn / sqrt(fan-in); running_var = rand + 0.5; integers kept."""
    weights = {}
    for i, (key, like) in enumerate(sorted(shapes.items())):
        generator = torch.Generator().manual_seed(i)
        if not like.is_floating_point():
            weights[key] = torch.zeros(like.shape, dtype=like.dtype)
        elif "running_var" in key:
            weights[key] = torch.rand(like.shape, generator=generator) + 0.5
        else:
            weights[key] = torch.randn(like.shape, generator=generator) / max(1, like[0].numel()) ** 0.5
    return weights


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _values(entry: dict) -> torch.Tensor:
    return torch.tensor(entry["values"]).reshape(entry["shape"])


# --- the module ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFICIAL_CONFIGS)
def test_state_dict_is_the_official_one(name):
    """Same key names and shapes as the official module: the released files load strictly."""
    with init_empty_weights(include_buffers=False):
        model = ControlNet(**OFFICIAL_CONFIGS[name])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = FIXTURE["state_dicts"][name]
    assert (len(shapes), _digest(shapes)) == (expected["keys"], expected["sha256"])
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]


@pytest.mark.parametrize("name", OUTPUT_CASES)
@torch.no_grad()
def test_outputs_equal_the_official_module(name):
    """Both released bottlenecks (EfficientNet with 1, 3 and 4 input channels: the replaced stem has no
    padding; 'large' at its official size) give the official outputs for the same weights."""
    with init_empty_weights(include_buffers=False):
        model = ControlNet(**OUTPUT_CASES[name])
    model.load_state_dict(_deterministic(model.state_dict()), strict=True, assign=True)
    case = FIXTURE["outputs"][name]
    outputs = model.eval()(_randn(case["input_seed"], *case["input_shape"]))
    assert len(outputs) == len(case["outputs"])
    for got, expected in zip(outputs, case["outputs"], strict=True):
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got, _values(expected), rtol=1e-4, atol=1e-5)


def test_torchvision_weights_are_never_downloaded(monkeypatch, no_network):
    def refuse(*args, **kwargs):
        raise AssertionError("torchvision tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    for c_in in (1, 3, 4):
        ControlNet(c_in=c_in, c_proj=8, proj_blocks=[0])


# --- injection ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """The tiny Stage C with the fixture's deterministic weights, through our official-file loader."""
    path = tmp_path_factory.mktemp("unet") / "stage_c.safetensors"
    shapes = {k: torch.empty(v) for k, v in _official_shapes("stage_c", "tiny").items()}
    save_file(_deterministic(shapes), str(path))
    return _load_unet(path, "stage_c", "tiny", torch.float32)


def _run_unet(unet, control=None):
    x, text, pooled, image = (
        _randn(300, 1, 16, 4, 4),
        _randn(301, 1, 77, 32),
        _randn(302, 1, 1, 32),
        _randn(303, 1, 1, 24),
    )
    r = torch.tensor([0.7])
    if control is None:
        return unet(x, r, pooled, clip_text=text, clip_img=image).sample
    with inject_controlnet(unet, control):
        return unet(x, r, pooled, clip_text=text, clip_img=image).sample


def _official_controls(blocks) -> list[torch.Tensor | None]:
    return [_randn(400 + i, 1, 32, 3, 3) if i in blocks else None for i in range(8)]


@torch.no_grad()
@pytest.mark.parametrize("block", range(8))
def test_each_block_gets_the_official_block_number(tiny_unet, block):
    """A control at position i lands where the official Stage C adds ``cnet[i]`` (3×3 controls
    resized bilinearly to the 4×4 blocks, down path then up path)."""
    expected = torch.tensor(FIXTURE["stage_c_injection"][f"only_{block}"]).reshape(1, 16, 4, 4)
    torch.testing.assert_close(
        _run_unet(tiny_unet, _official_controls([block])), expected, rtol=1e-4, atol=1e-5
    )


@torch.no_grad()
def test_a_list_of_controls_and_a_shorter_list_match_the_official_model(tiny_unet):
    injection = FIXTURE["stage_c_injection"]
    controls = _official_controls(FOUR_BLOCKS)
    for name, control in (("tiny_blocks", controls), ("short_list", controls[:3])):
        expected = torch.tensor(injection[name]).reshape(1, 16, 4, 4)
        torch.testing.assert_close(_run_unet(tiny_unet, control), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_run_unet(tiny_unet), torch.tensor(injection["none"]).reshape(1, 16, 4, 4))


@torch.no_grad()
def test_zero_projections_leave_the_output_unchanged(tiny_unet):
    """A fresh ControlNet (the official init zeroes its output projections) changes nothing, bit for bit."""
    controlnet = ControlNet(c_in=1, c_proj=32, proj_blocks=FOUR_BLOCKS).eval()
    features = controlnet(torch.rand(1, 1, 64, 64))
    assert all(f is None or not f.any() for f in features)
    assert torch.equal(_run_unet(tiny_unet, features), _run_unet(tiny_unet))
    assert torch.equal(_run_unet(tiny_unet, []), _run_unet(tiny_unet))


def test_the_big_stage_c_numbering():
    """Independent of our code: the official Stage C has blocks [[8, 24], [24, 8]] of 'CTA' triples, so
    ResBlocks 0-7 are in down level 0, 8-31 in down level 1, 32-55 in up level 1, 56-63 in up level 0."""
    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import StableCascadeUNet

    with init_empty_weights():
        unet = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir("stage_c", "big")))
    names = {module: name for name, module in unet.named_modules()}
    order = [names[block] for block in resblock_order(unet)]
    assert len(order) == 64
    expected = {0: "down_blocks.0.0", 7: "down_blocks.0.21", 8: "down_blocks.1.0", 31: "down_blocks.1.69"}
    expected |= {32: "up_blocks.0.0", 55: "up_blocks.0.69", 56: "up_blocks.1.0", 63: "up_blocks.1.21"}
    assert {i: order[i] for i in expected} == expected
    assert [order[i] for i in OFFICIAL_BLOCKS][4:] == [
        "up_blocks.0.57",
        "up_blocks.0.69",
        "up_blocks.1.9",
        "up_blocks.1.21",
    ]


def _hooks(unet) -> int:
    return sum(len(m._forward_pre_hooks) for m in unet.modules())


@torch.no_grad()
def test_the_unet_is_restored_even_when_the_call_raises(tiny_unet):
    before, reference = _hooks(tiny_unet), _run_unet(tiny_unet)
    with pytest.raises(RuntimeError, match="boom"), inject_controlnet(tiny_unet, _official_controls([0])):
        raise RuntimeError("boom")
    wrong_batch = [_randn(1, 3, 32, 4, 4)]  # 3 pictures for a batch of 1
    with pytest.raises(ValueError, match="doubles the batch"):
        _run_unet(tiny_unet, wrong_batch)
    assert _hooks(tiny_unet) == before
    assert torch.equal(_run_unet(tiny_unet), reference)


def test_controls_that_do_not_fit_the_unet_are_refused(tiny_unet):
    with (
        pytest.raises(ValueError, match="has 8 ResBlocks"),
        inject_controlnet(tiny_unet, [None] * 8 + [torch.zeros(1, 32, 2, 2)]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="big Stage C"),
        inject_controlnet(tiny_unet, [torch.zeros(1, 2048, 2, 2)]),
    ):
        pass


def test_gradient_checkpointing_reruns_blocks_with_the_same_control(tiny_unet):
    """Checkpointing runs each ResBlock again during backward: it must get the same control again."""
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny_unet.enable_gradient_checkpointing()
        controls = [
            c.clone().requires_grad_() if c is not None else None for c in _official_controls(FOUR_BLOCKS)
        ]
        try:
            with (
                torch.enable_grad(),
                inject_controlnet(tiny_unet, controls),
            ):  # backward inside: it reruns blocks
                output = _run_unet(tiny_unet)
                output.square().sum().backward()
        finally:
            tiny_unet.disable_gradient_checkpointing()
        results.append((output.detach(), [c.grad for c in controls if c is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a)


# --- guidance: the doubled batch ----------------------------------------------------------------------


@torch.no_grad()
def test_guided_step_with_controls_equals_the_official_sampler(tiny_unet):
    """One step of our sampler, the control features in both halves of the doubled guidance batch,
    gives the official gdf sampler's denoised estimate (guidance 4, rescale 0.7, shift 2)."""
    from cascade_helpers.controlnet.model import _controlled_denoiser
    from cascade_helpers.sampling import _sample

    cond = {
        "clip_text": _randn(500, 2, 77, 32),
        "clip_text_pooled": _randn(501, 2, 1, 32),
        "clip_img": _randn(502, 2, 1, 24),
    }
    uncond = {
        "clip_text": _randn(503, 2, 77, 32),
        "clip_text_pooled": _randn(504, 2, 1, 32),
        "clip_img": torch.zeros(2, 1, 24),
    }
    cond["cnet"] = uncond["cnet"] = [
        _randn(510 + i, 2, 32, 3, 3) if i in FOUR_BLOCKS else None for i in range(8)
    ]
    x_init = _randn(520, 2, 16, 4, 4)
    settings = StageSettings(steps=1, guidance=4.0, shift=2.0, guidance_rescale=0.7)
    denoiser = _controlled_denoiser(tiny_unet, torch.float32)
    x0 = _sample(
        denoiser,
        x_init.shape,
        cond,
        uncond,
        settings,
        device=torch.device("cpu"),
        x_init=x_init,
        progress=False,
    )
    expected = torch.tensor(FIXTURE["stage_c_injection"]["gdf_first_step_x0"]).reshape(x0.shape)
    torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-3)  # x0 = (x - b·eps) / a, a = 0.01 at t = 1
    without = _sample(
        denoiser,
        x_init.shape,
        {**cond, "cnet": None},
        {**uncond, "cnet": None},
        settings,
        device=torch.device("cpu"),
        x_init=x_init,
        progress=False,
    )
    assert not torch.allclose(x0, without, atol=1e-2)


def test_list_inputs_are_joined_per_block_like_gdf():
    from cascade_helpers.sampling import _cat

    a, b = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    joined = _cat([a, None, a], [b, b, None])
    assert torch.equal(joined[0], torch.cat([a, b])) and joined[1] is None and joined[2] is None
    assert _cat(None, None) is None


# --- loading ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("controlnets")
    _write_controlnets(folder, "bf16")
    return folder


@pytest.mark.parametrize("name", ["canny", "inpainting", "super_resolution"])
def test_released_types_load_strictly_in_the_priors_dtype(controlnet_dir, tiny_pipeline, name):
    from safetensors.torch import load_file

    prior, _ = tiny_pipeline
    model = load_controlnet(controlnet_dir, name, prior)
    assert model.proj_blocks == TINY_FED
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    saved = load_file(str(controlnet_dir / CONTROLNET_TYPES[name].file.path))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert [k for k in saved if not torch.equal(state[k], saved[k].to(state[k].dtype))] == []


def test_fp32_files_load_too(tmp_path, tiny_pipeline, controlnet_dir):
    from safetensors.torch import load_file

    prior, _ = tiny_pipeline
    saved = load_file(str(controlnet_dir / "controlnet" / "canny.safetensors"))
    path = tmp_path / "canny.safetensors"
    save_file({k: v.float() if v.is_floating_point() else v for k, v in saved.items()}, str(path))
    model = load_controlnet(path, "canny", prior)
    assert torch.equal(model.backbone[0][0].weight, saved["backbone.0.0.weight"].float())


def test_a_file_of_another_type_says_which_type_it_is(controlnet_dir, tiny_pipeline):
    prior, _ = tiny_pipeline
    with pytest.raises(_WrongCheckpointError, match="holds the canny ControlNet"):
        load_controlnet(controlnet_dir / "controlnet" / "canny.safetensors", "inpainting", prior)
    with pytest.raises(_WrongCheckpointError, match="holds the super_resolution ControlNet"):
        load_controlnet(controlnet_dir / "controlnet" / "super_resolution.safetensors", "canny", prior)


def test_a_stage_c_file_is_named_as_such(tmp_path, tiny_pipeline):
    prior, _ = tiny_pipeline
    path = _write_unet(tmp_path, "stage_c", "big", "bf16")
    with pytest.raises(_WrongCheckpointError, match="Stage C"):
        load_controlnet(path, "canny", prior)


def test_lite_stage_c_is_told_the_controlnets_need_the_big_one(tmp_path, tiny_pipeline):
    """The released (full-size) canny file against a lite Stage C: a clear message, no size mismatch."""
    from dataclasses import replace

    from cascade_helpers.checkpoints import config_dir
    from cascade_helpers.upstream import StableCascadeUNet

    with init_empty_weights():
        lite = StableCascadeUNet.from_config(StableCascadeUNet.load_config(config_dir("stage_c", "lite")))
    prior = replace(tiny_pipeline[0], unet=lite, architecture="lite")
    with init_empty_weights(include_buffers=False):
        shapes = {k: tuple(v.shape) for k, v in ControlNet(1, 2048, OFFICIAL_BLOCKS).state_dict().items()}
    path = write_sparse_checkpoint(tmp_path / "controlnet" / "canny.safetensors", shapes, "F32")
    with pytest.raises(_WrongCheckpointError, match=r"lite.*big Stage C"):
        load_controlnet(tmp_path, "canny", prior)
    assert path.stat().st_size > 200_000_000  # the header of the real 218 MB file, no data written


def test_missing_and_truncated_files_say_what_to_run(tmp_path, tiny_pipeline, controlnet_dir):
    prior, _ = tiny_pipeline
    with pytest.raises(MissingModelFileError, match="download_models.sh controlnet"):
        load_controlnet(tmp_path, "canny", prior)
    cut = tmp_path / "controlnet" / "super_resolution.safetensors"
    cut.parent.mkdir()
    with (controlnet_dir / "controlnet" / "super_resolution.safetensors").open("rb") as whole:
        cut.write_bytes(whole.read(5000))
    with pytest.raises(_TruncatedCheckpointError, match="download_models.sh controlnet"):
        load_controlnet(tmp_path, "super_resolution", prior)


def test_face_identity_was_never_released(tiny_pipeline):
    with pytest.raises(ValueError, match="never published.*Released: canny, inpainting, super_resolution"):
        load_controlnet("models", "face_identity", tiny_pipeline[0])
    with pytest.raises(ValueError, match="never published"):
        control_input("face_identity", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown ControlNet 'cany': use one of canny"):
        control_input("cany", np.zeros((64, 64, 3), np.uint8))


# --- filters and masks --------------------------------------------------------------------------------


def test_canny_equals_the_official_filter():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 48), indexing="ij")
    picture = torch.stack([(xx > 0.5).float(), ((xx - 0.4) ** 2 + (yy - 0.5) ** 2 < 0.08).float(), 0.3 * yy])[
        None
    ]
    torch.testing.assert_close(_canny_edges(picture), _values(FIXTURE["canny"]))


def _box(side: int, box: tuple[float, float, float, float]) -> PIL.Image.Image:
    """A side×side mask, white inside ``box`` (left, top, right, bottom as fractions), drawn with PIL."""
    mask = PIL.Image.new("L", (side, side))
    PIL.ImageDraw.Draw(mask).rectangle([round(f * side) for f in box], fill=255)
    return mask


def test_inpainting_control_whitens_the_masked_pixels_and_appends_the_mask():
    """For a 512² generation the control is 384²: a grey picture and a mask of that size stay as they are."""
    picture = np.full((384, 384, 3), 64, np.uint8)
    mask = np.zeros((384, 384), bool)
    mask[96:288, 192:] = True
    control = control_input("inpainting", [picture, picture], 512, 512, mask=mask)
    assert control.tensor.shape == (2, 4, 384, 384)
    assert control.tensor[:, :3, 96:288, 192:].eq(1).all() and control.tensor[:, :3, :96].eq(64 / 255).all()
    assert torch.equal(control.tensor[:, 3:], torch.from_numpy(mask).float().expand(2, 1, -1, -1))
    assert torch.equal(control.preview, control.tensor[:, :3])


def test_masks_of_any_mode_and_size_become_the_same_mask():
    reference = PIL.Image.new("L", (384, 384))
    PIL.ImageDraw.Draw(reference).rectangle((96, 192, 287, 383), fill=255)
    array = np.asarray(reference) > 127
    variants = [
        reference,
        reference.convert("1"),
        reference.convert("RGB").resize((768, 768), PIL.Image.NEAREST),
        PIL.Image.merge("LA", (reference, reference)),  # transparent where black: still "keep", not white
        array,
        torch.from_numpy(array).float(),
    ]
    picture = np.zeros((384, 384, 3), np.uint8)
    for variant in variants:
        mask = control_input("inpainting", picture, 512, 512, mask=variant).tensor[0, 3]
        assert torch.equal(mask, torch.from_numpy(array).float())


def test_a_mask_of_another_shape_covers_the_picture():
    """A mask of another aspect ratio than the picture is stretched over it, then cut as the picture is:
    the 36 % drawn is the 36 % used (cut on its own, its centre square would hold 22 %)."""
    picture = np.zeros((384, 384, 3), np.uint8)
    mask = np.zeros((192, 384), np.uint8)
    mask[:, : round(0.36 * 384)] = 255  # the left 36 %
    used = control_input("inpainting", picture, 512, 512, mask=mask).tensor[0, 3]
    assert used.mean().item() == pytest.approx(0.36, abs=0.005)
    wide = np.zeros((300, 600, 3), np.uint8)  # cut to its centre square: the mask follows the same cut
    mask = np.zeros((100, 200), np.uint8)
    mask[:, 100:] = 255  # the right half of the picture
    used = control_input("inpainting", wide, 512, 512, mask=mask).tensor[0, 3]
    assert used[:, :190].eq(0).all() and used[:, 194:].eq(1).all()


def test_the_outpainting_canvas_and_its_mask():
    canvas, mask = outpainting_canvas(
        np.full((50, 50, 3), 200, np.uint8), 100, 100, top=0.1, bottom=0.2, left=0.3, right=0.0
    )
    pixels, border = np.asarray(canvas), np.asarray(mask) > 0
    assert border[:10].all() and border[80:].all() and border[:, :30].all() and not border[10:80, 30:].any()
    assert (pixels[10:80, 30:] == 200).all() and (pixels[border] == 0).all()
    with pytest.raises(ValueError, match="leave no room"):
        outpainting_canvas(np.zeros((8, 8, 3), np.uint8), 100, 100, top=0.5, bottom=0.5, left=0, right=0)


def test_control_input_resizes_any_picture_to_the_control_size(tiny_pipeline):
    prior, _ = tiny_pipeline
    picture = np.random.default_rng(0).integers(0, 255, (300, 500, 3), np.uint8)
    canny = control_input("canny", picture, 1024, 1024)
    assert canny.tensor.shape == (1, 1, 768, 768) and canny.preview.shape == (1, 3, 768, 768)
    inpaint = control_input("inpainting", picture, 1024, 1536, mask=_box(20, (0, 0, 0.5, 1)))
    assert inpaint.tensor.shape == (1, 4, 768, 1152)
    with pytest.raises(ValueError, match="needs a mask"):
        control_input("inpainting", picture)


@torch.no_grad()
def test_super_resolution_control_is_effnet_features_of_the_half_size_picture(tiny_pipeline):
    """The official SREffnetFilter from the half-size picture on: features of the 192² picture (for a
    512² generation, whose EfficientNet input is 384²), enlarged 2× nearest; here the picture is 192²."""
    from torch.nn import functional as F
    from torchvision.transforms import functional as TF

    prior, _ = tiny_pipeline
    small = torch.rand(3, 192, 192)
    control = control_input("super_resolution", small, 512, 512, prior=prior)
    features = prior.effnet(TF.normalize(small[None], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    expected = F.interpolate(features, scale_factor=2, mode="nearest")
    scale = expected.abs().max().item()  # relative to the latents' scale
    torch.testing.assert_close(control.tensor, expected, rtol=1e-4, atol=1e-4 * scale)
    assert control.tensor.shape == (1, 16, 12, 12) and control.preview.shape == (1, 3, 384, 384)


@torch.no_grad()
def test_control_features_scale_with_strength_and_repeat_for_the_batch(controlnet_dir, tiny_pipeline):
    prior, _ = tiny_pipeline
    model = load_controlnet(controlnet_dir, "canny", prior)
    control = torch.rand(1, 1, 64, 64)
    full, half = (
        control_features(model, control, 1.0, batch=3),
        control_features(model, control, 0.5, batch=3),
    )
    assert len(full) == max(TINY_FED) + 1
    for i in TINY_FED:
        assert full[i].shape[0] == 3 and torch.equal(full[i][0], full[i][2])
        torch.testing.assert_close(half[i], full[i] * 0.5)
    with pytest.raises(ValueError, match="control_input"):
        control_features(model, torch.rand(1, 4, 64, 64))


@torch.no_grad()
def test_integer_and_nan_controls_are_refused(controlnet_dir, tiny_pipeline, tiny_unet):
    """An int8 control would steer Stage C by its integer values, a NaN one to a black picture."""
    prior, _ = tiny_pipeline
    model = load_controlnet(controlnet_dir, "canny", prior)
    for control in (torch.ones(1, 1, 64, 64, dtype=torch.int8), torch.full((1, 1, 64, 64), float("nan"))):
        with pytest.raises(ValueError, match="must hold finite floats"):
            control_features(model, control)
    features = [torch.ones(1, 32, 3, 3, dtype=torch.int8)]
    with (
        pytest.raises(ValueError, match="torch.int8, not floating point"),
        inject_controlnet(tiny_unet, features),
    ):
        pass


# --- whole generations --------------------------------------------------------------------------------


@torch.no_grad()
def test_controlnet_to_image_follows_the_control_and_checks_the_batch(controlnet_dir, tiny_pipeline):
    """The official inpainting call: features once for the batch, Stage C from the picture's latents
    noised to ``init_noise`` with int(steps × init_noise) steps; the control changes the latents."""
    from cascade_helpers.generation import controlnet_to_image

    prior, decoder = tiny_pipeline
    model = load_controlnet(controlnet_dir, "inpainting", prior)
    picture = np.full((64, 64, 3), 128, np.uint8)
    control = control_input("inpainting", picture, 512, 512, mask=_box(64, (0, 0, 0.5, 0.5)))
    prior_settings = StageSettings(steps=2, guidance=4.0, shift=2.0, guidance_rescale=0.7)
    decoder_settings = StageSettings(steps=1, guidance=1.1)

    def generate(strength: float, num_images: int = 2, batch: int = 2):
        features = control_features(model, control, strength, batch=batch)
        return controlnet_to_image(
            prior, decoder, features, "a cat", init_image=picture, init_noise=0.5, height=512, width=512,
            num_images=num_images, prior_settings=prior_settings, decoder_settings=decoder_settings,
            callback=lambda step, *_: steps.append(step),
        )  # fmt: skip

    steps: list[int] = []
    controlled = generate(1.0)
    assert len(steps) == 1  # int(2 steps × 0.5)
    free = generate(0.0)
    assert len(controlled.images) == 2 and controlled.images[0].size == (512, 512)
    assert controlled.settings["init_noise"] == 0.5 and controlled.settings["prior"]["steps"] == 2  # as asked
    assert not torch.allclose(controlled.stage_c_latents, free.stage_c_latents)
    with pytest.raises(ValueError, match="batch=3"):
        generate(1.0, num_images=3, batch=2)


@torch.no_grad()
def test_the_init_picture_is_encoded_as_the_official_inpainting_example_does(controlnet_dir, tiny_pipeline):
    """The official example encodes its picture at 768 px (``resize_image``: bilinear, antialiased),
    ImageNet-normalized, with no 3/4 downscale; at ``init_noise=0`` Stage C keeps those latents."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from cascade_helpers.effnet import _IMAGENET_MEAN, _IMAGENET_STD
    from cascade_helpers.generation import controlnet_to_image

    prior, decoder = tiny_pipeline
    model = load_controlnet(controlnet_dir, "inpainting", prior)
    picture = (torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(7)) * 255).byte()
    picture = TF.resize(picture, [300, 300], interpolation=InterpolationMode.BICUBIC).permute(1, 2, 0).numpy()
    control = control_input("inpainting", picture, 512, 512, mask=_box(64, (0, 0, 0.5, 1)))

    def generate(init_noise: float):
        return controlnet_to_image(
            prior, decoder, control_features(model, control, batch=2), "a cat", init_image=picture,
            init_noise=init_noise, height=512, width=512, num_images=2,
            decoder_settings=StageSettings(steps=1, guidance=1.1),
        )  # fmt: skip

    resized = TF.resize(TF.to_tensor(picture), 384, interpolation=InterpolationMode.BILINEAR, antialias=True)
    expected = prior.effnet(TF.normalize(resized, _IMAGENET_MEAN, _IMAGENET_STD)[None]).expand(2, -1, -1, -1)
    latents = generate(0.0).stage_c_latents
    scale = expected.abs().max().item()  # relative to the latents' scale
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4 * scale)
    for wrong in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"init_noise must be in \[0, 1\]"):
            generate(wrong)
