"""Which role a weight plays: attn.qkv, attn.o, mlp.gate_up, mlp.down or moe.gate_up.

Rules are data: an ordered list of ``(regex, role)`` matched against a dotted path: the
linear's own module path (``nn_module_stack``) first, then the owner of its weight (the
parameter path without ``.weight``). The first match wins; ``role=None`` means "no role" on
purpose. Rules see the parent module, so ``attn.c_proj`` is ``attn.o`` and ``mlp.c_proj``
is ``mlp.down``.
Users add rules through :mod:`tables.rules` (theirs are tried first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fxprefetch.passes.tables.role_rules import _EXPERTS, DEFAULT_ROLE_RULES, RoleRule
from fxprefetch.passes.tables.rules import PrefetchRules

if TYPE_CHECKING:
    from torch.fx import Node

    from fxprefetch.passes.analysis.linears import LinearUse

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
