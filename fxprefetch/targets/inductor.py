"""Inductor adapter: the inductor pipeline runs as inductor's ``post_grad_custom_post_pass``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fxprefetch.passes.elide_hints import elide_hints
from fxprefetch.passes.insert_joins import insert_joins
from fxprefetch.passes.lower_native import lower_native
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.relax_dependencies import relax_dependencies
from fxprefetch.pipeline import CompileReport, PassContext, Pipeline
from fxprefetch.plan.store import load_plans, plan_key, save_plans

if TYPE_CHECKING:
    from fxprefetch.planner import GraphPlanner

try:  # torch >= 2.9
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass
except ImportError:  # pragma: no cover - older torch
    CustomInferenceAwareGraphPass = ()  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)


def _device_note(report: CompileReport, ctx: PassContext) -> str | None:
    """Per device, what its prefetches became: native prefetches (on a side stream, or on
    the compute stream where CUDA-graph partitions could split a fork from its join), hints
    left out of the code, or ``fxprefetch.prefetch`` kernels."""
    setup = ctx.devices
    notes = dict(setup.lowering)
    if report.changed(lower_native):
        devices = sorted(setup.l2 & setup.native)
        if report.changed(insert_joins) == 0 and setup.joins & set(devices):
            notes = {
                d: f"{notes.get(d, '')}; on the compute stream instead: inductor partitions "
                "this graph for CUDA graphs at nodes between which a fork and its join could "
                "fall"
                for d in devices
            }
    elif report.hints_elided:
        return "hints, left out of the compiled code" + "".join(
            f"; {device}: {note}" for device, note in sorted(notes.items())
        )
    else:
        devices = sorted(setup.native)
    return "; ".join(f"{d}: {notes.get(d, 'fxprefetch.prefetch')}" for d in devices) or None


def _lowering_note(report: CompileReport, ctx: PassContext) -> str:
    """What the prefetches became: per device (:func:`_device_note`), and those whose token
    count is checked at run time (``prefetch_in_range``, never lowered: its kernel calls the
    device's prefetch on the compute stream, a hint where the device has none)."""
    records = report.plan.prefetched
    if report.hints_kept:  # hint-only devices: no prefetch kernel runs
        return (
            "hints, kept in the compiled code as fxprefetch.prefetch_hint (each counted when "
            "it runs; a run-time token check counts it only in range)"
        )
    checked = sum(r.token_check == "run time" for r in records)
    base = _device_note(report, ctx)
    parts = [base] if base else []
    if checked:
        parts.append(
            f"{checked} of {len(records)} as fxprefetch.prefetch_in_range: the token count "
            "checked at run time, then the device's prefetch on the compute stream (a hint "
            "where it has none)"
        )
    if not base and len(records) > checked:
        parts.append("fxprefetch.prefetch kept in the code (a hint where the device has none)")
    return "; ".join(parts)


#: inductor regenerates the code itself after its post-grad passes
PIPELINE = Pipeline(
    "inductor",
    (plan_prefetches, lower_native, relax_dependencies, elide_hints, insert_joins),
    recompiles=False,
    lowering_note=_lowering_note,
)


def _as_list(user_pass: Any) -> list[Callable[..., None]]:
    if user_pass is None:
        return []
    if isinstance(user_pass, (list, tuple)):
        return list(user_pass)
    return [user_pass]


class PrefetchGraphPass(CustomGraphPass):
    """Runs the user's own post-grad pass(es) first, then the inductor pipeline.

    ``uuid()`` is the compile setup's key (``CompileSetup.cache_key``: every field, and the
    source of the passes that run) with dynamo's weight names and the user's passes' uuids,
    so inductor's FX graph cache never serves a graph compiled otherwise.
    """

    def __init__(self, planner: GraphPlanner, user_pass: Any = None) -> None:
        self.planner = planner
        self.user_passes = _as_list(user_pass)
        # the aten graph inductor is compiling; None: every graph the pass sees is one
        self.top: torch.fx.GraphModule | None = None

    def __call__(self, graph: torch.fx.Graph, is_inference: bool | None = None) -> None:
        gm = graph.owning_module
        for user_pass in self.user_passes:
            if isinstance(user_pass, CustomInferenceAwareGraphPass):
                user_pass(graph, is_inference=bool(is_inference))
            else:
                user_pass(graph)
        # Inductor runs its post-grad passes on each higher-order-op body first, then on the
        # graph that calls it. A body alone cannot tell which of its inputs are weights: the
        # planner plans the bodies with their caller, when the top graph's turn comes.
        if self.top is None or gm is self.top:
            self.planner(gm)

    def uuid(self) -> str | None:
        parts = [json.dumps(self.planner.source_names)]
        for user_pass in self.user_passes:
            uuid = getattr(user_pass, "uuid", None)
            if uuid is None:
                return None  # an opaque user pass: inductor then bypasses its cache
            value = uuid()
            if value is None:
                return None
            parts.append(value.hex() if isinstance(value, bytes) else str(value))
        return self.planner.setup.cache_key(*parts)


_NO_GRAPH_CACHE = {"fx_graph_cache": False, "fx_graph_remote_cache": False}


def uses_cudagraphs(mode: str | None) -> bool:
    """Whether inductor may replay the compiled graph as a CUDA graph under ``mode``."""
    from torch._inductor import config as inductor_config

    options = torch._inductor.list_mode_options(mode) if mode else {}
    return bool(options.get("triton.cudagraphs", inductor_config.triton.cudagraphs))


def compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    planner: GraphPlanner,
    mode: str | None = None,
    compiler_config: Any = None,
) -> Callable[..., Any]:
    """``compile_fx`` with the inductor pipeline as its ``post_grad_custom_post_pass``.

    Plans are stored beside inductor's FX graph cache under the pass's key, and restored on a
    cache hit (the pass does not run then). When a hit finds them missing (deleted,
    truncated, or never there with a remote cache), the graph is compiled again with the FX
    graph cache bypassed, so the pass runs and the plans exist again: never silently empty.
    ``compiler_config`` changes nothing here (inductor reads its own config).
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    from torch._inductor.compile_fx import compile_fx_inner

    graph_pass = PrefetchGraphPass(planner, inductor_config.post_grad_custom_post_pass)
    patches["post_grad_custom_post_pass"] = graph_pass
    uuid = graph_pass.uuid()
    key = plan_key(gm, example_inputs, uuid) if uuid is not None else None

    def inner_compile(aten_gm: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        graph_pass.top = aten_gm  # the graph whose post-grad passes plan its bodies too
        try:
            out = compile_fx_inner(aten_gm, *args, **kwargs)
        finally:
            graph_pass.top = None
        if not kwargs.get("is_backward", False):
            # inductor turns this flag off where it did not cudagraphify the graph (a CPU
            # graph, mutated inputs...): whether its calls replay, decided by what happened
            planner.replayed = bool(kwargs.get("cudagraphs"))
        return out

    compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
    if not planner.reports:  # served from inductor's cache: the pass did not run this time
        stored = load_plans(key) if key is not None else None
        if stored is not None:
            for report in stored:
                planner.keep(_renamed(report, planner.name))
            return compiled
        logger.info(
            "%s: inductor's cache served a graph whose prefetch plans are missing; "
            "compiling it again without the FX graph cache",
            planner.name,
        )
        compiled = compile_fx(
            gm,
            example_inputs,
            inner_compile=inner_compile,
            config_patches={**patches, **_NO_GRAPH_CACHE},
        )
    if key is not None and planner.reports:
        save_plans(key, planner.reports)
    return compiled


def _renamed(report: CompileReport, name: str) -> CompileReport:
    """A stored report under this compile's graph name."""
    plan = report.plan
    plan.graph = f"{name} ({plan.graph.rsplit('(', 1)[-1]}"
    return report
