"""Relaxing dependencies (``relax_dependencies``): the operand goes, position and size stay."""

from __future__ import annotations

import pytest

from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.contract import PassContext
from fxprefetch.passes.relax_dependencies import relax_dependencies

from support.planning import ON, planned_synth, prefetch_nodes


@pytest.fixture
def planned():
    return planned_synth()


def _ctx(**fields) -> PassContext:
    return PassContext(ON, DEFAULT_RULES, "g", **fields)


def test_relaxing_keeps_position_and_size(planned):
    gm, _ = planned
    order = [(n.prev.name, n.args[0].name, n.args[2]) for n in prefetch_nodes(gm)]
    assert relax_dependencies(gm, _ctx()).changed == 4
    assert all(n.args[1] is None for n in prefetch_nodes(gm))
    assert [(n.prev.name, n.args[0].name, n.args[2]) for n in prefetch_nodes(gm)] == order
    assert relax_dependencies(gm, _ctx()).changed == 0
