"""PrefetchPlan: JSON round trip, summary totals, table rendering."""

from __future__ import annotations

import json

import torch

from fxprefetch import PrefetchPlan, WeightPrefetchConfig
from fxprefetch.plan import render_table, render_totals
from passes import run_weight_prefetch

from synthetic import SynthModel, SynthSpec
from tracing import fake_trace


def _plan(layers: int = 2, **config) -> PrefetchPlan:
    gm, names = fake_trace(SynthModel(SynthSpec(layers=layers)), torch.randint(0, 64, (1, 4)))
    return run_weight_prefetch(
        gm, WeightPrefetchConfig(enabled=True, **config), weight_names=names, graph_name="g"
    )


def test_json_round_trip_and_summary():
    plan = _plan(max_prefetch_bytes=10_000)
    data = json.loads(plan.to_json())
    assert PrefetchPlan.from_dict(data).to_dict() == plan.to_dict()
    s = data["summary"]
    assert s["linears"] == 9 and s["prefetched"] == 4
    assert s["bytes_prefetched"] == sum(r["prefetch_bytes"] for r in data["linears"])
    assert s["capped"] == 4 and all(
        r["prefetch_bytes"] == 10_000 for r in data["linears"] if r["prefetch_node"]
    )
    assert s["skipped"] == {
        "no vector work before the linear": 2,
        "mlp.down needs sequence parallelism": 2,
        "no role": 1,
    }
    assert s["by_role"] == {"attn.qkv": 2, "mlp.gate_up": 2}


def test_table_rows_fold_and_totals():
    plan = _plan(layers=3)
    table = plan.table()
    assert table.count("\n") > 12 and "layers.2.mlp.gate_up_proj" in table
    folded = render_table([plan], fold=True)
    assert "0-2 (x3)" in folded and "layers.*.mlp.gate_up_proj" in folded
    assert plan.summary_line() in folded
    totals = render_totals([plan, plan])
    assert totals.startswith("totals: 26 linears seen, 12 prefetched")
