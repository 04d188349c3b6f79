"""vLLM's fused MoE: gate/up prefetched by layer name, and token bounds (FX level, no vLLM).

STAND-IN: ``vllm::moe_forward`` is defined with vLLM 0.32's exact schema and a trivial kernel
(as in tests/vllm/test_vllm_ops.py), so graphs hold the node vLLM's do. The layers live in a
stand-in static forward context (a dict, as in ``compilation_config.static_forward_context``);
the run-time lookup, which vLLM does in its forward context, reads the same dict here.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from fxprefetch import WeightPrefetchConfig, ops
from fxprefetch.config import DEFAULT_MAX_PREFETCH_BYTES, TokenRange
from fxprefetch.devices import DeviceSetup
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.graph_utils import prefetch_nodes
from fxprefetch.passes.analysis.prefetch_meta import join_meta
from fxprefetch.passes.strip_prefetch import strip_prefetch
from fxprefetch.pipeline import PassContext, run_pipeline
from fxprefetch.plan import SkipReason

from support.tracing import pipeline_of

vllm_moe = pytest.importorskip("fxprefetch.vllm.moe")

EXPERTS, HIDDEN, INTER = 4, 16, 8
GUIDE_MOE = {
    "enabled": True,
    "prefetch_ratio": {"attn": {"qkv": 1.0, "o": 1.0}, "moe": {"gate_up": 0.8}},
}


@pytest.fixture(scope="module")
def moe_op():
    if hasattr(torch.ops.vllm, "moe_forward"):
        yield
        return
    lib = torch.library.Library("vllm", "FRAGMENT")
    lib.define(
        "moe_forward(Tensor(a0!) hidden_states, Tensor router_logits, "
        "Tensor? shared_experts_input, Tensor? input_ids, str layer_name, "
        "SymInt hidden_dim_unpadded) -> Tensor"
    )
    lib.impl("moe_forward", lambda h, *rest: h * 2, "CompositeExplicitAutograd")
    yield
    del lib


class RoutedExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(torch.randn(EXPERTS, 2 * INTER, HIDDEN))
        self.w2_weight = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER))


class MoERunner(nn.Module):
    """What vLLM 0.32 registers under the layer name: its ``routed_experts`` owns w13."""

    def __init__(self) -> None:
        super().__init__()
        self.routed_experts = RoutedExperts()


class Block(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(HIDDEN)
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.layer_name = f"model.layers.{i}.mlp.experts"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        logits = self.gate(h)
        return x + torch.ops.vllm.moe_forward(h.clone(), logits, None, None, self.layer_name, 0)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(i) for i in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x)) @ torch.eye(HIDDEN)  # a barrier between the layers
        return x


class StandInConfig:
    """The part of a ``VllmConfig`` the source reads."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.compilation_config = type("CC", (), {"static_forward_context": layers})()


@pytest.fixture
def context(moe_op, monkeypatch):
    """The static forward context, the run-time lookup reading it, and a recording prefetch."""
    layers = {f"model.layers.{i}.mlp.experts": MoERunner() for i in range(2)}
    monkeypatch.setattr(vllm_moe, "_runtime_layer", lambda name: layers[name])
    seen: list[tuple[int, int]] = []
    monkeypatch.setitem(
        ops._NATIVE_PREFETCH,
        "cpu",
        lambda w, dep, size, offset: seen.append((w.untyped_storage().data_ptr(), size)),
    )
    return layers, seen


CPU = frozenset({"cpu"})
CPU_NATIVE = DeviceSetup(native=CPU)


def _pipeline(gm, config, layers, target="eager", devices=CPU_NATIVE, **kw):
    ctx = PassContext(
        config=WeightPrefetchConfig.from_dict(config),
        rules=DEFAULT_RULES,
        graph_name="g",
        devices=devices,
        hidden_weights=vllm_moe.VllmMoeWeights(StandInConfig(layers)),
        **kw,
    )
    return run_pipeline(gm, pipeline_of(target), ctx).plan


def _trace(tokens: int):
    from support.tracing import fake_trace

    model = Model()
    gm, names = fake_trace(model, torch.randn(tokens, HIDDEN))
    return model, gm, names


def _w13(layer: nn.Module) -> torch.Tensor:
    return layer.routed_experts.w13_weight


def test_gate_up_of_the_fused_moe_is_prefetched_by_layer_name_behind_the_gating_window(context):
    layers, seen = context
    model, gm, _ = _trace(4)
    plan = _pipeline(gm, GUIDE_MOE, layers)
    done = plan.by_role("moe.gate_up")
    assert [r.weight for r in done] == [
        f"model.layers.{i}.mlp.experts.routed_experts.w13_weight" for i in range(2)
    ]
    nbytes = EXPERTS * 2 * INTER * HIDDEN * 4
    for record in done:
        assert record.prefetched and record.op == "vllm::moe_forward"
        assert record.weight_bytes == nbytes and record.weight_shape == (EXPERTS, 2 * INTER, HIDDEN)
        assert record.prefetch_bytes == min(int(0.8 * nbytes), DEFAULT_MAX_PREFETCH_BYTES)
        # the window is the norm's vector work; the router matmul runs after the prefetch too
        assert record.window and record.dependency_position < record.position
        assert "found by layer name" in record.note
    # the graph names each layer and holds no expert weight: it pickles, strings only
    nodes = prefetch_nodes(gm.graph)
    assert [n.args[:2] for n in nodes] == [
        (f"model.layers.{i}.mlp.experts", "routed_experts.w13_weight") for i in range(2)
    ]
    assert not any(isinstance(a, torch.Tensor) for n in nodes for a in n.args)
    again = pickle.loads(pickle.dumps(gm))
    assert "prefetch_layer_weight" in again.code and not dict(again.named_parameters())
    # run: each prefetch reached its own layer's weight storage, outputs unchanged
    x = torch.randn(4, HIDDEN)
    params = dict(model.named_parameters())
    with torch.no_grad():
        out = gm(params, x)
        torch.testing.assert_close(out, model(x))
    assert seen == [
        (
            _w13(layers[f"model.layers.{i}.mlp.experts"]).untyped_storage().data_ptr(),
            r.prefetch_bytes,
        )
        for i, r in enumerate(done)
    ]


def test_without_a_source_the_fused_moe_stays_recorded_as_hidden(moe_op):
    _, gm, _ = _trace(4)
    ctx = PassContext(WeightPrefetchConfig.from_dict(GUIDE_MOE), DEFAULT_RULES, "g")
    plan = run_pipeline(gm, pipeline_of("eager"), ctx).plan
    hidden = plan.by_role("moe.gate_up")
    assert len(hidden) == 2 and all(r.skip_reason == SkipReason.HIDDEN_WEIGHTS for r in hidden)
    assert not prefetch_nodes(gm.graph)


def test_a_layer_missing_from_the_context_is_recorded_with_why(context):
    layers, _ = context
    _, gm, _ = _trace(4)
    plan = _pipeline(gm, GUIDE_MOE, {k: v for k, v in layers.items() if ".0." in k})
    first, second = plan.by_role("moe.gate_up")
    assert first.prefetched and second.skip_reason == SkipReason.HIDDEN_WEIGHTS
    assert "'model.layers.1.mlp.experts' is not in vLLM's static forward context" in second.note


def test_a_graph_reused_for_another_layer_prefetches_that_layers_weight(context):
    """vLLM hoists layer names into graph inputs (LayerName, torch >= 2.11), and reuses one
    compiled graph for identical layers, or serves it from its compile cache: the prefetch
    takes the same graph value as the fused op, so it finds the layer it runs for."""
    layers, seen = context
    model, gm, names = _trace(4)
    graph = gm.graph
    first = next(iter(graph.find_nodes(op="placeholder")))
    moes = [n for n in graph.nodes if getattr(n.target, "__name__", "") == "moe_forward.default"]
    for i, moe in enumerate(moes):
        with graph.inserting_before(first):
            name = graph.placeholder(f"layer_name_{i}")
        name.meta["val"] = f"model.layers.{i}.mlp.experts"
        moe.args = (*moe.args[:4], name, *moe.args[5:])
    graph._codegen = torch.fx.graph.CodeGen()  # flat inputs: the names, then the tensors
    gm.recompile()
    plan = _pipeline(gm, GUIDE_MOE, layers)
    assert len(plan.prefetched) == 2
    x = torch.randn(4, HIDDEN)
    with torch.no_grad():  # run layer 0's graph slot with layer 1's name, and the reverse
        names = ["model.layers.1.mlp.experts", "model.layers.0.mlp.experts"]
        gm(*names, *dict(model.named_parameters()).values(), x)
    ptr = {k: _w13(v).untyped_storage().data_ptr() for k, v in layers.items()}
    assert [p for p, _ in seen] == [
        ptr["model.layers.1.mlp.experts"],
        ptr["model.layers.0.mlp.experts"],
    ]


class AttnBlock(Block):
    """A block whose norm also feeds a plain linear of a role (attn.qkv): a graph with both a
    plain prefetch, lowered to the native side-stream fork, and by-name prefetches."""

    def __init__(self, i: int) -> None:
        super().__init__(i)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        moe = torch.ops.vllm.moe_forward(h.clone(), self.gate(h), None, None, self.layer_name, 0)
        return x + moe + self.self_attn.qkv_proj(torch.relu(h))


@pytest.fixture
def cpu_side_stream(monkeypatch):
    """The CPU standing in for a device whose plain prefetches fork onto a side stream."""
    events: list[tuple[str, int]] = []
    prepared: list[torch.device] = []
    monkeypatch.setitem(
        ops._NATIVE_L2,
        "cpu",
        ops.NativeL2(
            lambda w, *_: events.append(("fork", w.untyped_storage().data_ptr())),
            lambda w: events.append(("join", w.untyped_storage().data_ptr())),
            prepared.append,
        ),
    )
    return events, prepared


def test_by_name_prefetches_run_on_the_compute_stream_and_need_no_join(context, cpu_side_stream):
    """Where plain prefetches fork onto a side stream (main's token fork/join), the by-name
    prefetches stay ``prefetch_layer_weight``: their kernel prefetches on the compute stream
    (legal under CUDA-graph capture), so no join is inserted for them; every fork still has
    exactly one join, and the device was prepared before any capture."""
    from fxprefetch.ops import JOIN_OP, NATIVE_OP

    layers, seen = context
    events, prepared = cpu_side_stream
    model = Model()
    model.layers = nn.ModuleList(AttnBlock(i) for i in range(2))
    from support.tracing import fake_trace

    gm, names = fake_trace(model, torch.randn(4, HIDDEN))
    plan = _pipeline(
        gm,
        GUIDE_MOE,
        layers,
        target="inductor",
        weight_names=names,
        devices=DeviceSetup(native=CPU, l2=CPU, joins=CPU),
    )
    gm.recompile()
    assert len(plan.by_role("moe.gate_up")) == len(plan.by_role("attn.qkv")) == 2 and all(
        r.prefetched for r in plan.by_role("attn.qkv") + plan.by_role("moe.gate_up")
    )
    by_name = [n for n in gm.graph.nodes if n.target is vllm_moe.LAYER_OP]
    forks = list(gm.graph.find_nodes(op="call_function", target=NATIVE_OP))
    joins = list(gm.graph.find_nodes(op="call_function", target=JOIN_OP))
    assert len(by_name) == 2 and len(forks) == len(joins) == 2
    assert {join_meta(j).joins for j in joins} == {f.name for f in forks}
    assert all(f.args[4] == "side" for f in forks)
    assert prepared == [torch.device("cpu")]
    with torch.no_grad():
        torch.testing.assert_close(
            gm(dict(model.named_parameters()), (x := torch.randn(4, HIDDEN))), model(x)
        )
    qkv = {m.self_attn.qkv_proj.weight.untyped_storage().data_ptr() for m in model.layers}
    assert [k for k, _ in events] == ["fork", "join"] * 2 and {p for _, p in events} == qkv
    ptr = {k: _w13(v).untyped_storage().data_ptr() for k, v in layers.items()}
    assert [p for p, _ in seen] == [ptr[f"model.layers.{i}.mlp.experts"] for i in range(2)]
    # a graph whose only prefetches are by name still readies the device before any capture
    prepared.clear()
    _, gm, names = _trace(4)
    _pipeline(gm, GUIDE_MOE, layers, target="inductor", devices=DeviceSetup(native=CPU, l2=CPU))
    assert not list(gm.graph.find_nodes(op="call_function", target=NATIVE_OP))
    assert prepared == [torch.device("cpu")]


BOUNDED = {**GUIDE_MOE, "token_range": {"moe": {"gate_up": {"min_tokens": 96}}}}


@pytest.mark.parametrize(
    ("tokens", "prefetched"), [(4, False), (95, False), (96, True), (128, True)]
)
def test_token_bounds_on_a_static_graph_are_decided_once(context, tokens, prefetched):
    layers, _ = context
    _, gm, _ = _trace(tokens)
    plan = _pipeline(gm, BOUNDED, layers)
    for record in plan.by_role("moe.gate_up"):
        assert (
            record.tokens == str(tokens) and record.min_tokens == 96 and record.max_tokens is None
        )
        assert record.token_check == "graph"
        assert record.prefetched is prefetched
        if not prefetched:
            assert record.skip_reason == SkipReason.OUTSIDE_TOKEN_RANGE
    assert all(
        n.target is vllm_moe.LAYER_OP and n.args[-3:] == (0, 0, -1)
        for n in prefetch_nodes(gm.graph)
    )


def test_the_plan_json_carries_the_token_range(context):
    layers, _ = context
    _, gm, _ = _trace(128)
    plan = _pipeline(gm, BOUNDED, layers)
    from fxprefetch.plan import PrefetchPlan

    data = plan.to_dict()
    assert data["schema_version"] == 3
    moe = [r for r in data["linears"] if r["role"] == "moe.gate_up"]
    assert {(r["min_tokens"], r["max_tokens"], r["token_check"]) for r in moe} == {
        (96, None, "graph")
    }
    assert PrefetchPlan.from_dict(data).records == plan.records
    v1 = {
        **data,
        "schema_version": 1,
        "linears": [
            {
                k: v
                for k, v in r.items()
                if k not in ("tokens", "min_tokens", "max_tokens", "token_check")
            }
            for r in data["linears"]
        ],
    }
    assert len(PrefetchPlan.from_dict(v1).records) == len(plan.records)


def _inductor_backend(config: dict, layers: dict, compiles: list):
    """torch.compile backend: the inductor target with the stand-in source, counting compiles."""
    from fxprefetch.devices import DeviceSetup
    from fxprefetch.planner import GraphPlanner
    from fxprefetch.targets import make_compile_setup
    from fxprefetch.targets.inductor import compile_inductor

    def backend(gm, example_inputs):
        setup = make_compile_setup(
            WeightPrefetchConfig.from_dict(config),
            target="inductor",
            devices=DeviceSetup(native=frozenset({"cpu"})),
        )
        planner = GraphPlanner(
            setup,
            hidden_weights=vllm_moe.VllmMoeWeights(StandInConfig(layers)),
            record=False,
        )
        compiles.append(planner)
        return compile_inductor(gm, example_inputs, planner)

    return backend


@pytest.mark.compile
def test_token_bounds_on_a_dynamic_graph_are_checked_at_run_time_without_recompiles(
    context, fresh_dynamo
):
    """One compile serves every token count; the prefetch runs only from 96 tokens. The
    fused MoE's by-name prefetch goes through inductor's real lowering and scheduler."""
    layers, seen = context
    model = Model()
    counts = (4, 100, 8, 96, 95, 200)
    runs: dict[str, list[int]] = {}
    for name, config in (("unbounded", GUIDE_MOE), ("bounded", BOUNDED)):
        torch._dynamo.reset()
        compiles: list = []
        compiled = torch.compile(
            model, backend=_inductor_backend(config, layers, compiles), dynamic=True
        )
        per_call = []
        for tokens in counts:
            x = torch.randn(tokens, HIDDEN)
            before = len(seen)
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), model(x))
            per_call.append(len(seen) - before)
        runs[name] = per_call
        assert len(compiles) == 1, f"{name}: {len(compiles)} compiles"  # no guard, no recompile
        (plan,) = compiles[0].plans
        moe = plan.by_role("moe.gate_up")
        assert len(moe) == 2 and all(r.prefetched for r in moe)
        if name == "bounded":
            assert {(r.min_tokens, r.max_tokens, r.token_check) for r in moe} == {
                (96, None, "run time")
            }
            assert all(r.tokens and r.tokens.startswith("s") for r in moe)  # symbolic
    assert runs["unbounded"] == [2] * len(counts)
    assert runs["bounded"] == [2 * (t >= 96) for t in counts]


def test_a_compile_range_decides_a_symbolic_count_once(context):
    """vLLM compiles a graph per token range (its pass context's compile range): where the
    range lies inside or outside the bounds, the graph needs no run-time check."""
    from torch.fx.experimental.proxy_tensor import make_fx

    layers, _ = context
    model = Model()
    state = dict(model.named_parameters())

    def call(params, x):
        return torch.func.functional_call(model, params, (x,))

    for graph_tokens, expected in (
        (TokenRange(1, 64), "never"),
        (TokenRange(96, 512), "always"),
        (TokenRange(1, 512), "run time"),
    ):
        gm = make_fx(call, tracing_mode="symbolic", record_module_stack=True)(
            state, torch.randn(128, HIDDEN)
        )
        before = [n.name for n in gm.graph.nodes]
        plan = _pipeline(gm, BOUNDED, layers, graph_tokens=graph_tokens)
        moe = plan.by_role("moe.gate_up")
        nodes = prefetch_nodes(gm.graph)
        if expected == "never":
            assert all(r.skip_reason == SkipReason.OUTSIDE_TOKEN_RANGE for r in moe) and not nodes
        elif expected == "always":
            assert all(r.prefetched and r.token_check == "graph" for r in moe)
            assert [n.args[-3:] for n in nodes] == [(0, 0, -1)] * 2
        else:
            assert all(r.prefetched and r.token_check == "run time" for r in moe)
            assert all(
                isinstance(n.args[-3], torch.fx.Node) and n.args[-2:] == (96, -1) for n in nodes
            )
            # stripping leaves the graph the pass found: the token counts go with the prefetches
            assert len(gm.graph.nodes) > len(before) + len(nodes)
            assert strip_prefetch(gm) == 2 and [n.name for n in gm.graph.nodes] == before


def test_a_by_name_prefetch_that_fails_is_skipped_and_counted(caplog):
    """No layer of that name in the forward context (or any other failure): the model runs on."""
    import fxprefetch

    with fxprefetch.collect_stats() as s, caplog.at_level("WARNING", logger="fxprefetch.ops"):
        vllm_moe.LAYER_OP("model.layers.0.mlp.experts", "w13_weight", None, 16, 0, 8, 0, -1)
    assert (s.failed, s.calls) == (1, 0)
    assert "prefetch_layer_weight failed and was skipped" in caplog.text


def test_the_fused_moe_and_transformers_grouped_mm_count_the_same_tokens(context):
    """One config (experts from 96 tokens), 64 tokens routed top-2: vLLM's fused MoE and
    transformers' grouped_mm experts (128 token-expert rows) both count 64 and skip."""
    from support.planning import hf_moe_plan

    layers, _ = context
    _, gm, _ = _trace(64)
    fused = _pipeline(gm, BOUNDED, layers).by_role("moe.gate_up")
    grouped = hf_moe_plan(64, "grouped_mm").by_role("moe.gate_up")
    for records in (fused, grouped):
        assert len(records) == 2
        assert {(r.tokens, r.prefetched, r.skip_reason) for r in records} == {
            ("64", False, SkipReason.OUTSIDE_TOKEN_RANGE)
        }


# -- Ascend's prefetch stream: the run-time prefetches fork and join too (STAND-IN runtime) ----

ASCEND_BOUNDED = {  # a compile range that straddles both bounds: both are checked at run time
    **GUIDE_MOE,
    "token_range": {"moe": {"gate_up": {"min_tokens": 96}}, "attn": {"qkv": {"max_tokens": 64}}},
}


@pytest.mark.parametrize("tokens", [4, 128])
def test_ascend_run_time_prefetches_fork_onto_the_prefetch_stream(context, tokens):
    """A captured Ascend graph (aclgraph / npugraph_ex lowering) on a symbolic token count,
    run on the STAND-IN stream runtime: the token-range prefetch (attn.qkv, up to 64 tokens)
    and the by-name MoE prefetch (``vllm::moe_forward``'s gate/up, from 96 tokens) each fork
    onto the prefetch stream after their dependency ran and are joined before their consumer;
    out of range the fork and join still happen but no byte is issued. Outputs equal eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    from fxprefetch.ops import JOIN_OP

    from support.npu_standins import StreamEvent, StreamRecorder

    layers, _ = context
    model = Model()
    model.layers = nn.ModuleList(AttnBlock(i) for i in range(2))
    state = dict(model.named_parameters())

    def call(params, x):
        return torch.func.functional_call(model, params, (x,))

    shapes = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    fake_x = shapes.from_tensor(torch.randn(128, HIDDEN), symbolic_context=dynamic)
    fake_state = {k: shapes.from_tensor(v, static_shapes=True) for k, v in state.items()}
    with StreamRecorder().installed() as recorder:
        gm = make_fx(call, tracing_mode="fake", record_module_stack=True)(fake_state, fake_x)
        params = [p.name for p in gm.graph.find_nodes(op="placeholder")][: len(state)]
        names = dict(zip(params, state, strict=True))
        plan = _pipeline(
            gm,
            ASCEND_BOUNDED,
            layers,
            target="npu",
            weight_names=names,
            graph_tokens=TokenRange(1, 512),
        )
        gm.recompile()
        x = torch.randn(tokens, HIDDEN)
        with torch.no_grad():
            got = recorder.run(gm, *state.values(), x)
            torch.testing.assert_close(got, model(x))
    records = plan.by_role("moe.gate_up") + plan.by_role("attn.qkv")
    assert len(records) == 4 and all(r.prefetched for r in records)
    inputs = {p.name for p in gm.graph.find_nodes(op="placeholder")}
    assert {(r.lowering, r.token_check) for r in records} == {("ascend_side_stream", "run time")}
    joins = {
        join_meta(n).joins: n.name for n in gm.graph.find_nodes(op="call_function", target=JOIN_OP)
    }
    assert len(joins) == 4
    weights = {f"{k}.routed_experts.w13_weight": _w13(v) for k, v in layers.items()} | state
    for record in records:
        in_range = tokens >= 96 if record.role == "moe.gate_up" else tokens <= 64
        fork, join = recorder.fork_join(record.prefetch_node, joins[record.prefetch_node])
        issued = [
            StreamEvent("prefetch", 1, weights[record.weight].data_ptr(), record.prefetch_bytes)
        ]
        assert fork == [
            StreamEvent("node", 0, record.prefetch_node),
            StreamEvent("wait", 1, other=0),
            *(issued if in_range else []),
        ], record.role
        assert join == [StreamEvent("node", 0, joins[record.prefetch_node]),
                        StreamEvent("wait", 0, other=1)]  # fmt: skip
        if record.dependency not in inputs:  # a graph input is there before any node
            assert recorder.index("node", record.dependency) < recorder.index(
                "node", record.prefetch_node
            )
        assert recorder.index("node", join[0].what) < recorder.index("node", record.node)
    assert len(recorder.streams) == 2
    # the invariants know the by-name fork: without its join it is caught
    from fxprefetch.passes.invariants import InvariantError, check_invariants

    fork = next(n for n in gm.graph.nodes if n.target is vllm_moe.LAYER_FORK_OP)
    gm.graph.erase_node({n.name: n for n in gm.graph.nodes}[joins[fork.name]])
    ctx = PassContext(WeightPrefetchConfig(enabled=True), DEFAULT_RULES, "g")
    with pytest.raises(InvariantError, match=f"{fork.name} forks onto the side stream with 0"):
        check_invariants(gm, ctx, pipeline_of("npu").passes)


def test_a_by_name_fork_that_fails_is_skipped_and_counted(caplog):
    """The by-name fork finds no layer: no fork, counted as failed, the model runs on; the
    join after it then waits for nothing (no fork is open)."""
    import fxprefetch
    from fxprefetch.devices import npu_streams

    from support.npu_standins import StreamRecorder

    token = torch.empty(0, dtype=torch.uint8)
    with StreamRecorder().installed() as recorder, fxprefetch.collect_stats() as s:
        with caplog.at_level("WARNING", logger="fxprefetch.ops"):
            vllm_moe.LAYER_FORK_OP(
                "model.layers.0.mlp.experts", "w13_weight", [token], 16, 0, "side", "none", 8, 0, -1
            )
        torch.ops.fxprefetch.prefetch_join(token, [token])
        assert npu_streams.open_forks(token.device) == 0
    assert (s.failed, s.calls) == (1, 0) and recorder.events == []
    assert "prefetch_layer_weight_fork failed and was skipped" in caplog.text
