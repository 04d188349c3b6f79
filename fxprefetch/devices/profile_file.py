"""The device profile: its values, and its file (read, validated, written).

A device profile holds the constants of the prediction model (``fxprefetch.devices.prediction``) for
one device, each with where it came from. ``fxprefetch calibrate`` writes one as JSON; the
built-in profiles (``fxprefetch.devices.profile_catalog``) are data of the same form::

    {"schema": "fxprefetch.device_profile", "version": 1,
     "name": "h200-calibrated", "label": "NVIDIA H200 (calibrated)", "kind": "gpu",
     "device": {"name": ..., "driver": ..., "torch": ..., "runtime": ..., "date": ...,
                "machine": ...},
     "constants": {
       "read_bytes_per_s": C, "l2_bytes": C, "cores": C, "kernel_us": C,
       "delta_us_per_mb_1_token": C, "delta_us_per_mb_16_tokens": C, "margin_us": C,
       "lowerings": {"side_stream": {"fixed_us": C, "per_mb_us": C}, ...}}}

where each ``C`` is ``{"value": <number>, "provenance": {"kind": <one of PROVENANCE_KINDS>,
"source": "<file, date, machine; or what it was fitted to>"}}``. GPU profiles name the
lowerings ``side_stream`` / ``compute_stream``, NPU profiles ``ascend_cmo`` /
``ascend_side_stream``. ``hbm_peak_bytes_per_s`` (the datasheet's peak, for the GPU's default
byte cap) is the one optional constant. Reading is strict: an unknown or missing field, a
wrong type or a value out of range raises :class:`ProfileError` naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

SCHEMA = "fxprefetch.device_profile"
VERSION = 1
KINDS = ("gpu", "npu")
PROVENANCE_KINDS = ("spec", "measured", "fitted", "derived", "assumed")
LOWERINGS = {"gpu": ("side_stream", "compute_stream"), "npu": ("ascend_cmo", "ascend_side_stream")}
DEVICE_FIELDS = ("name", "driver", "torch", "runtime", "date", "machine")
#: constant -> (required, must be positive, must be an integer)
CONSTANTS: dict[str, tuple[bool, bool, bool]] = {
    "read_bytes_per_s": (True, True, False),
    "l2_bytes": (True, True, True),
    "cores": (True, True, True),
    "kernel_us": (True, False, False),
    "delta_us_per_mb_1_token": (True, False, False),
    "delta_us_per_mb_16_tokens": (True, False, False),
    "margin_us": (True, False, False),
    "hbm_peak_bytes_per_s": (False, True, False),
}
LOWERING_FIELDS = ("fixed_us", "per_mb_us")


class ProfileError(ValueError):
    """A device profile that does not follow the format; the message names the field."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"device profile {where}: {message}")


@dataclass(frozen=True)
class Constant:
    """One value of a profile and where it came from."""

    value: float
    kind: str  # one of PROVENANCE_KINDS
    source: str  # the file, date and machine; what it was fitted to; the datasheet...

    def describe(self) -> str:
        return f"{self.kind}: {self.source}"

    def to_dict(self) -> dict[str, Any]:
        value = int(self.value) if float(self.value).is_integer() else self.value
        return {"value": value, "provenance": {"kind": self.kind, "source": self.source}}


@dataclass(frozen=True)
class LoweringCost:
    """What one prefetch of a lowering costs the compute stream: fixed + per MB (µs)."""

    fixed_us: Constant
    per_mb_us: Constant


@dataclass(frozen=True)
class DeviceProfile:
    """One device's constants for the prediction model (``fxprefetch.devices.prediction``)."""

    name: str  # "h200", or the file's name
    label: str  # "NVIDIA H200 SXM 141GB"
    kind: Literal["gpu", "npu"]
    read_bytes_per_s: Constant  # streaming HBM read bandwidth
    l2_bytes: Constant
    cores: Constant  # SMs (GPU) or AI cores (Ascend)
    kernel_us: Constant  # one small kernel in a replayed graph
    delta_1: Constant  # µs saved per MB made L2-resident, consumer at 1 token
    delta_16: Constant  # ... at 16 tokens
    margin_us: Constant  # a GPU prefetch is emitted only where it saves more than this
    lowerings: tuple[tuple[str, LoweringCost], ...]
    lowering: str  # the lowering predictions use (a key of ``lowerings``)
    hbm_peak_bytes_per_s: Constant | None = None  # datasheet peak (the GPU's default cap)
    device: tuple[tuple[str, str], ...] = ()  # the file's "device" object
    origin: str = "built-in"  # "built-in", or the file's path

    # -- what the model reads ------------------------------------------------------------
    @property
    def bytes_per_us(self) -> float:
        return self.read_bytes_per_s.value / 1e6

    @property
    def hbm_bytes_per_s(self) -> float:
        """The bandwidth the default cap derives from: the datasheet peak where known."""
        peak = self.hbm_peak_bytes_per_s
        return peak.value if peak is not None else self.read_bytes_per_s.value

    def cost(self, lowering: str | None = None) -> LoweringCost:
        name = lowering or self.lowering
        for key, cost in self.lowerings:
            if key == name:
                return cost
        raise KeyError(f"device profile {self.name!r} has no lowering {name!r}")

    def with_lowering(self, lowering: str) -> DeviceProfile:
        """This profile predicting for ``lowering`` (a lowering it has constants for)."""
        self.cost(lowering)
        return replace(self, lowering=lowering)

    @property
    def sequence_parallel_rule(self) -> bool:
        """Whether vllm-ascend's rule applies: ``mlp.down`` only with sequence parallelism."""
        return self.kind == "npu"

    @property
    def attention_windows(self) -> bool:
        """Whether attention is a window by default (where fork and join stay in one graph)."""
        return self.kind == "gpu"

    def constants(self) -> dict[str, Constant]:
        """Every constant by its file name (the lowerings' as ``lowering.field``)."""
        found = {
            "read_bytes_per_s": self.read_bytes_per_s,
            "l2_bytes": self.l2_bytes,
            "cores": self.cores,
            "kernel_us": self.kernel_us,
            "delta_us_per_mb_1_token": self.delta_1,
            "delta_us_per_mb_16_tokens": self.delta_16,
            "margin_us": self.margin_us,
        }
        if self.hbm_peak_bytes_per_s is not None:
            found["hbm_peak_bytes_per_s"] = self.hbm_peak_bytes_per_s
        for name, cost in self.lowerings:
            found[f"{name}.fixed_us"] = cost.fixed_us
            found[f"{name}.per_mb_us"] = cost.per_mb_us
        return found

    def key(self) -> tuple:
        """Every value that changes a plan, for compile-cache keys (the whole profile)."""
        return (json.dumps(to_dict(self), sort_keys=True), self.lowering)


def _expect_object(value: Any, where: str, keys: tuple[str, ...], optional=()) -> dict:
    if not isinstance(value, Mapping):
        raise ProfileError(where, f"expected an object, got {type(value).__name__}")
    for key in value:
        if key not in keys and key not in optional:
            raise ProfileError(f"{where}.{key}", f"unknown field; expected {list(keys)}")
    for key in keys:
        if key not in value:
            raise ProfileError(f"{where}.{key}", "missing")
    return dict(value)


def _expect_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(where, f"expected a non-empty string, got {value!r}")
    return value


def _constant(value: Any, where: str, positive: bool, integer: bool) -> Constant:
    obj = _expect_object(value, where, ("value", "provenance"))
    number = obj["value"]
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ProfileError(f"{where}.value", f"expected a number, got {number!r}")
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        expected = "a positive number" if positive else "a number >= 0"
        raise ProfileError(f"{where}.value", f"expected {expected}, got {number!r}")
    if integer and not float(number).is_integer():
        raise ProfileError(f"{where}.value", f"expected an integer, got {number!r}")
    prov = _expect_object(obj["provenance"], f"{where}.provenance", ("kind", "source"))
    if prov["kind"] not in PROVENANCE_KINDS:
        raise ProfileError(
            f"{where}.provenance.kind",
            f"expected one of {list(PROVENANCE_KINDS)}, got {prov['kind']!r}",
        )
    source = _expect_text(prov["source"], f"{where}.provenance.source")
    return Constant(float(number), prov["kind"], source)


def from_dict(data: Any, origin: str = "built-in", where: str = "") -> DeviceProfile:
    """A profile from its JSON object; :class:`ProfileError` names the first bad field."""
    at = where or origin
    top = ("schema", "version", "name", "label", "kind", "device", "constants")
    obj = _expect_object(data, at, top)
    if obj["schema"] != SCHEMA:
        raise ProfileError(f"{at}.schema", f"expected {SCHEMA!r}, got {obj['schema']!r}")
    if obj["version"] != VERSION or isinstance(obj["version"], bool):
        raise ProfileError(
            f"{at}.version",
            f"expected {VERSION} (this fxprefetch reads version {VERSION}), got {obj['version']!r}",
        )
    name = _expect_text(obj["name"], f"{at}.name")
    label = _expect_text(obj["label"], f"{at}.label")
    kind = obj["kind"]
    if kind not in KINDS:
        raise ProfileError(f"{at}.kind", f"expected one of {list(KINDS)}, got {kind!r}")
    dev = obj["device"]
    if not isinstance(dev, Mapping):
        raise ProfileError(f"{at}.device", f"expected an object, got {type(dev).__name__}")
    for key, value in dev.items():
        if key not in DEVICE_FIELDS:
            raise ProfileError(f"{at}.device.{key}", f"unknown field; expected {DEVICE_FIELDS}")
        _expect_text(value, f"{at}.device.{key}")
    required = tuple(k for k, (req, _, _) in CONSTANTS.items() if req)
    optional = tuple(k for k, (req, _, _) in CONSTANTS.items() if not req)
    consts = _expect_object(obj["constants"], f"{at}.constants", (*required, "lowerings"), optional)
    values = {
        key: _constant(consts[key], f"{at}.constants.{key}", positive, integer)
        for key, (_, positive, integer) in CONSTANTS.items()
        if key in consts
    }
    lows = consts["lowerings"]
    allowed = LOWERINGS[kind]
    if not isinstance(lows, Mapping) or not lows:
        raise ProfileError(
            f"{at}.constants.lowerings", f"expected an object with some of {list(allowed)}"
        )
    lowerings = []
    for low, costs in lows.items():
        here = f"{at}.constants.lowerings.{low}"
        if low not in allowed:
            raise ProfileError(here, f"unknown lowering for a {kind}; expected {list(allowed)}")
        c = _expect_object(costs, here, LOWERING_FIELDS)
        lowerings.append(
            (
                low,
                LoweringCost(
                    _constant(c["fixed_us"], f"{here}.fixed_us", False, False),
                    _constant(c["per_mb_us"], f"{here}.per_mb_us", False, False),
                ),
            )
        )
    names = [n for n, _ in lowerings]
    default = next((n for n in allowed if n in names), names[0])
    return DeviceProfile(
        name=name,
        label=label,
        kind=kind,
        read_bytes_per_s=values["read_bytes_per_s"],
        l2_bytes=values["l2_bytes"],
        cores=values["cores"],
        kernel_us=values["kernel_us"],
        delta_1=values["delta_us_per_mb_1_token"],
        delta_16=values["delta_us_per_mb_16_tokens"],
        margin_us=values["margin_us"],
        lowerings=tuple(lowerings),
        lowering=default,
        hbm_peak_bytes_per_s=values.get("hbm_peak_bytes_per_s"),
        device=tuple((str(k), str(v)) for k, v in dev.items()),
        origin=origin,
    )


def to_dict(profile: DeviceProfile) -> dict[str, Any]:
    """The profile's JSON object (what :func:`from_dict` reads back)."""
    consts: dict[str, Any] = {
        key: const.to_dict() for key, const in profile.constants().items() if "." not in key
    }
    consts["lowerings"] = {
        name: {"fixed_us": c.fixed_us.to_dict(), "per_mb_us": c.per_mb_us.to_dict()}
        for name, c in profile.lowerings
    }
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "name": profile.name,
        "label": profile.label,
        "kind": profile.kind,
        "device": dict(profile.device),
        "constants": consts,
    }


def read(path: str | Path) -> DeviceProfile:
    """The profile in the JSON file ``path`` (:class:`ProfileError` where it is not one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProfileError(str(path), f"not JSON: {exc}") from None
    return from_dict(data, origin=str(path))


def write(profile: DeviceProfile, path: str | Path) -> Path:
    """Write ``profile`` to ``path`` as JSON (validated by reading it back first)."""
    data = to_dict(profile)
    from_dict(data, origin=str(path))
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
