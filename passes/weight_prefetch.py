"""The weight-prefetch pass over post-autograd aten graphs.

For each linear layer (see :mod:`passes.linear_ops`) whose weight plays a configured role
(:mod:`passes.roles`), walk back from its activation inputs in reverse graph order: vector
ancestors (:mod:`passes.vector_ops`) form the *window*, the first non-vector ancestor is the
*dependency*. A ``fxprefetch.prefetch(weight, dependency, max_size[, offset])`` node goes
right after the dependency, so the prefetch runs while the window's vector work runs.

Invariants (tested in ``tests/test_pass_properties.py``): the graph lints; outputs are
unchanged; at most one prefetch per linear; a second run adds nothing; every prefetch comes
after its dependency and before its linear; prefetches survive dead-code elimination; new
nodes carry ``meta['val']``. The walk stops at the dependency, so the pass is linear in the
size of the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch.fx import Graph, GraphModule, Node

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason
from passes.collectives import has_sequence_parallel_collectives
from passes.graph_utils import finalize, op_name, tensor_value
from passes.linears import LinearUse, find_linears
from passes.roles import assign_roles, layer_index
from passes.rules import PrefetchRules, current_rules
from passes.sizing import prefetch_bytes
from passes.weight_sources import WeightSources
from passes.windows import Window, find_window

logger = logging.getLogger("fxprefetch")

META_KEY = "fxprefetch"


def _existing_prefetches(graph: Graph) -> set[str]:
    done: set[str] = set()
    for node in graph.find_nodes(op="call_function", target=PREFETCH_OP):
        meta = node.meta.get(META_KEY) or {}
        if "linear" in meta:
            done.add(meta["linear"])
    return done


def run_weight_prefetch(
    gm: GraphModule,
    config: WeightPrefetchConfig,
    *,
    weight_names: WeightSources | Mapping[str, str] | None = None,
    rules: PrefetchRules | None = None,
    graph_name: str = "graph",
    device_caps: Mapping[str, int] | None = None,
    recompile: bool = True,
) -> PrefetchPlan:
    """Insert prefetches into ``gm`` in place and return the plan of what was done.

    ``weight_names`` maps the placeholders that are parameters or buffers to their paths (the
    backend fills it from dynamo's sources), as a mapping or a :class:`WeightSources` that
    also says which placeholders nobody can tell about; None means nothing is known, and no
    placeholder is taken for a weight (their linears are skipped, saying so). ``rules``
    defaults to :func:`passes.rules.current_rules`. ``recompile=False`` leaves regenerating
    ``gm.code`` to the caller (inductor does it after its passes).
    ``device_caps``: device type -> byte cap, for weights on that device when the config
    writes no ``max_prefetch_bytes``.
    """
    rules = rules if rules is not None else current_rules()
    graph = gm.graph
    index = {node: i for i, node in enumerate(graph.nodes)}
    sequence_parallel = config.sequence_parallel or has_sequence_parallel_collectives(index, rules)
    plan = PrefetchPlan(
        graph=graph_name,
        config_digest=config.digest,
        enabled=bool(config.enabled),
        sequence_parallel=sequence_parallel,
    )
    uses = find_linears(graph, weight_names, rules)
    assign_roles(uses, rules)
    already = _existing_prefetches(graph)
    collective_windows = "collective" in config.windows
    windows: dict[tuple[Node, ...], Window | None] = {}
    inserts: list[tuple[LinearUse, Window, int, int, dict]] = []
    records: list[LinearRecord | None] = []

    for use in uses:
        base = {
            "node": use.node.name,
            "op": op_name(use.node),
            "module": use.module,
            "weight": use.weight_name,
            "layer": layer_index(use.module or use.weight_name),
            "role": use.role,
            "weight_shape": tuple(int(s) if isinstance(s, int) else -1 for s in use.shape),
            "dtype": str(use.dtype) if use.dtype is not None else "-",
            "weight_bytes": use.nbytes if isinstance(use.nbytes, int) else -1,
            "offset": use.offset,
            "position": index[use.node],
            "note": use.note,
        }
        skip = _precheck(use, config, rules, sequence_parallel, already)
        window = None
        if skip in (None, SkipReason.ZERO_RATIO, SkipReason.NEEDS_SEQUENCE_PARALLEL):
            if use.starts not in windows:
                windows[use.starts] = find_window(use.starts, index, rules, collective_windows)
            window = windows[use.starts]
            if window is not None:
                base.update(
                    window=window.op_names(),
                    window_kind=window.kind,
                    dependency=window.dependency.name,
                    dependency_op=op_name(window.dependency),
                    dependency_position=index.get(window.dependency),
                    window_start=min((index[n] for n in window.vector_ops), default=None),
                    crossed=tuple(op_name(n) for n in window.crossed),
                )
            if skip is None and (
                window is None or (not window.vector_ops and window.collective is None)
            ):
                skip = SkipReason.EMPTY_WINDOW
        if skip is not None:
            records.append(LinearRecord(**base, ratio=_ratio(use, config), skip_reason=skip))
            continue
        ratio = config.ratio(use.role)
        cap = config.cap((device_caps or {}).get(_device_type(use.root)))
        size, capped = prefetch_bytes(ratio, use.nbytes, cap)
        if size <= 0:
            records.append(LinearRecord(**base, ratio=ratio, skip_reason=SkipReason.ZERO_BYTES))
            continue
        base.update(ratio=ratio, prefetch_bytes=size, capped=capped)
        records.append(None)  # filled once the node exists
        inserts.append((use, window, size, len(records) - 1, base))

    last_at_anchor: dict[Node, Node] = {}
    for use, window, size, slot, base in inserts:
        node = _insert_prefetch(graph, use, window, size, index, last_at_anchor)
        records[slot] = LinearRecord(**base, prefetch_node=node.name)
    plan.records = [r for r in records if r is not None]
    if inserts:
        finalize(gm, recompile)
    logger.info("%s", plan.summary_line())
    return plan


def _ratio(use: LinearUse, config: WeightPrefetchConfig) -> float | None:
    return config.ratio(use.role) if use.role is not None else None


def _precheck(
    use: LinearUse,
    config: WeightPrefetchConfig,
    rules: PrefetchRules,
    sequence_parallel: bool,
    already: set[str],
) -> SkipReason | None:
    if use.skip is not None:
        return use.skip
    if use.role is None:
        return SkipReason.NO_ROLE
    if not config.enabled:
        return SkipReason.DISABLED
    if config.ratio(use.role) == 0:
        return SkipReason.ZERO_RATIO
    if use.role in rules.sequence_parallel_roles and not sequence_parallel:
        return SkipReason.NEEDS_SEQUENCE_PARALLEL
    if use.node.name in already:
        return SkipReason.ALREADY_PREFETCHED
    if not isinstance(use.nbytes, int):
        return SkipReason.SYMBOLIC_WEIGHT
    if use.nbytes == 0:
        return SkipReason.EMPTY_WEIGHT
    return None


def _insert_prefetch(
    graph: Graph,
    use: LinearUse,
    window: Window,
    size: int,
    index: Mapping[Node, int],
    last_at_anchor: dict[Node, Node],
) -> Node:
    base = window.dependency
    if base.op == "placeholder":  # keep placeholders first
        base = list(graph.find_nodes(op="placeholder"))[-1]
    anchor = last_at_anchor.get(base, base)  # several prefetches after one node keep their order
    root = use.root
    if root.op == "get_attr" and index.get(root, -1) > index.get(base, -1):
        base.prepend(root)  # constants have no inputs: hoisting them is always safe
    args = (root, window.dependency, size) + ((use.offset,) if use.offset else ())
    with graph.inserting_after(anchor):
        node = graph.call_function(PREFETCH_OP, args)
    node.meta["val"] = None
    node.meta[META_KEY] = {
        "linear": use.node.name,
        "role": use.role,
        "max_size": size,
        "window": window.kind,
    }
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in use.node.meta:
            node.meta[key] = use.node.meta[key]
    last_at_anchor[base] = node
    return node


def _device_type(root: Node | None) -> str | None:
    value = tensor_value(root) if root is not None else None
    return value.device.type if value is not None else None
