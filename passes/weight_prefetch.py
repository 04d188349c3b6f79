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

import heapq
import logging
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason
from passes.collectives import has_sequence_parallel_collectives, is_collective, is_wait
from passes.graph_utils import (
    finalize,
    flatten_nodes,
    get_arg,
    module_path,
    op_name,
    tensor_value,
)
from passes.linear_ops import LINEAR_OPS, LinearOpSpec
from passes.roles import RoleRule, is_experts_path, layer_index, match_role, owner_path
from passes.vector_ops import NodeKind, classify

logger = logging.getLogger("fxprefetch")

META_KEY = "fxprefetch"

# Ops a weight may pass through between its parameter and the matmul: views of its storage
# (transposes, reshapes, dtype views, expands), parts of it (one expert of a stacked weight),
# and splits of fused weights (followed by ``getitem``). The bytes a matmul reads are those of
# the view that reaches it, wherever in the stored tensor they lie.
_WEIGHT_VIEWS = frozenset(
    f"aten::{n}"
    for n in (
        "t",
        "permute",
        "transpose",
        "view",
        "reshape",
        "_unsafe_view",
        "expand",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "_reshape_alias",
        "as_strided",
        "select",
        "slice",
        "narrow",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "tensor_split",
    )
)


@dataclass
class LinearUse:
    """A linear node and the parameter it reads."""

    node: Node
    spec: LinearOpSpec
    root: Node  # placeholder or get_attr holding the weight
    offset: int  # bytes into root where the used part starts
    nbytes: int | torch.SymInt  # bytes of the used part
    shape: tuple[int, ...]
    dtype: torch.dtype
    weight_name: str
    module: str | None
    named: bool = False  # weight_name is a parameter path (not just a placeholder's name)
    role: str | None = None
    role_reason: str = ""


@dataclass
class Window:
    dependency: Node  # the node the prefetch follows (a tensor-valued node)
    vector_ops: list[Node] = field(default_factory=list)
    collective: Node | None = None  # set when a collective window hides the prefetch

    @property
    def kind(self) -> str:
        return "collective" if self.collective is not None else "vector"

    def op_names(self) -> tuple[str, ...]:
        ops = [op_name(n) for n in reversed(self.vector_ops)]
        if self.collective is not None:
            ops.insert(0, op_name(self.collective))
        return tuple(ops)


def _trace_weight(arg: Node) -> Node | None:
    """The placeholder or ``get_attr`` a weight argument views; None when it is computed."""
    node = arg
    while node.op == "call_function":
        if node.target is operator.getitem or op_name(node) in _WEIGHT_VIEWS:
            first = node.args[0] if node.args else None
            if not isinstance(first, Node):
                return None
            node = first
        else:
            return None
    if node.op not in ("placeholder", "get_attr") or tensor_value(node) is None:
        return None
    return node


def _known_int(value: int | torch.SymInt) -> int | None:
    """``value`` when it is known without adding a guard (an int or a constant SymInt)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return None


def _byte_range(root: torch.Tensor, used: torch.Tensor) -> tuple[int, int] | None:
    """``(offset, nbytes)`` of the bytes of ``root`` that its view ``used`` spans.

    Each storage offset counts in its own tensor's element size (a ``view(dtype)`` changes
    it). None when a size, stride or offset is symbolic: reading it would add a guard.
    """
    values = [used.storage_offset(), root.storage_offset(), used.numel()]
    values += list(used.shape) + list(used.stride())
    known = [_known_int(v) for v in values]
    if any(v is None for v in known):
        return None
    used_offset, root_offset, numel, *rest = known
    sizes, strides = rest[: used.dim()], rest[used.dim() :]
    offset = used_offset * used.element_size() - root_offset * root.element_size()
    if numel == 0:
        return offset, 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    return offset, span * used.element_size()


def find_linears(graph: Graph, weight_names: Mapping[str, str] | None = None) -> list[LinearUse]:
    """Every linear-layer node of ``graph`` whose weight is a graph input or constant."""
    weight_names = weight_names or {}
    uses: list[LinearUse] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        spec = LINEAR_OPS.get(op_name(node))
        if spec is None:
            continue
        weight_arg = get_arg(node, spec.weight)
        if isinstance(weight_arg, (list, tuple)):
            if len(weight_arg) != 1:
                continue
            weight_arg = weight_arg[0]
        if not isinstance(weight_arg, Node):
            continue
        root = _trace_weight(weight_arg)
        if root is None:
            continue
        root_val = tensor_value(root)
        used = tensor_value(weight_arg)
        whole = root_val.numel() * root_val.element_size()
        part = _byte_range(root_val, used) if used is not None else None
        if part is None or part == (0, _known_int(whole)):
            offset, nbytes, shape = 0, whole, tuple(root_val.shape)  # all of it, or unknown
        else:
            (offset, nbytes), shape = part, tuple(used.shape)
        if root.op == "get_attr":
            name = weight_names.get(root.name, str(root.target))
        else:
            name = weight_names.get(root.name, root.name)
        uses.append(
            LinearUse(
                node=node,
                spec=spec,
                root=root,
                offset=offset,
                nbytes=nbytes,
                shape=shape,
                dtype=root_val.dtype,
                weight_name=name,
                module=module_path(node),
                named=root.name in weight_names or root.op == "get_attr",
            )
        )
    return uses


def assign_roles(
    uses: list[LinearUse],
    weight_names: Mapping[str, str] | None = None,
    extra_rules: tuple[RoleRule, ...] = (),
) -> None:
    """Set ``role`` on each use: by parameter path, then module path, then expert order."""
    first_expert_weight: dict[str, Node] = {}
    for use in uses:
        candidates = []
        if use.named:
            candidates.append(owner_path(use.weight_name))
        if use.module:
            candidates.append(use.module)
        rule = next((r for r in (match_role(p, extra_rules) for p in candidates) if r), None)
        if rule is not None:
            use.role, use.role_reason = rule.role, rule.why
            continue
        experts = next((p for p in candidates if is_experts_path(p)), None)
        if experts is not None:
            # Fused or grouped experts whose weight names are unknown: the first weight the
            # experts module multiplies by is its gate/up projection.
            first = first_expert_weight.setdefault(experts, use.root)
            if first is use.root:
                use.role, use.role_reason = "moe.gate_up", "first expert matmul"
            else:
                use.role_reason = "later expert matmul"
            continue
        use.role_reason = "no rule matched"


def find_window(use: LinearUse, index: Mapping[Node, int]) -> Window | None:
    """Walk back from the linear's activations in reverse graph order (see module docstring)."""
    starts = [n for name in use.spec.activations for n in flatten_nodes(get_arg(use.node, name))]
    heap: list[tuple[int, str, Node]] = []
    seen: set[Node] = set()
    via: dict[Node, Node] = {}

    def push(node: Node, parent: Node | None) -> None:
        if node not in seen and node in index:
            seen.add(node)
            if parent is not None:
                via[node] = parent
            heapq.heappush(heap, (-index[node], node.name, node))

    for start in starts:
        push(start, None)
    vector_ops: list[Node] = []
    leaf: Node | None = None
    while heap:
        _, _, node = heapq.heappop(heap)
        kind = classify(node)
        if kind is NodeKind.IGNORE:
            continue
        if kind is NodeKind.LEAF:
            leaf = leaf or node
            continue
        if kind is NodeKind.BARRIER:
            return Window(_tensor_of(node, via), vector_ops)
        if kind is NodeKind.VECTOR:
            vector_ops.append(node)
        for inp in node.all_input_nodes:
            push(inp, node)
    if leaf is None:
        return None
    return Window(_tensor_of(leaf, via), vector_ops)


def _tensor_of(node: Node, via: Mapping[Node, Node]) -> Node:
    """A tensor-valued node standing for ``node`` (its ``getitem`` when it returns a tuple)."""
    if tensor_value(node) is not None or "val" not in node.meta:
        return node
    child = via.get(node)
    if child is not None and tensor_value(child) is not None:
        return child
    for user in node.users:
        if tensor_value(user) is not None:
            return user
    return node


def _collective_window(window: Window) -> Window:
    """Start the prefetch at the input of the collective the window begins with."""
    collective = window.dependency
    if is_wait(collective):
        inner = flatten_nodes(collective.args[:1])
        if inner and is_collective(inner[0]):
            collective = inner[0]
    if not is_collective(collective):
        return window
    inputs = [n for n in flatten_nodes(collective.args[:1]) if tensor_value(n) is not None]
    if not inputs:
        return window
    return Window(inputs[0], window.vector_ops, collective)


def prefetch_bytes(ratio: float, weight_bytes: int, cap: int) -> tuple[int, bool]:
    """``(min(int(ratio * weight_bytes), cap), capped)``: the guide's formula."""
    wanted = math.floor(ratio * weight_bytes)
    return min(wanted, cap), wanted > cap


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
    weight_names: Mapping[str, str] | None = None,
    role_rules: tuple[RoleRule, ...] = (),
    graph_name: str = "graph",
    recompile: bool = True,
) -> PrefetchPlan:
    """Insert prefetches into ``gm`` in place and return the plan of what was done.

    ``weight_names`` maps placeholder names to parameter paths (the backend fills it from
    dynamo's sources); without it, roles come from ``nn_module_stack``. ``recompile=False``
    leaves regenerating ``gm.code`` to the caller (inductor does it after its passes).
    """
    graph = gm.graph
    index = {node: i for i, node in enumerate(graph.nodes)}
    sequence_parallel = config.sequence_parallel or has_sequence_parallel_collectives(index)
    plan = PrefetchPlan(
        graph=graph_name,
        config_digest=config.digest,
        enabled=config.enabled,
        sequence_parallel=sequence_parallel,
    )
    uses = find_linears(graph, weight_names)
    assign_roles(uses, weight_names, role_rules)
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
            "dtype": str(use.dtype),
            "weight_bytes": use.nbytes if isinstance(use.nbytes, int) else -1,
            "offset": use.offset,
            "position": index[use.node],
        }
        skip = _precheck(use, config, sequence_parallel, already)
        window = None
        if skip in (None, SkipReason.ZERO_RATIO, SkipReason.NEEDS_SEQUENCE_PARALLEL):
            key = tuple(
                n for a in use.spec.activations for n in flatten_nodes(get_arg(use.node, a))
            )
            if key not in windows:
                found = find_window(use, index)
                if found is not None and collective_windows:
                    found = _collective_window(found)
                windows[key] = found
            window = windows[key]
            if window is not None:
                base.update(
                    window=window.op_names(),
                    window_kind=window.kind,
                    dependency=window.dependency.name,
                    dependency_op=op_name(window.dependency),
                    dependency_position=index.get(window.dependency),
                    window_start=min((index[n] for n in window.vector_ops), default=None),
                )
            if skip is None and (
                window is None or (not window.vector_ops and window.collective is None)
            ):
                skip = SkipReason.EMPTY_WINDOW
        if skip is not None:
            records.append(LinearRecord(**base, ratio=_ratio(use, config), skip_reason=skip))
            continue
        ratio = config.ratio(use.role)
        size, capped = prefetch_bytes(ratio, use.nbytes, config.max_prefetch_bytes)
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
    use: LinearUse, config: WeightPrefetchConfig, sequence_parallel: bool, already: set[str]
) -> str | None:
    if use.role is None:
        return SkipReason.NO_ROLE
    if not config.enabled:
        return SkipReason.DISABLED
    if config.ratio(use.role) == 0:
        return SkipReason.ZERO_RATIO
    if use.role == "mlp.down" and not sequence_parallel:
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
