"""Roles (``analysis.roles``) of the naming schemes of the main model families.

Each family's real module tree (transformers' models, built on the meta device) or a
module tree written the way the code base names things (Meta/torchtitan/gpt-fast, vLLM,
PEFT) is matched against the default rules: every linear gets the role its family means.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprefetch
from fxprefetch import WeightPrefetchConfig
from fxprefetch.passes import add_role_rule
from fxprefetch.passes.analysis.roles import match_role, owner_path
from fxprefetch.pipeline import run_weight_prefetch

from support.planning import ON, fresh_export
from support.tracing import fake_trace

transformers = pytest.importorskip("transformers")

QKV, OUT, UP, DOWN, MOE = "attn.qkv", "attn.o", "mlp.gate_up", "mlp.down", "moe.gate_up"
LLAMA = {
    "self_attn.q_proj": QKV,
    "self_attn.k_proj": QKV,
    "self_attn.v_proj": QKV,
    "self_attn.o_proj": OUT,
    "mlp.gate_proj": UP,
    "mlp.up_proj": UP,
    "mlp.down_proj": DOWN,
}
# family -> (config class, extra config, {module path after the layer index: role})
FAMILIES = {
    "llama": ("LlamaConfig", {}, LLAMA),
    "qwen2": ("Qwen2Config", {}, LLAMA),
    "qwen3": ("Qwen3Config", {}, LLAMA),
    "mistral": ("MistralConfig", {}, LLAMA),
    "gemma": ("GemmaConfig", {"head_dim": 8}, LLAMA),
    "mixtral": (
        "MixtralConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        {
            **{k: v for k, v in LLAMA.items() if k.startswith("self_attn")},
            "mlp.experts.gate_up_proj": MOE,
            "mlp.experts.down_proj": None,
        },
    ),
    "deepseek-v3": (
        "DeepseekV3Config",
        {
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
            "mlp.gate_proj": UP,  # the dense first layer
            "mlp.up_proj": UP,
            "mlp.down_proj": DOWN,
            "mlp.experts.gate_up_proj": MOE,
            "mlp.experts.down_proj": None,
            "mlp.shared_experts.gate_proj": UP,
            "mlp.shared_experts.up_proj": UP,
            "mlp.shared_experts.down_proj": DOWN,
        },
    ),
    "phi3": (
        "Phi3Config",
        {},
        {
            "self_attn.qkv_proj": QKV,
            "self_attn.o_proj": OUT,
            "mlp.gate_up_proj": UP,
            "mlp.down_proj": DOWN,
        },
    ),
    "phi": (
        "PhiConfig",
        {},
        {
            "self_attn.q_proj": QKV,
            "self_attn.k_proj": QKV,
            "self_attn.v_proj": QKV,
            "self_attn.dense": OUT,
            "mlp.fc1": UP,
            "mlp.fc2": DOWN,
        },
    ),
    "gpt2": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4},
        {"attn.c_attn": QKV, "attn.c_proj": OUT, "mlp.c_fc": UP, "mlp.c_proj": DOWN},
    ),
    "gpt-neox": (
        "GPTNeoXConfig",
        {},
        {
            "attention.query_key_value": QKV,
            "attention.dense": OUT,
            "mlp.dense_h_to_4h": UP,
            "mlp.dense_4h_to_h": DOWN,
        },
    ),
    "falcon": (
        "FalconConfig",
        {},
        {
            "self_attention.query_key_value": QKV,
            "self_attention.dense": OUT,
            "mlp.dense_h_to_4h": UP,
            "mlp.dense_4h_to_h": DOWN,
        },
    ),
}
BASE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)


def _linear_paths(model: nn.Module) -> dict[str, str]:
    """Owner path of every 2-D+ weight inside a decoder layer -> the path after the index."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            found[name] = name
    for name, param in model.named_parameters():
        if param.dim() == 3:  # stacked experts
            found[owner_path(name)] = owner_path(name)
    inside = {}
    for path in found:
        parts = path.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if digits:
            inside[path] = ".".join(parts[digits[0] + 1 :])
    return inside


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_linear_of_a_family_gets_its_role(family):
    config_class, extra, table = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**BASE, **extra})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    paths = _linear_paths(model)
    assert {suffix for suffix in paths.values()} == set(table), family
    for path, suffix in paths.items():
        rule = match_role(path)
        assert (rule.role if rule else None) == table[suffix], (family, path)
    head = match_role("lm_head")
    assert head is not None and head.role is None


@pytest.mark.parametrize(
    ("path", "role"),
    [
        # Meta / torchtitan / gpt-fast
        ("layers.0.attention.wq", QKV),
        ("layers.0.attention.wk", QKV),
        ("layers.0.attention.wv", QKV),
        ("layers.0.attention.wqkv", QKV),
        ("layers.0.attention.wo", OUT),
        ("layers.0.feed_forward.w1", UP),
        ("layers.0.feed_forward.w3", UP),
        ("layers.0.feed_forward.w2", DOWN),
        ("layers.0.feed_forward.experts.w1", MOE),
        ("output", None),
        # vLLM
        ("model.layers.0.self_attn.qkv_proj", QKV),
        ("model.layers.0.self_attn.o_proj", OUT),
        ("model.layers.0.mlp.gate_up_proj", UP),
        ("model.layers.0.mlp.down_proj", DOWN),
        ("model.layers.0.mlp.experts.w13_weight", MOE),
        ("model.layers.0.mlp.experts.w2_weight", None),
        # PEFT wrappers: the base layer is the layer, the adapters have no role
        ("model.layers.0.self_attn.q_proj.base_layer", QKV),
        ("model.layers.0.mlp.down_proj.base_layer", DOWN),
        ("model.layers.0.self_attn.q_proj.lora_A.default", None),
        ("model.layers.0.self_attn.q_proj.lora_B.default", None),
        # FSDP / activation checkpointing wrappers
        ("layers.0._checkpoint_wrapped_module.attention.wo", OUT),
        # T5-style: the parent decides what "wo" is
        ("encoder.block.0.layer.0.SelfAttention.o", OUT),
        ("encoder.block.0.layer.1.DenseReluDense.wo", DOWN),
        ("encoder.block.0.layer.0.SelfAttention.q", QKV),
        ("decoder.block.0.layer.1.EncDecAttention.v", QKV),
        # BERT / RoBERTa / ELECTRA: "output.dense" is the attention's under attention, the
        # FFN's down projection where its parent is the numbered layer itself
        ("bert.encoder.layer.0.attention.self.query", QKV),
        ("roberta.encoder.layer.1.attention.self.value", QKV),
        ("bert.encoder.layer.0.attention.output.dense", OUT),
        ("bert.encoder.layer.0.intermediate.dense", UP),
        ("bert.encoder.layer.0.output.dense", DOWN),
        ("bert.pooler.dense", None),  # no rule: neither under attention nor a layer's
        # timm-style vision blocks (Qwen2.5-VL, GLM-4V, InternViT, EVA)
        ("model.visual.blocks.0.attn.qkv", QKV),
        ("model.visual.blocks.0.attn.proj", OUT),
        ("vision_model.encoder.layers.3.attn.proj", OUT),
        # SSM mixers (Falcon-H1's Mamba2, Mamba's mixer): sized as attention's projections
        ("model.layers.0.mamba.in_proj", QKV),
        ("model.layers.0.mamba.out_proj", OUT),
        ("backbone.layers.0.mixer.in_proj", QKV),
    ],
)
def test_code_base_naming_schemes(path, role):
    rule = match_role(path)
    assert (rule.role if rule else None) == role


class TransformerBlock(nn.Module):
    """gpt-fast / torchtitan: attention.wq/wk/wv/wo, feed_forward.w1/w2/w3."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(16)
        self.attention = nn.ModuleDict(
            {n: nn.Linear(16, 16, bias=False) for n in ["wq", "wk", "wv", "wo"]}
        )
        self.ffn_norm = nn.RMSNorm(16)
        self.feed_forward = nn.ModuleDict(
            {
                "w1": nn.Linear(16, 32, bias=False),
                "w3": nn.Linear(16, 32, bias=False),
                "w2": nn.Linear(32, 16, bias=False),
            }
        )

    def forward(self, x):
        a, f = self.attention, self.feed_forward
        h = self.attention_norm(x)
        x = x + a["wo"](a["wq"](h) * a["wk"](h).sigmoid() + a["wv"](h))
        h = self.ffn_norm(x)
        return x + f["w2"](torch.nn.functional.silu(f["w1"](h)) * f["w3"](h))


def test_meta_style_block_through_the_pass():
    gm, names = fake_trace(TransformerBlock(), torch.randn(4, 16))
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(enabled=True), weight_names=names)
    roles = {r.weight: r.role for r in plan.records}
    assert roles == {
        "attention.wq.weight": QKV,
        "attention.wk.weight": QKV,
        "attention.wv.weight": QKV,
        "attention.wo.weight": OUT,
        "feed_forward.w1.weight": UP,
        "feed_forward.w3.weight": UP,
        "feed_forward.w2.weight": DOWN,
    }
    # wo follows vector work (sigmoid, mul, add); w2 needs sequence parallelism
    assert {r.weight for r in plan.prefetched} == {
        "attention.wo.weight",
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "feed_forward.w1.weight",
        "feed_forward.w3.weight",
    }


class LoraLinear(nn.Module):
    """PEFT's LoRA layer: ``base_layer`` plus ``lora_A``/``lora_B`` adapters per name."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(16)
        self.self_attn = nn.ModuleDict(
            {
                "q_proj": LoraLinear(nn.Linear(16, 16, bias=False)),
                "o_proj": LoraLinear(nn.Linear(16, 16, bias=False)),
            }
        )

    def forward(self, x):
        return self.self_attn["o_proj"](self.self_attn["q_proj"](self.input_layernorm(x)).relu())


def test_peft_base_layers_get_their_roles_and_adapters_none():
    gm, names = fake_trace(PeftAttention(), torch.randn(4, 16))
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(enabled=True), weight_names=names)
    roles = {r.weight: r.role for r in plan.records}
    assert roles["self_attn.q_proj.base_layer.weight"] == QKV
    assert roles["self_attn.o_proj.base_layer.weight"] == OUT
    assert {roles[w] for w in roles if ".lora_" in w} == {None}
    (q,) = [r for r in plan.prefetched if r.role == QKV]
    assert q.weight == "self_attn.q_proj.base_layer.weight"


class SharedWeight(nn.Module):
    """``o_proj`` reads ``q_proj``'s weight (tied projections)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.o_proj = TiedLinear(self.q_proj)

    def forward(self, x):
        return self.o_proj(self.norm(self.q_proj(self.norm(x))))


class TiedLinear(nn.Module):
    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.source = [source]  # not a submodule: the weight's owner stays q_proj

    def forward(self, x):
        return torch.nn.functional.linear(x, self.source[0].weight)


@pytest.mark.compile
def test_a_shared_weight_takes_the_role_of_the_linear_that_reads_it(fresh_dynamo):
    ratios = {"attn": {"qkv": 1.0, "o": 0.25}}
    model = SharedWeight()
    options = {"target": "eager", "weight_prefetch_config": {"prefetch_ratio": ratios}}
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    (plan,) = fxprefetch.last_plans()
    by_module = {r.module.rsplit(".", 1)[-1]: r for r in plan.records}
    assert by_module["q_proj"].role == QKV and by_module["o_proj"].role == OUT
    assert by_module["o_proj"].weight == "q_proj.weight"  # read from q_proj, sized as attn.o
    assert by_module["o_proj"].prefetch_bytes == 16 * 16 * 4 // 4
    assert by_module["q_proj"].prefetch_bytes == 16 * 16 * 4


def test_pytorch_transformer_layers_get_their_roles():
    """``nn.Transformer``'s real module tree: MultiheadAttention holds ``in_proj_weight``
    itself (attn.qkv) and its ``out_proj`` as a child (attn.o); linear1/linear2 are the MLP."""
    model = nn.Transformer(32, 4, 1, 1, 64, batch_first=True)
    roles = {
        name: (rule.role if (rule := match_role(owner_path(name))) else None)
        for name, param in model.named_parameters()
        if param.dim() == 2
    }
    for prefix in ("encoder.layers.0.", "decoder.layers.0."):
        for attn in ("self_attn", "multihead_attn") if "decoder" in prefix else ("self_attn",):
            assert roles.pop(f"{prefix}{attn}.in_proj_weight") == QKV
            assert roles.pop(f"{prefix}{attn}.out_proj.weight") == OUT
        assert roles.pop(f"{prefix}linear1.weight") == UP
        assert roles.pop(f"{prefix}linear2.weight") == DOWN
    assert roles == {}
    # separate q/k/v projections (kdim, vdim) and a module named "mha"
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=16)
    for name, _ in mha.named_parameters(prefix="mha"):
        if name.endswith("weight"):
            assert match_role(owner_path(name)).role == (OUT if "out_proj" in name else QKV)


def test_multihead_attention_through_the_pass():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    gm, names = fake_trace(layer, torch.randn(2, 5, 32))  # with grad: no fused fast path
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(enabled=True), weight_names=names)
    assert {r.weight: r.role for r in plan.records} == {
        "self_attn.in_proj_weight": QKV,
        "self_attn.out_proj.weight": OUT,
        "linear1.weight": UP,
        "linear2.weight": DOWN,
    }
    qkv = next(r for r in plan.records if r.role == QKV)
    assert qkv.weight_shape == (96, 32) and qkv.weight_bytes == 96 * 32 * 4


# -- role rules users extend, through the pass -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("model.layers.3.self_attn.qkv_proj", "attn.qkv"),
        ("model.layers.3.self_attn.q_proj", "attn.qkv"),
        ("model.layers.3.self_attn.v_proj", "attn.qkv"),
        ("model.layers.3.self_attn.o_proj", "attn.o"),
        ("transformer.h.0.self_attention.dense", "attn.o"),
        ("model.layers.0.self_attn.q_a_proj", "attn.qkv"),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa", "attn.qkv"),
        ("model.layers.0.self_attn.kv_b_proj", "attn.qkv"),
        ("model.layers.0.self_attn.fused_qkv_a_proj", "attn.qkv"),
        ("model.layers.0.mlp.gate_up_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.gate_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.down_proj", "mlp.down"),
        ("model.layers.0.mlp.shared_experts.gate_up_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.experts.w13_weight", "moe.gate_up"),
        ("model.layers.0.mlp.experts.gate_up_proj", "moe.gate_up"),
        ("model.layers.0.block_sparse_moe.experts.3.w1", "moe.gate_up"),
        ("model.layers.0.block_sparse_moe.experts.3.w3", "moe.gate_up"),
        ("model.layers.0.mlp.experts.7.up_proj", "moe.gate_up"),
        ("model.layers.0.mlp.experts.w2_weight", None),
        ("model.layers.0.block_sparse_moe.experts.3.w2", None),
        ("model.layers.0.mlp.gate", None),
        ("lm_head", None),
    ],
)
def test_default_role_rules(path, role):
    rule = match_role(path)
    assert rule is not None and rule.role == role


def test_user_role_rule_wins(dense):
    _, _, gm, names = fresh_export(dense)
    add_role_rule(r"\.lm_head$|^lm_head$", "mlp.gate_up", "tied head")
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    head = next(r for r in plan if r.weight == "lm_head.weight")
    assert head.role == "mlp.gate_up" and head.prefetched
    with pytest.raises(ValueError, match="unknown role"):
        add_role_rule("x", "mlp.up")
