"""Ops between a stored weight and the matmul that reads it: the default tables that
:class:`tables.rules.PrefetchRules` holds, read by :mod:`analysis.weight_trace`."""

from __future__ import annotations

# Ops that only view the storage of their first argument: the bytes read are the view's.
DEFAULT_WEIGHT_VIEWS: frozenset[str] = frozenset(
    f"aten::{n}"
    for n in (
        "t",
        "permute",
        "transpose",
        "view",
        "reshape",
        "_unsafe_view",
        "expand",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "_reshape_alias",
        "as_strided",
        "select",
        "slice",
        "narrow",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "tensor_split",
    )
)

# Ops that read all of their first argument and produce a converted copy (casts, layout copies).
DEFAULT_WEIGHT_CASTS: frozenset[str] = frozenset(
    {
        "prims::convert_element_type",
        "aten::_to_copy",
        "aten::to",
        "aten::clone",
        "aten::contiguous",
        "aten::_autocast_to_reduced_precision",
        "aten::_autocast_to_full_precision",
    }
)

# Elementwise ops of a dequantize: ``(w.to(dt) - zero_point) * scale``. The weight is the
# operand as large as the result; the others (scales, zero points) broadcast.
DEFAULT_WEIGHT_DEQUANTIZE: frozenset[str] = frozenset(
    f"aten::{n}" for n in ("mul", "div", "sub", "add", "neg", "reciprocal")
)

# Ops that pick parts of their first argument with a tensor of indices known only at run time.
DEFAULT_WEIGHT_INDEX: frozenset[str] = frozenset(
    {"aten::index", "aten::index_select", "aten::_unsafe_index"}
)
