"""The package's shape: what it installs, and which module may import which.

- The wheel installs one top-level package, ``fxprefetch`` (``passes/`` becomes
  ``fxprefetch.passes``), and its console script.
- Inside ``fxprefetch.passes`` the rooms import downward only: tables <- analysis <- passes;
  all three may use fxprefetch's core, and nothing above it (pipeline, planner, targets,
  backend, the vLLM modules, the CLI).
- No import circle among fxprefetch's modules, counting the imports deferred into functions
  (a deferred import that closes a circle only hides it); imports for type checkers alone
  (``if TYPE_CHECKING:``) run nothing and are not counted. Inside ``fxprefetch.passes`` no
  import is deferred into a function at all.
- Tests follow the modules: each pass, each analysis and ``tables/rules.py`` has its
  ``tests/test_<module>.py``, or an entry in :data:`TESTED_ELSEWHERE` naming the file that
  tests it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSES = ROOT / "passes"
# fxprefetch's core: what the passes may read (the config, the ops' schemas, the plan, the
# prediction model, the role names)
CORE = {
    "fxprefetch.config",
    "fxprefetch.ops",
    "fxprefetch.plan",
    "fxprefetch.devices.prediction",
    "fxprefetch.roles",
    "fxprefetch.validation",
}
ROOMS = {"tables": 0, "analysis": 1, "": 2}  # "": the passes themselves, at passes/*.py
TESTS = ROOT / "tests"
# modules of passes/ without a test file of their own, and the file that tests each
TESTED_ELSEWHERE = {
    "hidden_weights": "vllm/test_vllm_moe.py",  # vLLM's fused MoE looks its experts up by name
    "token_bounds": "vllm/test_vllm_moe.py",  # token bounds on vLLM's static and dynamic graphs
    "prefetch_meta": "test_invariants.py",  # every record is typed; untyped ones are caught
    "weight_sources": "test_linears.py",  # only stored weights are prefetched
}


def _module_name(path: Path) -> str:
    """The installed name of a source file of fxprefetch or passes/."""
    if path.is_relative_to(PASSES):
        parts = ("fxprefetch", "passes", *path.relative_to(PASSES).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*(ROOT / "fxprefetch").rglob("*.py"), *PASSES.rglob("*.py")]
    return {
        _module_name(p): p
        for p in files
        if "__pycache__" not in p.parts and (ROOT / "fxprefetch" / "passes") not in p.parents
    }


def _type_checking_only(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports only type checkers run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return name == "TYPE_CHECKING"


def _walk_running(node: ast.AST):
    """Every node under ``node`` that runs, leaving out ``if TYPE_CHECKING:`` bodies."""
    yield node
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            for alternative in child.orelse:
                yield from _walk_running(alternative)
        else:
            yield from _walk_running(child)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """fxprefetch modules ``path`` imports when it runs (at module level only, or anywhere,
    functions included); imports under ``if TYPE_CHECKING:`` are not counted."""
    tree = ast.parse(path.read_text())
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    if top_level_only:  # module level, including inside top-level try/if blocks
        nodes = [n for s in tree.body if not isinstance(s, scopes) for n in _walk_running(s)]
    else:
        nodes = list(_walk_running(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "fxprefetch"}


def _room(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["fxprefetch", "passes"]:
        return None
    if len(parts) > 2 and parts[2] in ("tables", "analysis"):
        return ROOMS[parts[2]]
    return ROOMS[""] if len(parts) > 2 else None


def test_passes_import_downward_only():
    modules = _sources()
    for name, path in sorted(modules.items()):
        room = _room(name)
        if room is None:
            continue
        for imported in _imports(path, top_level_only=False):
            if imported not in modules:
                continue  # a name imported from a module ("from m import name")
            target = _room(imported)
            if target is None:
                assert imported in CORE or imported == "fxprefetch", (
                    f"{name} imports {imported}, above fxprefetch's core"
                )
            else:
                assert target <= room, f"{name} imports {imported} from a room above it"


def test_no_import_deferred_into_a_function_in_passes():
    modules = _sources()
    for name, path in sorted(modules.items()):
        if _room(name) is None:
            continue
        deferred = _imports(path, top_level_only=False) - _imports(path, top_level_only=True)
        assert not {m for m in deferred if m in modules}, f"{name} defers {sorted(deferred)}"


def test_no_import_circle():
    modules = _sources()
    graph = {
        name: {m for m in _imports(path, top_level_only=False) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's __init__ importing its own children is not a circle through them
    graph = {
        name: {m for m in found if not m.startswith(name + ".")} for name, found in graph.items()
    }
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _modules_needing_tests() -> list[str]:
    """Each pass, each analysis and the rules: the modules of passes/ that do something."""
    files = [*PASSES.glob("*.py"), *(PASSES / "analysis").glob("*.py"), PASSES / "tables/rules.py"]
    return sorted(p.stem for p in files if p.stem != "__init__")


def test_each_pass_and_analysis_has_its_test_file():
    modules = _modules_needing_tests()
    assert {"plan_prefetches", "windows", "rules"} <= set(modules)  # the walk finds them
    missing = [
        m for m in modules if m not in TESTED_ELSEWHERE and not (TESTS / f"test_{m}.py").exists()
    ]
    assert not missing, f"no tests/test_<module>.py (nor an entry in TESTED_ELSEWHERE): {missing}"


def test_the_tested_elsewhere_list_names_real_modules_and_files():
    modules = _modules_needing_tests()
    for module, test_file in TESTED_ELSEWHERE.items():
        assert module in modules, f"TESTED_ELSEWHERE names {module}, not a module of passes/"
        assert not (TESTS / f"test_{module}.py").exists(), f"{module} has its own test file now"
        assert (TESTS / test_file).is_file(), f"{module}: {test_file} does not exist"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("fxprefetch-*.whl"))


def test_the_wheel_installs_fxprefetch_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"fxprefetch"}
    # every source module of the checkout is in it, under its installed name
    for module in _sources():
        stem = module.replace(".", "/")
        assert f"{stem}.py" in names or f"{stem}/__init__.py" in names, module
    info = dist_info.pop()
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "fxprefetch = fxprefetch.cli:main" in entry_points
    assert "npu_prefetch = fxprefetch.backend:npu_prefetch" in entry_points
    for data in (
        "fxprefetch/py.typed",
        "fxprefetch/plan/plan_schema.json",
        "fxprefetch/passes/py.typed",
    ):
        assert data in names
