"""``weight_prefetch_config``: parsing, validation and a frozen, hashable configuration.

The JSON shape is the one vllm-ascend users already write::

    {"enabled": true,
     "prefetch_ratio": {"attn": {"qkv": 1.0, "o": 1.0},
                        "moe": {"gate_up": 0.8},
                        "mlp": {"gate_up": 1.0, "down": 1.0}}}

plus four fields of ours: ``max_prefetch_bytes`` (the L2 cap: left unwritten, the device's
own, 18 MiB on Ascend as the guide says; ``"auto"``: what each prefetch's window can hide on
the device, see ``fxprefetch.devices.prediction``), ``sequence_parallel``, ``windows`` (left
unwritten, the device's own) and ``token_range`` (the token counts for which prefetch runs,
overall and per role). A role's ratio may also be ``"auto"``: up to the whole weight, as much
as its window can hide. ``force_prefetch: true`` emits every planned prefetch, also those the
device profile predicts to lose (on a GPU the default drops them). Every rule rejects bad
input with a :class:`ConfigError` that names the JSON path; nothing is dropped silently.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fxprefetch.roles import ROLE_TABLE, ROLES
from fxprefetch.validation import (
    AUTO,
    ConfigError,
    describe,
    did_you_mean,
    expect_bool,
    expect_non_negative_int,
    expect_object,
    expect_positive_int_or_auto,
    expect_ratio,
    parse_json,
    reject_unknown_keys,
)

logger = logging.getLogger(__name__)

ROOT_KEY = "weight_prefetch_config"
DEFAULT_MAX_PREFETCH_BYTES = 18 * 1024 * 1024
WINDOW_KINDS: tuple[str, ...] = ("vector", "collective", "attention")
DEFAULT_WINDOWS: tuple[str, ...] = ("vector",)

# Misspellings seen in the wild that difflib alone would not map well.
KEY_ALIASES: Mapping[str, str] = {
    "enable": "enabled",
    "on": "enabled",
    "ratio": "prefetch_ratio",
    "ratios": "prefetch_ratio",
    "prefetch_ratios": "prefetch_ratio",
    "attention": "attn",
    "self_attn": "attn",
    "qkv_proj": "qkv",
    "o_proj": "o",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    "max_bytes": "max_prefetch_bytes",
    "sp": "sequence_parallel",
    "window": "windows",
    "token_ranges": "token_range",
    "tokens": "token_range",
    "min": "min_tokens",
    "max": "max_tokens",
}


def _reject_unknown_keys(obj: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    reject_unknown_keys(obj, allowed, path, KEY_ALIASES)


def _expect_cap(value: Any, path: str) -> int | str:
    return expect_positive_int_or_auto(value, path, "number of bytes")


MAX_TOKEN_COUNT = 2**63 - 1  # a signed 64-bit count: what the run-time check op takes


def _expect_token_count(value: Any, path: str) -> int:
    count = expect_non_negative_int(value, path, "token count")
    if count > MAX_TOKEN_COUNT:
        raise ConfigError(
            path,
            f"expected a token count in [0, {MAX_TOKEN_COUNT}] (2**63 - 1), got {describe(value)}",
        )
    return count


def _expect_windows(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            path,
            f"expected a non-empty list drawn from {list(WINDOW_KINDS)}, got {describe(value)}",
        )
    kinds: list[str] = []
    for i, kind in enumerate(value):
        if not isinstance(kind, str) or kind not in WINDOW_KINDS:
            hint = did_you_mean(kind, WINDOW_KINDS) if isinstance(kind, str) else ""
            raise ConfigError(
                f"{path}[{i}]", f"expected one of {list(WINDOW_KINDS)}, got {describe(kind)}{hint}"
            )
        if kind in kinds:
            raise ConfigError(f"{path}[{i}]", f"window kind {kind!r} is listed twice")
        kinds.append(kind)
    for kind in ("collective", "attention"):
        if kind in kinds and "vector" not in kinds:
            raise ConfigError(
                path,
                f"'{kind}' widens vector windows and cannot stand alone; "
                f'write ["vector", "{kind}"]',
            )
    return tuple(sorted(kinds, key=WINDOW_KINDS.index))


@dataclass(frozen=True, init=False, repr=False)
class PrefetchRatios:
    """Fraction of each role's weight to prefetch; 0 means "do not prefetch this role".

    One ratio per role of :data:`fxprefetch.roles.ROLE_TABLE` (the role's default where none
    is given), given by the role's attribute name (``PrefetchRatios(attn_qkv=1.0,
    mlp_down=0.5)``) and read back by role (``ratios["attn.qkv"]``) or attribute
    (``ratios.attn_qkv``). A role added to the table is a ratio here, with no change to
    this class. ``dataclasses.replace(ratios, mlp_down=0.5)`` changes one ratio.
    """

    by_role: tuple[tuple[str, float | str], ...]  # (role, ratio), in the table's order

    def __init__(
        self, by_role: Iterable[tuple[str, float | str]] = (), **ratios: float | str
    ) -> None:
        """``by_role``: ``(role, ratio)`` pairs to start from (what ``dataclasses.replace``
        passes); keywords by attribute override them; other roles take their default."""
        start = dict(by_role)
        for role_name in start:
            if role_name not in ROLES:
                raise ValueError(f"by_role: unknown role {role_name!r}; roles are {ROLES}")
        attributes = [role.attribute for role in ROLE_TABLE]
        for name in ratios:
            if name not in attributes:
                raise TypeError(
                    f"PrefetchRatios has no role {name!r}{did_you_mean(name, attributes)}; "
                    f"expected keywords among {attributes}"
                )
        by_role = []
        for role in ROLE_TABLE:
            written = ratios.get(role.attribute, start.get(role.name, role.default_ratio))
            ratio = expect_ratio(written, f"{ROOT_KEY}.{role.json_path}")
            # 1 and 1.0, -0.0 and 0.0 compare equal: store one form, so digests agree too
            by_role.append((role.name, ratio if ratio == AUTO else float(ratio) + 0.0))
        object.__setattr__(self, "by_role", tuple(by_role))

    def __repr__(self) -> str:
        written = ", ".join(f"{r.attribute}={self[r.name]!r}" for r in ROLE_TABLE)
        return f"PrefetchRatios({written})"

    def __getattr__(self, name: str) -> float | str:
        """``ratios.attn_qkv``: the ratio of the role whose attribute is ``name``."""
        role = next((r for r in ROLE_TABLE if r.attribute == name), None)
        if role is None or name == "by_role":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self[role.name]

    def __getitem__(self, role: str) -> float | str:
        """The written ratio: a number in [0, 1], or ``"auto"``."""
        found = dict(self.by_role)
        if role not in found:
            raise KeyError(f"unknown role {role!r}{did_you_mean(role, ROLES)}; roles are {ROLES}")
        return found[role]

    def items(self) -> list[tuple[str, float | str]]:
        return list(self.by_role)

    def to_dict(self) -> dict[str, dict[str, float | str]]:
        nested: dict[str, dict[str, float | str]] = {}
        for role, ratio in self.items():
            section, name = role.split(".")
            nested.setdefault(section, {})[name] = ratio
        return nested

    @classmethod
    def from_dict(cls, value: Any, path: str = f"{ROOT_KEY}.prefetch_ratio") -> PrefetchRatios:
        sections = expect_object(value, path)
        layout = _role_layout()
        _reject_unknown_keys(sections, layout, path)
        kwargs: dict[str, float | str] = {}
        for section, value_ in sections.items():
            body = expect_object(value_, f"{path}.{section}")
            _reject_unknown_keys(body, layout[section], f"{path}.{section}")
            for name, ratio in body.items():
                kwargs[f"{section}_{name}"] = expect_ratio(ratio, f"{path}.{section}.{name}")
        return cls(**kwargs)


def _role_layout() -> dict[str, list[str]]:
    """The JSON sections of the role table and the keys in each (``{"mlp": ["gate_up",
    "down"], ...}``), in the table's order: what ``prefetch_ratio`` and ``token_range``
    accept per role."""
    layout: dict[str, list[str]] = {}
    for role in ROLE_TABLE:
        layout.setdefault(role.section, []).append(role.key)
    return layout


TOKEN_KEYS: tuple[str, ...] = ("min_tokens", "max_tokens")


@dataclass(frozen=True)
class TokenRange:
    """Token counts ``min_tokens <= n <= max_tokens`` (both inclusive; ``max_tokens`` None:
    no upper bound). The default, ``[0, None]``, holds every count."""

    min_tokens: int = 0
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.check(f"{ROOT_KEY}.token_range")

    def check(self, path: str) -> None:
        _expect_token_count(self.min_tokens, f"{path}.min_tokens")
        if self.max_tokens is not None:
            _expect_token_count(self.max_tokens, f"{path}.max_tokens")
            if self.max_tokens < self.min_tokens:
                raise ConfigError(
                    path,
                    f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens}): "
                    "no token count would be prefetched (write a ratio of 0 to switch a role off)",
                )

    @property
    def unbounded(self) -> bool:
        return self.min_tokens == 0 and self.max_tokens is None

    def __contains__(self, tokens: int) -> bool:
        return self.min_tokens <= tokens and (self.max_tokens is None or tokens <= self.max_tokens)

    def intersect(self, other: TokenRange) -> TokenRange | None:
        """The counts in both ranges; None when no count is."""
        low = max(self.min_tokens, other.min_tokens)
        highs = [h for h in (self.max_tokens, other.max_tokens) if h is not None]
        high = min(highs) if highs else None
        return None if high is not None and high < low else TokenRange(low, high)

    def describe(self) -> str:
        high = "inf)" if self.max_tokens is None else f"{self.max_tokens}]"
        return f"[{self.min_tokens}, {high}"

    def to_dict(self) -> dict[str, int]:
        written = {"min_tokens": self.min_tokens} if self.min_tokens else {}
        return written | ({"max_tokens": self.max_tokens} if self.max_tokens is not None else {})

    @classmethod
    def from_dict(cls, value: Any, path: str, allowed: Iterable[str] = TOKEN_KEYS) -> TokenRange:
        obj = expect_object(value, path)
        _reject_unknown_keys(obj, allowed, path)
        low = _expect_token_count(obj.get("min_tokens", 0), f"{path}.min_tokens")
        high = obj.get("max_tokens")
        if high is not None:
            high = _expect_token_count(high, f"{path}.max_tokens")
        found = cls.__new__(cls)
        object.__setattr__(found, "min_tokens", low)
        object.__setattr__(found, "max_tokens", high)
        found.check(path)
        return found


@dataclass(frozen=True)
class TokenBounds:
    """``token_range``: the token counts for which prefetch runs, overall and per role.

    A prefetch of a role runs where the linear's token count lies in both the overall range
    and its role's range. vllm-ascend's hand-written prefetch used MoE gate/up from 96 tokens
    and MLP below 500: ``{"moe": {"gate_up": {"min_tokens": 96}}, "mlp": {"gate_up":
    {"max_tokens": 499}, "down": {"max_tokens": 499}}}``.
    """

    overall: TokenRange = field(default_factory=TokenRange)
    roles: tuple[tuple[str, TokenRange], ...] = ()  # (role, range), in ROLES order

    def __post_init__(self) -> None:
        roles = dict(self.roles)
        for role in roles:
            if role not in ROLES:
                raise ConfigError(
                    f"{ROOT_KEY}.token_range",
                    f"unknown role {role!r}{did_you_mean(role, ROLES)}; roles are {list(ROLES)}",
                )
        ordered = tuple((r, roles[r]) for r in ROLES if r in roles and not roles[r].unbounded)
        for role, bounds in ordered:
            if self.overall.intersect(bounds) is None:
                raise ConfigError(
                    f"{ROOT_KEY}.token_range.{role}",
                    f"{bounds.describe()} does not meet the overall range "
                    f"{self.overall.describe()}: no token count would be prefetched",
                )
        object.__setattr__(self, "roles", ordered)

    @property
    def unbounded(self) -> bool:
        return self.overall.unbounded and not self.roles

    def for_role(self, role: str | None) -> TokenRange | None:
        """The range in which prefetches of ``role`` run; None when no token count is."""
        own = dict(self.roles).get(role) if role is not None else None
        return self.overall if own is None else self.overall.intersect(own)

    def to_dict(self) -> dict[str, Any]:
        nested: dict[str, Any] = self.overall.to_dict()
        for role, bounds in self.roles:
            section, name = role.split(".")
            nested.setdefault(section, {})[name] = bounds.to_dict()
        return nested

    @classmethod
    def from_dict(cls, value: Any, path: str = f"{ROOT_KEY}.token_range") -> TokenBounds:
        obj = expect_object(value, path)
        layout = _role_layout()
        _reject_unknown_keys(obj, [*TOKEN_KEYS, *layout], path)
        overall = TokenRange.from_dict({k: obj[k] for k in TOKEN_KEYS if k in obj}, path)
        roles: list[tuple[str, TokenRange]] = []
        for section, names in layout.items():
            if section not in obj:
                continue
            body = expect_object(obj[section], f"{path}.{section}")
            _reject_unknown_keys(body, names, f"{path}.{section}")
            for name, bounds in body.items():
                found = TokenRange.from_dict(bounds, f"{path}.{section}.{name}")
                if overall.intersect(found) is None:
                    raise ConfigError(
                        f"{path}.{section}.{name}",
                        f"{found.describe()} does not meet the overall range "
                        f"{overall.describe()}: no token count would be prefetched",
                    )
                roles.append((f"{section}.{name}", found))
        return cls(overall, tuple(roles))


@dataclass(frozen=True)
class WeightPrefetchConfig:
    """A validated ``weight_prefetch_config``. Frozen and hashable; build it with ``from_*``.

    ``enabled=None`` means "not written": the seed guide's default (off) where the config comes
    from vllm-ascend's ``additional_config``, on under ``backend="npu_prefetch"``. Whoever
    consumes a config settles it with :meth:`settled` (a written value always wins), so an
    object and the same JSON mean the same everywhere.
    """

    enabled: bool | None = None
    prefetch_ratio: PrefetchRatios = field(default_factory=PrefetchRatios)
    max_prefetch_bytes: int | str | None = None  # None: the device's cap; "auto" (see ``cap``)
    sequence_parallel: bool = False
    windows: tuple[str, ...] | None = None  # None: the device's (see ``window_kinds``)
    token_range: TokenBounds = field(default_factory=TokenBounds)
    # emit every planned prefetch, even where the device profile predicts a loss (on a GPU
    # the default drops those: see fxprefetch.devices.prediction)
    force_prefetch: bool = False

    def __post_init__(self) -> None:
        if self.enabled is not None:
            expect_bool(self.enabled, f"{ROOT_KEY}.enabled")
        if not isinstance(self.prefetch_ratio, PrefetchRatios):
            raise ConfigError(
                f"{ROOT_KEY}.prefetch_ratio",
                f"expected PrefetchRatios, got {type(self.prefetch_ratio).__name__}",
            )
        if self.max_prefetch_bytes is not None:
            _expect_cap(self.max_prefetch_bytes, f"{ROOT_KEY}.max_prefetch_bytes")
        expect_bool(self.sequence_parallel, f"{ROOT_KEY}.sequence_parallel")
        expect_bool(self.force_prefetch, f"{ROOT_KEY}.force_prefetch")
        if self.windows is not None:
            windows = _expect_windows(self.windows, f"{ROOT_KEY}.windows")
            object.__setattr__(self, "windows", windows)
        if not isinstance(self.token_range, TokenBounds):
            raise ConfigError(
                f"{ROOT_KEY}.token_range",
                f"expected TokenBounds, got {type(self.token_range).__name__}",
            )

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, value: Any, path: str = ROOT_KEY) -> WeightPrefetchConfig:
        """Build from the ``weight_prefetch_config`` object (already parsed JSON)."""
        obj = expect_object(value, path)
        names = [f.name for f in fields(cls)]
        _reject_unknown_keys(obj, names, path)
        kwargs: dict[str, Any] = {}
        if "enabled" in obj:
            kwargs["enabled"] = expect_bool(obj["enabled"], f"{path}.enabled")
        if "prefetch_ratio" in obj:
            kwargs["prefetch_ratio"] = PrefetchRatios.from_dict(
                obj["prefetch_ratio"], f"{path}.prefetch_ratio"
            )
        if "max_prefetch_bytes" in obj:
            kwargs["max_prefetch_bytes"] = _expect_cap(
                obj["max_prefetch_bytes"], f"{path}.max_prefetch_bytes"
            )
        if "sequence_parallel" in obj:
            kwargs["sequence_parallel"] = expect_bool(
                obj["sequence_parallel"], f"{path}.sequence_parallel"
            )
        if "windows" in obj:
            kwargs["windows"] = _expect_windows(obj["windows"], f"{path}.windows")
        if "force_prefetch" in obj:
            kwargs["force_prefetch"] = expect_bool(obj["force_prefetch"], f"{path}.force_prefetch")
        if "token_range" in obj:
            kwargs["token_range"] = TokenBounds.from_dict(obj["token_range"], f"{path}.token_range")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> WeightPrefetchConfig:
        """Build from the JSON text of the ``weight_prefetch_config`` object."""
        return cls.from_dict(parse_json(text, ROOT_KEY))

    @classmethod
    def from_additional_config(
        cls, text: str | Mapping[str, Any], path: str = "additional_config"
    ) -> WeightPrefetchConfig:
        """Build from a whole vllm-ascend ``--additional-config`` JSON string (or its dict).

        Keys other than ``weight_prefetch_config`` belong to vllm-ascend and are ignored; a key
        that looks like a misspelling of ours is reported in a warning naming the closest key.
        Without the section, the result is the default config with ``enabled`` not written.
        """
        obj = parse_json(text, path) if isinstance(text, str) else text
        obj = expect_object(obj, path)
        if ROOT_KEY not in obj:
            for key in obj:
                close = difflib.get_close_matches(key.lower(), [ROOT_KEY], n=1, cutoff=0.75)
                if close or "prefetch" in key.lower():
                    logger.warning(
                        "additional_config.%s is not a key fxprefetch knows: did you mean %r? "
                        "Without it weight prefetch keeps its defaults.",
                        key,
                        ROOT_KEY,
                    )
            return cls()
        return cls.from_dict(obj[ROOT_KEY], f"{path}.{ROOT_KEY}")

    # -- views ---------------------------------------------------------------------------------
    def ratio(self, role: str) -> float:
        """The fraction of the role's weight to prefetch (``"auto"``: up to all of it, 1.0;
        see :meth:`auto_ratio`)."""
        ratio = self.prefetch_ratio[role]
        return 1.0 if ratio == AUTO else float(ratio)

    def auto_ratio(self, role: str) -> bool:
        """Whether the role's ratio is ``"auto"``: sized to what its window can hide."""
        return self.prefetch_ratio[role] == AUTO

    @property
    def auto_cap(self) -> bool:
        """Whether ``max_prefetch_bytes`` is ``"auto"``: each prefetch capped at what its
        window can hide on the device."""
        return self.max_prefetch_bytes == AUTO

    def cap(self, device_cap: int | None = None) -> int:
        """The byte cap of one prefetch: the written ``max_prefetch_bytes``, else the device's
        own (``device_cap``: the CUDA lowering derives one from its bandwidth), else the
        guide's 18 MiB. For ``"auto"`` this is the fallback where no device profile says
        what a window hides."""
        if isinstance(self.max_prefetch_bytes, int):
            return self.max_prefetch_bytes
        return device_cap if device_cap is not None else DEFAULT_MAX_PREFETCH_BYTES

    def window_kinds(self, device_default: tuple[str, ...] = DEFAULT_WINDOWS) -> tuple[str, ...]:
        """The window kinds in use: the written ``windows``, else the device's default."""
        return self.windows if self.windows is not None else device_default

    def tokens(self, role: str | None) -> TokenRange | None:
        """The token counts for which prefetches of ``role`` run (None: no count)."""
        return self.token_range.for_role(role)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; ``enabled``, ``max_prefetch_bytes``, ``windows`` and an unbounded
        ``token_range`` are left out when they were not written (so digests of configs without
        them are those of earlier versions)."""
        written: dict[str, Any] = {"enabled": self.enabled} if self.enabled is not None else {}
        if self.max_prefetch_bytes is not None:
            written["max_prefetch_bytes"] = self.max_prefetch_bytes
        windows = {"windows": list(self.windows)} if self.windows is not None else {}
        bounds = {} if self.token_range.unbounded else {"token_range": self.token_range.to_dict()}
        force = {"force_prefetch": True} if self.force_prefetch else {}
        return {
            **written,
            "prefetch_ratio": self.prefetch_ratio.to_dict(),
            "sequence_parallel": self.sequence_parallel,
            **windows,
            **bounds,
            **force,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def digest(self) -> str:
        """A stable short hash of the configuration, for compile-cache keys."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def settled(self, default_enabled: bool) -> WeightPrefetchConfig:
        """This config with ``enabled`` written: ``default_enabled`` where it was not."""
        return self if self.enabled is not None else self.with_enabled(default_enabled)

    def with_enabled(self, enabled: bool = True) -> WeightPrefetchConfig:
        """This config with ``enabled`` set (every other field kept)."""
        return replace(self, enabled=enabled)
