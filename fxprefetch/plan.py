"""``PrefetchPlan``: what the pass saw and did.

For people (``.table()``) and for tools (``.to_json()``, schema in ``plan_schema.json``).
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_SCHEMA_VERSION = 2
#: versions :meth:`PrefetchPlan.from_dict` reads (fields added since take their defaults)
READABLE_SCHEMA_VERSIONS = (1, 2)


class SkipReason(str, enum.Enum):
    """Why a linear got no prefetch. A ``str``, so plans serialize as they read."""

    NOT_A_WEIGHT = "not a weight"
    NO_ROLE = "no role"
    DISABLED = "prefetch disabled"
    ZERO_RATIO = "ratio is 0"
    EMPTY_WINDOW = "no vector work before the linear"
    NEEDS_SEQUENCE_PARALLEL = "mlp.down needs sequence parallelism"
    ALREADY_PREFETCHED = "already prefetched"
    SYMBOLIC_WEIGHT = "weight size is symbolic"
    EMPTY_WEIGHT = "weight is empty"
    UNSUPPORTED_WEIGHT = "weight is not a single parameter tensor"
    INDEXED_WEIGHT = "expert picked by a tensor index at run time"
    ZERO_BYTES = "ratio x weight bytes rounds to 0"
    OUTSIDE_GRAPHS = "ran outside compiled graphs (graph break)"
    HIDDEN_WEIGHTS = "weights hidden inside an opaque op (vLLM fused MoE)"
    OUTSIDE_TOKEN_RANGE = "token count outside the role's token range"
    TOKENS_UNKNOWN = "token count has no graph value before the window"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LinearRecord:
    """One linear layer the pass saw."""

    node: str
    op: str
    module: str | None
    weight: str
    layer: int | None
    role: str | None
    weight_shape: tuple[int, ...]
    dtype: str
    weight_bytes: int
    ratio: float | None = None
    prefetch_bytes: int = 0
    offset: int = 0
    capped: bool = False
    window: tuple[str, ...] = ()
    window_kind: str | None = None
    dependency: str | None = None
    dependency_op: str | None = None
    prefetch_node: str | None = None
    skip_reason: str | None = None
    # what the pass found about the operand: "graph input 'x'", "stored int8, converted by ..."
    note: str | None = None
    # collectives the window walk crossed to reach the vector work behind them
    crossed: tuple[str, ...] = ()
    # positions in the graph the pass saw (node indices), for timelines
    position: int = -1
    dependency_position: int | None = None
    window_start: int | None = None
    # token bounds (issue 22): the linear's token count ("128", or symbolic "s0"), the token
    # range in which its prefetch runs (None, None: every count), and how that is decided:
    # "graph" (once, for this compiled graph) or "run time" (the prefetch checks the count)
    tokens: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    token_check: str | None = None

    @property
    def prefetched(self) -> bool:
        return self.prefetch_node is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["window"] = list(self.window)
        d["crossed"] = list(self.crossed)
        if self.skip_reason is not None:
            d["skip_reason"] = str(self.skip_reason)
        return d


@dataclass(frozen=True)
class PlanSummary:
    linears: int
    prefetched: int
    bytes_prefetched: int
    weight_bytes_prefetched: int
    capped: int
    skipped: dict[str, int]
    by_role: dict[str, int]


@dataclass
class PrefetchPlan:
    """Every linear seen in one graph, with its prefetch or the reason it has none."""

    records: list[LinearRecord] = field(default_factory=list)
    graph: str = "graph"
    config_digest: str | None = None
    enabled: bool = True
    sequence_parallel: bool = False
    error: str | None = None  # set when the pass failed and the graph was compiled without it

    def __iter__(self) -> Iterator[LinearRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prefetched(self) -> list[LinearRecord]:
        return [r for r in self.records if r.prefetched]

    @property
    def skipped(self) -> list[LinearRecord]:
        return [r for r in self.records if not r.prefetched]

    def by_role(self, role: str) -> list[LinearRecord]:
        return [r for r in self.records if r.role == role]

    def summary(self) -> PlanSummary:
        done = self.prefetched
        return PlanSummary(
            linears=len(self.records),
            prefetched=len(done),
            bytes_prefetched=sum(r.prefetch_bytes for r in done),
            weight_bytes_prefetched=sum(r.weight_bytes for r in done),
            capped=sum(r.capped for r in done),
            skipped=dict(Counter(str(r.skip_reason) for r in self.skipped if r.skip_reason)),
            by_role=dict(Counter(r.role for r in done if r.role)),
        )

    def summary_line(self) -> str:
        s = self.summary()
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items()))
        line = (
            f"{self.graph}: {s.prefetched}/{s.linears} linears prefetched, "
            f"{_fmt_bytes(s.bytes_prefetched)} in total, {s.capped} capped"
        )
        if skipped:
            line += f"; skipped: {skipped}"
        if self.error:
            line += f"; pass failed: {self.error}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "graph": self.graph,
            "config_digest": self.config_digest,
            "enabled": self.enabled,
            "sequence_parallel": self.sequence_parallel,
            "error": self.error,
            "summary": asdict(self.summary()),
            "linears": [r.to_dict() for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefetchPlan:
        """Inverse of :meth:`to_dict`."""
        if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(f"unsupported plan schema version {data.get('schema_version')!r}")
        records = []
        for linear in data["linears"]:
            fields_ = {
                **linear,
                "weight_shape": tuple(linear["weight_shape"]),
                "window": tuple(linear["window"]),
                "crossed": tuple(linear["crossed"]),
            }
            records.append(LinearRecord(**fields_))
        return cls(
            records=records,
            graph=data["graph"],
            config_digest=data["config_digest"],
            enabled=data["enabled"],
            sequence_parallel=data["sequence_parallel"],
            error=data["error"],
        )

    def table(self, fold: bool = False) -> str:
        """A fixed-width table, one row per linear (``fold`` merges identical layers)."""
        return render_table([self], fold=fold)


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _display_path(r: LinearRecord) -> str:
    """The parameter's owner path when known (``...experts.gate_up_proj``), else the module."""
    if "." in r.weight:
        return r.weight[: -len(".weight")] if r.weight.endswith(".weight") else r.weight
    return r.module or r.weight


def _row(r: LinearRecord) -> tuple[str, ...]:
    window = ",".join(w.split("::")[-1] for w in r.window)
    if len(window) > 40:
        window = window[:37] + "..."
    return (
        "" if r.layer is None else str(r.layer),
        _display_path(r),
        r.role or "-",
        "x".join(map(str, r.weight_shape)) + f" {r.dtype.replace('torch.', '')}",
        _fmt_bytes(r.weight_bytes),
        _fmt_bytes(r.prefetch_bytes) if r.prefetched else "-",
        "yes" if r.capped else "",
        f"{r.window_kind}: {window}" if r.prefetched else _reason(r),
        r.dependency or "",
    )


def _reason(r: LinearRecord) -> str:
    reason = str(r.skip_reason or "")
    return f"{reason} ({r.note})" if r.note and r.skip_reason else reason


def _fold_key(r: LinearRecord) -> tuple[Any, ...]:
    module = _display_path(r)
    if r.layer is not None:
        module = module.replace(f".{r.layer}.", ".*.", 1)
    return (
        module,
        r.role,
        r.weight_shape,
        r.dtype,
        r.prefetch_bytes,
        r.capped,
        r.window_kind,
        r.skip_reason,
        tuple(w.split("::")[-1] for w in r.window),
    )


def render_totals(plans: Sequence[PrefetchPlan]) -> str:
    """One line of totals over several graphs' plans."""
    records = [r for p in plans for r in p.records]
    done = [r for r in records if r.prefetched]
    skipped = Counter(str(r.skip_reason) for r in records if not r.prefetched and r.skip_reason)
    line = (
        f"totals: {len(records)} linears seen, {len(done)} prefetched "
        f"({_fmt_bytes(sum(r.prefetch_bytes for r in done))} of "
        f"{_fmt_bytes(sum(r.weight_bytes for r in done))} weights), "
        f"{sum(r.capped for r in done)} capped"
    )
    if skipped:
        line += "; skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
    return line


def render_table(plans: Sequence[PrefetchPlan], fold: bool = False) -> str:
    header = (
        "layer",
        "module",
        "role",
        "weight",
        "bytes",
        "prefetch",
        "capped",
        "window / skip reason",
        "dependency",
    )
    rows: list[tuple[str, ...]] = []
    for plan in plans:
        if not fold:
            rows.extend(_row(r) for r in plan.records)
            continue
        groups: dict[tuple[Any, ...], list[LinearRecord]] = {}
        for r in plan.records:
            groups.setdefault(_fold_key(r), []).append(r)
        for members in groups.values():
            first = _row(members[0])
            layers = sorted({m.layer for m in members if m.layer is not None})
            layer = (
                first[0]
                if len(members) == 1
                else (
                    f"{layers[0]}-{layers[-1]} (x{len(members)})" if layers else f"x{len(members)}"
                )
            )
            module = _fold_key(members[0])[0] if len(members) > 1 else first[1]
            rows.append((layer, module, *first[2:8], "" if len(members) > 1 else first[8]))
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    lines.extend(p.summary_line() for p in plans)
    return "\n".join(lines)
