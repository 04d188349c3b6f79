"""Graph utilities (``analysis.graph_utils``): dynamo's source paths become dotted module paths."""

from __future__ import annotations

import pytest

from fxprefetch.passes.analysis.graph_utils import normalize_source_path


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("L['self'].model.layers[0].mlp", "model.layers.0.mlp"),
        (
            "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']",
            "model.layers.0.weight",
        ),
        ("L['args'][0].model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"),
        ("getattr(L['self'].layers, '2').mlp", "layers.2.mlp"),
        ("layers.0.mlp", "layers.0.mlp"),
    ],
)
def test_source_paths_normalize(raw, path):
    assert normalize_source_path(raw) == path
