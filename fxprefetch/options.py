"""``torch.compile(..., backend="npu_prefetch", options=...)``: parsing and validation."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.devices import ASCEND_LOWERINGS, CACHE_HINTS, CUDA_LOWERINGS, NATIVE_POLICIES
from fxprefetch.devices.prediction import DeviceProfile
from fxprefetch.devices.profiles import device_profile_option
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.targets import AUTO, TARGET_NAMES, resolve_target
from fxprefetch.validation import ConfigError, did_you_mean, parse_json

OPTION_KEYS = (
    "weight_prefetch_config",
    "additional_config",
    "target",
    "strict",
    "torchair_config",
    "rules",
    "mode",
    "native_prefetch",
    "cuda_lowering",
    "cache_hint",
    "ascend_lowering",
    "device_profile",
)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class BackendOptions:
    config: WeightPrefetchConfig
    target: str = "auto"
    strict: bool = False
    torchair_config: Any = None
    rules: PrefetchRules | None = (
        None  # None: fxprefetch.passes.tables.rules.current_rules() at compile time
    )
    mode: str | None = None  # torch.compile's mode, for callers that also pass options
    native_prefetch: str = "auto"  # native prefetch where CUDA graphs replay, else hints
    cuda_lowering: str = "side_stream"  # or "compute_stream" (no fork/join)
    cache_hint: str = "none"  # or "evict_last"
    ascend_lowering: str = "side_stream"  # or "in_stream" (captured Ascend graphs; experiments)
    # the device profile predictions use on this GPU/NPU (a built-in name or a file's path);
    # None: the built-in profile the device's name matches
    device_profile: DeviceProfile | None = None


def _choice(options: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    """``options[key]`` (default: the first choice), one of ``choices``."""
    value = options.get(key, choices[0])
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        shown = json.dumps(value) if isinstance(value, str) else repr(value)
        raise ConfigError(f"options.{key}", f"expected one of {list(choices)}, got {shown}{hint}")
    return value


def _config_from(value: Any, path: str) -> WeightPrefetchConfig:
    """A config from an object, dict or JSON string; ``enabled`` defaults to true here."""
    if isinstance(value, str):
        value = parse_json(value, path)
    if not isinstance(value, WeightPrefetchConfig):
        value = WeightPrefetchConfig.from_dict(value, path)
    return value.settled(default_enabled=True)


def parse_options(options: Any) -> BackendOptions:
    """Validate backend options. Accepted forms:

    - None: the guide's defaults with prefetch enabled;
    - a :class:`WeightPrefetchConfig`, or the JSON string of a ``weight_prefetch_config``;
    - a dict with keys among ``OPTION_KEYS``.

    Under this backend ``enabled`` defaults to true wherever it is not written.
    """
    if options is None:
        return BackendOptions(WeightPrefetchConfig(enabled=True))
    if isinstance(options, (WeightPrefetchConfig, str)):
        return BackendOptions(_config_from(options, "options"))
    if not isinstance(options, Mapping):
        raise ConfigError(
            "options",
            "expected a dict, a WeightPrefetchConfig or a JSON string, "
            f"got {type(options).__name__}",
        )
    for key in options:
        if key not in OPTION_KEYS:
            hint = did_you_mean(str(key), OPTION_KEYS)
            raise ConfigError(
                f"options.{key}", f"unknown option{hint}; expected one of {list(OPTION_KEYS)}"
            )
    if "weight_prefetch_config" in options and "additional_config" in options:
        raise ConfigError(
            "options", "give either weight_prefetch_config or additional_config, not both"
        )
    if "additional_config" in options:
        config = WeightPrefetchConfig.from_additional_config(
            options["additional_config"], "options.additional_config"
        )
        config = config.settled(default_enabled=True)
    elif "weight_prefetch_config" in options:
        config = _config_from(options["weight_prefetch_config"], "options.weight_prefetch_config")
    else:
        config = WeightPrefetchConfig(enabled=True)
    target = options.get("target", AUTO)
    if target not in TARGET_NAMES:
        hint = did_you_mean(target, TARGET_NAMES) if isinstance(target, str) else ""
        raise ConfigError(
            "options.target",
            f"expected one of {list(TARGET_NAMES)}, got {target!r}{hint}",
        )
    strict = options.get("strict", False)
    if not isinstance(strict, bool):
        raise ConfigError("options.strict", f"expected a boolean, got {strict!r}")
    torchair_config = options.get("torchair_config")
    resolved = resolve_target(target)
    if torchair_config is not None and resolved != "npu":
        here = f" ({resolved!r} here: torch_npu sees no Ascend device)" if target == AUTO else ""
        raise ConfigError(
            "options.torchair_config",
            f"only used with target 'npu', but target is {target!r}{here}",
        )
    rules = options.get("rules")
    if rules is not None and not isinstance(rules, PrefetchRules):
        raise ConfigError(
            "options.rules",
            f"expected a fxprefetch.passes.PrefetchRules value, got {type(rules).__name__}",
        )
    mode = options.get("mode")
    if mode is not None and mode not in MODES:
        hint = did_you_mean(mode, MODES) if isinstance(mode, str) else ""
        raise ConfigError("options.mode", f"expected one of {list(MODES)}, got {mode!r}{hint}")
    return BackendOptions(
        config,
        target,
        strict,
        torchair_config,
        rules,
        mode,
        _choice(options, "native_prefetch", NATIVE_POLICIES),
        _choice(options, "cuda_lowering", CUDA_LOWERINGS),
        _choice(options, "cache_hint", CACHE_HINTS),
        _choice(options, "ascend_lowering", ASCEND_LOWERINGS),
        device_profile_option(options["device_profile"])
        if options.get("device_profile") is not None
        else None,
    )
