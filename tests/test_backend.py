"""torch.compile(model, backend="npu_prefetch") end to end, on each target.

The `npu` target runs here against STAND-INS for torchair and torch_npu (tests/npu_standins.py):
no Ascend device or CANN toolkit exists on these machines."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxprefetch
from fxprefetch.models import build_model, example_inputs

from npu_standins import install_torchair_standin
from synthetic import SynthModel, SynthSpec

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
    assert first.calls == second.calls == EXPECTED[name] == len(plan.prefetched)
    assert first.bytes_requested == sum(r.prefetch_bytes for r in plan.prefetched)
    roles = plan.summary().by_role
    if name == "llama-tiny":
        assert roles == {"attn.qkv": 6, "mlp.gate_up": 4}
    else:
        assert roles == {"attn.qkv": 6, "moe.gate_up": 2}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_npu_target_lowers_to_npu_prefetch(name, fresh_dynamo, monkeypatch):
    log = install_torchair_standin(monkeypatch)
    model = build_model(name)
    expected, out, first, _ = _run(model, "npu")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (plan,) = fxprefetch.last_plans()
    (gm,) = log.graphs
    npu_nodes = list(
        gm.graph.find_nodes(op="call_function", target=torch.ops.npu.npu_prefetch.default)
    )
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.fxprefetch.prefetch.default)
    assert len(npu_nodes) == len(plan.prefetched) == EXPECTED[name]
    by_name = {r.prefetch_node: r for r in plan.prefetched}
    for node in npu_nodes:
        record = by_name[node.name]
        weight, dependency, max_size = node.args[:3]
        assert weight.op == "placeholder" and dependency is not None
        assert dependency.name == record.dependency and max_size == record.prefetch_bytes
        assert tuple(weight.meta["val"].shape) == record.weight_shape
    # the lowered graph ran: npu_prefetch (stand-in) executed, ours did not
    assert first.calls == 0
    assert len(log.prefetch_calls) == 2 * EXPECTED[name]  # two forwards
    assert all(has_dep for _, has_dep, _, _ in log.prefetch_calls)


def test_npu_target_composes_with_the_users_torchair_pass(fresh_dynamo, monkeypatch):
    log = install_torchair_standin(monkeypatch)
    import torchair

    seen = []
    cfg = torchair.CompilerConfig()
    cfg.post_grad_custom_post_pass = lambda gm, inputs, config: seen.append(
        len(gm.graph.find_nodes(op="call_function", target=torch.ops.fxprefetch.prefetch.default))
    )
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "npu", "torchair_config": cfg}
    )
    with torch.no_grad():
        compiled(torch.randint(0, 64, (1, 4)))
    assert seen == [0]  # the user's pass ran first, on the graph before ours
    assert len(log.prefetch_calls) == 2  # qkv and gate_up
    assert cfg.post_grad_custom_post_pass is not None and not hasattr(
        cfg.post_grad_custom_post_pass, "fxprefetch"
    )  # the user's config is not mutated


def test_torchair_single_stream_disables_prefetch(fresh_dynamo, monkeypatch, caplog):
    log = install_torchair_standin(monkeypatch)
    import torchair

    cfg = torchair.CompilerConfig()
    cfg.experimental_config.enable_single_stream = True
    model = SynthModel(SynthSpec(layers=1)).eval()
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        compiled = torch.compile(
            model, backend="npu_prefetch", options={"target": "npu", "torchair_config": cfg}
        )
        with torch.no_grad():
            compiled(torch.randint(0, 64, (1, 4)))
    assert "enable_single_stream" in caplog.text and not log.prefetch_calls


def test_torchair_backend_builder(fresh_dynamo, monkeypatch):
    log = install_torchair_standin(monkeypatch)
    backend = fxprefetch.torchair_backend({"prefetch_ratio": {"attn": {"qkv": 0.5}}})
    model = SynthModel(SynthSpec(layers=1)).eval()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, 64, (1, 4)))
    sizes = sorted(size for _, _, size, _ in log.prefetch_calls)
    assert sizes == sorted([int(0.5 * 96 * 32 * 4), 128 * 32 * 4])


def test_npu_target_without_torchair_fails_clearly(fresh_dynamo, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", None)
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    model = SynthModel(SynthSpec(layers=1)).eval()
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "npu"})
    with pytest.raises(Exception, match="target 'npu' needs torchair"):
        compiled(torch.randint(0, 64, (1, 4)))


def test_auto_target_is_inductor_without_npu():
    from fxprefetch.backend import resolve_target

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
    from fxprefetch import planner

    def boom(*args, **kwargs):
        raise RuntimeError("synthetic pass failure")

    monkeypatch.setattr(planner, "run_weight_prefetch", boom)
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    with caplog.at_level(logging.WARNING, logger="fxprefetch"), torch.no_grad():
        compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
        with fxprefetch.collect_stats() as s:
            out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    assert s.calls == 0 and "synthetic pass failure" in caplog.text
    (plan,) = fxprefetch.last_plans()
    assert plan.error == "RuntimeError: synthetic pass failure" and not plan.records

    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"target": "eager", "strict": True}
    )
    with pytest.raises(Exception, match=r"PrefetchPassError.*synthetic pass failure"):
        compiled(ids)


def test_partial_insertion_is_removed_on_failure(fresh_dynamo, monkeypatch):
    import passes.weight_prefetch as wp

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
    assert s.calls == 2


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


def test_compile_mode_reaches_torchair(monkeypatch):
    """torch.compile refuses mode= with options= for custom backends, so call the backend as
    dynamo does (torchair users can also set the mode on their own CompilerConfig)."""
    from fxprefetch.backend import npu_prefetch

    log = install_torchair_standin(monkeypatch)
    import torchair

    def capture(compiler_config):
        log.configs.append(compiler_config)
        return lambda gm, inputs: gm

    monkeypatch.setattr(torchair, "get_npu_backend", capture)
    gm = torch.fx.symbolic_trace(SynthModel(SynthSpec(layers=1)))
    npu_prefetch(
        gm, [torch.randint(0, 64, (1, 4))], options={"target": "npu"}, mode="reduce-overhead"
    )
    (cfg,) = log.configs
    assert cfg.mode == "reduce-overhead"
    assert getattr(cfg.post_grad_custom_post_pass, "fxprefetch", False)  # our pass composed
