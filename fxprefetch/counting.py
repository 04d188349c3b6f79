"""The stats wrapping of a compiled graph: what each call of it counts.

Built from the planner's reports when the backend returns the compiled graph (data flows
forward; nothing is registered at compile time):

- where the compiled code left its hint-only prefetches out, each call counts the planned
  hints (``runtime_stats.record_planned(..., ran=False)``), once per run of the graph that
  holds them: a nested-region body called by two layers counts twice. Bodies that run only
  on some calls (a ``torch.cond`` branch, a loop body) keep their hints in the code as
  ``fxprefetch.prefetch_hint``, which counts itself each time it runs;
- where the compiled graph is replayed as a CUDA graph, the op's Python body does not run at
  replay, so each call that returns counts the prefetches its code holds, and the op kernels
  count nothing during the call (they still run during warm-up and capture);
- while a ``collect_stats(per_weight=True)`` block is open in the calling thread, each call
  names the weights it was given, so per-weight counts carry parameter paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def with_counting(
    compiled: Callable[..., Any],
    planner: GraphPlanner,
    replayed: bool = False,
    call_sites: CallSites | None = None,
) -> Callable[..., Any]:
    """Wrap ``compiled`` (boxed or not) so that its calls count as described above;
    ``replayed``: the compiled graph may run as a CUDA-graph replay; ``call_sites``: the
    graph was compiled for a module's frame and may run for several modules (each call
    names its weights by that module's parameter paths, and records it as a call site)."""
    hints = planned_prefetches(planner, elided=True)
    ran = planned_prefetches(planner, elided=False) if replayed else ()
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
        with naming:
            with runtime_stats.counted_per_call() if ran else nullcontext():
                out = compiled(*args)
            if hints:
                runtime_stats.record_planned(hints, ptrs, ran=False)
            if ran:
                runtime_stats.record_planned(ran, ptrs, ran=True)
        return out

    if boxed:
        run._boxed_call = True  # type: ignore[attr-defined]
    return run
