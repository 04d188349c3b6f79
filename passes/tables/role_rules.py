"""The default role rules: ``(regex, role)`` matched against a dotted module path, first match
wins (``role=None``: no role, on purpose). Held by
:class:`tables.rules.PrefetchRules`; see the README's role table."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fxprefetch.passes.tables.module_paths import DEFAULT_EXPERTS
from fxprefetch.roles import ATTN_O, ATTN_QKV, MLP_DOWN, MLP_GATE_UP, MOE_GATE_UP


@dataclass(frozen=True)
class RoleRule:
    pattern: str
    role: str | None
    why: str = ""

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


_ATTN = r"\w*(?i:attn|attention|mha)\w*"  # self_attn, attention, SelfAttention, multihead_attn
_MLP = r"\w*(?i:mlp|ffn|feed_forward|DenseReluDense)\w*"  # mlp, feed_forward, shared_mlp
_SSM = r"\w*(?i:mamba|mixer|ssm)\w*"  # Falcon-H1's mamba, Mamba's mixer

# The naming schemes of the main model families (see the README's role table). Paths are
# matched after wrappers are removed (see ``canonical_path``); the first match wins.
DEFAULT_ROLE_RULES: tuple[RoleRule, ...] = (
    # Adapters and experts first: their names overlap with dense names.
    RoleRule(r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B)(?:\.\w+)?$", None, "LoRA adapter"),
    RoleRule(
        rf"{DEFAULT_EXPERTS}\.(?:gate_up_proj|gate_proj|up_proj|w1|w3|w13)(?:_weight)?$",
        MOE_GATE_UP,
        "expert gate/up projection",
    ),
    RoleRule(
        rf"{DEFAULT_EXPERTS}\.(?:down_proj|w2)(?:_weight)?$",
        None,
        "expert down projection (no role in weight_prefetch_config)",
    ),
    RoleRule(
        r"(?:^|\.)(?:qkv_proj|q_proj|k_proj|v_proj|query_key_value|c_attn|Wqkv|wqkv"
        r"|wq|wk|wv|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|fused_qkv_a_proj)$",
        ATTN_QKV,
        "attention input projection",
    ),
    # nn.MultiheadAttention holds its input projection itself (its out_proj is a child)
    RoleRule(
        r"(?:^|\.)(?:in_proj_weight|q_proj_weight|k_proj_weight|v_proj_weight)$",
        ATTN_QKV,
        "MultiheadAttention input projection",
    ),
    # T5's SelfAttention.q/k/v, BERT's attention.self.query/key/value, a vision tower's fused
    # attn.qkv: names that mean a projection only under an attention module
    RoleRule(
        rf"(?:^|\.){_ATTN}\.(?:self\.)?(?:q|k|v|qkv|query|key|value)$",
        ATTN_QKV,
        "input projection under an attention module",
    ),
    # An SSM mixer (Falcon-H1's Mamba2) is the layer's token mixer beside attention: its
    # in_proj reads the same input norm as q/k/v, its out_proj follows the mixer's gated
    # norm as o_proj follows attention; they are sized as attention's projections.
    RoleRule(rf"(?:^|\.){_SSM}\.in_proj$", ATTN_QKV, "SSM mixer input projection"),
    RoleRule(rf"(?:^|\.){_SSM}\.out_proj$", ATTN_O, "SSM mixer output projection"),
    RoleRule(r"(?:^|\.)o_proj$", ATTN_O, "attention output projection"),
    # out_proj / dense / c_proj / wo / proj mean "output of the block": the parent decides
    # which; BERT's attention.output.dense is the attention's (the layer's own output.dense,
    # its FFN down projection, is matched below)
    RoleRule(
        rf"(?:^|\.){_ATTN}\.(?:output\.)?(?:out_proj|dense|c_proj|wo|o|proj)$",
        ATTN_O,
        "output projection under an attention module",
    ),
    RoleRule(
        rf"(?:^|\.){_MLP}\.(?:out_proj|dense|c_proj|wo|fc_out)$",
        MLP_DOWN,
        "output projection under an MLP module",
    ),
    # BERT, RoBERTa, ELECTRA: a layer holds intermediate.dense (the FFN's up projection,
    # behind the attention's LayerNorm) and output.dense (its down projection, behind GELU).
    # "output.dense" alone is ambiguous: under an attention module it was matched above, so
    # here only the one whose parent is the numbered layer itself is the FFN's.
    RoleRule(r"(?:^|\.)intermediate\.dense$", MLP_GATE_UP, "BERT-style FFN up projection"),
    RoleRule(r"(?:^|\.)\d+\.output\.dense$", MLP_DOWN, "BERT-style FFN down projection"),
    RoleRule(
        r"(?:^|\.)(?:gate_up_proj|gate_proj|up_proj|w1|w3|fc1|fc_in|c_fc|dense_h_to_4h"
        r"|wi|wi_0|wi_1|linear1)$",
        MLP_GATE_UP,
        "dense MLP gate/up projection",
    ),
    RoleRule(
        r"(?:^|\.)(?:down_proj|w2|fc2|dense_4h_to_h|linear2)$",
        MLP_DOWN,
        "dense MLP down projection",
    ),
    RoleRule(r"(?:^|\.)(?:gate|router)$", None, "MoE router"),
    RoleRule(r"(?:^|\.)(?:lm_head|embed_tokens|wte|output)$", None, "head or embedding"),
)
