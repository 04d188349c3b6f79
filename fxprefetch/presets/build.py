"""Building a preset or a user's ``config.json`` into a causal LM with random weights.

Tiny presets are built on the CPU in float32; real-size presets (and config files) on the meta
device, so no weight memory is used. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fxprefetch.errors import ModelError
from fxprefetch.presets.catalog import PRESETS
from fxprefetch.validation import load_json


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(
            "model presets need Hugging Face transformers: pip install 'fxprefetch[hf]'"
        ) from exc
    return transformers


# config.json fields that must be positive integers when present
_INT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "moe_intermediate_size",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
)


# of those, the ones a model cannot be built with at 0 (they divide, or size every layer)
_POSITIVE_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
)


def _check_config_fields(data: dict[str, Any], path: Path) -> None:
    """Types and values a config.json must get right before transformers sees it."""
    import torch

    for name in _INT_FIELDS:
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelError(f"{path}: {name} must be an integer, got {value!r}")
        if isinstance(value, int) and value < 0:
            raise ModelError(f"{path}: {name} must not be negative, got {value}")
        if name in _POSITIVE_FIELDS and value == 0:
            raise ModelError(f"{path}: {name} must be at least 1, got 0")
    heads, kv_heads = data.get("num_attention_heads"), data.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ModelError(
            f"{path}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    for name in ("torch_dtype", "dtype"):
        value = data.get(name)
        if value is None or value == "auto":
            continue
        if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
            raise ModelError(
                f"{path}: {name} must name a torch dtype (e.g. 'bfloat16'), got {value!r}"
            )


def load_config(name_or_path: str, layers: int | None = None) -> Any:
    """A transformers config from a preset name or a local ``config.json`` path."""
    transformers = _transformers()
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        config = getattr(transformers, preset.architecture)(**preset.kwargs)
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelError(
                f"unknown model {name_or_path!r}: expected a preset "
                f"({', '.join(PRESETS)}) or a path to a config.json"
            )
        try:
            data = load_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON, or too deep
            raise ModelError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict) or "model_type" not in data:
            raise ModelError(f"{path}: not a Hugging Face config.json (no 'model_type')")
        _check_config_fields(data, path)
        if data["model_type"] not in transformers.CONFIG_MAPPING:
            raise ModelError(f"{path}: unsupported model_type {data['model_type']!r}")
        try:
            config = transformers.AutoConfig.for_model(**data)
        except Exception as exc:  # transformers' validation, e.g. heads that do not divide
            cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
            raise ModelError(f"{path}: {cause}") from exc
        causal = transformers.AutoModelForCausalLM._model_mapping
        if type(config) not in causal:
            raise ModelError(
                f"{path}: model_type {data['model_type']!r} is not a causal language model "
                "(transformers has no AutoModelForCausalLM class for it)"
            )
        if config.num_hidden_layers < 1:
            raise ModelError(
                f"{path}: num_hidden_layers must be at least 1, got {config.num_hidden_layers}"
            )
    if layers is not None:
        if layers < 1:
            raise ModelError(f"--layers must be at least 1, got {layers}")
        config.num_hidden_layers = min(layers, config.num_hidden_layers)
    return config


def build_model(
    name_or_path: str,
    *,
    layers: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Build a causal LM with random weights.

    Tiny presets default to float32 on the CPU; real-size presets to bf16 on the meta device.
    ``attn_implementation`` is passed to transformers (``"eager"`` for graphs without SDPA).
    """
    transformers = _transformers()
    config = load_config(name_or_path, layers)
    preset = PRESETS.get(name_or_path)
    if device is None:
        device = "cpu" if preset is not None and preset.tiny else "meta"
    if dtype is None:
        # tiny presets: float32; real sizes: bf16; a config.json: the dtype it names, else bf16
        named = getattr(config, "dtype", None) if preset is None else None
        named = getattr(torch, named) if isinstance(named, str) else named
        dtype = (
            torch.float32
            if preset is not None and preset.tiny
            else (named if isinstance(named, torch.dtype) else torch.bfloat16)
        )
    torch.manual_seed(seed)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    except Exception as exc:
        if preset is not None:  # our own shapes: a bug, not the user's input
            raise
        raise _build_error(name_or_path, config, exc) from exc
    return model.eval()


def _build_error(name_or_path: str, config: Any, exc: Exception) -> ModelError:
    """A one-line usage error for a user's config.json that transformers could not build."""
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        key = exc.args[0]  # a lookup of a config value, e.g. ACT2FN[config.hidden_act]
        field = next(_fields_holding(config.to_dict(), key), None)
        if field is not None:
            what = "an activation" if "act" in field.rsplit(".", 1)[-1] else "a value"
            return ModelError(f"{name_or_path}: {field} {key!r} is not {what} transformers knows")
    return ModelError(
        f"{name_or_path}: transformers cannot build a model from it: {type(exc).__name__}: {exc}"
    )


def example_inputs(model: torch.nn.Module, tokens: int = 8, batch: int = 1) -> dict[str, Any]:
    """Keyword inputs for one forward pass of ``model`` (a prefill of ``tokens`` tokens)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    if device.type == "meta":  # no memory: a meta model reads only the shape
        return {
            "input_ids": torch.empty(batch, tokens, dtype=torch.long, device="meta"),
            "use_cache": False,
        }
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    return {"input_ids": ids.to(device), "use_cache": False}


def _fields_holding(data: dict[str, Any], value: str, prefix: str = "") -> Iterator[str]:
    """Dotted names of the (nested) config fields whose value is ``value``."""
    for name, held in data.items():
        if held == value and isinstance(held, str):
            yield prefix + name
        elif isinstance(held, dict):
            yield from _fields_holding(held, value, f"{prefix}{name}.")
