"""The stats wrapping of a compiled graph: what each call of it counts.

Built from the planner's reports when the backend returns the compiled graph (data flows
forward; nothing is registered at compile time):

- where the compiled code left its hint-only prefetches out, each call counts the planned
  hints (``runtime_stats.record_planned(..., ran=False)``), once per run of the graph that
  holds them: a nested-region body called by two layers counts twice. Bodies that run only
  on some calls (a ``torch.cond`` branch, a loop body) keep their hints in the code as
  ``fxprefetch.prefetch_hint``, which counts itself each time it runs;
- where the compiled graph is really replayed as a CUDA graph (the target says so once it
  compiled it: inductor cudagraphified it; never on the CPU), the op's Python body runs only
  at warm-up and capture, not at replay. Each call then counts what the kernels ran in it
  (``runtime_stats.counted_per_call``), together with what the calls before it with the
  same input shapes ran: a replay runs exactly what was captured for those shapes, so a
  range-checked prefetch (``prefetch_in_range``) counts by the decision its kernel took;
- while a ``collect_stats(per_weight=True)`` block is open in the calling thread, each call
  names the weights it was given, so per-weight counts carry parameter paths.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fxprefetch import runtime_stats
from fxprefetch.call_sites import CallSites
from fxprefetch.planner import GraphPlanner


def planned_prefetches(
    planner: GraphPlanner, elided: bool
) -> tuple[runtime_stats.PlannedPrefetch, ...]:
    """The prefetches of the graphs whose compiled code left them out (``elided``), or of
    those whose code holds them, once per run of their graph per call, each run naming the
    weight it reads (a region shared by layers: each layer's). Graphs that run a varying
    number of times are left out: their kernels count themselves."""
    index = {name: i for i, name in enumerate(planner.source_names) if name}
    return tuple(
        runtime_stats.PlannedPrefetch(
            weight=weight,
            shape=r.weight_shape,
            dtype=r.dtype,
            requested=r.prefetch_bytes,
            # sized within the stored span from offset: all of it is covered
            nbytes=r.prefetch_bytes,
            arg_index=index.get(weight),
        )
        for report in planner.reports
        if report.hints_elided == elided
        for names in report.weights_per_run()
        for r in report.plan.prefetched
        for weight in (_run_weight(r.weight, names),)
    )


def _run_weight(name: str, names: Mapping[str, str]) -> str:
    """What one run reads for the plan's ``name``: ``names`` renames a weight, and with it
    the inner tensors of a tensor subclass (``<weight>.<attr>``)."""
    if name in names:
        return names[name]
    head, _, attr = name.rpartition(".")
    while head:
        if head in names:
            return f"{names[head]}.{attr}"
        head, _, more = head.rpartition(".")
        attr = f"{more}.{attr}"
    return name


def _stored_tensors(tensor: torch.Tensor, name: str) -> list[tuple[int, str]]:
    """``(data_ptr, name)`` of a tensor, or of each inner tensor of a tensor subclass
    (``TwoTensor``, DTensor...), named ``<name>.<attr>`` as the plan names them."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return [(tensor.data_ptr(), name)]
    attrs, _ = tensor.__tensor_flatten__()
    return [
        found
        for attr in attrs
        if isinstance(inner := getattr(tensor, attr), torch.Tensor)
        for found in _stored_tensors(inner, f"{name}.{attr}")
    ]


def _shapes(inputs: Sequence[Any]) -> tuple[Hashable, ...]:
    """What decides a captured graph's range checks: input shapes and integer inputs (a
    CUDA-graph tree records one graph per distinct set of them)."""
    return tuple(
        tuple(x.shape) if isinstance(x, torch.Tensor) else x if isinstance(x, int) else None
        for x in inputs
    )


class _Captured:
    """Per input shapes, the prefetches a replayed graph's calls ran (at most ``limit``
    shapes kept: the oldest go first)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.by_shapes: dict[Hashable, Counter[runtime_stats.Ran]] = {}

    def merge(self, key: Hashable, ran: Sequence[runtime_stats.Ran]) -> list[runtime_stats.Ran]:
        """What this call ran: what its kernels ran, and what a replay runs that they did
        not (the earlier calls with these shapes: warm-up and capture run every kernel)."""
        seen = self.by_shapes.pop(key, Counter())
        merged = seen | Counter(ran)
        if len(self.by_shapes) >= self.limit:
            self.by_shapes.pop(next(iter(self.by_shapes)))
        self.by_shapes[key] = merged
        return list(merged.elements())


def with_counting(
    compiled: Callable[..., Any],
    planner: GraphPlanner,
    replayed: bool = False,
    call_sites: CallSites | None = None,
) -> Callable[..., Any]:
    """Wrap ``compiled`` (boxed or not) so that its calls count as described above;
    ``replayed``: the compiled graph is replayed as a CUDA graph (it was cudagraphified);
    ``call_sites``: the graph was compiled for a module's frame and may run for several
    modules (each call names its weights by that module's parameter paths, and records it
    as a call site)."""
    hints = planned_prefetches(planner, elided=True)
    ran = planned_prefetches(planner, elided=False) if replayed else ()
    captured = _Captured()
    names = [(i, n) for i, n in enumerate(planner.source_names) if n]
    boxed = getattr(compiled, "_boxed_call", False)
    if not hints and not ran and not names and call_sites is None:
        return compiled

    def run(*args: Any) -> Any:
        # boxed calling convention: one list of inputs, which the call clears (dynamo may
        # also call it unboxed); read what counting needs from the inputs before the call
        boxed_call = len(args) == 1 and isinstance(args[0], list)
        inputs: Sequence[Any] = args[0] if boxed_call else args
        ptrs: dict[int, int] | None = None
        naming = nullcontext()
        site = call_sites.names_for(inputs) if call_sites is not None else None
        if names and runtime_stats.per_weight_wanted():
            ptrs = {
                i: inputs[i].data_ptr()
                for i, _ in names
                if i < len(inputs) and isinstance(inputs[i], torch.Tensor)
            }
            naming = runtime_stats.naming(
                {
                    ptr: path
                    for i, name in names
                    if i in ptrs
                    for ptr, path in _stored_tensors(inputs[i], (site or {}).get(i, name))
                }
            )
        key = _shapes(inputs) if ran else None
        with naming:
            with runtime_stats.counted_per_call() if ran else nullcontext() as kernels:
                out = compiled(*args)
                if kernels is not None:  # still named by this call
                    runtime_stats.record_ran(captured.merge(key, kernels))
            if hints:
                runtime_stats.record_planned(hints, ptrs, ran=False)
        return out

    if boxed:
        run._boxed_call = True  # type: ignore[attr-defined]
    return run
