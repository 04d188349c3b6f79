"""``weight_prefetch_config.token_range``: validation, defaults, round trips and digests."""

from __future__ import annotations

import pytest

from fxprefetch import ConfigError, WeightPrefetchConfig
from fxprefetch.config import TokenBounds, TokenRange

ASCEND = {  # vllm-ascend 0.23's thresholds: MoE gate/up from 96 tokens, MLP below 500
    "moe": {"gate_up": {"min_tokens": 96}},
    "mlp": {"gate_up": {"max_tokens": 499}, "down": {"max_tokens": 499}},
}


def test_the_default_keeps_every_token_count_and_todays_digest():
    cfg = WeightPrefetchConfig()
    assert cfg.token_range.unbounded and "token_range" not in cfg.to_dict()
    assert all(cfg.tokens(role) == TokenRange() for role in ("attn.qkv", "moe.gate_up"))
    # the digest of a config without bounds is the one earlier versions computed
    # (computed with the config module before token ranges existed, windows left unwritten)
    assert WeightPrefetchConfig().digest == "4e3d424eb5436488"
    assert WeightPrefetchConfig.from_dict({"enabled": True}).digest == "5c484f6ab5b01f73"


def test_per_role_ranges_meet_the_overall_one():
    cfg = WeightPrefetchConfig.from_dict({"token_range": {"max_tokens": 4096, **ASCEND}})
    assert cfg.tokens("moe.gate_up") == TokenRange(96, 4096)
    assert cfg.tokens("mlp.down") == TokenRange(0, 499)
    assert cfg.tokens("attn.qkv") == TokenRange(0, 4096)
    assert 96 in cfg.tokens("moe.gate_up") and 95 not in cfg.tokens("moe.gate_up")


def test_round_trip_and_the_digest_covers_the_bounds():
    cfg = WeightPrefetchConfig.from_dict({"token_range": ASCEND})
    assert WeightPrefetchConfig.from_dict(cfg.to_dict()) == cfg
    assert WeightPrefetchConfig.from_json(cfg.to_json()).digest == cfg.digest
    other = WeightPrefetchConfig.from_dict(
        {"token_range": {"moe": {"gate_up": {"min_tokens": 97}}}}
    )
    assert len({cfg.digest, other.digest, WeightPrefetchConfig().digest}) == 3
    # an explicit unbounded range is the default
    assert (
        WeightPrefetchConfig.from_dict({"token_range": {"min_tokens": 0}}) == WeightPrefetchConfig()
    )
    assert cfg.with_enabled(True).token_range == cfg.token_range
    assert hash(cfg) == hash(WeightPrefetchConfig.from_dict({"token_range": ASCEND}))


@pytest.mark.parametrize(
    ("token_range", "path", "message"),
    [
        ({"min": 3}, "token_range.min", "unknown key (did you mean 'min_tokens'?)"),
        (
            {"moe": {"gate_up": {"min_tokens": -1}}},
            "token_range.moe.gate_up.min_tokens",
            "expected a non-negative integer token count, got number -1",
        ),
        (
            {"max_tokens": "500"},
            "token_range.max_tokens",
            "expected a non-negative integer token count, got string '500'",
        ),
        ({"max_tokens": True}, "token_range.max_tokens", "got boolean true"),
        ({"max_tokens": 1.5}, "token_range.max_tokens", "got number 1.5"),
        (
            {"mlp": {"down": {"min_tokens": 5, "max_tokens": 4}}},
            "token_range.mlp.down",
            "max_tokens (4) is below min_tokens (5)",
        ),
        (
            {"max_tokens": 100, "moe": {"gate_up": {"min_tokens": 200}}},
            "token_range.moe.gate_up",
            "[200, inf) does not meet the overall range [0, 100]",
        ),
        ({"moe": {"down": {"min_tokens": 1}}}, "token_range.moe.down", "unknown key"),
        (  # the run-time check op takes signed 64-bit counts
            {"max_tokens": 2**63},
            "token_range.max_tokens",
            "expected a token count in [0, 9223372036854775807] (2**63 - 1), "
            "got number 9223372036854775808",
        ),
        (
            {"attn": {"qkv": {"min_tokens": 2**64}}},
            "token_range.attn.qkv.min_tokens",
            "expected a token count in [0, 9223372036854775807]",
        ),
        ({"attn": []}, "token_range.attn", "expected a JSON object, got an array"),
        ([], "token_range", "expected a JSON object, got an array"),
    ],
)
def test_bad_bounds_name_their_json_path(token_range, path, message):
    with pytest.raises(ConfigError) as err:
        WeightPrefetchConfig.from_additional_config(
            {"weight_prefetch_config": {"token_range": token_range}}
        )
    assert err.value.path == f"additional_config.weight_prefetch_config.{path}"
    assert message in str(err.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"unknown role 'moe\.up'"):
        TokenBounds(roles=(("moe.up", TokenRange(1)),))
    with pytest.raises(ConfigError, match="expected TokenBounds"):
        WeightPrefetchConfig(token_range={"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_tokens"):
        TokenRange(5, 4)
    with pytest.raises(ConfigError, match=r"min_tokens: expected a token count in \[0, 9223"):
        TokenRange(2**63)
    assert TokenRange(2**63 - 1).min_tokens == 2**63 - 1  # the largest count is one


HUGE = {  # bounds past any int64: qkv bounded by nothing above, gate_up by nothing reachable
    "attn": {"qkv": {"min_tokens": 2, "max_tokens": 2**64}},
    "mlp": {"gate_up": {"min_tokens": 2**63 + 5}},
}


@pytest.mark.compile
@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_bounds_past_int64_that_slip_past_validation_never_break_the_model(
    target, fresh_dynamo, monkeypatch
):
    """With ``dynamic=True`` both bounds reach the run-time check op: the op's ``int``
    arguments are 64-bit, so the bounds are clamped to what they mean before they get there."""
    import torch

    import fxprefetch
    from fxprefetch import config

    from support.synthetic import SynthModel, SynthSpec

    monkeypatch.setattr(config, "_expect_token_count", lambda value, path: value)
    model = SynthModel(SynthSpec(layers=1)).eval()
    options = {"target": target, "weight_prefetch_config": {"token_range": HUGE}}
    compiled = torch.compile(model, backend="npu_prefetch", options=options, dynamic=True)
    for tokens in (4, 9):
        ids = torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad(), fxprefetch.collect_stats() as seen:
            out = compiled(ids)
            expected = model(ids)
        torch.testing.assert_close(out, expected)
        assert seen.failed == 0
        if target == "eager":  # the range ops' kernels ran: qkv's prefetch, never gate_up's
            assert seen.calls == 1 and seen.bytes_requested == 96 * 32 * 4
    (plan,) = fxprefetch.last_plans()
    checked = {r.role: r.token_check for r in plan.prefetched}
    assert checked == {"attn.qkv": "run time", "mlp.gate_up": "run time"}
