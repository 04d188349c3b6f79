"""Every vLLM name the plugin uses, checked in vLLM 0.34.0's REAL source (the newest vLLM).

vLLM 0.34 pins torch 2.14, so it is not run here: its wheel is fetched once
(tests/support/vllm_wheel.py, pinned by sha256) and its Python files are parsed with
:mod:`ast`. The names are those fxprefetch/vllm/plugin.py, ascend.py, compiling.py and
moe.py import or read, and the plugin loading order the flag relies on (vLLM loads
``vllm.general_plugins`` before it builds a ``VllmConfig``, and again in each worker before
the worker exists). vLLM 0.32 runs them for real in tests/vllm/test_vllm.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import _required_in_ci


@pytest.fixture(scope="session")
def vllm_src() -> Path:
    from support.vllm_wheel import VllmSourceUnavailableError, fetch

    return _required_in_ci("vLLM 0.34's wheel", fetch, VllmSourceUnavailableError)


def _tree(root: Path, module: str) -> ast.Module:
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    return ast.parse(path.read_text(encoding="utf-8"))


def _names(body: list[ast.stmt], *, init_self: bool = False) -> set[str]:
    """Names a module or class body defines (defs, classes, assignments, imports), and, for
    a class, what its ``__init__`` assigns to ``self``."""
    found: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
            if init_self and node.name == "__init__":
                for sub in ast.walk(node):
                    targets = sub.targets if isinstance(sub, ast.Assign) else [
                        getattr(sub, "target", None)]  # fmt: skip
                    for t in targets:
                        if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self":
                            found.add(t.attr)
        elif isinstance(node, ast.Assign):
            found.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            found.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.If | ast.Try):  # `try: ... except ImportError` / TYPE_CHECKING
            for part in (node.body, getattr(node, "orelse", []), *[
                    h.body for h in getattr(node, "handlers", [])]):  # fmt: skip
                found |= _names(part, init_self=init_self)
    return found


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


# (module, name) or (module, "Class.member"): what the plugin imports or reads
USED = [
    ("vllm.compilation.passes.vllm_inductor_pass", "VllmInductorPass"),
    ("vllm.compilation.passes.inductor_pass", "InductorPass.uuid"),
    ("vllm.compilation.passes.inductor_pass", "get_pass_context"),
    ("vllm.compilation.passes.inductor_pass", "pass_context"),
    ("vllm.compilation.passes.inductor_pass", "PassContext.compile_range"),
    ("vllm.config.utils", "Range.start"),
    ("vllm.config.utils", "Range.end"),
    ("vllm.config", "VllmConfig"),
    ("vllm.config", "get_current_vllm_config_or_none"),
    ("vllm.config", "set_current_vllm_config"),
    ("vllm.config.vllm", "VllmConfig.__post_init__"),
    ("vllm.config.vllm", "VllmConfig.additional_config"),
    ("vllm.config.vllm", "VllmConfig.compilation_config"),
    ("vllm.config.vllm", "VllmConfig.model_config"),
    ("vllm.config.compilation", "CompilationConfig.inductor_compile_config"),
    ("vllm.config.compilation", "CompilationConfig.mode"),
    ("vllm.config.compilation", "CompilationConfig.cudagraph_mode"),
    ("vllm.config.compilation", "CompilationConfig.static_forward_context"),
    ("vllm.config.model", "ModelConfig.enforce_eager"),
    ("vllm.platforms", "current_platform"),
    ("vllm.platforms.interface", "Platform.device_type"),
    ("vllm.platforms.interface", "Platform.pass_key"),
    ("vllm.platforms.interface", "Platform.get_compile_backend"),
    ("vllm.compilation.compiler_interface", "CompilerInterface.compile"),
    ("vllm.compilation.compiler_interface", "CompilerInterface.load"),
    ("vllm.compilation.compiler_interface", "CompilerInterface.compile_factors"),
    ("vllm.forward_context", "get_forward_context"),
    ("vllm.forward_context", "is_forward_context_available"),
    ("vllm.forward_context", "ForwardContext.no_compile_layers"),
    ("vllm.utils.torch_utils", "LayerNameType"),
    ("vllm.plugins", "load_general_plugins"),
]


@pytest.mark.parametrize(("module", "name"), USED, ids=[f"{m}:{n}" for m, n in USED])
def test_vllm_0_34_has_each_name_the_plugin_uses(vllm_src, module, name):
    tree = _tree(vllm_src, module)
    owner, _, member = name.rpartition(".")
    if owner:
        assert member in _names(_class(tree, owner).body, init_self=True), name
    else:
        assert name in _names(tree.body), name


def _calls(function: ast.AST, name: str) -> bool:
    return any(
        isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name
        for n in ast.walk(function)
    )


def _method(tree: ast.Module, cls: str, method: str) -> ast.FunctionDef:
    for node in _class(tree, cls).body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            return node
    raise AssertionError(f"{cls}.{method} not found")


def test_vllm_0_34_loads_general_plugins_before_it_builds_a_config_and_in_workers(vllm_src):
    """The flag's hook is in place before vLLM builds a VllmConfig (EngineArgs.__post_init__
    loads the plugins; create_engine_config builds the config afterwards) and in each worker
    before the platform's worker (vllm-ascend's NPUWorker reads additional_config) exists."""
    args = _tree(vllm_src, "vllm.engine.arg_utils")
    assert _calls(_method(args, "EngineArgs", "__post_init__"), "load_general_plugins")
    assert _calls(_method(args, "EngineArgs", "create_engine_config"), "VllmConfig")
    worker = _tree(vllm_src, "vllm.v1.worker.worker_base")
    assert _calls(_method(worker, "WorkerWrapperBase", "init_worker"), "load_general_plugins")


def test_vllm_0_34_hashes_configs_with_compile_factors_and_refuses_compute_hash(vllm_src):
    """What changed from 0.32: the plugin calls neither (its pass is keyed by its uuid()), and
    vllm-ascend's AscendCompiler (which defines compute_hash up to 0.30.0rc2) is refused."""
    config = _tree(vllm_src, "vllm.config.vllm")
    members = _names(_class(config, "VllmConfig").body)
    assert "compile_factors" in members and "compute_hash" not in members
    compiler = _tree(vllm_src, "vllm.compilation.compiler_interface")
    interface = _class(compiler, "CompilerInterface")
    assert "compute_hash" not in _names(interface.body)
    refuse = _method(compiler, "CompilerInterface", "__init_subclass__")
    assert "compute_hash" in ast.unparse(refuse) and "TypeError" in ast.unparse(refuse)
