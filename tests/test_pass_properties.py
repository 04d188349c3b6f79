"""Property tests: generated transformer-like models, traced to aten graphs, random valid
configs; every invariant of the pass (passes/plan_prefetches.py docstring) must hold."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP as PREFETCH
from fxprefetch.passes import DEFAULT_LINEAR_OPS, strip_prefetch
from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.passes.analysis.sizing import prefetch_bytes
from fxprefetch.pipeline import run_weight_prefetch

from support.synthetic import SynthModel, SynthSpec, expected_roles
from support.tracing import export_aten, run_graph

specs = st.builds(
    SynthSpec,
    layers=st.integers(1, 4),
    hidden=st.sampled_from([16, 32, 48]),
    intermediate=st.sampled_from([32, 64, 96]),
    heads=st.just(4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    moe=st.booleans(),
    fused=st.booleans(),
    naming=st.sampled_from(["vllm", "hf"]),
    bias=st.booleans(),
    act_quant=st.booleans(),
    sdpa=st.booleans(),
)
ratios = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
configs = st.builds(
    lambda qkv, o, moe, gate_up, down, cap, sp: WeightPrefetchConfig.from_dict(
        {
            "enabled": True,
            "max_prefetch_bytes": cap,
            "sequence_parallel": sp,
            "prefetch_ratio": {
                "attn": {"qkv": qkv, "o": o},
                "moe": {"gate_up": moe},
                "mlp": {"gate_up": gate_up, "down": down},
            },
        }
    ),
    ratios,
    ratios,
    ratios,
    ratios,
    ratios,
    st.sampled_from([18 * 1024 * 1024, 4096, 1000, 1]),
    st.booleans(),
)


def _prefetch_nodes(gm):
    return list(gm.graph.find_nodes(op="call_function", target=PREFETCH))


@settings(max_examples=12, deadline=None)
@given(spec=specs, config=configs, seed=st.integers(0, 2**16))
def test_pass_invariants(spec, config, seed):
    torch.manual_seed(seed)
    model = SynthModel(spec).eval()
    ids = torch.randint(0, spec.vocab, (1, 5))
    gm, names = export_aten(model, ids)
    original = copy.deepcopy(gm)
    before_code = gm.code
    reference = run_graph(original, model, names, ids)

    matmuls = [n.name for n in gm.graph.nodes if op_name(n) in DEFAULT_LINEAR_OPS]
    plan = run_weight_prefetch(gm, config, weight_names=names)

    # every matmul-class node has exactly one record; those of explicit attention (scores,
    # values) read no weight and say so
    assert sorted(r.node for r in plan) == sorted(matmuls)
    not_weights = [r for r in plan if r.skip_reason == SkipReason.NOT_A_WEIGHT]
    assert len(not_weights) == (0 if spec.sdpa else 2 * spec.layers)

    # the graph lints and computes exactly what it computed before
    gm.graph.lint()
    out = run_graph(gm, model, names, ids)
    assert all(torch.equal(a, b) for a, b in zip(reference, out, strict=True))

    # every linear is in the plan with the role its name gives it
    roles = expected_roles(spec)
    assert {r.weight: r.role for r in plan if r not in not_weights} == roles

    nodes = _prefetch_nodes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    # at most one prefetch per linear, and one node per planned prefetch
    linears = [prefetch_meta(n).linear for n in nodes]
    assert len(linears) == len(set(linears)) == len(plan.prefetched)
    for r in plan.prefetched:
        node, linear = by_name[r.prefetch_node], by_name[r.node]
        dep = node.args[1]
        # after its dependency, before its linear and before every op of its window
        assert order[dep] < order[node] < order[linear]
        # max_size is the formula: min(int(ratio * bytes), cap)
        val = node.args[0].meta["val"]
        nbytes = val.numel() * val.element_size()
        assert r.weight_bytes == nbytes
        assert (
            node.args[2]
            == r.prefetch_bytes
            == prefetch_bytes(config.ratio(r.role), nbytes, config.max_prefetch_bytes)[0]
            > 0
        )
        assert "val" in node.meta and node.meta["val"] is None
    # what was skipped was skipped for a reason the config or graph gives
    for r in plan.skipped:
        if r in not_weights:
            continue
        if r.role is None:
            assert r.skip_reason == SkipReason.NO_ROLE
        elif config.ratio(r.role) == 0:
            assert r.skip_reason == SkipReason.ZERO_RATIO
        elif r.role == "mlp.down":
            assert not config.sequence_parallel
            assert r.skip_reason == SkipReason.NEEDS_SEQUENCE_PARALLEL
        else:
            assert r.skip_reason in (SkipReason.EMPTY_WINDOW, SkipReason.ZERO_BYTES)
            if r.skip_reason == SkipReason.EMPTY_WINDOW:
                assert r.role == "attn.o" and not spec.act_quant
    # roles that always have vector work before them are always prefetched when asked for
    for r in plan:
        if (
            r.role in ("attn.qkv", "mlp.gate_up", "moe.gate_up")
            and config.ratio(r.role) > 0
            and int(config.ratio(r.role) * r.weight_bytes) > 0
        ):
            assert r.prefetched

    # idempotent: a second run adds nothing
    count = len(gm.graph.nodes)
    again = run_weight_prefetch(gm, config, weight_names=names)
    assert len(gm.graph.nodes) == count and not again.prefetched

    # prefetches survive dead-code elimination
    gm.graph.eliminate_dead_code()
    assert len(_prefetch_nodes(gm)) == len(plan.prefetched)

    # stripping gives back the original graph
    strip_prefetch(gm)
    assert gm.code == before_code
