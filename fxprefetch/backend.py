"""The ``npu_prefetch`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject), so
``torch.compile(model, backend="npu_prefetch")`` works right after ``pip install``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.counting import with_counting
from fxprefetch.devices import device_setup
from fxprefetch.dynamo_registry import entry_point_value
from fxprefetch.dynamo_registry import register as register_with_dynamo
from fxprefetch.options import BackendOptions, parse_options
from fxprefetch.passes.analysis.graph_utils import placeholder_source_names
from fxprefetch.passes.tables.rules import current_rules
from fxprefetch.planner import GraphPlanner

logger = logging.getLogger("fxprefetch")


def resolve_target(target: str) -> str:
    """``auto`` means ``npu`` where torch_npu sees a device, else ``inductor``."""
    if target != "auto":
        return target
    from fxprefetch.targets.npu import npu_available

    return "npu" if npu_available() else "inductor"


def _planner_for(
    gm: torch.fx.GraphModule, opts: BackendOptions, target: str, cudagraphs: bool = False
) -> GraphPlanner:
    """Everything the passes read, fixed now: it also makes the compile-cache key.
    ``cudagraphs``: the compiled graph is replayed as a CUDA graph."""
    devices = device_setup(
        target,
        cudagraphs=cudagraphs,
        native_prefetch=opts.native_prefetch,
        cuda_lowering=opts.cuda_lowering,
        cache_hint=opts.cache_hint,
    )
    return GraphPlanner(
        opts.config,
        target=target,
        rules=opts.rules if opts.rules is not None else current_rules(),
        native_devices=devices.native,
        join_devices=devices.joins,
        device_caps=devices.caps,
        native_l2=devices.l2,
        cache_hint=devices.cache_hint,
        lowering=devices.lowering,
        device_profiles=devices.profiles,
        strict=opts.strict,
        source_names=placeholder_source_names(gm),
    )


def npu_prefetch(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """``torch.compile`` backend: plan weight prefetches and lower to NPU, inductor or eager."""
    opts = parse_options(options)
    target = resolve_target(opts.target)
    mode = mode or opts.mode  # torch.compile refuses mode= beside options=
    cudagraphs = False
    if target == "inductor":
        from fxprefetch.targets.inductor import uses_cudagraphs

        cudagraphs = uses_cudagraphs(mode)
    planner = _planner_for(gm, opts, target, cudagraphs)
    logger.debug(
        "npu_prefetch: compiling %s for target %s (config %s)",
        planner.name,
        target,
        opts.config.digest,
    )
    if target == "npu":
        from fxprefetch.targets.npu import compile_npu

        compiled = compile_npu(gm, example_inputs, planner, opts.torchair_config, mode)
    elif target == "eager":
        from fxprefetch.targets.eager import compile_eager

        compiled = compile_eager(gm, example_inputs, planner)
    else:
        from fxprefetch.targets.inductor import compile_inductor

        compiled = compile_inductor(gm, example_inputs, planner, mode)
        # a CUDA-graph replay runs no op body: such graphs count their prefetches per call
        return with_counting(compiled, planner, replayed=cudagraphs)
    return with_counting(compiled, planner)


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
        from fxprefetch.targets.npu import compile_npu

        planner = _planner_for(gm, opts, "npu")
        return with_counting(compile_npu(gm, example_inputs, planner, compiler_config), planner)

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
