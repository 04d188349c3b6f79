"""A general toolkit for validating parsed JSON: every error names the JSON path it is about.

Type checks, number checks, key checks with a did-you-mean hint and strict JSON parsing. Nothing
here knows a schema; ``fxprefetch.config`` (the ``weight_prefetch_config`` schema) and
``fxprefetch.options`` (the backend's options) are built from it.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from fxprefetch.errors import ConfigError

AUTO = "auto"  # a size the device's profile decides: what the window can hide
JSON_TOO_DEEP = "JSON nested too deeply"


def describe(value: Any) -> str:
    """How an error message names a value: its JSON type, and the value where it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"{type(value).__name__} {value!r}"


def did_you_mean(key: str, allowed: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """A ``" (did you mean 'x'?)"`` suffix for ``key``, or ``""`` when nothing is close.

    ``aliases`` maps known misspellings (lower case) to what they mean, for names difflib alone
    would not match well.
    """
    allowed = list(allowed)
    alias = (aliases or {}).get(key.lower()) if isinstance(key, str) else None
    if alias in allowed:
        return f" (did you mean {alias!r}?)"
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown_keys(
    obj: Mapping[str, Any],
    allowed: Iterable[str],
    path: str,
    aliases: Mapping[str, str] | None = None,
) -> None:
    """A :class:`ConfigError` at ``path.key`` for the first key of ``obj`` not in ``allowed``."""
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            hint = did_you_mean(key, allowed, aliases)
            raise ConfigError(
                f"{path}.{key}", f"unknown key{hint}; expected one of {list(allowed)}"
            )


def expect_object(value: Any, path: str) -> Mapping[str, Any]:
    """``value``, which must be a JSON object with string keys."""
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a JSON object, got {describe(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"keys must be strings, got {describe(key)}")
    return value


def expect_choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    """``value``, one of ``choices``; else a :class:`ConfigError` at ``path`` naming them."""
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        shown = json.dumps(value) if isinstance(value, str) else repr(value)
        raise ConfigError(path, f"expected one of {list(choices)}, got {shown}{hint}")
    return value


def expect_bool(value: Any, path: str) -> bool:
    """``value``, which must be a real boolean (the string ``"false"`` is not one)."""
    # The string "false" once switched the feature on elsewhere: only real booleans pass.
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected a JSON boolean (true or false), got {describe(value)}")
    return value


def expect_ratio(value: Any, path: str) -> float | str:
    """A number in [0, 1] (as a float), or ``"auto"``."""
    if value == AUTO and isinstance(value, str):
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f'expected a number in [0, 1] or "auto", got {describe(value)}')
    if isinstance(value, int):  # compare before float(): 10**400 would overflow
        if not 0 <= value <= 1:
            raise ConfigError(path, f"expected a number in [0, 1], got {value!r}")
        return float(value)
    ratio = float(value)
    if math.isnan(ratio) or math.isinf(ratio) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(path, f"expected a number in [0, 1], got {value!r}")
    return ratio


def expect_positive_int_or_auto(value: Any, path: str, what: str) -> int | str:
    """A positive integer ``what`` (e.g. ``"number of bytes"``), or ``"auto"``."""
    if value == AUTO and isinstance(value, str):
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(
            path, f'expected a positive integer {what} or "auto", got {describe(value)}'
        )
    return value


def expect_non_negative_int(value: Any, path: str, what: str) -> int:
    """A non-negative integer ``what`` (e.g. ``"token count"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(path, f"expected a non-negative integer {what}, got {describe(value)}")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def load_strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN/Infinity and duplicate keys (a ValueError saying which),
    and JSON nested past the recursion limit (a ValueError, not a crash)."""
    return load_json(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)


def load_json(text: str, **kwargs: Any) -> Any:
    """``json.loads``, but JSON nested past the recursion limit is a ValueError, not a crash."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(JSON_TOO_DEEP) from None


def parse_json(text: str, path: str) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys; errors carry line and column."""
    if not isinstance(text, str):
        raise ConfigError(path, f"expected a JSON string, got {type(text).__name__}")
    try:
        return json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
    except RecursionError:
        raise ConfigError(path, JSON_TOO_DEEP) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except ValueError as exc:
        raise ConfigError(path, f"invalid JSON: {exc}") from None
