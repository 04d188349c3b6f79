"""vllm-ascend: the pass in every graph mode, and one owner of weight prefetch per process.

vllm-ascend's compiler (``AscendCompiler``, named by its platform's ``get_compile_backend``)
compiles in two ways. Piecewise and FULL_AND_PIECEWISE run its pass manager
(``graph_fusion_manager``), which holds our pass (:mod:`fxprefetch.vllm.plugin`). FULL and
FULL_DECODE_ONLY hand the graph to npugraph_ex (or, without it, torchair) through
``get_npu_backend(compiler_config=...)`` and never call the pass manager. For those, while the
platform's compiler compiles a graph for a vLLM config that holds our pass, npugraph_ex's and
torchair's ``get_npu_backend`` compose our npu pipeline into a private copy of the config as
its ``post_grad_custom_post_pass`` (after any pass already there: :func:`configure_torchair`).
These are npugraph_ex's and torchair's public hooks, which every vllm-ascend release calls;
no vllm-ascend private function is touched. Without a graph (compilation mode NONE,
``enforce_eager``) no pass can run: one warning says so at start-up.

vllm-ascend up to 0.23 also ships its own hand-placed prefetch, switched on by the same
``weight_prefetch_config.enabled``. Where fxprefetch's pass runs (every graph mode) it takes
over and switches the built-in off (``AscendConfig.weight_prefetch_config.enabled = False``,
in every process, before vllm-ascend's model runner reads it); without a graph it defers to
the built-in, which works in eager code. Either way one log line names the owner.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fxprefetch.config import ROOT_KEY, WeightPrefetchConfig
from fxprefetch.targets.npu import configure_torchair
from fxprefetch.validation import ConfigError
from fxprefetch.vllm.compiling import (
    compiling,
    compiling_for,
    compiling_vllm_config,
    current_vllm_config,
    parameter_inputs,
)
from fxprefetch.vllm.settings import additional_config, take_section

logger = logging.getLogger(__name__)

OWNER_FXPREFETCH = "fxprefetch"
OWNER_BUILTIN = "vllm-ascend built-in"
OWNER_NONE = "none"
_MARK = "_fxprefetch"
PREFETCH_PASS_MARK = "_fxprefetch_prefetch_pass"  # set on vllm_plugin.WeightPrefetchPass
_warned: set[str] = set()


# -- graph modes -------------------------------------------------------------------------------


def compiles_graphs(vllm_config: Any) -> bool:
    """False where vLLM compiles no graph: compilation mode NONE (``enforce_eager`` sets it)."""
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enforce_eager", False):
        return False
    mode = getattr(getattr(vllm_config, "compilation_config", None), "mode", None)
    return mode is None or int(mode) != 0  # CompilationMode.NONE == 0


def _is_prefetch_pass(value: Any) -> bool:
    """Whether ``value`` is fxprefetch's vLLM pass (``vllm_plugin.WeightPrefetchPass``, which
    imports this module: it is known by its mark)."""
    return getattr(type(value), PREFETCH_PASS_MARK, False) is True


def find_prefetch_pass(holder: Any) -> Any:
    """Our pass, where ``holder`` is it or a pass manager holding it (``.passes``); else None."""
    if _is_prefetch_pass(holder):
        return holder
    for pass_ in getattr(holder, "passes", None) or ():
        if _is_prefetch_pass(pass_):
            return pass_
    return None


def _pass_in(*configs: Any) -> Any:
    for config in configs:
        if isinstance(config, Mapping):
            for value in config.values():
                if (found := find_prefetch_pass(value)) is not None:
                    return found
    return None


# -- FULL / FULL_DECODE_ONLY: npugraph_ex's and torchair's own custom-pass hook ----------------


def _compose_into(module: Any) -> bool:
    """Wrap ``module.get_npu_backend`` (npugraph_ex or torchair) once; True if wrapped now."""
    original = getattr(module, "get_npu_backend", None)
    if original is None or getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def get_npu_backend(*args: Any, compiler_config: Any = None, **kwargs: Any) -> Any:
        found = compiling_for()
        if found is not None:
            vllm_config, pass_ = found
            cfg = compiler_config if compiler_config is not None else module.CompilerConfig()
            planner = pass_.planner(target="npu", vllm_config=vllm_config)
            compiler_config = configure_torchair(planner, cfg)
            logger.debug("%s: our pass composed into %s", ROOT_KEY, module.__name__)
        return original(*args, compiler_config=compiler_config, **kwargs)

    setattr(get_npu_backend, _MARK, True)
    module.get_npu_backend = get_npu_backend
    return True


def arm_npu_backends() -> list[str]:
    """Wrap ``get_npu_backend`` where vllm-ascend will look for it; the modules wrapped.

    npugraph_ex first, as vllm-ascend tries it first; torchair when npugraph_ex does not
    import (vllm-ascend's fallback) or torchair is already loaded. Importing them is what
    vllm-ascend does itself when it compiles.
    """
    armed = []
    for name in ("npugraph_ex", "torchair"):
        if name == "torchair" and armed and "torchair.npu_fx_compiler" not in sys.modules:
            continue
        try:
            module = importlib.import_module(name)
            _compose_into(module)
        except (ImportError, AttributeError):
            continue
        armed.append(name)
    return armed


def _compilation_passes(vllm_config: Any) -> Mapping[str, Any]:
    compilation = getattr(vllm_config, "compilation_config", None)
    passes = getattr(compilation, "inductor_compile_config", None)
    return passes if isinstance(passes, Mapping) else {}


@contextlib.contextmanager
def _compiling(compiler: Any, compiler_config: Any) -> Iterator[None]:
    """While the platform's compiler compiles: which VllmConfig, and our hooks armed."""
    vllm_config = getattr(compiler, "vllm_config", None) or current_vllm_config()
    pass_ = _pass_in(compiler_config, _compilation_passes(vllm_config))
    if pass_ is None:
        yield  # our pass is not in this vLLM config: nothing to do
        return
    arm_npu_backends()
    with compiling(vllm_config, pass_):
        yield


def wrap_compiler(cls: type) -> bool:
    """Run ``cls.compile`` and ``cls.load`` (vLLM's ``CompilerInterface``) under
    :func:`_compiling`; idempotent. True if wrapped now."""
    if getattr(cls.__dict__.get("compile"), _MARK, False):
        return False

    def wrap(
        method: Callable[..., Any], config_index: int | None, inputs_index: int
    ) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
            compiler_config = kwargs.get("compiler_config")
            if compiler_config is None and config_index is not None and len(args) > config_index:
                compiler_config = args[config_index]
            example_inputs = kwargs.get(
                "example_inputs", args[inputs_index] if len(args) > inputs_index else ()
            )
            with _compiling(self, compiler_config), parameter_inputs(example_inputs or ()):
                return method(self, *args, **kwargs)

        setattr(wrapped, _MARK, True)
        return wrapped

    cls.compile = wrap(cls.compile, 2, 1)  # compile(graph, example_inputs, compiler_config, ...)
    if callable(getattr(cls, "load", None)):
        # load(handle, graph, example_inputs, ...): a cache miss recompiles with an empty config
        cls.load = wrap(cls.load, None, 2)
    return True


def _platform_compiler() -> type | None:
    """The platform's own compiler class (vllm-ascend's ``AscendCompiler``), if it has one."""
    from vllm.platforms import current_platform

    qualname = getattr(current_platform, "get_compile_backend", lambda: "")()
    if not isinstance(qualname, str) or "." not in qualname:
        return None  # "inductor" and the other built-in names
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


# -- vllm-ascend's built-in prefetch (up to 0.23) ----------------------------------------------


def builtin_requested(vllm_config: Any) -> bool:
    """vllm-ascend's built-in reads ``weight_prefetch_config.enabled`` as it is written."""
    section = additional_config(vllm_config).get(ROOT_KEY)
    return bool(section.get("enabled", False)) if isinstance(section, Mapping) else False


def fxprefetch_wanted(vllm_config: Any) -> bool:
    """The flag (``weight_prefetch_config.enabled``) or our pass in the pass table."""
    if _pass_in(_compilation_passes(vllm_config)) is not None:
        return True
    config = WeightPrefetchConfig.from_additional_config(additional_config(vllm_config))
    return bool(config.settled(False).enabled)


def prefetch_owner(vllm_config: Any, builtin_present: bool) -> str:
    """Who prefetches weights for this config: fxprefetch, vllm-ascend's built-in, or none."""
    if fxprefetch_wanted(vllm_config) and compiles_graphs(vllm_config):
        return OWNER_FXPREFETCH
    if builtin_present and builtin_requested(vllm_config):
        return OWNER_BUILTIN
    return OWNER_NONE


def settle_builtin(ascend_config: Any, vllm_config: Any) -> str:
    """Switch vllm-ascend's built-in prefetch on ``ascend_config`` off where fxprefetch owns
    prefetch, and back to what the user wrote otherwise; returns the owner."""
    builtin = getattr(ascend_config, "weight_prefetch_config", None)
    present = builtin is not None and hasattr(builtin, "enabled")
    owner = prefetch_owner(vllm_config, present)
    if present:
        builtin.enabled = builtin_requested(vllm_config) and owner != OWNER_FXPREFETCH
    return owner


def _wrap_ascend_config(cls: type) -> bool:
    """Settle the built-in each time vllm-ascend builds its ``AscendConfig`` (every process)."""
    original = cls.__init__
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def init_then_settle(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, vllm_config, *args, **kwargs)
        try:
            settle_builtin(self, vllm_config)
        except Exception as exc:  # never break vllm-ascend's start-up
            logger.warning("%s: cannot settle vllm-ascend's built-in prefetch: %s", ROOT_KEY, exc)

    setattr(init_then_settle, _MARK, True)
    cls.__init__ = init_then_settle
    return True


def _builtin_ascend_config() -> Any:
    """vllm-ascend's ``AscendConfig`` class where it still ships the built-in prefetch."""
    if importlib.util.find_spec("vllm_ascend") is None:
        return None
    module = importlib.import_module("vllm_ascend.ascend_config")
    if not hasattr(module, "WeightPrefetchConfig"):
        return None  # vllm-ascend 0.24 and later: no built-in prefetch
    return getattr(module, "AscendConfig", None)


# -- the flag on vllm-ascend's strict AscendConfig (0.27.1rc1 and later) -----------------------

LAYOUT_TOLERANT = "tolerant"  # 0.23-0.26: AscendConfig(vllm_config) reads keys with .get()
LAYOUT_STRICT = "strict"  # 0.27.1rc1-0.30.0rc2: pydantic, extra="forbid", keys as kwargs
EXPLICIT_ROUTE = (
    '--compilation-config \'{"inductor_passes": {"graph_fusion_manager": '
    '"fxprefetch.vllm_plugin.weight_prefetch_pass"}}\' with FXPREFETCH_CONFIG holding the '
    "same JSON (docs/vllm.md)"
)


def _ascend_config_module() -> Any:
    """``vllm_ascend.ascend_config`` where vllm-ascend is installed, else None."""
    if importlib.util.find_spec("vllm_ascend") is None:
        return None
    return importlib.import_module("vllm_ascend.ascend_config")


def flag_layout(module: Any) -> str | None:
    """How ``module`` (``vllm_ascend.ascend_config``) takes ``additional_config``:
    :data:`LAYOUT_TOLERANT` where ``AscendConfig(vllm_config)`` reads the keys it knows
    (0.23-0.26: ours passes by, or is the 0.23 built-in's), :data:`LAYOUT_STRICT` where
    ``init_ascend_config`` passes the keys to a pydantic ``AscendConfig`` that forbids unknown
    ones and has no field of ours (0.27.1rc1-0.30.0rc2), None for any other layout."""
    cls = getattr(module, "AscendConfig", None)
    if not isinstance(cls, type) or not callable(getattr(module, "init_ascend_config", None)):
        return None
    pydantic_config = getattr(cls, "__pydantic_config__", None)
    fields = getattr(cls, "__dataclass_fields__", None)
    if pydantic_config is None and fields is None:
        params = list(inspect.signature(cls.__init__).parameters)
        return LAYOUT_TOLERANT if params[1:2] == ["vllm_config"] else None
    strict = isinstance(pydantic_config, Mapping) and pydantic_config.get("extra") == "forbid"
    if strict and isinstance(fields, Mapping) and ROOT_KEY not in fields:
        return LAYOUT_STRICT
    return None


def _ascend_version() -> str:
    try:
        return importlib.metadata.version("vllm-ascend")
    except importlib.metadata.PackageNotFoundError:
        try:  # written by its build (setuptools-scm)
            return str(importlib.import_module("vllm_ascend._version").__version__)
        except (ImportError, AttributeError):
            return "(version unknown)"


def prepare_flag(vllm_config: Any) -> str | None:
    """At the start of ``VllmConfig.__post_init__``, before vllm-ascend reads
    ``additional_config``: where it holds our section, make the installed vllm-ascend able to
    start with it. Tolerant layouts (0.23-0.26) read only the keys they know: nothing to do.
    Strict ones (0.27.1rc1-0.30.0rc2) get the section taken out of ``additional_config``
    (:func:`fxprefetch.vllm.settings.take_section`; fxprefetch reads it from where it is
    kept). Any other layout: our one-line ``ConfigError`` naming the version and the
    explicit route, instead of vllm-ascend's refusal of a key we told users to type.
    Returns the layout (None: no section, or no vllm-ascend)."""
    additional = getattr(vllm_config, "additional_config", None)
    if not isinstance(additional, Mapping) or ROOT_KEY not in additional:
        return None
    try:
        module = _ascend_config_module()
        if module is None:
            return None  # no vllm-ascend: vLLM itself ignores additional_config
        layout = flag_layout(module)
    except Exception as exc:
        logger.debug("%s: cannot read vllm-ascend's config layout: %s", ROOT_KEY, exc)
        layout = None
    if layout == LAYOUT_STRICT:
        take_section(vllm_config)
    elif layout != LAYOUT_TOLERANT:
        raise ConfigError(
            f"additional_config.{ROOT_KEY}",
            f"vllm-ascend {_ascend_version()} reads additional_config in a way fxprefetch "
            f"does not know, so it cannot take this flag; use the explicit route instead: "
            f"{EXPLICIT_ROUTE}",
        )
    return layout


# -- entry points (from fxprefetch.vllm.plugin) ------------------------------------------------


def hook_platform() -> None:
    """In every process (the plugin's entry point): hook the platform's compiler and
    vllm-ascend's config. Never raises: a failure is logged and prefetch stays where it was
    (where the flag is then given, :func:`check_flag_route` stops start-up saying why)."""
    hooks = (
        (_platform_compiler, wrap_compiler),
        (_builtin_ascend_config, _wrap_ascend_config),
    )
    for find, hook in hooks:
        try:
            cls = find()
            if cls is not None:
                hook(cls)
        except Exception as exc:
            logger.warning("%s: cannot hook vllm-ascend (%s): %s", ROOT_KEY, hook.__name__, exc)


def _warn_once(message: str, *args: Any) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message, *args)


def at_start_up(vllm_config: Any) -> str:
    """At the end of ``VllmConfig.__post_init__`` (modes final): settle the built-in in this
    process, warn once where no graph will run our pass, and log the owner. Never raises."""
    try:
        return _at_start_up(vllm_config)
    except Exception as exc:  # never break vLLM's start-up over this
        logger.warning("%s: cannot settle who prefetches weights: %s", ROOT_KEY, exc)
        return OWNER_NONE


def _at_start_up(vllm_config: Any) -> str:
    ascend_config = None
    if _builtin_ascend_config() is not None:
        module = sys.modules["vllm_ascend.ascend_config"]
        with contextlib.suppress(Exception):  # not initialized: the worker settles it
            ascend_config = module.get_ascend_config()
    if ascend_config is not None and getattr(ascend_config, "vllm_config", None) is vllm_config:
        owner = settle_builtin(ascend_config, vllm_config)
    else:
        owner = prefetch_owner(vllm_config, _builtin_ascend_config() is not None)
    if not compiles_graphs(vllm_config) and fxprefetch_wanted(vllm_config):
        _warn_once(
            "%s: fxprefetch's weight prefetch needs a graph mode, and this vLLM config compiles "
            "no graph (compilation mode NONE / enforce_eager); %s",
            ROOT_KEY,
            "vllm-ascend's built-in prefetch is active instead"
            if owner == OWNER_BUILTIN
            else "no weight is prefetched",
        )
    elif owner != OWNER_NONE:
        logger.info("%s: weight prefetch by %s", ROOT_KEY, owner)
    return owner


__all__ = [
    "LAYOUT_STRICT",
    "LAYOUT_TOLERANT",
    "OWNER_BUILTIN",
    "OWNER_FXPREFETCH",
    "OWNER_NONE",
    "arm_npu_backends",
    "at_start_up",
    "compiles_graphs",
    "compiling_vllm_config",
    "find_prefetch_pass",
    "flag_layout",
    "fxprefetch_wanted",
    "hook_platform",
    "prefetch_owner",
    "prepare_flag",
    "settle_builtin",
    "wrap_compiler",
]
