"""Validate JSON data against ``plan_schema.json`` without third-party packages.

jsonschema is a test dependency only, so the keywords the schema uses are checked here
(types, required and additional properties, items, local ``$ref``, const, enum, pattern,
minimum and maximum; NaN and Infinity, which Python's json module reads, are no numbers).
A keyword this module does not know raises :class:`SchemaError`: validation is
never silently partial. tests/test_cli.py checks that it agrees with jsonschema.
"""

from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources
from typing import Any

from fxprefetch.errors import SchemaError

# annotations that constrain nothing
_IGNORED = frozenset({"$schema", "$id", "title", "description", "$comment", "$defs", "examples"})
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    # JSON has no NaN nor Infinity (Python's json module reads them): never a number here
    "number": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and math.isfinite(v))
    ),
    # JSON Schema: a number with no fractional part (1.0 too)
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


@functools.cache
def plan_schema() -> dict[str, Any]:
    """The shipped ``fxprefetch/plan/plan_schema.json``."""
    return json.loads(resources.files("fxprefetch.plan").joinpath("plan_schema.json").read_text())


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, path: str = ""
) -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``"path: what is wrong"``; [] when valid.

    ``root`` resolves ``{"$ref": "#/$defs/name"}`` (default: ``schema`` itself).
    """
    root = schema if root is None else root
    where = path or "the top level"
    errors: list[str] = []
    for key, rule in schema.items():
        if key in _IGNORED or key in ("properties", "additionalProperties"):
            continue
        if key == "$ref":
            errors += schema_errors(value, _resolve(rule, root), root, path)
        elif key == "type":
            names = [rule] if isinstance(rule, str) else list(rule)
            if not any(_TYPES[n](value) for n in names):
                errors.append(f"{where}: expected {' or '.join(names)}, got {_show(value)}")
                return errors  # the other keywords would only repeat it
        elif key == "const":
            if not _same(value, rule):
                errors.append(f"{where}: expected {json.dumps(rule)}, got {_show(value)}")
        elif key == "enum":
            if not any(_same(value, option) for option in rule):
                options = ", ".join(json.dumps(o) for o in rule)
                errors.append(f"{where}: expected one of {options}, got {_show(value)}")
        elif key == "pattern":
            if isinstance(value, str) and re.search(rule, value) is None:
                errors.append(f"{where}: expected a string matching {rule!r}, got {_show(value)}")
        elif key in ("minimum", "maximum"):
            if _TYPES["number"](value) and (value < rule if key == "minimum" else value > rule):
                bound = "at least" if key == "minimum" else "at most"
                errors.append(f"{where}: expected {bound} {rule}, got {_show(value)}")
        elif key == "required":
            if isinstance(value, dict):
                errors += [f"{where}: missing {name!r}" for name in rule if name not in value]
        elif key == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    errors += schema_errors(item, rule, root, f"{path}[{i}]")
        else:
            raise SchemaError(f"plan schema keyword {key!r} is not supported by {__name__}")
    if isinstance(value, dict) and ("properties" in schema or "additionalProperties" in schema):
        errors += _object_errors(value, schema, root, path)
    return errors


def _object_errors(
    value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any], path: str
) -> list[str]:
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    errors: list[str] = []
    for name, item in value.items():
        inner = f"{path}.{name}" if path else str(name)
        if name in properties:
            errors += schema_errors(item, properties[name], root, inner)
        elif extra is False:
            errors.append(f"{path or 'the top level'}: unknown field {name!r}")
        elif isinstance(extra, dict):
            errors += schema_errors(item, extra, root, inner)
    return errors


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
