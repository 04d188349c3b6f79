"""NPU lowering through torchair: the pass runs as torchair's ``post_grad_custom_post_pass``,
then ``fxprefetch.prefetch`` becomes ``npu.npu_prefetch`` (GE op ``Cmo``).

Written against torchair's documented hook (``fn(gm, example_inputs, config)``); verified
here only with stand-ins for torchair and torch_npu (see ``tests/npu_standins.py``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxprefetch.planner import GraphPlanner
from passes.lower_npu import lower_prefetch_to_npu

logger = logging.getLogger("fxprefetch")


class NpuUnavailableError(RuntimeError):
    """target 'npu' was asked for, but torchair/torch_npu cannot be imported."""


def import_torchair() -> Any:
    try:
        import torchair
    except ImportError as exc:
        try:
            from torch_npu.dynamo import torchair  # torch_npu ships torchair here
        except ImportError:
            raise NpuUnavailableError(
                "target 'npu' needs torchair, which ships with torch_npu (and needs Ascend's CANN "
                f"toolkit): {exc}"
            ) from exc
    return torchair


def npu_available() -> bool:
    """True when torch_npu is loaded and sees an Ascend device."""
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except Exception:  # a half-installed torch_npu raises here
        return False


def single_stream_enabled(compiler_config: Any) -> bool:
    """torchair's single-stream mode must not be combined with npu_prefetch."""
    for holder in (compiler_config, getattr(compiler_config, "experimental_config", None)):
        value = getattr(holder, "enable_single_stream", None)
        value = getattr(value, "value", value)  # torchair wraps options in OptionValue
        if value in (True, "True", "true", "1", 1):
            return True
    return False


def make_post_pass(
    planner: GraphPlanner, user_pass: Callable[..., Any] | None
) -> Callable[..., None]:
    """torchair's ``post_grad_custom_post_pass``: the user's pass, ours, then the lowering."""

    def post_grad_custom_post_pass(
        gm: torch.fx.GraphModule, example_inputs: Any, config: Any
    ) -> None:
        if user_pass is not None:
            user_pass(gm, example_inputs, config)
        planner(gm)
        lower_prefetch_to_npu(gm)

    post_grad_custom_post_pass.fxprefetch = True  # type: ignore[attr-defined]
    return post_grad_custom_post_pass


def configure_torchair(planner: GraphPlanner, compiler_config: Any = None) -> Any:
    """A copy of ``compiler_config`` (or a new one) with our pass composed into it."""
    torchair = import_torchair()
    cfg = copy.copy(compiler_config) if compiler_config is not None else torchair.CompilerConfig()
    if single_stream_enabled(cfg):
        message = (
            "torchair's enable_single_stream cannot be combined with npu_prefetch; "
            "compiling without prefetch"
        )
        if planner.strict:
            raise ValueError(message)
        logger.warning(message)
        return cfg
    cfg.post_grad_custom_post_pass = make_post_pass(
        planner, getattr(cfg, "post_grad_custom_post_pass", None)
    )
    return cfg


def compile_npu(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    planner: GraphPlanner,
    compiler_config: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    torchair = import_torchair()
    cfg = configure_torchair(planner, compiler_config)
    if mode is not None:  # torch.compile(mode=...): torchair's "max-autotune" (GE graph) or
        cfg.mode = mode  # "reduce-overhead" (aclgraph)
    return torchair.get_npu_backend(compiler_config=cfg)(gm, example_inputs)
