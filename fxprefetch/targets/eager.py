"""Eager lowering: AOT autograd with the pass, running the aten graphs without codegen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table

from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.pipeline import CompileReport, PassContext, Pipeline

if TYPE_CHECKING:
    from fxprefetch.planner import GraphPlanner


def _lowering_note(report: CompileReport, ctx: PassContext) -> str:
    return "fxprefetch.prefetch, run eagerly"


#: plan only: the prefetch nodes run as they are, through the op's eager kernels
PIPELINE = Pipeline("eager", (plan_prefetches,), recompiles=True, lowering_note=_lowering_note)


def compile_eager(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    planner: GraphPlanner,
    *,
    mode: str | None = None,
    compiler_config: Any = None,
) -> Callable[..., Any]:
    """The eager target: ``mode`` and ``compiler_config`` change nothing here."""

    def compiler(aten_gm: torch.fx.GraphModule, _inputs: Sequence[Any]) -> Callable[..., Any]:
        planner(aten_gm)  # the eager pipeline: plan only
        return make_boxed_func(aten_gm.forward)

    backend = aot_autograd(
        fw_compiler=compiler,
        bw_compiler=compiler,
        inference_compiler=compiler,
        decompositions=select_decomp_table(),
    )
    return backend(gm, example_inputs)
