"""Trace models to post-autograd aten graphs (the graphs the backend's pass receives)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx import GraphModule

if TYPE_CHECKING:
    from fxprefetch.pipeline import Pipeline


def export_aten(
    model: torch.nn.Module, *args: torch.Tensor, **kwargs: object
) -> tuple[GraphModule, dict[str, str]]:
    """Export ``model`` and decompose it like inductor does.

    Returns the aten graph module and a map from its placeholder names to parameter paths.
    """
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs or None, strict=False)
        ep = ep.run_decompositions(select_decomp_table())
    names = dict(ep.graph_signature.inputs_to_parameters)
    names |= dict(ep.graph_signature.inputs_to_buffers)
    gm = ep.graph_module
    # constant user inputs (use_cache=False) and lifted tensor constants, fed back by run_graph
    constants = {
        spec.arg.name: spec.arg.value
        for spec in ep.graph_signature.input_specs
        if isinstance(spec.arg, torch.export.graph_signature.ConstantArgument)
    }
    constants |= {
        name: ep.constants[target]
        for name, target in ep.graph_signature.inputs_to_lifted_tensor_constants.items()
    }
    gm.meta["constant_inputs"] = constants
    return gm, names


def run_graph(
    gm: GraphModule, model: torch.nn.Module, names: dict[str, str], *args: torch.Tensor
) -> list[torch.Tensor]:
    """Run an exported aten graph with ``model``'s parameters and the user inputs ``args``."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    user = iter(args)
    constants = gm.meta.get("constant_inputs", {})
    inputs = [
        state[names[n.name]]
        if n.name in names
        else constants[n.name]
        if n.name in constants
        else next(user)
        for n in gm.graph.find_nodes(op="placeholder")
    ]
    with torch.no_grad():
        out = gm(*inputs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def fake_trace(model: torch.nn.Module, *args: torch.Tensor) -> tuple[GraphModule, dict[str, str]]:
    """Trace ``model`` with fake tensors (no memory, no process group needed for collectives).

    Parameters become the first placeholders; returns the graph and placeholder -> path map.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    state = dict(model.named_parameters()) | dict(model.named_buffers())

    def call(params: dict[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, inputs)

    gm = make_fx(
        call,
        tracing_mode="fake",
        record_module_stack=True,
        decomposition_table=select_decomp_table(),
    )(state, *args)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return gm, {p.name: path for p, path in zip(placeholders, state, strict=False)}


def run_synth_pipeline(
    target: str, config: object = None, model: torch.nn.Module | None = None, **context: object
) -> tuple:
    """Fake-trace ``model`` (a 2-layer ``SynthModel`` by default) and run ``target``'s
    pipeline on it.

    ``context`` sets :class:`PassContext` fields (``devices``: a ``DeviceSetup``...);
    returns the graph and the :class:`CompileReport`.
    """
    from fxprefetch import WeightPrefetchConfig
    from fxprefetch.passes import DEFAULT_RULES
    from fxprefetch.pipeline import PassContext, run_pipeline

    from support.synthetic import SynthModel, SynthSpec

    model = model if model is not None else SynthModel(SynthSpec(layers=2))
    gm, names = fake_trace(model, torch.randint(0, 64, (1, 4)))
    ctx = PassContext(
        config=config if config is not None else WeightPrefetchConfig(enabled=True),
        rules=DEFAULT_RULES,
        graph_name="g",
        weight_names=names,
        **context,
    )
    return gm, run_pipeline(gm, pipeline_of(target), ctx)


def pipeline_of(target: str) -> Pipeline:
    """The registered pipeline of ``target`` (``npu``, ``inductor``, ``eager``)."""
    from fxprefetch.targets import TARGET_SPECS

    return TARGET_SPECS[target].pipeline


def swap_passes(monkeypatch: pytest.MonkeyPatch, target: str, passes: Sequence[object]) -> None:
    """For this test, ``target``'s pipeline runs ``passes`` instead (the registry entry is
    replaced, so the backend, explain() and the vLLM pass all run them)."""
    from fxprefetch.targets import TARGET_SPECS

    spec = TARGET_SPECS[target]
    swapped = dataclasses.replace(spec, pipeline=spec.pipeline.with_passes(passes))
    monkeypatch.setitem(TARGET_SPECS, target, swapped)


def trace_constants(
    model: torch.nn.Module, fn: Callable[..., Any], x: torch.Tensor, mode: str
) -> GraphModule:
    """The aten graph of ``fn(x)``; ``model``'s parameters are constants (static shapes, even
    where the input's token dimensions are symbolic) named by their paths, so their linears
    get roles."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode=mode, _allow_non_fake_inputs=True)(x)
    paths = {id(p): name for name, p in model.named_parameters()}
    for node in gm.graph.find_nodes(op="get_attr"):
        path = paths.get(id(getattr(gm, node.target)))
        if path is None:
            continue
        owner: torch.nn.Module = gm
        *modules, attr = path.split(".")
        for name in modules:
            if not hasattr(owner, name):
                owner.add_module(name, torch.nn.Module())
            owner = getattr(owner, name)
        setattr(owner, attr, getattr(gm, node.target))
        node.target = path
    gm.recompile()
    return gm
