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
