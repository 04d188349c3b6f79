"""Backend options: every accepted form, and a clear error for each bad one."""

from __future__ import annotations

import pytest

from fxprefetch import ConfigError, WeightPrefetchConfig
from fxprefetch.options import parse_options
from fxprefetch.targets import TARGET_NAMES


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
        ({"target": "gpu"}, "options.target", str(list(TARGET_NAMES))),
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
        # auto is inductor without an Ascend device: torchair_config would be dropped
        ({"torchair_config": object()}, "options.torchair_config", "'inductor' here"),
        (42, "options", "expected a dict"),
    ],
)
def test_bad_options_name_what_is_wrong(options, path, text):
    with pytest.raises(ConfigError) as err:
        parse_options(options)
    assert err.value.path == path
    assert text in str(err.value)


def test_the_ascend_lowering_option():
    """Ascend's captured graphs: the prefetch stream by default, in-stream on request."""
    assert parse_options(None).ascend_lowering == "side_stream"
    assert parse_options({"ascend_lowering": "in_stream"}).ascend_lowering == "in_stream"


def test_native_prefetch_lowering_and_cache_hint_options():
    opts = parse_options(None)
    assert (opts.native_prefetch, opts.cuda_lowering, opts.cache_hint) == (
        "auto",
        "side_stream",
        "none",
    )
    opts = parse_options(
        {"native_prefetch": "always", "cuda_lowering": "compute_stream", "cache_hint": "evict_last"}
    )
    assert (opts.native_prefetch, opts.cuda_lowering, opts.cache_hint) == (
        "always",
        "compute_stream",
        "evict_last",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"native_prefetch": "alway"},
            r"options\.native_prefetch: expected one of \['auto', 'always', 'never'\], "
            r"got \"alway\" \(did you mean 'always'\?\)",
        ),
        ({"native_prefetch": True}, r"options\.native_prefetch: expected one of .* got True"),
        ({"cuda_lowering": "side"}, r"options\.cuda_lowering: expected one of"),
        ({"cache_hint": "evict_first"}, r"options\.cache_hint: expected one of"),
        (
            {"ascend_lowering": "instream"},
            r"options\.ascend_lowering: expected one of \['side_stream', 'in_stream'\], "
            r"got \"instream\" \(did you mean 'in_stream'\?\)",
        ),
    ],
)
def test_bad_native_prefetch_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_options(options)


@pytest.mark.parametrize(
    ("policy", "cudagraphs", "native"),
    [
        ("auto", False, False),
        ("auto", True, True),
        ("always", False, True),
        ("never", True, False),
    ],
)
@pytest.mark.parametrize("lowering", ["side_stream", "compute_stream"])
def test_the_native_prefetch_is_used_where_it_pays(
    policy, cudagraphs, native, lowering, monkeypatch
):
    """Default mode: each native prefetch and join is a host call (25-40 µs on a GPU), more
    than a decode window hides, so "auto" keeps hints there and goes native only where the
    graph is replayed as a CUDA graph. The CPU stands in for a device with a native L2 path."""
    from fxprefetch import ops
    from fxprefetch.devices import device_setup

    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *a: None)
    monkeypatch.setitem(ops._NATIVE_L2, "cpu", ops.NativeL2(print, print, print))
    setup = device_setup(
        native_l2=True, cudagraphs=cudagraphs, native_prefetch=policy, cuda_lowering=lowering
    )
    assert ("cpu" in setup.native) is native and ("cpu" in setup.l2) is native
    assert ("cpu" in setup.joins) is (native and lowering == "side_stream")
    assert setup.lowering["cpu"].startswith("native" if native else "hints")
    assert f"native_prefetch {policy!r}" in setup.lowering["cpu"]
