"""PrefetchRules: every table is a field, its digest covers every field, the analyses read the
tables from the value they are given, and the role set is defined once."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from fxprefetch import config, roles
from fxprefetch.passes import register_linear_op
from fxprefetch.passes.analysis.linear_ops import LINEAR_CONDITIONS
from fxprefetch.passes.analysis.op_classes import NodeKind, classify
from fxprefetch.passes.analysis.roles import (
    canonical_path,
    is_experts_path,
    layer_index,
    match_role,
    owner_path,
)
from fxprefetch.passes.analysis.weight_trace import WeightTrace, trace_operand
from fxprefetch.passes.tables import rules as rules_module
from fxprefetch.passes.tables.role_rules import RoleRule
from fxprefetch.passes.tables.rules import DEFAULT_RULES, PrefetchRules, current_rules, set_rules
from fxprefetch.pipeline import run_weight_prefetch
from fxprefetch.plan.schema import schema_errors

from support.planning import ON, fresh_export
from support.tracing import fake_trace

ROOT = Path(__file__).resolve().parents[1]
TABLES = [f.name for f in dataclasses.fields(PrefetchRules) if f.init]


def _changed(value: object, name: str = "") -> object:
    """Another value of the same table: one entry more or one fewer (roles stay roles)."""
    if name == "sequence_parallel_roles":
        return value | {roles.ATTN_O}
    if name == "first_expert_role":
        return roles.MLP_GATE_UP
    if isinstance(value, frozenset):
        return value | {"fxtest::added"}
    if isinstance(value, tuple) and value:
        return value[:-1]
    if isinstance(value, str):
        return value + "_changed"
    if value is None:
        return "fxtest"
    raise AssertionError(f"no change written for a {type(value).__name__}: extend _changed")


# -- the digest -------------------------------------------------------------------------------


def test_the_rules_hold_the_tables_the_analyses_read():
    assert {
        "weight_views",
        "weight_casts",
        "weight_dequantize",
        "weight_index",
        "collective_inputs",
        "vector_tags",
        "module_wrappers",
        "weight_suffixes",
        "layer_containers",
        "expert_modules",
    } <= set(TABLES)


@pytest.mark.parametrize("name", TABLES)
def test_changing_any_field_changes_the_digest(name):
    changed = dataclasses.replace(
        DEFAULT_RULES, **{name: _changed(getattr(DEFAULT_RULES, name), name)}
    )
    assert changed != DEFAULT_RULES
    assert changed.digest != DEFAULT_RULES.digest


def test_each_field_changes_the_digest_its_own_way():
    digests = {
        dataclasses.replace(DEFAULT_RULES, **{n: _changed(getattr(DEFAULT_RULES, n), n)}).digest
        for n in TABLES
    }
    assert len(digests) == len(TABLES) and DEFAULT_RULES.digest not in digests


def test_the_digest_covers_the_fields_of_nested_records():
    name, spec = DEFAULT_RULES.linear_ops[0]
    rest = DEFAULT_RULES.linear_ops[1:]
    noted = dataclasses.replace(spec, note=spec.note + " (changed)")
    assert (
        dataclasses.replace(DEFAULT_RULES, linear_ops=((name, noted), *rest)).digest
        != DEFAULT_RULES.digest
    )
    first, *others = DEFAULT_RULES.role_rules
    why = RoleRule(first.pattern, first.role, first.why + " (changed)")
    assert (
        dataclasses.replace(DEFAULT_RULES, role_rules=(why, *others)).digest != DEFAULT_RULES.digest
    )


def test_equal_rules_have_equal_digests_whatever_the_order_of_extension():
    a = DEFAULT_RULES.with_op_kind("fxtest::a", "vector").with_op_kind("fxtest::b", "barrier")
    b = DEFAULT_RULES.with_op_kind("fxtest::b", "barrier").with_op_kind("fxtest::a", "vector")
    assert a == b and hash(a) == hash(b) and a.digest == b.digest


def test_sets_and_lists_given_are_stored_frozen():
    rules = dataclasses.replace(
        DEFAULT_RULES, vector_tags={"pointwise"}, weight_suffixes=[".weight"]
    )
    assert rules.vector_tags == frozenset({"pointwise"}) and rules.weight_suffixes == (".weight",)
    hash(rules)


def test_replace_does_not_share_the_derived_values():
    DEFAULT_RULES.digest, DEFAULT_RULES.layer_pattern  # noqa: B018  (fill the cache)
    changed = dataclasses.replace(DEFAULT_RULES, layer_containers=("stages",))
    assert layer_index("model.stages.2.mlp", changed) == 2
    assert layer_index("model.stages.2.mlp") is None
    assert changed.digest != DEFAULT_RULES.digest


def test_a_field_without_a_stable_form_is_refused():
    odd = dataclasses.replace(DEFAULT_RULES, collective_inputs=(object(),))
    with pytest.raises(TypeError, match="no stable form"):
        odd.digest  # noqa: B018


def test_the_default_digest_is_the_same_in_other_processes():
    script = "from fxprefetch.passes.tables.rules import DEFAULT_RULES; print(DEFAULT_RULES.digest)"
    seen = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        seen.add(out.stdout.strip())
    assert seen == {DEFAULT_RULES.digest}


# -- extending: one value, register_* over it ------------------------------------------------


def test_with_weight_op_files_an_op_under_one_kind():
    rules = DEFAULT_RULES.with_weight_op("fxtest::unpack", "cast")
    assert "fxtest::unpack" in rules.weight_casts and rules.digest != DEFAULT_RULES.digest
    moved = rules.with_weight_op("fxtest::unpack", "view")
    assert "fxtest::unpack" in moved.weight_views and "fxtest::unpack" not in moved.weight_casts
    with pytest.raises(ValueError, match="kind must be one of"):
        DEFAULT_RULES.with_weight_op("fxtest::unpack", "copy")
    with pytest.raises(ValueError, match="qualified op name"):
        DEFAULT_RULES.with_weight_op("unpack", "view")


def test_with_module_wrapper_adds_a_wrapper_once():
    rules = DEFAULT_RULES.with_module_wrapper("wrapped")
    assert canonical_path("layers.0.q_proj.wrapped", rules) == "layers.0.q_proj"
    assert canonical_path("layers.0.q_proj.wrapped") == "layers.0.q_proj.wrapped"
    assert rules.with_module_wrapper("wrapped") is rules
    with pytest.raises(ValueError, match="without dots"):
        DEFAULT_RULES.with_module_wrapper("a.b")


@pytest.fixture
def process_rules():
    yield
    set_rules(DEFAULT_RULES)


@pytest.mark.parametrize("kind", ["vector", "transparent", "barrier", "attention"])
def test_register_is_the_with_method_on_the_process_value(process_rules, kind):
    getattr(rules_module, f"register_{kind}_op")("fxtest::op")
    assert current_rules() == DEFAULT_RULES.with_op_kind("fxtest::op", kind)


# -- the analyses read the tables from the value they are given -------------------------------


def _traced(fn, *shapes):
    gm = make_fx(fn, tracing_mode="fake")(*(torch.randn(s) for s in shapes))
    return gm, {n.name: n for n in gm.graph.nodes}


def test_weight_trace_walks_through_the_rules_views():
    gm, nodes = _traced(lambda x, w: torch.mm(x, w.t()), (4, 8), (16, 8))
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    weight = mm.args[1]
    assert trace_operand(weight, DEFAULT_RULES).root is nodes["w_1"]
    no_t = dataclasses.replace(DEFAULT_RULES, weight_views=DEFAULT_RULES.weight_views - {"aten::t"})
    assert trace_operand(weight, no_t) == WeightTrace(None, computed_by="aten::t")


def test_weight_trace_reads_casts_and_dequantize_from_the_rules():
    gm, nodes = _traced(
        lambda x, w, s: torch.mm(x, w.to(torch.float64) * s), (4, 8), (8, 16), (16,)
    )
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
    found = trace_operand(mm.args[1], DEFAULT_RULES)
    assert found.root is nodes["w_1"] and found.converted_by == ("aten::_to_copy", "aten::mul")
    no_mul = dataclasses.replace(DEFAULT_RULES, weight_dequantize=frozenset())
    assert trace_operand(mm.args[1], no_mul).computed_by == "aten::mul"


def test_classify_reads_the_vector_tags_from_the_rules():
    gm, _ = _traced(lambda x: torch.exp(x) + 1, (4, 8))
    exp = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.exp.default)
    assert classify(exp, DEFAULT_RULES) is NodeKind.VECTOR
    untagged = dataclasses.replace(DEFAULT_RULES, vector_tags=frozenset())
    assert classify(exp, untagged) is NodeKind.BARRIER


def test_paths_are_read_by_the_rules_tables():
    rules = dataclasses.replace(
        DEFAULT_RULES,
        weight_suffixes=(".kernel",),
        expert_modules=("moe_experts",),
    )
    assert owner_path("mlp.down_proj.kernel", rules) == "mlp.down_proj"
    assert owner_path("mlp.down_proj.kernel") == "mlp.down_proj.kernel"
    assert owner_path("mlp.down_proj.weight") == "mlp.down_proj"
    assert is_experts_path("mlp.moe_experts.3", rules) and not is_experts_path("mlp.moe_experts")
    assert is_experts_path("mlp.experts.w13_weight") and not is_experts_path("mlp.experts2")
    assert layer_index("model.layers.7.mlp") == 7 and layer_index("model.layersX.7") is None


def test_match_role_takes_the_rules_or_a_list_of_role_rules():
    wrapped = "model.layers.0.self_attn.o_proj.base_layer"
    assert match_role(wrapped).role == roles.ATTN_O
    assert match_role(wrapped, DEFAULT_RULES.role_rules).role == roles.ATTN_O
    unwrapped = dataclasses.replace(DEFAULT_RULES, module_wrappers=())
    assert match_role(wrapped, unwrapped) is None


def test_every_condition_a_linear_op_names_exists():
    named = {spec.only_if for _, spec in DEFAULT_RULES.linear_ops if spec.only_if is not None}
    assert named and named <= set(LINEAR_CONDITIONS)


# -- the role set, defined once ---------------------------------------------------------------


def test_the_config_uses_the_role_table():
    assert config.ROLES is roles.ROLES
    ratios = config.PrefetchRatios()
    assert [getattr(ratios, r.attribute) for r in roles.ROLE_TABLE] == list(
        roles.DEFAULT_RATIOS.values()
    )
    assert ratios.items() == [(r.name, r.default_ratio) for r in roles.ROLE_TABLE]
    assert [f"{r.section}.{r.key}" for r in roles.ROLE_TABLE] == list(roles.ROLES)


def _role_schemas(node: object):
    """Every schema the plan schema gives a ``role`` property."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "role" and isinstance(value, dict) and "pattern" in value:
                yield value
            yield from _role_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _role_schemas(value)


def test_the_plan_schema_takes_every_role_and_only_role_shaped_names():
    """The schema lists no roles (a role added to the table needs no schema change); its
    pattern takes every role of the table and refuses what cannot be one."""
    schema = json.loads((ROOT / "fxprefetch" / "plan" / "plan_schema.json").read_text())
    found = list(_role_schemas(schema))
    assert found and all(set(s["examples"]) <= set(roles.ROLES) for s in found)
    for role_schema in found:
        for role in (*roles.ROLES, None, "moe.down"):
            assert schema_errors(role, role_schema) == [], role
        for bad in ("attn", "attn.qkv.extra", "Attn.qkv", "attn.", 3):
            assert schema_errors(bad, role_schema), bad


def test_every_role_the_tables_name_is_a_role():
    named = {rule.role for rule in DEFAULT_RULES.role_rules if rule.role is not None}
    named |= {spec.weight for _, spec in DEFAULT_RULES.linear_ops if spec.hidden and spec.weight}
    named |= DEFAULT_RULES.sequence_parallel_roles | {DEFAULT_RULES.first_expert_role}
    assert named == set(roles.ROLES)  # each role is found by some rule, none is unknown


def test_a_role_rule_must_name_a_role():
    with pytest.raises(ValueError, match=r"unknown role 'attn\.v'"):
        DEFAULT_RULES.with_role_rule(r"v_proj$", "attn.v")


# -- rules given as a value, and linear ops users register -------------------------------------


def test_rules_passed_as_a_value_are_the_only_rules_read(dense):
    _, _, gm, names = fresh_export(dense)
    rules = DEFAULT_RULES.with_role_rule(r"(^|\.)lm_head$", "mlp.gate_up", "tied head")
    assert rules.digest != DEFAULT_RULES.digest and current_rules() == DEFAULT_RULES
    plan = run_weight_prefetch(gm, ON, weight_names=names, rules=rules)
    assert next(r for r in plan if r.weight == "lm_head.weight").prefetched
    # the value is frozen, hashable and survives pickling (vLLM ships it to workers)
    import pickle

    again = pickle.loads(pickle.dumps(rules))
    assert again == rules and hash(again) == hash(rules) and again.digest == rules.digest


def test_user_linear_op():
    lib = torch.library.Library("fxtest", "FRAGMENT")
    lib.define("gemm(Tensor act, Tensor w) -> Tensor")
    lib.impl("gemm", lambda a, w: a @ w.t(), "CompositeExplicitAutograd")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x):
            return torch.ops.fxtest.gemm(torch.relu(x), self.o_proj.weight)

    gm, names = fake_trace(M(), torch.randn(2, 8))
    # unknown: the weight is recorded as taken by an opaque op, naming it, never prefetched
    (opaque,) = run_weight_prefetch(gm, ON, weight_names=names).records
    assert (opaque.op, opaque.prefetched) == ("fxtest::gemm", False)
    assert str(opaque.skip_reason) == "weight consumed by an opaque op"
    register_linear_op("fxtest::gemm", "w", ("act",))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (rec,) = plan.records
    assert rec.role == "attn.o" and rec.prefetched and rec.window == ("aten::relu",)
    with pytest.raises(ValueError, match="qualified"):
        register_linear_op("gemm", "w", ("act",))


# -- what the rules and the role table refuse ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"role_rules": (RoleRule(".*", "bogus"),)}, ValueError, r"role_rules\[0\]: unknown role"),
        ({"role_rules": (RoleRule("(", None),)}, ValueError, r"pattern '\(' is not a regular"),
        ({"sequence_parallel_roles": {"mlp.dwn"}}, ValueError, "sequence_parallel_roles: unknown"),
        ({"first_expert_role": "experts"}, ValueError, "first_expert_role: unknown role"),
        ({"vector_ops": "aten::mul"}, TypeError, "vector_ops: expected a collection"),
        ({"module_wrappers": "base_layer"}, TypeError, "module_wrappers: expected a collection"),
    ],
    ids=["rule-role", "rule-regex", "sp-role", "expert-role", "str-set", "str-tuple"],
)
def test_rules_refuse_what_the_pass_could_not_use(change, error, message):
    with pytest.raises(error, match=message):
        dataclasses.replace(DEFAULT_RULES, **change)


def test_extensions_refuse_malformed_arguments():
    with pytest.raises(TypeError, match=r"got the string 'input' \(write \('input',\)\)"):
        DEFAULT_RULES.with_linear_op("myns::gemm", "w", "input")
    for name in ("::", "aten::", "::mm", "a b::mm", "mm", None, 3):
        with pytest.raises(ValueError, match="expected a qualified op name"):
            DEFAULT_RULES.with_op_kind(name, "vector")
    assert "myns::gemm" in DEFAULT_RULES.with_linear_op("myns::gemm", "w", ("x",)).linear_table


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: roles.Role("gate", 1.0), "expected 'section.key' in lower case"),
        (lambda: roles.Role("moe.shared.gate_up", 1.0), "expected 'section.key'"),
        (lambda: roles.Role("Attn.qkv", 1.0), "expected 'section.key'"),
        (lambda: roles.Role("attn.gate", 1.5), r"default ratio must be in \[0, 1\]"),
        (lambda: roles.Role("attn.gate", float("nan")), "default ratio"),
        (
            lambda: roles.checked_table([roles.Role("attn.qkv", 1.0), roles.Role("attn.qkv", 0.5)]),
            "role 'attn.qkv' repeats 'attn.qkv'",
        ),
    ],
    ids=["no-section", "three-parts", "upper-case", "ratio", "nan", "repeated"],
)
def test_the_role_table_refuses_what_cannot_be_a_role(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_role_name_is_what_the_plan_schema_takes():
    schema = json.loads((ROOT / "fxprefetch" / "plan" / "plan_schema.json").read_text())
    (role_schema, *_) = _role_schemas(schema)
    assert role_schema["pattern"] == roles.ROLE_NAME.pattern
