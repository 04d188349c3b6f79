"""What vLLM is compiling right now, for the vLLM pass and the vllm-ascend hooks alike.

Two context variables, set while a platform's compiler compiles: the ``VllmConfig`` (with our
pass) it compiles for, and which of the compiler's example inputs are parameters. Both the
generic vLLM pass (:mod:`fxprefetch.vllm.plugin`) and the vllm-ascend hooks
(:mod:`fxprefetch.vllm.ascend`) read them; neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

# (VllmConfig, our pass) while the platform's compiler compiles for a config holding our pass
_COMPILING: ContextVar[tuple[Any, Any] | None] = ContextVar("fxprefetch_compiling", default=None)
# Positions of the compiler's example inputs that are parameters, while a platform compiler
# that runs AOT autograd itself (vllm-ascend's npugraph_ex, torchair) compiles a graph: those
# compile AOT graphs without static-input metadata, so the inputs themselves say which are
# weights.
_PARAMETER_INPUTS: ContextVar[frozenset[int] | None] = ContextVar(
    "fxprefetch_parameter_inputs", default=None
)


@contextmanager
def compiling(vllm_config: Any, prefetch_pass: Any) -> Iterator[None]:
    """While the platform's compiler compiles for ``vllm_config``, with our pass in it."""
    token = _COMPILING.set((vllm_config, prefetch_pass))
    try:
        yield
    finally:
        _COMPILING.reset(token)


def compiling_for() -> tuple[Any, Any] | None:
    """``(VllmConfig, our pass)`` the platform's compiler is compiling for now, if any."""
    return _COMPILING.get()


def compiling_vllm_config() -> Any:
    """The VllmConfig the platform's compiler is compiling for right now, if any."""
    found = _COMPILING.get()
    return found[0] if found is not None else None


def current_vllm_config() -> Any:
    """The VllmConfig being compiled for: the platform compiler's, else vLLM's current one
    (None outside vLLM)."""
    if (found := compiling_vllm_config()) is not None:
        return found  # the platform's compiler is compiling for it (vllm-ascend)
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    return get_current_vllm_config_or_none()


@contextmanager
def parameter_inputs(example_inputs: Sequence[Any]) -> Iterator[None]:
    """While compiling from ``example_inputs``: the positions of those that are parameters."""
    found = frozenset(i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter))
    token = _PARAMETER_INPUTS.set(found)
    try:
        yield
    finally:
        _PARAMETER_INPUTS.reset(token)


def parameter_positions() -> frozenset[int] | None:
    """The positions :func:`parameter_inputs` set; None outside such a compile."""
    return _PARAMETER_INPUTS.get()


__all__ = [
    "compiling",
    "compiling_for",
    "compiling_vllm_config",
    "current_vllm_config",
    "parameter_inputs",
    "parameter_positions",
]
