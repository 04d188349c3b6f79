"""The ``npu_prefetch`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject), so
``torch.compile(model, backend="npu_prefetch")`` works right after ``pip install``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxprefetch.call_sites import frame_call_sites
from fxprefetch.compile_setup import CompileSetup
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.counting import with_counting
from fxprefetch.dynamo_registry import entry_point_value
from fxprefetch.dynamo_registry import register as register_with_dynamo
from fxprefetch.options import BackendOptions, parse_options
from fxprefetch.passes.analysis.graph_utils import placeholder_source_names
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import make_compile_setup, target_spec

logger = logging.getLogger(__name__)

__all__ = ["setup_from_options", "torchair_backend"]  # and npu_prefetch, see the end


def setup_from_options(
    opts: BackendOptions,
    target: str | None = None,
    mode: str | None = None,
    cudagraphs: bool | None = None,
) -> CompileSetup:
    """The compile setup ``opts`` ask for (``target``: another target than theirs;
    ``cudagraphs``: whether the graph may be replayed as a CUDA graph, None: as ``mode``
    says)."""
    return make_compile_setup(
        opts.config,
        target=target or opts.target,
        rules=opts.rules,
        strict=opts.strict,
        mode=mode,
        cudagraphs=cudagraphs,
        native_prefetch=opts.native_prefetch,
        cuda_lowering=opts.cuda_lowering,
        cache_hint=opts.cache_hint,
        ascend_lowering=opts.ascend_lowering,
        device_profile=opts.device_profile,
    )


def _compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    setup: CompileSetup,
    mode: str | None,
    compiler_config: Any,
) -> Callable[..., Any]:
    """Lower ``gm`` with the setup's target, counting the prefetches that run."""
    names = placeholder_source_names(gm)
    # a graph compiled for a module's own frame (a graph break inside each layer) and reused
    # for every layer: named by parameter paths, each layer that runs it recorded
    sites = frame_call_sites(gm, example_inputs, names)
    planner = GraphPlanner(
        setup,
        source_names=sites.source_names if sites else names,
        module_prefix=sites.prefix if sites else "",
    )
    logger.debug(
        "npu_prefetch: compiling %s for target %s (config %s)",
        planner.name,
        setup.target,
        setup.config.digest,
    )
    compiled = target_spec(setup.target).compile(
        gm, example_inputs, planner, mode=mode, compiler_config=compiler_config
    )
    if sites is not None:
        sites.attach(planner.plans)
    if setup.cudagraphs:  # the mode asked for CUDA graphs: say what happened
        replay = "replayed as a CUDA graph" if planner.replayed else "not a CUDA graph"
        for plan in planner.plans:
            if plan.lowering:
                plan.lowering = f"{plan.lowering}; {replay}"
    # a CUDA-graph replay runs no op body: such graphs count their prefetches per call
    return with_counting(compiled, planner, replayed=planner.replayed, call_sites=sites)


def _may_replay(opts: BackendOptions, mode: str | None, example_inputs: Sequence[Any]) -> bool:
    """Whether the target may replay this graph as a CUDA graph: its mode says so and the
    graph has CUDA inputs (inductor never cudagraphifies a CPU graph). Whether it really
    does is known only once compiled (``GraphPlanner.replayed``)."""
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    return on_cuda and target_spec(opts.target).replays_cudagraphs(mode)


def npu_prefetch(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """``torch.compile`` backend: plan weight prefetches and lower to NPU, inductor or eager."""
    opts = parse_options(options)
    mode = mode or opts.mode  # torch.compile refuses mode= beside options=
    setup = setup_from_options(opts, mode=mode, cudagraphs=_may_replay(opts, mode, example_inputs))
    return _compile(gm, example_inputs, setup, mode, opts.torchair_config)


def torchair_backend(
    config: WeightPrefetchConfig | dict | str | None = None,
    compiler_config: Any = None,
    *,
    strict: bool = False,
) -> Callable[..., Any]:
    """A torchair backend with weight prefetch, for code that builds its own (vllm-ascend)."""
    opts = parse_options(
        {"weight_prefetch_config": config, "strict": strict}
        if config is not None
        else {"strict": strict}
    )

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        setup = setup_from_options(opts, target="npu")
        return _compile(gm, example_inputs, setup, None, compiler_config)

    return backend


# Served by __getattr__, so that dynamo's lazy entry-point loading is safe from many threads
# at once (fxprefetch/dynamo_registry.py); registered with dynamo on import.
_npu_prefetch = npu_prefetch
del npu_prefetch
register_with_dynamo(_npu_prefetch)


def __getattr__(name: str) -> Any:
    if name == "npu_prefetch":
        return entry_point_value(_npu_prefetch)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
