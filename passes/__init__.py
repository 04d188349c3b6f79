"""Graph passes of fxprefetch, one per module, and the tables they read.

Pass order (what the backend runs on each post-autograd aten graph):

1. :func:`run_weight_prefetch` inserts ``fxprefetch.prefetch`` nodes and returns a plan;
2. lowering, per target:
   - npu: :func:`lower_prefetch_to_npu` rewrites them into ``npu.npu_prefetch``;
   - inductor: :func:`relax_prefetch_dependencies` drops the dependency operand, then
     :func:`elide_hint_prefetches` removes prefetches that are only hints on their device
     (the backend counts those once per graph call);
   - eager: nothing.

:func:`strip_prefetch` undoes step 1.
"""

from passes.elide_hints import elide_hint_prefetches
from passes.linear_ops import LINEAR_OPS, LinearOpSpec, register_linear_op
from passes.lower_npu import lower_prefetch_to_npu
from passes.relax_dependencies import relax_prefetch_dependencies
from passes.roles import RoleRule, add_role_rule
from passes.strip_prefetch import strip_prefetch
from passes.vector_ops import (
    NodeKind,
    classify,
    register_barrier_op,
    register_transparent_op,
    register_vector_op,
)
from passes.weight_prefetch import META_KEY, find_linears, run_weight_prefetch

__all__ = [
    "LINEAR_OPS",
    "META_KEY",
    "LinearOpSpec",
    "NodeKind",
    "RoleRule",
    "add_role_rule",
    "classify",
    "elide_hint_prefetches",
    "find_linears",
    "lower_prefetch_to_npu",
    "register_barrier_op",
    "register_linear_op",
    "register_transparent_op",
    "register_vector_op",
    "relax_prefetch_dependencies",
    "run_weight_prefetch",
    "strip_prefetch",
]
