"""The package's shape: what it installs, and which module may import which.

- The wheel installs one top-level package, ``fxprefetch`` (``passes/`` becomes
  ``fxprefetch.passes``), and its console script.
- Inside ``fxprefetch.passes`` the rooms import downward only: tables <- analysis <- passes;
  all three may use fxprefetch's core, and nothing above it (pipeline, planner, targets,
  backend, the vLLM modules, the CLI).
- fxprefetch's rooms import downward only, in the order of :data:`LAYERS` (core <- plan <-
  devices <- passes <- driver <- targets <- vllm <- front ends), counting every import: at
  module level, deferred into a function, and made only for type checkers.
- No import circle of any kind among fxprefetch's modules: imports deferred into functions
  and imports for type checkers (``if TYPE_CHECKING:``) count (either only hides a circle).
  Inside ``fxprefetch.passes`` no import is deferred into a function at all.
- Tests follow the modules: each pass, each analysis and ``tables/rules.py`` has its
  ``tests/test_<module>.py``, or an entry in :data:`TESTED_ELSEWHERE` naming the file that
  tests it; each module of fxprefetch's core has ``tests/test_<module>.py`` and each module of
  a room ``fxprefetch/<room>/`` has ``tests/<room>/test_<module>.py``, or an entry in
  :data:`MIRRORED_ELSEWHERE`.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PASSES = ROOT / "passes"
# fxprefetch's core: what the passes may read (the config, the ops' schemas, the plan, the
# prediction model, the role names)
CORE = {
    "fxprefetch.config",
    "fxprefetch.errors",
    "fxprefetch.ops",
    "fxprefetch.plan",
    "fxprefetch.devices.prediction",
    "fxprefetch.devices.setup",
    "fxprefetch.roles",
    "fxprefetch.validation",
}
ROOMS = {"tables": 0, "analysis": 1, "": 2}  # "": the passes themselves, at passes/*.py
# fxprefetch's layers, lowest first: a module imports only from its own layer and those
# before it. A module belongs to the layer of the longest prefix naming it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # data and checks, the op's schema and kernels, counters; the model presets (torch only)
    ("core", ("fxprefetch.errors", "fxprefetch.validation", "fxprefetch.roles",
              "fxprefetch.config", "fxprefetch.runtime_stats", "fxprefetch.ops",
              "fxprefetch.presets")),
    ("plan", ("fxprefetch.plan",)),  # what the pass saw and did, as data and text
    # setup, profiles, the prediction model, CUDA kernel; the timeline and the predicted step
    # draw a plan in a device's predicted microseconds, so they sit here though they live in
    # plan/
    ("devices", ("fxprefetch.devices", "fxprefetch.plan.timeline",
                 "fxprefetch.plan.predicted_step")),
    ("passes", ("fxprefetch.passes",)),  # tables <- analysis <- passes (checked below)
    # the driver: runs the passes, fixes a compile's setup, plans graphs, keeps plans. The plan
    # store lives in plan/ but keeps the pipeline's reports between compiles: it sits here.
    ("driver", ("fxprefetch.pipeline", "fxprefetch.compile_setup", "fxprefetch.planner",
                "fxprefetch.counting", "fxprefetch.call_sites", "fxprefetch.plan.store")),
    ("targets", ("fxprefetch.targets", "fxprefetch.dynamo_registry")),
    ("vllm", ("fxprefetch.vllm", "fxprefetch.vllm_plugin")),
    ("front ends", ("fxprefetch.options", "fxprefetch.backend", "fxprefetch.isolated_compile",
                    "fxprefetch.explainer", "fxprefetch.demo", "fxprefetch.cli",
                    "fxprefetch.__main__", "fxprefetch")),
)  # fmt: skip
TESTS = ROOT / "tests"
# modules of passes/ without a test file of their own, and the file that tests each
TESTED_ELSEWHERE = {
    "hidden_weights": "vllm/test_moe.py",  # vLLM's fused MoE looks its experts up by name
    "prefetch_meta": "test_invariants.py",  # every record is typed; untyped ones are caught
    "weight_sources": "test_linears.py",  # only stored weights are prefetched
    "native_lowering": "test_lower_native.py",  # forks, tokens and orders of both lowerings
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


def _declares_a_pass(path: Path) -> bool:
    """Whether ``path`` defines a ``@graph_pass`` (decorated by ``graph_pass(...)``)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                call = decorator.func if isinstance(decorator, ast.Call) else decorator
                if getattr(call, "id", None) == "graph_pass":
                    return True
    return False


def test_no_pass_imports_another_pass():
    """What two passes share lives in analysis/ (or tables/): a pass module imports no
    module that declares a pass."""
    modules = _sources()
    passes = {name for name, path in modules.items() if _declares_a_pass(path)}
    assert {"fxprefetch.passes.plan_prefetches", "fxprefetch.passes.lower_npu"} <= passes
    for name in sorted(passes):
        imported = _imports(modules[name], top_level_only=False) & passes
        assert not imported - {name}, f"{name} imports the pass module(s) {sorted(imported)}"


def test_no_import_deferred_into_a_function_in_passes():
    modules = _sources()
    for name, path in sorted(modules.items()):
        if _room(name) is None:
            continue
        deferred = _imports(path, top_level_only=False) - _imports(path, top_level_only=True)
        assert not {m for m in deferred if m in modules}, f"{name} defers {sorted(deferred)}"


def _imported_modules(path: Path, modules: Mapping[str, Path]) -> set[str]:
    """Every fxprefetch module ``path`` imports, of any kind: at module level, in a function,
    or for type checkers alone. ``from package import module`` imports the module (the
    package's ``__init__`` runs for any of its modules; it is not counted)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # names defined by the module itself
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


def _layer(module: str) -> int:
    best = max(
        ((len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS)
         for prefix in prefixes if module == prefix or module.startswith(prefix + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[1]


def test_every_module_has_a_layer_and_every_layer_entry_names_modules():
    modules = _sources()
    for name in modules:
        _layer(name)
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(m == prefix or m.startswith(prefix + ".") for m in modules), (
                f"LAYERS[{layer!r}] names {prefix}, which is no module"
            )


def test_rooms_import_downward_only():
    """Counting deferred imports and imports for type checkers."""
    modules = _sources()
    upward = [
        f"{name} ({LAYERS[_layer(name)][0]}) imports {imported} ({LAYERS[_layer(imported)][0]})"
        for name, path in sorted(modules.items())
        for imported in sorted(_imported_modules(path, modules))
        if _layer(imported) > _layer(name)
    ]
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_import_circle():
    """Of any kind: deferred imports and imports for type checkers count."""
    modules = _sources()
    graph = {name: _imported_modules(path, modules) - {name} for name, path in modules.items()}
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


# modules of fxprefetch (outside passes/) without their mirrored test file, and the files
# (relative to tests/) that test each
MIRRORED_ELSEWHERE = {
    "fxprefetch.__main__": ("test_cli.py",),  # ``python -m fxprefetch`` is the CLI
    "fxprefetch.dynamo_registry": ("test_backend.py",),  # the backend's registration
    "fxprefetch.isolated_compile": ("test_explainer.py",),  # explain() compiles in isolation
    "fxprefetch.plan.predicted_step": ("devices/test_prediction.py",),  # beside the model's
    "fxprefetch.plan.schema": ("test_cli.py",),  # agrees with jsonschema on the shipped schema
    "fxprefetch.presets.build": ("test_presets.py",),
    "fxprefetch.presets.catalog": ("test_presets.py",),
    "fxprefetch.targets": ("test_compile_setup.py",),  # the registry and make_compile_setup()
    "fxprefetch.targets.eager": ("test_backend.py",),
    "fxprefetch.targets.inductor": ("test_backend.py",),
    "fxprefetch.targets.npu": ("test_torchair.py",),
    "fxprefetch.vllm.compiling": ("vllm/test_vllm_ops.py",),  # the compile range the pass sees
    "fxprefetch.vllm.plugin": ("vllm/test_vllm.py", "vllm/test_vllm_ops.py"),  # real vLLM
    "fxprefetch.vllm_plugin": ("vllm/test_ascend.py",),  # the user-facing alias
    # a shared layer graph's call sites, on real models that graph-break per layer
    "fxprefetch.call_sites": ("test_zoo.py",),
    # the hardware devices need a GPU/NPU; the simulated one drives the same measuring code
    "fxprefetch.devices.calibrate_hw": ("devices/test_calibrate.py",),
    "fxprefetch.devices.calibrate_sim": ("devices/test_calibrate.py",),
    # the prefetch stream's fork/join, on the stand-in NPU stream runtime
    "fxprefetch.devices.npu_streams": ("test_lower_npu.py", "test_torchair.py"),
}


def _mirrored_test(module: str) -> Path | None:
    """``tests/test_<module>.py`` for a core module, ``tests/<room>/test_<module>.py`` for a
    module of a room; None for a package's ``__init__`` that only gathers names."""
    parts = module.split(".")[1:]
    if not parts or module == "fxprefetch.passes" or parts[0] == "passes":
        return None  # passes/: test_each_pass_and_analysis_has_its_test_file
    if module in ("fxprefetch.plan", "fxprefetch.devices", "fxprefetch.vllm", "fxprefetch.presets"):
        return None  # re-exports only
    return TESTS.joinpath(*parts[:-1], f"test_{parts[-1]}.py")


def test_tests_mirror_the_rooms():
    missing = [
        f"{module}: {test.relative_to(ROOT)}"
        for module in sorted(_sources())
        if (test := _mirrored_test(module)) is not None
        and module not in MIRRORED_ELSEWHERE
        and not test.is_file()
    ]
    assert not missing, "no mirrored test file (nor an entry in MIRRORED_ELSEWHERE):\n" + (
        "\n".join(missing)
    )


def test_the_mirrored_elsewhere_list_names_real_modules_and_files():
    modules = _sources()
    for module, test_files in MIRRORED_ELSEWHERE.items():
        assert module in modules, f"MIRRORED_ELSEWHERE names {module}, not a module"
        own = _mirrored_test(module)
        assert own is None or not own.is_file(), f"{module} has its own test file now"
        for test_file in test_files:
            assert (TESTS / test_file).is_file(), f"{module}: {test_file} does not exist"


def test_no_two_test_files_share_a_name():
    """pytest imports test files by their base name (tests/ has no ``__init__.py``)."""
    names = [p.name for p in TESTS.rglob("test_*.py") if "support" not in p.parts]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


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


def test_one_meaning_per_name():
    """A public name means one thing: a name two modules export is the same object, and no
    function or value is named like another module of fxprefetch."""
    import importlib

    names = sorted(n for n in _sources() if n != "fxprefetch.__main__")  # that one runs the CLI
    modules = {n: importlib.import_module(n) for n in names}
    seen: dict[str, tuple[str, object]] = {}
    clashes = []
    for name, module in modules.items():
        for public in getattr(module, "__all__", ()):
            value = getattr(module, public)
            # a module's one job may carry its name (a pass, ``compiling()``); another's may not
            others = [
                m
                for m in modules
                if m.rsplit(".", 1)[-1] == public
                and m != name
                and getattr(modules[m], public, None) is not value  # a package re-exporting it
            ]
            if others and not inspect.ismodule(value):
                clashes.append(f"{name}.{public} is named like the module {others[0]}")
            first = seen.setdefault(public, (name, value))
            if first[1] is not value:
                clashes.append(f"{name}.{public} is not {first[0]}.{public}")
    assert not clashes, "\n".join(clashes)


def test_the_ci_scripts_name_test_files_that_exist():
    """`.ci/run` and `.ci/torch-compat` name test files by path: a move of a test file (the
    rooms) must move them too, or the job silently runs fewer tests (pytest errors on a
    missing path only when it is the one named)."""
    named = {
        path
        for script in (ROOT / ".ci").iterdir()
        for path in re.findall(r"tests/[\w/]+\.py", script.read_text())
    }
    assert named, "the CI scripts name no test file: update this test"
    assert not [p for p in sorted(named) if not (ROOT / p).is_file()]
