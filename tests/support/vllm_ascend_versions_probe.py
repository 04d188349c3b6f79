"""Run inside the vLLM environment (tests/support/vllm_env.py) by
tests/vllm/test_vllm_ascend_versions.py: the guide's flag on one vllm-ascend release's REAL source
(tests/support/vllm_ascend_real.py); prints JSON.

``python vllm_ascend_versions_probe.py <source root> <version> [modes]``:

- the flag's path through vllm-ascend's own ``init_ascend_config`` (what its
  ``NPUPlatform.check_and_update_config`` calls from ``VllmConfig.__post_init__``; the test
  reads that call in the real ``platform.py``): first without our plugin loaded, then with it
  (loaded by vLLM's own loader), with one of vllm-ascend's own settings beside the flag
  (kept?), a bad ratio (our error?), a misspelt vllm-ascend key (still refused?), and the
  config pickled as vLLM sends it to its workers;
- mode NONE: one warning for two configs;
- with ``modes``: FULL_DECODE_ONLY (AscendCompiler -> npugraph_ex) and PIECEWISE (the real
  GraphFusionPassManager), as tests/support/vllm_ascend_probe.py runs them for 0.23.

The stand-ins are those of tests/support/vllm_ascend_probe.py. ``VllmConfig`` objects are
built on vLLM's CPU platform (vllm-ascend's ``check_and_update_config`` needs more of a real
torch_npu than the stand-ins give on 0.30), so vllm-ascend's part of start-up is called as it
calls it: ``init_ascend_config(vllm_config)``.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import support.vllm_ascend_probe as probe

# vllm-ascend's own setting beside ours: a field of AscendConfig in every release here
OWN = {"ascend_compilation_config": {"enable_npugraph_ex": False}}
SECTION = {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0.5}}}
BAD = {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 1.5}}}


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:1200]
    return None


def config_route(with_plugin: bool) -> dict:
    from vllm.config import VllmConfig
    from vllm_ascend.ascend_config import init_ascend_config

    from fxprefetch.vllm_plugin import config_from_vllm

    def reads(config) -> dict:  # the settings fxprefetch reads for this config
        return config_from_vllm(config, default_enabled=False).to_dict()

    out: dict = {}
    written = {**OWN, "weight_prefetch_config": SECTION}
    config = VllmConfig(additional_config=dict(written))
    ascend: list = []
    out["init_error"] = _error(lambda: ascend.append(init_ascend_config(config)))
    if ascend:
        compilation = ascend[0].ascend_compilation_config
        out["own_setting_kept"] = compilation.enable_npugraph_ex is False
    out["additional_config"] = dict(config.additional_config)
    out["fxprefetch_reads"] = reads(config)
    if not with_plugin:
        return out
    # the engine core and the workers get the config pickled; vllm-ascend's worker calls
    # init_ascend_config again there
    copy = pickle.loads(pickle.dumps(config))
    out["worker_init_error"] = _error(
        lambda: init_ascend_config(copy).__class__  # refresh: a new config object
    )
    out["worker_fxprefetch_reads"] = reads(copy)
    out["bad_ratio_error"] = _error(
        lambda: VllmConfig(additional_config={"weight_prefetch_config": BAD})
    )
    typo = VllmConfig(additional_config={"weight_prefetch_config": SECTION, "enable_kv_nzz": 1})
    out["typo_error"] = _error(lambda: init_ascend_config(typo))
    return out


def none_warns_once() -> list[str]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("fxprefetch").addHandler(handler)
    for _ in range(2):
        probe.vllm_config(npugraph_ex=True, eager=True)
    logging.getLogger("fxprefetch").removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def main(root: str, version: str, with_modes: bool) -> dict:
    probe.setup(root, npugraph_ex=True)
    from vllm_ascend.platform import NPUPlatform

    from support.torchair_real import selected_version

    result: dict = {"version": version, "torch_npu_wheel": selected_version()}
    source = inspect.getsource(NPUPlatform.check_and_update_config)
    result["platform_calls_init_ascend_config"] = "init_ascend_config(vllm_config)" in source
    result["without_plugin"] = config_route(with_plugin=False)
    from vllm.plugins import load_general_plugins

    with probe.npu_platform():
        load_general_plugins()  # our entry point, as vLLM loads it before any VllmConfig
    result["with_plugin"] = config_route(with_plugin=True)
    result["none_warnings"] = none_warns_once()
    if with_modes:
        modes = probe.modes()
        result["full_decode_only"] = modes["full_decode_only"]
        result["piecewise"] = modes["piecewise"]
    return result


if __name__ == "__main__":
    out = main(sys.argv[1], sys.argv[2], with_modes="modes" in sys.argv[3:])
    print("FXPREFETCH_RESULT " + json.dumps(out))
