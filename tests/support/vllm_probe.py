"""Run inside the vLLM environment (tests/support/vllm_env.py) by tests/vllm/test_vllm.py;
prints JSON.

``units``: fxprefetch's vLLM pass against vLLM's real classes (``CompilationConfig``,
``PostGradPassManager``, ``VllmConfig``, the plugin loader). vllm-ascend's real
``GraphFusionPassManager`` is tested in tests/vllm/test_vllm_ascend.py.

``serve MODE``: a tiny Llama (random weights, ``load_format="dummy"``) served by the real
vLLM engine, greedy decoding from fixed token ids. MODE is ``baseline`` (no flag), ``flag``
(``additional_config`` only), ``explicit`` (``inductor_passes``) or ``bad`` (a bad ratio);
``moe-*`` serve a tiny Mixtral through vLLM's fused MoE op, and ``moe-default`` a tiny
Qwen3-MoE on vLLM's CPU defaults (oneDNN linears, its CPU MoE traced to ``cpu_fused_moe``).
vLLM on the CPU prepacks linear weights into oneDNN handles, so no weight is in the graph;
as on GPUs and NPUs, its ``torch.nn.functional.linear`` fallback keeps them there.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_MIXTRAL = {  # two layers, four experts (top 2), random weights: vLLM's fused MoE
    **{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")},
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}
TINY_QWEN3_MOE = {  # two layers, four experts (top 2): vLLM's CPU MoE on its default path
    **{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "norm_topk_prob": True,
    "mlp_only_layers": [],
}
# the seed guide's MoE example, verbatim, as its users type it after --additional-config
GUIDE_MOE_JSON = """{
        "weight_prefetch_config": {
            "enabled": true,
            "prefetch_ratio": {
                "attn": {
                    "qkv": 1.0,
                    "o": 1.0
                },
                "moe": {
                    "gate_up": 0.8
                }
            }
        }
    }"""
# vllm-ascend 0.23's MoE threshold (gate/up from 96 tokens). vLLM on the CPU compiles one
# graph with a symbolic token count (no compile ranges there): the prefetch checks it at run time
BOUNDED_MOE = {
    "weight_prefetch_config": {
        "enabled": True,
        "token_range": {"moe": {"gate_up": {"min_tokens": 96}}},
    }
}
PROMPTS = [[1, 17, 42, 99, 7, 3], [1, 200, 5, 64]]
LONG_PROMPT = [1] + [(7 * i) % 250 + 3 for i in range(99)]  # 100 tokens
PASS_NAME = "fxprefetch.vllm_plugin.weight_prefetch_pass"


def units() -> dict:
    from vllm.compilation.passes.inductor_pass import CallableInductorPass, InductorPass
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass
    from vllm.config import CompilationConfig, VllmConfig
    from vllm.plugins import load_general_plugins

    import fxprefetch
    from fxprefetch import ConfigError
    from fxprefetch.vllm.plugin import WeightPrefetchPass, config_from_vllm, weight_prefetch_pass

    out: dict = {}
    # the explicit route: vLLM resolves the qualname to our VllmInductorPass, not a wrapper
    cc = CompilationConfig(inductor_passes={"post_grad_custom_post_pass": PASS_NAME})
    resolved = cc.inductor_compile_config["post_grad_custom_post_pass"]
    out["resolved_is_ours"] = resolved is weight_prefetch_pass
    out["resolved_wrapped"] = isinstance(resolved, CallableInductorPass)
    out["is_vllm_inductor_pass"] = isinstance(resolved, VllmInductorPass)
    out["top_level_binding"] = fxprefetch.weight_prefetch_pass is weight_prefetch_pass
    # vLLM's pass manager accepts it
    manager = PostGradPassManager()
    manager.add(resolved)
    out["manager_holds_it"] = manager.passes == [resolved]
    out["is_inductor_pass"] = isinstance(resolved, InductorPass)
    # it pickles (vLLM ships VllmConfig to workers) and deep-copies
    again = pickle.loads(pickle.dumps(resolved))
    out["pickles"] = isinstance(again, WeightPrefetchPass)
    # the plugin: loaded by vLLM's own loader, twice (idempotent)
    load_general_plugins()
    load_general_plugins()
    post_init = VllmConfig.__post_init__
    out["plugin_wrapped_once"] = getattr(post_init, "_fxprefetch", False) and not getattr(
        post_init.__wrapped__, "_fxprefetch", False
    )
    plain = VllmConfig()
    out["no_flag_no_pass"] = "post_grad_custom_post_pass" not in (
        plain.compilation_config.inductor_compile_config
    )
    on = VllmConfig(additional_config={"weight_prefetch_config": {"enabled": True}})
    added = on.compilation_config.inductor_compile_config.get("post_grad_custom_post_pass")
    out["flag_adds_pass"] = isinstance(added, WeightPrefetchPass)
    # it carries the flag's config, for compiles where vLLM sets no current config (the CPU)
    out["flag_pass_carries_the_config"] = pickle.loads(
        pickle.dumps(added)
    ).config() == config_from_vllm(on, default_enabled=True)
    off = VllmConfig(additional_config={"weight_prefetch_config": {"enabled": False}})
    out["disabled_no_pass"] = "post_grad_custom_post_pass" not in (
        off.compilation_config.inductor_compile_config
    )
    try:
        VllmConfig(
            additional_config={"weight_prefetch_config": {"prefetch_ratio": {"mlp": {"down": 2}}}}
        )
        out["bad_ratio_error"] = None
    except (ConfigError, ValueError) as exc:  # pydantic wraps it, with our message
        out["bad_ratio_error"] = str(exc)
    out["pickles_in_vllm_config"] = pickle.loads(pickle.dumps(on)) is not None
    # uuid: stable, and covers additional_config
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(on):
        first = weight_prefetch_pass.uuid()
    with set_current_vllm_config(on):
        second = weight_prefetch_pass.uuid()
    half = VllmConfig(
        additional_config={"weight_prefetch_config": {"prefetch_ratio": {"attn": {"qkv": 0.5}}}}
    )
    with set_current_vllm_config(half):
        third = weight_prefetch_pass.uuid()
    out["uuid_stable"] = first == second
    out["uuid_covers_config"] = first != third
    # token bounds read the compile range from vLLM's real pass context
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    from fxprefetch.config import TokenRange
    from fxprefetch.vllm.plugin import _compile_range

    with pass_context(Range(start=65, end=256)):
        out["compile_range_seen"] = _compile_range() == TokenRange(65, 256)
    out["no_range_outside_a_compile"] = _compile_range() is None
    return out


def serve(mode: str) -> dict:
    import vllm._custom_ops as custom_ops
    import vllm.model_executor.layers.utils as layer_utils
    from vllm import LLM, SamplingParams

    default_path = mode == "moe-default"  # vLLM's CPU defaults: oneDNN linears, its CPU MoE
    if not default_path:
        # keep weights as graph inputs (torch.nn.functional.linear), as on GPUs and NPUs
        custom_ops._supports_onednn = False
        layer_utils.check_cpu_sgl_kernel = lambda *args, **kwargs: False

    moe = mode.startswith("moe-")
    prefetched: list[list[int]] = []
    if moe:
        if not default_path:
            _use_the_fused_moe_op()
        from fxprefetch import ops

        def record(weight, dependency, max_size, offset):  # a recording native prefetch
            rows = int(dependency.shape[0]) if dependency is not None else -1
            prefetched.append([weight.untyped_storage().data_ptr(), max_size, rows])

        ops.register_native_prefetch("cpu", record)
    folder = Path(tempfile.mkdtemp(prefix="fxprefetch-llama-"))
    model = TINY_QWEN3_MOE if default_path else TINY_MIXTRAL if moe else TINY_LLAMA
    (folder / "config.json").write_text(json.dumps(model))
    kwargs: dict = {
        "model": str(folder),
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "max_model_len": 128,
        "max_num_seqs": 4,
        "seed": 0,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.1,  # on the CPU: the share of memory kept for the KV cache
    }
    if mode == "flag":
        kwargs["additional_config"] = {"weight_prefetch_config": {"enabled": True}}
    elif mode == "explicit":
        kwargs["compilation_config"] = {
            "inductor_passes": {"post_grad_custom_post_pass": PASS_NAME}
        }
    elif mode in ("moe-flag", "moe-default"):
        kwargs["additional_config"] = json.loads(GUIDE_MOE_JSON)
    elif mode == "moe-bounded":
        kwargs["additional_config"] = BOUNDED_MOE
    elif mode == "bad":
        kwargs["additional_config"] = {
            "weight_prefetch_config": {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 1.5}}}
        }
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # the bad config must stop the engine here, with our message
        return {"startup_error": f"{type(exc).__name__}: {exc}"}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    prompts = PROMPTS + ([LONG_PROMPT] if mode.startswith("moe-") else [])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result: dict = {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    if moe:
        result["prefetched"] = prefetched
        result["w13"] = llm.apply_model(_w13_storages)[0]
    return result


def _use_the_fused_moe_op() -> None:
    """vLLM on the CPU calls its fused MoE's Python body, which dynamo traces into; on GPUs and
    NPUs it calls the opaque ``vllm::moe_forward`` op. Take the GPU route here too."""
    import torch
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    def select(self):
        if self._shared_experts is None:
            return torch.ops.vllm.moe_forward
        return torch.ops.vllm.moe_forward_shared

    moe_runner.MoERunner._select_forward = select


def _w13_storages(model) -> dict:
    """Each MoE layer's w13_weight: its storage address and bytes."""
    return {
        name: [p.untyped_storage().data_ptr(), p.numel() * p.element_size()]
        for name, p in model.named_parameters()
        if name.endswith("w13_weight")
    }


if __name__ == "__main__":
    result = units() if sys.argv[1] == "units" else serve(sys.argv[2])
    print("FXPREFETCH_RESULT " + json.dumps(result))
