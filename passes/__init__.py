"""fxprefetch's graph passes (installed as ``fxprefetch.passes``), in three rooms:

- the passes themselves, one module each, each exporting one ``(gm, ctx) -> PassResult``
  that declares what it requires and conflicts with (:mod:`.contract`):
  :mod:`.plan_prefetches` (inserts the prefetches and returns the plan),
  :mod:`.lower_npu`, :mod:`.lower_native`, :mod:`.relax_dependencies`,
  :mod:`.elide_hints`, :mod:`.insert_joins`; beside them :mod:`.strip_prefetch`, which
  undoes them, and :mod:`.invariants`, what holds after every pass;
- :mod:`.analysis`: what the passes share and never change: which stored weight each linear
  reads (``linears``, ``weight_trace``, ``weight_sources``), its role (``roles``), the
  window a prefetch hides behind (``windows``, ``window_cost``, ``op_classes``), sizes,
  and the typed records the passes leave on their nodes (``prefetch_meta``);
- :mod:`.tables`: data only, and :class:`~.tables.rules.PrefetchRules`, the one value that
  holds every table the passes read.

The layers import downwards only: tables <- analysis <- passes; all of them may use
fxprefetch's core (config, ops, plan, prediction) and nothing above it.
"""

from fxprefetch.passes.lower_npu import lower_prefetch_to_npu
from fxprefetch.passes.strip_prefetch import strip_prefetch
from fxprefetch.passes.tables.linear_ops import DEFAULT_LINEAR_OPS, LinearOpSpec
from fxprefetch.passes.tables.role_rules import RoleRule
from fxprefetch.passes.tables.rules import (
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

__all__ = [
    "DEFAULT_LINEAR_OPS",
    "DEFAULT_RULES",
    "LinearOpSpec",
    "PrefetchRules",
    "RoleRule",
    "add_role_rule",
    "current_rules",
    "lower_prefetch_to_npu",
    "register_attention_op",
    "register_barrier_op",
    "register_linear_op",
    "register_transparent_op",
    "register_vector_op",
    "set_rules",
    "strip_prefetch",
]
