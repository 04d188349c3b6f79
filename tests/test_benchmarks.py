"""Smoke-run each benchmark script at its smallest size: it runs, prints a table and writes
JSON with its goal. (Numbers are recorded in benchmarks/README.md, never asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.compile

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = {
    "bench_pass_scaling.py": ("exponent", "compile_share"),
    "bench_compile_overhead.py": ("rows",),
    "bench_decode_latency.py": ("ratio", "planned_hints_per_step"),
    "bench_memory.py": ("ratio",),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=BENCHMARKS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "goal" in proc.stdout and "----" in proc.stdout  # a table and its goal
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["goals"]
    for key in SCRIPTS[script]:
        assert key in data
