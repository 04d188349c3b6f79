"""Graph utilities (``analysis.graph_utils``): dynamo's source paths become dotted module paths."""

from __future__ import annotations

import pytest
import torch

from fxprefetch.passes.analysis.graph_utils import module_path, normalize_source_path


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


def test_module_path_skips_modules_kept_in_globals():
    """transformers' hub kernels wrap a function (``mamba2_chunk_scan``) in a module kept in a
    Python module's globals: not a module of the model, so the node's module is the model's
    innermost one around it, never the function's name."""
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {
        "1": ("L['self'].model.layers.0.mamba", object),
        "2": ("G['__import_transformers_dot_modeling_falcon_h1'].mamba2_scan_forward", object),
        "3": ("G['__import_transformers_dot_modeling_falcon_h1'].mamba2_chunk_scan", object),
    }
    assert module_path(node) == "model.layers.0.mamba"
    node.meta["nn_module_stack"] = {"3": ("G['m'].mamba2_chunk_scan", object)}
    assert module_path(node) is None
