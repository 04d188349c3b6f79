"""Memory: peak resident memory of compiling a 32-layer model with and without the pass.

Each measurement is a fresh process (peak RSS is per process), alternating with/without;
the ratio of medians is reported. Eager target vs AOT autograd with no pass.

Goal: ratio <= 1.05.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import median, parser, table, write

CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {here!r})
from common import llama
from bench_compile_overhead import _plain_eager_backend
layers, variant = int(sys.argv[1]), sys.argv[2]
model = llama(layers)
ids = torch.zeros(1, 16, dtype=torch.long)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if variant == "with_pass":
    compiled = torch.compile(model, backend="npu_prefetch", options={{"target": "eager"}})
else:
    compiled = torch.compile(model, backend=_plain_eager_backend())
with torch.no_grad():
    compiled(ids, use_cache=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"peak_kb": peak, "before_compile_kb": before}}))
"""


def _measure(layers: int, variant: str) -> dict:
    code = CHILD.format(here=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", code, str(layers), variant],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    layers, repeats = (2, 1) if args.smoke else (32, 3)
    samples: dict[str, list[dict]] = {"with_pass": [], "without": []}
    for _ in range(repeats):
        for variant, runs in samples.items():
            runs.append(_measure(layers, variant))
    peak = {v: median([s["peak_kb"] for s in xs]) for v, xs in samples.items()}
    growth = {
        v: median([s["peak_kb"] - s["before_compile_kb"] for s in xs]) for v, xs in samples.items()
    }
    ratio = peak["with_pass"] / peak["without"]
    print(
        table(
            ["variant", "median peak MiB", "median compile growth MiB", "runs"],
            [[v, peak[v] / 1024, growth[v] / 1024, repeats] for v in samples],
        )
    )
    print(f"\npeak RSS ratio: {ratio:.4f} (goal <= 1.05)")
    write(
        "memory",
        {
            "layers": layers,
            "repeats": repeats,
            "samples": samples,
            "ratio": ratio,
            "compile_growth_ratio": growth["with_pass"] / max(growth["without"], 1),
            "goals": {"ratio_max": 1.05},
        },
        args.output,
    )


if __name__ == "__main__":
    main()
