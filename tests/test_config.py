import dataclasses

import pytest

from signround.config import ConfigError, QuantConfig, RunConfig, WeightScheme, parse_scheme


def test_presets():
    assert WeightScheme.preset("W4A16") == WeightScheme(4, 128, True)
    assert WeightScheme.preset("w2a16g64") == WeightScheme(2, 64, False)
    assert WeightScheme.preset("W8A16G-1") == WeightScheme(8, -1, True)


def test_groups_allow_a_partial_last_group():
    assert WeightScheme(4, 128, True).groups(576) == 5
    assert WeightScheme(4, -1, True).groups(576) == 1
    assert WeightScheme(4, 128, True).bits_per_weight(512) == pytest.approx(4 + 20 / 128)


def test_layer_specs_and_override_order():
    assert parse_scheme("bits=3,group_size=64,sym=false") == WeightScheme(3, 64, False)
    assert parse_scheme("fp16") is None
    config = QuantConfig(scheme="W4A16", layer_overrides={"mlp": "W8A16", r"mlp\.down": "fp16"})
    assert config.scheme_for("model.layers.0.mlp.up_proj") == WeightScheme(8, 128, True)
    assert config.scheme_for("model.layers.0.mlp.down_proj") is None
    assert config.scheme_for("model.layers.0.self_attn.q_proj") == WeightScheme(4, 128, True)


def test_config_round_trips_through_its_dict():
    config = QuantConfig(scheme="W2A16G64", method="rtn", layer_overrides={"down": "W8A16", "q_proj": None}, iters=7, lr=0.01)
    d = config.to_dict()
    assert d["scheme"] == {"bits": 2, "group_size": 64, "sym": False}
    assert d["layer_overrides"] == {"down": {"bits": 8, "group_size": 128, "sym": True}, "q_proj": None}
    assert QuantConfig.from_dict(d) == config


@pytest.mark.parametrize("kwargs, message", [
    ({"iters": -1}, "iters=-1 is out of range"),
    ({"batch_size": 0}, "batch_size=0 is out of range"),
    ({"lr": 0.0}, "lr=0.0 must be positive"),
    ({"keep": "first"}, "keep='first' is not one of best, last, average"),
    ({"tame_outliers": "yes"}, "tame_outliers='yes' must be True or False"),
    ({"scheme": {"bits": 4, "group_size": 128, "kquant": True}}, "no K-quant has 4 bits, groups of 128, sym: use Q2_K"),
    ({"scheme": "W1A16"}, "unknown scheme 'W1A16'"),
    ({"layer_overrides": {"x": "bits=3,colour=red"}}, "unknown layer setting 'colour'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_recipes_fill_only_what_is_unset():
    from signround.config import RECIPES

    fast = QuantConfig().resolved()
    assert fast.iters == RECIPES["fast"]["iters"] and fast.clip_search is True and fast.batch_size == RECIPES["fast"]["batch_size"]
    full, paper = QuantConfig(recipe="full").resolved(), QuantConfig(recipe="paper").resolved()
    assert (full.iters, full.batch_size, full.clip_search, full.keep) == (200, 8, True, "best") and fast.keep == "best"
    assert (paper.iters, paper.batch_size, paper.clip_search) == (200, 8, False)
    assert QuantConfig(recipe="paper", iters=50, clip_search=True).resolved().iters == 50
    assert fast.tame_outliers is False and full.tame_outliers is False
    assert QuantConfig(tame_outliers=True).resolved().tame_outliers is True
    assert QuantConfig.from_dict(full.to_dict()) == full


def test_replacing_the_recipe_gives_that_recipe_not_the_old_ones_values():
    """A recipe fills only the fields the user left unset, so they stay unset until resolved."""
    fast = QuantConfig(scheme="W3A16", nsamples=64)
    assert fast.iters is None and fast.batch_size is None
    full = dataclasses.replace(fast, recipe="full").resolved()
    assert (full.iters, full.batch_size, full.nsamples, full.scheme) == (200, 8, 64, fast.scheme)
    mine = dataclasses.replace(QuantConfig(iters=30), recipe="full").resolved()
    assert (mine.iters, mine.batch_size) == (30, 8)  # what the user set survives the change of recipe
    assert fast.resolved().resolved() == fast.resolved()


def test_an_unknown_key_in_a_saved_config_is_an_error():
    saved = QuantConfig(iters=9).to_dict()
    with pytest.raises(ConfigError, match="unknown quantization setting.*'colour'"):
        QuantConfig.from_dict({**saved, "colour": "red"})
    # run settings that earlier versions saved beside the quantization ones are read without them
    assert QuantConfig.from_dict({**saved, "device": "cpu", "cache_dtype": "float32"}) == QuantConfig(iters=9)


@pytest.mark.parametrize("kwargs, message", [
    ({"amp": "int8"}, "amp='int8' is not one of"),
    ({"cache_dtype": "int8"}, "cache_dtype='int8' is not one of"),
    ({"compile": "yes"}, "compile='yes' must be True, False or 'auto'"),
    ({"resume": "maybe"}, "resume='maybe' is not one of auto, force, never"),
    ({"threads": 0}, "threads=0 must be a positive integer"),
])
def test_bad_run_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**kwargs)
    with pytest.raises(ConfigError, match="recipe='slow' is not one of fast, full"):
        QuantConfig(recipe="slow")


def test_k_quant_presets_are_llama_cpp_types():
    q4 = WeightScheme.preset("q4_k")
    assert (q4.bits, q4.group_size, q4.sym, q4.kquant, q4.name()) == (4, 32, False, True, "Q4_K")
    assert q4.bits_per_weight(512) == 4.5 and WeightScheme.preset("Q6_K").bits_per_weight(256) == 6.5625
    assert q4.fits(512) and not q4.fits(576) and q4.fallback() == WeightScheme(5, 32, True)
    assert WeightScheme.preset("W4A16").fallback() is None and "kquant" not in WeightScheme().to_dict()
    config = QuantConfig(scheme="Q3_K", layer_overrides={"down": "Q6_K"})
    assert QuantConfig.from_dict(config.to_dict()) == config and parse_scheme("bits=6,group_size=16,kquant=true").name() == "Q6_K"


@pytest.mark.parametrize("name, fields", [
    ("MXFP4A16", (4, 32, "MXFP4")), ("nvfp4a16", (4, 16, "NVFP4")), ("MXFP8A16", (8, 32, "MXFP8")), ("FP8A16", (8, -1, "FP8")),
])
def test_float_presets_name_formats_users_know(name, fields):
    s = WeightScheme.preset(name)
    assert (s.bits, s.group_size, s.fp) == fields and s.sym and s.kind == "fp"
    assert WeightScheme.preset(s.name()) == s and parse_scheme(s.to_dict()) == s
    assert parse_scheme(f"fp={fields[2].lower()}") == s
    assert QuantConfig.from_dict(QuantConfig(scheme=name).to_dict()).scheme == s


def test_a_float_format_keeps_its_own_bits_and_groups():
    with pytest.raises(ConfigError, match="MXFP4 has 4-bit symmetric elements in groups of 32, not bits=4, group_size=128.*MXFP4A16"):
        WeightScheme(bits=4, group_size=128, fp="MXFP4")
    with pytest.raises(ConfigError, match="fp='FP6' is not a floating-point format: use one of FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4"):
        WeightScheme(fp="FP6")
    with pytest.raises(ConfigError, match="unknown scheme 'MXFP5A16'.*MXFP4A16, NVFP4A16"):
        WeightScheme.preset("MXFP5A16")
    assert not WeightScheme.preset("MXFP4A16").fits(575) and WeightScheme.preset("MXFP8A16").fits(575)


@pytest.mark.parametrize("name, fields", [
    ("W8A8", (8, -1, None, "INT8")), ("W4A8", (4, 128, None, "INT8")), ("W4A8G32", (4, 32, None, "INT8")), ("FP8", (8, -1, "FP8", "FP8")),
    ("W8A8-FP8", (8, -1, "FP8", "FP8")), ("MXFP4", (4, 32, "MXFP4", "MXFP4")), ("MXFP8", (8, 32, "MXFP8", "MXFP8")),
    ("NVFP4", (4, 16, "NVFP4", "NVFP4")),
])
def test_presets_with_quantized_inputs(name, fields):
    s = WeightScheme.preset(name)
    assert (s.bits, s.group_size, s.fp, s.act) == fields
    assert WeightScheme.preset(s.name()) == s and parse_scheme(s.to_dict()) == s
    assert QuantConfig.from_dict(QuantConfig(scheme=name).to_dict()).scheme == s


def test_impossible_input_formats_say_so():
    with pytest.raises(ConfigError, match="act='int4' is not an activation format: use one of INT8, FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4"):
        parse_scheme("bits=4,group_size=32,act=int4")
    with pytest.raises(ConfigError, match="Q4_K is a llama.cpp type, which quantizes its inputs itself"):
        WeightScheme(4, 32, False, kquant=True, act="INT8")
