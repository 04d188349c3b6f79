"""Every linear node of a graph, and the stored weight it reads (or why it reads none).

Only parameters, buffers and constants are weights: the :class:`WeightSources` of the graph
(from dynamo's sources, or a higher-order op's call sites) names the placeholders that are;
an operand nobody can tell about is skipped with the reason, never guessed to be a weight.
A weight may stand in either operand of a plain matmul; the op table says which slot is
usual, and both are checked. What lies between the stored
tensor and the matmul is traced by :mod:`analysis.weight_trace`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from fxprefetch.passes.analysis.graph_utils import (
    flatten_nodes,
    get_arg,
    module_path,
    op_name,
    prefetch_nodes,
    tensor_value,
)
from fxprefetch.passes.analysis.linear_ops import LinearOpSpec, linear_spec
from fxprefetch.passes.analysis.weight_sources import WeightSources
from fxprefetch.passes.analysis.weight_trace import WeightTrace, stored_bytes, trace_operand
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.plan import SkipReason


@dataclass
class LinearUse:
    """A linear node, and the stored weight it reads (``root`` is None when it reads none)."""

    node: Node
    spec: LinearOpSpec
    starts: tuple[Node, ...]  # activation operands: where the window walk starts
    root: Node | None  # placeholder or get_attr holding the weight
    offset: int  # bytes into root where the used part starts
    nbytes: int | torch.SymInt  # stored bytes of the used part (what the matmul reads)
    shape: tuple[int, ...]  # of the used part, in the stored tensor's orientation
    dtype: torch.dtype | None  # the stored dtype
    weight_name: str
    module: str | None
    named: bool = False  # weight_name is a parameter path (not just a placeholder's name)
    role: str | None = None
    role_reason: str = ""
    skip: SkipReason | None = None  # the operand cannot be prefetched (see ``note``)
    note: str | None = None
    span: int | torch.SymInt | None = None  # bytes from offset to the last read (None: nbytes)
    # the weight stands in the activation's slot (``W @ x.T``): the activation, in the
    # weight's slot, holds the tokens in its columns
    swapped: bool = False

    @property
    def span_bytes(self) -> int | torch.SymInt:
        """What a contiguous prefetch of the whole part covers (see ``StoredPart.span``)."""
        return self.nbytes if self.span is None else self.span


def _is_weight(root: Node, sources: WeightSources) -> bool:
    """Parameters, buffers and constants are weights; user inputs are not."""
    return root.op == "get_attr" or sources.is_weight(root)


def _describe(operand: Node | None, trace: WeightTrace | None, sources: WeightSources) -> str:
    if trace is None or operand is None:
        return "no tensor operand"
    if trace.root is not None:
        return sources.notes.get(trace.root.name, f"user input {trace.root.name}")
    return f"computed by {trace.computed_by}"


def _operands(node: Node, spec: LinearOpSpec) -> list[tuple[str, Node]]:
    """The (argument name, node) pairs that may hold the weight, the usual slot first."""
    names = [spec.weight] + ([spec.activations[0]] if spec.swappable else [])
    found = []
    for name in names:
        value = get_arg(node, name)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if isinstance(value, Node):
            found.append((name, value))
    return found


def _linear_use(node: Node, spec: LinearOpSpec, sources: WeightSources, rules: PrefetchRules):
    module = sources.module(module_path(node))
    starts = tuple(n for a in spec.activations for n in flatten_nodes(get_arg(node, a)))
    empty = dict(
        node=node,
        spec=spec,
        starts=starts,
        root=None,
        offset=0,
        nbytes=0,
        shape=(),
        dtype=None,
        module=module,
    )
    if spec.hidden:
        return LinearUse(
            **empty,
            weight_name="-",
            role=spec.weight or None,
            skip=SkipReason.HIDDEN_WEIGHTS,
            note=_hidden_note(node, spec, sources, rules),
        )
    weight_arg = get_arg(node, spec.weight)
    if isinstance(weight_arg, (list, tuple)) and len(weight_arg) != 1:
        return LinearUse(
            **empty,
            weight_name=f"{len(weight_arg)} tensors",
            skip=SkipReason.UNSUPPORTED_WEIGHT,
            note="a list of weights (one per group)",
        )
    first: tuple[Node, WeightTrace] | None = None
    unknown: tuple[Node, str] | None = None  # an operand nobody can tell about, and why
    for slot, operand in _operands(node, spec):
        trace = trace_operand(operand, rules)
        first = first or (operand, trace)
        if trace.root is None or not _is_weight(trace.root, sources):
            reason = sources.unknown_reason(trace.root) if trace.root is not None else None
            if reason is not None and unknown is None:
                unknown = (operand, f"{trace.root.name}: {reason}")
            continue
        swapped = slot != spec.weight
        if swapped:  # the weight stands in an activation slot: swap the roles
            starts = tuple(flatten_nodes(get_arg(node, spec.weight)))
        use = _weight_use(
            node, spec, starts, trace, sources, sources.module(_linear_module(node, operand))
        )
        use.swapped = swapped
        return use
    if unknown is not None:
        return LinearUse(
            **empty,
            weight_name=unknown[0].name,
            skip=SkipReason.UNKNOWN_SOURCE,
            note=unknown[1],
        )
    operand, trace = first if first is not None else (None, None)
    return LinearUse(
        **empty,
        weight_name=operand.name if operand is not None else "-",
        skip=SkipReason.NOT_A_WEIGHT,
        note=_describe(operand, trace, sources),
    )


def _hidden_note(
    node: Node, spec: LinearOpSpec, sources: WeightSources, rules: PrefetchRules
) -> str:
    """``<op> <what it hides>``, and the weight matrices it takes as arguments, if any."""
    names = []
    activations = {n for a in spec.activations for n in flatten_nodes(get_arg(node, a))}
    for operand in flatten_nodes(list(node.args) + list(node.kwargs.values())):
        if operand in activations:
            continue
        root = trace_operand(operand, rules).root
        value = tensor_value(root) if root is not None else None
        if value is not None and value.dim() >= 2 and _is_weight(root, sources):
            default = str(root.target) if root.op == "get_attr" else root.name
            names.append(sources.names.get(root.name, default))
    note = f"{op_name(node)} {spec.note}"
    return f"{note}: {', '.join(dict.fromkeys(names))}" if names else note


def _linear_module(node: Node, operand: Node) -> str | None:
    """The module the linear ran in: that of the view of its weight, where there is one.

    Inductor's pattern matcher may replace a matmul and an add with one ``addmm`` that takes
    its metadata from the add (in the next norm's module); the view of the weight (``t``,
    ``permute``) keeps the module whose forward multiplied by it.
    """
    if operand.op == "call_function":
        found = module_path(operand)
        if found:
            return found
    return module_path(node)


def _weight_use(
    node: Node,
    spec: LinearOpSpec,
    starts: tuple[Node, ...],
    trace: WeightTrace,
    sources: WeightSources,
    module: str | None,
) -> LinearUse:
    root = trace.root
    assert root is not None
    names = sources.names
    name = names.get(root.name, str(root.target) if root.op == "get_attr" else root.name)
    part = stored_bytes(trace)
    dtype = tensor_value(root).dtype
    notes = [sources.notes[root.name]] if root.name in sources.notes else []
    skip = None
    if trace.converted_by:
        ops = ", ".join(n.split("::")[-1] for n in trace.converted_by)
        notes.append(f"stored {str(dtype).replace('torch.', '')}, converted by {ops}")
    if trace.indexed_by is not None:
        skip = SkipReason.INDEXED_WEIGHT
        notes.append(f"{trace.indexed_by.split('::')[-1]} picks the part at run time")
    if spec.prepacked:
        skip = SkipReason.UNSUPPORTED_WEIGHT
        notes.append("prepacked by inductor freezing (opaque layout)")
    return LinearUse(
        node=node,
        spec=spec,
        starts=starts,
        root=root,
        offset=part.offset,
        nbytes=part.nbytes,
        shape=part.shape,
        dtype=dtype,
        weight_name=name,
        module=module,
        named=root.name in names or root.op == "get_attr",
        skip=skip,
        note="; ".join(notes) or None,
        span=part.span,
    )


def find_linears(
    graph: Graph,
    weight_names: WeightSources | Mapping[str, str] | None,
    rules: PrefetchRules,
) -> list[LinearUse]:
    """One use per linear-op node of ``graph``: its weight, or why it reads none.

    ``weight_names``: the graph's :class:`WeightSources`, or a mapping placeholder ->
    parameter path (every other placeholder is not a weight), or None (nothing is known:
    every linear reading a placeholder is skipped as such)."""
    table = rules.linear_table
    sources = WeightSources.of(weight_names)
    uses = [
        _linear_use(node, spec, sources, rules)
        for node in graph.nodes
        if (spec := linear_spec(node, table)) is not None
    ]
    return uses + _opaque_uses(graph, sources, rules, {u.root for u in uses if u.root})


# namespaces of PyTorch's own ops: a weight they take is not handed to an opaque op
_TORCH_NAMESPACES = frozenset({"aten", "prims", "fxprefetch", "getitem"})
_OPAQUE = LinearOpSpec("", ())


def _weight_dims(node: Node, spec: LinearOpSpec) -> int | None:
    """Dimensions of the tensor in a linear op's weight slot."""
    value = get_arg(node, spec.weight)
    found = tensor_value(value) if isinstance(value, Node) else None
    return found.dim() if found is not None else None


def _opaque_uses(
    graph: Graph, sources: WeightSources, rules: PrefetchRules, read: set[Node]
) -> list[LinearUse]:
    """One use per weight matrix that no linear reads and a custom op takes (through views,
    casts...): a kernel no pass sees into (the w2 of vLLM's CPU fused MoE), recorded with the
    op's name so the plan says where the weight went."""
    found: dict[Node, LinearUse] = {}
    prefetches = set(prefetch_nodes(graph))
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem or node in prefetches:
            continue
        name = op_name(node)
        if "::" not in name or name.split("::")[0] in _TORCH_NAMESPACES:
            continue
        if name == "npu::npu_prefetch" or name in rules.weight_views or name in rules.weight_casts:
            continue  # torch_npu's prefetch placed by hand, or a view of the weight
        # a linear op's other weight matrices (the experts' w2 beside w13): only those shaped
        # like its weight, not its scales
        spec = linear_spec(node, rules.linear_table)
        if spec is not None and (spec.hidden or spec.prepacked):
            continue  # recorded as hiding its weights, or with its prepacked copy
        like = _weight_dims(node, spec) if spec is not None else None
        for operand in flatten_nodes(list(node.args) + list(node.kwargs.values())):
            trace = trace_operand(operand, rules)
            root = trace.root
            value = tensor_value(root) if root is not None else None
            if root is None or root in read or root in found or value is None:
                continue
            if value.dim() < 2 or not _is_weight(root, sources):
                continue
            if spec is not None and value.dim() != like:
                continue
            use = _weight_use(node, _OPAQUE, (), trace, sources, module_path(node))
            use.skip = SkipReason.OPAQUE_OP
            use.note = "; ".join(filter(None, (f"taken by {name}", use.note)))
            found[root] = use
    return list(found.values())
