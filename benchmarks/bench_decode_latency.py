"""Runtime overhead where prefetch is only a hint (CPU): decode-step latency.

Batch 1, one new token per step, a small Llama (4 layers, hidden 256) with a static KV
cache, compiled with ``backend="npu_prefetch"`` (inductor target) versus plain inductor, on
one intra-op thread. Blocks of 10 steps alternate between the two, 60 blocks each; the ratio
of median per-step latencies is reported.

Goal: ratio <= 1.02.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import StaticCache

import fxprefetch

from common import llama, median, parser, table, write


def _decoder(model: torch.nn.Module, backend: str, options: dict | None, prompt: int, steps: int):
    """A compiled decode step over its own copy of the model and its own static cache.

    Each call decodes the next position; the cache has room for ``steps`` calls. Shapes are
    static, so positions change values, not graphs: no recompiles.
    """
    model = copy.deepcopy(model)
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 1)
    generator = torch.Generator().manual_seed(0)  # both variants see the same tokens
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=generator)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt))
    compiled = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator)
    positions = iter(range(prompt, prompt + steps))

    def step() -> torch.Tensor:
        position = torch.tensor([next(positions)])
        return compiled(
            token, past_key_values=cache, use_cache=True, cache_position=position
        ).logits

    with torch.no_grad():
        first = step()  # compiles
    return step, first


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    layers, steps, blocks = (1, 5, 2) if args.smoke else (4, 10, 60)
    # one intra-op thread: on a 2-core machine, OpenMP threads contending with anything else
    # make the noise larger than the effect being measured
    torch.set_num_threads(1)
    model = llama(layers)
    total = blocks * steps + 2  # every step of every block, the first step and the count
    with torch._inductor.config.patch(fx_graph_cache=False):
        built = {
            "npu_prefetch": _decoder(model, "npu_prefetch", {"target": "inductor"}, 32, total),
            "inductor": _decoder(model, "inductor", None, 32, total),
        }
    # same tokens, same cache state: the prefetch hints must not change a single logit
    torch.testing.assert_close(built["npu_prefetch"][1], built["inductor"][1], rtol=0, atol=0)
    variants = {name: step for name, (step, _) in built.items()}
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(blocks):
            for name, step in variants.items():
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                per_step[name].append((time.perf_counter() - start) / steps)
        with fxprefetch.collect_stats() as ran:
            variants["npu_prefetch"]()
    ratio = median(per_step["npu_prefetch"]) / median(per_step["inductor"])
    print(
        table(
            ["variant", "median step ms", "min step ms", "blocks x steps"],
            [
                [n, 1e3 * median(v), 1e3 * min(v), f"{blocks} x {steps}"]
                for n, v in per_step.items()
            ],
        )
    )
    print(
        f"\nratio of medians: {ratio:.4f} (goal <= 1.02); per step: {ran.hints} planned hints "
        f"counted at the graph call, {ran.calls} prefetch kernel calls"
    )
    write(
        "decode_latency",
        {
            "layers": layers,
            "steps_per_block": steps,
            "blocks": blocks,
            "per_step_s": per_step,
            "ratio": ratio,
            "planned_hints_per_step": ran.hints,
            "kernel_calls_per_step": ran.calls,
            "goals": {"ratio_max": 1.02},
        },
        args.output,
    )


if __name__ == "__main__":
    main()
