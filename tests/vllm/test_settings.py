"""Where the vLLM pass reads its settings (fxprefetch/vllm/settings.py) and how the flag gets
past vllm-ascend's config (fxprefetch/vllm/ascend.py: prepare_flag), on plain objects.

The same runs on vllm-ascend's real source in tests/vllm/test_vllm_ascend_versions.py.
"""

from __future__ import annotations

import json
import logging
import pickle
from types import SimpleNamespace

import pydantic
import pytest

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.validation import ConfigError
from fxprefetch.vllm import ascend as vllm_ascend
from fxprefetch.vllm import settings as vllm_settings
from fxprefetch.vllm.compiling import compiling
from fxprefetch.vllm_plugin import WeightPrefetchPass

SECTION = {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0.5}}}
OTHER = {"enabled": True, "prefetch_ratio": {"mlp": {"down": 0.25}}}
ROUTE = "fxprefetch.vllm_plugin.weight_prefetch_pass"


def vllm(additional=None):
    return SimpleNamespace(additional_config=additional)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(vllm_settings.ENV_VAR, raising=False)
    monkeypatch.setattr(vllm_settings, "_warned", set())


# -- FXPREFETCH_CONFIG ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [json.dumps(SECTION), json.dumps({"weight_prefetch_config": SECTION, "enable_kv_nz": 1})],
    ids=["the section", "the --additional-config object"],
)
def test_fxprefetch_config_holds_the_json(monkeypatch, text):
    monkeypatch.setenv(vllm_settings.ENV_VAR, text)
    assert vllm_settings.settings(vllm()) == WeightPrefetchConfig.from_dict(SECTION)


def test_fxprefetch_config_names_a_json_file(monkeypatch, tmp_path):
    path = tmp_path / "prefetch.json"
    path.write_text(json.dumps({"weight_prefetch_config": SECTION}))
    monkeypatch.setenv(vllm_settings.ENV_VAR, str(path))
    assert vllm_settings.settings(vllm()).ratio("attn.qkv") == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"prefetch_ratio": {"attn": {"qkv": 1.5}}}',
            "FXPREFETCH_CONFIG.prefetch_ratio.attn.qkv: expected a number in [0, 1], got 1.5",
        ),
        (
            '{"weight_prefetch_config": {"enable": true}}',
            "FXPREFETCH_CONFIG.weight_prefetch_config",
        ),
        ("/no/such/file.json", "FXPREFETCH_CONFIG: expected a JSON object or the path of a JSON"),
        ('{"enabled": true', "FXPREFETCH_CONFIG: malformed JSON"),
    ],
)
def test_a_bad_fxprefetch_config_is_refused_by_the_same_validation(monkeypatch, text, message):
    monkeypatch.setenv(vllm_settings.ENV_VAR, text)
    with pytest.raises(ConfigError) as err:
        vllm_settings.settings(vllm())
    assert message in str(err.value)


def test_additional_config_wins_over_fxprefetch_config_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(vllm_settings.ENV_VAR, json.dumps(OTHER))
    config = vllm({"weight_prefetch_config": SECTION})
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        for _ in range(3):
            assert vllm_settings.settings(config) == WeightPrefetchConfig.from_dict(SECTION)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "FXPREFETCH_CONFIG and additional_config.weight_prefetch_config are both given: "
        "additional_config wins, FXPREFETCH_CONFIG is ignored"
    ]


def test_the_explicit_pass_reads_fxprefetch_config_and_keys_its_cache_by_it(monkeypatch):
    """The explicit route's pass (no additional_config): its settings and its uuid() (vLLM's
    compile-cache key for it) follow FXPREFETCH_CONFIG."""
    plain = WeightPrefetchPass()
    default_key = plain.uuid()
    monkeypatch.setenv(vllm_settings.ENV_VAR, json.dumps(SECTION))
    assert plain.config().ratio("attn.qkv") == 0.5
    key = plain.uuid()
    monkeypatch.setenv(vllm_settings.ENV_VAR, json.dumps(OTHER))
    assert plain.uuid() not in {key, default_key}
    monkeypatch.setenv(vllm_settings.ENV_VAR, json.dumps(SECTION))
    assert plain.uuid() == key


def test_the_flags_pass_keeps_its_settings_in_a_copy_of_the_config():
    """vLLM copies configs with dataclasses.replace (which drops what is not a field): the
    pass the flag installed keeps the settings it was bound to."""
    bound = WeightPrefetchConfig.from_dict(SECTION).settled(True)
    pass_ = WeightPrefetchPass(bound=bound)
    with compiling(vllm({}), pass_):  # a config without the section is current
        assert pass_.config() == bound


# -- the flag past vllm-ascend's config (prepare_flag) ----------------------------------------
class Tolerant:  # vllm-ascend 0.23-0.26: AscendConfig(vllm_config) reads keys with .get()
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(extra="forbid"))
class Strict:  # 0.27.1rc1-0.30.0rc2: keys as keywords, unknown ones refused
    enable_kv_nz: bool = False


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(extra="forbid"))
class StrictWithOurKey:  # a layout fxprefetch does not know: a field of its own named as ours
    weight_prefetch_config: dict | None = None


def ascend_module(monkeypatch, cls):
    module = SimpleNamespace(AscendConfig=cls, init_ascend_config=lambda vllm_config: None)
    monkeypatch.setattr(vllm_ascend, "_ascend_config_module", lambda: module)
    monkeypatch.setattr(vllm_ascend, "_ascend_version", lambda: "0.31.0")


def test_a_tolerant_vllm_ascend_sees_the_flag_as_written(monkeypatch):
    ascend_module(monkeypatch, Tolerant)
    written = {"weight_prefetch_config": SECTION, "enable_kv_nz": True}
    config = vllm(written)
    assert vllm_ascend.prepare_flag(config) == vllm_ascend.LAYOUT_TOLERANT
    assert config.additional_config is written


def test_a_strict_vllm_ascend_never_sees_our_key_and_keeps_its_own(monkeypatch):
    ascend_module(monkeypatch, Strict)
    written = {"weight_prefetch_config": SECTION, "enable_kv_nz": True}
    config = vllm(written)
    assert vllm_ascend.prepare_flag(config) == vllm_ascend.LAYOUT_STRICT
    assert config.additional_config == {"enable_kv_nz": True}
    assert written == {"weight_prefetch_config": SECTION, "enable_kv_nz": True}  # the user's
    Strict(**config.additional_config)  # what init_ascend_config then builds: accepted
    with pytest.raises(pydantic.ValidationError):
        Strict(**written)  # what it refused before
    # fxprefetch still reads the section, also from the config a worker unpickles
    for seen in (config, pickle.loads(pickle.dumps(config))):
        assert vllm_settings.additional_config(seen)["weight_prefetch_config"] == SECTION
        assert vllm_settings.flag_given(seen) and vllm_ascend.fxprefetch_wanted(seen)


def test_an_unknown_layout_stops_with_our_one_line_error(monkeypatch):
    ascend_module(monkeypatch, StrictWithOurKey)
    with pytest.raises(ConfigError) as err:
        vllm_ascend.prepare_flag(vllm({"weight_prefetch_config": SECTION}))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("additional_config.weight_prefetch_config: vllm-ascend 0.31.0 ")
    assert ROUTE in message and "FXPREFETCH_CONFIG" in message


def test_without_the_flag_no_layout_matters(monkeypatch):
    ascend_module(monkeypatch, StrictWithOurKey)
    config = vllm({"enable_kv_nz": True})
    assert vllm_ascend.prepare_flag(config) is None
    assert config.additional_config == {"enable_kv_nz": True}
