"""How module and parameter paths are read: wrapper modules, weight suffixes, the containers
of decoder layers and of experts. The default tables that :class:`tables.rules.PrefetchRules`
holds, and the regular expressions built from them."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Wrapper modules that hold the real layer one level down (PEFT, FSDP, activation
# checkpointing, torch.compile): ``q_proj.base_layer`` is ``q_proj``.
DEFAULT_MODULE_WRAPPERS: tuple[str, ...] = (
    "base_layer",
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "module",
)

# Parameter names of a layer's weight: ``mlp.down_proj.weight`` belongs to ``mlp.down_proj``.
# Tried in order.
DEFAULT_WEIGHT_SUFFIXES: tuple[str, ...] = (".weight", ".qweight", ".weight_packed")

# Module lists whose numbered children are the decoder layers (``model.layers.3``, ``h.3``).
DEFAULT_LAYER_CONTAINERS: tuple[str, ...] = ("layers", "h", "blocks", "layer")

# Modules holding a MoE layer's experts (``mlp.experts``, ``block_sparse_moe.experts.7``).
DEFAULT_EXPERT_MODULES: tuple[str, ...] = ("experts", "local_experts")

_NEVER = r"(?!)"  # an empty list of names matches nothing


def _any_of(names: Iterable[str]) -> str | None:
    names = tuple(names)
    return "|".join(re.escape(n) for n in names) if names else None


def wrappers_regex(names: Iterable[str]) -> str:
    """A wrapper's path component (with its leading dot), to be removed from a path."""
    alternatives = _any_of(names)
    return rf"\.(?:{alternatives})(?=\.|$)" if alternatives else _NEVER


def layer_regex(names: Iterable[str]) -> str:
    """A decoder layer's container and index; group 1 is the index."""
    alternatives = _any_of(names)
    return rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)" if alternatives else _NEVER


def experts_regex(names: Iterable[str]) -> str:
    """An experts module, with the index of one expert if one is named."""
    alternatives = _any_of(names)
    return rf"(?:^|\.)(?:{alternatives})(?:\.\d+)?" if alternatives else _NEVER


DEFAULT_EXPERTS = experts_regex(DEFAULT_EXPERT_MODULES)
