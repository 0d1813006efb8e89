"""The typed configuration: defaults, validation, YAML loading with overrides, round trips."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from ft_ray.config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_changes,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    to_json,
    to_yaml,
)

# ----------------------------------------------------------------------------------------------
# defaults and validation
# ----------------------------------------------------------------------------------------------


def test_defaults_are_resolved():
    cfg = ModelConfig()
    assert cfg.num_key_value_heads == cfg.num_heads == 8
    assert cfg.intermediate_size == 32 * math.ceil(8 * 256 / 3 / 32) == 704
    assert cfg.inject_layer == cfg.num_layers // 2 == 4
    assert cfg.head_dim == 32
    assert cfg.free_nats == pytest.approx(0.5 * math.log(2))


@pytest.mark.parametrize("kw,expected", [
    (dict(hidden_dim=96, num_heads=4), dict(num_key_value_heads=4, intermediate_size=256,
                                            inject_layer=4)),
    (dict(hidden_dim=64, num_layers=5, num_heads=4), dict(intermediate_size=192, inject_layer=2)),
    (dict(hidden_dim=100, num_heads=2), dict(intermediate_size=288)),  # 266.7 -> 288
])
def test_derived_defaults(kw, expected):
    cfg = ModelConfig(**kw)
    for k, v in expected.items():
        assert getattr(cfg, k) == v, k
    assert cfg.intermediate_size % 32 == 0 and cfg.intermediate_size >= 8 * cfg.hidden_dim / 3


def test_explicit_values_are_kept():
    cfg = ModelConfig(num_heads=8, num_key_value_heads=2, intermediate_size=100, inject_layer=6)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.inject_layer) == (2, 100, 6)
    assert ModelConfig(free_bits=3.0).free_nats == pytest.approx(3 * math.log(2))


@pytest.mark.parametrize("kw,key", [
    (dict(hidden_dim=30, num_heads=4), "num_heads"),  # heads do not divide the width
    (dict(hidden_dim=24, num_heads=8), "num_heads"),  # head dim 3: odd, RoPE needs pairs
    (dict(num_heads=8, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(inject_layer=0), "inject_layer"),
    (dict(inject_layer=8), "inject_layer"),  # == num_layers
    (dict(num_layers=4, inject_layer=-1), "inject_layer"),
    (dict(latent_bits=0), "latent_bits"),
    (dict(latent_bits=21), "latent_bits"),
    (dict(num_layers=1), "num_layers"),
    (dict(free_bits=-0.5), "free_bits"),
    (dict(free_bits=float("inf")), "free_bits"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(latent_init_std=-1.0), "latent_init_std"),
])
def test_validation_errors_name_the_key(kw, key):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kw)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert isinstance(info.value, ValueError)


def test_valid_edge_values_accepted():
    assert ModelConfig(hidden_dim=48, num_heads=8).head_dim == 6  # even head dim: fine
    assert ModelConfig(num_layers=2).inject_layer == 1
    assert ModelConfig(num_layers=4, inject_layer=3).inject_layer == 3


@pytest.mark.parametrize("bits", [1, 20])
def test_latent_bits_bounds_accepted(bits):
    assert ModelConfig(latent_bits=bits).latent_bits == bits


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_load_config_with_overrides(tmp_path):
    path = write(tmp_path, {"model": {"hidden_dim": 64, "num_heads": 4, "num_layers": 6,
                                      "latent_bits": 8, "free_bits": 1}})
    cfg = load_config(path, ["model.latent_bits=4", "model.free_bits=0.125", "model.arch=baseline"])
    assert isinstance(cfg, Config)
    m = cfg.model
    assert (m.hidden_dim, m.num_heads, m.num_layers) == (64, 4, 6)
    assert m.latent_bits == 4
    assert m.free_bits == 0.125 and isinstance(m.free_bits, float)
    assert m.arch == "baseline"
    assert m.inject_layer == 3 and m.num_key_value_heads == 4  # derived after the overrides
    # without overrides, the file's values; an int where a float is expected widens
    m2 = load_config(str(path)).model
    assert m2.latent_bits == 8 and m2.free_bits == 1.0 and isinstance(m2.free_bits, float)


def test_load_config_defaults_and_override_only():
    assert load_config() == Config()
    assert load_config(None, ["model.num_layers=4"]).model.inject_layer == 2
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.num_layers=abc"])
    assert "model.num_layers" in str(info.value) and "--set" in str(info.value)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize("data,key", [
    ({"model": {"num_layerz": 4}}, "model.num_layerz"),  # unknown key
    ({"modle": {}}, "modle"),  # unknown section
    ({"model": {"num_layers": "abc"}}, "model.num_layers"),  # wrong type
    ({"model": {"num_layers": 4.0}}, "model.num_layers"),  # a float is not an int
    ({"model": {"tie_embeddings": 1}}, "model.tie_embeddings"),  # an int is not a bool
    ({"model": {"vocab_size": True}}, "model.vocab_size"),  # a bool is not an int
    ({"model": {"arch": "gpt"}}, "model.arch"),  # not one of the literals
    ({"model": {"num_key_value_heads": "two"}}, "model.num_key_value_heads"),  # int or null
    ({"model": {"latent_bits": 0}}, "model.latent_bits"),  # invalid value
    ({"model": {"hidden_dim": 30, "num_heads": 4}}, "model.num_heads"),  # cross-field
    ({"model": {"num_layers": 4, "inject_layer": 4}}, "model.inject_layer"),
    ({"model": []}, "model"),  # a section that is not a mapping
    ({"train": {"worker_niceness": -5}}, "train.worker_niceness"),  # raising priority needs privileges
])
def test_bad_file_errors_name_file_and_dotted_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"{key}:" in msg
    assert info.value.key == key
    assert info.value.source == str(path)


def test_bad_override_names_file_and_key(tmp_path):
    path = write(tmp_path, {"model": {"latent_bits": 8}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.latent_bits=21"])
    msg = str(info.value)
    assert str(path) in msg and "model.latent_bits" in msg and "--set" in msg
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.latent_bits"])  # no '='
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.latent_bits.x=3"])  # descends into a scalar
    assert "model.latent_bits" in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(info.value)
    path = write(tmp_path, "model: [unclosed\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    path = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "mapping" in str(info.value)


def test_overrides_do_not_mutate_and_parse_scalars():
    data = {"model": {"latent_bits": 8}}
    out = apply_changes(data, parse_overrides(["model.latent_bits=4", "model.tie_embeddings=true",
                                               "model.inject_layer=null", "model.free_bits=0.25"]))
    assert data == {"model": {"latent_bits": 8}}
    assert out["model"] == {"latent_bits": 4, "tie_embeddings": True, "inject_layer": None,
                            "free_bits": 0.25}


def test_typed_changes_apply_before_derived_defaults():
    """A sweep's or comparison's typed values go in before __post_init__ derives defaults, so a
    derived value follows them (as a --set string does), and they are checked the same way."""
    base = load_config(None, ["model.hidden_dim=64", "model.num_heads=4"])
    changed = load_config(None, ["model.hidden_dim=64", "model.num_heads=4"], changes={"model.hidden_dim": 128})
    assert changed.model.intermediate_size == load_config(None, ["model.hidden_dim=128", "model.num_heads=4"]
                                                          ).model.intermediate_size != base.model.intermediate_size
    assert load_config(None, changes={"train.eval_tasks": ["ftray_letters"]}).train.eval_tasks == ["ftray_letters"]
    with pytest.raises(ConfigError, match="model.latent_bits") as e:
        load_config(None, changes={"model.latent_bits": "8"})  # typed: a string is not an int
    assert "model.latent_bits='8'" in str(e.value)  # the message says where the value came from


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------

CONFIGS = [
    Config(),
    Config(model=ModelConfig(arch="baseline", hidden_dim=64, num_heads=4, num_key_value_heads=2,
                             num_layers=6, latent_bits=4, free_bits=0.125, inject_layer=2,
                             latent_init="zero", latent_init_std=0.0, rms_norm_eps=1e-6,
                             tie_embeddings=True, dropout=0.1, rope_theta=500000.0)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_round_trip_yaml_and_json(cfg, tmp_path):
    assert from_dict(Config, yaml.safe_load(to_yaml(cfg))) == cfg
    assert from_dict(Config, json.loads(to_json(cfg))) == cfg
    # the resolved values are written out (no None left for derived fields)
    dumped = yaml.safe_load(to_yaml(cfg))["model"]
    assert dumped["num_key_value_heads"] == cfg.model.num_key_value_heads
    assert dumped["intermediate_size"] == cfg.model.intermediate_size
    assert dumped["inject_layer"] == cfg.model.inject_layer
    assert to_dict(cfg)["model"] == dumped
    # and via a file
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_round_trip_distinguishes_configs():
    assert CONFIGS[0] != CONFIGS[1]
    changed = from_dict(Config, {"model": {**to_dict(CONFIGS[1])["model"], "latent_bits": 5}})
    assert changed != CONFIGS[1]


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(ConfigError) as info:
        from_dict(Config, [1, 2], source="x.yaml")
    assert "x.yaml" in str(info.value)


def test_every_shipped_preset_loads_by_name():
    """Presets are package data found by name (ft_ray/presets.py); each one is a valid config."""
    from ft_ray.presets import PRESET_DIR, resolve_preset

    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"smoke", "letters-ft", "letters-baseline", "arith-ft", "gpu-125m"} <= set(names)
    for name in names:
        cfg = load_config(resolve_preset(name))
        assert cfg.train.name and cfg.model.vocab_size > 0, name
    arith = load_config(resolve_preset("arith-ft"))
    assert arith.data.task == "arith" and arith.train.eval_tasks == ["ftray_arith_choice", "ftray_arith_gen"]
