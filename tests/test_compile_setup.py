"""The compile setup, its one factory, its cache key, and the target registry."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from fxprefetch import WeightPrefetchConfig
from fxprefetch import compile_setup as compile_setup_module
from fxprefetch import targets as targets_module
from fxprefetch.backend import setup_from_options
from fxprefetch.compile_setup import (
    CompileSetup,
    _stable_name,
    canonical,
    pass_source_files,
    source_digest,
)
from fxprefetch.config import ConfigError
from fxprefetch.devices import DeviceSetup
from fxprefetch.devices.profile_catalog import profile
from fxprefetch.options import parse_options
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.tables.rules import PrefetchRules, current_rules
from fxprefetch.pipeline import Pipeline
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import (
    AUTO,
    TARGET_NAMES,
    TARGET_SPECS,
    make_compile_setup,
    resolve_target,
    target_spec,
)

BASE_SETUP = """
from fxprefetch import WeightPrefetchConfig
from fxprefetch.compile_setup import CompileSetup
from fxprefetch.devices import DeviceSetup
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.devices.profile_catalog import profile
from fxprefetch.targets import TARGET_SPECS

SETUP = CompileSetup(
    config=WeightPrefetchConfig(enabled=True, max_prefetch_bytes=1 << 20),
    rules=DEFAULT_RULES,
    pipeline=TARGET_SPECS["inductor"].pipeline,
    devices=DeviceSetup(
        native=frozenset({"cpu", "cuda"}),
        joins=frozenset({"cuda"}),
        caps={"cuda": 8 << 20, "cpu": 1 << 20},
        l2=frozenset({"cuda"}),
        cache_hint="none",
        lowering={"cuda": "native L2 prefetch", "cpu": "hints"},
        profiles={"cuda": profile("h200")},
    ),
)
"""


def _base() -> CompileSetup:
    scope: dict[str, Any] = {}
    exec(BASE_SETUP, scope)
    return scope["SETUP"]


def _changed(value: Any, path: str) -> Any:
    """A value other than ``value``, of its kind (a new kind of field must add its own)."""
    if isinstance(value, Pipeline):  # another target's
        return next(spec.pipeline for spec in TARGET_SPECS.values() if spec.pipeline != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, WeightPrefetchConfig):
        return value.with_enabled(not value.enabled)
    if isinstance(value, PrefetchRules):
        return value.with_op_kind("aten::cat", "barrier")
    if isinstance(value, frozenset):
        return value | {"changed"}
    if isinstance(value, Mapping):
        return {**value, "changed": next(iter(value.values()))}
    if value is None and path.endswith("requested_profile"):
        return profile("h100")
    raise AssertionError(f"{path}: no way to change a {type(value).__name__} here; add one")


def _variants(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, value changed at path)`` for every leaf field under ``value``: dataclasses are
    walked, except those keyed by their own digest or key."""
    own_key = hasattr(value, "digest") or callable(getattr(value, "key", None))
    if dataclasses.is_dataclass(value) and not own_key:
        for field in dataclasses.fields(value):
            inner = getattr(value, field.name)
            for sub_path, changed in _variants(inner, f"{path}.{field.name}"):
                yield sub_path, dataclasses.replace(value, **{field.name: changed})
    else:
        yield path, _changed(value, path)


# -- the key --------------------------------------------------------------------------------


def test_changing_any_field_of_the_setup_changes_the_key():
    base = _base()
    variants = dict(_variants(base, "setup"))
    touched = {path.split(".")[1] for path in variants}
    assert touched == {f.name for f in dataclasses.fields(CompileSetup)}
    keys = {path: setup.cache_key() for path, setup in variants.items()}
    assert base.cache_key() not in keys.values()
    assert len(set(keys.values())) == len(keys), "two different setups share a key"


def test_a_device_profile_changes_the_key_by_its_values():
    base = _base()
    other = dataclasses.replace(
        base, devices=dataclasses.replace(base.devices, profiles={"cuda": profile("h100")})
    )
    assert other.cache_key() != base.cache_key()


def test_the_same_target_running_other_passes_has_another_key():
    base = _base()
    fewer = base.pipeline.with_passes(base.pipeline.passes[:1])
    assert dataclasses.replace(base, pipeline=fewer).cache_key() != base.cache_key()


def test_the_parts_a_caller_adds_change_the_key():
    base = _base()
    assert len({base.cache_key(), base.cache_key("a"), base.cache_key("b")}) == 3
    assert base.cache_key("a", "b") != base.cache_key("ab")


@pytest.mark.parametrize("target", sorted(TARGET_SPECS))
def test_changing_any_pass_source_changes_the_key(target, monkeypatch):
    setup = dataclasses.replace(_base(), pipeline=TARGET_SPECS[target].pipeline)
    files = pass_source_files(setup.pipeline)
    for graph_pass in setup.pipeline.passes:  # the passes' own modules are read
        found = inspect.getsourcefile(inspect.unwrap(getattr(graph_pass, "run", graph_pass)))
        assert Path(found) in files
    assert any("analysis" in f.parts for f in files) and any("tables" in f.parts for f in files)
    original = setup.cache_key()
    read = compile_setup_module._read_source
    for changed in files:

        def read_changed(path: Path, changed: Path = changed) -> bytes:
            return read(path) + (b"#" if path == changed else b"")

        monkeypatch.setattr(compile_setup_module, "_read_source", read_changed)
        source_digest.cache_clear()
        assert setup.cache_key() != original, f"{changed} is not in the key"
    monkeypatch.setattr(compile_setup_module, "_read_source", read)
    source_digest.cache_clear()
    assert setup.cache_key() == original


def test_the_key_reads_every_module_the_passes_import():
    """Not a list kept by hand: the passes' and the driver's imports, followed through every
    module (into functions too), decide which sources the key hashes."""
    names = {_stable_name(p) for p in pass_source_files(_base().pipeline)}
    read_by_passes = {
        "config.py",
        "roles.py",
        "devices/prediction.py",
        "validation.py",
        "plan/records.py",
    }
    contract = {"passes/contract.py", "passes/invariants.py", "passes/strip_prefetch.py"}
    # devices/setup.py imports it where CUDA is used
    imported_in_a_function = {"devices/cuda_prefetch.py"}
    assert read_by_passes | contract | imported_in_a_function <= names
    assert {"cli.py", "vllm/plugin.py", "vllm_plugin.py", "backend.py"}.isdisjoint(
        names
    )  # nothing the passes use


def test_equal_setups_give_equal_keys_across_processes():
    """No id(), no address, no hash(): a fresh process (another hash seed) agrees."""
    keys = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run(
            [sys.executable, "-c", BASE_SETUP + "print(SETUP.cache_key('x'))"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        keys.add(done.stdout.strip())
    assert keys == {_base().cache_key("x")}


def test_a_value_with_no_stable_form_is_refused():
    with pytest.raises(TypeError, match="no stable form"):
        canonical(object())
    assert canonical({"b": frozenset({2, 1}), "a": (1.5, None)}) == canonical(
        {"a": [1.5, None], "b": {1, 2}}
    )
    json.dumps(canonical(_base()))  # all of it is JSON


def test_both_cache_keys_are_the_setups_key():
    from fxprefetch.targets.inductor import PrefetchGraphPass
    from fxprefetch.vllm.plugin import WeightPrefetchPass

    setup = make_compile_setup(WeightPrefetchConfig(enabled=True), target="inductor")
    planner = GraphPlanner(setup, source_names=["w", None], record=False)
    assert PrefetchGraphPass(planner).uuid() == setup.cache_key(json.dumps(["w", None]))
    vllm_pass = WeightPrefetchPass(bound=WeightPrefetchConfig(enabled=True))
    assert vllm_pass.uuid() == vllm_pass.setup().cache_key(vllm_pass.bound.digest)


def test_vllms_route_takes_ascend_lowering_from_the_environment(monkeypatch):
    """vLLM users pass no backend option: ``FXPREFETCH_ASCEND_LOWERING`` sets
    ``ascend_lowering`` for the vLLM pass, is part of its uuid, and a wrong value is refused
    with the backend option's message, naming the variable."""
    from fxprefetch.planner import GraphPlanner
    from fxprefetch.vllm import plugin as vllm_plugin

    monkeypatch.setattr(vllm_plugin, "_device_target", lambda: "npu")
    monkeypatch.delenv("FXPREFETCH_ASCEND_LOWERING", raising=False)
    vllm_pass = vllm_plugin.WeightPrefetchPass(bound=WeightPrefetchConfig(enabled=True))
    default = vllm_pass.uuid()
    assert vllm_pass.setup().devices.ascend_lowering == "side_stream"
    monkeypatch.setenv("FXPREFETCH_ASCEND_LOWERING", "in_stream")
    assert vllm_pass.setup().devices.ascend_lowering == "in_stream"
    assert isinstance(vllm_pass.planner(), GraphPlanner) and vllm_pass.uuid() != default
    monkeypatch.setenv("FXPREFETCH_ASCEND_LOWERING", "in-stream")
    with pytest.raises(ConfigError) as refused:
        vllm_pass.uuid()
    with pytest.raises(ConfigError) as option:
        parse_options({"ascend_lowering": "in-stream"})
    assert refused.value.path == "FXPREFETCH_ASCEND_LOWERING"
    assert refused.value.message == option.value.message
    assert "expected one of ['side_stream', 'in_stream']" in refused.value.message


# -- the factory ----------------------------------------------------------------------------


def test_the_factory_resolves_target_rules_and_devices_once(monkeypatch):
    calls = []

    def fake_devices(**kwargs: Any) -> DeviceSetup:
        calls.append(kwargs)
        return DeviceSetup(caps={"cpu": 1000})

    monkeypatch.setattr(targets_module, "device_setup", fake_devices)
    config = WeightPrefetchConfig(enabled=True)
    setup = make_compile_setup(config, mode="reduce-overhead", cache_hint="evict_last")
    assert setup.target == resolve_target(AUTO) == "inductor"  # no torch_npu here
    assert setup.rules is current_rules() and setup.cudagraphs
    assert setup.devices == DeviceSetup(caps={"cpu": 1000})
    inductor_devices = {"native_l2": True, "ascend": False}  # the inductor entry's flags
    assert calls == [
        {
            **inductor_devices,
            "cudagraphs": True,
            "native_prefetch": "auto",
            "cuda_lowering": "side_stream",
            "cache_hint": "evict_last",
            "ascend_lowering": "side_stream",
            "device_profile": None,
        }
    ]
    eager = make_compile_setup(config, target="eager", rules=DEFAULT_RULES, devices_for="auto")
    assert eager.target == "eager" and not eager.cudagraphs
    assert {k: calls[-1][k] for k in inductor_devices} == inductor_devices  # auto: inductor's
    make_compile_setup(config, target="npu")
    assert (calls[-1]["native_l2"], calls[-1]["ascend"]) == (False, True)
    given = DeviceSetup(native=frozenset({"meta"}))
    assert make_compile_setup(config, target="npu", devices=given).devices is given
    assert len(calls) == 3


def test_the_ascend_lowering_is_in_the_key():
    """``ascend_lowering`` changes the compiled graph (forks and joins, or npu_prefetch in the
    compute stream): its two values never share a compile-cache key."""
    config = WeightPrefetchConfig(enabled=True)
    side = make_compile_setup(config, target="npu")
    in_stream = make_compile_setup(config, target="npu", ascend_lowering="in_stream")
    assert (side.devices.ascend_lowering, in_stream.devices.ascend_lowering) == (
        "side_stream",
        "in_stream",
    )
    assert side.cache_key() != in_stream.cache_key()
    with pytest.raises(ValueError, match="ascend_lowering: expected one of"):
        make_compile_setup(config, target="npu", ascend_lowering="side")


def test_the_setup_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _base().strict = True  # type: ignore[misc]


# -- the registry ---------------------------------------------------------------------------


def test_the_registry_names_every_target_once():
    assert (AUTO, *TARGET_SPECS) == TARGET_NAMES
    for name, spec in TARGET_SPECS.items():
        assert spec.name == spec.pipeline.target == name
        assert spec.pipeline.recompiles == (name != "inductor")  # inductor regenerates itself
        parameters = inspect.signature(spec.compile).parameters
        assert {"mode", "compiler_config"} <= set(parameters)
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        target_spec("tpu")


def test_options_take_their_target_names_from_the_registry():
    with pytest.raises(ConfigError, match=re.escape(f"expected one of {list(TARGET_NAMES)}")):
        parse_options({"target": "tpu"})
    for name in TARGET_NAMES:
        assert parse_options({"target": name}).target == name


def test_only_inductor_replays_cuda_graphs():
    assert TARGET_SPECS["inductor"].replays_cudagraphs("reduce-overhead")
    assert not TARGET_SPECS["inductor"].replays_cudagraphs("max-autotune-no-cudagraphs")
    assert not TARGET_SPECS["npu"].replays_cudagraphs("reduce-overhead")
    assert not TARGET_SPECS["eager"].replays_cudagraphs("reduce-overhead")


# -- a device profile file ------------------------------------------------------------------


def test_the_key_changes_when_the_device_profile_files_contents_change(tmp_path):
    """``device_profile`` (a file's path) in the backend's options: the key holds the file's
    contents, not its name, so recalibrating the device recompiles."""
    import json as json_module

    from fxprefetch.devices.profile_file import to_dict

    path = tmp_path / "gpu.json"
    data = to_dict(profile("h200"))
    path.write_text(json_module.dumps(data))
    first = setup_from_options(parse_options({"device_profile": str(path)})).cache_key()
    again = setup_from_options(parse_options({"device_profile": str(path)})).cache_key()
    data["constants"]["margin_us"]["value"] = 0.25
    path.write_text(json_module.dumps(data))
    changed = setup_from_options(parse_options({"device_profile": str(path)})).cache_key()
    assert first == again != changed
    assert setup_from_options(parse_options(None)).cache_key() not in (first, changed)


def test_a_bad_device_profile_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"options.device_profile.*unknown device profile"):
        parse_options({"device_profile": "h300"})
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"options.device_profile.*\.schema: missing"):
        parse_options({"device_profile": str(tmp_path / "p.json")})
    with pytest.raises(ConfigError, match=r"options\.device_profile: expected a device profile"):
        parse_options({"device_profile": 3})


def test_the_vllm_pass_takes_its_device_profile_from_the_environment(monkeypatch, tmp_path):
    from fxprefetch.vllm.plugin import PROFILE_ENV, WeightPrefetchPass, env_device_profile

    vllm_pass = WeightPrefetchPass(bound=WeightPrefetchConfig(enabled=True))
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert env_device_profile() is None
    plain = vllm_pass.uuid()
    monkeypatch.setenv(PROFILE_ENV, "h100")
    assert env_device_profile() == profile("h100")
    assert vllm_pass.setup().devices.requested_profile == profile("h100")
    assert vllm_pass.uuid() != plain
    monkeypatch.setenv(PROFILE_ENV, "h300")
    with pytest.raises(ConfigError, match=r"FXPREFETCH_DEVICE_PROFILE.*unknown device profile"):
        vllm_pass.setup()
