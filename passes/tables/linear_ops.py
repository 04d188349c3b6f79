"""Which ops are linear layers, and which of their arguments is the weight: the default table
that :class:`tables.rules.PrefetchRules` holds.

Ops are keyed by their qualified name (``namespace::op``) so torch_npu's ops are recognized
whether or not torch_npu is installed. A spec may hold only under a condition (``only_if``,
the name of a predicate in :data:`analysis.linear_ops.LINEAR_CONDITIONS`):
a convolution is a linear when it is one matmul over the channels (a pointwise kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fxprefetch.roles import MOE_GATE_UP


@dataclass(frozen=True)
class LinearOpSpec:
    """``weight``: the schema argument that usually holds the weight (a tensor, or a one-tensor
    list). ``activations``: the arguments carrying activations, from which the vector window is
    sought. ``swappable``: a plain matrix product, where the weight may stand in the first
    activation argument instead (``W @ x.T``); the pass checks which operand is a weight.
    ``prepacked``: the weight is in an opaque packed layout; the linear is recorded, not
    prefetched. ``hidden``: an op that runs matmuls on weights it looks up itself (vLLM's
    fused MoE, PyTorch's fused transformer layers): recorded as such, with ``weight`` naming
    the role it would play ("" for none) and ``note`` saying what the op hides.
    ``only_if``: the name of a condition in :data:`LINEAR_CONDITIONS` a node of the op must
    meet to be a linear (other nodes of the op are not linears).
    """

    weight: str
    activations: tuple[str, ...]
    swappable: bool = False
    prepacked: bool = False
    hidden: bool = False
    note: str = ""
    only_if: str | None = None


_MOE = "looks its expert weights up by layer name"

DEFAULT_LINEAR_OPS: Mapping[str, LinearOpSpec] = MappingProxyType(
    {
        "aten::mm": LinearOpSpec("mat2", ("self",), swappable=True),
        "aten::addmm": LinearOpSpec("mat2", ("mat1",), swappable=True),
        "aten::bmm": LinearOpSpec("mat2", ("self",), swappable=True),
        "aten::baddbmm": LinearOpSpec("batch2", ("batch1",), swappable=True),
        "aten::linear": LinearOpSpec("weight", ("input",)),
        "aten::matmul": LinearOpSpec("other", ("self",), swappable=True),
        "aten::_scaled_mm": LinearOpSpec("mat2", ("self", "scale_a"), swappable=True),
        "aten::_int_mm": LinearOpSpec("mat2", ("self",), swappable=True),
        # CPU int8 weight-only (torchao, gpt-fast): mat2 is the int8 weight, scales per row
        "aten::_weight_int8pack_mm": LinearOpSpec("mat2", ("self",)),
        # int4 weight-only (torchao, gpt-fast): mat2 is packed, and all of it is read
        "aten::_weight_int4pack_mm": LinearOpSpec("mat2", ("self",)),
        "aten::_weight_int4pack_mm_for_cpu": LinearOpSpec("mat2", ("self",)),
        "aten::_weight_int4pack_mm_with_scales_and_zeros": LinearOpSpec("mat2", ("self",)),
        "aten::convolution": LinearOpSpec("weight", ("input",), only_if="pointwise_conv"),
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
        # vLLM on the CPU prepacks linear weights into oneDNN handles (its parameter emptied):
        # the graph holds only the handle, no weight tensor to prefetch
        "_C::onednn_mm": LinearOpSpec(
            "",
            ("a",),
            hidden=True,
            note="multiplies by a weight vLLM prepacked into a oneDNN handle (handler_tensor): "
            "no weight tensor in the graph",
        ),
        # vLLM's CPU MoE (its Python body traced, by default on the CPU): the fused kernel
        # takes the layer's stacked gate/up experts (w13) as a plain graph input; w2 is
        # recorded as taken by an opaque op
        "_C::cpu_fused_moe": LinearOpSpec("w13", ("input",)),
        # vLLM's fused MoE looks its expert weights up by layer name: no FX pass sees them
        "vllm::moe_forward": LinearOpSpec(MOE_GATE_UP, ("hidden_states",), hidden=True, note=_MOE),
        "vllm::moe_forward_shared": LinearOpSpec(
            MOE_GATE_UP, ("hidden_states",), hidden=True, note=_MOE
        ),
        # nn.TransformerEncoderLayer / MultiheadAttention fast paths (eval, no grad): every
        # matmul of the layer runs inside one op, with no vector work between for a prefetch
        "aten::_transformer_encoder_layer_fwd": LinearOpSpec(
            "", ("src",), hidden=True, note="runs the encoder layer's matmuls inside one op"
        ),
        "aten::_native_multi_head_attention": LinearOpSpec(
            "",
            ("query", "key", "value"),
            hidden=True,
            note="runs the attention's matmuls inside one op",
        ),
    }
)


#: Ops that hand an MoE layer's tokens to its experts, one row per token-expert pair (a
#: gather of the rows, a repeat), and the argument holding the tokens routed into the layer:
#: an expert linear counts the rows of that argument, not the pairs (see
#: :func:`analysis.token_bounds.linear_tokens`).
DISPATCH_OPS: Mapping[str, str] = MappingProxyType(
    {
        "aten::index": "self",  # hidden[perm // top_k]: transformers' grouped_mm experts
        "aten::_unsafe_index": "self",
        "aten::index_select": "self",
        "aten::repeat_interleave": "self",  # transformers' batched_mm experts
        "aten::repeat": "self",  # dense experts: every token to every expert
        "aten::expand": "self",  # repeat_interleave, decomposed (unsqueeze, expand, clone)
        "npu::npu_moe_init_routing": "x",  # vllm-ascend
        "npu::npu_moe_init_routing_v2": "x",
    }
)
