"""The demo: a tiny preset compiled with the backend, its plan shown, its outputs compared."""

from __future__ import annotations

import pytest

from fxprefetch import ConfigError
from fxprefetch.demo import run_demo

pytest.importorskip("transformers")


def test_bad_options_fail_before_anything_is_built(monkeypatch):
    from fxprefetch import demo

    def no_build(*args, **kwargs):
        raise AssertionError("built a model for options that are not valid")

    monkeypatch.setattr(demo, "build_model", no_build)
    with pytest.raises(ConfigError, match=r"options\.target"):
        run_demo("llama-tiny", {"target": "gpu"})
    with pytest.raises(ConfigError, match=r"prefetch_ratio\.mlp\.down"):
        run_demo(
            "llama-tiny",
            {"weight_prefetch_config": '{"prefetch_ratio": {"mlp": {"down": 2}}}'},
        )


@pytest.mark.compile
def test_the_demo_matches_eager_and_counts_every_prefetch(fresh_dynamo):
    result = run_demo("llama-tiny", {"target": "eager"})
    assert result.passed
    lines = result.text.splitlines()
    assert (
        lines[0] == 'llama-tiny compiled with torch.compile(backend="npu_prefetch"), target eager:'
    )
    assert "outputs match eager: yes" in result.text
    assert "prefetches planned per forward: 10" in lines
    assert "  reached the prefetch kernel: 10" in result.text
