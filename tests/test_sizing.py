"""Sizes (``analysis.sizing``): ratio times the weight's bytes, under the cap, for each dtype."""

from __future__ import annotations

import pytest
import torch

from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.pipeline import run_weight_prefetch

from support.planning import node_named
from support.synthetic import SynthModel, SynthSpec
from support.tracing import export_aten


@pytest.mark.parametrize(
    ("ratio", "cap", "dtype"),
    [
        (1.0, 18 * 1024 * 1024, torch.float32),
        (0.5, 18 * 1024 * 1024, torch.bfloat16),
        (0.3, 1000, torch.float16),
        (0.77, 4096, torch.float32),
        (1e-6, 4096, torch.float32),
    ],
)
def test_sizes_follow_the_formula_and_cap(ratio, cap, dtype):
    model = SynthModel(SynthSpec(layers=1, hidden=64, intermediate=128, dtype=dtype)).eval()
    ids = torch.randint(0, 64, (1, 4))
    gm, names = export_aten(model, ids)
    cfg = WeightPrefetchConfig.from_dict(
        {
            "enabled": True,
            "max_prefetch_bytes": cap,
            "prefetch_ratio": {"attn": {"qkv": ratio}, "mlp": {"gate_up": ratio}},
        }
    )
    plan = run_weight_prefetch(gm, cfg, weight_names=names)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    expected = {
        "layers.0.self_attn.qkv_proj.weight": 3 * 64 * 64 * itemsize,
        "layers.0.mlp.gate_up_proj.weight": 2 * 128 * 64 * itemsize,
    }
    for r in plan:
        if r.weight not in expected:
            continue
        assert r.weight_bytes == expected[r.weight]
        wanted = int(ratio * expected[r.weight])
        if wanted == 0:
            assert r.skip_reason == SkipReason.ZERO_BYTES and not r.prefetched
            continue
        assert r.prefetch_bytes == min(wanted, cap) and r.capped == (wanted > cap)
        assert node_named(gm, r.prefetch_node).args[2] == r.prefetch_bytes
