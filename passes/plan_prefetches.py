"""The weight-prefetch pass over post-autograd aten graphs.

For each linear layer (see :mod:`analysis.linear_ops`) whose weight plays a configured role
(:mod:`analysis.roles`), walk back from its activation inputs in reverse graph order: vector
ancestors (:mod:`analysis.op_classes`) form the *window*, the first non-vector ancestor is the
*dependency*. A ``fxprefetch.prefetch(weight, dependency, max_size[, offset])`` node goes
right after the dependency, so the prefetch runs while the window's vector work runs.

Two more things decide a prefetch. A fused op that looks its weights up by name (vLLM's
MoE) gets a by-name prefetch where a :class:`analysis.hidden_weights.HiddenWeightSource`
finds the weight. And ``token_range`` bounds the token counts for which a prefetch runs
(:mod:`analysis.token_bounds`): decided for the graph where the count is known, checked by the
prefetch at run time where it is symbolic.

Invariants (tested in ``tests/test_pass_properties.py``): the graph lints; outputs are
unchanged; at most one prefetch per linear; a second run adds nothing; every prefetch comes
after its dependency and before its linear; prefetches survive dead-code elimination; new
nodes carry ``meta['val']``. The walk stops at the dependency, so the pass is linear in the
size of the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch.fx import Graph, GraphModule, Node

from fxprefetch.config import DEFAULT_WINDOWS, TokenRange, WeightPrefetchConfig
from fxprefetch.devices.prediction import (
    DeviceProfile,
    WindowTraffic,
    delta_us_per_mb,
    emits,
    hideable_bytes,
    landing_bytes,
    loss_note,
    predict,
)
from fxprefetch.ops import PREFETCH_OP, RANGE_OP, range_bounds
from fxprefetch.passes.analysis.collectives import has_sequence_parallel_collectives
from fxprefetch.passes.analysis.graph_utils import op_name, prefetch_nodes, tensor_value
from fxprefetch.passes.analysis.hidden_weights import HiddenWeight, HiddenWeightSource
from fxprefetch.passes.analysis.linears import LinearUse, find_linears
from fxprefetch.passes.analysis.prefetch_meta import PrefetchMeta, prefetch_meta, set_meta
from fxprefetch.passes.analysis.roles import assign_roles, layer_index
from fxprefetch.passes.analysis.sizing import prefetch_bytes
from fxprefetch.passes.analysis.token_bounds import (
    TokenCheck,
    TokenDecision,
    count_node,
    decide,
    linear_tokens,
)
from fxprefetch.passes.analysis.window_cost import window_traffic
from fxprefetch.passes.analysis.windows import Window, attention_matmuls, find_window
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass
from fxprefetch.passes.invariants import DEPENDENCIES_KEPT
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.plan import LinearRecord, PredictedSaving, PrefetchPlan, SkipReason

logger = logging.getLogger(__name__)


def _existing_prefetches(graph: Graph) -> set[str]:
    done: set[str] = set()
    for node in prefetch_nodes(graph):  # every prefetch op, the lowered ones too
        meta = prefetch_meta(node)
        if meta is not None:
            done.add(meta.linear)
    return done


@dataclass(frozen=True)
class Decision:
    """What the pass decided for one linear: skipped (``skip``, why), or prefetched: ``size``
    bytes behind ``window``, under ``token`` (and ``bounds``), with its ``prediction``.
    ``described``: the record's fields that say what the linear is and where its window lies;
    the record itself is built once, when the prefetch is emitted (:func:`_record`)."""

    use: LinearUse
    described: Mapping[str, Any]
    ratio: float | None
    skip: SkipReason | None = None
    note: str | None = None
    window: Window | None = None
    size: int = 0
    capped: bool = False
    token: TokenDecision | None = None  # None: not decided (skipped before the tokens)
    bounds: TokenRange | None = None
    prediction: PredictedSaving | None = None


@dataclass
class _Planning:
    """What the decisions of one graph share: the graph's facts, and what earlier decisions
    found (windows, their traffic, the time the prefetches behind each window take)."""

    ctx: PassContext
    index: Mapping[Node, int]
    sequence_parallel: bool
    already: set[str]
    attention_like: Any
    hidden: dict[Node, HiddenWeight]
    by_node: dict[Node, LinearUse]
    windows: dict[tuple, Window | None] = field(default_factory=dict)
    traffic: dict[int, WindowTraffic | None] = field(default_factory=dict)
    shared_us: dict[tuple, float] = field(default_factory=dict)
    unsized: dict[str, list[str]] = field(default_factory=dict)  # "auto" sizes left to the cap
    dropped: list[float] = field(default_factory=list)  # predicted µs the GPU gate dropped


@graph_pass(ensures=(DEPENDENCIES_KEPT,))
def plan_prefetches(gm: GraphModule, ctx: PassContext) -> PassResult:
    """The planning pass: decide for each linear (:func:`decide_linear`), then insert the
    prefetches into ``gm`` in place and record each decision (:func:`emit`); the result
    holds the plan.

    Reads from ``ctx``: ``weight_names`` (the placeholders that are parameters or buffers,
    with their paths, as a mapping or a :class:`WeightSources` that also says which
    placeholders nobody can tell about; None: nothing is known, and no placeholder is taken
    for a weight, their linears are skipped, saying so); ``devices.caps`` (device type -> byte
    cap, for weights on that device when the config writes no ``max_prefetch_bytes``);
    ``devices.profiles`` (device type -> the profile of the device the weights run on: it
    decides the window policy, on a GPU ``mlp.down`` is an ordinary vector window and
    attention is a window, sizes ``"auto"`` prefetches and predicts each saving);
    ``split_at_attention`` (the caller splits graphs at attention, as vLLM does, so
    attention windows are off whatever the config says); ``hidden_weights`` (finds the
    weights of fused ops that look them up by name, else those are recorded as hidden);
    ``graph_tokens`` (the token counts this graph is compiled for, vLLM's compile range,
    narrowing a symbolic count).
    """
    config, graph = ctx.config, gm.graph
    index = {node: i for i, node in enumerate(graph.nodes)}
    sequence_parallel = config.sequence_parallel or has_sequence_parallel_collectives(
        index, ctx.rules
    )
    uses = find_linears(graph, ctx.weight_names, ctx.rules)
    assign_roles(uses, ctx.rules)
    hidden: dict[Node, HiddenWeight] = {}
    if ctx.hidden_weights is not None and config.enabled:
        for use in uses:
            if use.skip is SkipReason.HIDDEN_WEIGHTS and use.role is not None:
                _find_hidden(use, ctx.hidden_weights, hidden)
    if ctx.split_at_attention and config.windows is not None and "attention" in config.windows:
        logger.warning(
            "%s: attention windows are off here: this graph is split at attention, so a "
            "prefetch could not rejoin before o_proj",
            ctx.graph_name,
        )
    state = _Planning(
        ctx,
        index,
        sequence_parallel,
        _existing_prefetches(graph),
        attention_matmuls([u.node for u in uses if u.skip is SkipReason.NOT_A_WEIGHT]),
        hidden,
        {use.node: use for use in uses},
    )
    decisions = [decide_linear(use, state) for use in uses]
    plan = PrefetchPlan(
        graph=ctx.graph_name,
        config_digest=config.digest,
        enabled=bool(config.enabled),
        sequence_parallel=sequence_parallel,
        records=emit(graph, decisions, state),
    )
    _log_planned(ctx.graph_name, state)
    logger.info("%s", plan.summary_line())
    return PassResult(len(plan.prefetched), plan)


def decide_linear(use: LinearUse, state: _Planning) -> Decision:
    """The decision for one linear: its skip reason, or its window, size, tokens and
    predicted saving (the graph is not changed)."""
    ctx, config = state.ctx, state.ctx.config
    found = state.hidden.get(use.node)
    device = found.device if found is not None else _device_type(use.root)
    profile = (ctx.devices.profiles or {}).get(device) if device is not None else None
    count = linear_tokens(use, ctx.rules, state.by_node)
    described = _describe(use, count, state)
    decided = Decision(use, described, _ratio(use, config), note=use.note)
    skip = _precheck(use, config, ctx.rules, state.sequence_parallel, state.already, profile)
    if skip not in (None, SkipReason.ZERO_RATIO, SkipReason.NEEDS_SEQUENCE_PARALLEL):
        return replace(decided, skip=skip)
    window = _find_window(use, profile, state)
    if window is not None:
        decided = replace(decided, window=window, described={**described, **_placed(window, state)})
    if skip is None and (window is None or window.empty):
        skip = SkipReason.EMPTY_WINDOW
    if skip is not None:
        return replace(decided, skip=skip)
    assert window is not None
    return _decide_size(replace(decided, window=window), device, profile, count, state)


def _decide_size(
    decided: Decision,
    device: str | None,
    profile: DeviceProfile | None,
    count: Any,
    state: _Planning,
) -> Decision:
    """The size of a linear's prefetch behind its window, its tokens and its prediction."""
    config, use, window = state.ctx.config, decided.use, decided.window
    assert window is not None
    cap = config.cap((state.ctx.devices.caps or {}).get(device))
    moved = None
    if profile is not None:
        if id(window) not in state.traffic:
            state.traffic[id(window)] = window_traffic(window, state.ctx.rules)
        moved = state.traffic[id(window)]
    auto = config.auto_cap or config.auto_ratio(use.role)
    hideable = None
    share_key = (window.dependency, *window.ops)  # q, k, v: equal windows, one window
    shared = state.shared_us.get(share_key, 0.0)
    useful, known_tokens = _useful_share(use), _token_count(use)
    if auto and moved is not None and profile is not None:
        hideable = hideable_bytes(profile, moved, shared, known_tokens, useful)
        cap = hideable if config.auto_cap else min(cap, hideable)
    elif auto:
        why = (
            f"weights on {device!r} have no device profile"
            if profile is None
            else "a window's sizes are symbolic"
        )
        state.unsized.setdefault(why, []).append(use.node.name)
    size, capped = prefetch_bytes(decided.ratio or 0.0, use.span_bytes, cap)
    if hideable is not None:  # capped only where the written or default cap cut the size
        capped = capped and not config.auto_cap and size < hideable
    if size <= 0:
        reason = SkipReason.WINDOW_TOO_SHORT if hideable == 0 else SkipReason.ZERO_BYTES
        loses = _every_mb_loses(profile, known_tokens, useful) if hideable == 0 else None
        if hideable == 0 and moved is not None and profile is not None:
            # the windows' time still counts (idle, ceiling): predicted at what would land
            landing = landing_bytes(profile, moved, shared)
            trial = prefetch_bytes(decided.ratio or 0.0, use.span_bytes, landing)[0]
            decided = replace(
                decided,
                prediction=_prediction(
                    profile, moved, trial, hideable, shared, known_tokens, useful
                ),
            )
        if loses is None:
            return replace(decided, skip=reason)
        return replace(decided, skip=SkipReason.PREDICTED_LOSS, note=_noted(decided.note, loses))
    bounds = config.tokens(use.role) or TokenRange()
    token = decide(count, bounds, state.ctx.graph_tokens)
    decided = replace(decided, token=token, bounds=bounds)
    if token.check is TokenCheck.NEVER:
        return replace(decided, skip=SkipReason.OUTSIDE_TOKEN_RANGE)
    decided = replace(decided, size=size, capped=capped)
    if moved is None or profile is None:
        return decided
    prediction = _prediction(profile, moved, size, hideable, shared, known_tokens, useful)
    decided = replace(decided, prediction=prediction)
    if hideable is not None and prediction.hidden_us <= 0:  # "auto" sizes no loss
        note = _noted(decided.note, _auto_loss_note(profile, prediction.hidden_us, size))
        return replace(decided, size=0, capped=False, note=note, skip=SkipReason.PREDICTED_LOSS)
    if not config.force_prefetch and not emits(profile, prediction):
        state.dropped.append(prediction.hidden_us)
        note = _noted(decided.note, loss_note(profile, prediction.hidden_us))
        return replace(decided, skip=SkipReason.PREDICTED_LOSS, note=note)
    state.shared_us[share_key] = shared + prediction.transfer_us
    return decided


def emit(graph: Graph, decisions: Sequence[Decision], state: _Planning) -> list[LinearRecord]:
    """Insert the prefetch of every decision that is not a skip; one record per decision,
    in order (a prefetch whose token count has no graph value where it would go is a skip,
    :attr:`SkipReason.TOKENS_UNKNOWN`)."""
    last_at_anchor: dict[Node, Node] = {}
    records = []
    for decided in decisions:
        node = None
        if decided.skip is None:
            node = _insert_prefetch(graph, decided, state, last_at_anchor)
        if decided.skip is None and node is None:
            unknown = SkipReason.TOKENS_UNKNOWN
            records.append(
                _record(replace(decided, skip=unknown, size=0, capped=False, prediction=None))
            )
        else:
            records.append(_record(decided, node))
    return records


def _record(decided: Decision, node: Node | None = None) -> LinearRecord:
    """The plan's record of one decision (``node``: its prefetch, where one was inserted)."""
    token = decided.token
    tokens = dict(_token_fields(decided.bounds, token)) if token is not None else {}
    if token is not None:
        tokens["tokens"] = token.tokens
    return LinearRecord(
        **{**decided.described, "note": decided.note, **tokens},
        ratio=decided.ratio,
        skip_reason=decided.skip,
        prefetch_bytes=decided.size,
        capped=decided.capped,
        prediction=decided.prediction,
        prefetch_node=node.name if node is not None else None,
    )


def _describe(use: LinearUse, count: Any, state: _Planning) -> dict[str, Any]:
    """The record's fields that say what the linear is."""
    return {
        "node": use.node.name,
        "op": op_name(use.node),
        "module": use.module,
        "weight": use.weight_name,
        "layer": layer_index(use.module or use.weight_name, state.ctx.rules),
        "role": use.role,
        "weight_shape": tuple(int(s) if isinstance(s, int) else -1 for s in use.shape),
        "dtype": str(use.dtype) if use.dtype is not None else "-",
        "weight_bytes": use.nbytes if isinstance(use.nbytes, int) else -1,
        "span_bytes": use.span_bytes if isinstance(use.span_bytes, int) else -1,
        "offset": use.offset,
        "position": state.index[use.node],
        "tokens": None if count is None else str(count),
    }


def _placed(window: Window, state: _Planning) -> dict[str, Any]:
    """The record's fields that say where the linear's window lies."""
    index = state.index
    return {
        "window": window.op_names(),
        "window_kind": window.kind,
        "dependency": window.dependency.name,
        "dependency_op": op_name(window.dependency),
        "dependency_position": index.get(window.dependency),
        "window_start": min((index[n] for n in window.ops), default=None),
        "crossed": tuple(op_name(n) for n in window.crossed),
    }


def _find_window(use: LinearUse, profile: DeviceProfile | None, state: _Planning) -> Window | None:
    """The window of ``use`` (found once per activation and window kinds)."""
    kinds = _window_kinds(state.ctx.config, profile, state.ctx.split_at_attention)
    key = (use.starts, "collective" in kinds, "attention" in kinds)
    if key not in state.windows:
        state.windows[key] = find_window(
            use.starts,
            state.index,
            state.ctx.rules,
            collective_windows="collective" in kinds,
            attention=state.attention_like if "attention" in kinds else None,
        )
    return state.windows[key]


def _noted(note: str | None, more: str) -> str:
    return f"{note}; {more}" if note else more


def _log_planned(graph_name: str, state: _Planning) -> None:
    """Warn about "auto" sizes that fell back to the cap, and prefetches the gate dropped."""
    for why, linears in state.unsized.items():
        logger.warning(
            '%s: %d prefetches are sized "auto" but %s: they use the cap (%s)',
            graph_name,
            len(linears),
            why,
            ", ".join(linears),
        )
    if state.dropped:
        _log_dropped(graph_name, state.dropped, state.ctx.devices.profiles or {})


def _find_hidden(
    use: LinearUse, source: HiddenWeightSource, found: dict[Node, HiddenWeight]
) -> None:
    """Fill ``use`` with the weight ``source`` finds for its fused op (or note why none)."""
    assert use.role is not None
    weight = source.find(use.node, use.role)
    if isinstance(weight, str):
        use.note = weight
        return
    found[use.node] = weight
    use.weight_name = weight.name
    use.shape = weight.shape
    use.dtype = weight.dtype
    use.nbytes = weight.nbytes
    use.named = True
    use.skip = None
    use.note = weight.note


def _token_fields(bounds: TokenRange | None, tokens: TokenDecision) -> dict:
    if bounds is None or bounds.unbounded:
        return {}
    check = "run time" if tokens.check is TokenCheck.RUN_TIME else "graph"
    return {"min_tokens": bounds.min_tokens, "max_tokens": bounds.max_tokens, "token_check": check}


def _ratio(use: LinearUse, config: WeightPrefetchConfig) -> float | None:
    return config.ratio(use.role) if use.role is not None else None


def _window_kinds(
    config: WeightPrefetchConfig, profile: DeviceProfile | None, split_at_attention: bool
) -> tuple[str, ...]:
    """The written window kinds, else the device's: attention too on a GPU. Never attention
    where the caller splits graphs at attention."""
    default = DEFAULT_WINDOWS
    if profile is not None and profile.attention_windows:
        default = (*DEFAULT_WINDOWS, "attention")
    kinds = config.window_kinds(default)
    return tuple(k for k in kinds if k != "attention") if split_at_attention else kinds


_LOGGED_DROPS: set[tuple[str, ...]] = set()


def _log_dropped(graph_name: str, dropped: list[float], profiles: Mapping) -> None:
    """Say once per process and device that the GPU gate dropped prefetches, and how to force
    them (every graph's plan still lists each one with its predicted µs)."""
    labels = tuple(sorted({p.label for p in profiles.values() if p.kind == "gpu"}))
    if labels in _LOGGED_DROPS:
        logger.debug("%s: %d prefetches predicted not to pay", graph_name, len(dropped))
        return
    _LOGGED_DROPS.add(labels)
    logger.warning(
        "%s: %d planned prefetches not emitted: the device profile (%s) predicts each saves "
        "no more than its margin (best %+.2f µs). Set weight_prefetch_config.force_prefetch "
        "to true to emit them anyway; the plan lists each with its prediction (said once)",
        graph_name,
        len(dropped),
        ", ".join(labels),
        max(dropped),
    )


def _every_mb_loses(profile: DeviceProfile | None, tokens: int | None, useful: float) -> str | None:
    """Why "auto" sized nothing where no window would help: a landed MB saves less than it
    costs (δ <= β); None where a longer window would."""
    if profile is None:
        return None
    delta = delta_us_per_mb(profile, tokens) * useful
    beta = profile.cost().per_mb_us.value
    if delta > beta:
        return None
    return (
        f"predicted loss on {profile.label}: every MB costs {beta:.3f} µs and saves "
        f"{delta:.3f} µs ({profile.lowering}), whatever the window; {AUTO_SIZES_NOTHING}"
    )


#: why ``force_prefetch`` does not emit what ``"auto"`` sized to nothing
AUTO_SIZES_NOTHING = (
    '"auto" sizes nothing where the model predicts a loss, and force_prefetch emits only '
    "what the sizes give (set a ratio or max_prefetch_bytes to force a size)"
)


def _auto_loss_note(profile: DeviceProfile, hidden_us: float, size: int) -> str:
    return (
        f"predicted loss on {profile.label}: {hidden_us:+.2f} µs for the {size} B that "
        f'"auto" would size ({profile.lowering}); {AUTO_SIZES_NOTHING}'
    )


def _useful_share(use: LinearUse) -> float:
    """The share of a prefetch's contiguous range that the linear reads: 1 for a whole weight,
    ``weight bytes / span bytes`` for a strided part (a column slice)."""
    if isinstance(use.nbytes, int) and isinstance(use.span_bytes, int) and use.span_bytes > 0:
        return min(1.0, use.nbytes / use.span_bytes)
    return 1.0


def _token_count(use: LinearUse) -> int | None:
    """The linear's token count where the graph fixes it (its activation's rows), else None."""
    for start in use.starts:
        value = tensor_value(start)
        if value is not None and value.dim() >= 1:
            rows = 1
            for s in value.shape[:-1]:
                if not isinstance(s, int):
                    return None
                rows *= s
            return rows
    return None


def _prediction(
    profile: DeviceProfile,
    moved: WindowTraffic,
    size: int,
    hideable: int | None,
    shared: float,
    tokens: int | None = None,
    useful: float = 1.0,
) -> PredictedSaving:
    saving = predict(profile, moved, size, shared, tokens, useful)
    return PredictedSaving(
        device=profile.name,
        window_bytes=moved.nbytes,
        window_kernels=moved.kernels,
        window_us=saving.window_us,
        shared_us=shared,
        transfer_us=saving.transfer_us,
        cost_us=saving.cost_us,
        hidden_us=saving.hidden_us,
        auto_bytes=hideable,
    )


def _precheck(
    use: LinearUse,
    config: WeightPrefetchConfig,
    rules: PrefetchRules,
    sequence_parallel: bool,
    already: set[str],
    profile: DeviceProfile | None = None,
) -> SkipReason | None:
    if use.skip is not None:
        return use.skip
    if use.role is None:
        return SkipReason.NO_ROLE
    if not config.enabled:
        return SkipReason.DISABLED
    if config.ratio(use.role) == 0:
        return SkipReason.ZERO_RATIO
    # vllm-ascend's rule: on Ascend (and where no profile says otherwise); not on a GPU
    sp_rule = profile is None or profile.sequence_parallel_rule
    if sp_rule and use.role in rules.sequence_parallel_roles and not sequence_parallel:
        return SkipReason.NEEDS_SEQUENCE_PARALLEL
    if use.node.name in already:
        return SkipReason.ALREADY_PREFETCHED
    if not isinstance(use.nbytes, int):
        return SkipReason.SYMBOLIC_WEIGHT
    if use.nbytes == 0:
        return SkipReason.EMPTY_WEIGHT
    return None


def _insert_prefetch(
    graph: Graph, decided: Decision, state: _Planning, last_at_anchor: dict[Node, Node]
) -> Node | None:
    """Insert the prefetch of a decision after its window's dependency (None: the token
    count it must check has no graph value there)."""
    use, window, size = decided.use, decided.window, decided.size
    tokens, bounds, index = decided.token, decided.bounds, state.index
    hidden = state.hidden.get(use.node)
    assert window is not None
    base = window.dependency
    if base.op == "placeholder":  # keep placeholders first
        base = list(graph.find_nodes(op="placeholder"))[-1]
    anchor = last_at_anchor.get(base, base)  # several prefetches after one node keep their order
    root = use.root
    if root is not None and root.op == "get_attr" and index.get(root, -1) > index.get(base, -1):
        base.prepend(root)  # constants have no inputs: hoisting them is always safe
    at_run_time = tokens is not None and tokens.check is TokenCheck.RUN_TIME
    checked: tuple = (0, 0, -1)  # tokens, min_tokens, max_tokens: no check
    if at_run_time:
        assert bounds is not None and tokens is not None
        after = anchor.next
        count = count_node(graph, tokens.count, after)  # type: ignore[arg-type]
        if count is None:
            return None
        checked = (count, *range_bounds(bounds.min_tokens, bounds.max_tokens))
        anchor = after.prev
    if hidden is not None:
        target, args = hidden.op, (*hidden.key, window.dependency, size, use.offset, *checked)
    elif at_run_time:
        target, args = RANGE_OP, (root, window.dependency, size, use.offset, *checked)
    else:
        target = PREFETCH_OP
        args = (root, window.dependency, size) + ((use.offset,) if use.offset else ())
    with graph.inserting_after(anchor):
        node = graph.call_function(target, args)
    node.meta["val"] = None
    meta = PrefetchMeta(
        linear=use.node.name,
        role=use.role,
        max_size=size,
        window=window.kind,
        device=hidden.device if hidden is not None else _device_type(root),
    )
    set_meta(node, meta)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in use.node.meta:
            node.meta[key] = use.node.meta[key]
    last_at_anchor[base] = node
    return node


def _device_type(root: Node | None) -> str | None:
    value = tensor_value(root) if root is not None else None
    return value.device.type if value is not None else None
