"""``PrefetchPlan``: what the pass saw and did.

For tools (``.to_json()``, schema in ``plan_schema.json``) and, through
``fxprefetch.plan.render``, for people (``.table()``, ``.summary_line()``).
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fxprefetch.plan import render as plan_render

PLAN_SCHEMA_VERSION = 3  # 2: span_bytes; "prediction" per linear and per plan; token bounds;
# 3: "lowering" per linear
#: versions :meth:`PrefetchPlan.from_dict` reads (fields added since take their defaults)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)


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
    WINDOW_TOO_SHORT = "window too short to hide any bytes (auto size, model)"
    OUTSIDE_GRAPHS = "ran outside compiled graphs (graph break)"
    UNUSED = "not used: no graph took it and no op read it"
    HIDDEN_WEIGHTS = "weights hidden inside an opaque op"  # vLLM's fused MoE, fused nn layers
    OPAQUE_OP = "weight consumed by an opaque op"  # a custom op, not a linear: see the note
    UNKNOWN_SOURCE = "cannot tell whether the operand is a weight"
    OUTSIDE_TOKEN_RANGE = "token count outside the role's token range"
    TOKENS_UNKNOWN = "token count has no graph value before the window"
    PREDICTED_LOSS = "predicted not to pay on this device (model)"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PredictedSaving:
    """What the prediction model (``fxprefetch.devices.prediction``) says one prefetch hides on a
    device profile. A model from public specs, never a measurement."""

    device: str  # the profile's name
    window_bytes: int  # bytes the window's ops read and write (from meta['val'] sizes)
    window_kernels: int  # kernels the window launches (fused vector work, attention, ...)
    window_us: float
    shared_us: float  # the window's time taken by earlier prefetches behind the same window
    transfer_us: float  # prefetch bytes / bandwidth
    cost_us: float  # c_fixed + β·bytes of the lowering
    hidden_us: float  # δ·useful·min(bytes, (window_us - shared_us)·B_read) - cost_us
    auto_bytes: int | None = None  # what the window can hide, where the size was "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    # bytes from offset to the last byte the matmul reads: what the prefetch's contiguous
    # range covers, more than weight_bytes for a strided part (a column slice); None: equal
    span_bytes: int | None = None
    capped: bool = False
    window: tuple[str, ...] = ()
    window_kind: str | None = None
    dependency: str | None = None
    dependency_op: str | None = None
    prefetch_node: str | None = None
    skip_reason: SkipReason | None = None  # a reason's text is read back as the reason
    # what the pass found about the operand: "graph input 'x'", "stored int8, converted by ..."
    note: str | None = None
    # collectives the window walk crossed to reach the vector work behind them
    crossed: tuple[str, ...] = ()
    # positions in the graph the pass saw (node indices), for timelines
    position: int = -1
    dependency_position: int | None = None
    window_start: int | None = None
    # the prediction model's numbers for this prefetch, where a device profile is known
    prediction: PredictedSaving | None = None
    # token bounds: the linear's token count ("128", or symbolic "s0": the rows of its
    # activation in its own orientation, for experts the tokens routed into the layer; see
    # fxprefetch.passes.analysis.token_bounds.linear_tokens; None where the activation's shape
    # is unknown), the token range in which its prefetch runs (None, None: every count), and
    # how that is decided:
    # "graph" (once, for this compiled graph) or "run time" (the prefetch checks the count)
    tokens: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    token_check: str | None = None
    # the lowering its prefetch got, where the target names one (the npu target:
    # "ascend_cmo", "ascend_side_stream" or "ascend_in_stream"); None elsewhere
    lowering: str | None = None

    def __post_init__(self) -> None:
        if self.span_bytes is None:
            object.__setattr__(self, "span_bytes", self.weight_bytes)
        if self.skip_reason is not None and not isinstance(self.skip_reason, SkipReason):
            # ValueError for a text no SkipReason has (plan files are checked before this)
            object.__setattr__(self, "skip_reason", SkipReason(self.skip_reason))

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
    lowering: str | None = None  # what the prefetches became in the compiled code (per device)
    # the modules whose calls ran this graph, where dynamo compiled it for one module's own
    # frame and reuses it for others (a graph break inside each decoder layer): records name
    # the first call site's weights, their notes every call site's; empty: the graph's own
    call_sites: list[str] = field(default_factory=list)

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

    def predicted(self) -> PlanPrediction | None:
        """The model's predicted saving per layer and per graph call; None without a profile."""
        return predicted_saving([self])

    def summary_line(self) -> str:
        """One line for logs: linears seen and prefetched, bytes, skips, predicted saving."""
        return plan_render.summary_line(self)

    def to_dict(self) -> dict[str, Any]:
        predicted = self.predicted()
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "graph": self.graph,
            "config_digest": self.config_digest,
            "enabled": self.enabled,
            "sequence_parallel": self.sequence_parallel,
            "error": self.error,
            "lowering": self.lowering,
            "call_sites": list(self.call_sites),
            "summary": asdict(self.summary()),
            "prediction": predicted.to_dict() if predicted is not None else None,
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
            prediction = linear.get("prediction")
            fields_ = {
                **linear,
                "weight_shape": tuple(linear["weight_shape"]),
                "window": tuple(linear["window"]),
                "crossed": tuple(linear["crossed"]),
                "prediction": PredictedSaving(**prediction) if prediction else None,
            }
            records.append(LinearRecord(**fields_))
        return cls(
            records=records,
            graph=data["graph"],
            config_digest=data["config_digest"],
            enabled=data["enabled"],
            sequence_parallel=data["sequence_parallel"],
            error=data["error"],
            lowering=data.get("lowering"),
            call_sites=list(data.get("call_sites", [])),
        )

    def table(self, fold: bool = False) -> str:
        """A fixed-width table, one row per linear (``fold`` merges identical layers)."""
        return plan_render.render_table([self], fold=fold)


@dataclass(frozen=True)
class PlanPrediction:
    """The model's predicted saving (µs) summed per layer and per graph call."""

    device: str
    prefetches: int
    per_layer_us: dict[int, float]  # decoder layer -> µs hidden
    other_us: float  # prefetches outside decoder layers
    per_step_us: float  # the whole graph call (every graph, for several plans)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_layer_us"] = {str(k): v for k, v in self.per_layer_us.items()}
        return d

    def line(self) -> str:
        return (
            f"predicted saving on {self.device} (model): {self.per_step_us:.2f} µs per step "
            f"from {self.prefetches} prefetches"
        )


def predicted_saving(plans: Sequence[PrefetchPlan]) -> PlanPrediction | None:
    """Sum the records' predictions over ``plans``; None where no record has one."""
    done = [r for p in plans for r in p.records if r.prefetched and r.prediction is not None]
    if not done:
        return None
    per_layer: dict[int, float] = {}
    other = 0.0
    for r in done:
        assert r.prediction is not None
        if r.layer is None:
            other += r.prediction.hidden_us
        else:
            per_layer[r.layer] = per_layer.get(r.layer, 0.0) + r.prediction.hidden_us
    devices = sorted({r.prediction.device for r in done if r.prediction is not None})
    return PlanPrediction(
        device=",".join(devices),
        prefetches=len(done),
        per_layer_us=dict(sorted(per_layer.items())),
        other_us=other,
        per_step_us=sum(per_layer.values()) + other,
    )
