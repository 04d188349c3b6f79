"""Op kinds for the vector-window walk: vector work, transparent ops, barriers and attention
(the default tables that :class:`tables.rules.PrefetchRules` holds)."""

from __future__ import annotations

from fxprefetch.passes.tables.collectives import COLLECTIVES

DEFAULT_TRANSPARENT_OPS: frozenset[str] = frozenset(
    {
        "getitem",
        *(
            f"aten::{name}"
            for name in (
                "view",
                "_unsafe_view",
                "reshape",
                "permute",
                "transpose",
                "t",
                "expand",
                "unsqueeze",
                "squeeze",
                "slice",
                "select",
                "split",
                "split_with_sizes",
                "chunk",
                "unbind",
                "alias",
                "detach",
                "clone",
                "contiguous",
                "as_strided",
                "narrow",
                "unflatten",
                "flatten",
                "_reshape_alias",
                "view_as",
                "expand_as",
                "lift_fresh_copy",
                "movedim",
            )
        ),
    }
)

DEFAULT_VECTOR_OPS: frozenset[str] = frozenset(
    {
        # norms
        "aten::rms_norm",
        "aten::_fused_rms_norm",
        "aten::layer_norm",
        "aten::native_layer_norm",
        "aten::group_norm",
        "aten::native_group_norm",
        "npu::npu_rms_norm",
        "npu::npu_add_rms_norm",
        "npu::npu_add_rms_norm_quant",
        # activations, SwiGLU
        "aten::silu",
        "aten::gelu",
        "aten::relu",
        "aten::sigmoid",
        "aten::tanh",
        "npu::npu_swiglu",
        "npu::npu_gelu",
        "npu::npu_fast_gelu",
        "npu::npu_dequant_swiglu_quant",
        # quantize (decomposed round/clamp/div are pointwise-tagged)
        "npu::npu_quantize",
        "npu::npu_dynamic_quant",
        "aten::quantize_per_tensor",
        "aten::quantize_per_token",
        # MoE gating and routing
        "aten::softmax",
        "aten::_softmax",
        "aten::log_softmax",
        "aten::_log_softmax",
        "aten::topk",
        "aten::sort",
        "aten::argsort",
        "aten::gather",
        "aten::index",
        "aten::index_select",
        "aten::scatter",
        "aten::scatter_add",
        "aten::scatter_reduce",
        "aten::index_put",
        "aten::index_add",
        "aten::histc",
        "aten::bincount",
        "aten::cumsum",
        "aten::one_hot",
        "aten::repeat_interleave",
        "aten::masked_fill",
        "aten::where",
        "npu::npu_moe_gating_top_k",
        "npu::npu_moe_gating_top_k_softmax",
        "npu::npu_moe_init_routing",
        "npu::npu_moe_init_routing_v2",
        # casts, copies and rotary embedding
        "aten::_to_copy",
        "aten::to",
        "aten::cat",
        "aten::stack",
        "aten::repeat",
        "aten::copy",
        "npu::npu_rotary_mul",
        "npu::npu_apply_rotary_pos_emb",
        # vLLM's custom ops (mutating ones appear inside auto_functionalized)
        "_C::rms_norm",
        "_C::fused_add_rms_norm",
        "_C::gemma_rms_norm",
        "_C::fused_add_gemma_rms_norm",
        "_C::rms_norm_static_fp8_quant",
        "_C::fused_add_rms_norm_static_fp8_quant",
        "_C::rms_norm_dynamic_per_token_quant",
        "_C::rms_norm_per_block_quant",
        "_C::silu_and_mul",
        "_C::silu_and_mul_quant",
        "_C::silu_and_mul_nvfp4_quant",
        "_C::silu_and_mul_per_block_quant",
        "_C::silu_and_mul_with_clamp",
        "_C::static_scaled_fp8_quant",
        "_C::dynamic_scaled_fp8_quant",
        "_C::dynamic_per_token_scaled_fp8_quant",
        "_C::per_token_group_fp8_quant",
        "_C::per_token_group_fp8_quant_packed",
        "_C::scaled_fp4_quant",
        "vllm_ir::rms_norm",
        "vllm_ir::fused_add_rms_norm",
        # vllm-ascend's
        "npu::npu_add_rms_norm_cast",
        "npu::npu_add_rms_norm_dynamic_quant",
        "npu::npu_add_rms_norm_dynamic_mx_quant",
        "npu::npu_dynamic_mx_quant",
        "_C_ascend::npu_add_rms_norm_bias",
        "_C_ascend::npu_swiglu_group_quant",
        "_C_ascend::npu_dequant_swiglu_quant",
        "_C_ascend::moe_gating_top_k",
        "vllm::quantize",
        "vllm::muls_add",
    }
)

# torch's op tags (``torch.Tag`` names) that make an op vector work when no table names it.
DEFAULT_VECTOR_TAGS: frozenset[str] = frozenset({"pointwise", "reduction"})

# Ops that must stop the walk whatever their tags say: collectives are communication, not
# vector work (collective windows are handled separately, see analysis/windows.py).
DEFAULT_BARRIER_OPS: frozenset[str] = frozenset(
    {
        "aten::embedding",
        *COLLECTIVES,
        # vLLM: attention, KV-cache writes and fused MoE are opaque to the walk
        "vllm::unified_attention_with_output",
        "vllm::unified_mla_attention_with_output",
        "vllm::unified_kv_cache_update",
        "vllm::unified_mla_kv_cache_update",
        "vllm::moe_forward",
        "vllm::moe_forward_shared",
    }
)

# Attention: a barrier to the vector walk, and the window of an attention window (the prefetch
# of o_proj starts before attention and is joined after it; see analysis/windows.py). Only
# where fork and join stay in one graph: vLLM splits its graphs at attention.
DEFAULT_ATTENTION_OPS: frozenset[str] = frozenset(
    {
        *(
            f"aten::{name}"
            for name in (
                "scaled_dot_product_attention",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention",
                "_scaled_dot_product_fused_attention_overrideable",
                "_flash_attention_forward",
                "_efficient_attention_forward",
            )
        ),
        "flex_attention",  # torch.ops.higher_order.flex_attention
        "flash_attn::_flash_attn_forward",
        "flash_attn::_flash_attn_varlen_forward",
        "vllm::unified_attention",
        "vllm::unified_attention_with_output",
        "vllm::unified_mla_attention_with_output",
        "npu::npu_fused_infer_attention_score",
        "npu::npu_incre_flash_attention",
        "npu::npu_prompt_flash_attention",
    }
)
