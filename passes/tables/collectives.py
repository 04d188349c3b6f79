"""Collective communication ops as they appear in aten graphs: the default tables that
:class:`tables.rules.PrefetchRules` holds."""

from __future__ import annotations

ALL_REDUCE = frozenset(
    {
        "_c10d_functional::all_reduce",
        "_c10d_functional::all_reduce_",
        "c10d::allreduce_",
        "vllm::all_reduce",
        "npu::npu_mm_all_reduce_base",
    }
)
REDUCE_SCATTER = frozenset(
    {
        "_c10d_functional::reduce_scatter_tensor",
        "c10d::_reduce_scatter_base_",
        "c10d::reduce_scatter_",
        "vllm::reduce_scatter",
    }
)
ALL_GATHER = frozenset(
    {
        "_c10d_functional::all_gather_into_tensor",
        "c10d::_allgather_base_",
        "c10d::allgather_",
        "vllm::all_gather",
    }
)
WAIT = frozenset({"_c10d_functional::wait_tensor", "c10d::wait"})
OTHER = frozenset(
    {
        "_c10d_functional::broadcast",
        "_c10d_functional::all_to_all_single",
        "c10d::broadcast_",
        "c10d::alltoall_base_",
    }
)
COLLECTIVES = ALL_REDUCE | REDUCE_SCATTER | ALL_GATHER | WAIT | OTHER

# The argument of a collective that holds what it sends, by name (the first argument when none
# of these is named).
COLLECTIVE_INPUTS: tuple[str, ...] = ("input", "self", "tensor", "input_tensor", "inp")
