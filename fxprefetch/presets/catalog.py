"""Built-in model presets (Hugging Face ``transformers`` architectures, random weights).

Tiny presets are for demos and tests; real-size presets carry the published shapes. The
presets are data; :mod:`fxprefetch.presets.build` turns one into a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # transformers config class name
    kwargs: dict[str, Any]
    tiny: bool
    description: str


_LLAMA_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_MOE_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llama-tiny", "LlamaConfig", _LLAMA_TINY, True, "2-layer Llama, hidden 64"),
        Preset("qwen3-moe-tiny", "Qwen3MoeConfig", _MOE_TINY, True, "2-layer Qwen3-MoE, 4 experts"),
        Preset(
            "mixtral-tiny",
            "MixtralConfig",
            dict(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                max_position_embeddings=128,
            ),
            True,
            "2-layer Mixtral, 4 experts",
        ),
        Preset(
            "llama-3-8b",
            "LlamaConfig",
            dict(
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                max_position_embeddings=8192,
                rope_theta=500000.0,
            ),
            False,
            "Llama 3 8B shapes",
        ),
        Preset(
            "qwen3-32b",
            "Qwen3Config",
            dict(
                vocab_size=151936,
                hidden_size=5120,
                intermediate_size=25600,
                num_hidden_layers=64,
                num_attention_heads=64,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=40960,
            ),
            False,
            "Qwen3 32B shapes",
        ),
        Preset(
            "qwen3-235b-a22b",
            "Qwen3MoeConfig",
            dict(
                vocab_size=151936,
                hidden_size=4096,
                intermediate_size=12288,
                moe_intermediate_size=1536,
                num_hidden_layers=94,
                num_attention_heads=64,
                num_key_value_heads=4,
                head_dim=128,
                num_experts=128,
                num_experts_per_tok=8,
                max_position_embeddings=40960,
            ),
            False,
            "Qwen3 235B-A22B shapes (128 experts)",
        ),
        Preset(
            "deepseek-v3",
            "DeepseekV3Config",
            dict(
                vocab_size=129280,
                hidden_size=7168,
                intermediate_size=18432,
                moe_intermediate_size=2048,
                num_hidden_layers=61,
                first_k_dense_replace=3,
                n_routed_experts=256,
                n_shared_experts=1,
                num_experts_per_tok=8,
                n_group=8,
                topk_group=4,
                q_lora_rank=1536,
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                qk_nope_head_dim=128,
                v_head_dim=128,
                num_attention_heads=128,
                num_key_value_heads=128,
                max_position_embeddings=163840,
            ),
            False,
            "DeepSeek-V3 shapes (MLA, 256 experts)",
        ),
    )
}


def preset_names(tiny: bool | None = None) -> list[str]:
    """The presets' names (``tiny``: only tiny ones, or only real-size ones)."""
    return [n for n, p in PRESETS.items() if tiny is None or p.tiny == tiny]
