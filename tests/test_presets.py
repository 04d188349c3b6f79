"""Model presets: the catalog, building a preset or a config.json, example inputs."""

from __future__ import annotations

import json

import pytest
import torch

from fxprefetch.presets import (
    PRESETS,
    ModelError,
    build_model,
    example_inputs,
    load_config,
    preset_names,
)


def test_the_catalog_has_tiny_and_real_size_presets():
    tiny, real = preset_names(tiny=True), preset_names(tiny=False)
    assert {"llama-tiny", "qwen3-moe-tiny", "mixtral-tiny"} <= set(tiny)
    assert "llama-3-8b" in real and not set(tiny) & set(real)
    assert set(preset_names()) == set(PRESETS) == {*tiny, *real}
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description


def test_load_config_cuts_layers_and_names_unknown_models():
    config = load_config("llama-3-8b", layers=3)
    assert (config.num_hidden_layers, config.hidden_size) == (3, 4096)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_config("nope")
    with pytest.raises(ModelError, match="--layers must be at least 1, got 0"):
        load_config("llama-tiny", layers=0)


def test_a_config_json_with_bad_fields_is_a_model_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": -4}))
    with pytest.raises(ModelError, match="hidden_size must not be negative, got -4"):
        load_config(str(tmp_path))  # a directory: its config.json
    path.write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ModelError, match="no 'model_type'"):
        load_config(str(path))


def test_tiny_presets_build_on_the_cpu_and_real_sizes_on_meta():
    tiny = build_model("llama-tiny")
    weight = next(tiny.parameters())
    assert (weight.device.type, weight.dtype) == ("cpu", torch.float32)
    inputs = example_inputs(tiny, tokens=5, batch=2)
    assert inputs["input_ids"].shape == (2, 5) and inputs["use_cache"] is False
    assert torch.equal(inputs["input_ids"], example_inputs(tiny, tokens=5, batch=2)["input_ids"])
    big = build_model("llama-3-8b", layers=1)
    weight = next(big.parameters())
    assert (weight.device.type, weight.dtype) == ("meta", torch.bfloat16)
    assert example_inputs(big, tokens=3)["input_ids"].device.type == "meta"
