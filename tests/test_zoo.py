"""The model zoo (``tests/support/zoo.py``): every family transformers ships that the zoo
lists, as a tiny random-weight model, through the pass.

Each family is exported to the aten graph the backend's pass receives, planned with every
ratio of its own and a cap that some weights exceed, and run with the op's eager kernels
(each prefetch that runs is counted): outputs equal the unmodified graph's (and eager's),
every prefetch reads a parameter, its bytes are exactly ``min(int(ratio x bytes), cap)``,
the prefetches that ran are those the plan lists, and every linear of every layer gets the
role the zoo expects (a rule change that drops one fails here). A few families are also
compiled end to end with ``torch.compile``: with a graph break inside each layer, where
dynamo compiles one graph for every layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fxprefetch
from fxprefetch import WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.passes.analysis.roles import layer_index
from fxprefetch.pipeline import run_weight_prefetch

from support.zoo import ZOO, Family, build, roles_table, trace

transformers = pytest.importorskip("transformers")

RATIOS = {
    "attn": {"qkv": 1.0, "o": 0.5},
    "moe": {"gate_up": 0.8},
    "mlp": {"gate_up": 0.75, "down": 0.3},
}
CAP = 20_000  # below some weights' ratio x bytes, so the cap is exercised
CONFIG = WeightPrefetchConfig.from_dict(
    {
        "enabled": True,
        "prefetch_ratio": RATIOS,
        "max_prefetch_bytes": CAP,
        "sequence_parallel": True,
        "windows": ["vector", "attention"],
    }
)
QKV_ROLE = "attn.qkv"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def _built(family: Family):
    built = build(family)
    if isinstance(built, str):
        pytest.skip(built)
    return built


def _after_layer(path: str) -> str | None:
    """``model.layers.1.self_attn.q_proj`` -> ``self_attn.q_proj`` (None outside a layer)."""
    m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\.(.+)$", path)
    return m.group(1) if m else None


def _expected_bytes(record) -> int:
    return min(int(record.ratio * record.span_bytes), CAP)


@pytest.mark.parametrize("family", ZOO, ids=[f.name for f in ZOO])
def test_family_through_the_pass(family):
    model, args, kwargs = _built(family)
    with torch.no_grad():
        eager = model(*args, **kwargs)
        eager = _first(eager)
        gm, names, state = trace(model, args, kwargs)
        reference = gm(state, *args)
        plan = run_weight_prefetch(gm, CONFIG, weight_names=names)
        with fxprefetch.collect_stats() as stats:
            out = gm(state, *args)
    # outputs: the unmodified graph's, bit for bit, and eager's
    assert torch.equal(out, reference)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    # planned equals ran, bytes exact
    assert plan.prefetched, family.name
    assert stats.calls == len(plan.prefetched)
    assert stats.bytes_requested == sum(r.prefetch_bytes for r in plan.prefetched)
    for record in plan.prefetched:
        assert record.prefetch_bytes == _expected_bytes(record), record
        assert record.capped == (int(record.ratio * record.span_bytes) > CAP), record
    # nothing but parameters: every prefetch node reads a placeholder holding a parameter
    params = dict(model.named_parameters())
    for node in gm.graph.find_nodes(op="call_function", target=PREFETCH_OP):
        weight = node.args[0]
        while weight.op != "placeholder":
            weight = weight.args[0]
        assert names.get(weight.name) in params, (family.name, node)
    # every linear of every layer has the role the zoo expects, and the zoo lists each one
    roles = {}
    layers = set()
    for record in plan.records:
        path = record.module or record.weight
        inside = _after_layer(path.removesuffix(".weight"))
        if inside is None:
            continue
        layers.add(layer_index(path))
        assert roles.setdefault(inside, record.role) == record.role, (family.name, path)
    assert roles == dict(family.roles), family.name
    assert len(layers) == 2, family.name


def test_docs_list_the_zoo():
    """docs/architectures.md shows the zoo's table as it is."""
    text = DOCS.read_text()
    assert roles_table() in text, "regenerate the table: tests/support/zoo.py roles_table()"


# -- compiled end to end ---------------------------------------------------------------------


def _first(output):
    """A model's first output (a tuple's first item, a ModelOutput's first field)."""
    return output[0] if isinstance(output, tuple) else next(iter(output.values()))


def _compile_and_run(model, target, args, kwargs):
    options = {"target": target, "weight_prefetch_config": CONFIG.to_dict()}
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        with fxprefetch.collect_stats(per_weight=True) as stats:
            out = compiled(*args, **kwargs)
    torch.testing.assert_close(_first(out), _first(expected), rtol=1e-4, atol=1e-4)
    return fxprefetch.last_plans(), stats


def _planned(plans) -> list[tuple[str, int]]:
    """Every prefetch the plans list per call of the model, by the weight of each call site
    (a graph run by several modules: once per module)."""
    planned = []
    for plan in plans:
        sites = plan.call_sites or [None]
        for record in plan.prefetched:
            for site in sites:
                weight = record.weight
                if site is not None and site != sites[0]:
                    weight = site + weight.removeprefix(sites[0])
                planned.append((weight, record.prefetch_bytes))
    return sorted(planned)


def _assert_planned_ran(model, plans, stats) -> None:
    """Every prefetch the plans list (a graph that dynamo compiled for one layer's frame and
    runs for every layer: once per call site, by that layer's weight) reads a parameter and
    runs, with its bytes; per-weight stats name each by its parameter path."""
    planned = _planned(plans)
    params = dict(model.named_parameters())
    assert planned and all(weight in params for weight, _ in planned)
    assert stats.calls + stats.hints == len(planned)  # planned equals ran
    assert stats.bytes_requested + stats.hint_bytes == sum(n for _, n in planned)
    ran = [name for name, w in stats.per_weight.items() for _ in range(w.calls + w.hints)]
    assert sorted(ran) == [weight for weight, _ in planned]


# a graph break inside every block (the vision tower's .tolist()), and a family through
# inductor (on the CPU its prefetches are counted as planned hints)
@pytest.mark.compile
@pytest.mark.parametrize(
    ("name", "target"), [("Qwen2.5-VL (vision tower)", "eager"), ("BERT", "inductor")]
)
def test_compiled_end_to_end(fresh_dynamo, name, target):
    model, args, kwargs = _built(next(f for f in ZOO if f.name == name))
    plans, stats = _compile_and_run(model, target, args, kwargs)
    _assert_planned_ran(model, plans, stats)


@pytest.mark.compile
def test_one_graph_for_every_layer_names_each_layers_weights(fresh_dynamo):
    """A graph break inside each decoder layer (experts looped over in Python): dynamo
    compiles the layer's frame once and runs that graph for both layers. The plan names the
    weights and modules by parameter path, lists both layers as call sites and, in each
    record's note, both layers' weights, and every prefetch that runs."""
    family = next(f for f in ZOO if f.name == "Qwen3-MoE")
    model, args, kwargs = _built(family)
    model.set_experts_implementation("eager")
    plans, stats = _compile_and_run(model, "eager", args, kwargs)
    (layer,) = [p for p in plans if any(r.role == QKV_ROLE for r in p.records)]
    assert layer.call_sites == ["model.layers.0", "model.layers.1"]
    q = next(r for r in layer.records if r.weight.endswith("q_proj.weight"))
    assert q.weight == "model.layers.0.self_attn.q_proj.weight" and q.layer == 0
    assert q.module == "model.layers.0.self_attn.q_proj"
    assert "model.layers.1.self_attn.q_proj.weight" in q.note
    assert "one graph for 2 call sites" in layer.summary_line()
    (router,) = [p for p in plans if any(r.weight.endswith("mlp.gate.weight") for r in p.records)]
    assert router.records[0].weight == "model.layers.0.mlp.gate.weight"
    _assert_planned_ran(model, plans, stats)


class _Layer(torch.nn.Module):
    """A decoder layer whose ``forward`` names its receiver ``s``, with a graph break."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.input_layernorm = torch.nn.RMSNorm(hidden)
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.post_attention_layernorm = torch.nn.RMSNorm(hidden)
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(s, x):  # noqa: N805 (the receiver's name is what is tested)
        x = x + s.self_attn.q_proj(s.input_layernorm(x))
        torch._dynamo.graph_break()
        return x + s.mlp.gate_proj(s.post_attention_layernorm(x))


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return (x,)


@pytest.mark.compile
def test_one_graph_for_every_layer_whatever_its_receiver_is_named(fresh_dynamo):
    """A layer's ``forward(s, x)``: its frame's graphs (before and after the graph break)
    still list every layer as a call site and name the weights by parameter path."""
    model = _Decoder()
    plans, stats = _compile_and_run(model, "eager", (torch.randn(4, 16),), {})
    assert len(plans) == 2
    assert all(p.call_sites == ["model.layers.0", "model.layers.1"] for p in plans)
    assert {r.weight for p in plans for r in p.prefetched} == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
    }
    _assert_planned_ran(model, plans, stats)
