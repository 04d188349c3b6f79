"""Who prefetches weights under vllm-ascend (fxprefetch/vllm/ascend.py), on plain objects.

The same rules run on vllm-ascend's real source in tests/vllm/test_vllm_ascend.py; these check
the decision table quickly, with no vLLM.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fxprefetch.vllm import ascend as vllm_ascend
from fxprefetch.vllm.plugin import weight_prefetch_pass


def config(*, flag: bool | None, mode: int = 3, eager: bool = False, ours: bool = False):
    section = {} if flag is None else {"weight_prefetch_config": {"enabled": flag}}
    passes = {"graph_fusion_manager": weight_prefetch_pass} if ours else {}
    return SimpleNamespace(
        additional_config=section,
        model_config=SimpleNamespace(enforce_eager=eager),
        compilation_config=SimpleNamespace(mode=mode, inductor_compile_config=passes),
    )


def ascend_config():  # vllm-ascend 0.23's AscendConfig.weight_prefetch_config, as read
    return SimpleNamespace(weight_prefetch_config=SimpleNamespace(enabled=True))


@pytest.mark.parametrize(
    ("vllm", "owner", "builtin_on"),
    [
        (config(flag=True), vllm_ascend.OWNER_FXPREFETCH, False),
        (config(flag=True, mode=0), vllm_ascend.OWNER_BUILTIN, True),
        (config(flag=True, eager=True), vllm_ascend.OWNER_BUILTIN, True),
        (config(flag=False), vllm_ascend.OWNER_NONE, False),
        (config(flag=None, ours=True), vllm_ascend.OWNER_FXPREFETCH, False),  # explicit route
    ],
)
def test_exactly_one_owner(vllm, owner, builtin_on):
    ascend = ascend_config()
    assert vllm_ascend.settle_builtin(ascend, vllm) == owner
    assert ascend.weight_prefetch_config.enabled is builtin_on


def test_settling_again_follows_the_final_mode():
    """The platform may change the mode after vllm-ascend built its config: settle again."""
    vllm, ascend = config(flag=True), ascend_config()
    vllm_ascend.settle_builtin(ascend, vllm)
    vllm.compilation_config.mode = 0  # e.g. cudagraph_mode NONE -> compilation mode NONE
    assert vllm_ascend.settle_builtin(ascend, vllm) == vllm_ascend.OWNER_BUILTIN
    assert ascend.weight_prefetch_config.enabled is True


def test_no_graph_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(vllm_ascend, "_warned", set())
    with caplog.at_level(logging.INFO, logger="fxprefetch"):
        for _ in range(3):
            vllm_ascend.at_start_up(config(flag=True, eager=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "needs a graph mode" in warnings[0]


def test_a_wrapped_compiler_arms_nothing_without_our_pass(monkeypatch):
    armed = []
    monkeypatch.setattr(vllm_ascend, "arm_npu_backends", lambda: armed.append(1))

    class Compiler:
        def compile(self, graph, example_inputs, compiler_config, compile_range, key=None):
            return vllm_ascend.compiling_vllm_config()

        def load(self, *args):
            return vllm_ascend.compiling_vllm_config()

    assert vllm_ascend.wrap_compiler(Compiler) and not vllm_ascend.wrap_compiler(Compiler)
    compiler = Compiler()
    compiler.vllm_config = config(flag=False)
    assert compiler.compile(None, [], {}, None) is None and armed == []
    compiler.vllm_config = on = config(flag=True, ours=True)
    assert compiler.compile(None, [], {}, None) is on and compiler.load() is on and armed == [1, 1]
    assert vllm_ascend.compiling_vllm_config() is None  # only while compiling


def test_the_user_facing_plugin_path_is_the_pass_of_the_vllm_room():
    """``fxprefetch.vllm_plugin`` (the entry point, and the name users put in
    ``inductor_passes``) gives the objects of ``fxprefetch.vllm.plugin``; vLLM resolves the
    dotted name in the top-level package."""
    import fxprefetch.vllm_plugin as alias
    from fxprefetch.vllm import plugin

    assert alias.register is plugin.register
    assert alias.WeightPrefetchPass is plugin.WeightPrefetchPass
    resolved = __import__("fxprefetch.vllm_plugin").__dict__["weight_prefetch_pass"]
    assert resolved is alias.weight_prefetch_pass is plugin.weight_prefetch_pass
