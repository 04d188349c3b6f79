"""The bodies of higher-order ops, and what their inputs are at the call sites.

``torch.cond`` branches, ``nested_compile_region`` bodies (``invoke_subgraph``), loop bodies
and any other higher-order op keep their code in a ``GraphModule`` the parent graph reaches
through ``get_attr``. :func:`hop_bodies` finds each body once (a region called by two layers
is one body), parents before children, and tells for each:

- its weight sources: a body input is a weight when every call site passes a parameter or
  buffer (or a view of one) in that position; an activation at any call site makes it "not
  a weight"; where the call-site operand cannot be mapped (an op whose inputs this module
  does not know), nobody can tell, and the reason is kept;
- how many times it runs per call of the top graph: the sum over its ``invoke_subgraph``
  call sites in straight-line code; None where that depends on data (a ``cond`` branch, a
  loop body, anything under one); and for each of those runs, the weight each call site
  passes where the body's sources name the first call site's (``run_names``), so a region
  shared by several layers counts each run against its own layer's weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxprefetch.passes.analysis.graph_utils import tensor_value
from fxprefetch.passes.analysis.weight_sources import WeightSources
from fxprefetch.passes.analysis.weight_trace import known_int, trace_operand
from fxprefetch.passes.tables.rules import DEFAULT_RULES, PrefetchRules

_CARRIED = "a while_loop's carried value changes at each iteration"


@dataclass
class HopBody:
    """One body of a higher-order op, with what is known of its inputs."""

    gm: GraphModule
    path: str  # the parent's path and the body's attribute: "true_graph_0", "a / b"
    hops: tuple[str, ...]  # the higher-order ops that call it
    call_sites: int
    sources: WeightSources = field(default_factory=WeightSources)
    # one entry per run per call of the top graph (None: depends on data): the weight name
    # ``sources`` gives (the first call site's) -> the weight that run's call site passes
    run_names: tuple[dict[str, str], ...] | None = None

    @property
    def runs(self) -> int | None:
        """Times the body runs per call of the top graph; None: depends on data."""
        return None if self.run_names is None else len(self.run_names)


def _hop_name(node: Node) -> str | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.HigherOrderOperator):
        return None
    return target.name()


def _body_of(parent: GraphModule, value: Any) -> GraphModule | None:
    if isinstance(value, Node) and value.op == "get_attr" and isinstance(value.target, str):
        found = getattr(parent, value.target, None)
        return found if isinstance(found, GraphModule) else None
    return None


def _operands(node: Node, hop: str, n_inputs: int) -> list[Any | str] | str:
    """What the call passes to each of the body's ``n_inputs`` placeholders (an operand, or
    a string saying why it cannot be known), or one string for the whole call."""
    args = node.args
    if hop == "invoke_subgraph":
        ops: list[Any] = list(args[2:])
    elif hop == "cond" and len(args) > 3 and isinstance(args[3], (list, tuple)):
        ops = list(args[3])
    elif hop == "while_loop" and len(args) > 3:
        carried, additional = list(args[2]), list(args[3])
        ops = [_CARRIED] * len(carried) + additional
    elif hop == "map_impl" and len(args) > 2:  # each iteration reads a slice of xs
        ops = list(args[1]) + list(args[2])
    else:
        return f"an input of a {hop} body, which fxprefetch does not map to its call site"
    if len(ops) != n_inputs:
        return f"{hop}'s operands do not match its body's {n_inputs} inputs"
    return ops


def _non_overlapping(value: torch.Tensor) -> bool:
    """No two elements share memory (so ``numel`` bytes from its start stay in its span)."""
    dims = []
    for raw_size, raw_stride in zip(value.shape, value.stride(), strict=True):
        size, stride = known_int(raw_size), known_int(raw_stride)
        if size is None or stride is None:
            return False
        if size != 1:
            dims.append((stride, size))
    expected = 1
    for stride, size in sorted(dims):
        if stride < expected:
            return False
        expected = stride * size
    return True


def _what_is_passed(
    operand: Any,
    parent: WeightSources,
    parent_path: str,
    value: torch.Tensor | None,
    rules: PrefetchRules,
) -> tuple[str, str]:
    """``("weight", path)``, ``("input", note)`` or ``("unknown", reason)`` for one operand
    passed to a body input whose value is ``value``."""
    if isinstance(operand, str):
        return "unknown", operand
    if not isinstance(operand, Node) or value is None:
        return "input", "not a tensor at the call site"
    trace = trace_operand(operand, rules)
    root = trace.root
    where = parent_path or "the top graph"
    if root is None:
        return "input", f"computed by {trace.computed_by} in {where}"
    reason = parent.unknown_reason(root)
    if reason is not None:
        return "unknown", reason
    if root.op == "get_attr":
        name = str(root.target)
    elif parent.is_weight(root):
        name = parent.names[root.name]
    else:
        return "input", parent.notes.get(root.name, f"user input {root.name} of {where}")
    if trace.converted_by or trace.indexed_by:
        op = trace.indexed_by or trace.converted_by[-1]
        return "input", f"{name} after {op.split('::')[-1]} in {where}"
    if root is not operand and not _non_overlapping(value):
        return "unknown", f"a view of {name} whose elements may overlap"
    return "weight", name


def _combine(
    site_values: list[tuple[str, str]], placeholder: str, sources: dict[str, dict[str, str]]
) -> None:
    """Fold what each call site passes to one body input into ``sources``."""
    kinds = [k for k, _ in site_values]
    n = len(site_values)
    if "unknown" in kinds:
        sources["unknown"][placeholder] = site_values[kinds.index("unknown")][1]
    elif "input" in kinds:
        i = kinds.index("input")
        note = site_values[i][1]
        sources["notes"][placeholder] = note if n == 1 else f"call site {i + 1} of {n}: {note}"
    else:
        names = list(dict.fromkeys(v for _, v in site_values))
        sources["names"][placeholder] = names[0]
        if n > 1:
            shared = ", ".join(names)
            sources["notes"][placeholder] = f"body shared by {n} call sites ({shared})"


@dataclass
class _Site:
    parent: int  # id of the parent GraphModule
    node: Node
    hop: str
    attr: str


def hop_bodies(
    gm: GraphModule, sources: WeightSources, rules: PrefetchRules = DEFAULT_RULES
) -> list[HopBody]:
    """Every higher-order-op body reachable from ``gm``, each once, parents first; weights
    passed to a body are traced under ``rules``."""
    graphs: dict[int, GraphModule] = {id(gm): gm}
    sites: dict[int, list[_Site]] = {}
    stack = [gm]
    while stack:  # discover every body and its call sites
        parent = stack.pop()
        for node in parent.graph.nodes:
            hop = _hop_name(node)
            if hop is None:
                continue
            for arg in node.args:
                body = _body_of(parent, arg)
                if body is None:
                    continue
                sites.setdefault(id(body), []).append(_Site(id(parent), node, hop, arg.target))
                if id(body) not in graphs:
                    graphs[id(body)] = body
                    stack.append(body)
    # each graph's sources, its runs' names (see HopBody.run_names) and its path
    known: dict[int, tuple[WeightSources, tuple[dict[str, str], ...] | None, str]] = {
        id(gm): (sources, ({},), "")
    }
    bodies: list[HopBody] = []
    pending = [key for key in graphs if key != id(gm)]
    while pending:  # parents before children: a body waits for all its callers
        ready = [k for k in pending if all(s.parent in known for s in sites[k])]
        if not ready:  # a cycle cannot be traced; never expected
            raise RuntimeError("higher-order-op bodies call each other in a cycle")
        for key in ready:
            pending.remove(key)
            body = _plan_body(graphs[key], sites[key], known, rules)
            known[key] = (body.sources, body.run_names, body.path)
            bodies.append(body)
    return bodies


def _plan_body(
    body: GraphModule,
    sites: Sequence[_Site],
    known: dict[int, tuple[WeightSources, Any, str]],
    rules: PrefetchRules,
) -> HopBody:
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    values = [tensor_value(p) for p in placeholders]
    per_site: list[list[tuple[str, str]]] = []
    runs: list[dict[str, str]] | None = []  # per run: placeholder -> the weight passed
    for site in sites:
        parent_sources, parent_runs, parent_path = known[site.parent]
        ops = _operands(site.node, site.hop, len(placeholders))
        if isinstance(ops, str):  # the whole call cannot be mapped
            ops = [ops] * len(placeholders)
        passed = [
            _what_is_passed(op, parent_sources, parent_path, v, rules)
            for op, v in zip(ops, values, strict=True)
        ]
        per_site.append(passed)
        if site.hop != "invoke_subgraph" or parent_runs is None or runs is None:
            runs = None
            continue
        for parent_names in parent_runs:  # the parent's name -> what that parent run passes
            runs.append(
                {
                    p.name: parent_names.get(name, name)
                    for p, (kind, name) in zip(placeholders, passed, strict=True)
                    if kind == "weight"
                }
            )
    fields: dict[str, dict[str, str]] = {"names": {}, "unknown": {}, "notes": {}}
    for i, p in enumerate(placeholders):
        _combine([values_[i] for values_ in per_site], p.name, fields)
    names = fields["names"]
    run_names = (
        None
        if runs is None
        else tuple({names[p]: name for p, name in run.items() if p in names} for run in runs)
    )
    first = sites[0]
    parent_path = known[first.parent][2]
    return HopBody(
        gm=body,
        path=f"{parent_path} / {first.attr}" if parent_path else first.attr,
        hops=tuple(dict.fromkeys(s.hop for s in sites)),
        call_sites=len(sites),
        sources=WeightSources(**fields),
        run_names=run_names,
    )
