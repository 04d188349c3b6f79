"""What a token is (``analysis.token_bounds.linear_tokens``): the rows of the activation in
the linear's own orientation, for experts the tokens routed into the layer; the same count
decides the token bounds (for the graph, or by the range op at run time) and goes in the plan.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxprefetch
from fxprefetch import WeightPrefetchConfig
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.linears import find_linears
from fxprefetch.passes.analysis.token_bounds import linear_tokens
from fxprefetch.pipeline import run_weight_prefetch
from fxprefetch.plan import SkipReason

from support.planning import hf_moe_plan
from support.tracing import trace_constants

HIDDEN, OUT, EXPERTS = 32, 24, 4  # HIDDEN is neither count below: a count of it is wrong
F8 = torch.float8_e4m3fn


def _w(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)) / 8)


class Proj(nn.Module):
    """One linear, written ``form``; its module path gives it the role ``mlp.gate_up``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        if form in ("bmm_experts", "baddbmm_experts", "bmm_experts_weight_first"):
            self.weight = _w(EXPERTS, HIDDEN, OUT)
            self.bias = _w(EXPERTS, 1, OUT)
        elif form == "conv1d":
            self.weight = _w(OUT, HIDDEN, 1)
        elif form == "conv2d":
            self.weight = _w(OUT, HIDDEN, 1, 1)
        else:
            self.weight = _w(OUT, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2.0 + 1.0  # vector work: the prefetch's window
        w, form = self.weight, self.form
        if form == "weight_first":  # W @ h.T
            return w @ x.T
        if form == "activation_stored_transposed":  # x is [hidden, tokens]
            return w @ x
        if form == "weight_first_3d":  # one weight for every batch: [batch, out, seq]
            return torch.bmm(w.expand(x.shape[0], -1, -1), x.transpose(1, 2))
        if form == "conv1d":
            return F.conv1d(x, w)
        if form == "conv2d":
            return F.conv2d(x, w)
        if form == "scaled_mm_transposed":  # the fp8 weight as the first operand
            one = torch.ones((), dtype=torch.float32)
            return torch._scaled_mm(w.to(F8), x.to(F8).t(), one, one, out_dtype=torch.float32)
        routed = x.repeat(EXPERTS, 1).view(EXPERTS, -1, HIDDEN)  # every token to every expert
        if form == "bmm_experts":
            return torch.bmm(routed, w)
        if form == "baddbmm_experts":
            return torch.baddbmm(self.bias, routed, w)
        assert form == "bmm_experts_weight_first"
        return torch.bmm(w.transpose(1, 2), routed.transpose(1, 2))


class Model(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = Proj(form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.gate_up_proj(x)


# form -> the activation of ``tokens`` tokens (``tokens`` even); ``x @ W.T`` and
# ``linear(x3d, W)`` are in the property at the end
SHAPES: dict[str, Callable[[int], tuple[int, ...]]] = {
    "weight_first": lambda t: (t, HIDDEN),
    "activation_stored_transposed": lambda t: (HIDDEN, t),
    "weight_first_3d": lambda t: (2, t // 2, HIDDEN),
    "conv1d": lambda t: (1, HIDDEN, t),
    "conv2d": lambda t: (2, HIDDEN, 1, t // 2),
    "scaled_mm_transposed": lambda t: (t, HIDDEN),
    "bmm_experts": lambda t: (t, HIDDEN),
    "baddbmm_experts": lambda t: (t, HIDDEN),
    "bmm_experts_weight_first": lambda t: (t, HIDDEN),
}


def _input(form: str, tokens: int) -> torch.Tensor:
    return torch.randn(*SHAPES[form](tokens), generator=torch.Generator().manual_seed(tokens))


def _config(max_tokens: int) -> WeightPrefetchConfig:
    return WeightPrefetchConfig.from_dict(
        {"enabled": True, "token_range": {"mlp": {"gate_up": {"max_tokens": max_tokens}}}}
    )


def _record(gm: torch.fx.GraphModule, max_tokens: int):
    plan = run_weight_prefetch(gm, _config(max_tokens))
    (record,) = plan.by_role("mlp.gate_up")
    return record


@pytest.mark.parametrize("form", list(SHAPES))
@pytest.mark.parametrize(("tokens", "max_tokens", "kept"), [(8, 16, True), (200, 100, False)])
def test_a_static_count_is_the_linears_tokens_on_both_sides_of_the_bound(
    form, tokens, max_tokens, kept
):
    model = Model(form)
    gm = trace_constants(model, model, _input(form, tokens), "fake")
    record = _record(gm, max_tokens)
    assert record.tokens == str(tokens) and record.token_check == "graph"
    assert record.prefetched is kept
    if not kept:
        assert record.skip_reason is SkipReason.OUTSIDE_TOKEN_RANGE


@pytest.mark.parametrize("form", list(SHAPES))
def test_a_symbolic_count_is_checked_at_run_time_on_both_sides_of_the_bound(form):
    """One graph for every count: the range op reads the linear's tokens when it runs."""
    model = Model(form)
    gm = trace_constants(model, model, _input(form, 40), "symbolic")  # 40: no static size
    record = _record(gm, 100)
    assert record.prefetched and record.token_check == "run time"
    assert not record.tokens.isdigit()  # a symbolic count, e.g. "s0" or "2*s0"
    for tokens, ran in ((8, 1), (200, 0), (100, 1), (102, 0)):
        x = _input(form, tokens)
        with torch.no_grad(), fxprefetch.collect_stats() as seen:
            out = gm(x)
        torch.testing.assert_close(out, model(x))
        assert seen.calls == ran, f"{tokens} tokens"


# -- experts: the tokens routed into the layer, not token-expert pairs -----------------------


@pytest.mark.parametrize(("tokens", "kept"), [(64, False), (128, True)])
def test_grouped_mm_experts_count_the_tokens_routed_into_the_layer(tokens, kept):
    """64 tokens, top-2: the experts' grouped_mm multiplies 128 rows, but 64 tokens enter."""
    plan = hf_moe_plan(tokens, "grouped_mm")
    experts = [r for r in plan if r.op == "aten::_grouped_mm"]
    assert len(experts) == 4  # gate_up and down of 2 layers
    assert {r.tokens for r in experts} == {str(tokens)}
    gate_up = plan.by_role("moe.gate_up")
    assert len(gate_up) == 2 and all(r.prefetched is kept for r in gate_up)
    if not kept:
        assert {r.skip_reason for r in gate_up} == {SkipReason.OUTSIDE_TOKEN_RANGE}


def test_grouped_mm_experts_count_a_symbolic_routed_count():
    plan = hf_moe_plan(64, "grouped_mm", mode="symbolic")
    experts = [r for r in plan if r.op == "aten::_grouped_mm"]
    (dense,) = {r.tokens for r in plan if r.role == "attn.qkv"}
    assert len(experts) == 4 and {r.tokens for r in experts} == {dense}  # the ids' symbol
    assert {r.token_check for r in plan.by_role("moe.gate_up")} == {"run time"}


def test_batched_mm_experts_count_the_tokens_routed_into_the_layer():
    plan = hf_moe_plan(64, "batched_mm")
    experts = [r for r in plan if r.op == "aten::bmm" and r.weight_shape[0] == 4]
    assert len(experts) == 4 and {r.tokens for r in experts} == {"64"}


# -- bodies of higher-order ops ---------------------------------------------------------------


class Branching(nn.Module):
    """``W @ h.T`` in both branches of a ``torch.cond`` (the first is taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Module()
        self.mlp.gate_up_proj.weight = _w(OUT, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.mlp.gate_up_proj.weight
        return torch.cond(
            x.sum() > -1e9, lambda x: w @ x.relu().T, lambda x: w @ x.sigmoid().T, (x,)
        )


@pytest.mark.compile
@pytest.mark.parametrize(("tokens", "max_tokens", "kept"), [(8, 16, True), (200, 100, False)])
def test_a_body_of_a_higher_order_op_counts_its_linears_tokens(
    tokens, max_tokens, kept, fresh_dynamo
):
    model = Branching()
    options = {
        "target": "eager",
        "weight_prefetch_config": {"token_range": {"mlp": {"gate_up": {"max_tokens": max_tokens}}}},
    }
    compiled = torch.compile(model, backend="npu_prefetch", options=options, fullgraph=True)
    x = _input("weight_first", tokens)
    with torch.no_grad(), fxprefetch.collect_stats() as seen:
        torch.testing.assert_close(compiled(x), model(x))
    records = [r for p in fxprefetch.last_plans() for r in p if r.role == "mlp.gate_up"]
    assert len(records) == 2  # one per branch
    assert all(r.tokens == str(tokens) and r.prefetched is kept for r in records)
    assert seen.calls == kept  # the branch taken


# -- the property: every orientation and layout counts the true tokens ------------------------


FORMS = [
    "weight_second",
    "weight_first",
    "weight_first_transposed_view",
    "activation_stored_transposed",
    "linear",
    "matmul_3d",
    "weight_first_3d",
    "weight_first_bmm",
    "conv1d",
    "conv2d",
]


@given(
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
    transposed_weight=st.booleans(),
    symbolic=st.booleans(),
)
def test_the_count_is_the_true_token_count_in_every_orientation(
    batch, seq, transposed_weight, symbolic
):
    """``batch * seq`` tokens of ``HIDDEN`` features, multiplied in every form; the weight
    is stored ``[out, hidden]`` or ``[hidden, out]`` (``transposed_weight``); examples as
    the hypothesis profile says (CI: 10)."""
    for form in FORMS:
        _check_form(form, batch, seq, transposed_weight, symbolic)


def _check_form(form: str, batch: int, seq: int, transposed_weight: bool, symbolic: bool) -> None:
    stored = torch.randn(HIDDEN, OUT) if transposed_weight else torch.randn(OUT, HIDDEN)

    def weight() -> torch.Tensor:  # [out, hidden], a view where stored transposed
        return stored.T if transposed_weight else stored

    tokens = batch * seq
    x3 = torch.randn(batch, seq, HIDDEN)
    x2 = x3.reshape(tokens, HIDDEN)
    forms = {
        "weight_second": (lambda x: x @ weight().T, x2),
        "weight_first": (lambda x: weight() @ x.T, x2),
        "weight_first_transposed_view": (lambda x: torch.mm(weight(), x.t().contiguous()), x2),
        "activation_stored_transposed": (lambda x: weight() @ x, x2.T.contiguous()),
        "linear": (lambda x: F.linear(x, weight()), x3),
        "matmul_3d": (lambda x: torch.matmul(x, weight().T), x3),
        "weight_first_3d": (lambda x: weight() @ x.transpose(1, 2), x3),
        "weight_first_bmm": (
            lambda x: torch.bmm(weight().expand(batch, -1, -1), x.transpose(1, 2)),
            x3,
        ),
        "conv1d": (lambda x: F.conv1d(x, weight()[..., None]), x3.transpose(1, 2).contiguous()),
        "conv2d": (
            lambda x: F.conv2d(x, weight()[..., None, None]),
            x2.T.reshape(1, HIDDEN, batch, seq).contiguous(),
        ),
    }
    fn, x = forms[form]
    gm = make_fx(fn, tracing_mode="symbolic" if symbolic else "fake", _allow_non_fake_inputs=True)(
        x
    )
    uses = find_linears(gm.graph, None, DEFAULT_RULES)
    by_node = {u.node: u for u in uses}
    counts = [linear_tokens(u, DEFAULT_RULES, by_node) for u in uses]
    assert len(counts) == 1 and uses[0].root is not None  # the weight was found
    (count,) = counts
    if isinstance(count, torch.SymInt):  # the symbolic count, at the traced shapes
        assert symbolic and tokens > 1
        count = count.node.hint
    assert count == tokens, form
