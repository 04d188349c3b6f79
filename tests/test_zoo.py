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
from fxprefetch.passes import run_weight_prefetch
from fxprefetch.passes.analysis.roles import layer_index

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
        eager = eager[0] if isinstance(eager, tuple) else next(iter(eager.values()))
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
