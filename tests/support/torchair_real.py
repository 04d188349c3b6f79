"""torchair's REAL Python code, from the torch-npu 2.13.0 wheel, on a machine without CANN.

torch-npu cannot be installed here (it breaks ``import torch``), so the wheel is downloaded,
never installed: only the ``.py`` files under ``torch_npu/dynamo/`` are extracted, and that
``dynamo`` directory goes on ``sys.path`` so ``import torchair`` finds torchair's own package.

What is a STAND-IN here, and only that (everything else is torchair's real code):

- the four C-extension modules of ``torchair.core`` (they link CANN's graph engine):
  ``_torchair`` gets the few names torchair's Python reads at import and load time, and
  ``TorchNpuGraphBase.load`` records the serialized ``ModelDef`` GE would receive, while
  ``compile``/``run`` raise, since they need CANN; ``_npu_graph_executor``, ``_npu_utils`` and
  ``_abi_compat_ge_apis`` only exist; any other attribute of them raises loudly;
- the ``torch.ops.npu.*`` operators (``npu_standins.install_op_standins``: the exact torch_npu
  2.13.0 schemas, ``npu_prefetch`` side-effecting as torch_npu registers it).

Pinned to torch-npu 2.13.0 (sha256 below), whose torchair relies on private names, and so to
torch 2.13.0.
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run by path: make the ``support`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.npu_standins import install_op_standins

TORCH_NPU_VERSION = "2.13.0"  # the default, and the torch every test here runs
# the torch-npu wheels whose torchair/npugraph_ex the tests can run, by sha256; 2.10.0.post4 is
# what vllm-ascend 0.26.0rc1-0.30.0rc2 pin (its Python code runs on torch 2.13.0 here too)
WHEEL_SHA256S = {
    "2.13.0": "0deb809cf447d3fce636ccfdc9c9f874950f1fe76f18f4aaab31e2d345f7dac0",
    "2.10.0.post4": "7d88428d9bb8473919a38947617fcc481cb6e28927a8aa30e486a9bc42f30d90",
}
WHEEL = f"torch_npu-{TORCH_NPU_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = WHEEL_SHA256S[TORCH_NPU_VERSION]
SCHEMA_FILE = "npu_native_functions_by_codegen.yaml"  # every torch_npu operator schema
DEFAULT_DIR = Path.home() / ".cache" / "fxprefetch" / f"torchair-{TORCH_NPU_VERSION}"


class TorchairUnavailableError(RuntimeError):
    """torchair's code could not be set up on this machine (the reason says why)."""


def selected_version() -> str:
    """The torch-npu wheel this process takes torchair and npugraph_ex from:
    ``$FXPREFETCH_TORCH_NPU`` (one of :data:`WHEEL_SHA256S`), else 2.13.0."""
    version = os.environ.get("FXPREFETCH_TORCH_NPU", TORCH_NPU_VERSION)
    if version not in WHEEL_SHA256S:
        raise TorchairUnavailableError(f"torch-npu {version} is not pinned here")
    return version


def torchair_dir(version: str | None = None) -> Path:
    """Where the extracted ``torch_npu/dynamo`` lives (``$FXPREFETCH_TORCHAIR_DIR`` overrides
    the 2.13.0 one; another version's lies beside it, as ``torchair-<version>``)."""
    default = Path(os.environ.get("FXPREFETCH_TORCHAIR_DIR", DEFAULT_DIR))
    version = version or selected_version()
    return default if version == TORCH_NPU_VERSION else default.parent / f"torchair-{version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(dest: Path | None = None) -> Path:
    """Download the torch-npu wheel (never install it) and extract torchair's ``.py`` files.

    Returns the directory to put on ``sys.path``. Idempotent: an existing extraction is reused.
    """
    version = selected_version()
    dest = dest or torchair_dir(version)
    package = dest / "torchair" / "__init__.py"
    if package.exists():
        return dest
    wheel_name = f"torch_npu-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with tempfile.TemporaryDirectory(prefix="fxprefetch-torch-npu-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
               "-d", tmp, f"torch-npu=={version}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        wheel = Path(tmp) / wheel_name
        if done.returncode != 0 or not wheel.exists():
            raise TorchairUnavailableError(
                f"pip download torch-npu=={version} failed: {done.stderr.strip()[-500:]}"
            )
        if (got := _sha256(wheel)) != WHEEL_SHA256S[version]:
            raise TorchairUnavailableError(
                f"{wheel_name}: sha256 {got}, expected {WHEEL_SHA256S[version]}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith("torch_npu/dynamo/") and member.endswith(".py"):
                    target = staging / member.removeprefix("torch_npu/dynamo/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
            (staging / SCHEMA_FILE).write_bytes(zf.read(f"torch_npu/csrc/aten/{SCHEMA_FILE}"))
    try:
        staging.rename(dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# -- STAND-INS for torchair's C extensions (CANN's graph engine) -------------------------------


class _Loud(types.ModuleType):
    """A C-extension stand-in: a name that was not provided raises, naming what is missing."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"STAND-IN {self.__name__}.{attr}: needs CANN, not available here")


class TorchDataType(enum.IntEnum):
    """``_torchair.TorchDataType`` (GE's data-type codes)."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2
    INT32 = 3
    UINT8 = 4
    INT16 = 6
    UINT16 = 7
    UINT32 = 8
    INT64 = 9
    UINT64 = 10
    FLOAT64 = 11
    BOOL = 12
    COMPLEX64 = 16
    COMPLEX128 = 17
    BF16 = 27


@dataclass
class GeRecorder:
    """What torchair's real code handed to GE: optimized graphs and serialized ModelDefs."""

    graphs: list[Any] = field(default_factory=list)  # GeConcreteGraph, after its GE passes
    loaded: list[bytes] = field(default_factory=list)  # bytes given to TorchNpuGraphBase.load

    def clear(self) -> None:
        self.graphs.clear()
        self.loaded.clear()


RECORDER = GeRecorder()


class GeCompileUnavailableError(RuntimeError):
    """GE compile/run was reached: it needs CANN (raised by the stand-in)."""


class TorchNpuGraphBase:
    """STAND-IN for ``_torchair.TorchNpuGraphBase``: records ``load``; compile/run need CANN."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def load(self, serialized_model_def: bytes, *args: Any) -> None:
        RECORDER.loaded.append(serialized_model_def)

    def set_hint_shape(self, *args: Any) -> None:
        pass

    def compile(self, *args: Any) -> None:
        raise GeCompileUnavailableError(f"GE compile of {self.name} needs CANN (stand-in)")

    def auto_tune(self, *args: Any) -> None:
        raise GeCompileUnavailableError(f"GE auto_tune of {self.name} needs CANN (stand-in)")

    def run(self, *args: Any) -> None:
        raise GeCompileUnavailableError(f"GE run of {self.name} needs CANN (stand-in)")


def _install_c_extension_standins() -> None:
    core = _Loud("torchair.core._torchair")
    core.__doc__ = "STAND-IN for torchair's C extension (tests only)"
    core.TorchDataType = TorchDataType
    core.TorchNpuGraphBase = TorchNpuGraphBase
    core.InitializeGraphEngine = lambda *args, **kwargs: None
    core.FinalizeGraphEngine = lambda *args, **kwargs: None
    core.SetDebugLogPath = lambda *args, **kwargs: None
    core.GetSocName = lambda *args, **kwargs: "Ascend910B1"
    core.check_cann_compat = lambda *args, **kwargs: ""  # "" means compatible
    core.get_registered_ir_def = lambda *args, **kwargs: ("", [], [], [])
    sys.modules["torchair.core._torchair"] = core
    for name in ("_npu_graph_executor", "_npu_utils", "_abi_compat_ge_apis"):
        sys.modules[f"torchair.core.{name}"] = _Loud(f"torchair.core.{name}")


_schema_lib: torch.library.Library | None = None


def _define_wheel_schemas(root: Path) -> int:
    """Define (no kernels) every ``torch.ops.npu`` schema of the wheel not yet defined.

    torchair's aclgraph code reads some at import time; a call of one raises, loudly.
    """
    global _schema_lib  # noqa: PLW0603 - defined once per process
    if _schema_lib is not None:
        return 0
    import yaml

    _schema_lib = torch.library.Library("npu", "FRAGMENT")
    data = yaml.safe_load((root / SCHEMA_FILE).read_text())
    defined = 0
    for section in data.values():
        for entry in section if isinstance(section, list) else ():
            schema = entry.get("func") if isinstance(entry, dict) else None
            name = schema.split("(", 1)[0] if schema else None
            if not name:
                continue
            base, _, overload = name.partition(".")
            packet = getattr(torch.ops.npu, base, None) if hasattr(torch.ops.npu, base) else None
            if packet is not None and (overload or "default") in packet.overloads():
                continue
            try:
                _schema_lib.define(schema)
                defined += 1
            except RuntimeError:  # an aten overload or a schema this torch cannot parse
                continue
    return defined


def _record_converted_graphs(torchair: Any) -> None:
    """Observe (not replace) ``GeConcreteGraph.optimize_graph_without_runtime``."""
    from torchair._ge_concrete_graph.fx2ge_converter import GeConcreteGraph

    original = GeConcreteGraph.optimize_graph_without_runtime
    if getattr(original, "recorded", False):
        return

    def optimize_graph_without_runtime(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        RECORDER.graphs.append(self)
        return result

    optimize_graph_without_runtime.recorded = True  # type: ignore[attr-defined]
    GeConcreteGraph.optimize_graph_without_runtime = optimize_graph_without_runtime


def load_torchair() -> types.ModuleType:
    """Import torchair's real code, C extensions stubbed (or raise TorchairUnavailableError)."""
    if (module := sys.modules.get("torchair")) is not None and hasattr(module, "npu_fx_compiler"):
        return module
    if torch.__version__.split("+")[0] != TORCH_NPU_VERSION:
        raise TorchairUnavailableError(
            f"torchair {TORCH_NPU_VERSION} needs torch=={TORCH_NPU_VERSION}, this is "
            f"{torch.__version__} (pip install torch=={TORCH_NPU_VERSION})"
        )
    root = fetch()
    # npu ops (torch_npu's schemas, npu_prefetch side-effecting) must exist before torchair
    # lazily imports its converters, or dynamo/AOT drop npu_prefetch and no Cmo appears
    install_op_standins()
    _define_wheel_schemas(root)
    _install_c_extension_standins()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import warnings

    with warnings.catch_warnings():  # converters of torch_npu ops we have no schema for
        warnings.simplefilter("ignore", UserWarning)
        import torchair
        import torchair.npu_fx_compiler
    _record_converted_graphs(torchair)
    return torchair


# `python tests/support/torchair_real.py`: fetch once (CI does this)
if __name__ == "__main__":
    print(fetch())
