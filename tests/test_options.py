"""Backend options: every accepted form, and a clear error for each bad one."""

from __future__ import annotations

import pytest

from fxprefetch import ConfigError, WeightPrefetchConfig
from fxprefetch.options import parse_options


def test_no_options_means_the_guides_defaults_enabled():
    opts = parse_options(None)
    assert opts.config == WeightPrefetchConfig(enabled=True)
    assert (opts.target, opts.strict, opts.torchair_config) == ("auto", False, None)


@pytest.mark.parametrize(
    "form",
    [
        WeightPrefetchConfig.from_dict({"enabled": True, "prefetch_ratio": {"mlp": {"down": 0.5}}}),
        '{"prefetch_ratio": {"mlp": {"down": 0.5}}}',
        {"weight_prefetch_config": {"prefetch_ratio": {"mlp": {"down": 0.5}}}},
        {"weight_prefetch_config": '{"prefetch_ratio": {"mlp": {"down": 0.5}}}'},
        {
            "additional_config": '{"weight_prefetch_config": '
            '{"prefetch_ratio": {"mlp": {"down": 0.5}}},'
            ' "torchair_graph_config": {"enabled": true}}'
        },
        {
            "additional_config": {
                "weight_prefetch_config": {"prefetch_ratio": {"mlp": {"down": 0.5}}}
            }
        },
    ],
)
def test_accepted_forms(form):
    config = parse_options(form).config
    assert config.enabled and config.ratio("mlp.down") == 0.5 and config.ratio("mlp.gate_up") == 1


def test_explicit_disable_is_respected():
    assert not parse_options({"weight_prefetch_config": {"enabled": False}}).config.enabled
    assert not parse_options(WeightPrefetchConfig(enabled=False)).config.enabled


@pytest.mark.parametrize(
    ("options", "path", "text"),
    [
        ({"weight_prefetch_cfg": {}}, "options.weight_prefetch_cfg", "'weight_prefetch_config'"),
        ({"targt": "eager"}, "options.targt", "'target'"),
        ({"target": "gpu"}, "options.target", "['auto', 'npu', 'inductor', 'eager']"),
        ({"target": "inductr"}, "options.target", "'inductor'"),
        ({"target": 3}, "options.target", "expected one of"),
        ({"strict": "yes"}, "options.strict", "boolean"),
        ({"mode": "reduce-overhed"}, "options.mode", "'reduce-overhead'"),
        ({"rules": {"linear_ops": []}}, "options.rules", "PrefetchRules"),
        ({"weight_prefetch_config": {}, "additional_config": "{}"}, "options", "not both"),
        (
            {"weight_prefetch_config": {"enable": True}},
            "options.weight_prefetch_config.enable",
            "'enabled'",
        ),
        ({"additional_config": "{bad json"}, "options.additional_config", "line 1, column 2"),
        ({"additional_config": "[1]"}, "options.additional_config", "JSON object"),
        ({"target": "eager", "torchair_config": object()}, "options.torchair_config", "npu"),
        (42, "options", "expected a dict"),
    ],
)
def test_bad_options_name_what_is_wrong(options, path, text):
    with pytest.raises(ConfigError) as err:
        parse_options(options)
    assert err.value.path == path
    assert text in str(err.value)
