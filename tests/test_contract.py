"""The pass contract: one signature per pass, declared order, and only the driver lints and
regenerates code."""

from __future__ import annotations

import ast
import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule

import fxprefetch.passes as passes_package
from fxprefetch import WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.contract import (
    GraphPass,
    PassContext,
    PassResult,
    PipelineOrderError,
    check_order,
    graph_pass,
)
from fxprefetch.passes.elide_hints import elide_hints
from fxprefetch.passes.insert_joins import insert_joins
from fxprefetch.passes.lower_native import lower_native
from fxprefetch.passes.lower_npu import lower_npu
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.relax_dependencies import relax_dependencies
from fxprefetch.pipeline import Pipeline, run_passes, run_pipeline
from fxprefetch.targets import TARGET_SPECS

from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace, pipeline_of

PASSES_DIR = Path(passes_package.__file__).parent  # passes/, wherever it is imported from
PASS_MODULES = (
    "plan_prefetches",
    "lower_npu",
    "lower_native",
    "relax_dependencies",
    "elide_hints",
    "insert_joins",
)
NOT_PASSES = {"__init__", "contract", "invariants", "strip_prefetch"}  # no pass in them


def _traced() -> tuple[GraphModule, PassContext]:
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    ctx = PassContext(WeightPrefetchConfig(enabled=True), DEFAULT_RULES, "g", weight_names=names)
    return gm, ctx


def _prefetch_count(gm: GraphModule) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))


# -- declared order ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGET_SPECS))
def test_the_real_pipelines_are_in_a_declared_order(target):
    check_order(pipeline_of(target).passes)


def test_a_pipeline_in_a_wrong_order_cannot_be_built():
    with pytest.raises(PipelineOrderError, match="'lower_npu' requires 'plan_prefetches'"):
        Pipeline("npu", (lower_npu,))
    with pytest.raises(PipelineOrderError, match="'lower_npu' cannot run after"):
        pipeline_of("npu").with_passes((plan_prefetches, relax_dependencies, lower_npu))


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ((lower_npu,), "pass 'lower_npu' requires 'plan_prefetches' to run before it"),
        (
            (plan_prefetches, insert_joins, lower_native),
            "pass 'insert_joins' requires 'lower_native or lower_npu' to run before it",
        ),
        (
            (plan_prefetches, relax_dependencies, lower_npu),
            "pass 'lower_npu' cannot run after 'relax_dependencies'",
        ),
        (
            (plan_prefetches, relax_dependencies, lower_native, elide_hints, insert_joins),
            "pass 'lower_native' cannot run after 'relax_dependencies'",
        ),
    ],
    ids=["missing", "too-early", "npu-after-relaxing", "native-after-relaxing"],
)
def test_a_wrong_order_is_refused_naming_both_passes(passes, message):
    with pytest.raises(PipelineOrderError, match=message):
        check_order(passes)


def test_the_driver_refuses_a_wrong_order_before_running_anything():
    gm, ctx = _traced()
    before = [n.name for n in gm.graph.nodes]
    with pytest.raises(PipelineOrderError, match="'lower_npu' cannot run after"):
        run_passes(gm, (plan_prefetches, relax_dependencies, lower_npu), ctx)
    assert [n.name for n in gm.graph.nodes] == before


# -- one pass per module -------------------------------------------------------------------------


def test_each_pass_module_exports_exactly_one_declared_pass():
    modules = {p.stem for p in PASSES_DIR.glob("*.py")} - NOT_PASSES
    assert modules == set(PASS_MODULES)
    known = set(PASS_MODULES)
    for name in PASS_MODULES:
        module = importlib.import_module(f"fxprefetch.passes.{name}")
        found = [v for v in vars(module).values() if isinstance(v, GraphPass)]
        own = [p for p in found if p.run.__module__ == module.__name__]
        assert len(own) == 1, f"{name} defines {[p.name for p in own]}"
        (graph_pass_,) = own
        assert graph_pass_.name == name and getattr(module, name) is graph_pass_
        assert set(graph_pass_.requires) <= known and set(graph_pass_.conflicts) <= known
        assert graph_pass_.__doc__, f"{name} has no docstring"


def test_the_declarations_say_what_each_pass_needs():
    assert plan_prefetches.requires == () and plan_prefetches.conflicts == ()
    for later in (lower_npu, lower_native, relax_dependencies, elide_hints):
        assert "plan_prefetches" in later.requires, later.name
    assert "relax_dependencies" in lower_npu.conflicts  # npu_prefetch needs its dependency
    assert "relax_dependencies" in lower_native.conflicts  # its order edges come from it
    # it joins the side-stream forks whichever lowering made them (CUDA or Ascend)
    assert insert_joins.requires_any == ("lower_native", "lower_npu")


def test_requires_any_needs_one_of_them():
    """insert_joins after either lowering builds; after neither it is refused."""
    Pipeline("x", (plan_prefetches, lower_npu, insert_joins))
    Pipeline("y", (plan_prefetches, lower_native, insert_joins))
    with pytest.raises(PipelineOrderError, match="requires 'lower_native or lower_npu'"):
        Pipeline("z", (plan_prefetches, insert_joins))


def test_a_decorated_function_keeps_its_name_and_signature():
    @graph_pass(requires=("plan_prefetches",))
    def count_nodes(gm, ctx):
        """Counts, changes nothing."""
        return PassResult(0)

    gm, ctx = _traced()
    assert count_nodes.name == "count_nodes" and count_nodes.__doc__ == "Counts, changes nothing."
    assert count_nodes(gm, ctx) == PassResult(0)
    assert graph_pass(name="other")(count_nodes.run).name == "other"


# -- only the driver lints and recompiles --------------------------------------------------------


def _called_names(tree: ast.AST) -> set[str]:
    return {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }


def test_no_pass_module_lints_or_regenerates_code():
    conveniences = {"run_weight_prefetch"}  # stands in for the driver, for callers by hand
    for name in PASS_MODULES:
        tree = ast.parse((PASSES_DIR / f"{name}.py").read_text())
        code = [n for n in tree.body if getattr(n, "name", None) not in conveniences]
        called = set().union(*(_called_names(n) for n in code))
        assert not called & {"lint", "recompile", "finalize"}, name


def test_a_pass_run_alone_leaves_the_code_stale_until_the_driver_runs():
    gm, ctx = _traced()
    code = gm.code
    result = plan_prefetches(gm, ctx)
    assert result.changed == 4 == _prefetch_count(gm)
    assert gm.code == code and "fxprefetch.prefetch" not in gm.code  # the pass left it

    gm, ctx = _traced()
    report = run_pipeline(
        gm, pipeline_of("eager"), ctx
    )  # eager regenerates, inductor leaves it to inductor
    assert report.changed(plan_prefetches) == 4
    assert gm.code.count("torch.ops.fxprefetch.prefetch.default") == 4


CPU = frozenset({"cpu"})


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"devices": DeviceSetup(native=CPU, l2=CPU, joins=CPU)},
    ],
    ids=["hints", "native-joined"],
)
def test_the_inductor_passes_neither_lint_nor_recompile(monkeypatch, context):
    gm, ctx = _traced()
    ctx = replace(ctx, **context)
    calls = []
    monkeypatch.setattr(torch.fx.Graph, "lint", lambda self: calls.append("lint"))
    monkeypatch.setattr(GraphModule, "recompile", lambda self: calls.append("recompile"))
    changed = {p.name: p(gm, ctx).changed for p in pipeline_of("inductor").passes}
    assert calls == [] and changed["plan_prefetches"] == 4
    if context:
        assert changed["lower_native"] == changed["insert_joins"] == 4
    monkeypatch.undo()
    gm.graph.lint()


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Pipeline("x", ()), ValueError, "pipeline 'x' has no pass"),
        (lambda: Pipeline("", (plan_prefetches,)), ValueError, "expected a target's name"),
        (
            lambda: Pipeline("x", (plan_prefetches, plan_prefetches)),
            ValueError,
            "runs 'plan_prefetches' twice",
        ),
        (lambda: Pipeline("x", (lambda gm, ctx: None,)), TypeError, "decorate .* @graph_pass"),
    ],
    ids=["empty", "no-target", "twice", "undeclared"],
)
def test_a_pipeline_refuses_what_the_driver_could_not_run(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_a_pipeline_that_makes_no_plan_is_named_in_the_error():
    @graph_pass()
    def no_plan(gm: GraphModule, ctx: PassContext) -> PassResult:
        """Plans nothing."""
        return PassResult(0)

    gm, ctx = _traced()
    message = r"no pass of the x pipeline made a plan \(ran \['no_plan'\]\)"
    with pytest.raises(ValueError, match=message):
        run_pipeline(gm, Pipeline("x", (no_plan,)), ctx)
