"""Stripping (``strip_prefetch``): the graph before the pass comes back, forks, joins and tokens
included."""

from __future__ import annotations

from fxprefetch.passes import strip_prefetch
from fxprefetch.pipeline import run_weight_prefetch

from support.lowered import native_pipeline
from support.planning import ON, fresh_export


def test_strip_restores_the_original_code(dense):
    _, _, gm, names = fresh_export(dense)
    before = gm.code
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert gm.code != before
    assert strip_prefetch(gm) == len(plan.prefetched)
    assert gm.code == before


def test_strip_removes_forks_joins_and_tokens():
    gm, _ = native_pipeline({"cpu"})
    before = len(gm.graph.nodes)
    assert strip_prefetch(gm) == 4
    assert len(gm.graph.nodes) == before - 3 * 4  # fork, join and token per prefetch
    gm.graph.lint()
