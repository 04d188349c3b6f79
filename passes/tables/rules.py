"""The rules the pass decides by, as one frozen, hashable value with a digest.

:class:`PrefetchRules` holds every table the pass reads: linear ops, vector / transparent /
barrier ops, collectives, role rules, and the role policy (which roles need sequence
parallelism, what the first matmul of an unnamed experts module is). The defaults are data
(:data:`DEFAULT_RULES`); an extension makes a new value (``rules.with_linear_op(...)``). The
pass reads only the value it is given, and the backend puts ``rules.digest`` into the compile
cache key, so a graph compiled under other rules is never served.

The module-level ``register_*`` / :func:`add_role_rule` are conveniences: they replace the
process-wide value that :func:`current_rules` returns, which the backend snapshots at each
compile.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from fxprefetch.config import ROLES
from fxprefetch.passes.tables import collectives as _collectives
from fxprefetch.passes.tables.linear_ops import DEFAULT_LINEAR_OPS, LinearOpSpec
from fxprefetch.passes.tables.op_kinds import (
    DEFAULT_ATTENTION_OPS,
    DEFAULT_BARRIER_OPS,
    DEFAULT_TRANSPARENT_OPS,
    DEFAULT_VECTOR_OPS,
)
from fxprefetch.passes.tables.role_rules import DEFAULT_ROLE_RULES, RoleRule

OpKind = Literal["vector", "transparent", "barrier", "attention"]


@dataclass(frozen=True)
class PrefetchRules:
    """Every table the pass reads. Frozen, hashable, picklable (op tables hold names)."""

    linear_ops: tuple[tuple[str, LinearOpSpec], ...] = tuple(sorted(DEFAULT_LINEAR_OPS.items()))
    vector_ops: frozenset[str] = DEFAULT_VECTOR_OPS
    transparent_ops: frozenset[str] = DEFAULT_TRANSPARENT_OPS
    barrier_ops: frozenset[str] = DEFAULT_BARRIER_OPS
    attention_ops: frozenset[str] = DEFAULT_ATTENTION_OPS  # barriers an attention window crosses
    all_gather_ops: frozenset[str] = _collectives.ALL_GATHER
    reduce_scatter_ops: frozenset[str] = _collectives.REDUCE_SCATTER
    wait_ops: frozenset[str] = _collectives.WAIT
    collective_ops: frozenset[str] = _collectives.COLLECTIVES
    role_rules: tuple[RoleRule, ...] = DEFAULT_ROLE_RULES  # first match wins
    sequence_parallel_roles: frozenset[str] = frozenset({"mlp.down"})
    first_expert_role: str | None = "moe.gate_up"  # the first matmul of unnamed experts
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def linear_table(self) -> Mapping[str, LinearOpSpec]:
        table = self._cache.get("linear_table")
        if table is None:
            table = self._cache["linear_table"] = MappingProxyType(dict(self.linear_ops))
        return table

    @property
    def digest(self) -> str:
        """A stable hash of every table, for compile-cache keys."""
        value = self._cache.get("digest")
        if value is None:
            parts = [
                repr(self.linear_ops),
                *(
                    repr(sorted(s))
                    for s in (
                        self.vector_ops,
                        self.transparent_ops,
                        self.barrier_ops,
                        self.all_gather_ops,
                        self.reduce_scatter_ops,
                        self.wait_ops,
                        self.collective_ops,
                        self.sequence_parallel_roles,
                        self.attention_ops,
                    )
                ),
                repr(self.role_rules),
                repr(self.first_expert_role),
            ]
            value = self._cache["digest"] = hashlib.sha256("|".join(parts).encode()).hexdigest()
        return value

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache={})

    # -- extensions: each returns a new value -----------------------------------------------------
    def with_linear_op(
        self,
        qualified_name: str,
        weight: str,
        activations: tuple[str, ...],
        *,
        swappable: bool = False,
    ) -> PrefetchRules:
        """Teach the pass a linear op, e.g. ``("myns::gemm", "w", ("x",))``."""
        _check_op_name(qualified_name)
        if not activations:
            raise ValueError("a linear op needs at least one activation argument")
        spec = LinearOpSpec(weight, tuple(activations), swappable=swappable)
        table = dict(self.linear_ops) | {qualified_name: spec}
        return replace(self, linear_ops=tuple(sorted(table.items())), _cache={})

    def with_op_kind(self, qualified_name: str, kind: OpKind) -> PrefetchRules:
        """Count ``qualified_name`` as vector work, transparent, a barrier to the walk, or
        attention (a barrier that an attention window crosses)."""
        _check_op_name(qualified_name)
        kinds = ("vector", "transparent", "barrier", "attention")
        if kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
        sets = {
            "vector": self.vector_ops - {qualified_name},
            "transparent": self.transparent_ops - {qualified_name},
            "barrier": self.barrier_ops - {qualified_name},
            "attention": self.attention_ops - {qualified_name},
        }
        sets[kind] = sets[kind] | {qualified_name}
        return replace(
            self,
            vector_ops=sets["vector"],
            transparent_ops=sets["transparent"],
            barrier_ops=sets["barrier"],
            attention_ops=sets["attention"],
            _cache={},
        )

    def with_role_rule(
        self, pattern: str, role: str | None, why: str = "user rule"
    ) -> PrefetchRules:
        """Map paths matching ``pattern`` (``re.search``) to ``role``; tried before the others."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES} or None")
        re.compile(pattern)
        return replace(self, role_rules=(RoleRule(pattern, role, why), *self.role_rules), _cache={})


def _check_op_name(qualified_name: str) -> None:
    if not isinstance(qualified_name, str) or "::" not in qualified_name:
        raise ValueError(
            f"expected a qualified op name like 'namespace::op', got {qualified_name!r}"
        )


DEFAULT_RULES = PrefetchRules()


class _ProcessRules:
    """The process-wide value the ``register_*`` conveniences replace."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = DEFAULT_RULES

    def update(self, change: Callable[[PrefetchRules], PrefetchRules]) -> None:
        with self.lock:
            self.value = change(self.value)


_PROCESS = _ProcessRules()


def current_rules() -> PrefetchRules:
    """The process-wide rules: the defaults plus what ``register_*`` added."""
    return _PROCESS.value


def set_rules(rules: PrefetchRules) -> None:
    """Replace the process-wide rules (``DEFAULT_RULES`` restores the defaults)."""
    if not isinstance(rules, PrefetchRules):
        raise TypeError(f"expected PrefetchRules, got {type(rules).__name__}")
    _PROCESS.update(lambda _: rules)


_update = _PROCESS.update


def register_linear_op(qualified_name: str, weight: str, activations: tuple[str, ...]) -> None:
    """Teach the pass a new linear op, e.g. ``register_linear_op("myns::gemm", "w", ("x",))``."""
    _update(lambda r: r.with_linear_op(qualified_name, weight, activations))


def register_vector_op(qualified_name: str) -> None:
    """Count ``qualified_name`` as vector work a prefetch may hide behind."""
    _update(lambda r: r.with_op_kind(qualified_name, "vector"))


def register_transparent_op(qualified_name: str) -> None:
    """Walk through ``qualified_name`` without counting it as work (a view or layout op)."""
    _update(lambda r: r.with_op_kind(qualified_name, "transparent"))


def register_barrier_op(qualified_name: str) -> None:
    """Stop the walk at ``qualified_name`` even if its tags say pointwise."""
    _update(lambda r: r.with_op_kind(qualified_name, "barrier"))


def register_attention_op(qualified_name: str) -> None:
    """Count ``qualified_name`` as attention: a barrier that attention windows cross."""
    _update(lambda r: r.with_op_kind(qualified_name, "attention"))


def add_role_rule(pattern: str, role: str | None, why: str = "user rule") -> None:
    """Map linears whose path matches ``pattern`` (``re.search``) to ``role``."""
    _update(lambda r: r.with_role_rule(pattern, role, why))
