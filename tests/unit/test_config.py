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


def test_cli_flags_are_derived_from_the_fields_and_their_docstrings():
    import dataclasses

    from megatron_mod.config import cli_field_names

    parser = argparse.ArgumentParser()
    MoDConfig.add_cli_args(parser)
    flags = {a.dest: a for a in parser._actions if a.dest.startswith("mod_")}
    fields = {f.name for f in dataclasses.fields(MoDConfig)}
    assert set(cli_field_names()) == fields - {
        "load_loss_layer_coeffs",
        "layer_thresholds",
        "layer_kept_targets",
    }
    assert set(flags) == {f"mod_{name}" for name in cli_field_names()}
    assert flags["mod_routing"].choices == ("threshold", "topk")
    assert "fraction of each sequence kept" in flags["mod_capacity"].help
    assert flags["mod_compact_length_multiple"].type is int
    assert flags["mod_compact_length_multiple"].default == MoDConfig().compact_length_multiple

    # A new field gets its flag, type and help with no further code.
    @dataclasses.dataclass
    class Extended(MoDConfig):
        warmup_fraction: float = 0.25
        """Fraction of training spent warming the routers up."""

    parser = argparse.ArgumentParser()
    Extended.add_cli_args(parser)
    args = parser.parse_args(["--mod-warmup-fraction", "0.5"])
    assert args.mod_warmup_fraction == 0.5
    assert any("warming the routers" in (a.help or "") for a in parser._actions)


def test_override_flags_default_to_not_given_and_apply_over_a_stored_config():
    stored = MoDConfig(threshold=0.3, routed_layers=[1], gate="straight_through")
    parser = argparse.ArgumentParser()
    MoDConfig.add_cli_args(parser, fields=["threshold", "gate"], with_defaults=False)
    assert MoDConfig.from_cli_args(parser.parse_args([]), base=stored) == stored
    changed = MoDConfig.from_cli_args(parser.parse_args(["--mod-threshold", "0.6"]), base=stored)
    assert changed == MoDConfig(threshold=0.6, routed_layers=[1], gate="straight_through")
    with pytest.raises(ValueError, match="no command-line field"):
        MoDConfig.add_cli_args(argparse.ArgumentParser(), fields=["load_loss_layer_coeffs"])


def test_hf_configuration_constants_equal_the_cores():
    """The exported configuration file must stand alone, so it repeats these; they must agree."""
    from megatron_mod import config
    from megatron_mod.hf import configuration_llama_mod as hf

    assert hf.ROUTING_CHOICES == config.ROUTING_CHOICES
    assert hf.GATE_CHOICES == config.GATE_CHOICES
    defaults = hf.LlamaModConfig()
    core = MoDConfig()
    for name in ("routing", "threshold", "capacity", "gate", "topk_decode_threshold"):
        assert getattr(defaults, f"mod_{name}") == getattr(core, name), name


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
