"""Which ops are linear layers, and which of their arguments is the weight.

The default table; users extend it through :mod:`passes.rules`. Ops are keyed by their
qualified name (``namespace::op``) so torch_npu's ops are recognized whether or not torch_npu
is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class LinearOpSpec:
    """``weight``: the schema argument that usually holds the weight (a tensor, or a one-tensor
    list). ``activations``: the arguments carrying activations, from which the vector window is
    sought. ``swappable``: a plain matrix product, where the weight may stand in the first
    activation argument instead (``W @ x.T``); the pass checks which operand is a weight.
    ``prepacked``: the weight is in an opaque packed layout; the linear is recorded, not
    prefetched. ``hidden``: an op that runs matmuls on weights it looks up itself (vLLM's
    fused MoE): recorded as such, with ``weight`` naming the role it would play.
    """

    weight: str
    activations: tuple[str, ...]
    swappable: bool = False
    prepacked: bool = False
    hidden: bool = False


DEFAULT_LINEAR_OPS: Mapping[str, LinearOpSpec] = MappingProxyType(
    {
        "aten::mm": LinearOpSpec("mat2", ("self",), swappable=True),
        "aten::addmm": LinearOpSpec("mat2", ("mat1",), swappable=True),
        "aten::bmm": LinearOpSpec("mat2", ("self",), swappable=True),
        "aten::baddbmm": LinearOpSpec("batch2", ("batch1",), swappable=True),
        "aten::linear": LinearOpSpec("weight", ("input",)),
        "aten::matmul": LinearOpSpec("other", ("self",), swappable=True),
        "aten::_scaled_mm": LinearOpSpec("mat2", ("self", "scale_a"), swappable=True),
        # inductor's CPU freezing prepacks weights (opaque layouts): recorded, never prefetched
        "mkl::_mkl_linear": LinearOpSpec("MKL_W", ("X",), prepacked=True),
        "mkldnn::_linear_pointwise": LinearOpSpec("W", ("X",), prepacked=True),
        "aten::_grouped_mm": LinearOpSpec("mat2", ("self", "offs")),
        "transformers::grouped_mm_fallback": LinearOpSpec("weight", ("input", "offs")),
        "npu::npu_grouped_matmul": LinearOpSpec("weight", ("x", "group_list", "per_token_scale")),
        "npu::npu_quant_matmul": LinearOpSpec("x2", ("x1", "pertoken_scale")),
        "npu::npu_weight_quant_batchmatmul": LinearOpSpec("weight", ("x",)),
        "npu::npu_mm_all_reduce_base": LinearOpSpec("x2", ("x1",)),
        "npu::npu_mm_reduce_scatter_base": LinearOpSpec("x2", ("self",)),
        # vLLM
        "_C::cutlass_scaled_mm": LinearOpSpec("b", ("a", "a_scales")),
        "vllm::cuda_flashinfer_bf16_gemm": LinearOpSpec("weight", ("x",)),
        "vllm::rocm_unquantized_gemm": LinearOpSpec("weight", ("x",)),
        "vllm::unquantized_gemm": LinearOpSpec("weight", ("x",)),  # vllm-ascend
        # vLLM's fused MoE looks its expert weights up by layer name: no FX pass sees them
        "vllm::moe_forward": LinearOpSpec("moe.gate_up", ("hidden_states",), hidden=True),
        "vllm::moe_forward_shared": LinearOpSpec("moe.gate_up", ("hidden_states",), hidden=True),
    }
)
LINEAR_OPS = DEFAULT_LINEAR_OPS  # the defaults; the pass reads PrefetchRules.linear_table
