"""The model zoo: tiny random-weight configs of the families transformers ships, and the
role each linear of a layer gets.

One :class:`Family` per architecture: its config class (from the installed transformers),
the few fields a tiny model needs (2 layers, hidden 64, float32), how it is built and fed,
and the expected roles of the linears inside one layer, keyed by their path after the
layer's index (``self_attn.q_proj``; ``None``: no role, on purpose). Adding a family is one
entry here; ``tests/test_zoo.py`` checks each, and ``docs/architectures.md`` shows
:func:`roles_table` (a test keeps the page equal to it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

QKV, OUT, UP, DOWN, MOE = "attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "moe.gate_up"

# what every decoder config takes
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
NO_HEAD_DIM = {k: v for k, v in SMALL.items() if k != "head_dim"}  # derived, or fixed otherwise
ATTN = {"self_attn.q_proj": QKV, "self_attn.k_proj": QKV, "self_attn.v_proj": QKV}
LLAMA = {**ATTN, "self_attn.o_proj": OUT, "mlp.gate_proj": UP, "mlp.up_proj": UP}
LLAMA |= {"mlp.down_proj": DOWN}
EXPERTS = {"experts.gate_up_proj": MOE, "experts.down_proj": None}
BERT = {
    "attention.self.query": QKV,
    "attention.self.key": QKV,
    "attention.self.value": QKV,
    "attention.output.dense": OUT,
    "intermediate.dense": UP,
    "output.dense": DOWN,
}


def _under(prefix: str, table: Mapping[str, str | None]) -> dict[str, str | None]:
    return {f"{prefix}.{k}": v for k, v in table.items()}


@dataclass(frozen=True)
class Family:
    """One architecture of the zoo."""

    name: str  # as the docs list it
    config: str  # the config class's name in transformers
    fields: Mapping[str, Any]
    roles: Mapping[str, str | None]  # path after the layer index -> role
    kind: str = "causal"  # causal | encoder | t5 | vision-qwen2.5 | text-model
    # roles of linears outside the layers (head, pooler), by full path
    outside: Mapping[str, str | None] = field(default_factory=dict)
    note: str = ""


ZOO: tuple[Family, ...] = (
    Family("Llama", "LlamaConfig", SMALL, LLAMA),
    Family("Gemma-3", "Gemma3TextConfig", SMALL, LLAMA),
    Family("Mistral", "MistralConfig", SMALL, LLAMA),
    Family("Qwen3", "Qwen3Config", SMALL, LLAMA),
    Family(
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        {**ATTN, "self_attn.o_proj": OUT, "mlp.gate": None, **_under("mlp", EXPERTS)},
    ),
    Family(
        "Qwen2-MoE",
        "Qwen2MoeConfig",
        {
            **SMALL,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
        {
            **ATTN,
            "self_attn.o_proj": OUT,
            "mlp.gate": None,
            **_under("mlp", EXPERTS),
            "mlp.shared_expert.gate_proj": UP,
            "mlp.shared_expert.up_proj": UP,
            "mlp.shared_expert.down_proj": DOWN,
            "mlp.shared_expert_gate": None,
        },
    ),
    Family(
        "Mixtral",
        "MixtralConfig",
        {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
        {**ATTN, "self_attn.o_proj": OUT, "mlp.gate": None, **_under("mlp", EXPERTS)},
    ),
    Family(
        "DeepSeek-V3",
        "DeepseekV3Config",
        {
            **NO_HEAD_DIM,
            "num_key_value_heads": 4,  # MLA: one latent for every head
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "n_shared_experts": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "moe_intermediate_size": 32,
            "n_group": 1,
            "topk_group": 1,
        },
        {
            "self_attn.q_a_proj": QKV,
            "self_attn.q_b_proj": QKV,
            "self_attn.kv_a_proj_with_mqa": QKV,
            "self_attn.kv_b_proj": QKV,
            "self_attn.o_proj": OUT,
            "mlp.gate_proj": UP,  # layer 0 is dense
            "mlp.up_proj": UP,
            "mlp.down_proj": DOWN,
            "mlp.gate": None,
            **_under("mlp", EXPERTS),
            "mlp.shared_experts.gate_proj": UP,
            "mlp.shared_experts.up_proj": UP,
            "mlp.shared_experts.down_proj": DOWN,
        },
        note="MLA; layer 0 dense, layer 1 routed + shared experts",
    ),
    Family(
        "GLM-4",
        "Glm4Config",
        SMALL,
        {**ATTN, "self_attn.o_proj": OUT, "mlp.gate_up_proj": UP, "mlp.down_proj": DOWN},
    ),
    Family(
        "GLM-4-MoE",
        "Glm4MoeConfig",
        {
            **SMALL,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        {
            **LLAMA,
            "mlp.gate": None,
            **_under("mlp", EXPERTS),
            "mlp.shared_experts.gate_proj": UP,
            "mlp.shared_experts.up_proj": UP,
            "mlp.shared_experts.down_proj": DOWN,
        },
        note="layer 0 dense, layer 1 routed + shared experts",
    ),
    Family("OLMo-2", "Olmo2Config", SMALL, LLAMA),
    Family(
        "Phi-3",
        "Phi3Config",
        SMALL,
        {
            "self_attn.qkv_proj": QKV,
            "self_attn.o_proj": OUT,
            "mlp.gate_up_proj": UP,
            "mlp.down_proj": DOWN,
        },
    ),
    Family("Granite", "GraniteConfig", SMALL, LLAMA),
    Family(
        "Granite-MoE",
        "GraniteMoeConfig",
        {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
        {
            **ATTN,
            "self_attn.o_proj": OUT,
            "block_sparse_moe.router": None,
            **_under("block_sparse_moe", EXPERTS),
        },
    ),
    Family(
        "Llama-4 (text)",
        "Llama4TextConfig",
        {
            **SMALL,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 128,
        },
        {
            **ATTN,
            "self_attn.o_proj": OUT,
            "feed_forward.router": None,
            **_under("feed_forward", EXPERTS),
            "feed_forward.shared_expert.gate_proj": UP,
            "feed_forward.shared_expert.up_proj": UP,
            "feed_forward.shared_expert.down_proj": DOWN,
        },
    ),
    Family(
        "GPT-OSS",
        "GptOssConfig",
        {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
        {**ATTN, "self_attn.o_proj": OUT, "mlp.router": None, **_under("mlp", EXPERTS)},
    ),
    Family(
        "Falcon",
        "FalconConfig",
        {**NO_HEAD_DIM, "new_decoder_architecture": True, "num_kv_heads": 2},
        {
            "self_attention.query_key_value": QKV,
            "self_attention.dense": OUT,
            "mlp.dense_h_to_4h": UP,
            "mlp.dense_4h_to_h": DOWN,
        },
    ),
    Family(
        "Falcon-H1",
        "FalconH1Config",
        {
            **SMALL,
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 16,
            "mamba_chunk_size": 8,
        },
        {
            **ATTN,
            "self_attn.o_proj": OUT,
            "mamba.in_proj": QKV,
            "mamba.out_proj": OUT,
            "feed_forward.gate_proj": UP,
            "feed_forward.up_proj": UP,
            "feed_forward.down_proj": DOWN,
        },
        note="Mamba2 mixer beside attention: in_proj/out_proj sized as attention's",
    ),
    Family("BERT", "BertConfig", SMALL, BERT, kind="encoder"),
    Family("RoBERTa", "RobertaConfig", SMALL, BERT, kind="encoder"),
    Family("ELECTRA", "ElectraConfig", SMALL, BERT, kind="encoder"),
    Family(
        "ViT",
        "ViTConfig",
        {**SMALL, "image_size": 16, "patch_size": 8},
        {
            "attention.q_proj": QKV,
            "attention.k_proj": QKV,
            "attention.v_proj": QKV,
            "attention.o_proj": OUT,
            "mlp.fc1": UP,
            "mlp.fc2": DOWN,
        },
        kind="vit",
    ),
    Family(
        "T5 (encoder)",
        "T5Config",
        {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2},
        {
            "layer.0.SelfAttention.q": QKV,
            "layer.0.SelfAttention.k": QKV,
            "layer.0.SelfAttention.v": QKV,
            "layer.0.SelfAttention.o": OUT,
            "layer.1.DenseReluDense.wi": UP,
            "layer.1.DenseReluDense.wo": DOWN,
        },
        kind="t5",
    ),
    Family(
        "Qwen2.5-VL (text tower)",
        "Qwen2_5_VLTextConfig",
        {**SMALL, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        LLAMA,
        kind="text-model",
    ),
    Family(
        "Qwen2.5-VL (vision tower)",
        "Qwen2_5_VLVisionConfig",
        {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 16,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 1,
        },
        {
            "attn.qkv": QKV,
            "attn.proj": OUT,
            "mlp.gate_proj": UP,
            "mlp.up_proj": UP,
            "mlp.down_proj": DOWN,
        },
        kind="vision-qwen2.5",
        note="timm-style blocks: attn.qkv, attn.proj",
    ),
)


def build(family: Family) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]] | str:
    """The family's tiny model (float32, random weights, eval mode) and its inputs; or why
    the installed transformers cannot build it."""
    import transformers

    config_class = getattr(transformers, family.config, None)
    if config_class is None:
        return f"transformers {transformers.__version__} has no {family.config}"
    torch.manual_seed(0)
    config = config_class(**family.fields)
    ids = torch.randint(3, 128, (1, 5))
    builders: dict[str, Callable[[], tuple[torch.nn.Module, tuple, dict]]] = {
        "causal": lambda: (
            transformers.AutoModelForCausalLM.from_config(config),
            (ids,),
            {"use_cache": False},
        ),
        "text-model": lambda: (
            transformers.AutoModel.from_config(config),
            (ids,),
            {"use_cache": False},
        ),
        "encoder": lambda: (transformers.AutoModel.from_config(config), (ids,), {}),
        "t5": lambda: (transformers.T5EncoderModel(config), (ids,), {}),
        "vit": lambda: (
            transformers.ViTModel(config, add_pooling_layer=False),
            (torch.randn(1, 3, 16, 16),),
            {},
        ),
        "vision-qwen2.5": lambda: _qwen25_vision(transformers, config),
    }
    model, args, kwargs = builders[family.kind]()
    return model.float().eval(), args, kwargs


def _qwen25_vision(transformers: Any, config: Any) -> tuple[torch.nn.Module, tuple, dict]:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    model = m.Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    grid = torch.tensor([[1, 4, 4]])  # one image of 4x4 patches
    per_patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
    return model, (torch.randn(16, per_patch), grid), {}


def trace(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[GraphModule, dict[str, str], dict[str, torch.Tensor]]:
    """``model`` traced to an aten graph decomposed as inductor does, its parameters and
    buffers first: the graph, placeholder -> parameter path, and the tensors to call it with
    (``gm(state, *args)``). Real tensors: cheaper than an export, and the grouped matmuls of
    fp32 experts have no meta kernel."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state |= dict(model.named_buffers(remove_duplicate=False))

    def call(params: dict[str, torch.Tensor], *inputs: Any) -> Any:
        out = torch.func.functional_call(model, params, inputs, dict(kwargs), tie_weights=False)
        return out[0] if isinstance(out, tuple) else next(iter(out.values()))

    with torch.no_grad():
        gm = make_fx(
            call,
            record_module_stack=True,
            decomposition_table=select_decomp_table(),
            _error_on_data_dependent_ops=False,
        )(state, *args)
    placeholders = gm.graph.find_nodes(op="placeholder")
    return gm, {p.name: path for p, path in zip(placeholders, state, strict=False)}, state


def roles_table() -> str:
    """The zoo as a Markdown table: each family and the role of each linear of a layer."""
    roles = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "moe.gate_up")
    lines = [
        "| family | config | " + " | ".join(f"`{r}`" for r in roles) + " | no role |",
        "|---" * (len(roles) + 3) + "|",
    ]
    for family in ZOO:
        cells = []
        for role in (*roles, None):
            paths = [p for p, r in family.roles.items() if r == role]
            cells.append(", ".join(f"`{p}`" for p in paths) or "-")
        lines.append(f"| {family.name} | `{family.config}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
