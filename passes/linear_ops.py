"""Which ops are linear layers, and which of their arguments is the weight.

A table users extend with :func:`register_linear_op`. Ops are keyed by their qualified name
(``namespace::op``) so torch_npu's ops are recognized whether or not torch_npu is installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearOpSpec:
    """``weight``: the schema argument holding the weight (a tensor, or a one-tensor list).
    ``activations``: the arguments carrying activations, from which the vector window is sought.
    """

    weight: str
    activations: tuple[str, ...]


LINEAR_OPS: dict[str, LinearOpSpec] = {
    "aten::mm": LinearOpSpec("mat2", ("self",)),
    "aten::addmm": LinearOpSpec("mat2", ("mat1",)),
    "aten::bmm": LinearOpSpec("mat2", ("self",)),
    "aten::baddbmm": LinearOpSpec("batch2", ("batch1",)),
    "aten::linear": LinearOpSpec("weight", ("input",)),
    "aten::matmul": LinearOpSpec("other", ("self",)),
    "aten::_grouped_mm": LinearOpSpec("mat2", ("self", "offs")),
    "transformers::grouped_mm_fallback": LinearOpSpec("weight", ("input", "offs")),
    "npu::npu_grouped_matmul": LinearOpSpec("weight", ("x", "group_list", "per_token_scale")),
    "npu::npu_quant_matmul": LinearOpSpec("x2", ("x1", "pertoken_scale")),
    "npu::npu_weight_quant_batchmatmul": LinearOpSpec("weight", ("x",)),
    "npu::npu_mm_all_reduce_base": LinearOpSpec("x2", ("x1",)),
}


def register_linear_op(qualified_name: str, weight: str, activations: tuple[str, ...]) -> None:
    """Teach the pass a new linear op, e.g. ``register_linear_op("myns::gemm", "w", ("x",))``."""
    if "::" not in qualified_name:
        raise ValueError(
            f"expected a qualified op name like 'namespace::op', got {qualified_name!r}"
        )
    if not activations:
        raise ValueError("a linear op needs at least one activation argument")
    LINEAR_OPS[qualified_name] = LinearOpSpec(weight, tuple(activations))
