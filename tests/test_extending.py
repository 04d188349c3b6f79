"""The extending page (``docs/extending.md``), its worked examples applied as written to a copy
of the package.

Each worked example is a ``diff`` block after an ``<!-- extending: NAME -->`` marker: hunks
headed ``--- PATH`` replace their context and ``-`` lines (found exactly once) with their
context and ``+`` lines; ``--- /dev/null`` / ``+++ PATH`` creates a file. The patched copy
runs in a fresh interpreter, so the examples are shown to be complete (one table and one
module each) and to work; the tests of the modules an extension touches (config, options,
rules, compile setup, pass contract) then run against the patched copy too, so none of them
pins the table an extension grows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxprefetch import ConfigError, WeightPrefetchConfig
from fxprefetch.options import parse_options

ROOT = Path(__file__).resolve().parents[1]
EXTENDING = ROOT / "docs" / "extending.md"
MARKER = re.compile(r"<!-- extending: (\w+) -->\n```diff\n(.*?)```", re.S)


def _examples() -> dict[str, str]:
    return dict(MARKER.findall(EXTENDING.read_text()))


def _installed_path(path: str) -> str:
    """Where a repository path lies in the installed package (``passes/`` is
    ``fxprefetch/passes/``)."""
    return f"fxprefetch/{path}" if path.startswith("passes/") else path


def _hunks(diff: str) -> list[tuple[str, str | None, str]]:
    """``(path, old text or None for a new file, new text)`` per hunk."""
    hunks = []
    for block in re.split(r"^--- ", diff, flags=re.M)[1:]:
        header, *lines = block.splitlines()
        if header == "/dev/null":
            path = lines.pop(0).removeprefix("+++ ")
            new = "".join(line[1:] + "\n" for line in lines)
            hunks.append((_installed_path(path), None, new))
            continue
        old = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "-"))
        new = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "+"))
        assert all(line[:1] in (" ", "-", "+") for line in lines), header
        hunks.append((_installed_path(header), old, new))
    return hunks


def _patched_copy(tmp_path: Path, example: str) -> Path:
    """A copy of the package (``passes/`` laid out as ``fxprefetch/passes/``, as installed)
    with the extending page's example applied."""
    root = tmp_path / "src"
    shutil.copytree(
        ROOT / "fxprefetch",
        root / "fxprefetch",
        ignore=lambda d, names: [
            n for n in names if n == "__pycache__" or Path(d, n) == ROOT / "fxprefetch" / "passes"
        ],
    )
    shutil.copytree(
        ROOT / "passes",
        root / "fxprefetch" / "passes",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for path, old, new in _hunks(_examples()[example]):
        target = root / path
        if old is None:
            assert not target.exists(), f"{path} exists already"
            target.write_text(new)
            continue
        text = target.read_text()
        assert text.count(old) == 1, (
            f"{path}: docs/extending.md's context is not found once:\n{old}"
        )
        target.write_text(text.replace(old, new))
    return root


# the tests that read the role table and the target registry; they must pass with either grown
SUITE_AFTER_EXTENDING = (
    "tests/test_config.py",
    "tests/test_options.py",
    "tests/test_rules.py",
    "tests/test_compile_setup.py",
    "tests/test_contract.py",
)


def _suite_passes(root: Path) -> None:
    """Run :data:`SUITE_AFTER_EXTENDING` against the patched copy at ``root``."""
    shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    pytest = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITE_AFTER_EXTENDING]
    _python(root, pytest, timeout=900)


def _python(root: Path, arguments: list[str], timeout: int) -> str:
    """Run this interpreter with ``arguments`` on the patched copy at ``root``; its stdout."""
    done = subprocess.run(
        [sys.executable, *arguments],
        capture_output=True,
        check=False,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    return done.stdout


def _run(root: Path, script: str) -> dict:
    stdout = _python(root, ["-c", textwrap.dedent(script)], timeout=600)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert Path(result.pop("package")).is_relative_to(root)  # the patched copy ran
    return result


def test_the_extending_page_has_both_worked_examples():
    assert set(_examples()) == {"role", "target"}
    files = {path for path, _, _ in _hunks(_examples()["role"])}
    assert files == {"fxprefetch/roles.py", "fxprefetch/passes/tables/role_rules.py"}
    files = {path for path, _, _ in _hunks(_examples()["target"])}
    assert files == {"fxprefetch/targets/aot_eager.py", "fxprefetch/targets/__init__.py"}


def test_a_role_is_one_table_row_and_one_rule(tmp_path):
    config = {"enabled": True, "prefetch_ratio": {"moe": {"gate_up": 0.8, "down": 0.5}}}
    with pytest.raises(ConfigError, match=r"prefetch_ratio\.moe\.down: unknown key"):
        WeightPrefetchConfig.from_dict(config)  # unknown before the change
    root = _patched_copy(tmp_path, "role")
    result = _run(
        root,
        f"""
        import json
        import fxprefetch
        from fxprefetch import PrefetchRatios, WeightPrefetchConfig
        from fxprefetch.presets import build_model, example_inputs

        model = build_model("qwen3-moe-tiny")
        inputs = example_inputs(model)
        def down(config):
            plans = fxprefetch.explain(model, config=config, **inputs)
            return [
                [r.weight_bytes, r.prefetch_bytes, r.skip_reason and str(r.skip_reason)]
                for p in plans for r in p.by_role("moe.down")
            ]
        print(json.dumps({{
            "package": fxprefetch.__file__,
            "default_ratio": PrefetchRatios().moe_down,
            "written": WeightPrefetchConfig.from_dict({config!r}).ratio("moe.down"),
            "on": down({config!r}),
            "off": down({{"enabled": True}}),
        }}))
        """,
    )
    assert result["default_ratio"] == 0.0 and result["written"] == 0.5
    assert len(result["on"]) == 2  # one experts.down_proj per layer of the tiny model
    for weight_bytes, prefetch_bytes, skipped in result["on"]:
        assert prefetch_bytes == weight_bytes // 2 and skipped is None
    assert [skipped for _, _, skipped in result["off"]] == ["ratio is 0"] * 2
    _suite_passes(root)


def test_a_target_is_one_module_and_one_registry_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"options\.target"):
        parse_options({"target": "aot_eager"})  # unknown before the change
    root = _patched_copy(tmp_path, "target")
    result = _run(
        root,
        """
        import json
        import torch
        import fxprefetch
        from fxprefetch.cli import build_parser
        from fxprefetch.presets import build_model, example_inputs
        from fxprefetch.targets import make_compile_setup

        model = build_model("llama-tiny")
        inputs = example_inputs(model)
        options = {"target": "aot_eager", "weight_prefetch_config": {"enabled": True}}
        compiled = torch.compile(model, backend="npu_prefetch", options=options)
        with torch.no_grad():
            expected = model(**inputs).logits
            compiled(**inputs)
            with fxprefetch.collect_stats() as ran:
                out = compiled(**inputs).logits
        (plan,) = fxprefetch.last_plans()
        config = fxprefetch.WeightPrefetchConfig(enabled=True)
        keys = {t: make_compile_setup(config, target=t).cache_key() for t in ("aot_eager", "eager")}
        print(json.dumps({
            "package": fxprefetch.__file__,
            "equal": torch.equal(out, expected),
            "planned": len(plan.prefetched),
            "ran": ran.calls,
            "lowering": plan.lowering,
            "cli": build_parser().parse_args(["demo", "--target", "aot_eager"]).target,
            "own_key": keys["aot_eager"] != keys["eager"],
        }))
        """,
    )
    assert result["equal"] and result["planned"] > 0
    assert result["ran"] == result["planned"]  # every planned prefetch reached the kernel
    assert result["lowering"] == "fxprefetch.prefetch, run eagerly (aot_eager)"
    assert result["cli"] == "aot_eager" and result["own_key"]
    _suite_passes(root)
