"""``fxprefetch.explain``: the prefetch plan of every graph a model compiles to, without
running it on a device.

The model is traced by dynamo and AOT autograd exactly as the backend would trace it; the
pass runs on the aten graphs; nothing is lowered. A model on the meta device (see
:func:`fxprefetch.models.build_model`) costs no weight memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.options import parse_options
from fxprefetch.plan import PrefetchPlan
from fxprefetch.planner import GraphPlanner
from passes.graph_utils import placeholder_source_names


def explain(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    config: WeightPrefetchConfig | dict | str | None = None,
    **example_kwargs: Any,
) -> list[PrefetchPlan]:
    """Plans of every graph ``model(*example_inputs, **example_kwargs)`` compiles to.

    ``config`` takes the same forms as the backend's ``weight_prefetch_config`` option
    (``enabled`` defaults to true). Inputs may live on the meta device.
    """
    opts = parse_options({"weight_prefetch_config": config} if config is not None else None)
    plans: list[PrefetchPlan] = []

    def backend(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        planner = GraphPlanner(
            opts.config, strict=True, record=False, source_names=placeholder_source_names(gm)
        )

        def plan_only(aten_gm: torch.fx.GraphModule, _: Any) -> Callable[..., Any]:
            planner(aten_gm)
            return make_boxed_func(aten_gm.forward)

        aot_autograd(
            fw_compiler=plan_only,
            bw_compiler=plan_only,
            inference_compiler=plan_only,
            decompositions=select_decomp_table(),
        )(gm, inputs)
        plans.extend(planner.plans)
        return gm.forward  # the traced graph itself: cheap on meta tensors

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*example_inputs, **example_kwargs)
    finally:
        torch._dynamo.reset()
    return plans
