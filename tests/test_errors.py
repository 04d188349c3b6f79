"""fxprefetch/errors.py: one base class for every exception fxprefetch raises on purpose,
each keeping its builtin base, importable where it was raised before."""

from __future__ import annotations

import importlib
import inspect

import pytest

import fxprefetch
from fxprefetch import errors
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.plan.schema import schema_errors

# each type, its builtin base, and a module that raises it (and re-exports it by that name)
TYPES = {
    "ConfigError": (ValueError, "fxprefetch.validation"),
    "ModelError": (ValueError, "fxprefetch.presets.build"),
    "PipelineOrderError": (ValueError, "fxprefetch.passes.contract"),
    "CliError": (Exception, "fxprefetch.cli"),
    "SchemaError": (RuntimeError, "fxprefetch.plan.schema"),
    "PrefetchPassError": (RuntimeError, "fxprefetch.planner"),
    "InvariantError": (RuntimeError, "fxprefetch.passes.invariants"),
    "PassFailedError": (RuntimeError, "fxprefetch.pipeline"),
    "NpuLoweringError": (RuntimeError, "fxprefetch.passes.lower_npu"),
    "NpuUnavailableError": (RuntimeError, "fxprefetch.targets.npu"),
    "ProfileError": (ValueError, "fxprefetch.devices.profile_file"),
    "CalibrationError": (RuntimeError, "fxprefetch.devices.calibrate"),
    "NpuStreamsUnavailableError": (RuntimeError, "fxprefetch.devices.npu_streams"),
}


def test_every_type_has_the_one_base_and_keeps_its_builtin_base():
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    assert defined == {*TYPES, "FxprefetchError"}  # a new type is added to TYPES
    assert set(errors.__all__) == defined
    for name, (builtin, raised_in) in TYPES.items():
        cls = getattr(errors, name)
        assert issubclass(cls, fxprefetch.FxprefetchError), name
        assert issubclass(cls, builtin), name
        assert getattr(importlib.import_module(raised_in), name) is cls, (name, raised_in)


def test_a_bad_config_is_caught_by_the_base_class_and_by_value_error():
    with pytest.raises(fxprefetch.FxprefetchError) as caught:
        WeightPrefetchConfig.from_dict({"enabled": "yes"})
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, fxprefetch.ConfigError)
    assert caught.value.path == "weight_prefetch_config.enabled"


def test_an_unsupported_schema_keyword_is_caught_by_the_base_class_and_by_runtime_error():
    schema = {"type": "string", "minLength": 1}
    with pytest.raises(fxprefetch.FxprefetchError, match="'minLength' is not supported") as c:
        schema_errors("x", schema, {})
    assert isinstance(c.value, RuntimeError)


def test_every_exception_type_of_the_package_is_one_of_these():
    """An exception class defined anywhere in fxprefetch (a module's own, not imported) lives
    in ``fxprefetch.errors``: a new one there fails this test until it moves."""
    import ast
    from pathlib import Path

    root = Path(fxprefetch.__file__).parent
    passes = Path(fxprefetch.passes.__file__).parent
    stray = []
    for path in [*root.rglob("*.py"), *passes.rglob("*.py")]:
        if path.name == "errors.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    stray.append(f"{path.name}: {node.name}")
    assert not stray, stray
