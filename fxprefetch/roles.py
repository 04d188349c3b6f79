"""The roles a weight plays, defined once: their names, JSON paths and default ratios.

A role's name is its path under ``weight_prefetch_config.prefetch_ratio`` (``attn.qkv`` is
``{"attn": {"qkv": ...}}``); :data:`ROLE_TABLE` lists them in the order the guide does, with
the guide's default ratios. Everything else (the config's ratios, the role rules, the rules'
role policy) refers to roles through these constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

ATTN_QKV = "attn.qkv"
ATTN_O = "attn.o"
MOE_GATE_UP = "moe.gate_up"
MLP_GATE_UP = "mlp.gate_up"
MLP_DOWN = "mlp.down"


@dataclass(frozen=True)
class Role:
    """One role: ``name`` (``section.key``) and the ratio used where none is written."""

    name: str
    default_ratio: float

    @property
    def section(self) -> str:
        """The object under ``prefetch_ratio`` that holds the role (``attn``)."""
        return self.name.split(".")[0]

    @property
    def key(self) -> str:
        """The role's key inside its section (``qkv``)."""
        return self.name.split(".")[1]

    @property
    def attribute(self) -> str:
        """The role's field name in ``PrefetchRatios`` (``attn_qkv``)."""
        return self.name.replace(".", "_")

    @property
    def json_path(self) -> str:
        """The role's path below the config's root key (``prefetch_ratio.attn.qkv``)."""
        return f"prefetch_ratio.{self.name}"


#: Every role, in the order the guide lists them, with the guide's default ratios.
ROLE_TABLE: tuple[Role, ...] = (
    Role(ATTN_QKV, 1.0),
    Role(ATTN_O, 1.0),
    Role(MOE_GATE_UP, 0.8),
    Role(MLP_GATE_UP, 1.0),
    Role(MLP_DOWN, 1.0),
)
ROLES: tuple[str, ...] = tuple(role.name for role in ROLE_TABLE)
DEFAULT_RATIOS: Mapping[str, float] = MappingProxyType(
    {role.name: role.default_ratio for role in ROLE_TABLE}
)
