"""Plans kept beside inductor's FX graph cache: a warm compile restores the cold plan exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxprefetch
from fxprefetch.plan import LinearRecord, PredictedSaving, SkipReason

from support.synthetic import SynthModel, SynthSpec

pytestmark = pytest.mark.compile


def _compile_twice(monkeypatch, tmp_path) -> tuple[list, list, list[int]]:
    """The plans of a cold compile and of a warm one (FX graph cache hit), and the hits."""
    from fxprefetch import ops
    from fxprefetch.devices import simulated_setup

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *args: None)
    monkeypatch.setitem(
        ops._NATIVE_L2, "cpu", ops.NativeL2(lambda *a: None, lambda *a: None, lambda d: None)
    )
    # an H200's profile (the CPU standing in): every prefetch carries a PredictedSaving
    monkeypatch.setattr(
        "fxprefetch.targets.device_setup", lambda **_: simulated_setup("h200", {"cpu"})
    )
    model = SynthModel(SynthSpec(layers=1, hidden=64, intermediate=128)).eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    options = {
        "target": "inductor",
        # bounds on qkv (kept, decided for the graph); gate_up outside its range (skipped)
        "weight_prefetch_config": {
            "force_prefetch": True,  # kept records under the H200 model (it gates them all)
            "token_range": {
                "attn": {"qkv": {"max_tokens": 64}},
                "mlp": {"gate_up": {"min_tokens": 100}},
            },
        },
    }
    plans, hits = [], []
    counters = torch._dynamo.utils.counters
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        for _ in range(2):
            torch._dynamo.reset()
            before = counters["inductor"]["fxgraph_cache_hit"]
            compiled = torch.compile(model, backend="npu_prefetch", options=options)
            with torch.no_grad():
                torch.testing.assert_close(compiled(ids), model(ids))
            hits.append(counters["inductor"]["fxgraph_cache_hit"] - before)
            plans.append(fxprefetch.last_plans())
            fxprefetch.clear_plans()
    return plans[0], plans[1], hits


def _same(cold: object, warm: object, where: str) -> None:
    """``warm`` equals ``cold`` in value and in type, field by field, nested records too."""
    assert type(warm) is type(cold), f"{where}: {type(warm).__name__} != {type(cold).__name__}"
    if dataclasses.is_dataclass(cold):
        for f in dataclasses.fields(cold):
            _same(getattr(cold, f.name), getattr(warm, f.name), f"{where}.{f.name}")
    elif isinstance(cold, (tuple, list)):
        assert len(warm) == len(cold), where  # type: ignore[arg-type]
        for i, (c, w) in enumerate(zip(cold, warm, strict=True)):  # type: ignore[call-overload]
            _same(c, w, f"{where}[{i}]")
    elif isinstance(cold, dict):
        assert warm.keys() == cold.keys(), where  # type: ignore[attr-defined]
        for key in cold:
            _same(cold[key], warm[key], f"{where}[{key!r}]")  # type: ignore[index]
    else:
        assert warm == cold, f"{where}: {warm!r} != {cold!r}"


def test_a_warm_plan_has_every_field_of_the_cold_one_in_its_type(
    fresh_dynamo, monkeypatch, tmp_path
):
    cold, warm, hits = _compile_twice(monkeypatch, tmp_path)
    assert hits == [0, 1]  # the second compile was served by the FX graph cache
    (plan,) = cold
    records = plan.records
    # the model has every kind of field value: kept and skipped, enums, nested records, None
    kept = [r for r in records if r.prefetched]
    assert kept and all(isinstance(r.prediction, PredictedSaving) for r in kept)
    reasons = {r.skip_reason for r in records if not r.prefetched}
    assert SkipReason.OUTSIDE_TOKEN_RANGE in reasons and SkipReason.NO_ROLE in reasons
    assert all(type(r.skip_reason) is SkipReason for r in records if not r.prefetched)
    assert any(r.window for r in records) and any(r.note is None for r in records)
    assert {r.token_check for r in records} >= {"graph", None}
    assert [p.graph.split(" ", 1)[1] for p in warm] == [p.graph.split(" ", 1)[1] for p in cold]
    unnamed = [[dataclasses.replace(p, graph="-") for p in ps] for ps in (cold, warm)]
    _same(*unnamed, "plans")  # the graph's name numbers each compile: the rest is equal
    names = {f.name for f in dataclasses.fields(LinearRecord)}
    assert names == {f.name for f in dataclasses.fields(warm[0].records[0])}
