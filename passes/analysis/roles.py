"""Which role a weight plays: attn.qkv, attn.o, mlp.gate_up, mlp.down or moe.gate_up.

Rules are data: an ordered list of ``(regex, role)`` matched against a dotted path: the
linear's own module path (``nn_module_stack``) first, then the owner of its weight (the
parameter path without ``.weight``). The first match wins; ``role=None`` means "no role" on
purpose. Rules see the parent module, so ``attn.c_proj`` is ``attn.o`` and ``mlp.c_proj``
is ``mlp.down``.
Users add rules through :mod:`tables.rules` (theirs are tried first). How paths are read
(wrapper modules, weight suffixes, layer and expert containers) is data too
(:mod:`tables.module_paths`, held by the rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fxprefetch.passes.tables.role_rules import RoleRule
from fxprefetch.passes.tables.rules import DEFAULT_RULES, PrefetchRules

if TYPE_CHECKING:
    from torch.fx import Node

    from fxprefetch.passes.analysis.linears import LinearUse


def canonical_path(path: str, rules: PrefetchRules = DEFAULT_RULES) -> str:
    """``model.layers.0.self_attn.q_proj.base_layer`` -> ``model.layers.0.self_attn.q_proj``
    (the rules' ``module_wrappers`` removed)."""
    return rules.wrappers_pattern.sub("", path)


def owner_path(weight_path: str, rules: PrefetchRules = DEFAULT_RULES) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj`` (the first
    of the rules' ``weight_suffixes`` that ends the path removed)."""
    for suffix in rules.weight_suffixes:
        if weight_path.endswith(suffix):
            return weight_path[: -len(suffix)]
    return weight_path


def is_experts_path(path: str, rules: PrefetchRules = DEFAULT_RULES) -> bool:
    """Whether ``path`` is, or is inside, an experts module (the rules' ``expert_modules``)."""
    return rules.experts_pattern.search(path) is not None


def match_role(
    path: str, rules: PrefetchRules | Sequence[RoleRule] = DEFAULT_RULES
) -> RoleRule | None:
    """The first role rule that matches ``path`` (wrappers removed), or None.

    ``rules``: the rules value (its role rules and wrappers), or a sequence of role rules
    (wrappers: the default ones)."""
    if isinstance(rules, PrefetchRules):
        path, role_rules = canonical_path(path, rules), rules.role_rules
    else:
        path, role_rules = canonical_path(path), rules
    return next((rule for rule in role_rules if rule.matches(path)), None)


def layer_index(path: str | None, rules: PrefetchRules = DEFAULT_RULES) -> int | None:
    """The index of the decoder layer ``path`` lies in (the rules' ``layer_containers``)."""
    if not path:
        return None
    m = rules.layer_pattern.search(path)
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
            candidates.append(owner_path(use.weight_name, rules))
        found = (match_role(p, rules) for p in candidates)
        rule = next((r for r in found if r is not None), None)
        if rule is not None:
            use.role, use.role_reason = rule.role, rule.why
            continue
        experts = next((p for p in candidates if is_experts_path(p, rules)), None)
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
