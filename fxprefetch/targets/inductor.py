"""Inductor lowering: the pass runs as inductor's ``post_grad_custom_post_pass``."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from fxprefetch.ops import native_prefetch_devices
from fxprefetch.plan_store import load_plans, plan_key, save_plans
from fxprefetch.planner import GraphPlanner
from fxprefetch.runtime_stats import CountedPrefetch, record_graph_call
from passes.elide_hints import elide_hint_prefetches
from passes.relax_dependencies import relax_prefetch_dependencies

try:  # torch >= 2.9
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass
except ImportError:  # pragma: no cover - older torch
    CustomInferenceAwareGraphPass = ()  # type: ignore[assignment,misc]

_HERE = Path(__file__).resolve()
_SOURCE_ROOTS = (_HERE.parents[1], _HERE.parents[2] / "passes")


@functools.cache
def source_digest() -> str:
    """Hash of the pass's own source, so a new fxprefetch version never reuses cached graphs."""
    h = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _as_list(user_pass: Any) -> list[Callable[..., None]]:
    if user_pass is None:
        return []
    if isinstance(user_pass, (list, tuple)):
        return list(user_pass)
    return [user_pass]


class PrefetchGraphPass(CustomGraphPass):
    """Runs the user's own post-grad pass(es) first, then the weight-prefetch pass.

    ``uuid()`` covers the config digest, the pass source, the weight names and the user's
    pass, so inductor's FX graph cache never serves a graph compiled for another config.
    """

    def __init__(self, planner: GraphPlanner, user_pass: Any = None) -> None:
        self.planner = planner
        self.user_passes = _as_list(user_pass)
        self.elided = False  # prefetches were hint-only and left out of the compiled code

    def __call__(self, graph: torch.fx.Graph, is_inference: bool | None = None) -> None:
        gm = graph.owning_module
        for user_pass in self.user_passes:
            if isinstance(user_pass, CustomInferenceAwareGraphPass):
                user_pass(graph, is_inference=bool(is_inference))
            else:
                user_pass(graph)
        self.planner(gm)
        # lowering for inductor (it recompiles after its post-grad passes)
        relax_prefetch_dependencies(gm, recompile=False)
        if elide_hint_prefetches(gm, recompile=False):
            self.elided = True

    def uuid(self) -> str | None:
        parts = [
            self.planner.config.digest,
            source_digest(),
            json.dumps(self.planner.source_names),
            str(self.planner.strict),
            ",".join(sorted(native_prefetch_devices())),  # decides which prefetches are elided
        ]
        for user_pass in self.user_passes:
            uuid = getattr(user_pass, "uuid", None)
            if uuid is None:
                return None  # an opaque user pass: inductor then bypasses its cache
            value = uuid()
            if value is None:
                return None
            parts.append(value.hex() if isinstance(value, bytes) else str(value))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    planner: GraphPlanner,
    mode: str | None = None,
) -> Callable[..., Any]:
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    planner.recompile = False  # inductor's post_grad_passes recompile after custom passes
    graph_pass = PrefetchGraphPass(planner, inductor_config.post_grad_custom_post_pass)
    patches["post_grad_custom_post_pass"] = graph_pass
    uuid = graph_pass.uuid()
    key = plan_key(gm, example_inputs, uuid) if uuid is not None else None
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    elided = graph_pass.elided
    if key is not None:
        if planner.plans:
            save_plans(key, planner.plans, elided)
        else:  # served from inductor's cache: the pass did not run this time
            plans, elided = load_plans(key)
            planner.adopt(plans)
    return count_on_call(compiled, planner) if elided else compiled


def count_on_call(compiled: Callable[..., Any], planner: GraphPlanner) -> Callable[..., Any]:
    """Wrap a compiled graph whose hint-only prefetches were elided: each call counts them."""
    counted = tuple(
        CountedPrefetch(r.weight, r.weight_shape, r.dtype, r.prefetch_bytes, r.prefetch_bytes)
        for plan in planner.plans
        if not plan.graph.endswith("(backward)")
        for r in plan.prefetched
    )
    requested = sum(p.requested for p in counted)
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args: Any) -> Any:
        record_graph_call(counted, requested, requested)
        return compiled(*args)

    if boxed:
        run._boxed_call = True  # type: ignore[attr-defined]
    return run
