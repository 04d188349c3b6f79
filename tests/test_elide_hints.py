"""Hint elision (``elide_hints``): prefetches that are only hints on their device leave compiled
code but are still counted; a native prefetch keeps them."""

from __future__ import annotations

import pytest
import torch

import fxprefetch
from fxprefetch import ops
from fxprefetch.devices import DeviceSetup
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.contract import PassContext
from fxprefetch.passes.elide_hints import elide_hints, hint_only

from support.planning import ON, planned_synth, prefetch_nodes
from support.synthetic import SynthModel, SynthSpec


@pytest.fixture
def planned():
    return planned_synth()


def _ctx(**fields) -> PassContext:
    return PassContext(ON, DEFAULT_RULES, "g", **fields)


def test_cpu_prefetches_are_hints_and_are_elided(planned):
    gm, _ = planned
    assert hint_only(gm, native_devices=())
    assert elide_hints(gm, _ctx(devices=DeviceSetup(native=frozenset({"npu"})))).changed == 4
    assert not prefetch_nodes(gm)


def test_a_native_prefetch_keeps_them(planned):
    gm, _ = planned
    assert not hint_only(gm, native_devices={"cpu"})
    assert elide_hints(gm, _ctx(devices=DeviceSetup(native=frozenset({"cpu"})))).changed == 0
    assert len(prefetch_nodes(gm)) == 4


@pytest.mark.compile
def test_inductor_on_cpu_elides_hints_but_counts_them(fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    model = SynthModel(SynthSpec(layers=2)).eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        with fxprefetch.collect_stats(per_weight=True) as s:
            compiled(ids)
    torch.testing.assert_close(out, model(ids), rtol=1e-4, atol=1e-4)
    assert "fxprefetch" not in "".join(code)  # no call into Python per prefetch
    # no kernel ran: the planned hints are counted per graph call, and called so
    assert s.calls == 0 and s.hints == 4
    assert set(s.per_weight) == {
        f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj")
    }
    assert all(w.hints == 1 and w.calls == 0 for w in s.per_weight.values())
    assert s.hint_bytes == sum(r.prefetch_bytes for r in fxprefetch.last_plans()[0].prefetched)


@pytest.mark.compile
def test_inductor_keeps_prefetches_where_they_reach_hardware(fresh_dynamo, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    calls = []
    monkeypatch.setitem(
        ops._NATIVE_PREFETCH,
        "cpu",
        lambda w, dep, size, off: calls.append((tuple(w.shape), dep, size)),
    )
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        _, code = run_and_get_code(compiled, ids)
    source = "".join(code)
    assert source.count("torch.ops.fxprefetch.prefetch.default(") == 2
    with torch.no_grad(), fxprefetch.collect_stats(per_weight=True) as s:
        compiled(ids)
    assert s.calls == 2 and s.hints == 0  # kernels that ran
    assert set(s.per_weight) == {
        "layers.0.self_attn.qkv_proj.weight",
        "layers.0.mlp.gate_up_proj.weight",
    }
    # the dependency operand is dropped for inductor: it would only force a buffer to exist
    assert calls[:2] == [((96, 32), None, 96 * 32 * 4), ((128, 32), None, 128 * 32 * 4)]
