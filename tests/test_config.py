"""HiFTConfig validation: every bad value or unknown key gets an error naming it."""

import pytest

from hift_engine import ConfigError, HiFTConfig


def test_defaults_are_valid_and_round_trip():
    cfg = HiFTConfig()
    assert cfg.optimizer == "adamw" and cfg.layers_per_group == 1 and cfg.strategy == "bottom2up"
    assert HiFTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lr": "fast"}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"layers_per_group": 1.5}, "layers_per_group must be an integer"),
        ({"layers_per_group": True}, "layers_per_group must be an integer"),
        ({"strategy": "bottom2top"}, "did you mean 'bottom2up'"),
        ({"optimizer": "adam"}, "did you mean 'adamw'"),
        ({"optimizer": 3}, "optimizer must be a name"),
        ({"layer_per_group": 2}, "unknown option 'layer_per_group' \\(did you mean 'layers_per_group'\\?\\)"),
        ({"max_grad_norm": 0}, "max_grad_norm must be a number > 0"),
        ({"slots": 1}, "slots must be an integer >= 2"),
        ({"state_store": "disk"}, "state_store='disk' is unknown"),
        ({"groups": []}, "groups must be a non-empty list"),
        ({"groups": [["a"], [3]]}, "groups\\[1\\] must be a list of non-empty strings"),
        ({"freeze": [""]}, "freeze must be a list of non-empty strings"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"max_consecutive_skips": -1}, "max_consecutive_skips must be an integer >= 0"),
        ({"optimizer_kwargs": [1]}, "optimizer_kwargs must be a mapping"),
        ({"transfer_chunk_mib": -1}, "transfer_chunk_mib must be an integer >= 0"),
        ({"pin_context": "yes"}, "pin_context must be"),
        ({"checkpoint_active": True}, "checkpoint_active .* needs activation_checkpointing='always' or 'auto'"),
        ({"mlp_chunk_tokens": -4}, "mlp_chunk_tokens must be an integer >= 0"),
    ],
)
def test_bad_values_are_named(data, match):
    with pytest.raises(ConfigError, match=match):
        HiFTConfig.from_dict(data)


def test_non_mapping_is_rejected():
    with pytest.raises(ConfigError, match="must be a mapping"):
        HiFTConfig.from_dict(["lr", 1.0])
