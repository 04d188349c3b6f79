"""Run the pipeline on one compiled graph, safely, and keep its plan.

The backend builds one :class:`GraphPlanner` per dynamo graph. It maps the aten graph's
placeholders back to parameter paths, runs the target's pipeline (:mod:`fxprefetch.pipeline`),
and — prefetch being an optimization — on failure removes whatever it inserted and logs a
warning (or raises in strict mode).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Mapping, Sequence

from torch.fx import GraphModule

from fxprefetch.config import TokenRange, WeightPrefetchConfig
from fxprefetch.pipeline import RECOMPILES, CompileReport, PassContext, PassResult, run_pipeline
from fxprefetch.plan import PrefetchPlan
from fxprefetch.plan_store import PLAN_DIR_ENV, write_plan_file
from passes.hidden_weights import HiddenWeightSource
from passes.rules import PrefetchRules, current_rules
from passes.strip_prefetch import strip_prefetch

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
    directory = os.environ.get(PLAN_DIR_ENV)
    if directory:
        try:
            write_plan_file(plan, directory)
        except OSError as exc:
            logger.warning("%s=%s: cannot write the plan: %s", PLAN_DIR_ENV, directory, exc)


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
    """Runs the target's pipeline on the aten graph(s) of one dynamo graph, safely.

    Holds everything the passes read (config, rules, which devices have a native prefetch,
    dynamo's sources), fixed when the backend is called: the same values make the compile
    cache key. Its reports flow forward to the plan registry and the stats wrapping.
    """

    def __init__(
        self,
        config: WeightPrefetchConfig,
        *,
        target: str = "eager",
        rules: PrefetchRules | None = None,
        native_devices: frozenset[str] = frozenset(),
        join_devices: frozenset[str] = frozenset(),
        device_caps: Mapping[str, int] | None = None,
        hidden_weights: HiddenWeightSource | None = None,
        strict: bool = False,
        source_names: Sequence[str | None] = (),
        name: str | None = None,
        record: bool = True,
    ) -> None:
        self.config = config
        self.target = target
        self.rules = rules if rules is not None else current_rules()
        self.native_devices = frozenset(native_devices)
        self.join_devices = frozenset(join_devices)
        self.device_caps = dict(sorted((device_caps or {}).items()))
        self.hidden_weights = hidden_weights
        self.record = record  # add plans to last_plans()
        self.strict = strict
        self.source_names = list(source_names)
        self.name = name or f"graph{next(_graph_ids)}"
        self.reports: list[CompileReport] = []  # what the pipeline did, per aten graph

    @property
    def plans(self) -> list[PrefetchPlan]:
        return [r.plan for r in self.reports]

    def weight_names(self, gm: GraphModule) -> dict[str, str] | None:
        """Placeholder name -> parameter path for the placeholders that are weights.

        None when the sources are unknown (the pass then treats every placeholder as a
        possible weight). Under inductor's freezing the parameters became constants and only
        the user inputs are left as placeholders: then no placeholder is a weight.
        """
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        if not self.source_names:
            return None
        if len(placeholders) == len(self.source_names):
            pairs = zip(placeholders, self.source_names, strict=True)
            return {p.name: s for p, s in pairs if s}
        if len(placeholders) == sum(s is None for s in self.source_names):
            return {}
        return None

    def graph_tokens(self) -> TokenRange | None:
        """The token counts the graph being compiled serves, where the compiler says
        (vLLM's compile range); None: only its shapes tell."""
        return None

    def context(self, gm: GraphModule, graph_name: str) -> PassContext:
        return PassContext(
            config=self.config,
            rules=self.rules,
            graph_name=graph_name,
            weight_names=self.weight_names(gm),
            native_devices=self.native_devices,
            join_devices=self.join_devices,
            device_caps=self.device_caps,
            hidden_weights=self.hidden_weights,
            graph_tokens=self.graph_tokens(),
        )

    def __call__(self, gm: GraphModule) -> CompileReport | None:
        """Run the pipeline on ``gm``; a failure removes every prefetch it inserted."""
        kind = graph_kind(gm)
        if kind == "backward":
            return None  # weights are prefetched for the forward computation only
        graph_name = f"{self.name} ({kind})"
        try:
            report = run_pipeline(gm, self.target, self.context(gm, graph_name))
        except Exception as exc:
            if self.strict:
                raise PrefetchPassError(
                    f"weight-prefetch pass failed on {self.name}: {exc}"
                ) from exc
            removed = strip_prefetch(gm, recompile=RECOMPILES.get(self.target, True))
            logger.warning(
                "weight-prefetch pass failed on %s (%s: %s); compiling it without "
                "prefetch%s. Pass options={'strict': True} to raise instead.",
                self.name,
                type(exc).__name__,
                exc,
                f" (removed {removed} partial prefetches)" if removed else "",
            )
            plan = PrefetchPlan(
                graph=graph_name,
                config_digest=self.config.digest,
                enabled=bool(self.config.enabled),
                error=f"{type(exc).__name__}: {exc}",
            )
            report = CompileReport(self.target, (PassResult("plan_prefetches", 0, plan),))
        self.keep(report)
        return report

    def keep(self, report: CompileReport) -> None:
        self.reports.append(report)
        if self.record:
            _remember(report.plan)
