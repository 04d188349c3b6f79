"""NPU lowering through torchair: the pass runs as torchair's ``post_grad_custom_post_pass``,
then ``fxprefetch.prefetch`` becomes ``npu.npu_prefetch`` (GE op ``Cmo``) in a GE graph, or a
fork onto the prefetch stream joined before its linear in a graph captured op by op
(``passes/lower_npu.py``; ``docs/ascend.md`` goes through the modes).

Written against torchair's hook (``fn(gm, example_inputs, config)``) and tested against
torchair's real Python code from the torch-npu 2.13.0 wheel (``tests/support/torchair_real.py``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fxprefetch.errors import NpuUnavailableError
from fxprefetch.passes.insert_joins import insert_joins
from fxprefetch.passes.lower_npu import ascend_lowering, lower_npu
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.pipeline import CompileReport, PassContext, Pipeline

if TYPE_CHECKING:
    from fxprefetch.planner import GraphPlanner

logger = logging.getLogger(__name__)

SINGLE_STREAM_OPTION = "ge_config.enable_single_stream"


_NOTES = {
    "ascend_cmo": "npu_prefetch -> GE Cmo (control edge from its dependency; GE's own stream)",
    "ascend_side_stream": "side stream: npu_prefetch forked onto the prefetch stream after its "
    "dependency, joined before its linear",
    "ascend_in_stream": "in stream: npu_prefetch in the captured compute stream "
    "(ascend_lowering 'in_stream')",
}


def _lowering_note(report: CompileReport, ctx: PassContext) -> str:
    return f"{ascend_lowering(ctx)}: {_NOTES[ascend_lowering(ctx)]}"


#: plan, lower (GE Cmo, or the prefetch stream), join each fork before its linear; the
#: driver regenerates the code torchair runs
PIPELINE = Pipeline(
    "npu",
    (plan_prefetches, lower_npu, insert_joins),
    recompiles=True,
    lowering_note=_lowering_note,
)


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


def option_value(holder: Any, path: str) -> Any:
    """The value of a torchair option, e.g. ``"ge_config.enable_single_stream"``.

    torchair's ``CompilerConfig`` wraps every option in an ``OptionValue`` (``CallableValue``
    for passes), so the attribute itself is never the value: read its ``.value``.
    """
    for name in path.split("."):
        holder = getattr(holder, name, None)
    return getattr(holder, "value", holder)


def single_stream_enabled(compiler_config: Any) -> bool:
    """torchair's single-stream mode (``ge_config.enable_single_stream``) excludes npu_prefetch."""
    return option_value(compiler_config, SINGLE_STREAM_OPTION) in (True, "True", "true", "1", 1)


def _leaf_objects(config: Any) -> dict[int, Any]:
    """Every option value of ``config`` that is not plain data (passes, pools, user objects)."""
    found: dict[int, Any] = {}
    stack = [config]
    while stack:
        node = stack.pop()
        try:
            children = vars(node).values()
        except TypeError:
            children = ()
        for child in children:
            if isinstance(child, (str, int, float, bool, type(None), list, tuple, dict)):
                continue
            if callable(child) or not hasattr(child, "__dict__"):
                found[id(child)] = child
            else:
                stack.append(child)
    return found


def private_copy(compiler_config: Any) -> Any:
    """A copy of a torchair ``CompilerConfig`` that shares no option object with the original.

    ``copy.copy`` would share the ``OptionValue`` objects, so setting an option on the copy
    would change the user's config. Callables and other non-data values (the user's passes,
    memory pools) are kept as the same objects, never copied.
    """
    return copy.deepcopy(compiler_config, memo=_leaf_objects(compiler_config))


def make_post_pass(
    planner: GraphPlanner, user_pass: Callable[..., Any] | None
) -> Callable[..., None]:
    """torchair's ``post_grad_custom_post_pass``: the user's pass, then our npu pipeline."""

    def post_grad_custom_post_pass(
        gm: torch.fx.GraphModule, example_inputs: Any, config: Any
    ) -> None:
        if user_pass is not None:
            user_pass(gm, example_inputs, config)
        planner(gm)  # the npu pipeline: plan, then lower to npu_prefetch

    post_grad_custom_post_pass.fxprefetch = True  # type: ignore[attr-defined]
    return post_grad_custom_post_pass


def configure_torchair(
    planner: GraphPlanner, compiler_config: Any = None, mode: str | None = None
) -> Any:
    """A private copy of ``compiler_config`` (or a new one) with our pass composed into it.

    The user's config is never changed. ``mode`` (from ``torch.compile(mode=...)``) selects
    torchair's ``"max-autotune"`` (GE graph) or ``"reduce-overhead"`` (aclgraph).
    """
    torchair = import_torchair()
    cfg = (
        private_copy(compiler_config) if compiler_config is not None else torchair.CompilerConfig()
    )
    if mode is not None:
        cfg.mode = mode
    # GE converts only npu_prefetch; aclgraph and npugraph_ex run the graph's ops when captured
    planner.npu_graph_engine = option_value(cfg, "mode") == "max-autotune"
    if single_stream_enabled(cfg):
        message = (
            f"torchair's {SINGLE_STREAM_OPTION} cannot be combined with npu_prefetch; "
            "compiling without prefetch"
        )
        if planner.strict:
            raise ValueError(message)
        logger.warning(message)
        return cfg
    cfg.post_grad_custom_post_pass = make_post_pass(
        planner, option_value(cfg, "post_grad_custom_post_pass")
    )
    return cfg


def compile_npu(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    planner: GraphPlanner,
    compiler_config: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The npu target: torchair's backend with ``compiler_config`` (torchair's
    ``CompilerConfig``, never changed) and our pass composed into a private copy."""
    torchair = import_torchair()
    cfg = configure_torchair(planner, compiler_config, mode)
    return torchair.get_npu_backend(compiler_config=cfg)(gm, example_inputs)
