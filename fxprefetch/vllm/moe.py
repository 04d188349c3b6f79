"""The experts' gate/up weight of vLLM's fused MoE, prefetched by layer name.

``vllm::moe_forward(hidden_states, router_logits, ..., layer_name, ...)`` (and
``moe_forward_shared``) finds its layer in vLLM's static forward context by ``layer_name``;
the experts' weights are no graph input. :class:`VllmMoeWeights` is the pass's
:class:`analysis.hidden_weights.HiddenWeightSource` for it:

- when the pass runs, it reads the layer from the current ``VllmConfig``'s
  ``compilation_config.static_forward_context[layer_name]`` (or, where no config is current,
  from the forward context vLLM compiles in, which holds the same dict as
  ``no_compile_layers``) and finds its ``w13_weight`` (on
  the registered object, or a submodule: vLLM 0.32 registers a ``MoERunner`` whose
  ``routed_experts`` owns it; older vLLM and vllm-ascend the ``FusedMoE`` layer itself), for
  the weight's shape, dtype, bytes and device only;
- the graph gets ``fxprefetch.prefetch_layer_weight(layer_name, attr, dependency, max_size,
  offset, tokens, min_tokens, max_tokens)``, whose ``layer_name`` is the very graph value the
  fused op gets (vLLM's hoisted ``LayerName`` input on torch >= 2.11, else a string), and whose
  kernel finds the tensor when it runs, in the forward context, as ``moe_forward`` does.

So no weight is held by the graph: nothing is copied into a compile cache or artifact, the
graph pickles, and a graph served from vLLM's compile cache, or one compiled graph reused for
every layer, prefetches the weight of the layer it runs for. On CUDA the kernel launches the
prefetch on the compute stream (``fxprefetch.ops.prefetch_tensor``): no side stream, so no
join, and it is legal under CUDA-graph capture, where it runs once, finding the tensor; the
replay repeats the launch with the weight's fixed address. On the NPU, where the graph is
captured op by op (aclgraph, npugraph_ex run the FX graph's ops while they capture), the
Ascend lowering retargets it to ``prefetch_layer_weight_fork``: the same lookup, forked onto
the prefetch stream after its dependency and joined before the fused op; with
``ascend_lowering`` "in_stream" the kernel calls ``torch.ops.npu.npu_prefetch`` with the
tensor it found, in the captured stream.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch._library.infer_schema import infer_schema
from torch.fx import Node

from fxprefetch import ops
from fxprefetch.passes.analysis.graph_utils import get_arg
from fxprefetch.passes.analysis.hidden_weights import HiddenWeight
from fxprefetch.roles import MOE_GATE_UP

logger = logging.getLogger(__name__)

try:  # vLLM's layer-name type: a hoisted opaque LayerName on torch >= 2.11, else str
    from vllm.utils.torch_utils import LayerNameType
except ImportError:
    LayerNameType = str  # type: ignore[misc,assignment]

#: role -> the attribute of vLLM's (and vllm-ascend's) MoE layer holding that weight
ROLE_ATTRS = {MOE_GATE_UP: "w13_weight"}

_lib = torch.library.Library("fxprefetch", "FRAGMENT")


def layer_name_value(value: Any) -> str | None:
    """The string of a layer name: a str, vLLM's ``LayerName``, or its fake wrapper."""
    if isinstance(value, str):
        return value
    real = getattr(value, "real_obj", value)  # FakeScriptObject while tracing
    name = getattr(real, "value", None)
    return name if isinstance(name, str) else None


def find_weight_path(layer: torch.nn.Module, attr: str) -> str | None:
    """The dotted path from ``layer`` to its tensor ``attr`` (itself first, then submodules)."""
    if isinstance(getattr(layer, attr, None), torch.Tensor):
        return attr
    if isinstance(layer, torch.nn.Module):
        for path, module in layer.named_modules():
            if path and isinstance(getattr(module, attr, None), torch.Tensor):
                return f"{path}.{attr}"
    return None


def _follow(layer: Any, path: str) -> Any:
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def _runtime_layer(name: str) -> Any:
    """The layer registered under ``name``, as vLLM's fused MoE finds it when it runs."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if is_forward_context_available():
        return get_forward_context().no_compile_layers[name]
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        raise RuntimeError(f"prefetch of {name}: no vLLM forward context to find the layer in")
    return config.compilation_config.static_forward_context[name]


def runtime_weight(layer_name: Any, attr: str) -> torch.Tensor:
    name = layer_name_value(layer_name)
    if name is None:
        raise TypeError(f"prefetch_layer_weight: not a layer name: {layer_name!r}")
    return _follow(_runtime_layer(name), attr)


def _prefetch_layer_weight(
    layer_name: LayerNameType,
    attr: str,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    def prefetch() -> None:
        if ops.tokens_in_range(tokens, min_tokens, max_tokens):
            ops.prefetch_tensor(runtime_weight(layer_name, attr), dependency, max_size, offset)

    ops.skip_failed("prefetch_layer_weight", prefetch)


def _prefetch_layer_weight_fake(
    layer_name: LayerNameType,
    attr: str,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    torch._check(max_size > 0, lambda: f"prefetch: max_size must be > 0, got {max_size}")


def _prefetch_layer_weight_fork(
    layer_name: LayerNameType,
    attr: str,
    order: list[torch.Tensor],
    max_size: int,
    offset: int,
    stream: str,
    cache_hint: str,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    def fork() -> None:  # a weight not found: no fork, and its join then waits for none
        in_range = ops.tokens_in_range(tokens, min_tokens, max_tokens)
        weight = runtime_weight(layer_name, attr)
        ops.native_fork(weight, max_size, offset, stream, cache_hint, in_range)

    ops.skip_failed("prefetch_layer_weight_fork", fork)


def _prefetch_layer_weight_fork_fake(
    layer_name: LayerNameType,
    attr: str,
    order: list[torch.Tensor],
    max_size: int,
    offset: int,
    stream: str,
    cache_hint: str,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    torch._check(max_size > 0, lambda: f"prefetch: max_size must be > 0, got {max_size}")


LAYER_OP = ops.define_op(
    _lib,
    "prefetch_layer_weight" + infer_schema(_prefetch_layer_weight, mutates_args=()),
    _prefetch_layer_weight_fake,
    {"CompositeExplicitAutograd": _prefetch_layer_weight},
)
ops.register_prefetch_op(LAYER_OP)
# Ascend's side-stream lowering: the same lookup, forked onto the prefetch stream after its
# dependency (``order``: its token, then its dependency) and joined before the fused op
# (``passes/lower_npu.py``, ``passes/insert_joins.py``); out of range, it forks and issues
# nothing.
LAYER_FORK_OP = ops.define_op(
    _lib,
    "prefetch_layer_weight_fork"
    + infer_schema(_prefetch_layer_weight_fork, mutates_args=("order",)),
    _prefetch_layer_weight_fork_fake,
    {"CompositeExplicitAutograd": _prefetch_layer_weight_fork},
)
ops.register_fork_op(LAYER_FORK_OP, lowers=LAYER_OP)


class VllmMoeWeights:
    """Finds the weights of vLLM's fused MoE ops in a ``VllmConfig``'s static forward context
    (``config``: a ``VllmConfig``, or a callable returning the current one)."""

    op = LAYER_OP

    def __init__(self, config: Any) -> None:
        self._config = config

    def _layers(self) -> Any:
        config = self._config() if callable(self._config) else self._config
        if config is not None:
            return config.compilation_config.static_forward_context
        try:  # vLLM compiles inside its first forward: the forward context holds the same dict
            from vllm.forward_context import get_forward_context, is_forward_context_available
        except ImportError:
            return None
        return get_forward_context().no_compile_layers if is_forward_context_available() else None

    def find(self, node: Node, role: str) -> HiddenWeight | str:
        attr = ROLE_ATTRS.get(role)
        if attr is None:
            return f"no weight of role {role} is known for fused MoE layers"
        arg = get_arg(node, "layer_name")
        value = arg.meta.get("val", arg.meta.get("example_value")) if isinstance(arg, Node) else arg
        name = layer_name_value(value)
        if name is None:
            return f"layer_name {arg} has no value when the pass runs"
        layers = self._layers()
        if layers is None:
            return "no vLLM config when the pass ran: the layer cannot be looked up"
        layer = layers.get(name)
        if layer is None:
            return f"layer {name!r} is not in vLLM's static forward context"
        path = find_weight_path(layer, attr)
        if path is None:
            return f"layer {name!r} has no tensor {attr}"
        weight = _follow(layer, path)
        return HiddenWeight(
            name=f"{name}.{path}",
            shape=tuple(int(s) for s in weight.shape),
            dtype=weight.dtype,
            nbytes=weight.numel() * weight.element_size(),
            device=weight.device.type,
            key=(arg, path),
            op=LAYER_OP,
            note=f"found by layer name {name!r} when it runs",
        )


__all__ = ["LAYER_FORK_OP", "LAYER_OP", "ROLE_ATTRS", "VllmMoeWeights", "find_weight_path"]
