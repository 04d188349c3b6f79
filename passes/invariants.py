"""What holds after every pass, checked where ``FXPREFETCH_CHECK_INVARIANTS=1``.

The driver (``fxprefetch.pipeline``) calls :func:`check_invariants` after each pass when
:func:`invariants_enabled`; the test suite sets the variable for the whole session, so every
compile in it is checked after every pass. After a pass:

- the graph lints;
- every prefetch the passes made carries its :class:`~.analysis.prefetch_meta.PrefetchMeta`
  (prefetches placed by hand in the model, named in ``given``, are the model's own);
- every such prefetch has a weight operand: a by-name prefetch has none (its record names
  the weight's device) but keeps its dependency, as a lowered npu prefetch does; a native
  prefetch orders itself through its ``order`` list, which holds its fork's token first where
  it forks onto the side stream;
- and every invariant a pass run so far ``ensures`` (``@graph_pass(ensures=...)``) and no
  later pass ``relaxes``: :data:`DEPENDENCIES_KEPT` (planning; relaxing lifts it),
  :data:`FORKS_JOINED` (inserting joins).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence

from torch.fx import Graph, GraphModule, Node

from fxprefetch.errors import InvariantError
from fxprefetch.ops import (
    FORK_OPS,
    HINT_OP,
    JOIN_OP,
    NATIVE_OP,
    PREFETCH_OP,
    PREFETCH_OPS,
    RANGE_OP,
)
from fxprefetch.passes.analysis.graph_utils import get_arg, is_side_fork, prefetch_nodes
from fxprefetch.passes.analysis.prefetch_meta import join_meta, prefetch_meta, token_meta
from fxprefetch.passes.contract import GraphPass, Invariant, PassContext

CHECK_INVARIANTS_ENV = "FXPREFETCH_CHECK_INVARIANTS"

# prefetches of a graph tensor (the weight first), whose dependency relaxing drops; the npu
# lowering (not a prefetch op of ours) keeps their schema
_WEIGHT_FIRST = (PREFETCH_OP, HINT_OP, RANGE_OP)


def invariants_enabled() -> bool:
    """Whether ``FXPREFETCH_CHECK_INVARIANTS`` asks for the checks (set, and not ``0``)."""
    return os.environ.get(CHECK_INVARIANTS_ENV, "") not in ("", "0")


def hand_placed(graph: Graph) -> frozenset[str]:
    """Names of the prefetches of ``graph`` no pass planned (no record): the model's own."""
    return frozenset(n.name for n in prefetch_nodes(graph) if prefetch_meta(n) is None)


def held(ran: Sequence[GraphPass]) -> tuple[Invariant, ...]:
    """The invariants that hold after ``ran`` (in order): those a pass ``ensures``, less
    those a later pass ``relaxes``."""
    holding: dict[str, Invariant] = {}
    for graph_pass in ran:
        for invariant in graph_pass.relaxes:
            holding.pop(invariant.name, None)
        holding.update((invariant.name, invariant) for invariant in graph_pass.ensures)
    return tuple(holding.values())


def check_invariants(
    gm: GraphModule,
    ctx: PassContext,
    ran: Sequence[GraphPass],
    *,
    given: Collection[str] = frozenset(),
) -> None:
    """Raise :class:`InvariantError` naming the pass just run (``ran``'s last) if ``gm``
    breaks an invariant: those after every pass, and those :func:`held` after ``ran``.
    ``given``: prefetches the model placed itself (see :func:`hand_placed`)."""
    after = ran[-1].name if ran else "no pass"
    try:
        gm.graph.lint()
    except Exception as exc:
        message = f"{ctx.graph_name}: after {after}: the graph does not lint: {exc}"
        raise InvariantError(message) from exc
    problems = _problems(gm.graph, given=set(given))
    for invariant in held(ran):
        problems += invariant.check(gm.graph, set(given))
    if problems:
        raise InvariantError(f"{ctx.graph_name}: after {after}: " + "; ".join(problems))


def _planned(graph: Graph) -> list[Node]:
    """The prefetch nodes of ``graph``, and nodes lowered from them to another target."""
    prefetches = set(prefetch_nodes(graph))
    return [
        n
        for n in graph.nodes
        if n in prefetches or (n.op == "call_function" and prefetch_meta(n) is not None)
    ]


def _problems(graph: Graph, *, given: set[str]) -> list[str]:
    problems = []
    for node in _planned(graph):
        if node.name in given:
            continue
        meta = prefetch_meta(node)
        if meta is None:
            problems.append(f"{node.name} ({node.target}) has no PrefetchMeta")
        elif node.target in FORK_OPS:
            problems += _native_problems(node, meta.stream)
        elif node.target in _WEIGHT_FIRST or node.target not in PREFETCH_OPS:
            if not isinstance(node.args[0] if node.args else None, Node):
                problems.append(f"{node.name} has no weight operand")
            if node.target not in _WEIGHT_FIRST and not isinstance(
                get_arg(node, "dependency"), Node
            ):
                problems.append(f"{node.name} has no dependency")
        else:  # by name: the weight is looked up when it runs
            if meta.device is None:
                problems.append(f"{node.name}: a by-name prefetch records no device")
            if not isinstance(get_arg(node, "dependency"), Node):
                problems.append(f"{node.name} has no dependency")
    return problems


def _native_problems(node: Node, stream: str | None) -> list[str]:
    order, node_stream = get_arg(node, "order"), get_arg(node, "stream")
    problems = []
    if node.target is NATIVE_OP and not isinstance(get_arg(node, "weight"), Node):
        problems.append(f"{node.name} has no weight operand")
    if stream != node_stream:
        problems.append(f"{node.name} runs on the {node_stream} stream, its record says {stream}")
    if node_stream == "side":
        token = order[0] if order else None
        record = token_meta(token)
        if record is None or record.token_of != node.name:
            problems.append(f"{node.name} forks onto the side stream without its own token")
    return problems


def _dependencies_kept(graph: Graph, given: Collection[str]) -> list[str]:
    return [
        f"{node.name} has no dependency"
        for node in _planned(graph)
        if node.name not in given
        and node.target in _WEIGHT_FIRST
        and prefetch_meta(node) is not None
        and not isinstance(get_arg(node, "dependency"), Node)
    ]


def _unjoined_forks(graph: Graph, given: Collection[str]) -> list[str]:
    position = {n: i for i, n in enumerate(graph.nodes)}
    joins: dict[str, list[Node]] = {}
    for join in graph.find_nodes(op="call_function", target=JOIN_OP):
        record = join_meta(join)
        joins.setdefault(record.joins if record is not None else "", []).append(join)
    problems = []
    for fork in graph.nodes:
        if not is_side_fork(fork):
            continue
        later = [j for j in joins.get(fork.name, []) if position[j] > position[fork]]
        if len(later) != 1:
            problems.append(f"{fork.name} forks onto the side stream with {len(later)} joins")
    return problems


#: every prefetch of a graph tensor keeps its dependency (ensured by planning, relaxed by
#: ``relax_dependencies``)
DEPENDENCIES_KEPT = Invariant("dependencies_kept", _dependencies_kept)
#: every side-stream ``prefetch_native`` has exactly one later ``prefetch_join``
FORKS_JOINED = Invariant("forks_joined", _unjoined_forks)
