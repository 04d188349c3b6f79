"""torch.ops.fxprefetch.prefetch: schema, checks, kernels, counters, and survival of every
compiler stage (FX DCE, AOT autograd, inductor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxprefetch
from fxprefetch import ops, runtime_stats

PREFETCH = torch.ops.fxprefetch.prefetch.default


def _npu_schema(name: str) -> str:
    for line in (Path(__file__).parent / "data" / "torch_npu_schemas.txt").read_text().splitlines():
        if line.startswith(f"{name}("):
            return line
    raise AssertionError(name)


def _signature(schema: torch._C.FunctionSchema) -> list[tuple[str, str, object]]:
    return [(str(a.type), a.name, a.default_value) for a in schema.arguments]


def test_schema_matches_torch_npu_npu_prefetch():
    """Same argument types, order, defaults and returns: lowering only changes the target."""
    ours = PREFETCH._schema
    theirs = torch._C.parse_schema("npu::" + _npu_schema("npu_prefetch"))
    assert [a[0] for a in _signature(ours)] == [a[0] for a in _signature(theirs)]
    assert _signature(ours)[1:] == _signature(theirs)[1:]  # torch_npu names the first "self"
    assert len(ours.returns) == len(theirs.returns) == 0
    assert str(ours) == (
        "fxprefetch::prefetch(Tensor weight, Tensor? dependency, int max_size, int offset=0) -> ()"
    )


@pytest.mark.parametrize(
    ("max_size", "offset", "message"),
    [
        (0, 0, "max_size must be > 0"),
        (-5, 0, "max_size must be > 0"),
        (8, -1, "offset must be in"),
        (8, 64, "offset must be in"),
    ],
)
def test_argument_checks(max_size, offset, message):
    w = torch.zeros(4, 4)  # 64 bytes
    with pytest.raises(RuntimeError, match=message):
        PREFETCH(w, None, max_size, offset)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        PREFETCH(mode.from_tensor(w), None, max_size, offset)
    with pytest.raises(RuntimeError, match=message):
        PREFETCH(torch.zeros(4, 4, device="meta"), None, max_size, offset)
    assert fxprefetch.stats().calls == 0


def test_size_is_clamped_to_the_tensor_and_counted():
    w = torch.zeros(16, dtype=torch.int8)  # 16 bytes
    dep = torch.ones(2)
    PREFETCH(w, dep, 10)
    PREFETCH(w, None, 100)
    PREFETCH(w, None, 100, 12)
    s = fxprefetch.stats()
    assert (s.calls, s.bytes_requested, s.bytes_prefetched) == (3, 210, 10 + 16 + 4)
    fxprefetch.reset_stats()
    assert fxprefetch.stats().calls == 0


def test_meta_kernel_checks_only():
    PREFETCH(torch.empty(1024, device="meta"), None, 10)
    assert fxprefetch.stats().calls == 0


def test_collect_stats_per_weight_names_from_the_graph_call():
    a, b = torch.zeros(8), torch.zeros(4, dtype=torch.float16)
    PREFETCH(a, None, 8)
    with fxprefetch.collect_stats(per_weight=True) as s:
        with runtime_stats.naming({a.data_ptr(): "layers.0.q_proj.weight"}):
            PREFETCH(a, None, 16)
            PREFETCH(a, None, 64)
        PREFETCH(b, None, 4)
    assert s.calls == 3 and s.bytes_requested == 84 and s.bytes_prefetched == 16 + 32 + 4
    named = s.per_weight["layers.0.q_proj.weight"]
    assert (named.calls, named.bytes_prefetched, named.shape) == (2, 16 + 32, (8,))
    (other,) = (w for k, w in s.per_weight.items() if k != "layers.0.q_proj.weight")
    assert other.dtype == "torch.float16" and other.calls == 1
    assert fxprefetch.stats().calls == 4  # process totals count outside the block too


# -- stats: nested blocks, resets, threads and per-weight names ----------------------------------


def test_nested_blocks_each_count_their_own_span():
    a, b = torch.zeros(8), torch.zeros(8)
    with fxprefetch.collect_stats(per_weight=True) as outer:
        with runtime_stats.naming({a.data_ptr(): "a"}):
            PREFETCH(a, None, 8)
        with (
            fxprefetch.collect_stats(per_weight=True) as inner,
            runtime_stats.naming({b.data_ptr(): "b"}),
        ):
            PREFETCH(b, None, 8)
        with runtime_stats.naming({a.data_ptr(): "a"}):
            PREFETCH(a, None, 8)
    assert inner.calls == 1 and set(inner.per_weight) == {"b"}
    assert outer.calls == 3 and outer.per_weight["a"].calls == 2
    assert outer.per_weight["b"].calls == 1


def test_reset_inside_a_block_never_gives_negative_counts():
    w = torch.zeros(8)
    with fxprefetch.collect_stats() as s:
        PREFETCH(w, None, 8)
        fxprefetch.reset_stats()
        PREFETCH(w, None, 8)
    assert s.calls == 2 and s.bytes_requested == 16
    assert fxprefetch.stats().calls == 1  # the process counters were reset in between


def test_stats_outside_a_block_carry_no_per_weight_data():
    w = torch.zeros(8)
    with fxprefetch.collect_stats(per_weight=True) as s:
        PREFETCH(w, None, 8)
    assert len(s.per_weight) == 1
    assert fxprefetch.stats().per_weight == {} and fxprefetch.stats().calls == 1


def test_another_threads_prefetches_stay_out_of_the_block():
    import threading

    w = torch.zeros(8)
    started, release = threading.Event(), threading.Event()

    def other() -> None:
        started.set()
        release.wait(5)
        for _ in range(5):
            PREFETCH(w, None, 8)

    thread = threading.Thread(target=other)
    thread.start()
    started.wait(5)
    with fxprefetch.collect_stats() as mine:
        release.set()
        thread.join(5)
        PREFETCH(w, None, 8)
    assert mine.calls == 1
    assert fxprefetch.stats().calls == 6  # process-wide: every thread


def test_two_tensors_with_one_name_stay_apart():
    a, b = torch.zeros(8), torch.zeros(8)
    with fxprefetch.collect_stats(per_weight=True) as s:
        with runtime_stats.naming({a.data_ptr(): "layers.0.q_proj.weight"}):
            PREFETCH(a, None, 8)
        with runtime_stats.naming({b.data_ptr(): "layers.0.q_proj.weight"}):
            PREFETCH(b, None, 8)
            PREFETCH(b, None, 8)
    assert len(s.per_weight) == 2
    assert sorted(w.calls for w in s.per_weight.values()) == [1, 2]
    assert "layers.0.q_proj.weight" in s.per_weight


def test_native_prefetch_is_called_for_its_device():
    seen = []
    ops.register_native_prefetch("cpu", lambda *a: seen.append(a[2:]))
    try:
        assert ops.has_native_prefetch("cpu") and "cpu" in ops.native_prefetch_devices()
        PREFETCH(torch.zeros(8), None, 16, 4)
    finally:
        ops._NATIVE_PREFETCH.pop("cpu")
    assert seen == [(16, 4)]
    assert fxprefetch.stats().calls == 1
    assert not ops.has_native_prefetch("cpu")


def _graph_with_unused_prefetch() -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    w, x = g.placeholder("w"), g.placeholder("x")
    relu = g.call_function(torch.ops.aten.relu.default, (x,))
    g.call_function(PREFETCH, (w, relu, 64))
    mm = g.call_function(torch.ops.aten.mm.default, (relu, w))
    g.output(mm)
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_survives_fx_dead_code_elimination():
    gm = _graph_with_unused_prefetch()
    gm.graph.eliminate_dead_code()
    assert len(gm.graph.find_nodes(op="call_function", target=PREFETCH)) == 1
    gm.recompile()
    gm(torch.zeros(4, 4), torch.ones(2, 4))
    assert fxprefetch.stats().calls == 1


def test_survives_aot_autograd():
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def f(w, x):
        y = torch.relu(x)
        PREFETCH(w, y, 32)
        return y @ w

    w = torch.randn(4, 4, requires_grad=True)
    out = aot_function(f, fw_compiler=keep, bw_compiler=keep)(w, torch.randn(2, 4))
    out.sum().backward()
    assert len(graphs[0].graph.find_nodes(op="call_function", target=PREFETCH)) == 1
    assert fxprefetch.stats().calls == 1
    assert w.grad is not None


@pytest.mark.compile
def test_survives_inductor_and_runs(fresh_dynamo):
    """A pass inserts the op in inductor's post-grad graph; the compiled code calls it."""

    def insert_prefetch(graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                weight = node.args[-1].args[0]  # permute(weight) -> weight placeholder
                with graph.inserting_before(node):
                    graph.call_function(PREFETCH, (weight, node.args[-2], 48))

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch._inductor.config.patch(post_grad_custom_post_pass=insert_prefetch), torch.no_grad():
        compiled = torch.compile(model, backend="inductor")
        with fxprefetch.collect_stats() as s:
            out = compiled(x)
            compiled(x)
    torch.testing.assert_close(out, model(x))
    assert s.calls == 4 and s.bytes_requested == 4 * 48


def test_a_failing_range_checked_prefetch_is_skipped_counted_and_logged(monkeypatch, caplog):
    """Whatever the run-time check op meets, the model runs on: the prefetch is skipped."""

    def broken(*args):
        raise RuntimeError("device prefetch unavailable")

    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", broken)
    w = torch.randn(16, 16)
    with fxprefetch.collect_stats() as s, caplog.at_level("WARNING", logger="fxprefetch.ops"):
        ops.RANGE_OP(w, None, 256, 0, 8, 4, 16)  # in range: the kernel runs, and fails
        ops.RANGE_OP(w, None, 256, 4096, 8, 4, 16)  # an offset past the tensor
        ops.RANGE_OP(w, None, 256, 0, 8, 9, 16)  # out of range: nothing to fail
    assert s.failed == 2 and runtime_stats.stats().failed == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "prefetch_in_range failed and was skipped (the model runs on)"
    ] * 2
    assert "device prefetch unavailable" in caplog.records[0].getMessage()


def test_range_bounds_are_int64_arguments_whatever_the_bounds():
    big = 2**63 - 1
    assert ops.range_bounds(0, None) == (0, -1)
    assert ops.range_bounds(96, 4096) == (96, 4096)
    assert ops.range_bounds(2, 2**64) == (2, -1)  # no count is above it: no upper bound
    assert ops.range_bounds(2**63 + 5, None) == (big, -1)  # no real count reaches it
    ops.RANGE_OP(torch.randn(4), None, 16, 0, 8, *ops.range_bounds(2**70, 2**70))


def test_every_op_is_defined_by_one_helper():
    """define_op: the schema, the fake, a kernel per key, and kept as a side effect; every
    prefetch op of ops.py (and vLLM's by-name op) is defined through it."""
    from torch.fx.node import _side_effectful_functions

    lib = torch.library.Library("fxprefetch_test_define", "DEF")
    calls = []
    op = ops.define_op(
        lib,
        "touch(Tensor weight, int n) -> ()",
        lambda weight, n: calls.append(("fake", n)),
        {"CPU": lambda weight, n: calls.append(("cpu", n))},
    )
    assert op is torch.ops.fxprefetch_test_define.touch.default
    assert str(op._schema) == "fxprefetch_test_define::touch(Tensor weight, int n) -> ()"
    op(torch.ones(2), 3)
    with FakeTensorMode() as mode:
        op(mode.from_tensor(torch.ones(2)), 4)
    assert calls == [("cpu", 3), ("fake", 4)] and op in _side_effectful_functions
    source = Path(ops.__file__).read_text()
    assert source.count(".define(") == 1 and source.count("register_fake(") == 1
    moe = Path(ops.__file__).with_name("vllm").joinpath("moe.py").read_text()
    assert "ops.define_op(" in moe and ".define(" not in moe
