"""Small helpers every pass needs: op names, argument lookup, module paths, tensor sizes."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxprefetch.ops import PREFETCH_OPS

_ROOT = re.compile(r"^(?:L|G)\[['\"][^'\"]*['\"]\](?:\[\d+\])?")
_SUBSCRIPT = re.compile(
    r"\.?_(?:modules|parameters|buffers)\[['\"]([^'\"]*)['\"]\]"  # ._modules['x']
    r"|\[['\"]?([^\]'\"]*)['\"]?\]"  # [0] or ['x']
)
_GETATTR = re.compile(r"getattr\(([^()]*), ['\"]([^'\"]*)['\"]\)")


_FUNCTIONALIZED = ("auto_functionalized", "auto_functionalized_v2")


def op_name(node: Node) -> str:
    """A stable name for what a node calls: ``aten::mm``, ``npu::npu_prefetch``, ``getitem``.

    A mutating op wrapped by functionalization (``auto_functionalized(op, ...)``) is named
    after the op it wraps.
    """
    if node.op != "call_function":
        return node.op
    target = node.target
    if getattr(target, "__name__", None) in _FUNCTIONALIZED and node.args:
        target = node.args[0]
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name
    qualified = getattr(target, "_qualified_op_name", None)  # OpOverloadPacket
    if qualified is not None:
        return qualified
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def get_arg(node: Node, name: str) -> Any:
    """The value bound to schema argument ``name`` of an op call (or None).

    An ``OpOverloadPacket`` target (inductor's freezing passes emit some) reads its default
    overload's schema.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None and isinstance(node.target, torch._ops.OpOverloadPacket):
        default = getattr(node.target, "default", None)
        schema = getattr(default, "_schema", None)
    if schema is None:  # e.g. auto_functionalized, which passes the op's arguments by name
        if name not in node.kwargs and f"_{name}_base_index" in node.kwargs:
            # auto_functionalized_v2 passes a mutated argument as an index into _all_bases
            index = node.kwargs[f"_{name}_base_index"]
            bases = node.kwargs.get("_all_bases") or ()
            return bases[index] if index is not None and index < len(bases) else None
        return node.kwargs.get(name)
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if i < len(node.args) and not arg.kwarg_only:
                return node.args[i]
            return node.kwargs.get(name, None)
    return None


def prefetch_nodes(graph: torch.fx.Graph) -> list[Node]:
    """Every node of ``graph`` calling a prefetch op (``fxprefetch.ops.PREFETCH_OPS``), in
    graph order."""
    targets = set(PREFETCH_OPS)
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


def set_arg(node: Node, name: str, value: Any) -> None:
    """Bind schema argument ``name`` of an op call to ``value`` (positional or keyword)."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if i < len(node.args) and not arg.kwarg_only:
                node.args = (*node.args[:i], value, *node.args[i + 1 :])
            else:
                node.kwargs = {**node.kwargs, name: value}
            return
    raise KeyError(f"{schema.name} has no argument {name!r}")


def flatten_nodes(value: Any) -> list[Node]:
    """Nodes inside an argument (a Node, or a list, tuple or dict of them)."""
    if isinstance(value, Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in flatten_nodes(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in flatten_nodes(v)]
    return []


def fake_value(node: Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def tensor_value(node: Node) -> torch.Tensor | None:
    val = fake_value(node)
    return val if isinstance(val, torch.Tensor) else None


def normalize_source_path(raw: str) -> str:
    """Turn dynamo source names into dotted module paths.

    ``L['self'].model.layers[0].mlp`` and
    ``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']``
    both become ``model.layers.0...``.
    """
    path = raw.strip()
    while True:  # innermost getattr(x, 'name') first
        path, n = _GETATTR.subn(lambda m: f"{m.group(1)}.{m.group(2)}", path)
        if not n:
            break
    path = _ROOT.sub("", path)
    path = _SUBSCRIPT.sub(
        lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), path
    )
    return path.strip(".")


def module_path(node: Node) -> str | None:
    """Dotted path of the innermost module a node was traced in, from ``nn_module_stack``.

    Only modules reached from the compiled frame's locals are in the model: a module object
    kept in a Python module's globals (``G['...'].mamba2_chunk_scan``, transformers' hub
    kernels wrapping a function) has no path there, so the innermost module of the model
    around it is the node's.
    """
    for entry in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        raw = str(entry[0] if isinstance(entry, tuple) else entry)
        if not raw.lstrip().startswith("G["):
            return normalize_source_path(raw)
    return None


def is_parameter_source(source: Any) -> bool:
    """Whether a dynamo source is a module's parameter or buffer.

    Decided by what the source is, not by how its name reads: ``module._parameters['w']``
    and ``module._buffers['b']`` (dynamo's ``ParamBufferSource`` or an item of an
    ``UnspecializedParamBufferSource``), through any chain of modules and containers above
    the module. A field of a forward argument (``L['batch'].w``), a tensor kept in a plain
    attribute or list of a module, and a global tensor are not.
    """
    from torch._dynamo import source as dynamo_source

    if isinstance(source, dynamo_source.ParamBufferSource):
        return True
    base = getattr(source, "base", None)
    return isinstance(
        source, (dynamo_source.DictGetItemSource, dynamo_source.GetItemSource)
    ) and isinstance(base, dynamo_source.UnspecializedParamBufferSource)


def placeholder_source_names(gm: GraphModule) -> list[str | None]:
    """Dotted parameter paths of a dynamo graph's placeholders (None for non-parameters)."""
    names: list[str | None] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        raw = source.name if isinstance(getattr(source, "name", None), str) else None
        if raw is None and source is not None and callable(getattr(source, "name", None)):
            raw = source.name()
        names.append(normalize_source_path(raw) if raw and is_parameter_source(source) else None)
    return names


def finalize(gm: GraphModule, recompile: bool = True) -> None:
    """Lint after a mutation, and regenerate the module's code unless the caller will.

    Inductor recompiles after its post-grad passes, so passes running there skip it: on a
    5000-node graph, FX's code generation costs several times the pass itself.
    """
    gm.graph.lint()
    if recompile:
        gm.recompile()
