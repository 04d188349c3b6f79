"""``npu_prefetch`` in dynamo's backend registry, safe for concurrent first use.

torch registers entry-point backends lazily, with no lock: ``lookup_backend`` sees the name
unregistered, loads the entry point (``fxprefetch.backend:npu_prefetch``) and registers what it
got. Threads making their first ``torch.compile(backend="npu_prefetch")`` at once all take that
path, and all but one failed with ``AssertionError: duplicate name: npu_prefetch``.

So ``fxprefetch.backend`` registers the backend while it is imported (Python's import lock
makes every racing thread wait for that), and answers the entry-point loader inside
``lookup_backend`` with ``None`` once it is registered: torch's ``register_backend(None)``
registers nothing, and ``lookup_backend`` then returns the registered function. Anyone else
reading ``fxprefetch.backend.npu_prefetch`` gets the function.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

NAME = "npu_prefetch"


def register(backend: Callable[..., Any]) -> None:
    """Register ``backend`` as ``npu_prefetch`` unless it is already (a reload replaces it)."""
    from torch._dynamo.backends import registry

    current = registry._COMPILER_FNS.get(NAME)
    if current is backend:
        return
    if current is None:
        registry.register_backend(backend, name=NAME)
    elif getattr(current, "__module__", None) == backend.__module__:  # importlib.reload
        registry._COMPILER_FNS[NAME] = backend
    else:
        logger.warning("another function is registered as dynamo backend %r: left as it is", NAME)


def entry_point_value(backend: Callable[..., Any]) -> Callable[..., Any] | None:
    """What ``fxprefetch.backend.npu_prefetch`` reads as: None for torch's entry-point
    loader when ``backend`` is registered already, else ``backend``."""
    from torch._dynamo.backends import registry

    if registry._COMPILER_FNS.get(NAME) is backend and _loaded_by_lookup_backend():
        return None
    return backend


def _loaded_by_lookup_backend() -> bool:
    # lookup_backend -> EntryPoint.load -> fxprefetch.backend.__getattr__ -> entry_point_value
    from torch._dynamo.backends import registry

    target = getattr(registry.lookup_backend, "__code__", None)
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False
