"""Lowerings of a dynamo graph once the pass has planned its prefetches.

- :mod:`.inductor`: ``compile_fx`` with the pass as ``post_grad_custom_post_pass`` (CPU/GPU);
- :mod:`.eager`: AOT autograd with the pass and no code generation (debugging, fastest);
- :mod:`.npu`: torchair's backend with the pass and the ``npu_prefetch`` lowering (Ascend).
"""
