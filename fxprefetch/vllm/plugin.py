"""Weight prefetch inside vLLM and vllm-ascend (``pip install 'fxprefetch[vllm]'``).

Two ways to switch it on, both validated by fxprefetch (docs/vllm.md):

- the flag vllm-ascend users already type, ``--additional-config
  '{"weight_prefetch_config": {"enabled": true}}'``: the ``vllm.general_plugins`` entry point
  :func:`register` hooks ``VllmConfig.__post_init__``. At its start (before the platform reads
  ``additional_config``) it validates the section, so a bad config stops the engine at
  start-up with our ``ConfigError``, and lets vllm-ascend start with it
  (:func:`fxprefetch.vllm.ascend.prepare_flag`); at its end (the narrowest point that sees
  both ``additional_config`` and the final compilation config), when enabled, it puts
  a :class:`WeightPrefetchPass` bound to that config under the platform's pass key (it
  travels with the ``VllmConfig``: vLLM's CPU path compiles with no current config).
- the explicit route, ``--compilation-config '{"inductor_passes": {"<pass_key>":
  "fxprefetch.vllm_plugin.weight_prefetch_pass"}}'``, with ``post_grad_custom_post_pass`` on
  CUDA and the CPU, ``graph_fusion_manager`` on vllm-ascend; its settings come from
  ``FXPREFETCH_CONFIG`` (:mod:`fxprefetch.vllm.settings`; ``additional_config`` wins). vLLM
  resolves the name as ``__import__(module).__dict__[name]``, which looks in the *top-level*
  package: importing this module therefore also binds ``fxprefetch.weight_prefetch_pass``.

The pass is a ``VllmInductorPass``: it runs inside vLLM's pass manager (after the fusion
passes, before its clean-up) on CUDA and vllm-ascend, and as inductor's post-grad pass on the
CPU. It accepts a ``Graph`` or a ``GraphModule``, holds no ``OpOverload`` (it pickles: vLLM
ships it to workers), and its ``uuid()`` is the compile setup's key
(:meth:`fxprefetch.compile_setup.CompileSetup.cache_key`) with the bound config. Fused MoE
weights are prefetched by layer name (:mod:`fxprefetch.vllm.moe`); ``token_range`` sees
vLLM's compile range.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from torch.fx import Graph, GraphModule

from fxprefetch.compile_setup import CompileSetup
from fxprefetch.config import ROOT_KEY, TokenRange, WeightPrefetchConfig
from fxprefetch.passes.analysis.weight_sources import WeightSources
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import make_compile_setup
from fxprefetch.vllm import ascend as vllm_ascend
from fxprefetch.vllm.compiling import current_vllm_config, parameter_positions
from fxprefetch.vllm.moe import VllmMoeWeights  # also defines the by-name prefetch op
from fxprefetch.vllm.settings import flag_given, settings

logger = logging.getLogger(__name__)
#: the device profile the pass predicts with (a built-in name or a profile file's path)
PROFILE_ENV = "FXPREFETCH_DEVICE_PROFILE"

try:
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass
except ImportError:  # vLLM absent: the pass still works as a plain post-grad callable
    VllmInductorPass = object  # type: ignore[assignment,misc]


def config_from_vllm(vllm_config: Any, default_enabled: bool) -> WeightPrefetchConfig:
    """The settings for a ``VllmConfig``: its ``weight_prefetch_config``, else
    ``FXPREFETCH_CONFIG`` (:func:`fxprefetch.vllm.settings.settings`; ``ConfigError``)."""
    return settings(vllm_config).settled(default_enabled)


def env_device_profile() -> Any:
    """The profile ``FXPREFETCH_DEVICE_PROFILE`` names (None where it is unset or empty);
    a ``ConfigError`` naming the variable where it names no profile."""
    import os

    from fxprefetch.devices.profiles import device_profile_option

    value = os.environ.get(PROFILE_ENV, "").strip()
    return device_profile_option(value, PROFILE_ENV) if value else None


def _device_target() -> str:
    """The pipeline for vLLM's device: ``npu`` lowers to npu_prefetch; else inductor's."""
    try:
        from vllm.platforms import current_platform

        device = str(current_platform.device_type)
    except ImportError:
        device = "cpu"
    return "npu" if device == "npu" else "inductor"


def _aot_metadata() -> object | None:
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    return getattr(context, "fw_metadata", None) if context is not None else None


def _is_hop_body(gm: GraphModule) -> bool:
    """Whether ``gm`` is a higher-order-op body inductor's post-grad passes visit before the
    graph AOT compiled (whose placeholders carry AOT's input descriptors and match its
    inputs). The planner plans such bodies with their caller."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    metadata = _aot_metadata()
    inputs = getattr(metadata, "input_info", None)
    if inputs is None or any("desc" in p.meta for p in placeholders):
        return False
    return len(placeholders) != len(inputs)


def _static_input_names(gm: GraphModule) -> dict[str, str] | None:
    """Placeholders AOT autograd knows as parameters or buffers (static inputs), if any."""
    static = getattr(_aot_metadata(), "static_input_indices", None)
    if not static:
        return None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return {placeholders[i].name: placeholders[i].name for i in static if i < len(placeholders)}


def _parameter_input_sources(gm: GraphModule) -> WeightSources | None:
    """Which placeholders are parameters, from the compiler's example inputs (see
    :func:`parameter_inputs`): through AOT's input descriptors where the graph has them, by
    position where it has none and matches the inputs one to one. None outside a compile."""
    params = parameter_positions()
    if params is None:
        return None
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    described = any("desc" in p.meta for p in placeholders)
    names: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for position, node in enumerate(placeholders):
        index = getattr(node.meta.get("desc"), "idx", None) if described else position
        if index is None:
            unknown[node.name] = "an AOT input that is not one of the compiler's inputs"
        elif index in params:
            names[node.name] = node.name
    return WeightSources(names=names, unknown=unknown)


def vllm_uses_cudagraphs(vllm_config: Any) -> bool:
    """Whether vLLM replays its compiled graphs as CUDA graphs: ``cudagraph_mode`` other than
    NONE (vLLM >= 0.10), else ``use_cudagraph``; never under ``enforce_eager``."""
    if vllm_config is None:
        return False
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enforce_eager", False):
        return False
    compilation = getattr(vllm_config, "compilation_config", None)
    mode = getattr(compilation, "cudagraph_mode", None)
    if mode is not None:
        return getattr(mode, "name", str(mode)).upper() != "NONE"
    return bool(getattr(compilation, "use_cudagraph", False))


def _compile_range() -> TokenRange | None:
    """The token counts vLLM compiles this graph for (its pass context's compile range)."""
    try:
        from vllm.compilation.passes.inductor_pass import get_pass_context

        found = get_pass_context().compile_range
    except (ImportError, AssertionError, AttributeError):
        return None
    low, high = int(found.start), int(found.end)
    return TokenRange(max(low, 0), high) if high >= max(low, 0) else None


class _VllmGraphPlanner(GraphPlanner):
    """vLLM's post-grad graphs carry no dynamo sources: AOT's static inputs name weights.
    Fused MoE weights are found by layer name; token bounds see vLLM's compile range."""

    def weight_names(self, gm: GraphModule) -> WeightSources | dict[str, str]:
        names = _static_input_names(gm)
        if names is not None:
            return names
        found = _parameter_input_sources(gm)
        if found is not None:
            return found
        # never guess: their linears are skipped, saying why
        return WeightSources(unknown_default="AOT autograd marks no static inputs here")

    def graph_tokens(self) -> TokenRange | None:
        return _compile_range()


class WeightPrefetchPass(VllmInductorPass):  # type: ignore[misc,valid-type]
    """fxprefetch's planning pass and device lowering, as a vLLM inductor pass."""

    _fxprefetch_prefetch_pass = True  # vllm_ascend.PREFETCH_PASS_MARK: how vllm_ascend knows it

    def __init__(
        self, rules: PrefetchRules | None = None, bound: WeightPrefetchConfig | None = None
    ) -> None:
        # VllmInductorPass.__init__ wants a VllmConfig, which does not exist yet when vLLM
        # resolves ``inductor_passes``; the config is read when the pass runs instead.
        # ``bound``: the config of the VllmConfig the flag installed this pass into, for
        # compiles where vLLM sets no current config (its CPU path calls inductor directly).
        self.pass_name = type(self).__name__
        self.rules = rules
        self.bound = bound

    def config(self, vllm_config: Any = None) -> WeightPrefetchConfig:
        """The config the flag bound this pass to; else that of ``vllm_config`` (default: the
        current one) or ``FXPREFETCH_CONFIG``."""
        if self.bound is not None:  # the flag's settings (also in a dataclasses.replace copy)
            return self.bound
        return config_from_vllm(vllm_config or current_vllm_config(), default_enabled=True)

    def setup(self, target: str | None = None, vllm_config: Any = None) -> CompileSetup:
        """The compile setup under ``vllm_config`` (default: the current one): ``target``
        defaults to vLLM's device's pipeline; the native prefetch where vLLM replays its
        graphs as CUDA graphs (``native_prefetch`` "auto"), hints elsewhere."""
        return make_compile_setup(
            self.config(vllm_config),
            target=target or _device_target(),
            rules=self.rules,
            split_at_attention=True,  # piecewise graphs end at attention: no fork may cross it
            cudagraphs=vllm_uses_cudagraphs(vllm_config or current_vllm_config()),
            device_profile=env_device_profile(),
        )

    def planner(self, target: str | None = None, vllm_config: Any = None) -> GraphPlanner:
        """The planner for one graph: ``target`` defaults to vLLM's device's pipeline."""
        return _VllmGraphPlanner(
            self.setup(target, vllm_config),
            hidden_weights=VllmMoeWeights(vllm_config or current_vllm_config),
        )

    def __call__(self, graph: Graph | GraphModule) -> None:
        gm = graph if isinstance(graph, GraphModule) else graph.owning_module
        if gm is None:
            raise TypeError("fxprefetch's vLLM pass needs a graph owned by a GraphModule")
        if _is_hop_body(gm):
            return  # planned with the graph that calls it
        self.planner()(gm)

    def uuid(self) -> str:
        """The compile setup's key, with the config this pass was bound to (it travels
        pickled to workers where vLLM sets no current config)."""
        return self.setup().cache_key(self.bound.digest if self.bound is not None else "-")

    def __getstate__(self) -> dict[str, Any]:
        return {"pass_name": self.pass_name, "rules": self.rules, "bound": self.bound}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"bound": None, **state})


weight_prefetch_pass = WeightPrefetchPass()
# vLLM resolves "fxprefetch.vllm_plugin.weight_prefetch_pass" in the top-level package.
sys.modules["fxprefetch"].weight_prefetch_pass = weight_prefetch_pass  # type: ignore[attr-defined]


def install(vllm_config: Any) -> bool:
    """Validate ``weight_prefetch_config`` and, if enabled, add the pass; True if added.

    Without the section (or with ``enabled`` false or not written) nothing changes.
    """
    if not flag_given(vllm_config):
        return False  # FXPREFETCH_CONFIG alone adds no pass: it carries the explicit route's
    config = settings(vllm_config).settled(False)
    if not config.enabled:
        return False
    from vllm.platforms import current_platform

    key = current_platform.pass_key
    passes = vllm_config.compilation_config.inductor_compile_config
    present = passes.get(key)
    if isinstance(present, WeightPrefetchPass):
        return False
    if present is not None:
        logger.warning(
            "%s: %s already holds %r; fxprefetch's weight prefetch is not added",
            ROOT_KEY,
            key,
            present,
        )
        return False
    passes[key] = WeightPrefetchPass(bound=config)  # travels with the VllmConfig (pickled)
    logger.info("%s: weight prefetch pass added under %s (%s)", ROOT_KEY, key, config.digest)
    return True


def register() -> None:
    """The ``vllm.general_plugins`` entry point. Idempotent: vLLM calls it in every process."""
    from vllm.config import VllmConfig

    vllm_ascend.hook_platform()  # vllm-ascend: FULL modes, its built-in prefetch (every process)
    original = VllmConfig.__post_init__
    if getattr(original, "_fxprefetch", False):
        return

    def post_init_with_prefetch(self: Any, *args: Any, **kwargs: Any) -> None:
        # before the platform reads additional_config: our settings first (a bad ratio stops
        # here with our message), then whether this vllm-ascend can take the flag at all
        settings(self)
        vllm_ascend.prepare_flag(self)
        original(self, *args, **kwargs)
        install(self)
        vllm_ascend.at_start_up(self)  # graph mode: who prefetches; no graph: warn once

    post_init_with_prefetch._fxprefetch = True  # type: ignore[attr-defined]
    post_init_with_prefetch.__wrapped__ = original  # type: ignore[attr-defined]
    VllmConfig.__post_init__ = post_init_with_prefetch


__all__ = ["WeightPrefetchPass", "config_from_vllm", "install", "register", "weight_prefetch_pass"]
