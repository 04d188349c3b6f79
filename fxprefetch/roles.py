"""The roles a weight plays, defined once: their names, JSON paths and default ratios.

A role's name is its path under ``weight_prefetch_config.prefetch_ratio`` (``attn.qkv`` is
``{"attn": {"qkv": ...}}``); :data:`ROLE_TABLE` lists them in the order the guide does, with
the guide's default ratios. Everything else (the config's ratios, the role rules, the rules'
role policy) refers to roles through these constants.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

ATTN_QKV = "attn.qkv"
ATTN_O = "attn.o"
MOE_GATE_UP = "moe.gate_up"
MLP_GATE_UP = "mlp.gate_up"
MLP_DOWN = "mlp.down"

#: What a role's name looks like: ``section.key``, lower case (the plan schema's pattern).
ROLE_NAME = re.compile(r"^[a-z][a-z_]*\.[a-z][a-z_]*$")


@dataclass(frozen=True)
class Role:
    """One role: ``name`` (``section.key``) and the ratio used where none is written."""

    name: str
    default_ratio: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not ROLE_NAME.match(self.name):
            raise ValueError(
                f"role name {self.name!r}: expected 'section.key' in lower case (e.g. "
                "'attn.qkv'), its path under weight_prefetch_config.prefetch_ratio"
            )
        ratio = self.default_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not (math.isfinite(ratio) and 0 <= ratio <= 1)
        ):
            raise ValueError(f"role {self.name!r}: default ratio must be in [0, 1], got {ratio!r}")

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


def checked_table(roles: Sequence[Role]) -> tuple[Role, ...]:
    """``roles``, refused where two share a name or an attribute (``attn.qkv`` and
    ``attn_qkv`` would be one keyword of ``PrefetchRatios``)."""
    seen: dict[str, str] = {}
    for role in roles:
        for key in (role.name, role.attribute):
            if key in seen:
                raise ValueError(f"role {role.name!r} repeats {seen[key]!r} ({key!r})")
            seen[key] = role.name
    return tuple(roles)


#: Every role, in the order the guide lists them, with the guide's default ratios.
ROLE_TABLE: tuple[Role, ...] = checked_table(
    (
        Role(ATTN_QKV, 1.0),
        Role(ATTN_O, 1.0),
        Role(MOE_GATE_UP, 0.8),
        Role(MLP_GATE_UP, 1.0),
        Role(MLP_DOWN, 1.0),
    )
)
ROLES: tuple[str, ...] = tuple(role.name for role in ROLE_TABLE)
DEFAULT_RATIOS: Mapping[str, float] = MappingProxyType(
    {role.name: role.default_ratio for role in ROLE_TABLE}
)
