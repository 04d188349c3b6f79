"""Which role a weight plays: attn.qkv, attn.o, mlp.gate_up, mlp.down or moe.gate_up.

Rules are data: an ordered list of ``(regex, role)`` matched against a dotted path: the
linear's own module path (``nn_module_stack``) first, then the owner of its weight (the
parameter path without ``.weight``). The first match wins; ``role=None`` means "no role" on
purpose. Rules see the parent module, so ``attn.c_proj`` is ``attn.o`` and ``mlp.c_proj``
is ``mlp.down``.
Users add rules through :mod:`passes.rules` (theirs are tried first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.fx import Node

    from passes.linears import LinearUse
    from passes.rules import PrefetchRules

_EXPERTS = r"(?:^|\.)(?:experts|local_experts)(?:\.\d+)?"


@dataclass(frozen=True)
class RoleRule:
    pattern: str
    role: str | None
    why: str = ""

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


_ATTN = r"\w*(?i:attn|attention|mha)\w*"  # self_attn, attention, SelfAttention, multihead_attn
_MLP = r"\w*(?i:mlp|ffn|feed_forward|DenseReluDense)\w*"  # mlp, feed_forward, shared_mlp

# The naming schemes of the main model families (see the README's role table). Paths are
# matched after wrappers are removed (see ``canonical_path``); the first match wins.
DEFAULT_ROLE_RULES: tuple[RoleRule, ...] = (
    # Adapters and experts first: their names overlap with dense names.
    RoleRule(r"(?:^|\.)lora_(?:A|B|embedding_A|embedding_B)(?:\.\w+)?$", None, "LoRA adapter"),
    RoleRule(
        rf"{_EXPERTS}\.(?:gate_up_proj|gate_proj|up_proj|w1|w3|w13)(?:_weight)?$",
        "moe.gate_up",
        "expert gate/up projection",
    ),
    RoleRule(
        rf"{_EXPERTS}\.(?:down_proj|w2)(?:_weight)?$",
        None,
        "expert down projection (no role in weight_prefetch_config)",
    ),
    RoleRule(
        r"(?:^|\.)(?:qkv_proj|q_proj|k_proj|v_proj|query_key_value|c_attn|Wqkv|wqkv"
        r"|wq|wk|wv|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|fused_qkv_a_proj)$",
        "attn.qkv",
        "attention input projection",
    ),
    # nn.MultiheadAttention holds its input projection itself (its out_proj is a child)
    RoleRule(
        r"(?:^|\.)(?:in_proj_weight|q_proj_weight|k_proj_weight|v_proj_weight)$",
        "attn.qkv",
        "MultiheadAttention input projection",
    ),
    RoleRule(r"(?:^|\.)o_proj$", "attn.o", "attention output projection"),
    # out_proj / dense / c_proj / wo mean "output of the block": the parent decides which
    RoleRule(
        rf"(?:^|\.){_ATTN}\.(?:out_proj|dense|c_proj|wo|o)$",
        "attn.o",
        "output projection under an attention module",
    ),
    RoleRule(
        rf"(?:^|\.){_MLP}\.(?:out_proj|dense|c_proj|wo|fc_out)$",
        "mlp.down",
        "output projection under an MLP module",
    ),
    RoleRule(
        r"(?:^|\.)(?:gate_up_proj|gate_proj|up_proj|w1|w3|fc1|fc_in|c_fc|dense_h_to_4h"
        r"|wi|wi_0|wi_1|linear1)$",
        "mlp.gate_up",
        "dense MLP gate/up projection",
    ),
    RoleRule(
        r"(?:^|\.)(?:down_proj|w2|fc2|dense_4h_to_h|linear2)$",
        "mlp.down",
        "dense MLP down projection",
    ),
    RoleRule(r"(?:^|\.)(?:gate|router)$", None, "MoE router"),
    RoleRule(r"(?:^|\.)(?:lm_head|embed_tokens|wte|output)$", None, "head or embedding"),
)

# Wrapper modules that hold the real layer one level down (PEFT, FSDP, activation
# checkpointing, torch.compile): ``q_proj.base_layer`` is ``q_proj``.
_WRAPPERS = re.compile(
    r"\.(?:base_layer|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module|module)(?=\.|$)"
)


def canonical_path(path: str) -> str:
    """``model.layers.0.self_attn.q_proj.base_layer`` -> ``model.layers.0.self_attn.q_proj``."""
    return _WRAPPERS.sub("", path)


def owner_path(weight_path: str) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj``."""
    for suffix in (".weight", ".qweight", ".weight_packed"):
        if weight_path.endswith(suffix):
            return weight_path[: -len(suffix)]
    return weight_path


def is_experts_path(path: str) -> bool:
    return (
        re.search(rf"{_EXPERTS}$", path) is not None
        or re.search(rf"{_EXPERTS}\.", path) is not None
    )


def match_role(path: str, rules: Sequence[RoleRule] = DEFAULT_ROLE_RULES) -> RoleRule | None:
    """The first of ``rules`` that matches ``path`` (wrappers removed), or None."""
    path = canonical_path(path)
    return next((rule for rule in rules if rule.matches(path)), None)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(path: str | None) -> int | None:
    if not path:
        return None
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None


def assign_roles(uses: Sequence[LinearUse], rules: PrefetchRules) -> None:
    """Set ``role`` on each use that reads a weight: by the linear's own module path first,
    then by the weight's owner, then (inside an experts module) by the order of its matmuls."""
    first_expert_weight: dict[str, Node] = {}
    for use in uses:
        if use.root is None:
            use.role_reason = "not a weight"
            continue
        candidates = [use.module] if use.module else []
        if use.named:
            candidates.append(owner_path(use.weight_name))
        found = (match_role(p, rules.role_rules) for p in candidates)
        rule = next((r for r in found if r is not None), None)
        if rule is not None:
            use.role, use.role_reason = rule.role, rule.why
            continue
        experts = next((p for p in candidates if is_experts_path(p)), None)
        if experts is not None:
            # Fused or grouped experts whose weight names are unknown: the first weight the
            # experts module multiplies by is its gate/up projection.
            first = first_expert_weight.setdefault(experts, use.root)
            if first is use.root:
                use.role, use.role_reason = rules.first_expert_role, "first expert matmul"
            else:
                use.role_reason = "later expert matmul"
            continue
        use.role_reason = "no rule matched"
