"""npugraph_ex's REAL Python code, from the same torch-npu wheel as torchair (2.13.0, or the one
``$FXPREFETCH_TORCH_NPU`` names: tests/support/torchair_real.py).

``tests/support/torchair_real.py`` extracts everything under ``torch_npu/dynamo/``, so npugraph_ex
(``torch_npu/dynamo/npugraph_ex``) sits beside torchair, pinned by the same sha256. It needs
more of torch_npu than torchair's GE path does: it captures NPU graphs, so it asks for the
current stream and imports ``torch_npu`` itself. What is a STAND-IN here, and only that:

- ``torch_npu`` / ``torch_npu.npu`` (also bound as ``torch.npu``): ``__version__``, a current
  stream with id 0, and, by name, the runtime entry points npugraph_ex refers to (streams,
  events, graph capture, stream limits), each raising ``needs CANN`` when called. Any other
  attribute raises ``AttributeError`` naming the stand-in, so npugraph_ex's own
  ``hasattr``/``except AttributeError`` feature checks see "absent", as on an old torch_npu.
- meta kernels for the six torch_npu operators npugraph_ex's pattern passes trace
  (``npu_standins.install_meta_standins``), shapes as torch_npu 2.13.0's meta registrations.

Everything else is npugraph_ex's real code: its config, AOT set-up, FX passes (our pass runs as
its ``post_grad_custom_post_pass``), and the ``AclConcreteGraph`` it builds. Capturing and
replaying an NPU graph needs CANN and is not reached.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch

from support.npu_standins import install_meta_standins
from support.torchair_real import TorchairUnavailableError, load_torchair, selected_version

# torch_npu.npu's runtime entry points npugraph_ex names (each raises "needs CANN")
NPU_RUNTIME_CLASSES = ("Stream", "Event", "ExternalEvent", "NPUGraph")
NPU_RUNTIME_FUNCTIONS = (
    "stream", "set_stream", "synchronize", "set_stream_limit", "get_stream_limit",
    "get_device_limit", "super_kernel_scope_begin", "super_kernel_scope_end",
    "graph_task_group_begin", "graph_task_group_end", "graph_task_update_begin",
    "graph_task_update_end", "graph_pool_handle", "fake_record_stream", "empty_cache",
    "memory_snapshot", "current_device",
)  # fmt: skip


class _StandIn(types.ModuleType):
    """A module stand-in: a name not provided is absent (``AttributeError``), loudly named."""

    def __getattr__(self, attr: str) -> Any:
        raise AttributeError(f"STAND-IN {self.__name__} has no {attr!r} (needs CANN)")


def _needs_cann(qualname: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"STAND-IN {qualname}: needs CANN, not available here")

    call.__name__ = call.__qualname__ = qualname.rsplit(".", 1)[-1]
    return call


def _runtime_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": _needs_cann(qualname)})


COMPILE_MODES: list[dict[str, Any]] = []  # what torch.npu.set_compile_mode was asked for


def install_torch_npu_standin() -> types.ModuleType:
    """``torch_npu`` and ``torch.npu`` stand-ins (see the module docstring); idempotent."""
    if isinstance(existing := sys.modules.get("torch_npu"), _StandIn):
        return existing
    if existing is not None:
        raise TorchairUnavailableError("a real torch_npu is loaded; the stand-in is not needed")
    torch_npu = _StandIn("torch_npu")
    torch_npu.__doc__ = "STAND-IN for torch_npu (tests only)"
    torch_npu.__version__ = selected_version()  # the wheel npugraph_ex comes from
    npu = _StandIn("torch_npu.npu")
    for name in NPU_RUNTIME_CLASSES:
        setattr(npu, name, _runtime_class(f"torch_npu.npu.{name}"))
    for name in NPU_RUNTIME_FUNCTIONS:
        setattr(npu, name, _needs_cann(f"torch_npu.npu.{name}"))
    npu.current_stream = lambda *args: types.SimpleNamespace(
        stream_id=0, device_index=0, device_type=20
    )
    npu.set_compile_mode = lambda **kwargs: COMPILE_MODES.append(kwargs)
    torch_npu.npu = npu
    sys.modules["torch_npu"] = torch_npu
    sys.modules["torch_npu.npu"] = npu
    torch.npu = npu  # torch_npu binds its device module there
    return torch_npu


def load_npugraph_ex(*, absent: bool = False) -> types.ModuleType | None:
    """Import npugraph_ex's real code (torchair's stand-ins, plus the ones above).

    ``absent=True`` sets up the same stand-ins but makes ``import npugraph_ex`` fail, as on a
    torch_npu without it (torchair alone; the two register the same torch hooks, so a process
    holds one of them, as vllm-ascend's own imports do).
    """
    if (module := sys.modules.get("npugraph_ex")) is not None and hasattr(module, "CompilerConfig"):
        return module
    load_torchair()
    install_torch_npu_standin()
    install_meta_standins()
    if absent:
        sys.modules["npugraph_ex"] = None  # type: ignore[assignment]  # import raises ImportError
        return None
    import npugraph_ex

    return npugraph_ex
