"""fxprefetch/planner.py: the planner runs a target's pipeline on a graph, keeps its plan
for ``last_plans()``, and never breaks the user's model when the pass fails (unless strict)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import fxprefetch
from fxprefetch import planner as planner_module
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import make_compile_setup

from support.planning import prefetch_nodes
from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace

ON = WeightPrefetchConfig(enabled=True)


class _Named(GraphPlanner):
    """A planner whose weights are the traced model's parameters (no dynamo sources)."""

    def __init__(self, names, **kwargs):
        super().__init__(**kwargs)
        self.names = names

    def weight_names(self, gm):
        return self.names


def _graph():
    return fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))


@pytest.mark.parametrize("record", [True, False])
def test_a_planned_graph_is_prefetched_and_its_plan_kept(record):
    gm, names = _graph()
    planner = _Named(names, setup=make_compile_setup(ON, target="eager"), name="g", record=record)
    report = planner(gm)
    assert report is not None and report.plan is planner.plans[0]
    assert len(report.plan.prefetched) == 4  # qkv, o, gate/up, down: two layers
    assert len(prefetch_nodes(gm)) == 4
    assert report.plan.graph.startswith("g (")
    assert fxprefetch.last_plans() == ([report.plan] if record else [])


def test_a_failing_pass_warns_and_leaves_the_graph_without_prefetch(monkeypatch, caplog):
    gm, names = _graph()
    before = gm.code

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(planner_module, "run_pipeline", fail)
    planner = _Named(names, setup=make_compile_setup(ON, target="eager"), name="g")
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        report = planner(gm)
    assert report.plan.error == "RuntimeError: boom"
    assert report.plan.prefetched == []
    assert gm.code == before
    assert "weight-prefetch pass failed on g (RuntimeError: boom)" in caplog.text


def test_a_failing_pass_raises_in_strict_mode(monkeypatch):
    gm, names = _graph()

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(planner_module, "run_pipeline", fail)
    planner = _Named(names, setup=make_compile_setup(ON, target="eager", strict=True), name="g")
    with pytest.raises(fxprefetch.PrefetchPassError, match="failed on g: boom"):
        planner(gm)
    assert planner.reports == []


@pytest.fixture
def quiet_vllm():
    """The ``fxprefetch.vllm`` logger set to ERROR, as a user quieting it would."""
    quiet = logging.getLogger("fxprefetch.vllm")
    quiet.setLevel(logging.ERROR)
    yield quiet
    quiet.setLevel(logging.NOTSET)


def test_a_user_can_quiet_fxprefetch_vllm_alone(quiet_vllm, monkeypatch, caplog):
    """Loggers are per module, under ``fxprefetch.``: quieting ``fxprefetch.vllm`` silences
    the vLLM integration's warnings while the planner's still reach the ``fxprefetch`` logger."""
    from fxprefetch.vllm import ascend

    monkeypatch.setattr(ascend, "_warned", set())
    monkeypatch.setattr(planner_module, "run_pipeline", _boom)
    no_graph = SimpleNamespace(
        additional_config={"weight_prefetch_config": {"enabled": True}},
        model_config=SimpleNamespace(enforce_eager=True),
        compilation_config=SimpleNamespace(mode=3, inductor_compile_config={}),
    )
    gm, names = _graph()
    with caplog.at_level(logging.INFO, logger="fxprefetch"):
        ascend.at_start_up(no_graph)  # warns where no graph runs the pass: quieted
        _Named(names, setup=make_compile_setup(ON, target="eager"), name="g")(gm)
    warned = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [name for name, _ in warned] == ["fxprefetch.planner"]
    assert "weight-prefetch pass failed on g" in warned[0][1]
    quiet_vllm.setLevel(logging.NOTSET)
    monkeypatch.setattr(ascend, "_warned", set())
    with caplog.at_level(logging.INFO, logger="fxprefetch"):
        ascend.at_start_up(no_graph)
    assert any(r.name == "fxprefetch.vllm.ascend" for r in caplog.records)


def _boom(*args, **kwargs):
    raise RuntimeError("boom")
