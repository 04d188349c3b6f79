"""What the vllm-ascend probes' tiny model plans and hands a captured graph, shared by the
tests of every release (``tests/vllm/test_vllm_ascend.py``, ``test_vllm_ascend_versions.py``)."""

from __future__ import annotations

QKV, GATE_UP = 96 * 32 * 4, 128 * 32 * 4  # prefetched bytes of each layer's qkv and gate/up
# the plan: [module, role, bytes] per prefetched linear, per layer
PLAN = [
    [f"layers.{i}.{module}", role, nbytes]
    for i in range(2)
    for module, role, nbytes in (("mlp.gate_up_proj", "mlp.gate_up", GATE_UP),
                                 ("self_attn.qkv_proj", "attn.qkv", QKV))
]  # fmt: skip
# the captured graph's prefetch nodes in order: each forked onto the prefetch stream
# (max_size, "side"), then its join before the linear (the side-stream lowering)
CAPTURED = [[[QKV, "side"], ["join"], [GATE_UP, "side"], ["join"]] * 2]
