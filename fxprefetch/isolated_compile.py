"""Compile and run a callable once with a private backend, leaving dynamo's caches as they were.

Dynamo keeps compiled entries on code objects, and every entry counts against the code's
recompile limit (8). A tracing-only tool such as :func:`fxprefetch.explain` must not spend
that budget, nor reset what the user compiled. So: the call starts in a fresh copy of a small
function's code object (no user code object is dynamo's first frame); frames compiled after
a graph break are noted as dynamo compiles them, and afterwards those that held no entries
before are reset, which frees this call's entries and nothing else.

A code object that already held someone's entries when this call compiled it (possible only
after a graph break, in user code compiled before) is left alone; where torch supports
``isolate_recompiles`` (2.13 and later), this call's entries there do not count against the
user's recompile limit.
"""

from __future__ import annotations

import inspect
import logging
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._dynamo.convert_frame import register_bytecode_hook
from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

logger = logging.getLogger(__name__)

_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _call(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    return fn(*args, **kwargs)


def _call_module(self: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    # the module's own call, not ``m.compile()``'s: named ``self``, as dynamo names a module
    return self._call_impl(*args, **kwargs)


def _innermost(backend: Any) -> Any:
    """The backend function under torch's wrappers (``_TorchCompileWrapper`` and the like)."""
    for _ in range(8):
        inner = getattr(backend, "compiler_fn", None) or getattr(
            backend, "_torchdynamo_orig_backend", None
        )
        if inner is None:
            break
        backend = inner
    return backend


def compile_and_run(
    fn: Callable[..., Any],
    backend: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> Any:
    """``torch.compile(fn, backend=backend)(*args, **kwargs)``, then drop what it cached.

    A module runs its own forward and hooks, even when compiled in place (``m.compile()``).
    """
    call = _call_module if isinstance(fn, torch.nn.Module) else _call
    entry = types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__)
    thread = threading.get_ident()
    # id(code) -> (code, it held entries before this call compiled it)
    compiled: dict[int, tuple[types.CodeType, bool]] = {}

    def note(code: types.CodeType, _out: types.CodeType) -> None:
        if threading.get_ident() == thread and id(code) not in compiled:
            compiled[id(code)] = (code, bool(_debug_get_cache_entry_list(code)))

    handle = register_bytecode_hook(note)
    try:
        extra = {"isolate_recompiles": True} if _ISOLATE else {}
        return torch.compile(entry, backend=backend, dynamic=False, **extra)(fn, args, kwargs)
    finally:
        handle.remove()
        for code, held_entries in compiled.values():
            ours = all(_innermost(e.backend) is backend for e in _debug_get_cache_entry_list(code))
            if held_entries or not ours:
                logger.debug("explain: left its entries on %s (shared)", code.co_name)
                continue
            reset_code(code)
