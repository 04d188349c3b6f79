"""How many bytes to prefetch: the guide's formula."""

from __future__ import annotations

import math


def prefetch_bytes(ratio: float, weight_bytes: int, cap: int) -> tuple[int, bool]:
    """``(min(int(ratio * weight_bytes), cap), capped)``: the guide's formula."""
    wanted = math.floor(ratio * weight_bytes)
    return min(wanted, cap), wanted > cap
