"""Helpers the tests share: tracing, synthetic models, stand-ins for torch_npu's operators, the
real torchair / vLLM / vllm-ascend code the NPU and vLLM tests run, and the scripts those run
in vLLM's own environment. Imported as ``support.<module>`` (``tests/`` is on ``sys.path``)."""
