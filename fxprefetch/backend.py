"""The ``npu_prefetch`` torch.compile backend.

Registered through the ``torch_dynamo_backends`` entry point (see pyproject), so
``torch.compile(model, backend="npu_prefetch")`` works right after ``pip install``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxprefetch.compile_setup import CompileSetup
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.counting import with_counting
from fxprefetch.dynamo_registry import entry_point_value
from fxprefetch.dynamo_registry import register as register_with_dynamo
from fxprefetch.options import BackendOptions, parse_options
from fxprefetch.passes.analysis.graph_utils import placeholder_source_names
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import compile_setup, target_spec

logger = logging.getLogger("fxprefetch")

__all__ = ["setup_from_options", "torchair_backend"]  # and npu_prefetch, see the end


def setup_from_options(
    opts: BackendOptions, target: str | None = None, mode: str | None = None
) -> CompileSetup:
    """The compile setup ``opts`` ask for (``target``: another target than theirs)."""
    return compile_setup(
        opts.config,
        target=target or opts.target,
        rules=opts.rules,
        strict=opts.strict,
        mode=mode,
        native_prefetch=opts.native_prefetch,
        cuda_lowering=opts.cuda_lowering,
        cache_hint=opts.cache_hint,
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
    planner = GraphPlanner(setup, source_names=placeholder_source_names(gm))
    logger.debug(
        "npu_prefetch: compiling %s for target %s (config %s)",
        planner.name,
        setup.target,
        setup.config.digest,
    )
    compiled = target_spec(setup.target).compile(
        gm, example_inputs, planner, mode=mode, compiler_config=compiler_config
    )
    # a CUDA-graph replay runs no op body: such graphs count their prefetches per call
    return with_counting(compiled, planner, replayed=setup.cudagraphs)


def npu_prefetch(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """``torch.compile`` backend: plan weight prefetches and lower to NPU, inductor or eager."""
    opts = parse_options(options)
    mode = mode or opts.mode  # torch.compile refuses mode= beside options=
    setup = setup_from_options(opts, mode=mode)
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
