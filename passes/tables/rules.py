"""The rules the pass decides by, as one frozen, hashable value with a digest.

:class:`PrefetchRules` holds every table the pass reads: linear ops, vector / transparent /
barrier / attention ops and the op tags that count as vector work, collectives and the
argument they send, the ops between a stored weight and its matmul (views, casts,
dequantize steps, indexing), how module paths are read (wrappers, weight suffixes, layer and
expert containers), role rules, and the role policy (which roles need sequence parallelism,
what the first matmul of an unnamed experts module is). The defaults are data, in this
package's other modules (:data:`DEFAULT_RULES`). An extension makes a new value: a
``with_*`` method (``rules.with_linear_op(...)``) or ``dataclasses.replace`` for any other
table. The pass reads only the value it is given, and the backend puts ``rules.digest``
(computed over every field) into the compile cache key, so a graph compiled under other rules
is never served.

The module-level ``register_*`` / :func:`add_role_rule` are conveniences over the ``with_*``
methods: they replace the process-wide value that :func:`current_rules` returns, which the
backend snapshots at each compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from fxprefetch.passes.tables import collectives as _collectives
from fxprefetch.passes.tables import module_paths as _paths
from fxprefetch.passes.tables.linear_ops import DEFAULT_LINEAR_OPS, LinearOpSpec
from fxprefetch.passes.tables.op_kinds import (
    DEFAULT_ATTENTION_OPS,
    DEFAULT_BARRIER_OPS,
    DEFAULT_TRANSPARENT_OPS,
    DEFAULT_VECTOR_OPS,
    DEFAULT_VECTOR_TAGS,
)
from fxprefetch.passes.tables.role_rules import DEFAULT_ROLE_RULES, RoleRule
from fxprefetch.passes.tables.weight_ops import (
    DEFAULT_WEIGHT_CASTS,
    DEFAULT_WEIGHT_DEQUANTIZE,
    DEFAULT_WEIGHT_INDEX,
    DEFAULT_WEIGHT_VIEWS,
)
from fxprefetch.roles import MLP_DOWN, MOE_GATE_UP, ROLES

OpKind = Literal["vector", "transparent", "barrier", "attention"]
WeightOpKind = Literal["view", "cast", "dequantize", "index"]
_WEIGHT_OP_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "view": "weight_views",
        "cast": "weight_casts",
        "dequantize": "weight_dequantize",
        "index": "weight_index",
    }
)


@dataclass(frozen=True)
class PrefetchRules:
    """Every table the pass reads. Frozen, hashable, picklable (op tables hold names).

    Sets may be given as sets and sequences as lists: they are stored frozen.
    """

    # which ops are linears (see tables.linear_ops)
    linear_ops: tuple[tuple[str, LinearOpSpec], ...] = tuple(sorted(DEFAULT_LINEAR_OPS.items()))
    # the window walk (see tables.op_kinds)
    vector_ops: frozenset[str] = DEFAULT_VECTOR_OPS
    transparent_ops: frozenset[str] = DEFAULT_TRANSPARENT_OPS
    barrier_ops: frozenset[str] = DEFAULT_BARRIER_OPS
    attention_ops: frozenset[str] = DEFAULT_ATTENTION_OPS  # barriers an attention window crosses
    vector_tags: frozenset[str] = DEFAULT_VECTOR_TAGS  # torch.Tag names of vector work
    # collectives (see tables.collectives)
    all_gather_ops: frozenset[str] = _collectives.ALL_GATHER
    reduce_scatter_ops: frozenset[str] = _collectives.REDUCE_SCATTER
    wait_ops: frozenset[str] = _collectives.WAIT
    collective_ops: frozenset[str] = _collectives.COLLECTIVES
    collective_inputs: tuple[str, ...] = _collectives.COLLECTIVE_INPUTS  # first present wins
    # between a stored weight and its matmul (see tables.weight_ops)
    weight_views: frozenset[str] = DEFAULT_WEIGHT_VIEWS
    weight_casts: frozenset[str] = DEFAULT_WEIGHT_CASTS
    weight_dequantize: frozenset[str] = DEFAULT_WEIGHT_DEQUANTIZE
    weight_index: frozenset[str] = DEFAULT_WEIGHT_INDEX
    # module and parameter paths (see tables.module_paths)
    module_wrappers: tuple[str, ...] = _paths.DEFAULT_MODULE_WRAPPERS
    weight_suffixes: tuple[str, ...] = _paths.DEFAULT_WEIGHT_SUFFIXES  # first match wins
    layer_containers: tuple[str, ...] = _paths.DEFAULT_LAYER_CONTAINERS
    expert_modules: tuple[str, ...] = _paths.DEFAULT_EXPERT_MODULES
    # roles (see tables.role_rules and fxprefetch.roles)
    role_rules: tuple[RoleRule, ...] = DEFAULT_ROLE_RULES  # first match wins
    sequence_parallel_roles: frozenset[str] = frozenset({MLP_DOWN})
    first_expert_role: str | None = MOE_GATE_UP  # the first matmul of unnamed experts
    _cache: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            collection = str(f.type).startswith(("frozenset", "tuple"))
            if collection and isinstance(value, str):  # a set of one name is {"name"}
                raise TypeError(
                    f"PrefetchRules.{f.name}: expected a collection ({f.type}), got the "
                    f"string {value!r}"
                )
            if isinstance(value, (set, frozenset)) and type(value) is not frozenset:
                object.__setattr__(self, f.name, frozenset(value))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self._check_roles()

    def _check_roles(self) -> None:
        """Every role the tables name is a role of ``fxprefetch.roles``; rules compile."""

        def check(role: object, where: str) -> None:
            if role is not None and role not in ROLES:
                raise ValueError(
                    f"PrefetchRules.{where}: unknown role {role!r}; expected one of {ROLES} "
                    "or None (a new role is a row in fxprefetch.roles.ROLE_TABLE)"
                )

        for i, rule in enumerate(self.role_rules):
            check(rule.role, f"role_rules[{i}]")
            try:
                re.compile(rule.pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"PrefetchRules.role_rules[{i}]: pattern {rule.pattern!r} is not a "
                    f"regular expression: {exc}"
                ) from None
        for role in sorted(self.sequence_parallel_roles, key=str):
            check(role, "sequence_parallel_roles")
        check(self.first_expert_role, "first_expert_role")
        for name, spec in self.linear_ops:
            if spec.hidden:
                check(spec.weight or None, f"linear_ops[{name!r}].weight")

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    @property
    def linear_table(self) -> Mapping[str, LinearOpSpec]:
        return self._cached("linear_table", lambda: MappingProxyType(dict(self.linear_ops)))

    @property
    def wrappers_pattern(self) -> re.Pattern[str]:
        """A wrapper module's path component (``.base_layer``), to be removed from a path."""
        return self._cached(
            "wrappers", lambda: re.compile(_paths.wrappers_regex(self.module_wrappers))
        )

    @property
    def layer_pattern(self) -> re.Pattern[str]:
        """A decoder layer in a path; group 1 is its index."""
        return self._cached("layer", lambda: re.compile(_paths.layer_regex(self.layer_containers)))

    @property
    def experts_pattern(self) -> re.Pattern[str]:
        """An experts module in a path (ending the path or followed by a child)."""
        return self._cached(
            "experts",
            lambda: re.compile(rf"{_paths.experts_regex(self.expert_modules)}(?:$|\.)"),
        )

    @property
    def digest(self) -> str:
        """A stable hash of every field, for compile-cache keys."""
        return self._cached("digest", lambda: hashlib.sha256(_canonical(self).encode()).hexdigest())

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
        if isinstance(activations, str):
            raise TypeError(
                f"activations: expected a tuple of argument names, got the string "
                f"{activations!r} (write ({activations!r},))"
            )
        if not activations:
            raise ValueError("a linear op needs at least one activation argument")
        spec = LinearOpSpec(weight, tuple(activations), swappable=swappable)
        table = dict(self.linear_ops) | {qualified_name: spec}
        return replace(self, linear_ops=tuple(sorted(table.items())))

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
        )

    def with_role_rule(
        self, pattern: str, role: str | None, why: str = "user rule"
    ) -> PrefetchRules:
        """Map paths matching ``pattern`` (``re.search``) to ``role``; tried before the others."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES} or None")
        re.compile(pattern)
        return replace(self, role_rules=(RoleRule(pattern, role, why), *self.role_rules))

    def with_weight_op(self, qualified_name: str, kind: WeightOpKind) -> PrefetchRules:
        """Let the weight trace walk through ``qualified_name`` as a view of the weight's
        storage, a cast (reads all of it), a dequantize step (the operand as large as the
        result is the weight) or an index (picks a part at run time)."""
        _check_op_name(qualified_name)
        if kind not in _WEIGHT_OP_FIELDS:
            raise ValueError(f"kind must be one of {tuple(_WEIGHT_OP_FIELDS)}, got {kind!r}")
        changes = {
            name: getattr(self, name) - {qualified_name} for name in _WEIGHT_OP_FIELDS.values()
        }
        changes[_WEIGHT_OP_FIELDS[kind]] |= {qualified_name}
        return replace(self, **changes)

    def with_module_wrapper(self, name: str) -> PrefetchRules:
        """Read ``a.<name>.b`` as ``a.b``: ``name`` wraps the real layer one level down."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"expected one module name without dots, got {name!r}")
        if name in self.module_wrappers:
            return self
        return replace(self, module_wrappers=(*self.module_wrappers, name))


def _canonical(value: object) -> str:
    """A text that only equal values share, the same in every process: sets sorted,
    dataclasses by their compared fields (named), patterns by their source."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, re.Pattern):
        return f"re({value.pattern!r}, {value.flags})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        body = ", ".join(
            f"{f.name}={_canonical(getattr(value, f.name))}"
            for f in dataclasses.fields(value)
            if f.compare
        )
        return f"{type(value).__name__}({body})"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_canonical(v) for v in value)) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_canonical(v) for v in value) + ")"
    if isinstance(value, Mapping):
        items = sorted(f"{_canonical(k)}: {_canonical(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no stable form for a {type(value).__name__} in the rules")


def _check_op_name(qualified_name: str) -> None:
    if isinstance(qualified_name, str):
        namespace, _, op = qualified_name.partition("::")
    else:
        namespace = op = ""
    if not namespace or not op or not namespace.isidentifier():
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
