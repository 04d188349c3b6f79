"""Shared helpers for the benchmarks: models, tracing, timing, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="smallest sizes, one repeat (for tests)")
    p.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    return p


def llama(layers: int, hidden: int = 256, device: str = "cpu") -> torch.nn.Module:
    """A Llama-shaped transformers model with random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def llama_8b_shaped(layers: int) -> torch.nn.Module:
    """Llama-3-8B shapes with any number of layers (even more than 32), on the meta device."""
    import transformers

    from fxprefetch.presets import PRESETS

    config = transformers.LlamaConfig(
        **{**PRESETS["llama-3-8b"].kwargs, "num_hidden_layers": layers}
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def fake_aten_graph(
    model: torch.nn.Module, tokens: int = 16
) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """The model's aten graph traced with fake tensors (no compute, no weight memory)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    state = dict(model.named_parameters()) | dict(model.named_buffers())
    device = next(model.parameters()).device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)

    def call(params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, (ids,), {"use_cache": False}).logits

    gm = make_fx(
        call,
        tracing_mode="fake",
        record_module_stack=True,
        decomposition_table=select_decomp_table(),
    )(state, ids)
    placeholders = gm.graph.find_nodes(op="placeholder")
    return gm, {p.name: n for p, n in zip(placeholders, state, strict=False)}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each variant ``repeats`` times, interleaved (A B A B ...), so drift hits both."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(fn())
    return samples


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares exponent k of y ~ x**k."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [
        [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import os

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write(name: str, data: dict[str, Any], output: Path | None) -> Path:
    path = output or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **data}, indent=2))
    print(f"\nwrote {path}")
    return path
