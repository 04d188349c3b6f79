"""One visible pipeline, rules in the cache key, plans that survive every cache path."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.fx import GraphModule

import fxprefetch
from fxprefetch import WeightPrefetchConfig
from fxprefetch.compile_setup import CompileSetup
from fxprefetch.devices import DeviceSetup
from fxprefetch.errors import InvariantError, PassFailedError
from fxprefetch.passes import DEFAULT_RULES, add_role_rule
from fxprefetch.passes.contract import Invariant, PassContext, PassResult, graph_pass
from fxprefetch.passes.invariants import held
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import TARGET_SPECS, make_compile_setup
from fxprefetch.targets.inductor import PrefetchGraphPass

from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace, pipeline_of, run_synth_pipeline, swap_passes

ROOT = Path(__file__).resolve().parents[1]


class Plain(nn.Module):
    """A norm, then a linear whose name no default rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(32)
        self.proj = nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


@pytest.fixture
def warm_cache(tmp_path, monkeypatch):
    """Inductor's FX graph cache on, in a directory of this test's own."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        yield tmp_path
    torch._dynamo.reset()


def _compile_and_run(model, x):
    torch._dynamo.reset()
    fxprefetch.clear_plans()
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad(), fxprefetch.collect_stats() as ran:
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    return fxprefetch.last_plans(), ran


def _hits() -> int:
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


@pytest.mark.compile
def test_a_rule_added_after_a_warm_compile_is_honoured(warm_cache):
    model, x = Plain().eval(), torch.randn(4, 32)
    (plan,), _ = _compile_and_run(model, x)
    assert plan.records[0].role is None and not plan.prefetched
    add_role_rule(r"(^|\.)proj$", "mlp.gate_up", "test rule")
    (plan,), ran = _compile_and_run(model, x)
    (record,) = plan.records
    assert record.role == "mlp.gate_up" and record.prefetched
    assert ran.hints == 1  # the compiled graph was made under the new rules, not served stale


def test_the_cache_key_covers_the_rules():
    config = WeightPrefetchConfig(enabled=True)
    a = PrefetchGraphPass(
        GraphPlanner(CompileSetup(config, DEFAULT_RULES, pipeline_of("inductor")))
    )
    other = DEFAULT_RULES.with_op_kind("aten::cat", "barrier")
    b = PrefetchGraphPass(GraphPlanner(CompileSetup(config, other, pipeline_of("inductor"))))
    native = GraphPlanner(
        CompileSetup(
            config, DEFAULT_RULES, pipeline_of("inductor"), DeviceSetup(native=frozenset({"cpu"}))
        )
    )
    capped = GraphPlanner(
        CompileSetup(
            config, DEFAULT_RULES, pipeline_of("inductor"), DeviceSetup(caps={"cuda": 8 << 20})
        )
    )
    uuids = {a.uuid(), b.uuid(), PrefetchGraphPass(native).uuid(), PrefetchGraphPass(capped).uuid()}
    assert len(uuids) == 4


@pytest.mark.compile
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_lost_plans_are_rebuilt_beside_a_warm_cache(warm_cache, damage):
    model, x = SynthModel(SynthSpec(layers=1)).eval(), torch.randint(0, 64, (1, 4))
    (first,), ran = _compile_and_run(model, x)
    assert len(first.prefetched) == 2 and ran.hints == 2
    stored = list((warm_cache / "fxprefetch_plans").glob("*.json"))
    assert len(stored) == 1
    for path in stored:
        if damage == "delete":
            path.unlink()
        else:
            path.write_text(path.read_text()[:40])
    (again,), ran = _compile_and_run(model, x)
    assert len(again.prefetched) == 2 and ran.hints == 2  # not silently empty
    assert [r.prefetch_bytes for r in again.prefetched] == [
        r.prefetch_bytes for r in first.prefetched
    ]
    before = _hits()
    (third,), ran = _compile_and_run(model, x)  # plans are back: a plain cache hit again
    assert _hits() == before + 1 and len(third.prefetched) == 2 and ran.hints == 2


@pytest.mark.compile
def test_explain_leaves_other_compiled_code_alone(fresh_dynamo):
    counter = CompileCounterWithBackend("eager")

    @torch.compile(backend=counter)
    def other(x):
        return torch.sin(x) + 1

    other(torch.randn(4))
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    for _ in range(2):  # explaining twice plans twice
        (plan,) = fxprefetch.explain(model, ids)
        assert len(plan.prefetched) == 2
    other(torch.randn(4))
    assert counter.frame_count == 1  # no recompile: dynamo was not reset


def test_each_target_lists_its_passes_in_order():
    names = {name: [p.name for p in spec.pipeline.passes] for name, spec in TARGET_SPECS.items()}
    assert {name: names[name] for name in ("npu", "inductor", "eager")} == {
        "npu": ["plan_prefetches", "lower_npu", "insert_joins"],
        "inductor": [
            "plan_prefetches",
            "lower_native",
            "relax_dependencies",
            "elide_hints",
            "insert_joins",
        ],
        "eager": ["plan_prefetches"],
    }


@pytest.mark.parametrize(
    ("native", "kept"), [(frozenset(), 0), (frozenset({"cpu"}), 4)], ids=["hints", "native"]
)
def test_the_report_says_what_each_pass_changed(native, kept):
    gm, report = run_synth_pipeline("inductor", devices=DeviceSetup(native=native))
    changes = {r.name: r.changed for r in report.results}
    assert changes == {  # each under its pass's own name
        "plan_prefetches": 4,
        "lower_native": 0,  # no device with a native L2 prefetch in this context
        "relax_dependencies": 4,
        "elide_hints": 4 - kept,
        "insert_joins": 0,  # no side-stream device in this context
    }
    assert [report.changed(p) for p in pipeline_of("inductor").passes] == [4, 0, 4, 4 - kept, 0]
    assert report.hints_elided is (kept == 0) and len(report.plan.prefetched) == 4
    prefetches = gm.graph.find_nodes(op="call_function", target=fxprefetch.ops.PREFETCH_OP)
    assert len(prefetches) == kept


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_passes_read_no_kernel_registry():
    """Which devices have a native prefetch comes in the pass context: passes import the op's
    schema only (which rooms may import what is tests/test_layout.py's)."""
    for path in sorted((ROOT / "passes").rglob("*.py")):
        names = {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert not names & {"has_native_prefetch", "native_prefetch_devices"}, path.name


def test_no_back_channels_between_compile_and_runtime():
    # the backend names no weight in a runtime registry; counting wraps the compiled graph
    assert "fxprefetch.runtime_stats" not in _imports(ROOT / "fxprefetch" / "backend.py")
    assert not hasattr(fxprefetch.runtime_stats, "name_weight")
    # no side flags: what lowering did is in the report, and the pipeline decides recompiles
    planner = GraphPlanner(
        make_compile_setup(WeightPrefetchConfig(enabled=True), target="inductor")
    )
    graph_pass = PrefetchGraphPass(planner)
    assert not hasattr(graph_pass, "elided") and not hasattr(planner, "recompile")


@pytest.mark.parametrize(
    ("written", "device_cap", "cap"),
    [(None, None, 18 << 20), (None, 1000, 1000), (500, 1000, 500)],
    ids=["guide", "device", "written-wins"],
)
def test_the_device_cap_applies_where_the_config_writes_none(written, device_cap, cap):
    config = WeightPrefetchConfig(enabled=True, max_prefetch_bytes=written)
    caps = {"cpu": device_cap} if device_cap is not None else {}
    _, report = run_synth_pipeline("eager", config, devices=DeviceSetup(caps=caps))
    plan = report.plan
    assert len(plan.prefetched) == 4
    for r in plan.prefetched:  # weights of 12 KiB and 16 KiB: only the small caps bite
        assert r.prefetch_bytes == min(r.weight_bytes, cap)
        assert r.capped is (r.weight_bytes > cap)


# -- the driver speaks for each pass -------------------------------------------------------------


@graph_pass(requires=("plan_prefetches",))
def misnamed(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Changes nothing, and reports under another name (the driver overrides it)."""
    return PassResult(0, name="something_else")


@graph_pass(requires=("plan_prefetches",))
def fails(gm: GraphModule, ctx: PassContext) -> PassResult:
    """A broken pass."""
    raise KeyError("boom")


def _no_prefetch_left(graph: torch.fx.Graph, given: object) -> list[str]:
    left = graph.find_nodes(op="call_function", target=fxprefetch.ops.PREFETCH_OP)
    return [f"{len(left)} prefetches left"] if left else []


NO_PREFETCH_LEFT = Invariant("no_prefetch_left", _no_prefetch_left)


@graph_pass(requires=("plan_prefetches",), ensures=(NO_PREFETCH_LEFT,))
def claims_none_left(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Declares an invariant it does not make hold."""
    return PassResult(0)


@graph_pass(requires=("plan_prefetches",), relaxes=(NO_PREFETCH_LEFT,))
def lifts_it(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Lifts the invariant again."""
    return PassResult(0)


def test_the_driver_stamps_each_pass_name_on_its_result(monkeypatch):
    swap_passes(monkeypatch, "eager", (pipeline_of("eager").passes[0], misnamed))
    _, report = run_synth_pipeline("eager")
    assert [r.name for r in report.results] == ["plan_prefetches", "misnamed"]
    assert report.changed(misnamed) == 0
    with pytest.raises(TypeError, match="expected a pass"):
        report.changed("misnamed")


def test_a_failing_pass_is_named_with_the_passes_before_it(monkeypatch):
    plan = pipeline_of("eager").passes[0]
    swap_passes(monkeypatch, "eager", (plan, misnamed, fails))
    with pytest.raises(PassFailedError) as caught:
        run_synth_pipeline("eager")
    assert str(caught.value) == (
        "pass 'fails' failed (passes run before it: plan_prefetches, misnamed): KeyError: 'boom'"
    )
    assert isinstance(caught.value.__cause__, KeyError)


def test_the_planner_warning_names_the_failing_pass(monkeypatch, caplog):
    plan = pipeline_of("eager").passes[0]
    swap_passes(monkeypatch, "eager", (plan, fails))
    gm, names = fake_trace(SynthModel(SynthSpec(layers=1)), torch.randint(0, 64, (1, 4)))
    setup = make_compile_setup(WeightPrefetchConfig(enabled=True), target="eager")
    planner = GraphPlanner(setup, record=False)
    monkeypatch.setattr(planner, "weight_names", lambda _: names)
    with caplog.at_level(logging.WARNING, logger="fxprefetch.planner"):
        planner(gm)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "fxprefetch.planner"]
    assert "pass 'fails' failed (passes run before it: plan_prefetches)" in warning


def test_the_driver_logs_each_pass_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="fxprefetch.pipeline"):
        run_synth_pipeline("inductor")
    lines = [r.getMessage() for r in caplog.records if r.name == "fxprefetch.pipeline"]
    changed = [4, 0, 4, 4, 0]
    names = [p.name for p in pipeline_of("inductor").passes]
    assert len(lines) == len(names)
    for line, name, count in zip(lines, names, changed, strict=True):
        assert re.fullmatch(rf"g: pass {name} changed {count} nodes in \d+\.\d\d ms", line), line


def test_an_invariant_a_pass_ensures_is_checked_after_it_until_relaxed(monkeypatch):
    plan = pipeline_of("eager").passes[0]
    swap_passes(monkeypatch, "eager", (plan, claims_none_left, misnamed))
    with pytest.raises(InvariantError, match="g: after claims_none_left: 4 prefetches left"):
        run_synth_pipeline("eager")
    assert held((plan, claims_none_left, misnamed)) == (*plan.ensures, NO_PREFETCH_LEFT)
    swap_passes(monkeypatch, "eager", (plan, lifts_it))  # relaxed before it was ensured: none
    run_synth_pipeline("eager")
    assert held((plan, claims_none_left, lifts_it)) == plan.ensures
