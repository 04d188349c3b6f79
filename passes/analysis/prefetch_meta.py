"""The typed records the passes leave on the nodes they make, under ``node.meta["fxprefetch"]``.

- a prefetch (any op of ``fxprefetch.ops.PREFETCH_OPS``): :class:`PrefetchMeta`, written by
  the planning pass, its ``stream`` filled in where the prefetch is lowered to a native one;
- the token a side-stream native prefetch forks with: :class:`TokenMeta`;
- the join of such a fork: :class:`JoinMeta`.

Each record is frozen: a pass that changes one writes a new record (:func:`set_meta`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

META_KEY = "fxprefetch"


@dataclass(frozen=True)
class PrefetchMeta:
    """What the planning pass decided for one prefetch."""

    linear: str  # the node name of the linear whose weight it prefetches
    role: str | None
    max_size: int  # bytes
    window: str  # the kind of window it hides behind
    device: str | None  # the weight's device type (for a weight found by name: the only record)
    stream: str | None = None  # "side" or "compute" once lowered to a native prefetch
    # the lowering it got, where the target names one (the npu target: "ascend_cmo",
    # "ascend_side_stream", "ascend_in_stream"); the plan's records carry it
    lowering: str | None = None


@dataclass(frozen=True)
class TokenMeta:
    """A zero-size token that orders a side-stream fork before its join."""

    token_of: str  # the node name of its prefetch


@dataclass(frozen=True)
class JoinMeta:
    """The join of a side-stream fork."""

    joins: str  # the node name of the prefetch it joins
    linear: str  # the node name of the linear it precedes


NodeMeta = PrefetchMeta | TokenMeta | JoinMeta


def set_meta(node: Node, record: NodeMeta) -> None:
    """Record ``record`` on ``node`` (replacing any earlier one)."""
    node.meta[META_KEY] = record


def prefetch_meta(node: Node) -> PrefetchMeta | None:
    """The node's :class:`PrefetchMeta`, or None (not a planned prefetch: placed by hand)."""
    record = node.meta.get(META_KEY)
    return record if isinstance(record, PrefetchMeta) else None


def token_meta(node: object) -> TokenMeta | None:
    """The node's :class:`TokenMeta`, or None (also for anything that is not a node)."""
    record = getattr(node, "meta", {}).get(META_KEY)
    return record if isinstance(record, TokenMeta) else None


def join_meta(node: Node) -> JoinMeta | None:
    """The node's :class:`JoinMeta`, or None."""
    record = node.meta.get(META_KEY)
    return record if isinstance(record, JoinMeta) else None
