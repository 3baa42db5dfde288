"""The memory planner on machines described to it (a T4 with Colab's RAM, 8 to 80 GB cards, a CPU),
checked against the published file sizes written out here, and ``memory="auto"`` through the loaders."""

from __future__ import annotations

import pytest
import torch

from cascade_helpers import memory
from cascade_helpers.devices import _default_dtype
from cascade_helpers.memory import Machine, choose_variant, describe_machine, plan_memory

GB = 1e9
#: published sizes (stabilityai/stable-cascade), bfloat16 files, in GB
STAGE_C_BIG, STAGE_B_BIG, TEXT, IMAGE = 7.18, 3.13, 1.39, 0.608
SMALL = 0.0737 + 0.0815 + 0.016  # Stage A, EfficientNet, previewer (float32 files)
WORKSPACE = 3.0  # the planner's allowance for activations

T4 = Machine("Tesla T4", int(14.7 * GB), False, int(12.7 * GB), int(80 * GB))
CARDS = {
    8: Machine("8 GB", int(7.7 * GB), True, int(16 * GB), int(100 * GB)),
    12: Machine("12 GB", int(11.7 * GB), True, int(32 * GB), int(100 * GB)),
    24: Machine("24 GB", int(23.7 * GB), True, int(32 * GB), int(100 * GB)),
    80: Machine("80 GB", int(79.7 * GB), True, int(128 * GB), int(100 * GB)),
}


def modes(plan):
    return {row.model: row.mode for row in plan.rows}


@pytest.mark.parametrize("card", [24, 80])
def test_a_large_card_holds_every_model(card):
    plan = plan_memory("big", "big", machine=CARDS[card])
    assert set(modes(plan).values()) == {"gpu"}
    assert {row.dtype for row in plan.rows if row.model in ("Stage C", "Stage B")} == {torch.bfloat16}
    assert plan.gpu / GB == pytest.approx(
        STAGE_C_BIG + STAGE_B_BIG + TEXT + IMAGE + SMALL + WORKSPACE, abs=1e-3
    )


def test_a_12_gb_card_takes_the_big_models_in_turns():
    plan = plan_memory("big", "big", machine=CARDS[12])
    assert modes(plan)["Stage C"] == modes(plan)["Stage B"] == modes(plan)["text encoder"] == "model_offload"
    assert plan.gpu <= CARDS[12].gpu_free
    # on the GPU at once: Stage C (the largest visitor), what stays there, the allowance
    resident = sum(row.gpu for row in plan.rows if row.mode == "gpu") / GB
    assert plan.gpu / GB == pytest.approx(STAGE_C_BIG + resident + WORKSPACE, abs=1e-3)


def test_an_8_gb_card_streams_stage_c_block_by_block():
    plan = plan_memory("big", "big", machine=CARDS[8])
    assert modes(plan)["Stage C"] == "group_offload"
    stage_c = next(row for row in plan.rows if row.model == "Stage C")
    assert 0 < stage_c.gpu < 0.1 * STAGE_C_BIG * GB  # a few of its 2048-wide blocks at a time
    assert stage_c.ram == pytest.approx(STAGE_C_BIG * GB, rel=1e-3)  # waiting in RAM
    assert plan.fits()


def test_colabs_t4_follows_its_float16_rule():
    """No native bfloat16: every model in float16, Stage C through the rescale; big-big then fits the
    T4's GPU and its 12.7 GB of RAM."""
    assert _default_dtype(gpu=True, native_bfloat16=False) == torch.float16
    plan = plan_memory("big", "big", machine=T4)
    assert {row.dtype for row in plan.rows if row.model in ("Stage C", "Stage B")} == {torch.float16}
    assert plan.fits() and not plan.disk


@pytest.mark.parametrize("ram,dtype", [(32, torch.float32), (14, torch.bfloat16)])
def test_a_cpu_plan_lives_in_ram_in_bfloat16_only_when_short(ram, dtype):
    plan = plan_memory("big", "lite", machine=Machine(None, ram=int(ram * GB), disk=int(100 * GB)))
    assert set(modes(plan).values()) == {"cpu"} and plan.gpu == 0
    assert next(row for row in plan.rows if row.model == "Stage C").dtype == dtype
    assert plan.ram <= ram * GB


def test_nothing_fits_names_the_smallest_plan_and_what_it_needs():
    tiny_machine = Machine("2 GB", int(2 * GB), True, int(4 * GB), int(100 * GB))
    with pytest.raises(
        MemoryError, match=r"(?s)does not fit 2 GB.*smallest plan needs .* GB of RAM.*\| Stage C \|"
    ):
        plan_memory("big", "big", machine=tiny_machine)
    with pytest.raises(MemoryError):
        choose_variant(tiny_machine)


@pytest.mark.parametrize(
    "mode,weights_on_gpu",
    [
        ("gpu", STAGE_C_BIG + STAGE_B_BIG + TEXT + IMAGE + SMALL),
        ("model_offload", STAGE_C_BIG + SMALL),  # one big model at a time, the small ones stay
        ("sequential_offload", SMALL),  # layer by layer
    ],
)
def test_a_fixed_mode_gives_its_figures(mode, weights_on_gpu):
    plan = plan_memory("big", "big", machine=CARDS[24], memory=mode)
    assert (plan.gpu / GB - WORKSPACE) == pytest.approx(weights_on_gpu, abs=1e-3)


def test_without_the_image_encoder_the_plan_is_smaller():
    with_it, without = (
        plan_memory("big", "big", machine=CARDS[24], image_encoder=flag) for flag in (True, False)
    )
    assert (with_it.gpu - without.gpu) / GB == pytest.approx(IMAGE, abs=1e-3)


def test_choose_variant_prefers_the_big_stage_c_and_no_disk():
    assert choose_variant(CARDS[8]).variant == "big-big"
    low_ram = Machine("8 GB", int(7.7 * GB), True, int(10 * GB), int(100 * GB))
    assert plan_memory("big", "big", machine=low_ram).disk  # fits only with Stage C read from disk
    plan = choose_variant(low_ram)
    assert not plan.disk and plan.stage_c == "lite"


def test_the_plan_prints_as_one_table():
    text = str(plan_memory("lite", "lite", machine=CARDS[12]))
    assert "| model | where | dtype | GB on the GPU | GB in RAM |" in text
    for model in (
        "Stage C",
        "text encoder",
        "Stage B",
        "Stage A",
        "image encoder",
        "EfficientNet",
        "previewer",
    ):
        assert f"| {model} |" in text
    assert "small-small" in text and "estimates" in text


def test_describe_machine_reads_the_gpu_and_counts_our_own_models_as_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(5 * GB), int(15 * GB)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: int(7 * GB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    machine = describe_machine()
    assert (machine.gpu, machine.gpu_free, machine.native_bfloat16) == ("Tesla T4", int(12 * GB), False)
    assert "Tesla T4 (12.0 GB free, no native bfloat16)" in str(machine)


def test_describe_machine_on_a_cpu():
    machine = describe_machine("cpu")
    assert machine.gpu is None and machine.ram > 0 and machine.disk > 0
    assert "no CUDA GPU" in str(machine)


# --- memory="auto" through the loaders ----------------------------------------------------------------


@pytest.fixture
def t4_like(monkeypatch):
    """Loaders that believe they run on a 12 GB GPU without native bfloat16 (nothing moves: ``_place``
    records the modes the plan gives)."""
    from cascade_helpers import loading

    machine = Machine("12 GB, no bfloat16", int(11.7 * GB), False, int(32 * GB), int(100 * GB))
    placed = {}
    monkeypatch.setattr(memory, "_LOADED", [])
    monkeypatch.setattr(memory, "describe_machine", lambda device=None: machine)
    monkeypatch.setattr(loading, "pick_device", lambda device=None: torch.device("cuda", 0))
    monkeypatch.setattr(
        loading, "_place", lambda model, device, mode: placed.setdefault(id(model), mode) and model
    )
    rescale = loading.rescale_for_float16  # the float16 calibration pass computes here: no GPU in the tests
    monkeypatch.setattr(loading, "rescale_for_float16", lambda unet, **_: rescale(unet, device="cpu"))
    plan_for_load = memory._plan_for_load  # plan the tiny files as the released sizes they are named for
    monkeypatch.setattr(loading, "_plan_for_load", lambda *a, test_weights, **k: plan_for_load(*a, **k))
    return placed


def test_auto_places_and_types_each_model_by_one_printed_plan(tiny_models, t4_like, capsys):
    from cascade_helpers.loading import load_decoder, load_prior

    prior = load_prior(tiny_models, "big", memory="auto")
    decoder = load_decoder(tiny_models, "big", memory="auto")
    out = capsys.readouterr().out
    assert out.count("Memory plan: big Stage C, big Stage B") == 1  # the decoder follows the prior's plan
    plan = memory._LOADED[0][2]
    expected = {row.model: row for row in plan.rows}
    assert t4_like[id(prior.unet)] == expected["Stage C"].mode
    assert t4_like[id(decoder.unet)] == expected["Stage B"].mode
    assert (prior.unet.dtype, decoder.unet.dtype) == (expected["Stage C"].dtype, torch.float16)
    assert decoder.dtype == torch.float16  # no native bfloat16: the decoder in float16


def test_optional_parts_are_read_on_first_use(tiny_models, monkeypatch):
    from cascade_helpers import loading

    reads = []
    original = loading._load_strict
    monkeypatch.setattr(
        loading, "_load_strict", lambda module, path: reads.append(path.name) or original(module, path)
    )
    prior = loading.load_prior(tiny_models, "big", dtype="fp32", device="cpu", image_encoder=False)
    assert reads == []  # nothing a notebook has not asked for yet
    assert prior.require("effnet", "a test") is prior.effnet
    assert reads == ["effnet_encoder.safetensors"]
    with pytest.raises(ValueError, match=r"image variation needs the CLIP image encoder.*image_encoder=True"):
        prior.require("image_encoder", "image variation")


def test_auto_does_not_plan_tiny_test_weights_from_the_released_sizes(tiny_models, monkeypatch, capsys):
    """CI's tiny models are named like the big files: planned as 10 GB of weights they would not fit a
    small CI machine. They go on the device, unplanned."""
    from cascade_helpers.loading import load_prior

    monkeypatch.setattr(memory, "_LOADED", [])
    monkeypatch.setattr(
        memory, "describe_machine", lambda device=None: Machine(None, ram=int(1 * GB), disk=0)
    )
    prior = load_prior(tiny_models, "big", device="cpu", memory="auto", image_encoder=False)
    assert prior.dtype == torch.float32 and "Memory plan" not in capsys.readouterr().out


README_CLASSES = {
    "T4, 15 GB (Colab free: no native bfloat16, 12.7 GB RAM)": T4,
    "8 GB (Ampere or newer, 16 GB RAM)": CARDS[8],
    "12 GB (32 GB RAM)": CARDS[12],
    "24 GB (32 GB RAM)": CARDS[24],
    "80 GB (128 GB RAM)": CARDS[80],
}


@pytest.mark.parametrize("title", README_CLASSES)
def test_the_readme_tables_are_what_the_planner_computes(title):
    """The Hardware section's tables, regenerated here: a change of the planner, the registry or the
    precision rules (float16 for Stage C) must update them."""
    from pathlib import Path

    from cascade_helpers.memory import variant_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    expected = variant_table(README_CLASSES[title])
    assert f"**{title}**\n\n{expected}\n" in readme, f"README's table for {title} should read:\n{expected}"
