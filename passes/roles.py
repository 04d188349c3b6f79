"""Which role a weight plays: attn.qkv, attn.o, mlp.gate_up, mlp.down or moe.gate_up.

Rules are data: an ordered list of ``(regex, role)`` matched against the weight's dotted
owner path (its parameter path without ``.weight``, or the module path from
``nn_module_stack``); the first match wins and ``role=None`` means "no role" on purpose.
Users add rules with :func:`add_role_rule` (theirs are tried first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXPERTS = r"(?:^|\.)(?:experts|local_experts)(?:\.\d+)?"


@dataclass(frozen=True)
class RoleRule:
    pattern: str
    role: str | None
    why: str = ""

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


DEFAULT_RULES: tuple[RoleRule, ...] = (
    # Experts first: their names overlap with dense MLP names.
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
        r"(?:^|\.)(?:qkv_proj|q_proj|k_proj|v_proj|query_key_value|c_attn|Wqkv"
        r"|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|fused_qkv_a_proj)$",
        "attn.qkv",
        "attention input projection",
    ),
    RoleRule(r"(?:^|\.)o_proj$", "attn.o", "attention output projection"),
    RoleRule(
        r"(?:^|\.)\w*(?:attn|attention)\w*\.(?:out_proj|dense|c_proj)$",
        "attn.o",
        "attention output projection",
    ),
    RoleRule(
        r"(?:^|\.)(?:gate_up_proj|gate_proj|up_proj|w1|w3|fc1|c_fc|dense_h_to_4h)$",
        "mlp.gate_up",
        "dense MLP gate/up projection",
    ),
    RoleRule(
        r"(?:^|\.)(?:down_proj|w2|fc2|dense_4h_to_h)$", "mlp.down", "dense MLP down projection"
    ),
    RoleRule(r"(?:^|\.)(?:gate|router)$", None, "MoE router"),
    RoleRule(r"(?:^|\.)(?:lm_head|embed_tokens|wte|output)$", None, "head or embedding"),
)

_user_rules: list[RoleRule] = []


def add_role_rule(pattern: str, role: str | None, why: str = "user rule") -> None:
    """Map weights whose owner path matches ``pattern`` (``re.search``) to ``role``."""
    from fxprefetch.config import ROLES

    if role is not None and role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES} or None")
    re.compile(pattern)
    _user_rules.insert(0, RoleRule(pattern, role, why))


def clear_user_rules() -> None:
    _user_rules.clear()


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


def match_role(path: str, extra_rules: tuple[RoleRule, ...] = ()) -> RoleRule | None:
    """The first rule that matches ``path``, or None."""
    for rule in (*extra_rules, *_user_rules, *DEFAULT_RULES):
        if rule.matches(path):
            return rule
    return None


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(path: str | None) -> int | None:
    if not path:
        return None
    m = _LAYER.search(path)
    return int(m.group(1)) if m else None
