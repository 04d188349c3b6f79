"""Which placeholders of a graph hold parameters or buffers, and, where nobody can tell, why.

The pass prefetches only stored weights. A placeholder is one when the graph's caller says
so; a placeholder whose provenance cannot be established is never guessed to be one: the
linear reading it is recorded as skipped, with the reason kept here.

Two ways to know:

- the top-level aten graph: AOT autograd's input descriptors (``node.meta['desc']``) say which
  dynamo input each placeholder comes from, including the inner tensors of a flattened tensor
  subclass (``SubclassGetAttrAOTInput``); dynamo's sources say which inputs are parameters
  or buffers (:func:`aot_weight_sources`);
- a higher-order op's body: its placeholders take the operands passed at the call sites
  (:mod:`analysis.subgraphs` maps them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node


@dataclass(frozen=True)
class WeightSources:
    """What the pass knows of a graph's placeholders.

    ``names``: placeholder -> parameter or buffer path (these are weights). ``unknown``:
    placeholder -> why nobody can tell whether it is one. ``unknown_default``: the reason for
    every placeholder in neither (None: those are known not to be weights). ``notes``:
    placeholder -> what it is (``"user input 'x'"``), shown in the plan. ``module_prefix``:
    see :meth:`module`.
    """

    names: Mapping[str, str] = field(default_factory=dict)
    unknown: Mapping[str, str] = field(default_factory=dict)
    unknown_default: str | None = None
    notes: Mapping[str, str] = field(default_factory=dict)
    # the path, in the model, of the module whose own frame dynamo compiled the graph for
    # (a graph break inside a decoder layer): the graph's module paths are relative to it
    module_prefix: str = ""

    def module(self, path: str | None) -> str | None:
        """A module path of the graph (``self_attn.q_proj``) as a path in the model."""
        if path is None or not self.module_prefix:
            return path
        return f"{self.module_prefix}.{path}" if path else self.module_prefix

    @classmethod
    def of(cls, value: WeightSources | Mapping[str, str] | None) -> WeightSources:
        """Accept the older forms: a name mapping (the rest are not weights), or None
        (nothing is known about any placeholder)."""
        if isinstance(value, WeightSources):
            return value
        if value is None:
            return cls(unknown_default="no parameter names were given for this graph")
        return cls(names=dict(value))

    def is_weight(self, node: Node) -> bool:
        return node.op == "placeholder" and node.name in self.names

    def unknown_reason(self, node: Node) -> str | None:
        """Why nobody can tell whether placeholder ``node`` is a weight (None: it is known)."""
        if node.op != "placeholder" or node.name in self.names:
            return None
        return self.unknown.get(node.name, self.unknown_default)


_MERGED = "AOT autograd merged aliased inputs into one (synthetic base)"


def _describe_desc(desc: object, source_names: Sequence[str | None]) -> tuple[str, str | None]:
    """``("weight", path)``, ``("input", note)`` or ``("unknown", reason)`` for one AOT
    input descriptor."""
    kind = type(desc).__name__
    if kind == "PlainAOTInput":
        idx = getattr(desc, "idx", -1)
        if not 0 <= idx < len(source_names):
            return "unknown", f"AOT input {idx} has no dynamo source"
        name = source_names[idx]
        return ("weight", name) if name else ("input", None)
    if kind in ("ParamAOTInput", "BufferAOTInput"):
        return "weight", str(getattr(desc, "target", ""))
    if kind == "SubclassGetAttrAOTInput":
        what, value = _describe_desc(getattr(desc, "base", None), source_names)
        if what == "weight":
            return what, f"{value}.{getattr(desc, 'attr', '?')}"
        return what, value
    if kind in ("SyntheticBaseAOTInput", "ViewBaseAOTInput"):
        return "unknown", _MERGED
    if kind.startswith(("Philox", "ForwardToken", "BackwardToken", "Tangent")):
        return "input", None
    return "unknown", f"AOT input {kind} is not mapped to a dynamo source"


def aot_weight_sources(gm: GraphModule, source_names: Sequence[str | None]) -> WeightSources:
    """The weight sources of a top-level AOT graph, from dynamo's ``source_names`` (one per
    dynamo input: the parameter path, or None).

    With AOT's input descriptors on every placeholder, each is followed to its dynamo input
    (through tensor-subclass flattening). Without them, placeholders map one to one when the
    counts agree; under inductor's freezing only the user inputs are left (no weights).
    Otherwise nothing is known, and the reason says so.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    descs = [p.meta.get("desc") for p in placeholders]
    if placeholders and all(d is not None for d in descs):
        names: dict[str, str] = {}
        unknown: dict[str, str] = {}
        for node, desc in zip(placeholders, descs, strict=True):
            what, value = _describe_desc(desc, source_names)
            if what == "weight" and value:
                names[node.name] = value
            elif what == "unknown":
                unknown[node.name] = value or "unknown AOT input"
        return WeightSources(names=names, unknown=unknown)
    if source_names and len(placeholders) == len(source_names):
        pairs = zip(placeholders, source_names, strict=True)
        return WeightSources(names={p.name: s for p, s in pairs if s})
    if source_names and len(placeholders) == sum(s is None for s in source_names):
        return WeightSources()  # inductor's freezing: only the user inputs are left
    return WeightSources(
        unknown_default=(
            f"cannot map the graph's {len(placeholders)} inputs to dynamo's "
            f"{len(source_names)} sources"
        )
    )
