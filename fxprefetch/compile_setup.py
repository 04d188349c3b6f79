"""One compile's setup: everything fixed before the passes run, and the key it makes.

The backend, :func:`fxprefetch.explain` and the vLLM pass each build a :class:`CompileSetup`
with :func:`fxprefetch.targets.make_compile_setup`, the one place where the target (``auto``),
the rules (the current ones where none are given) and the devices' setup are resolved (it
sits above the target registry, which this value stays below). A
:class:`fxprefetch.planner.GraphPlanner` runs the pipeline under it.

Its cache key (:meth:`CompileSetup.cache_key`) is derived, never listed by hand: every field
of the setup, serialised generically (values with a ``digest`` give it, device profiles their
``key()``, dataclasses their fields), plus the source of every module the target's passes
run from and read (the passes, the analyses and tables, the driver), plus whatever a caller
adds per compile (dynamo's weight names, the user's passes, vLLM's bound config).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import hashlib
import importlib.util
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fxprefetch.passes as passes_package
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.pipeline import Pipeline

_PACKAGE_ROOT = Path(__file__).parent
_PASSES_ROOT = Path(passes_package.__file__).parent  # passes/ (fxprefetch/passes installed)
# the driver around the passes: how they are run, what they insert, what the plans hold, and
# the targets' lowerings
_DRIVER_FILES = ("pipeline.py", "planner.py", "ops.py", "plan/records.py", "targets/*.py")


@dataclasses.dataclass(frozen=True)
class CompileSetup:
    """Everything a compile fixes before the passes run: what they read, hence the cache key.

    Per-graph things (dynamo's weight names, the graph's name) stay with the planner.
    """

    config: WeightPrefetchConfig
    rules: PrefetchRules
    pipeline: Pipeline  # the target's (fxprefetch.targets.TARGET_SPECS), never "auto"'s
    devices: DeviceSetup = dataclasses.field(default_factory=DeviceSetup)
    strict: bool = False  # raise where the pass fails, instead of compiling without prefetch
    split_at_attention: bool = False  # the caller splits graphs at attention (vLLM)
    cudagraphs: bool = False  # the compiled graph is replayed as a CUDA graph

    @property
    def target(self) -> str:
        """The target's name (a key of ``fxprefetch.targets.TARGET_SPECS``)."""
        return self.pipeline.target

    def cache_key(self, *parts: str) -> str:
        """The compile-cache key: every field, the source of the passes that run
        (:func:`pass_source_files`), and ``parts`` (what the caller adds)."""
        h = hashlib.sha256()
        h.update(json.dumps(canonical(self), sort_keys=True).encode())
        h.update(source_digest(pass_source_files(self.pipeline)).encode())
        h.update(json.dumps(list(parts)).encode())
        return h.hexdigest()


def canonical(value: Any) -> Any:
    """A JSON value standing for ``value``, the same in every process.

    A value with a ``digest`` (config, rules) gives it; one with ``key()`` (a device profile)
    its key; a dataclass its type and fields, walked; mappings and sets are sorted. Anything
    else raises ``TypeError``: a key never holds a repr that could carry an address.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    digest = getattr(value, "digest", None)
    if isinstance(digest, str):
        return {"digest": digest}
    key = getattr(value, "key", None)
    if callable(key) and not isinstance(value, Mapping):
        return {"key": canonical(key())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, "fields": fields}
    if isinstance(value, Mapping):
        items = [[canonical(k), canonical(v)] for k, v in value.items()]
        return {"mapping": sorted(items, key=json.dumps)}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((canonical(v) for v in value), key=json.dumps)}
    if isinstance(value, Sequence):
        return [canonical(v) for v in value]
    raise TypeError(f"no stable form for a {type(value).__qualname__} in a cache key")


def _source_file(obj: Any) -> Path:
    """The file defining a pass (a function, or a declared pass wrapping one in ``run``)."""
    target = getattr(obj, "run", obj)
    found = inspect.getsourcefile(inspect.unwrap(target))
    if found is None:
        raise TypeError(f"no source file for {obj!r}")
    return Path(found)


def pass_source_files(pipeline: Pipeline) -> tuple[Path, ...]:
    """Every source file that decides what the pipeline's passes do: their modules, the
    driver and the targets' lowerings, and every fxprefetch module those import, directly or
    not, at module level or in a function (the analyses and tables, the config, the roles,
    the prediction model...): nothing is listed by hand."""
    roots = {_source_file(p) for p in pipeline.passes}
    for pattern in _DRIVER_FILES:
        roots.update(_PACKAGE_ROOT.glob(pattern))
    return imported_closure(frozenset(roots))


@functools.cache
def imported_closure(roots: frozenset[Path]) -> tuple[Path, ...]:
    """``roots`` and the source files of every fxprefetch module they import, transitively."""
    seen: set[Path] = set()
    stack = sorted(roots)
    while stack:
        path = stack.pop()
        if path not in seen:
            seen.add(path)
            stack.extend(sorted(_imported_sources(path) - seen))
    return tuple(sorted(seen))


def _imported_sources(path: Path) -> set[Path]:
    """Source files of the fxprefetch modules ``path`` imports (``from m import name`` counts
    ``m``, and ``m.name`` where that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    # the package's own __init__ only gathers the public names: "from fxprefetch import ops"
    # depends on fxprefetch.ops, not on everything __init__ imports
    ours = (n for n in names if n.split(".")[0] == "fxprefetch" and n != "fxprefetch")
    found = (_module_source(n) for n in ours)
    return {f for f in found if f is not None}


def _module_source(name: str) -> Path | None:
    """The ``.py`` file of module ``name`` (None: a name inside a module, not a module)."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # "m.name" where m is a module, not a package
        return None
    origin = spec.origin if spec is not None else None
    return Path(origin) if origin is not None and origin.endswith(".py") else None


def _read_source(path: Path) -> bytes:
    return path.read_bytes()


def _stable_name(path: Path) -> str:
    """``path`` relative to the package, so the key is the same wherever it is installed."""
    for root, prefix in ((_PASSES_ROOT, "passes/"), (_PACKAGE_ROOT, "")):
        if path.is_relative_to(root):
            return prefix + path.relative_to(root).as_posix()
    return path.name


@functools.cache
def source_digest(files: tuple[Path, ...]) -> str:
    """A hash of ``files``' names and contents."""
    h = hashlib.sha256()
    for path in files:
        h.update(_stable_name(path).encode() + b"\0")
        h.update(hashlib.sha256(_read_source(path)).digest())
    return h.hexdigest()


__all__ = ["CompileSetup", "canonical", "pass_source_files", "source_digest"]
