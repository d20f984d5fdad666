"""Config validation / round trip, presets (Table 1) and meta-device parameter counts."""

import json

import pytest

from model.config import MICRO_COND_NAMES, PAPER_PARAMETERS, PRESETS, STIVConfig, get_preset
from model.info import model_info


def test_paper_presets_use_table1_dimensions():
    table1 = {"stiv-xl": (28, 1152, 18), "stiv-xxl": (38, 1536, 24), "stiv-m": (46, 3072, 48)}
    for name, (blocks, hidden, heads) in table1.items():
        cfg = get_preset(name)
        assert (cfg.num_blocks, cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) == (
            blocks,
            hidden,
            heads,
            4.0,
        )
        assert cfg.patch_size == 2 and cfg.temporal_patch_size == 2
    assert {"stiv-tiny", "stiv-tiny-cpu"} <= set(PRESETS)
    cpu = get_preset("stiv-tiny-cpu")
    assert 128 <= cpu.hidden_size <= 192 and 4 <= cpu.num_blocks <= 6 and cpu.num_heads == 4


def test_micro_cond_names_order():
    assert MICRO_COND_NAMES == (
        "orig_height", "orig_width", "crop_top", "crop_left", "crop_height", "crop_width", "frame_stride",
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip(name):
    cfg = get_preset(name, mask_ratio=0.5, predict_clean=True)
    d = json.loads(json.dumps(cfg.to_dict()))  # survives JSON / YAML (tuples become lists)
    back = STIVConfig.from_dict(d)
    assert back == cfg
    assert back.rope_base_grid == tuple(cfg.rope_base_grid)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_heads": 5},  # 32 % 5
        {"hidden_size": 24, "num_heads": 4},  # head dim 6 not a multiple of 4 (2D RoPE)
        {"mask_ratio": 1.0},
        {"mask_ratio": -0.1},
        {"num_extra_unmasked_blocks": 3},  # must be < num_blocks (3)
        {"num_blocks": 0},
        {"rope_base_grid": (4,)},
        {"predict_clean": 1},
    ],
)
def test_validation(bad):
    with pytest.raises(ValueError):
        get_preset("stiv-tiny", **bad)


def test_from_dict_rejects_unknown_and_get_preset_unknown():
    d = get_preset("stiv-tiny").to_dict()
    d["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        STIVConfig.from_dict(d)
    with pytest.raises(KeyError):
        get_preset("stiv-nope")


@pytest.mark.parametrize("name", ["stiv-xl", "stiv-xxl", "stiv-m"])
def test_paper_parameter_counts(name):
    info = model_info(name)  # meta device: no memory even for 8.8B parameters
    paper = PAPER_PARAMETERS[name]
    errs = [abs(info[k] / paper - 1) for k in ("parameters", "parameters_without_temporal")]
    assert min(errs) < 0.10, (name, info["parameters"], info["parameters_without_temporal"])
    # docs/recipe.md "Presets": XL and XXL match without temporal attention, M with it.
    expected = "parameters" if name == "stiv-m" else "parameters_without_temporal"
    assert info["paper_matches"] == expected
    assert sum(info["components"].values()) == info["parameters"]
    assert (
        info["parameters"] - info["parameters_without_temporal"]
        == info["components"]["blocks.temporal_attention"]
    )


def test_model_info_tiny_and_no_temporal():
    info = model_info("stiv-tiny")
    assert info["parameters"] > info["parameters_without_temporal"] > 0
    assert "paper_parameters" not in info
    t2i = model_info("stiv-tiny", temporal_attention=False, temporal_patch_size=1)
    assert t2i["parameters"] == t2i["parameters_without_temporal"]
