"""Pass cost and scaling.

1. The pass alone on aten graphs of Llama-3-8B-shaped models, 1 to 128 layers, traced with
   fake tensors on the meta device (size costs no memory): median time, time per node, and
   the fitted scaling exponent. The pass runs as inside inductor (no code regeneration);
   FX's own recompile of the same graph is reported beside it.
2. The pass's share of a whole ``torch.compile`` of a 32-layer model with
   ``backend="npu_prefetch"`` and the eager target.

Goals: exponent <= 1.1; share < 2%.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

import fxprefetch
from fxprefetch.passes import strip_prefetch
from fxprefetch.pipeline import run_weight_prefetch

from common import (
    alternate,
    fake_aten_graph,
    llama,
    llama_8b_shaped,
    loglog_slope,
    median,
    parser,
    table,
    timed,
    write,
)

CONFIG = fxprefetch.WeightPrefetchConfig(enabled=True)


def scaling(layer_counts: list[int], repeats: int) -> list[dict]:
    rows = []
    for layers in layer_counts:
        model = llama_8b_shaped(layers)
        gm, names = fake_aten_graph(model)
        nodes = len(gm.graph.nodes)

        def once(gm: torch.fx.GraphModule = gm, names: dict[str, str] = names) -> float:
            t = timed(lambda: run_weight_prefetch(gm, CONFIG, weight_names=names, recompile=False))
            strip_prefetch(gm)
            return t

        once()  # warm caches of op tags and schemas
        times = alternate({"pass": once, "recompile": lambda gm=gm: timed(gm.recompile)}, repeats)
        plan = run_weight_prefetch(gm, CONFIG, weight_names=names, recompile=False)
        rows.append(
            {
                "layers": layers,
                "nodes": nodes,
                "prefetches": len(plan.prefetched),
                "pass_s": median(times["pass"]),
                "recompile_s": median(times["recompile"]),
                "us_per_node": 1e6 * median(times["pass"]) / nodes,
            }
        )
    return rows


def compile_share(layers: int) -> dict:
    from fxprefetch.targets import TARGET_SPECS  # the registry the backend resolves targets in

    spent = []
    real = TARGET_SPECS["eager"]
    (planning,) = real.pipeline.passes

    def timed_pass(gm, ctx):
        start = time.perf_counter()
        try:
            return planning(gm, ctx)
        finally:
            spent.append(time.perf_counter() - start)

    timed_pipeline = real.pipeline.with_passes((replace(planning, run=timed_pass),))
    TARGET_SPECS["eager"] = replace(real, pipeline=timed_pipeline)
    try:
        model = llama(layers)
        ids = torch.zeros(1, 16, dtype=torch.long)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
        with torch.no_grad():
            total = timed(lambda: compiled(ids, use_cache=False))
    finally:
        TARGET_SPECS["eager"] = real
    return {
        "layers": layers,
        "compile_s": total,
        "pass_s": sum(spent),
        "share_percent": 100 * sum(spent) / total,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    counts = [1, 2] if args.smoke else [1, 2, 4, 8, 16, 32, 64, 128]
    repeats = 1 if args.smoke else 5
    rows = scaling(counts, repeats)
    print(
        table(
            ["layers", "nodes", "prefetches", "pass ms", "us/node", "FX recompile ms"],
            [
                [
                    r["layers"],
                    r["nodes"],
                    r["prefetches"],
                    1e3 * r["pass_s"],
                    r["us_per_node"],
                    1e3 * r["recompile_s"],
                ]
                for r in rows
            ],
        )
    )
    fit = [r for r in rows if r["layers"] >= 4] or rows
    exponent = loglog_slope([r["nodes"] for r in fit], [r["pass_s"] for r in fit])
    recompile_exponent = loglog_slope([r["nodes"] for r in fit], [r["recompile_s"] for r in fit])
    print(
        f"\nfitted exponent (pass time ~ nodes^k, layers >= 4): k = {exponent:.3f} "
        f"(goal <= 1.1); FX recompile: k = {recompile_exponent:.3f}"
    )
    share = compile_share(2 if args.smoke else 32)
    print(
        f"pass share of torch.compile ({share['layers']} layers, eager target): "
        f"{share['pass_s'] * 1e3:.1f} ms of {share['compile_s']:.2f} s = "
        f"{share['share_percent']:.2f}% (goal < 2%)"
    )
    write(
        "pass_scaling",
        {
            "rows": rows,
            "exponent": exponent,
            "recompile_exponent": recompile_exponent,
            "compile_share": share,
            "goals": {"exponent_max": 1.1, "share_percent_max": 2.0},
        },
        args.output,
    )


if __name__ == "__main__":
    main()
