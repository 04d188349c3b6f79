"""``fxprefetch demo``: compile a tiny preset with ``backend="npu_prefetch"``, show its plan,
run it and compare with eager."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fxprefetch.options import parse_options
from fxprefetch.plan.render import render_table
from fxprefetch.planner import clear_plans, last_plans
from fxprefetch.presets import build_model, example_inputs
from fxprefetch.runtime_stats import collect_stats
from fxprefetch.targets import resolve_target

DEFAULT_DEMO_MODEL = "llama-tiny"


@dataclass(frozen=True)
class DemoResult:
    """What the demo shows (``text``) and whether it held up: outputs equal eager's and every
    planned prefetch was counted at run time."""

    text: str
    passed: bool


def run_demo(
    model_name: str = DEFAULT_DEMO_MODEL, options: Mapping[str, Any] | None = None
) -> DemoResult:
    """Compile ``model_name`` (a tiny preset) with the backend ``options``, run it twice (the
    second run counted) and compare its logits with eager's."""
    options = dict(options or {})
    parse_options(options)  # validate before compiling
    model = build_model(model_name)
    inputs = example_inputs(model)
    clear_plans()
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
    with torch.no_grad():
        expected = model(**inputs).logits
        out = compiled(**inputs).logits  # compiles
        with collect_stats() as ran:
            out = compiled(**inputs).logits
    plans = last_plans()
    diff = (out - expected).abs().max().item()
    match = torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    planned = sum(len(p.prefetched) for p in plans)
    lines = [
        f'{model_name} compiled with torch.compile(backend="npu_prefetch"), target '
        f"{resolve_target(options.get('target', 'auto'))}:\n",
        render_table(plans),
        f"\noutputs match eager: {'yes' if match else 'NO'} (max abs difference {diff:.2e})",
        f"prefetches planned per forward: {planned}",
        f"  reached the prefetch kernel: {ran.calls} ({ran.bytes_requested} bytes requested)",
    ]
    if ran.hints:
        lines.append(
            f"  planned hints counted per graph call: {ran.hints} ({ran.hint_bytes} bytes); "
            "no kernel ran: on this device a prefetch is only a hint, so the compiled code "
            "leaves them out"
        )
    return DemoResult("\n".join(lines), match and ran.calls + ran.hints == planned)
