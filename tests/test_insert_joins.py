"""Joins (``insert_joins``): each side-stream prefetch is joined after its window and before the
linear that reads its weight (the CPU stands in as a native, side-stream device)."""

from __future__ import annotations

from fxprefetch.ops import JOIN_OP, PREFETCH_OP
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.op_classes import NodeKind, classify
from fxprefetch.passes.analysis.prefetch_meta import join_meta
from fxprefetch.passes.insert_joins import insert_joins

from support.lowered import forks_and_joins, native_pipeline
from support.synthetic import SynthModel, SynthSpec


def _check_pairs(gm, forks, joins):
    """One join per fork node, each mutating its own fork's token and nothing else's."""
    assert len(joins) == len(forks)
    tokens = [f.args[1][0] for f in forks]
    assert len(set(tokens)) == len(tokens)
    for join in joins:
        (token,) = [t for t in join.args[1] if t in tokens]
        (fork,) = [f for f in forks if f.args[1][0] is token]
        assert join_meta(join).joins == fork.name
        assert [u for u in token.users if u.target is JOIN_OP] == [join]


def test_joins_close_every_fork_after_the_window_and_before_the_linear():
    gm, report = native_pipeline({"cpu"})
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    forks, joins = forks_and_joins(gm)
    assert not list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    assert report.changed(insert_joins) == len(joins) == len(forks) == 4
    _check_pairs(gm, forks, joins)
    by_name = {n.name: n for n in gm.graph.nodes}
    for record in report.plan.prefetched:
        fork = by_name[record.prefetch_node]
        linear = by_name[record.node]
        (join,) = [j for j in joins if join_meta(j).joins == fork.name]
        assert order[fork] < order[join] < order[linear]
        window_ops = [
            n
            for n in gm.graph.nodes
            if order[fork] < order[n] < order[linear]
            and classify(n, DEFAULT_RULES) is NodeKind.VECTOR
        ]
        assert window_ops and all(order[n] < order[join] for n in window_ops)
        assert join not in linear.all_input_nodes  # the join is not a data input
        # the fork "mutates" its dependency, so every window op reading it follows the fork;
        # the join "mutates" the linear's activation, so the linear follows the join
        _token, *dependency = fork.args[1]
        assert [n.name for n in dependency] == [record.dependency]
        (activation,) = join.args[1][1:]
        assert activation in linear.all_input_nodes and fork.args[0] not in join.args[1]
        assert fork.args[4:] == ("side", "none")


def test_a_weight_read_by_two_linears_gets_a_join_per_prefetch():
    """One layer used twice: 4 prefetches of 2 weights, and 4 joins (one per fork), not 2."""
    model = SynthModel(SynthSpec(layers=2))
    model.layers[1] = model.layers[0]
    gm, report = native_pipeline({"cpu"}, model=model)
    forks, joins = forks_and_joins(gm)
    assert len(forks) == len(report.plan.prefetched) == 4
    assert len({f.args[0] for f in forks}) == 2
    _check_pairs(gm, forks, joins)
