"""torch.compile(model, backend="npu_prefetch") end to end, on each target.

The `npu` target runs against torchair's real code in tests/test_torchair.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxprefetch
from fxprefetch.presets import build_model, example_inputs

from support.synthetic import SynthModel, SynthSpec
from support.tracing import swap_passes

pytestmark = pytest.mark.compile
pytest.importorskip("transformers")

# prefetches per forward, from the models' structure: qkv x3 per layer, plus dense gate/up x2
# or the experts' gate_up x1; o has no vector window, mlp.down needs sequence parallelism.
EXPECTED = {"llama-tiny": 2 * (3 + 2), "qwen3-moe-tiny": 2 * (3 + 1), "mixtral-tiny": 2 * (3 + 1)}


def _run(model, target, options=None, **kw):
    inputs = example_inputs(model)
    opts = {"target": target, **(options or {})}
    compiled = torch.compile(model, backend="npu_prefetch", options=opts, **kw)
    with torch.no_grad():
        expected = model(**inputs).logits
        with fxprefetch.collect_stats() as first:
            out = compiled(**inputs).logits
        with fxprefetch.collect_stats() as second:
            compiled(**inputs)
    return expected, out, first, second


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_hf_models_end_to_end(name, target, fresh_dynamo):
    model = build_model(name)
    expected, out, first, second = _run(model, target)
    if target == "eager":
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    (plan,) = fxprefetch.last_plans()
    planned = sum(r.prefetch_bytes for r in plan.prefetched)
    if target == "eager":  # the op's CPU kernel runs for each prefetch
        assert first.calls == second.calls == EXPECTED[name] == len(plan.prefetched)
        assert first.bytes_requested == planned and first.hints == 0
    else:  # hint-only on the CPU: left out of the compiled code, counted as planned hints
        assert first.hints == second.hints == EXPECTED[name] == len(plan.prefetched)
        assert first.hint_bytes == planned and first.calls == 0
    roles = plan.summary().by_role
    if name == "llama-tiny":
        assert roles == {"attn.qkv": 6, "mlp.gate_up": 4}
    else:
        assert roles == {"attn.qkv": 6, "moe.gate_up": 2}


def test_npu_target_without_torchair_fails_clearly(fresh_dynamo, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "npu"})
    with pytest.raises(Exception, match="target 'npu' needs torchair"):
        compiled(torch.randint(0, 64, (1, 4)))


def test_auto_target_is_inductor_without_npu():
    from fxprefetch.targets import resolve_target

    assert resolve_target("auto") == "inductor"
    assert resolve_target("eager") == "eager"


def test_bad_options_fail_at_compile_time(fresh_dynamo):
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(model, backend="npu_prefetch", options={"targett": "eager"})
    with pytest.raises(Exception, match=r"options\.targett: unknown option \(did you mean"):
        compiled(torch.randint(0, 64, (1, 4)))


def test_cache_never_mixes_configs(fresh_dynamo, tmp_path, monkeypatch):
    """FX graph cache on: two configs, same model, two sets of max_size values at run time."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # a native CPU prefetch keeps the prefetches in the compiled code: kernels run
    monkeypatch.setitem(fxprefetch.ops._NATIVE_PREFETCH, "cpu", lambda *args: None)
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    sizes, hits = {}, []
    counters = torch._dynamo.utils.counters  # reset() clears it: index it after each reset
    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        for ratio in (1.0, 0.5, 1.0):
            torch._dynamo.reset()
            before = counters["inductor"]["fxgraph_cache_hit"]
            opts = {
                "target": "inductor",
                "weight_prefetch_config": {"prefetch_ratio": {"attn": {"qkv": ratio}}},
            }
            compiled = torch.compile(model, backend="npu_prefetch", options=opts)
            with torch.no_grad(), fxprefetch.collect_stats(per_weight=True) as s:
                compiled(ids)
            sizes.setdefault(ratio, []).append(
                s.per_weight["layers.0.self_attn.qkv_proj.weight"].bytes_requested
            )
            hits.append(counters["inductor"]["fxgraph_cache_hit"] - before)
            (plan,) = fxprefetch.last_plans()  # on a hit too: restored from the plan store
            assert plan.summary().bytes_prefetched == s.bytes_requested
            fxprefetch.clear_plans()
    full = 96 * 32 * 4
    assert sizes == {1.0: [full, full], 0.5: [full // 2]}
    assert hits == [0, 0, 1]  # the cache was live: the repeated config hit, the other missed


def test_pass_failure_falls_back_without_prefetch(fresh_dynamo, monkeypatch, caplog):
    from fxprefetch.passes.contract import graph_pass

    @graph_pass(name="plan_prefetches")
    def boom(gm, ctx):
        raise RuntimeError("synthetic pass failure")

    swap_passes(monkeypatch, "eager", (boom,))
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    with caplog.at_level(logging.WARNING, logger="fxprefetch"), torch.no_grad():
        compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
        with fxprefetch.collect_stats() as s:
            out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    assert s.calls == 0 and "synthetic pass failure" in caplog.text
    (plan,) = fxprefetch.last_plans()
    assert not plan.records and plan.error == (
        "pass 'plan_prefetches' failed (passes run before it: none): "
        "RuntimeError: synthetic pass failure"
    )

    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "eager", "strict": True}
    )
    with pytest.raises(Exception, match=r"PrefetchPassError.*synthetic pass failure"):
        compiled(ids)


def test_partial_insertion_is_removed_on_failure(fresh_dynamo, monkeypatch):
    import fxprefetch.passes.plan_prefetches as wp

    real = wp._insert_prefetch
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("fails midway")
        return real(*args, **kwargs)

    monkeypatch.setattr(wp, "_insert_prefetch", fail_second)
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad(), fxprefetch.collect_stats() as s:
        compiled(torch.randint(0, 64, (1, 4)))
    assert s.calls == 0 and len(calls) == 2


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = SynthModel(SynthSpec(layers=1))
        self.b = nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(64, 32)})})

    def forward(self, ids):
        x = self.a(ids)
        torch._dynamo.graph_break()
        return self.b["self_attn"]["q_proj"](torch.relu(x))


def test_graph_breaks_give_one_plan_per_graph(fresh_dynamo):
    model = Broken().eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad(), fxprefetch.collect_stats() as s:
        out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    plans = fxprefetch.last_plans()
    assert len(plans) == 2
    assert [len(p.prefetched) for p in plans] == [2, 1]
    assert s.calls == 3


def test_dynamic_shapes_and_recompiles(fresh_dynamo):
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "eager"}, dynamic=True
    )
    with torch.no_grad(), fxprefetch.collect_stats() as s:
        for tokens in (3, 5, 9):
            ids = torch.randint(0, 64, (1, tokens))
            torch.testing.assert_close(compiled(ids), model(ids))
    assert s.calls == 3 * 2
    assert len(fxprefetch.last_plans()) == 1  # one dynamic graph served every length

    torch._dynamo.reset()
    fxprefetch.clear_plans()
    static = torch.compile(
        model, backend="npu_prefetch", options={"target": "eager"}, dynamic=False
    )
    with torch.no_grad():
        static(torch.randint(0, 64, (1, 3)))
        static(torch.randint(0, 64, (2, 3)))  # recompiles
    assert len(fxprefetch.last_plans()) >= 2
    assert all(len(p.prefetched) == 2 for p in fxprefetch.last_plans())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_grad_modes(mode, fresh_dynamo):
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx, fxprefetch.collect_stats() as s:
        out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    assert s.calls == 2


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_training_prefetches_in_forward_only(target, fresh_dynamo):
    torch.manual_seed(0)
    model = SynthModel(SynthSpec(layers=1)).train()
    reference = SynthModel(SynthSpec(layers=1)).train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": target})
    with fxprefetch.collect_stats() as s:
        compiled(ids).square().mean().backward()
    reference(ids).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    (plan,) = fxprefetch.last_plans()
    assert plan.graph.endswith("(forward)") and len(plan.prefetched) == 2
    # eager: two kernel calls; inductor on the CPU: two planned hints, no kernel
    assert (s.calls, s.hints) == ((2, 0) if target == "eager" else (0, 2))


def test_entry_point_works_without_importing_fxprefetch():
    code = textwrap.dedent("""
        import sys, torch
        assert "fxprefetch" not in sys.modules
        assert "npu_prefetch" in torch._dynamo.list_backends()
        m = torch.nn.Sequential(torch.nn.Linear(8, 8))
        f = torch.compile(m, backend="npu_prefetch", options={"target": "eager"})
        x = torch.randn(2, 8)
        torch.testing.assert_close(f(x), m(x))
        print("fxprefetch" in sys.modules)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().endswith("True")


def test_first_use_from_8_threads_at_once():
    """torch loads entry-point backends lazily and without a lock: 8 threads making their
    first compile with "npu_prefetch" at once all loaded it, and 7 failed with
    ``AssertionError: duplicate name: npu_prefetch``."""
    code = textwrap.dedent("""
        import sys, threading, torch
        assert "fxprefetch" not in sys.modules
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        x = torch.randn(2, 8)
        start, results = threading.Barrier(8), [None] * 8

        def work(i):
            start.wait()
            try:
                f = torch.compile(m, backend="npu_prefetch", options={"target": "eager"})
                torch.testing.assert_close(f(x), m(x))
                results[i] = "ok"
            except Exception as exc:
                results[i] = f"{type(exc).__name__}: {exc}".splitlines()[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(results)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == str(["ok"] * 8)
