"""Config validation: bad values fail at construction with the field and the allowed values."""

from __future__ import annotations

import argparse

import pytest

from megatron_mod.config import MoDConfig


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"threshold": 1.5}, "threshold", "0 <= p <= 1"),
        ({"threshold": -0.1}, "threshold", "0 <= p <= 1"),
        ({"capacity": 0.0}, "capacity", "0 < c <= 1"),
        ({"capacity": 1.2}, "capacity", "0 < c <= 1"),
        ({"routing": "expert_choice"}, "routing", "threshold | topk"),
        ({"gate": "soft"}, "gate", "scale | straight_through"),
        ({"routed_layers": "odd"}, "routed_layers", "every_other"),
        ({"routed_layers": [1, -2]}, "routed_layers", "0-based"),
        ({"routed_layers": "1,1"}, "routed_layers", "without duplicates"),
        ({"load_loss_coeff": -1.0}, "load_loss_coeff", "alpha >= 0"),
        ({"topk_decode_threshold": 1.5}, "topk_decode_threshold", "float in [0, 1]"),
    ],
)
def test_invalid_mod_config_names_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        MoDConfig(**kwargs)
    assert f"MoDConfig.{field}=" in str(err.value)
    assert allowed in str(err.value)


def test_routed_layer_resolution():
    assert MoDConfig().routed_layer_indices(6) == [1, 3, 5]
    assert MoDConfig(routed_layers="all").routed_layer_indices(3) == [0, 1, 2]
    assert MoDConfig(routed_layers="4, 2").routed_layer_indices(6) == [2, 4]
    with pytest.raises(ValueError, match="has 4 layers"):
        MoDConfig(routed_layers=[7]).routed_layer_indices(4)


def test_dict_and_cli_round_trip():
    cfg = MoDConfig(
        routing="topk", capacity=0.25, routed_layers=[0, 2], load_loss_layer_coeffs={2: 0.5}
    )
    assert MoDConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.layer_load_loss_coeff(2) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="unknown MoDConfig keys"):
        MoDConfig.from_dict({"threshhold": 0.4})
    parser = argparse.ArgumentParser()
    MoDConfig.add_cli_args(parser)
    args = parser.parse_args(["--mod-threshold", "0.3", "--mod-routed-layers", "all"])
    assert MoDConfig.from_cli_args(args) == MoDConfig(threshold=0.3, routed_layers="all")
    with pytest.raises(ValueError, match="threshold"):
        MoDConfig.from_cli_args(parser.parse_args(["--mod-threshold", "2"]))


def test_llama_presets_and_parallel_divisibility():
    from megatron_mod.models import PRESETS, llama_config

    cfg = llama_config(
        "llama2-70b", num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=16
    )
    assert cfg.num_query_groups == 8 and cfg.gated_linear_unit and cfg.normalization == "RMSNorm"
    assert PRESETS["llama2-70b"]["num_query_groups"] == 8
    assert PRESETS["minima-2-3b"]["hidden_size"] == 3072
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=3 does not divide"):
        llama_config("tiny", tensor_model_parallel_size=3)
    with pytest.raises(ValueError, match=r"num_query_groups=2.*allowed"):
        llama_config("tiny", tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=3 does not divide"):
        llama_config("tiny", pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match="unknown preset"):
        llama_config("llama9-1t")
    with pytest.raises(ValueError, match="unknown TransformerConfig fields"):
        llama_config("tiny", hiden_size=12)
