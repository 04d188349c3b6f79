"""The validation toolkit: each check passes good values through and names the JSON path of bad
ones; strict JSON parsing."""

from __future__ import annotations

import pytest

from fxprefetch import ConfigError
from fxprefetch.validation import (
    AUTO,
    JSON_TOO_DEEP,
    describe,
    did_you_mean,
    expect_bool,
    expect_non_negative_int,
    expect_object,
    expect_positive_int_or_auto,
    expect_ratio,
    load_json,
    parse_json,
    reject_unknown_keys,
)


def test_config_error_carries_path_and_message():
    err = ConfigError("a.b[2]", "expected x")
    assert (err.path, err.message, str(err)) == ("a.b[2]", "expected x", "a.b[2]: expected x")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"),
        (True, "boolean true"),
        ("x", "string 'x'"),
        (3, "number 3"),
        (0.5, "number 0.5"),
        ({}, "an object"),
        ([1], "an array"),
        ({1}, "set {1}"),
    ],
)
def test_describe_names_the_json_type(value, shown):
    assert describe(value) == shown


def test_did_you_mean_uses_aliases_then_close_matches():
    assert did_you_mean("windws", ["windows", "enabled"]) == " (did you mean 'windows'?)"
    assert did_you_mean("zzz", ["windows"]) == ""
    assert did_you_mean("on", ["enabled"]) == ""  # too far for difflib
    assert did_you_mean("ON", ["enabled"], {"on": "enabled"}) == " (did you mean 'enabled'?)"
    # an alias pointing outside the allowed names is ignored
    assert did_you_mean("on", ["x"], {"on": "enabled"}) == ""


def test_reject_unknown_keys_names_the_key_and_the_choices():
    reject_unknown_keys({"a": 1}, ["a", "b"], "root")
    with pytest.raises(ConfigError) as info:
        reject_unknown_keys({"a": 1, "bb": 2}, ["a", "b"], "root.section")
    assert info.value.path == "root.section.bb"
    assert info.value.message == "unknown key (did you mean 'b'?); expected one of ['a', 'b']"


def test_expect_object_and_bool():
    assert expect_object({"k": 1}, "p") == {"k": 1}
    with pytest.raises(ConfigError, match=r"^p: expected a JSON object, got an array$"):
        expect_object([], "p")
    with pytest.raises(ConfigError, match=r"^p: keys must be strings, got number 1$"):
        expect_object({1: 2}, "p")
    assert expect_bool(False, "p") is False
    with pytest.raises(ConfigError, match=r"got string 'false'$"):
        expect_bool("false", "p")


@pytest.mark.parametrize("good", [0, 1, 0.5, 1e-9, AUTO])
def test_expect_ratio_accepts_the_unit_interval_and_auto(good):
    got = expect_ratio(good, "p")
    assert got == (AUTO if good == AUTO else float(good))
    assert isinstance(got, (float, str))


@pytest.mark.parametrize("bad", [-0.1, 1.5, 2, 10**400, float("nan"), float("inf"), True, "1"])
def test_expect_ratio_rejects_the_rest(bad):
    with pytest.raises(ConfigError) as info:
        expect_ratio(bad, "x.y")
    assert info.value.path == "x.y" and "expected a number in [0, 1]" in info.value.message


def test_integer_checks_name_what_they_count():
    assert expect_positive_int_or_auto(7, "p", "number of bytes") == 7
    assert expect_positive_int_or_auto(AUTO, "p", "number of bytes") == AUTO
    with pytest.raises(ConfigError) as info:
        expect_positive_int_or_auto(0, "p", "number of bytes")
    assert (
        info.value.message == 'expected a positive integer number of bytes or "auto", got number 0'
    )
    assert expect_non_negative_int(0, "p", "token count") == 0
    for bad in (-1, 1.0, True, None):
        with pytest.raises(ConfigError, match="expected a non-negative integer token count"):
            expect_non_negative_int(bad, "p", "token count")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1, "a": 2}', "invalid JSON: duplicate key 'a'"),
        ('{"a": NaN}', "invalid JSON: NaN is not valid JSON"),
        ('{"a": 1,}', "malformed JSON at line 1, column 9"),
        ("[" * 100000, JSON_TOO_DEEP),
    ],
)
def test_parse_json_is_strict(text, message):
    with pytest.raises(ConfigError) as info:
        parse_json(text, "cfg")
    assert info.value.path == "cfg" and info.value.message.startswith(message)


def test_parse_json_wants_a_string_and_load_json_survives_deep_nesting():
    assert parse_json('{"a": [1, 2.5]}', "p") == {"a": [1, 2.5]}
    with pytest.raises(ConfigError, match="expected a JSON string, got dict"):
        parse_json({}, "p")
    assert load_json("[1]") == [1]
    with pytest.raises(ValueError, match=JSON_TOO_DEEP):
        load_json("[" * 100000 + "]" * 100000)
