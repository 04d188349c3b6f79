"""PrefetchPlan: JSON round trip, summary totals, the schema, plans written per graph."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fxprefetch import PrefetchPlan, WeightPrefetchConfig
from fxprefetch.pipeline import run_weight_prefetch

from support.synthetic import SynthModel, SynthSpec, TwoGraphs
from support.tracing import fake_trace


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


def test_plans_are_written_to_fxprefetch_plan_dir_and_follow_the_schema(
    tmp_path, monkeypatch, fresh_dynamo, caplog
):
    import jsonschema

    import fxprefetch
    from fxprefetch.plan.store import read_plan_dir

    schema_file = Path(fxprefetch.__file__).parent / "plan" / "plan_schema.json"
    schema = json.loads(schema_file.read_text())
    plan_schema = {**schema["$defs"]["plan"], "$defs": schema["$defs"]}
    monkeypatch.setenv("FXPREFETCH_PLAN_DIR", str(tmp_path / "plans"))

    model = TwoGraphs().eval()
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with caplog.at_level("INFO", logger="fxprefetch"), torch.no_grad():
        compiled(torch.randint(0, 64, (1, 4)))
    files = sorted((tmp_path / "plans").glob("plan-*.json"))
    assert len(files) == 2 == len(fxprefetch.last_plans())  # one file per graph
    for path in files:
        jsonschema.validate(json.loads(path.read_text()), plan_schema)
    written = read_plan_dir(tmp_path / "plans")
    assert sorted(p.to_json() for p in written) == sorted(
        p.to_json() for p in fxprefetch.last_plans()
    )
    for plan in written:  # each plan's summary line is logged at INFO
        assert plan.summary_line() in caplog.text


class ColumnSlice(torch.nn.Module):
    """An up projection that reads the first 16 of 32 columns of a 64 x 32 weight."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = torch.nn.Linear(32, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.relu(), self.up_proj.weight[:, :16])


def _schema() -> dict:
    import fxprefetch

    return json.loads((Path(fxprefetch.__file__).parent / "plan" / "plan_schema.json").read_text())


def test_a_strided_part_shows_the_bytes_read_and_the_span_prefetched():
    import jsonschema

    gm, names = fake_trace(ColumnSlice(), torch.randn(2, 16))
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(enabled=True), weight_names=names)
    (record,) = plan.records
    # the part in the weight's own orientation; the matmul reads 64 x 16 x 4 bytes, and the
    # one contiguous prefetch covers rows 0..63 up to column 15: 63 x 32 + 16 elements
    assert record.weight_shape == (64, 16)
    assert (record.weight_bytes, record.span_bytes, record.prefetch_bytes) == (4096, 8128, 8128)
    row = next(line for line in plan.table().splitlines() if "up_proj" in line)
    assert "64x16 float32  4.0 KiB (span 7.9 KiB)  7.9 KiB" in row
    data = json.loads(plan.to_json())
    (linear,) = data["linears"]
    assert (linear["weight_bytes"], linear["span_bytes"]) == (4096, 8128)
    schema = _schema()
    jsonschema.validate(data, {**schema["$defs"]["plan"], "$defs": schema["$defs"]})
    assert PrefetchPlan.from_dict(data).to_dict() == data
    # a contiguous part shows its bytes once
    assert "(span" not in _plan().table()


def test_the_schema_lists_every_record_field_at_the_plan_version():
    import dataclasses

    from fxprefetch.plan import PLAN_SCHEMA_VERSION, LinearRecord

    schema = _schema()["$defs"]
    fields = {f.name for f in dataclasses.fields(LinearRecord)}
    assert set(schema["linear"]["required"]) == set(schema["linear"]["properties"]) == fields
    assert schema["plan"]["properties"]["schema_version"] == {"const": PLAN_SCHEMA_VERSION}
