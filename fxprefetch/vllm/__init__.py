"""The vLLM room: the pass and its entry point (``plugin``), vllm-ascend's hooks (``ascend``),
fused MoE weights (``moe``) and the compiling context (``compiling``).

Importing this package imports nothing from vLLM: each module imports it where it is used.
The user-facing paths stay ``fxprefetch.vllm_plugin`` (the ``vllm.general_plugins`` entry
point and ``fxprefetch.vllm_plugin.weight_prefetch_pass``).
"""
