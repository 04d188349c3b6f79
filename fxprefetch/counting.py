"""The stats wrapping of a compiled graph: what each call of it counts.

Built from the planner's reports when the backend returns the compiled graph (data flows
forward; nothing is registered at compile time):

- where the compiled code left its hint-only prefetches out, each call counts the planned
  hints (``runtime_stats.record_hints``);
- while a ``collect_stats(per_weight=True)`` block is open in the calling thread, each call
  names the weights it was given, so per-weight counts carry parameter paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fxprefetch import runtime_stats
from fxprefetch.planner import GraphPlanner


def planned_hints(planner: GraphPlanner) -> tuple[runtime_stats.PlannedHint, ...]:
    """The prefetches of every graph whose compiled code carries none of them."""
    index = {name: i for i, name in enumerate(planner.source_names) if name}
    return tuple(
        runtime_stats.PlannedHint(
            r.weight, r.weight_shape, r.dtype, r.prefetch_bytes, index.get(r.weight)
        )
        for report in planner.reports
        if report.hints_elided
        for r in report.plan.prefetched
    )


def with_counting(compiled: Callable[..., Any], planner: GraphPlanner) -> Callable[..., Any]:
    """Wrap ``compiled`` (boxed or not) so that its calls count as described above."""
    hints = planned_hints(planner)
    hint_bytes = sum(h.nbytes for h in hints)
    names = [(i, n) for i, n in enumerate(planner.source_names) if n]
    boxed = getattr(compiled, "_boxed_call", False)
    if not hints and not names:
        return compiled

    def run(*args: Any) -> Any:
        # boxed calling convention: one list of inputs (dynamo may also call it unboxed)
        boxed_call = len(args) == 1 and isinstance(args[0], list)
        inputs: Sequence[Any] = args[0] if boxed_call else args
        if hints:
            runtime_stats.record_hints(hints, hint_bytes, inputs)
        if names and runtime_stats.per_weight_wanted():
            by_ptr = {
                inputs[i].data_ptr(): name
                for i, name in names
                if i < len(inputs) and isinstance(inputs[i], torch.Tensor)
            }
            with runtime_stats.naming(by_ptr):
                return compiled(*args)
        return compiled(*args)

    if boxed:
        run._boxed_call = True  # type: ignore[attr-defined]
    return run
