"""The plan as text: bytes for people, the per-linear table (folded or not), totals, the log
line."""

from __future__ import annotations

import torch

from fxprefetch import LinearRecord, PrefetchPlan, SkipReason, WeightPrefetchConfig
from fxprefetch.pipeline import run_weight_prefetch
from fxprefetch.plan.render import (
    display_path,
    format_bytes,
    render_table,
    render_totals,
    summary_line,
)

from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace


def _plan(layers: int = 2) -> PrefetchPlan:
    gm, names = fake_trace(SynthModel(SynthSpec(layers=layers)), torch.randint(0, 64, (1, 4)))
    return run_weight_prefetch(
        gm, WeightPrefetchConfig(enabled=True), weight_names=names, graph_name="g"
    )


def _record(name: str, prefetch: int = 0, **kw) -> LinearRecord:
    return LinearRecord(
        node=name,
        op="aten.mm",
        module=None,
        weight=f"model.{name}.weight",
        layer=kw.pop("layer", 0),
        role=kw.pop("role", "mlp.down"),
        weight_shape=(32, 32),
        dtype="torch.float32",
        weight_bytes=4096,
        prefetch_bytes=prefetch,
        prefetch_node=f"prefetch_{name}" if prefetch else None,
        **kw,
    )


def test_format_bytes_picks_the_unit():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 18 << 20, 3 << 30, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "18.0 MiB",
        "3.0 GiB",
        "5120.0 GiB",
    ]


def test_display_path_prefers_the_parameters_owner():
    assert display_path(_record("up")) == "model.up"
    plain = LinearRecord("n", "aten.mm", "mod", "w", None, None, (2,), "torch.float32", 8)
    assert display_path(plain) == "mod"


def test_summary_line_names_counts_bytes_skips_and_failures():
    plan = PrefetchPlan(
        records=[
            _record("a", prefetch=2048, capped=True),
            _record("b", skip_reason=SkipReason.NO_ROLE),
            _record("c", skip_reason=SkipReason.NO_ROLE),
        ],
        graph="g0",
        error="boom",
    )
    assert (
        summary_line(plan)
        == plan.summary_line()
        == (
            "g0: 1/3 linears prefetched, 2.0 KiB in total, 1 capped; skipped: 2 no role; "
            "pass failed: boom"
        )
    )


def test_table_rows_carry_the_skip_note_and_the_lowering():
    plan = PrefetchPlan(
        records=[_record("a", skip_reason=SkipReason.UNKNOWN_SOURCE, note="graph input 'x'")],
        lowering="eager: hints",
    )
    table = plan.table()
    header, rule, row, blank, summary, lowering = table.splitlines()
    assert header.split() == [
        "layer", "module", "role", "weight", "bytes", "prefetch", "capped", "window", "/",
        "skip", "reason", "dependency",
    ]  # fmt: skip
    assert set(rule) == {"-", " "}
    assert "cannot tell whether the operand is a weight (graph input 'x')" in row
    assert (blank, lowering) == ("", "  lowering: eager: hints")
    assert summary == plan.summary_line()


def test_table_rows_fold_and_totals():
    plan = _plan(layers=3)
    table = plan.table()
    assert table.count("\n") > 12 and "layers.2.mlp.gate_up_proj" in table
    folded = render_table([plan], fold=True)
    assert "0-2 (x3)" in folded and "layers.*.mlp.gate_up_proj" in folded
    assert plan.summary_line() in folded
    totals = render_totals([plan, plan])
    assert totals.startswith("totals: 26 linears seen, 12 prefetched")
