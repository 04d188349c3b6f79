"""Run the weight-prefetch pass on one compiled graph, safely, and keep its plan.

The backend builds one :class:`GraphPlanner` per dynamo graph. It maps the aten graph's
placeholders back to parameter paths, runs the pass, and — prefetch being an optimization —
on failure removes whatever it inserted and logs a warning (or raises in strict mode).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from torch.fx import GraphModule

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.plan import PrefetchPlan
from passes.strip_prefetch import strip_prefetch
from passes.weight_prefetch import run_weight_prefetch

logger = logging.getLogger("fxprefetch")

_plans: list[PrefetchPlan] = []
_plans_lock = threading.Lock()
_graph_ids = itertools.count()


def last_plans() -> list[PrefetchPlan]:
    """Plans of every graph compiled with the backend since the last :func:`clear_plans`."""
    with _plans_lock:
        return list(_plans)


def clear_plans() -> None:
    with _plans_lock:
        _plans.clear()


def _remember(plan: PrefetchPlan) -> None:
    with _plans_lock:
        _plans.append(plan)


class PrefetchPassError(RuntimeError):
    """The weight-prefetch pass failed on a graph (raised only in strict mode)."""


def graph_kind(gm: GraphModule) -> str:
    """``inference``, ``forward`` or ``backward``, from AOT autograd's placeholder names."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    if any(n.startswith("primals") for n in names):
        return "forward"
    return "inference"


class GraphPlanner:
    """Applies the pass to the aten graph(s) of one dynamo graph."""

    def __init__(
        self,
        config: WeightPrefetchConfig,
        *,
        strict: bool = False,
        source_names: Sequence[str | None] = (),
        name: str | None = None,
        record: bool = True,
        recompile: bool = True,
    ) -> None:
        self.config = config
        self.recompile = recompile  # False where the compiler regenerates code itself
        self.record = record  # add plans to last_plans()
        self.strict = strict
        self.source_names = list(source_names)
        self.name = name or f"graph{next(_graph_ids)}"
        self.plans: list[PrefetchPlan] = []  # what this planner produced

    def weight_names(self, gm: GraphModule) -> dict[str, str]:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        if len(placeholders) != len(self.source_names):
            return {}
        return {p.name: s for p, s in zip(placeholders, self.source_names, strict=True) if s}

    def __call__(
        self, gm: GraphModule, lower: Callable[[GraphModule], Any] | None = None
    ) -> PrefetchPlan | None:
        """Plan and insert prefetches, then ``lower`` them; a failure of either removes them."""
        kind = graph_kind(gm)
        if kind == "backward":
            return None  # weights are prefetched for the forward computation only
        try:
            plan = run_weight_prefetch(
                gm,
                self.config,
                weight_names=self.weight_names(gm),
                graph_name=f"{self.name} ({kind})",
                recompile=self.recompile,
            )
            if lower is not None:
                lower(gm)
        except Exception as exc:
            if self.strict:
                raise PrefetchPassError(
                    f"weight-prefetch pass failed on {self.name}: {exc}"
                ) from exc
            removed = strip_prefetch(gm)
            logger.warning(
                "weight-prefetch pass failed on %s (%s: %s); compiling it without "
                "prefetch%s. Pass options={'strict': True} to raise instead.",
                self.name,
                type(exc).__name__,
                exc,
                f" (removed {removed} partial prefetches)" if removed else "",
            )
            plan = PrefetchPlan(
                graph=f"{self.name} ({kind})",
                config_digest=self.config.digest,
                enabled=self.config.enabled,
                error=f"{type(exc).__name__}: {exc}",
            )
        self._keep(plan)
        return plan

    def _keep(self, plan: PrefetchPlan) -> None:
        self.plans.append(plan)
        if self.record:
            _remember(plan)

    def adopt(self, plans: list[PrefetchPlan]) -> None:
        """Record plans made by an earlier compile of the same graph (a compile-cache hit)."""
        for plan in plans:
            plan.graph = f"{self.name} ({plan.graph.rsplit('(', 1)[-1]}"
            self._keep(plan)
