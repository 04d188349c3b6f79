"""Compile overhead: torch.compile wall time with the backend versus the same lowering
without the pass, in one process, alternating, as a ratio of medians.

- eager target vs AOT autograd with the same decompositions and no pass;
- inductor target vs plain ``backend="inductor"`` (FX graph cache off for both).

Goal: ratio <= 1.05.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table

from common import alternate, llama, median, parser, table, timed, write


def _plain_eager_backend():
    def compiler(gm, _inputs):
        return make_boxed_func(gm.forward)

    return aot_autograd(
        fw_compiler=compiler, inference_compiler=compiler, decompositions=select_decomp_table()
    )


def _compile_time(model: torch.nn.Module, backend, options=None) -> float:
    ids = torch.zeros(1, 16, dtype=torch.long)
    torch._dynamo.reset()
    kwargs = {"options": options} if options else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    with torch.no_grad():
        return timed(lambda: compiled(ids, use_cache=False))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cases = [("eager", 2, 1)] if args.smoke else [("eager", 8, 7), ("inductor", 2, 5)]
    rows = []
    with torch._inductor.config.patch(fx_graph_cache=False):
        for target, layers, repeats in cases:
            model = llama(layers)
            baseline = _plain_eager_backend() if target == "eager" else "inductor"
            _compile_time(model, baseline)  # warm-up both: imports, first-use caches
            _compile_time(model, "npu_prefetch", {"target": target})
            samples = alternate(
                {
                    "with_pass": lambda m=model, t=target: _compile_time(
                        m, "npu_prefetch", {"target": t}
                    ),
                    "without": lambda m=model, b=baseline: _compile_time(m, b),
                },
                repeats,
            )
            rows.append(
                {
                    "target": target,
                    "layers": layers,
                    "repeats": repeats,
                    "with_pass_s": median(samples["with_pass"]),
                    "without_s": median(samples["without"]),
                    "ratio": median(samples["with_pass"]) / median(samples["without"]),
                    "samples": samples,
                }
            )
    print(
        table(
            ["target", "layers", "repeats", "with pass s", "without s", "ratio"],
            [
                [
                    r["target"],
                    r["layers"],
                    r["repeats"],
                    r["with_pass_s"],
                    r["without_s"],
                    r["ratio"],
                ]
                for r in rows
            ],
        )
    )
    print("\ngoal: ratio <= 1.05")
    write("compile_overhead", {"rows": rows, "goals": {"ratio_max": 1.05}}, args.output)


if __name__ == "__main__":
    main()
