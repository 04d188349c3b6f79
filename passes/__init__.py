"""Graph passes of fxprefetch, one job per module, and the rules they read.

- :mod:`passes.rules`: every table the pass decides by, as one frozen value;
- :mod:`passes.linears` / :mod:`passes.weight_trace`: which stored weight each linear reads;
- :mod:`passes.roles`: the role of each weight;
- :mod:`passes.windows`: the vector work (or attention) a prefetch hides behind, and its
  dependency; :mod:`passes.window_cost`: the bytes a window moves (the prediction's input);
- :mod:`passes.sizing`: bytes = ratio x weight, capped;
- :mod:`passes.weight_prefetch`: the planning pass, which inserts the prefetches;
- lowering steps, run per target by :mod:`fxprefetch.pipeline`: :func:`lower_prefetch_to_npu`,
  :func:`relax_prefetch_dependencies`, :func:`elide_hint_prefetches`;
- :func:`strip_prefetch` undoes the planning pass.

``passes`` depends only on fxprefetch's core: the config, the op's schema and the plan.
"""

from passes.elide_hints import elide_hint_prefetches
from passes.linear_ops import LINEAR_OPS, LinearOpSpec
from passes.linears import find_linears
from passes.lower_npu import lower_prefetch_to_npu
from passes.relax_dependencies import relax_prefetch_dependencies
from passes.roles import RoleRule
from passes.rules import (
    DEFAULT_RULES,
    PrefetchRules,
    add_role_rule,
    current_rules,
    register_attention_op,
    register_barrier_op,
    register_linear_op,
    register_transparent_op,
    register_vector_op,
    set_rules,
)
from passes.strip_prefetch import strip_prefetch
from passes.vector_ops import NodeKind, classify
from passes.weight_prefetch import META_KEY, run_weight_prefetch

__all__ = [
    "DEFAULT_RULES",
    "LINEAR_OPS",
    "META_KEY",
    "LinearOpSpec",
    "NodeKind",
    "PrefetchRules",
    "RoleRule",
    "add_role_rule",
    "classify",
    "current_rules",
    "elide_hint_prefetches",
    "find_linears",
    "lower_prefetch_to_npu",
    "register_attention_op",
    "register_barrier_op",
    "register_linear_op",
    "register_transparent_op",
    "register_vector_op",
    "relax_prefetch_dependencies",
    "run_weight_prefetch",
    "set_rules",
    "strip_prefetch",
]
