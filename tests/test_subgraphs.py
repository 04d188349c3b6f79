"""Weights in every graph the pass sees (``analysis.subgraphs``): higher-order-op bodies
(nested compile regions, ``torch.cond`` branches), tensor-subclass parameters and fields of
forward arguments.

Prefetches that really ran are seen through a native CPU prefetch registered by the test
(the op's CPU kernel hands each one to it): each must lie inside a parameter or buffer (or an
inner tensor of a subclass parameter). Every matmul-class node of every graph the planner saw
(the top graph and each body) has exactly one plan record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule
from torch.testing._internal.two_tensor import TwoTensor

import fxprefetch
from fxprefetch import ops
from fxprefetch.compile_setup import CompileSetup
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.plan import SkipReason
from fxprefetch.planner import GraphPlanner

from support.tracing import pipeline_of

CONFIG = {
    "prefetch_ratio": {"mlp": {"gate_up": 1.0, "down": 1.0}},
    "sequence_parallel": True,  # so that mlp.down is prefetched too
}


# -- what ran, and what the planner saw ---------------------------------------------------------


@pytest.fixture
def native_cpu() -> Iterator[list[tuple[int, int]]]:
    """Make the CPU a device with a native prefetch that records ``(address, bytes)``."""
    seen: list[tuple[int, int]] = []

    def record(weight, dependency, max_size, offset):
        seen.append((weight.data_ptr() + offset, min(max_size, weight.nbytes - offset)))

    ops.register_native_prefetch("cpu", record)
    try:
        yield seen
    finally:
        ops._NATIVE_PREFETCH.pop("cpu", None)


@pytest.fixture
def seen_graphs(monkeypatch) -> list[GraphModule]:
    """The top-level aten graphs the planner ran on (their bodies are reached from them)."""
    graphs: list[GraphModule] = []
    original = GraphPlanner.__call__

    def call(self, gm):
        graphs.append(gm)
        return original(self, gm)

    monkeypatch.setattr(GraphPlanner, "__call__", call)
    return graphs


def _graph_tree(gm: GraphModule) -> list[GraphModule]:
    """``gm`` and every graph it reaches through ``get_attr`` (each once)."""
    found: dict[int, GraphModule] = {}
    stack = [gm]
    while stack:
        g = stack.pop()
        if id(g) in found:
            continue
        found[id(g)] = g
        for node in g.graph.find_nodes(op="get_attr"):
            sub = getattr(g, node.target, None)
            if isinstance(sub, GraphModule):
                stack.append(sub)
    return list(found.values())


def _matmuls(graphs: list[GraphModule]) -> int:
    table = DEFAULT_RULES.linear_table
    return sum(
        1
        for top in graphs
        for g in _graph_tree(top)
        for n in g.graph.nodes
        if n.op == "call_function" and op_name(n) in table
    )


def _stored_ranges(model: nn.Module) -> list[tuple[int, int]]:
    """Memory of every parameter and buffer (the inner tensors of a subclass)."""
    ranges = []
    tensors = list(model.parameters()) + list(model.buffers())
    while tensors:
        t = tensors.pop()
        if isinstance(t, TwoTensor):
            tensors += [t.a, t.b]
        else:
            ranges.append((t.data_ptr(), t.data_ptr() + t.nbytes))
    return ranges


def _outside(seen: list[tuple[int, int]], model: nn.Module) -> list[tuple[int, int]]:
    ranges = _stored_ranges(model)
    return [(p, n) for p, n in seen if not any(lo <= p and p + n <= hi for lo, hi in ranges)]


def _compile_and_run(model, target, *inputs, calls=1):
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": target, "weight_prefetch_config": CONFIG}
    )
    with torch.no_grad():
        for _ in range(calls):
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)
    return fxprefetch.last_plans()


def _records(plans):
    return [r for p in plans for r in p.records]


# -- the models: regions, cond branches, subclass parameters, argument fields ----------------


@torch.compiler.nested_compile_region
def _region(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(x), w)


class _Mlp(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.down_proj = nn.Linear(dim, dim, bias=False)


class RegionModel(nn.Module):
    """A region called with a weight, a forward argument and a computed
    tensor in the weight slot, all inside ``mlp`` (so each would get a role)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _Mlp()
        self.norm = nn.LayerNorm(16)

    def forward(self, x, a):
        h = _region(self.norm(x), self.mlp.gate_proj.weight)
        h = h + _region(x * 2, a) + _region(x.relu(), a * 3)
        return h


class _CondLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _Mlp()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        x = _region(self.norm(x), self.mlp.gate_proj.weight)
        return torch.cond(
            x.sum() > 0,
            lambda x: F.linear(x.relu(), self.mlp.down_proj.weight),
            lambda x: F.linear(x.sigmoid(), self.mlp.gate_proj.weight),
            (x,),
        )


class CondModel(nn.Module):
    """Two layers: a region shared by both, and a ``torch.cond`` per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_CondLayer(), _CondLayer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _ArgLinear(nn.Module):
    """A linear that takes its weight as an argument (its module path gives it a role)."""

    def forward(self, x, w):
        return F.linear(x, w)


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    w: torch.Tensor


class SubclassModel(nn.Module):
    """A ``TwoTensor`` gate weight, and forward arguments (one a dataclass field) in the
    weight slot of linears whose module path has a role."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.mlp = _Mlp()
        w = self.mlp.gate_proj.weight.detach()
        self.mlp.gate_proj.weight = nn.Parameter(TwoTensor(w, w.clone()), requires_grad=False)
        self.mlp.up_proj = _ArgLinear()
        self.mlp.down_proj = _ArgLinear()

    def forward(self, batch: Batch, a):
        h = self.mlp.gate_proj(self.norm(batch.x))
        return self.mlp.up_proj(F.silu(h), batch.w) + self.mlp.down_proj(F.silu(h), a)


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_region_bodies_prefetch_only_parameters(target, native_cpu, seen_graphs, fresh_dynamo):
    model = RegionModel()
    plans = _compile_and_run(model, target, torch.randn(4, 16), torch.randn(16, 16))
    records = _records(plans)
    assert native_cpu and not _outside(native_cpu, model)
    assert len(records) == _matmuls(seen_graphs)
    prefetched = [r for r in records if r.prefetched]
    assert [r.weight for r in prefetched] == ["mlp.gate_proj.weight"]
    skipped = [r for r in records if not r.prefetched]
    assert skipped and {r.skip_reason for r in skipped} == {SkipReason.NOT_A_WEIGHT}
    bodies = [p for p in plans if " / " in p.graph]
    assert bodies and all(p.graph.startswith("graph") for p in bodies)


@pytest.mark.compile
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_cond_and_region_bodies_get_one_record_per_matmul(target, seen_graphs, fresh_dynamo):
    model = CondModel()
    plans = _compile_and_run(model, target, torch.randn(4, 16))
    records = _records(plans)
    assert len(records) == _matmuls(seen_graphs) == 5  # a shared region, 2 x 2 branches
    by_graph = {p.graph.split(" / ", 1)[-1]: [r.weight for r in p.records] for p in plans}
    assert by_graph["repeated_subgraph0"] == ["layers.0.mlp.gate_proj.weight"]
    assert by_graph["true_graph_1"] == ["layers.1.mlp.down_proj.weight"]
    assert by_graph["false_graph_1"] == ["layers.1.mlp.gate_proj.weight"]
    assert all(r.prefetched for r in records)
    (shared,) = [r for r in records if r.note and "shared" in r.note]
    assert "layers.1.mlp.gate_proj.weight" in shared.note


@pytest.mark.compile
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_subclass_parameters_and_argument_fields(target, native_cpu, seen_graphs, fresh_dynamo):
    model = SubclassModel()
    x = torch.randn(4, 16)
    batch = Batch(TwoTensor(x, x.clone()), torch.randn(16, 16))
    plans = _compile_and_run(model, target, batch, torch.randn(16, 16))
    records = _records(plans)
    assert len(records) == _matmuls(seen_graphs)
    assert native_cpu and not _outside(native_cpu, model)
    assert {r.weight for r in records if r.prefetched} == {
        "mlp.gate_proj.weight.a",
        "mlp.gate_proj.weight.b",
    }
    others = [r for r in records if not r.prefetched]
    assert others and all(r.skip_reason == SkipReason.NOT_A_WEIGHT for r in others)
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": target})
    with torch.no_grad(), fxprefetch.collect_stats(per_weight=True) as s:
        compiled(batch, torch.randn(16, 16))  # the inner tensors are named as in the plan
    assert {k: w.calls for k, w in s.per_weight.items()} == {
        "mlp.gate_proj.weight.a": 1,
        "mlp.gate_proj.weight.b": 1,
    }


@pytest.mark.compile
def test_hint_counts_are_what_ran(seen_graphs, fresh_dynamo):
    """Inductor on the CPU counts hints for the taken branch only, and a region called by
    2 layers twice: the same counts the eager target's kernels give."""
    model = CondModel()
    with torch.no_grad():  # inputs whose branches are known: x > 0 stays > 0 in both layers
        for layer in model.layers:
            layer.mlp.gate_proj.weight.abs_()
            layer.mlp.down_proj.weight.abs_()
    x = torch.rand(4, 16) + 1
    counts, records, per_weight = {}, {}, {}
    for target in ("eager", "inductor"):
        torch._dynamo.reset()
        plans = _compile_and_run(model, target, x)  # the first call compiles
        with fxprefetch.collect_stats(per_weight=True) as s:
            _compile_and_run(model, target, x, calls=3)
        counts[target] = (s.calls, s.hints)
        records[target] = len(_records(plans))
        per_weight[target] = {k: w.calls + w.hints for k, w in s.per_weight.items()}
        fxprefetch.clear_plans()
    # per call: the region twice, one branch per layer
    assert counts["inductor"] == (0, 3 * (2 + 2))
    assert counts["eager"] == (3 * (2 + 2), 0)
    assert records == {"eager": 5, "inductor": 5}
    # each run of the shared region counts against the weight its layer passes
    expected = {f"layers.{i}.mlp.{p}_proj.weight": 3 for i in (0, 1) for p in ("gate", "down")}
    assert per_weight == {"eager": expected, "inductor": expected}


def test_unmapped_graph_inputs_are_not_guessed_to_be_weights():
    """A graph whose inputs cannot be mapped to dynamo's sources: no prefetch, and the
    records say why."""
    from support.synthetic import SynthModel, SynthSpec
    from support.tracing import fake_trace

    gm, _ = fake_trace(SynthModel(SynthSpec(layers=1)), torch.randint(0, 64, (1, 4)))
    planner = GraphPlanner(
        CompileSetup(
            fxprefetch.WeightPrefetchConfig(enabled=True), DEFAULT_RULES, pipeline_of("eager")
        ),
        source_names=["a", None],  # fewer sources than the graph has inputs
        record=False,
    )
    (plan,) = [planner(gm).plan]
    assert plan.records and not plan.prefetched
    assert {r.skip_reason for r in plan.records} == {SkipReason.UNKNOWN_SOURCE}
    assert all("cannot map the graph's" in r.note for r in plan.records)


def _hop_graph(hop, args_of) -> GraphModule:
    """A top graph ``(x, w)`` calling ``hop`` on a body ``mm(relu(x), w)`` (never run)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(4, 16), torch.randn(16, 16)
    body = make_fx(lambda x, w: torch.mm(torch.relu(x), w))(x, w)
    graph = torch.fx.Graph()
    px, pw = graph.placeholder("x"), graph.placeholder("w")
    px.meta["val"], pw.meta["val"] = x, w
    attr = graph.get_attr("body_graph")
    graph.output(graph.call_function(hop, args_of(attr, px, pw)))
    gm = GraphModule({"body_graph": body}, graph)
    return gm


@pytest.mark.parametrize(
    ("hop", "args_of", "runs", "skip"),
    [
        (torch.ops.higher_order.invoke_subgraph, lambda b, x, w: (b, "id", x, w), 1, None),
        (torch.ops.higher_order.scan, lambda b, x, w: (b, [x], [w], []), None, "unknown"),
    ],
)
def test_body_inputs_follow_the_call_site_or_are_unknown(hop, args_of, runs, skip):
    """A body input is the weight its call site passes; where the op's operands are not
    mapped (``scan``), nobody can tell, and the record says so."""
    planner = GraphPlanner(
        CompileSetup(
            fxprefetch.WeightPrefetchConfig(enabled=True), DEFAULT_RULES, pipeline_of("eager")
        ),
        source_names=[None, "mlp.gate_proj.weight"],
        record=False,
    )
    planner(_hop_graph(hop, args_of))
    top, body = planner.reports
    assert not top.plan.records and body.runs == runs
    (record,) = body.plan.records
    assert body.plan.graph.endswith(" / body_graph")
    if skip is None:
        assert record.prefetched and record.weight == "mlp.gate_proj.weight"
    else:
        assert record.skip_reason == SkipReason.UNKNOWN_SOURCE
        assert "scan body" in record.note


def _shared_region_graph() -> GraphModule:
    """A top graph ``(x, w0, w1, w2)``: an outer region called with ``w0`` and ``w1``, which
    calls an inner region ``mm(relu(x), w)`` twice; then the inner region with ``w2``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(4, 16), torch.randn(16, 16)
    invoke = torch.ops.higher_order.invoke_subgraph
    inner = make_fx(lambda x, w: torch.mm(torch.relu(x), w))(x, w)

    def graph_of(weights: int, calls: list[tuple[str, int]]) -> torch.fx.Graph:
        graph = torch.fx.Graph()
        ph = [graph.placeholder(n) for n in ["x"] + [f"w{i}" for i in range(weights)]]
        for p in ph:
            p.meta["val"] = x if p.name == "x" else w
        h = ph[0]
        for attr, i in calls:
            h = graph.call_function(invoke, (graph.get_attr(attr), attr, h, ph[1 + i]))
            h.meta["val"] = x
        graph.output(h)
        return graph

    outer = GraphModule({"inner": inner}, graph_of(1, [("inner", 0), ("inner", 0)]))
    top = graph_of(3, [("outer", 0), ("outer", 1), ("inner", 2)])
    return GraphModule({"outer": outer, "inner": inner}, top)


def test_shared_region_runs_count_against_each_call_sites_weight():
    """A body shared by several call sites (nested, too) runs once per call site per run of
    its parent; where its hints are counted per call, each run names its own weight."""
    from fxprefetch.counting import planned_prefetches, with_counting

    names = [None] + [f"layers.{i}.mlp.gate_proj.weight" for i in range(3)]
    planner = GraphPlanner(
        CompileSetup(
            fxprefetch.WeightPrefetchConfig(enabled=True), DEFAULT_RULES, pipeline_of("inductor")
        ),
        source_names=names,
        record=False,
    )
    planner(_shared_region_graph())
    _, *bodies = planner.reports
    (inner,) = [b for b in bodies if b.plan.graph.endswith("/ inner")]
    assert inner.hints_elided and inner.runs == 5
    (record,) = inner.plan.prefetched
    assert record.weight in names  # one call site's; the note names the others
    hinted = [p.weight for p in planned_prefetches(planner, elided=True)]
    assert sorted(hinted) == [names[1], names[1], names[2], names[2], names[3]]
    inputs = [torch.randn(4, 16)] + [torch.randn(16, 16) for _ in range(3)]
    counted = with_counting(lambda *args: None, planner)
    with fxprefetch.collect_stats(per_weight=True) as s:
        counted(*inputs)
    assert {k: w.hints for k, w in s.per_weight.items()} == {
        names[1]: 2,
        names[2]: 2,
        names[3]: 1,
    }


# -- the property ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    region_weight: str  # what the region is called with: "param", "arg", "computed", "field"
    cond: bool
    cond_weight: str  # "param" or "arg"
    subclass: bool
    layers: int


class _GenModel(nn.Module):
    def __init__(self, spec: _Spec) -> None:
        super().__init__()
        self.spec = spec
        self.norm = nn.LayerNorm(16)
        self.layers = nn.ModuleList(_Mlp() for _ in range(spec.layers))
        self.final = _Mlp()  # after the bodies: torch has no TwoTensor rule for their ops
        if spec.subclass:
            w = self.final.down_proj.weight.detach()
            self.final.down_proj.weight = nn.Parameter(TwoTensor(w, w.clone()), requires_grad=False)

    def forward(self, batch: Batch, a):
        spec = self.spec
        x = self.norm(batch.x)
        for mlp in self.layers:
            w = {
                "param": mlp.gate_proj.weight,
                "arg": a,
                "computed": a * 3,
                "field": batch.w,
            }[spec.region_weight]
            x = _region(x, w)
            if spec.cond:
                other = mlp.gate_proj.weight if spec.cond_weight == "param" else a
                x = torch.cond(
                    x.sum() > 0,
                    lambda x, o: F.linear(x.relu(), o),
                    lambda x, o: F.linear(x.sigmoid(), o),
                    (x, other),
                )
            x = mlp.down_proj(F.silu(x))
        return self.final.down_proj(F.silu(x))


_SPECS = st.builds(
    _Spec,
    region_weight=st.sampled_from(["param", "arg", "computed", "field"]),
    cond=st.booleans(),
    cond_weight=st.sampled_from(["param", "arg"]),
    subclass=st.booleans(),
    layers=st.integers(1, 2),
)


@pytest.mark.compile
@settings(max_examples=3, deadline=None)
@given(spec=_SPECS, target=st.sampled_from(["eager", "inductor"]))
@example(
    spec=_Spec("arg", cond=True, cond_weight="arg", subclass=True, layers=2), target="inductor"
)
@example(
    spec=_Spec("computed", cond=True, cond_weight="param", subclass=False, layers=1), target="eager"
)
@example(
    spec=_Spec("field", cond=False, cond_weight="param", subclass=True, layers=2), target="inductor"
)
def test_property_only_parameters_and_one_record_per_matmul(spec, target):
    torch._dynamo.reset()
    fxprefetch.clear_plans()
    seen: list[tuple[int, int]] = []
    graphs: list[GraphModule] = []
    original = GraphPlanner.__call__

    def call(self, gm):
        graphs.append(gm)
        return original(self, gm)

    def record(weight, dependency, max_size, offset):
        seen.append((weight.data_ptr() + offset, min(max_size, weight.nbytes - offset)))

    ops.register_native_prefetch("cpu", record)
    GraphPlanner.__call__ = call
    try:
        torch.manual_seed(0)
        model = _GenModel(spec)
        batch = Batch(torch.randn(4, 16), torch.randn(16, 16))
        plans = _compile_and_run(model, target, batch, torch.randn(16, 16))
    finally:
        GraphPlanner.__call__ = original
        ops._NATIVE_PREFETCH.pop("cpu", None)
        torch._dynamo.reset()
    assert not _outside(seen, model)
    assert len(_records(plans)) == _matmuls(graphs)
    assert any(r.prefetched for r in _records(plans))  # down_proj always has a window


def test_stored_reports_keep_each_runs_weights(tmp_path, monkeypatch):
    """On an inductor cache hit the reports come back from the plan store: with the
    weights each run of a shared body reads."""
    from fxprefetch.plan import store as plan_store

    monkeypatch.setattr(plan_store, "_store_dir", lambda: tmp_path)
    planner = GraphPlanner(
        CompileSetup(
            fxprefetch.WeightPrefetchConfig(enabled=True), DEFAULT_RULES, pipeline_of("inductor")
        ),
        source_names=[None] + [f"layers.{i}.mlp.gate_proj.weight" for i in range(3)],
        record=False,
    )
    planner(_shared_region_graph())
    plan_store.save_plans("key", planner.reports)
    loaded = plan_store.load_plans("key")
    assert loaded is not None
    assert [r.run_names for r in loaded] == [r.run_names for r in planner.reports]
    assert any(len(r.run_names) == 5 for r in loaded)
