"""The registry of model files: names as released, one entry per file, commands that fetch them."""

from __future__ import annotations

import re
import sys
import types

import pytest

from cascade_helpers import files


def test_every_local_path_is_listed_once():
    paths = [f.path for f in files._all_files()]
    assert len(paths) == len(set(paths))


@pytest.mark.parametrize("stage,table", [("c", files.STAGE_C), ("b", files.STAGE_B)])
def test_stage_files_carry_the_official_names(stage, table):
    expected = {
        ("big", "fp32"): f"stage_{stage}.safetensors",
        ("big", "bf16"): f"stage_{stage}_bf16.safetensors",
        ("lite", "fp32"): f"stage_{stage}_lite.safetensors",
        ("lite", "bf16"): f"stage_{stage}_lite_bf16.safetensors",
    }
    for (size, precision), name in expected.items():
        assert table[size][precision].path == name
        assert table[size][precision].repo == "stabilityai/stable-cascade"


def test_bf16_files_are_half_the_fp32_ones():
    pairs = [*files.STAGE_C.values(), *files.STAGE_B.values(), *files._WEIGHTS.values()]
    for by_precision in pairs:
        assert by_precision["bf16"].size == pytest.approx(by_precision["fp32"].size / 2, rel=0.02)


def test_repos_as_released():
    assert files.LORA_FERNANDO.repo == "dome272/stable-cascade"
    prior_repo = {files._WEIGHTS["image_encoder"]["bf16"].repo, files._FILES["feature_extractor"].repo}
    assert prior_repo == {"stabilityai/stable-cascade-prior"}
    assert {f.repo for f in files._CONTROLNETS.values()} == {"stabilityai/stable-cascade"}
    assert all(not f.repo.endswith("StableWurst") for f in files._all_files())


@pytest.mark.parametrize(
    "wanted,kwargs,command",
    [
        ([files.STAGE_C["lite"]["bf16"]], {"stage_b": "big"}, "big-small bfloat16"),
        ([files.STAGE_B["lite"]["fp32"]], {}, "small-small float32"),
        (
            [files._FILES["effnet"], files.STAGE_C["big"]["bf16"], files.STAGE_B["big"]["bf16"]],
            {},
            "essential big-big bfloat16",
        ),
        ([files._CONTROLNETS["canny"]], {}, "controlnet"),
        ([files.LORA_FERNANDO, files._FILES["previewer"]], {}, "essential lora"),
        ([files._WEIGHTS["text_encoder"]["fp32"]], {}, "essential float32"),
    ],
)
def test_download_command_is_the_shortest_valid_line(wanted, kwargs, command):
    assert files.download_command(wanted, **kwargs) == f"bash download_models.sh {command}"


@pytest.mark.parametrize("shell,prefix", [(None, ""), (object(), "!")])
def test_in_a_notebook_the_command_is_typed_with_a_bang(monkeypatch, shell, prefix):
    """In an IPython kernel (Colab, JupyterLab) a user types ``!bash ...``; in a terminal ``bash ...``."""
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert files.download_command([files.LORA_FERNANDO]) == f"{prefix}bash download_models.sh lora"


def test_without_ipython_the_command_is_for_a_terminal(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    assert files.download_command([files.LORA_FERNANDO]).startswith("bash ")


def test_human_sizes():
    assert files._human_size(int(7.18 * files._GB)) == "7.18 GB"
    assert files._human_size(int(81.5 * files._MB)) == "81.5 MB"
    assert re.fullmatch(r"\d+ kB", files._human_size(1000))


@pytest.mark.parametrize("stage_c, stage_b", [("big", "big"), ("lite", "big"), ("big", "lite")])
def test_a_notebook_reads_its_chosen_stages_and_each_file_once(stage_c, stage_b):
    needed = files.notebook_files("text_to_image", stage_c=stage_c, stage_b=stage_b)
    assert needed[-2:] == [files.STAGE_B[stage_b]["bf16"], files.STAGE_C[stage_c]["bf16"]]
    assert len(set(needed)) == len(needed) and files._essential_files("bf16") == needed[:-2]
    controlnet = files.notebook_files("controlnet", precision="fp32")
    assert files._WEIGHTS["text_encoder"]["fp32"] in controlnet and set(files._CONTROLNETS.values()) <= set(
        controlnet
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("text2image",), "unknown notebook 'text2image': use one of text_to_image, lora, controlnet"),
        (("lora", "small"), "stage_c must be 'big' or 'lite', not 'small'"),
        (("lora", "big", "big", "bfloat16"), "precision='bfloat16': use 'bf16' or 'fp32'"),
    ],
)
def test_a_notebook_name_size_or_precision_mistyped_is_refused(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        files.notebook_files(*arguments)
