"""The user-facing path of the vLLM pass (:mod:`fxprefetch.vllm.plugin`): the
``vllm.general_plugins`` entry point ``fxprefetch.vllm_plugin:register`` and
``--compilation-config '{"inductor_passes": {"<pass_key>":
"fxprefetch.vllm_plugin.weight_prefetch_pass"}}'`` keep working."""

from __future__ import annotations

from fxprefetch.vllm.plugin import (
    WeightPrefetchPass,
    config_from_vllm,
    install,
    register,
    weight_prefetch_pass,
)

__all__ = ["WeightPrefetchPass", "config_from_vllm", "install", "register", "weight_prefetch_pass"]
