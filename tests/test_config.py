"""SpecDefConfig validation, JSON round trip and seeded layer selection."""

import pytest

from hf_specdef import SpecDefConfig

BAD = [
    ("alpha", 1.0), ("alpha", 0.5), ("alpha", float("inf")), ("alpha", float("nan")), ("alpha", "big"), ("alpha", True),
    ("sites", ("attn.vo", "ffn")), ("sites", ()), ("top_k", 0), ("top_k", 1.5),
    ("layers", "some"), ("layers", [-1]), ("layers", []), ("layers", "random:0"),
    ("mode", "dense"), ("tolerance", 0), ("tolerance", float("nan")), ("precision", "bf16"), ("record", "all"),
    ("seed", "x"), ("site_map", []),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SpecDefConfig\.{field}="):
        SpecDefConfig(**{field: value})


def test_json_round_trip():
    cfg = SpecDefConfig(alpha=1024.0, sites=("norm", "mlp"), layers=[0, 3], mode="axis", record="full", seed=7)
    again = SpecDefConfig.from_json_string(cfg.to_json_string())
    assert again == cfg
    assert again.to_dict()["layers"] == [0, 3]


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown fields"):
        SpecDefConfig.from_dict({"alpha": 10.0, "alhpa": 3})


def test_random_layers_reproducible_by_seed():
    layers = range(24)
    a = SpecDefConfig(layers="random:5", seed=3).select_layers(layers)
    b = SpecDefConfig(layers="random:5", seed=3).select_layers(layers)
    c = SpecDefConfig(layers="random:5", seed=4).select_layers(layers)
    assert a == b and len(a) == 5 and a != c


def test_layer_list_must_exist():
    with pytest.raises(ValueError, match="layers"):
        SpecDefConfig(layers=[0, 9]).select_layers(range(4))
