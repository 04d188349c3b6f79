"""Weights an opaque op looks up itself (vLLM's fused MoE), found by name for the pass.

``vllm::moe_forward(hidden_states, router_logits, ..., layer_name, ...)`` reads its experts'
weights from the layer registered under ``layer_name``: no graph input holds them. An
integration that knows where such layers live supplies a :class:`HiddenWeightSource`. The
pass asks it, for each such node, for the weight's shape, dtype and device (to size and plan
the prefetch), and inserts the source's by-name prefetch op, whose arguments before
``dependency`` (:attr:`HiddenWeight.key`) name the weight: the kernel finds the tensor when it
runs. So no weight is ever held by the graph, a compile cache or an artifact, the graph
pickles, and a cached graph reused for another layer (whose ``layer_name`` is a graph input)
prefetches that layer's weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.fx import Node


@dataclass(frozen=True)
class HiddenWeight:
    """What the pass needs about a weight found by name."""

    name: str  # parameter path, e.g. model.layers.0.mlp.experts.w13_weight
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    device: str
    key: tuple[Any, ...]  # the prefetch op's arguments before ``dependency`` (graph values)
    op: torch._ops.OpOverload  # the source's by-name prefetch op
    note: str


class HiddenWeightSource(Protocol):
    """Finds the weights an opaque op reads, and prefetches them by name.

    ``op``'s schema: ``(*key, Tensor? dependency, int max_size, int offset, SymInt tokens,
    int min_tokens, int max_tokens) -> ()``, registered with
    :func:`fxprefetch.ops.register_prefetch_op`.
    """

    op: torch._ops.OpOverload

    def find(self, node: Node, role: str) -> HiddenWeight | str:
        """The weight of ``role`` that ``node`` reads, or why it cannot be found."""
        ...
