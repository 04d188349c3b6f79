"""WeightPrefetchConfig: every validation rule, constructors, round trips and digests."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprefetch import ConfigError, PrefetchRatios, WeightPrefetchConfig
from fxprefetch.config import DEFAULT_MAX_PREFETCH_BYTES


def test_defaults_are_the_guides():
    cfg = WeightPrefetchConfig()
    # not written: off where vllm-ascend's additional_config says nothing (the guide's default)
    assert cfg.enabled is None and cfg.settled(default_enabled=False).enabled is False
    assert WeightPrefetchConfig.from_additional_config("{}").settled(False).enabled is False
    guide = {
        "attn": {"qkv": 1.0, "o": 1.0},
        "moe": {"gate_up": 0.8},
        "mlp": {"gate_up": 1.0, "down": 1.0},
    }
    written = cfg.to_dict()["prefetch_ratio"]  # the guide's roles (and any role added since)
    assert {
        section: {k: written[section][k] for k in keys} for section, keys in guide.items()
    } == guide
    # the cap, not written: the device's own where it has one, else the guide's 18 MiB
    assert cfg.max_prefetch_bytes is None and "max_prefetch_bytes" not in cfg.to_dict()
    assert cfg.cap() == DEFAULT_MAX_PREFETCH_BYTES == 18 * 1024 * 1024
    assert cfg.cap(device_cap=8 << 20) == 8 << 20
    written = WeightPrefetchConfig.from_dict({"max_prefetch_bytes": 4096})
    assert written.cap(device_cap=8 << 20) == 4096  # a written cap always wins
    assert cfg.sequence_parallel is False
    # windows, not written: the device's own (vector windows, plus attention on a GPU)
    assert cfg.windows is None and "windows" not in cfg.to_dict()
    assert cfg.window_kinds() == ("vector",)
    assert cfg.window_kinds(("vector", "attention")) == ("vector", "attention")
    written = WeightPrefetchConfig.from_dict({"windows": ["vector"]})
    assert written.window_kinds(("vector", "attention")) == ("vector",)  # written wins
    assert written.digest != cfg.digest


def test_guide_examples_parse():
    moe = WeightPrefetchConfig.from_additional_config("""{
        "weight_prefetch_config": {"enabled": true, "prefetch_ratio": {
            "attn": {"qkv": 1.0, "o": 1.0}, "moe": {"gate_up": 0.8}}}}""")
    assert moe.enabled and moe.ratio("moe.gate_up") == 0.8 and moe.ratio("mlp.down") == 1.0
    dense = WeightPrefetchConfig.from_json(
        '{"enabled": true, "prefetch_ratio": {"mlp": {"gate_up": 0.5, "down": 0.25}}}'
    )
    assert dense.ratio("mlp.gate_up") == 0.5 and dense.ratio("mlp.down") == 0.25
    assert dense.ratio("attn.qkv") == 1.0  # unspecified roles keep the guide's default


def test_additional_config_ignores_other_keys_and_defaults_when_absent():
    cfg = WeightPrefetchConfig.from_additional_config(
        '{"ascend_scheduler_config": {"enabled": true}, "torchair_graph_config": {}}'
    )
    assert cfg == WeightPrefetchConfig()


def test_additional_config_warns_on_a_near_miss(caplog):
    with caplog.at_level("WARNING", logger="fxprefetch"):
        WeightPrefetchConfig.from_additional_config('{"weight_prefetch_cfg": {"enabled": true}}')
    assert "weight_prefetch_cfg" in caplog.text


@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        ('{"enable": true}', "weight_prefetch_config.enable", "'enabled'"),
        (
            '{"prefetch_ratio": {"mpl": {"down": 1}}}',
            "weight_prefetch_config.prefetch_ratio.mpl",
            "'mlp'",
        ),
        (
            '{"prefetch_ratio": {"mlp": {"gate_up_proj": 1}}}',
            "weight_prefetch_config.prefetch_ratio.mlp.gate_up_proj",
            "'gate_up'",
        ),
        (
            '{"prefetch_ratio": {"attn": {"qkv_proj": 1}}}',
            "weight_prefetch_config.prefetch_ratio.attn.qkv_proj",
            "'qkv'",
        ),
        (
            '{"prefetch_ratio": {"moe": {"gate": 1}}}',
            "weight_prefetch_config.prefetch_ratio.moe.gate",
            "'gate_up'",
        ),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(text, path, hint):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_json(text)
    assert err.value.path == path
    assert hint in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        "0.5",
        True,
        False,
        None,
        -0.1,
        1.0001,
        2,
        float("nan"),
        float("inf"),
        float("-inf"),
        [0.5],
        {"x": 1},
        10**400,
    ],
)
def test_bad_ratios_are_rejected(bad):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_dict({"prefetch_ratio": {"attn": {"o": bad}}})
    assert err.value.path == "weight_prefetch_config.prefetch_ratio.attn.o"
    assert "[0, 1]" in str(err.value)


@pytest.mark.parametrize("good", [0, 1, 0.0, 1.0, 0.25, 1e-9])
def test_ratio_bounds_are_inclusive(good):
    cfg = WeightPrefetchConfig.from_dict({"prefetch_ratio": {"mlp": {"down": good}}})
    assert cfg.ratio("mlp.down") == float(good)


@pytest.mark.parametrize("bad", ["false", "true", 0, 1, None, [], {}])
def test_enabled_must_be_a_json_boolean(bad):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_dict({"enabled": bad})
    assert err.value.path == "weight_prefetch_config.enabled"
    assert "boolean" in str(err.value)


def test_the_string_false_never_enables():
    with pytest.raises(ConfigError):
        WeightPrefetchConfig.from_json('{"enabled": "false"}')


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ([], "weight_prefetch_config"),
        ({"prefetch_ratio": [1]}, "weight_prefetch_config.prefetch_ratio"),
        ({"prefetch_ratio": {"mlp": 1.0}}, "weight_prefetch_config.prefetch_ratio.mlp"),
        ({"prefetch_ratio": {"attn": None}}, "weight_prefetch_config.prefetch_ratio.attn"),
    ],
)
def test_sections_must_be_objects(value, path):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_dict(value)
    assert err.value.path == path
    assert "JSON object" in str(err.value)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 18874368.0, "18MiB", True, None])
def test_max_prefetch_bytes_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_dict({"max_prefetch_bytes": bad})
    assert err.value.path == "weight_prefetch_config.max_prefetch_bytes"


def test_max_prefetch_bytes_is_configurable():
    assert WeightPrefetchConfig.from_dict({"max_prefetch_bytes": 4096}).max_prefetch_bytes == 4096


@pytest.mark.parametrize(
    ("bad", "path"),
    [
        ([], "weight_prefetch_config.windows"),
        ("vector", "weight_prefetch_config.windows"),
        (["vectr"], "weight_prefetch_config.windows[0]"),
        (["vector", "vector"], "weight_prefetch_config.windows[1]"),
        (["vector", 3], "weight_prefetch_config.windows[1]"),
    ],
)
def test_windows_are_validated(bad, path):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_dict({"windows": bad})
    assert err.value.path == path


def test_windows_opt_in_is_normalized():
    cfg = WeightPrefetchConfig.from_dict({"windows": ["collective", "vector"]})
    assert cfg.windows == ("vector", "collective")


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ('{"enabled": true,}', 1, 18),
        ('{\n  "enabled": tru\n}', 2, 14),
        ("", 1, 1),
    ],
)
def test_malformed_json_reports_line_and_column(text, line, col):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_json(text)
    assert f"line {line}, column {col}" in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"prefetch_ratio": {"attn": {"o": NaN}}}',
        '{"prefetch_ratio": {"attn": {"o": Infinity}}}',
        '{"enabled": true, "enabled": false}',
    ],
)
def test_non_standard_json_is_rejected(text):
    with pytest.raises(ConfigError):
        WeightPrefetchConfig.from_json(text)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError):
        WeightPrefetchConfig(enabled="false")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PrefetchRatios(mlp_down=1.5)


def test_ratio_zero_is_kept_as_zero():
    cfg = WeightPrefetchConfig.from_dict({"prefetch_ratio": {"attn": {"qkv": 0}}})
    assert cfg.ratio("attn.qkv") == 0.0


def test_frozen_hashable_and_digest_is_stable():
    a = WeightPrefetchConfig.from_json(
        '{"enabled": true, "prefetch_ratio": {"mlp": {"down": 0.5}}}'
    )
    b = WeightPrefetchConfig.from_dict(json.loads(a.to_json()))
    assert a == b and hash(a) == hash(b) and a.digest == b.digest and len(a.digest) == 16
    assert a.digest != a.with_enabled(False).digest
    with pytest.raises(AttributeError):
        a.enabled = False  # type: ignore[misc]
    assert len({a, b, WeightPrefetchConfig()}) == 2


def test_ratios_lookup_rejects_unknown_roles():
    with pytest.raises(KeyError, match=r"mlp\.down"):
        WeightPrefetchConfig().ratio("mlp.dwn")


# -- property: any JSON-like value is accepted and round-trips, or raises ConfigError ---------
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 10**20)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "enabled",
                    "enable",
                    "prefetch_ratio",
                    "attn",
                    "mlp",
                    "moe",
                    "qkv",
                    "o",
                    "gate_up",
                    "down",
                    "max_prefetch_bytes",
                    "sequence_parallel",
                    "windows",
                    "vector",
                    "x",
                ]
            )
            | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_ratio = st.one_of(st.floats(0, 1), st.integers(0, 1), st.just(0.0), st.just(1.0))
_valid = st.fixed_dictionaries(
    {},
    optional={
        "enabled": st.booleans(),
        "prefetch_ratio": st.fixed_dictionaries(
            {},
            optional={
                "attn": st.fixed_dictionaries({}, optional={"qkv": _ratio, "o": _ratio}),
                "moe": st.fixed_dictionaries({}, optional={"gate_up": _ratio}),
                "mlp": st.fixed_dictionaries({}, optional={"gate_up": _ratio, "down": _ratio}),
            },
        ),
        "max_prefetch_bytes": st.integers(1, 2**40),
        "sequence_parallel": st.booleans(),
        "windows": st.sampled_from(
            [["vector"], ["collective", "vector"], ["vector", "collective"]]
        ),
    },
)


def _accepts_or_config_error(value) -> None:
    try:
        cfg = WeightPrefetchConfig.from_dict(value)
    except ConfigError:
        return
    again = WeightPrefetchConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.digest == cfg.digest
    assert WeightPrefetchConfig.from_json(cfg.to_json()) == cfg


@settings(max_examples=300)
@given(_json)
def test_arbitrary_json_is_accepted_or_config_error(value):
    _accepts_or_config_error(value)
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return
    with contextlib.suppress(ConfigError):
        WeightPrefetchConfig.from_json(text)


@settings(max_examples=200)
@given(_valid)
def test_valid_configs_round_trip_with_their_values(value):
    cfg = WeightPrefetchConfig.from_dict(value)
    assert WeightPrefetchConfig.from_dict(cfg.to_dict()) == cfg
    for section, body in value.get("prefetch_ratio", {}).items():
        for name, ratio in body.items():
            assert math.isclose(cfg.ratio(f"{section}.{name}"), float(ratio))


# -- config edges: odd but valid values ----------------------------------------------------------


def test_an_object_and_the_same_json_mean_the_same_under_the_backend():
    from fxprefetch.options import parse_options

    ratios = {"attn": {"qkv": 0.5}}
    as_object = WeightPrefetchConfig.from_dict({"prefetch_ratio": ratios})
    as_json = json.dumps({"prefetch_ratio": ratios})
    for options in (as_object, {"weight_prefetch_config": as_object}):
        assert parse_options(options).config == parse_options(as_json).config
        assert parse_options(options).config.enabled is True
    assert parse_options(WeightPrefetchConfig()).config == parse_options("{}").config
    off = WeightPrefetchConfig(enabled=False)
    assert parse_options(off).config == parse_options('{"enabled": false}').config


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"attn": {"qkv": -0.0}}, {"attn": {"qkv": 0.0}}),
        ({"mlp": {"down": 1}}, {"mlp": {"down": 1.0}}),
        ({"moe": {"gate_up": 0}}, {"moe": {"gate_up": 0.0}}),
    ],
)
def test_equal_configs_have_equal_digests(a, b):
    left = WeightPrefetchConfig.from_dict({"prefetch_ratio": a})
    right = WeightPrefetchConfig.from_dict({"prefetch_ratio": b})
    assert left == right and hash(left) == hash(right) and left.digest == right.digest
    direct = WeightPrefetchConfig(prefetch_ratio=PrefetchRatios(attn_qkv=1, mlp_down=-0.0))
    parsed = WeightPrefetchConfig.from_dict({"prefetch_ratio": {"mlp": {"down": 0.0}}})
    assert direct.digest == parsed.digest


def test_collective_windows_alone_are_rejected():
    with pytest.raises(
        ConfigError, match=r'windows: .*cannot stand alone.*\["vector", "collective"\]'
    ):
        WeightPrefetchConfig.from_dict({"windows": ["collective"]})
    ok = WeightPrefetchConfig.from_dict({"windows": ["collective", "vector"]})
    assert ok.windows == ("vector", "collective")


@pytest.mark.parametrize(
    "key", ["weight_prefetch_cfg", "weight_prefetch", "Weight_Prefetch_Config"]
)
def test_a_misspelled_section_in_additional_config_warns_with_the_closest_key(key, caplog):
    from fxprefetch.options import parse_options

    text = json.dumps({key: {"enabled": True}, "ascend_scheduler_config": {}})
    with caplog.at_level("WARNING", logger="fxprefetch"):
        config = WeightPrefetchConfig.from_additional_config(text)
    assert config.settled(False).enabled is False
    (record,) = caplog.records
    assert key in record.getMessage() and "'weight_prefetch_config'" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fxprefetch"):
        parse_options({"additional_config": text})  # the backend reads it with the same parser
    assert len(caplog.records) == 1


def test_other_vllm_ascend_keys_do_not_warn(caplog):
    text = json.dumps({"torchair_graph_config": {}, "ascend_scheduler_config": {}})
    with caplog.at_level("WARNING", logger="fxprefetch"):
        WeightPrefetchConfig.from_additional_config(text)
    assert not caplog.records


@pytest.mark.parametrize("depth", [2000, 100000])
def test_deeply_nested_json_is_a_config_error(depth):
    text = "[" * depth + "]" * depth
    with pytest.raises(ConfigError, match=r"nested too deeply|expected a JSON object"):
        WeightPrefetchConfig.from_json(text)
    nested = '{"enabled": true, "prefetch_ratio": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    with pytest.raises(ConfigError):
        WeightPrefetchConfig.from_json(nested)
    with pytest.raises(ConfigError):
        WeightPrefetchConfig.from_additional_config('{"x": ' + "[" * depth + "]" * depth + "}")


# -- "auto" sizes and attention windows ---------------------------------------------


def test_auto_sizes_are_validated_and_digest_covered():
    auto = WeightPrefetchConfig.from_dict(
        {"max_prefetch_bytes": "auto", "prefetch_ratio": {"mlp": {"down": "auto"}}}
    )
    assert auto.auto_cap and auto.auto_ratio("mlp.down") and not auto.auto_ratio("mlp.gate_up")
    assert auto.ratio("mlp.down") == 1.0  # up to the whole weight, as the window allows
    assert auto.cap(device_cap=4096) == 4096  # the fallback where no profile says more
    assert WeightPrefetchConfig.from_json(auto.to_json()) == auto
    assert len({auto.digest, WeightPrefetchConfig().digest}) == 2
    for bad, path in (
        ({"max_prefetch_bytes": "Auto"}, "weight_prefetch_config.max_prefetch_bytes"),
        (
            {"prefetch_ratio": {"attn": {"o": "max"}}},
            "weight_prefetch_config.prefetch_ratio.attn.o",
        ),
    ):
        with pytest.raises(ConfigError, match='or "auto"') as err:
            WeightPrefetchConfig.from_dict(bad)
        assert err.value.path == path


def test_attention_windows_are_a_window_kind_that_widens_vector_windows():
    cfg = WeightPrefetchConfig.from_dict({"windows": ["attention", "vector", "collective"]})
    assert cfg.windows == ("vector", "collective", "attention")
    with pytest.raises(ConfigError, match=r'\["vector", "attention"\]'):
        WeightPrefetchConfig.from_dict({"windows": ["attention"]})


def test_ratios_read_back_by_role_or_attribute_and_change_with_replace():
    ratios = PrefetchRatios(mlp_down=0.5)
    assert ratios["mlp.down"] == ratios.mlp_down == 0.5 and ratios.attn_qkv == 1.0
    changed = dataclasses.replace(ratios, attn_qkv=0.25)
    assert changed.attn_qkv == 0.25 and changed.mlp_down == 0.5  # the rest is kept
    assert eval(repr(changed), {"PrefetchRatios": PrefetchRatios}) == changed
    assert repr(PrefetchRatios()).startswith("PrefetchRatios(attn_qkv=1.0, attn_o=1.0, ")
    with pytest.raises(TypeError, match=r"no role 'mlp_dwn' \(did you mean 'mlp_down'\?\)"):
        PrefetchRatios(mlp_dwn=0.5)
    with pytest.raises(ValueError, match=r"by_role: unknown role 'mlp\.dwn'"):
        PrefetchRatios(by_role=[("mlp.dwn", 0.5)])
    with pytest.raises(AttributeError, match="no attribute 'mlp'"):
        ratios.mlp  # noqa: B018
