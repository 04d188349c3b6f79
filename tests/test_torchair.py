"""The ``npu`` target against torchair's REAL code (tests/support/torchair_real.py), without CANN.

torchair's FX passes, its FX->GE converter (``npu_prefetch`` -> ``Cmo``) and its GE graph
passes (``explicit_order_for_cmo``) run for real; with ``debug.run_eagerly`` torchair then runs
its optimized FX graph eagerly on the CPU. Stand-ins replace only torchair's C extensions and
torch_npu's operator kernels; GE compile and run need CANN and are not reached.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fxprefetch
from fxprefetch.planner import PrefetchPassError
from fxprefetch.presets import build_model, example_inputs, load_config

from support.npu_standins import PREFETCH_CALLS
from support.synthetic import SynthModel, SynthSpec
from support.tracing import swap_passes

pytestmark = pytest.mark.compile
transformers = pytest.importorskip("transformers")

NPU_PREFETCH = "npu.npu_prefetch.default"


def gpt2_tiny() -> nn.Module:
    """GPT-2 style: fused ``c_attn``, Conv1D (``addmm`` with an [in, out] weight)."""
    config = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def qwen3_moe_tiny() -> nn.Module:
    """Experts as batched matmuls: transformers' grouped-mm experts do not convert to GE with
    torchair 2.13.0 (no converter for aten.histc, transformers::grouped_mm_fallback or
    aten.index_put), on an NPU as here."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        load_config("qwen3-moe-tiny"),
        attn_implementation="eager",
        experts_implementation="batched_mm",
    ).eval()


# CPU SDPA lowers to an op GE cannot convert (on an NPU it is an NPU op): eager attention
MODELS = {
    "llama-tiny": lambda: build_model("llama-tiny", attn_implementation="eager"),
    "qwen3-moe-tiny": qwen3_moe_tiny,
    "gpt2-tiny": gpt2_tiny,
}


def synth(layers: int = 1) -> nn.Module:
    return SynthModel(SynthSpec(layers=layers, sdpa=False)).eval()


def run_eagerly_config(torchair: Any, **options: Any) -> Any:
    cfg = torchair.CompilerConfig()
    cfg.debug.run_eagerly = True  # convert to GE, then run the optimized FX graph on the CPU
    for name, value in options.items():
        holder = cfg
        *parents, leaf = name.split(".")
        for parent in parents:
            holder = getattr(holder, parent)
        setattr(holder, leaf, value)
    return cfg


def compile_and_run(
    model: nn.Module, options: dict[str, Any], *, dynamic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``model`` compiled for the npu target and of eager; an HF model gets
    :func:`example_inputs`, any other model one batch of token ids."""
    hf = hasattr(model, "config")
    args, kwargs = ((), example_inputs(model)) if hf else ((torch.randint(0, 64, (1, 4)),), {})
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "npu", **options}, dynamic=dynamic
    )
    PREFETCH_CALLS.clear()
    with torch.no_grad():
        out, expected = compiled(*args, **kwargs), model(*args, **kwargs)
    return (out.logits, expected.logits) if hf else (out, expected)


# -- reading a GE GraphDef ------------------------------------------------------------------


@dataclass(frozen=True)
class Cmo:
    name: str
    data: str  # the GE op whose output is prefetched
    controls: tuple[str, ...]  # GE ops this Cmo waits for
    attrs: dict[str, int]


def cmos(proto: Any) -> list[Cmo]:
    out = []
    for op in proto.op:
        if op.type != "Cmo":
            continue
        data = [i.split(":")[0] for i in op.input if not i.endswith(":-1")]
        controls = tuple(i.split(":")[0] for i in op.input if i.endswith(":-1"))
        attrs = {k: op.attr[k].i for k in ("type", "max_size", "offset") if k in op.attr}
        out.append(Cmo(op.name, data[0], controls, attrs))
    return out


def ge_producers(proto: Any) -> dict[str, str]:
    """FX node name -> name of the GE op that produces its output (torchair's own tags)."""
    producers = {}
    for op in proto.op:
        if op.type == "Data":
            producers.setdefault(op.name, op.name)  # Data ops are named after placeholders
        for desc in op.output_desc:
            tag = desc.attr["_fx_tensor_name"].s.decode() if "_fx_tensor_name" in desc.attr else ""
            if tag:
                producers[tag.split("-", 1)[0]] = op.name
    return producers


def net_output_controls(proto: Any) -> list[str]:
    (out,) = [op for op in proto.op if op.type == "NetOutput"]
    return [i.split(":")[0] for i in out.input if i.endswith(":-1")]


# -- the real conversion, per model ---------------------------------------------------------


# GPT-2 with dynamic shapes makes an ``aten.true_divide.Tensor`` of a symbolic size, which
# torchair 2.13.0 has no GE converter for (without fxprefetch too): static only.
CASES = [(name, dynamic) for name in MODELS for dynamic in (False, True)]
CASES.remove(("gpt2-tiny", True))


@pytest.mark.parametrize(
    ("name", "dynamic"), CASES, ids=[f"{n}-{'dynamic' if d else 'static'}" for n, d in CASES]
)
def test_plans_become_cmo_ops_in_the_ge_graph(name, dynamic, torchair, ge):
    model = MODELS[name]()
    out, expected = compile_and_run(
        model, {"torchair_config": run_eagerly_config(torchair)}, dynamic=dynamic
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    (plan,) = fxprefetch.last_plans()
    (graph,) = ge.graphs
    proto = graph.graph._proto
    assert plan.prefetched, "the model has vector windows: something must be prefetched"

    # one Cmo per prefetched record, in FX order, none for skipped records
    fx_prefetches = [
        n for n in graph.fx_graph.graph.nodes if n.op == "call_function" and str(n.target) ==
        NPU_PREFETCH
    ]  # fmt: skip
    found = cmos(proto)
    assert len(found) == len(fx_prefetches) == len(plan.prefetched)
    position = {n.name: i for i, n in enumerate(fx_prefetches)}
    producers = ge_producers(proto)
    params = dict(model.named_parameters())
    for record in plan.prefetched:
        cmo = found[position[record.prefetch_node]]
        node = fx_prefetches[position[record.prefetch_node]]
        weight_node, dependency_node, max_size = node.args[:3]
        offset = node.args[3] if len(node.args) > 3 else 0
        # max_size and offset equal the plan; type=6 (prefetch) is written when offset is 0
        assert cmo.attrs["max_size"] == max_size == record.prefetch_bytes
        assert cmo.attrs.get("offset", 0) == offset == record.offset
        assert cmo.attrs.get("type", 6) == 6
        # data input: the weight's GE node; control input: the dependency's GE node
        assert cmo.data == producers[weight_node.name]
        assert dependency_node.name == record.dependency
        assert producers[dependency_node.name] in cmo.controls
    # the tensor the converted graph handed to each npu_prefetch is the record's parameter
    ran = sorted((c.data_ptr, c.max_size) for c in PREFETCH_CALLS)
    planned = sorted((params[r.weight].data_ptr(), r.prefetch_bytes) for r in plan.prefetched)
    assert ran == planned and all(c.has_dependency for c in PREFETCH_CALLS)

    # explicit_order_for_cmo: a chain in FX order, and the last Cmo tied to NetOutput
    for before, after in itertools.pairwise(found):
        assert before.name in after.controls
    assert found[-1].name in net_output_controls(proto)


def test_the_loaded_model_def_holds_the_cmo_ops(torchair, ge):
    """Without run_eagerly, the first call hands GE the serialized ModelDef and stops at
    GE compile (CANN): the exact bytes GE would get hold our Cmo ops."""
    from torchair._ge_concrete_graph.ge_ir_pb2 import ModelDef

    from support.torchair_real import GeCompileUnavailableError

    model = build_model("llama-tiny", attn_implementation="eager")
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "npu"})
    with torch.no_grad(), pytest.raises(Exception) as failure:
        compiled(**example_inputs(model))
    assert failure.errisinstance(GeCompileUnavailableError) or "needs CANN" in str(failure.value)
    (plan,) = fxprefetch.last_plans()
    (serialized,) = ge.loaded
    model_def = ModelDef()
    model_def.ParseFromString(serialized)
    (graph_def,) = model_def.graph
    assert sorted(c.attrs["max_size"] for c in cmos(graph_def)) == sorted(
        r.prefetch_bytes for r in plan.prefetched
    )


# -- the user's CompilerConfig ----------------------------------------------------------------


def option_snapshot(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a torchair config: path -> (object id, value); options give their value."""
    out = {}
    for key, value in vars(config).items():
        path = f"{prefix}{key}"
        if hasattr(value, "value") and not callable(value):  # an OptionValue
            out[path] = (id(value), value.value)
        elif hasattr(value, "__dict__") and not callable(value):  # a section of the config
            out |= option_snapshot(value, f"{path}.")
        else:
            out[path] = (id(value), value)
    return out


def test_users_passes_compose_and_their_config_is_unchanged(torchair, ge):
    seen: list[tuple[str, int]] = []

    def count(stage):
        def user_pass(gm, example_inputs, config):
            prefetches = [n for n in gm.graph.nodes if "prefetch" in str(n.target)]
            seen.append((stage, len(prefetches)))

        return user_pass

    cfg = run_eagerly_config(torchair)
    cfg.post_grad_custom_pre_pass = count("pre")
    cfg.post_grad_custom_post_pass = user_post = count("post")
    before = option_snapshot(cfg)
    out, expected = compile_and_run(
        build_model("llama-tiny", attn_implementation="eager"), {"torchair_config": cfg}
    )
    torch.testing.assert_close(out, expected)
    assert seen == [("pre", 0), ("post", 0)]  # the user's passes ran, before ours
    assert option_snapshot(cfg) == before  # not one option object or value changed
    assert cfg.post_grad_custom_post_pass.value is user_post
    (plan,) = fxprefetch.last_plans()
    assert len(cmos(ge.graphs[0].graph._proto)) == len(plan.prefetched) > 0


def test_a_private_copy_shares_no_option_object(torchair):
    from fxprefetch.targets.npu import private_copy

    cfg = torchair.CompilerConfig()
    cfg.post_grad_custom_post_pass = user_pass = lambda gm, inputs, config: None
    copied = private_copy(cfg)
    mine, theirs = option_snapshot(copied), option_snapshot(cfg)
    assert mine.keys() == theirs.keys()
    assert {path: value for path, (_, value) in mine.items()} == {
        path: value for path, (_, value) in theirs.items()
    }
    shared = [p for p in mine if mine[p][0] == theirs[p][0] and not isinstance(mine[p][1], str)]
    assert all(mine[p][1] is None or callable(mine[p][1]) for p in shared), shared
    copied.mode = "reduce-overhead"
    assert cfg.mode.value == "max-autotune" and copied.post_grad_custom_post_pass.value is user_pass
    assert copy.copy(cfg).mode is cfg.mode  # what copy.copy would have done: shared options


def test_single_stream_reads_torchairs_real_option(torchair, caplog):
    """GE options are process-global (torchair refuses a second, different initialization), so
    this checks the composition step on torchair's real config rather than a second compile."""
    from fxprefetch.config import WeightPrefetchConfig
    from fxprefetch.planner import GraphPlanner
    from fxprefetch.targets import make_compile_setup
    from fxprefetch.targets.npu import configure_torchair

    user = run_eagerly_config(torchair, **{"ge_config.enable_single_stream": True})
    config = WeightPrefetchConfig(enabled=True)
    planner = GraphPlanner(make_compile_setup(config, target="npu"), record=False)
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        cfg = configure_torchair(planner, user)
    assert "ge_config.enable_single_stream" in caplog.text
    assert cfg.post_grad_custom_post_pass.value is None  # our pass is not composed
    default = configure_torchair(planner, run_eagerly_config(torchair))
    assert planner.npu_graph_engine  # torchair's default mode builds a GE graph
    assert getattr(default.post_grad_custom_post_pass.value, "fxprefetch", False)
    strict = GraphPlanner(make_compile_setup(config, target="npu", strict=True), record=False)
    with pytest.raises(ValueError, match="enable_single_stream"):
        configure_torchair(strict, user)


# -- modes ------------------------------------------------------------------------------------


def test_mode_reaches_torchair(torchair, ge, monkeypatch):
    """torch.compile refuses mode= with options= for custom backends: call the backend as dynamo
    does. torchair's own backend receives the mode on its config."""
    from fxprefetch.backend import npu_prefetch

    received = []
    real = torchair.get_npu_backend

    def spy(*, compiler_config=None, **kwargs):
        received.append(compiler_config)
        return real(compiler_config=compiler_config, **kwargs)

    monkeypatch.setattr(torchair, "get_npu_backend", spy)
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(synth(), backend=capture)(torch.randint(0, 64, (1, 4)))
    ((gm, ids),) = captured
    cfg = run_eagerly_config(torchair)
    npu_prefetch(gm, ids, {"target": "npu", "torchair_config": cfg}, mode="max-autotune")
    with pytest.raises(Exception, match="import torch_npu"):  # aclgraph needs torch_npu
        npu_prefetch(gm, ids, {"target": "npu"}, mode="reduce-overhead")(*ids)
    assert [c.mode.value for c in received] == ["max-autotune", "reduce-overhead"]
    assert cfg.mode.value == "max-autotune"


def test_reduce_overhead_stops_where_aclgraph_needs_torch_npu(torchair, ge):
    """aclgraph ("reduce-overhead") goes through torchair's AOT set-up, then stops creating
    ``AclConcreteGraph``, which imports torch_npu for ``NPUGraph``: before torchair's FX
    optimizations, so before our pass. This pins where the real code stops without CANN."""
    cfg = run_eagerly_config(torchair, mode="reduce-overhead")
    with pytest.raises(Exception, match=r"(?s)import torch_npu.*reduce-overhead"):
        compile_and_run(synth(), {"torchair_config": cfg})
    assert not fxprefetch.last_plans() and not ge.graphs


def assert_equal_eager(got: Any, model: nn.Module, ids: torch.Tensor) -> None:
    """The decomposed graph's output against eager (float32: to rounding, as without us)."""
    with torch.no_grad():
        torch.testing.assert_close(got[0] if isinstance(got, (tuple, list)) else got, model(ids))


def aclgraph_fx(torchair: Any, model: nn.Module, ids: torch.Tensor, **setup_options: Any):
    """The part of aclgraph mode that runs without torch_npu: torchair's ``_optimize_fx`` with
    mode "reduce-overhead" (no symbolic-input pass), which runs our composed post pass.
    Returns the optimized graph, its real inputs (parameters, then ``ids``) and the plan."""
    from torchair._utils.graph_transform_observer import GraphTransformObserver
    from torchair.npu_fx_compiler import _optimize_fx

    from fxprefetch.config import WeightPrefetchConfig
    from fxprefetch.planner import GraphPlanner
    from fxprefetch.targets import make_compile_setup
    from fxprefetch.targets.npu import configure_torchair

    from support.tracing import fake_trace

    state = dict(model.named_parameters()) | dict(model.named_buffers())
    real = [t.detach() for t in state.values()]  # before tracing (tied weights stay real)
    gm, names = fake_trace(model, ids)
    sources = [names.get(p.name) for p in gm.graph.find_nodes(op="placeholder")]
    setup = make_compile_setup(WeightPrefetchConfig(enabled=True), target="npu", **setup_options)
    planner = GraphPlanner(setup, source_names=sources, record=False)
    cfg = configure_torchair(planner, run_eagerly_config(torchair), mode="reduce-overhead")
    assert not planner.npu_graph_engine  # aclgraph runs the graph's ops when it captures
    _optimize_fx(gm, cfg, GraphTransformObserver(gm, [], cfg))
    (plan,) = planner.plans
    return gm, [*real, ids], plan


def test_aclgraph_forks_each_prefetch_onto_the_prefetch_stream(torchair):
    """torchair ``reduce-overhead`` (aclgraph), on a STAND-IN stream runtime: each prefetch
    node queues, on the compute stream, a wait of the prefetch stream for the compute stream
    (after its dependency ran), then npu_prefetch of its exact bytes on the prefetch stream;
    its join makes the compute stream wait for the prefetch stream before the linear runs.
    One prefetch stream for all; outputs equal eager; the plan records the lowering."""
    from support.npu_standins import StreamEvent, StreamRecorder

    model, ids = synth(layers=2), torch.randint(0, 64, (1, 4))
    with StreamRecorder().installed() as recorder:
        gm, args, plan = aclgraph_fx(torchair, model, ids)
        with torch.no_grad():
            got = recorder.run(gm, *args)
    assert_equal_eager(got, model, ids)
    assert not [n for n in gm.graph.nodes if str(n.target) == NPU_PREFETCH]
    joins = {
        n.meta["fxprefetch"].joins: n.name
        for n in gm.graph.nodes
        if str(n.target) == "fxprefetch.prefetch_join.default"
    }
    weights = dict(model.named_parameters())
    assert len(plan.prefetched) == len(joins) == 4
    assert plan.lowering.startswith("ascend_side_stream")
    side = {1}  # the one prefetch stream of this thread and device (stream 0 computes)
    for record in plan.prefetched:
        assert record.lowering == "ascend_side_stream"
        fork, join = recorder.fork_join(record.prefetch_node, joins[record.prefetch_node])
        ptr = weights[record.weight].data_ptr()
        assert fork == [
            StreamEvent("node", 0, record.prefetch_node),
            StreamEvent("wait", 1, other=0),
            StreamEvent("prefetch", 1, ptr, record.prefetch_bytes),
        ]
        assert join == [StreamEvent("node", 0, joins[record.prefetch_node]),
                        StreamEvent("wait", 0, other=1)]  # fmt: skip
        assert recorder.index("node", record.dependency) < recorder.index("node", fork[0].what)
        assert recorder.index("node", join[0].what) < recorder.index("node", record.node)
        side.add(fork[1].stream)
    assert side == {1} and len(recorder.streams) == 2


def test_aclgraph_joins_a_weight_read_twice_once_per_read(torchair):
    """One layer used twice: each of its two weights is prefetched and joined once per read
    (four forks, four joins, each join before its own linear); outputs equal eager."""
    from support.npu_standins import StreamRecorder

    model, ids = synth(layers=2), torch.randint(0, 64, (1, 4))
    model.layers[1] = model.layers[0]
    with torch.no_grad():
        expected = model(ids)
    with StreamRecorder().installed() as recorder:
        gm, args, plan = aclgraph_fx(torchair, model, ids)
        with torch.no_grad():
            got = recorder.run(gm, *args)
    torch.testing.assert_close(got[0] if isinstance(got, (tuple, list)) else got, expected)
    joins = [n for n in gm.graph.nodes if str(n.target) == "fxprefetch.prefetch_join.default"]
    assert len(plan.prefetched) == len(joins) == 4
    assert len({r.weight for r in plan.prefetched}) == 2
    waits = [e for e in recorder.events if e.kind == "wait"]
    assert sorted((e.stream, e.other) for e in waits) == [(0, 1)] * 4 + [(1, 0)] * 4
    for record in plan.prefetched:
        (join,) = [j for j in joins if j.meta["fxprefetch"].joins == record.prefetch_node]
        assert recorder.index("node", join.name) < recorder.index("node", record.node)


def test_in_stream_keeps_npu_prefetch_in_the_compute_stream(torchair):
    """``ascend_lowering="in_stream"`` (experiments): npu_prefetch with its dependency, in
    the compute stream; no fork, no join, no other stream."""
    from support.npu_standins import StreamRecorder

    model, ids = synth(layers=2), torch.randint(0, 64, (1, 4))
    with StreamRecorder().installed() as recorder:
        gm, args, plan = aclgraph_fx(torchair, model, ids, ascend_lowering="in_stream")
        with torch.no_grad():
            recorder.run(gm, *args)
    lowered = [n for n in gm.graph.nodes if str(n.target) == NPU_PREFETCH]
    assert len(lowered) == len(plan.prefetched) == 4
    assert all(n.args[1] is not None for n in lowered)
    assert {r.lowering for r in plan.prefetched} == {"ascend_in_stream"}
    assert {e.stream for e in recorder.events} == {0} and len(recorder.streams) == 1
    assert [e.kind for e in recorder.events].count("prefetch") == 4


# -- bad input through the real path ----------------------------------------------------------


class HandPrefetch(nn.Module):
    """A model that calls the prefetch op by hand, eager-style, with no dependency."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(32)
        self.up_proj = nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.fxprefetch.prefetch(self.up_proj.weight, None, 1024)
        return self.up_proj(self.norm(x))


def test_a_prefetch_without_dependency_never_reaches_the_converter(torchair, ge, caplog):
    cfg = run_eagerly_config(torchair)
    model, x = HandPrefetch().eval(), torch.randn(2, 32)
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "npu", "torchair_config": cfg}
    )
    with caplog.at_level(logging.WARNING, logger="fxprefetch"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert "needs a dependency" in caplog.text and "compiling it without prefetch" in caplog.text
    (graph,) = ge.graphs  # converted, without any Cmo: torchair's converter never saw it
    assert not cmos(graph.graph._proto)
    (plan,) = fxprefetch.last_plans()
    assert plan.error and "needs a dependency" in plan.error

    torch._dynamo.reset()
    strict = torch.compile(
        model, backend="npu_prefetch",
        options={"target": "npu", "torchair_config": cfg, "strict": True},
    )  # fmt: skip
    with pytest.raises(Exception, match="needs a dependency") as failure, torch.no_grad():
        strict(x)
    assert "NotImplementedError" not in str(failure.value)  # not torchair's converter error


def test_a_failing_pass_falls_back_with_real_torchair(torchair, ge, monkeypatch, caplog):
    from fxprefetch.passes.contract import graph_pass
    from fxprefetch.passes.lower_npu import lower_npu

    @graph_pass(name="plan_prefetches")
    def broken(gm, ctx):
        raise RuntimeError("synthetic pass failure")

    swap_passes(monkeypatch, "npu", (broken, lower_npu))
    cfg = run_eagerly_config(torchair)
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        out, expected = compile_and_run(synth(), {"torchair_config": cfg})
    torch.testing.assert_close(out, expected)
    assert "synthetic pass failure" in caplog.text
    (graph,) = ge.graphs
    assert not cmos(graph.graph._proto) and not PREFETCH_CALLS
    torch._dynamo.reset()
    with pytest.raises(PrefetchPassError, match="synthetic pass failure"):
        try:
            compile_and_run(synth(), {"torchair_config": cfg, "strict": True})
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise exc.inner_exception from exc


def test_torchair_backend_builder(torchair, ge):
    backend = fxprefetch.torchair_backend(
        {"prefetch_ratio": {"attn": {"qkv": 0.5}}}, run_eagerly_config(torchair)
    )
    model = synth()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 64, (1, 4)))
    sizes = sorted(c.attrs["max_size"] for c in cmos(ge.graphs[0].graph._proto))
    assert sizes == sorted([int(0.5 * 96 * 32 * 4), 128 * 32 * 4])
