"""What an L2 prefetch buys on an NVIDIA GPU: a micro-benchmark and Llama-3-8B-shaped layers.

(a) Micro: a window kernel keeps HBM idle for W µs, then a cuBLAS GEMV (bf16, M = 1 and 16)
reads a cold weight. Arms: ``none``; ``same`` (prefetch on the compute stream); ``side``
(fork to a side stream, prefetch, join before the GEMV); ``fork`` (the same fork/join around
an empty kernel: the fork's own cost); ``hot`` (the weight already in L2: the upper bound).
Cold weights rotate over R copies with R x size >= 4 x L2 (no zero-filled flush buffer,
whose dirty write-back would disturb the next kernel). Every arm is one CUDA graph of R
steps, arms interleaved, medians of per-step times.

(b) Layers: decode steps of Llama-3-8B-shaped layers (bf16, random weights, batch 1 and 16,
``mode="reduce-overhead"``, inputs and KV caches at static addresses),
``backend="npu_prefetch"`` against plain inductor, the ratio of medians, with the prefetch cap
swept (the device's default, ``"auto"``, fixed sizes). On a GPU each layer plans 4 prefetches
(qkv, o behind attention, gate/up, down behind SiLU-and-mul). One table per batch size puts
the measured speed-up beside the prediction model's (``fxprefetch.devices.prediction``).

Prints tables and writes JSON. Without a CUDA GPU it exits with one line. ``--smoke`` runs
a small subset in under 2 minutes; ``--check`` the subset ``gpu_check.sh`` runs; ``--only``
and ``--batch`` one part. Runs from the source tree: ``PYTHONPATH=. python
benchmarks/bench_gpu_prefetch.py``. Needs torch with CUDA and Triton (sm_80+).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree

from common import parser, table, write

MB = 1 << 20


# -- (a) micro-benchmark ------------------------------------------------------------------------


def _sleep_cycles_per_us() -> float:
    """Calibrate ``torch.cuda._sleep`` (a spin kernel: HBM idle) in a CUDA graph."""
    cycles = 1_000_000
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda._sleep(cycles)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)  # µs
    return cycles / statistics.median(times)


def _arm_graph(arm, weights, x, window_cycles, size, side, prefetch):
    """One CUDA graph: for each weight copy, [fork, prefetch] window [join] GEMV."""
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for w in weights:
            current = torch.cuda.current_stream()
            if arm == "same":
                prefetch(w, size, current)
            elif arm in ("side", "fork"):
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    if arm == "side":
                        prefetch(w, size, side)
                    else:
                        torch.cuda._sleep(1)  # an empty kernel: the fork/join cost alone
            if window_cycles:
                torch.cuda._sleep(window_cycles)
            if arm in ("side", "fork"):
                current.wait_stream(side)
            out = F.linear(x, w)
    return graph, out


def _replay_us(graph, steps) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/µs (read + write), median of a CUDA graph."""
    src = torch.empty(512 * MB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dst.copy_(src)
    us = statistics.median(_replay_us(graph, 1) for _ in range(5))
    return 2 * src.nbytes / us


def micro_goal(row: dict[str, Any], bytes_per_us: float) -> tuple[float, float]:
    """``(saved µs, bound µs)``: the side-stream arm's saving, and min(W, size / bandwidth)."""
    bound = min(row["window_us"], row["prefetch_mb"] * MB / bytes_per_us)
    return row["none"] - row["side"], bound


def micro(smoke: bool, check: bool = False) -> tuple[list[dict[str, Any]], float]:
    from fxprefetch.devices.cuda_prefetch import clamp_range, launch_prefetch

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = props.L2_cache_size
    side = torch.cuda.Stream()

    def prefetch(w, size, stream):
        start, nbytes = clamp_range(w.data_ptr(), w.nbytes, size, 0)
        with torch.cuda.stream(stream):
            launch_prefetch(start, nbytes, device)

    per_us = _sleep_cycles_per_us()
    bytes_per_us = copy_bandwidth(device)
    windows = [0, 4] if smoke else [0, 2, 4, 8] if check else [0, 1, 2, 4, 8]
    sizes = (
        [8 * MB]
        if smoke
        else [4 * MB, 8 * MB, 16 * MB]
        if check
        else [2 * MB, 4 * MB, 8 * MB, 16 * MB, 32 * MB]
    )
    batches = [1] if smoke else [1, 16]
    repeats = 5 if smoke else 11 if check else 21
    k = 4096
    weight_mb = 32
    copies = max(2, -(-4 * l2 // (weight_mb * MB)))
    weights = [
        torch.randn(weight_mb * MB // (2 * k), k, device=device, dtype=torch.bfloat16)
        for _ in range(copies)
    ]
    rows = []
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        F.linear(x, weights[0])  # cuBLAS handles and workspaces exist before any capture
        prefetch(weights[0], sizes[0], side)
        torch.cuda.synchronize()
        for window_us in windows:
            cycles = int(window_us * per_us)
            for size in sizes:
                graphs = {
                    arm: _arm_graph(arm, weights, x, cycles, size, side, prefetch)[0]
                    for arm in ("none", "same", "side", "fork")
                }
                graphs["hot"] = _arm_graph(
                    "none", [weights[0]] * copies, x, cycles, size, side, prefetch
                )[0]
                times: dict[str, list[float]] = {arm: [] for arm in graphs}
                for _ in range(repeats):  # interleaved
                    for arm, graph in graphs.items():
                        times[arm].append(_replay_us(graph, copies))
                med = {arm: statistics.median(v) for arm, v in times.items()}
                row = {"m": m, "window_us": window_us, "prefetch_mb": size // MB, **med}
                row["saved_us"], row["bound_us"] = micro_goal(row, bytes_per_us)
                rows.append(row)
    return rows, bytes_per_us


# -- (b) Llama-3-8B-shaped decode layers -------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (
            x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        ).to(x.dtype)


LLAMA3_8B = {"hidden": 4096, "inter": 14336, "heads": 32, "kv_heads": 8, "past": 512}


class DecoderLayer(nn.Module):
    """Llama-3-8B shapes with vLLM's fused names (qkv_proj, gate_up_proj): 436 MB in bf16."""

    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int, past: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.input_layernorm = RMSNorm(hidden)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.self_attn = nn.ModuleDict(
            {
                "qkv_proj": nn.Linear(hidden, (heads + 2 * kv_heads) * self.dim, bias=False),
                "o_proj": nn.Linear(hidden, hidden, bias=False),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(hidden, 2 * inter, bias=False),
                "down_proj": nn.Linear(inter, hidden, bias=False),
            }
        )

    def forward(self, x, k_cache, v_cache):
        b = x.shape[0]
        q, k, v = self.self_attn["qkv_proj"](self.input_layernorm(x)).split(
            [self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], -1
        )
        q = q.view(b, 1, self.heads, self.dim).transpose(1, 2)
        k = torch.cat([k_cache, k.view(b, 1, self.kv_heads, self.dim).transpose(1, 2)], 2)
        v = torch.cat([v_cache, v.view(b, 1, self.kv_heads, self.dim).transpose(1, 2)], 2)
        attn = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.self_attn["o_proj"](attn.transpose(1, 2).reshape(b, -1))
        gate, up = self.mlp["gate_up_proj"](self.post_attention_layernorm(x)).chunk(2, -1)
        return x + self.mlp["down_proj"](F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, layers: int, shapes: dict[str, int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**shapes) for _ in range(layers))

    def forward(self, x, caches):
        for layer, (k, v) in zip(self.layers, caches, strict=True):
            x = layer(x, k, v)
        return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_us(fn, steps: int, device: torch.device) -> float:
    """Mean µs per call over ``steps`` calls (CUDA events on a GPU, a clock elsewhere)."""
    if device.type != "cuda":
        start_s = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start_s) * 1e6 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def _variant_name(cap: int | str | None) -> str:
    if cap is None:
        return "prefetch, default cap"
    if cap == "auto":
        return "prefetch, auto"
    return f"prefetch {cap / MB:g} MB"


def layers(
    smoke: bool,
    *,
    device: str = "cuda",
    shapes: dict[str, int] = LLAMA3_8B,
    dtype: torch.dtype = torch.bfloat16,
    mode: str = "reduce-overhead",
    caps: list[int | str | None] | None = None,
    batches: list[int] | None = None,
    n_layers: int | None = None,
    defaults: bool = False,
) -> list[dict[str, Any]]:
    """Decode steps of the prefetch backend against plain inductor, per batch and cap, every
    planned prefetch emitted (``force_prefetch``: today's lowering as measured on 2026-11-30)
    (``None``: no ``max_prefetch_bytes`` written, the device's default cap; ``"auto"``: what
    each window hides on the device). Each prefetch variant's compiled plans carry the
    prediction model's saving (a model: ``fxprefetch.devices.prediction``), shown beside the
    measured one. Inputs and KV caches keep static addresses (no copies into a CUDA graph).
    ``defaults``: also the default arm, :data:`DEFAULT_ARM` (the backend with no option but
    the mode, which CUDA graphs need: what a user who only names the backend gets)."""
    import fxprefetch
    from fxprefetch.plan import predicted_saving

    dev = torch.device(device)
    n_layers = n_layers or (2 if smoke else 4)
    torch.manual_seed(0)
    model = Decoder(n_layers, shapes).to(device=dev, dtype=dtype).eval()
    if caps is None:
        caps = [None] if smoke else [None, "auto", 4 * MB, 8 * MB, 16 * MB, 32 * MB]
    kv, dim = shapes["kv_heads"], shapes["hidden"] // shapes["heads"]
    rows = []
    for batch in batches or ([1] if smoke else [1, 16]):
        torch._dynamo.reset()  # a fresh cache per batch: no recompile limit, no dynamic batch
        x = torch.randn(batch, shapes["hidden"], device=dev, dtype=dtype)
        caches = [
            tuple(
                torch.randn(batch, kv, shapes["past"], dim, device=dev, dtype=dtype) for _ in "kv"
            )
            for _ in range(n_layers)
        ]
        if dev.type == "cuda":  # replayed graphs read them in place, as vLLM's buffers
            for t in (x, *(c for pair in caches for c in pair)):
                torch._dynamo.mark_static_address(t)
        variants = {"inductor": torch.compile(model, backend="inductor", mode=mode)}
        if defaults:
            variants[DEFAULT_ARM] = torch.compile(
                model, backend="npu_prefetch", options={"mode": mode}
            )
        for cap in caps:
            options = {
                "target": "inductor",
                "mode": mode,  # torch.compile refuses mode= beside options=
                # every planned prefetch, as measured on 2026-11-30 (the default arm is the gate)
                "weight_prefetch_config": {"force_prefetch": True}
                | ({} if cap is None else {"max_prefetch_bytes": cap}),
            }
            variants[_variant_name(cap)] = torch.compile(
                model, backend="npu_prefetch", options=options
            )
        steps = 20 if smoke else 100
        times: dict[str, list[float]] = {name: [] for name in variants}
        per_step: dict[str, tuple[int, int]] = {}
        plans: dict[str, list] = {}
        with torch.no_grad():
            for name, fn in variants.items():
                fxprefetch.clear_plans()
                for _ in range(3):  # compile, warm up, capture
                    fn(x, caches)
                plans[name] = fxprefetch.last_plans()
                with fxprefetch.collect_stats() as ran:
                    fn(x, caches)
                _sync(dev)
                per_step[name] = (ran.calls, ran.bytes_prefetched)
            for _ in range(5 if smoke else 15):
                for name, fn in variants.items():
                    times[name].append(_step_us(functools.partial(fn, x, caches), steps, dev))
        base = statistics.median(times["inductor"])
        for name, values in times.items():
            med = statistics.median(values)
            calls, nbytes = per_step[name]
            predicted = predicted_saving(plans[name]) if name != "inductor" else None
            saved = predicted.per_step_us if predicted is not None else None
            rows.append(
                {
                    "batch": batch,
                    "variant": name,
                    "median_us": med,
                    "ratio": base / med,
                    "saved_us": base - med,
                    "prefetches_per_step": calls,
                    "prefetches_per_layer": calls / n_layers,
                    "prefetch_mb_per_step": nbytes / MB,
                    "predicted_saved_us": saved,
                    "predicted_ratio": base / (base - saved)
                    if saved is not None and base > saved
                    else None,
                    "predicted_device": predicted.device if predicted is not None else None,
                }
            )
    return rows


def layer_table(rows: list[dict[str, Any]], batch: int) -> str:
    """One batch size: measured and predicted speed-up side by side (predicted: the model's
    saving taken off the measured plain-inductor step)."""
    return table(
        ["variant", "µs/step", "speed-up", "predicted", "saved µs", "predicted µs",
         "prefetches/layer", "MB/step"],
        [
            [r["variant"], r["median_us"], r["ratio"],
             "-" if r["predicted_ratio"] is None else r["predicted_ratio"],
             r["saved_us"], "-" if r["predicted_saved_us"] is None else r["predicted_saved_us"],
             r["prefetches_per_layer"], r["prefetch_mb_per_step"]]
            for r in rows
            if r["batch"] == batch
        ],
    )  # fmt: skip


DEFAULT_ARM = "backend, no options"
GOALS = {
    "micro_saving_share_min": 0.7,
    "micro_window_us_min": 4,
    "layer_speedup_batch1_min": 1.04,
    "default_arm_min": 0.995,  # do no harm: the backend with no options against inductor
}


def goals_met(micro_rows: list[dict[str, Any]], layer_rows: list[dict[str, Any]]) -> dict:
    """The issue's two goals, read from the rows (None where the rows cannot tell)."""
    long_windows = [r for r in micro_rows if r["window_us"] >= GOALS["micro_window_us_min"]]
    shares = [r["saved_us"] / r["bound_us"] for r in long_windows if r["bound_us"] > 0]
    batch1 = [
        r["ratio"]
        for r in layer_rows
        if r["batch"] == 1 and r["variant"] not in ("inductor", DEFAULT_ARM)
    ]
    default = [r["ratio"] for r in layer_rows if r["variant"] == DEFAULT_ARM]
    return {
        "default_arm_worst": min(default) if default else None,
        "default_arm": min(default) >= GOALS["default_arm_min"] if default else None,
        "micro_worst_saving_share": min(shares) if shares else None,
        "micro": min(shares) >= GOALS["micro_saving_share_min"] if shares else None,
        "layer_best_speedup_batch1": max(batch1) if batch1 else None,
        "layers": max(batch1) >= GOALS["layer_speedup_batch1_min"] if batch1 else None,
    }


def _header() -> dict[str, Any]:
    from fxprefetch.devices.profiles import cuda_profile, default_cap

    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    print(
        f"{name}, L2 {props.L2_cache_size // MB} MB, torch {torch.__version__}, "
        f"default cap {default_cap(cuda_profile()) / MB:g} MB"
    )
    cap = default_cap(cuda_profile())
    return {"gpu": name, "l2_bytes": props.L2_cache_size, "default_cap_bytes": cap}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", choices=["micro", "layers"], help="run one part")
    p.add_argument(
        "--batch", type=int, action="append", help="layers: this batch size (repeatable)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="the subset benchmarks/gpu_check.sh runs: fewer sizes, caps default and auto",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_prefetch: no CUDA GPU here; nothing to measure")
        return
    from fxprefetch.devices.cuda_prefetch import register

    if not register():
        print("bench_gpu_prefetch: needs Triton and an sm_80+ GPU; nothing to measure")
        return
    header = _header()
    micro_rows: list[dict[str, Any]] = []
    bytes_per_us = None
    if args.only != "layers":
        micro_rows, bytes_per_us = micro(args.smoke, check=args.check)
        print(
            f"(a) micro-benchmark: µs per window + GEMV step (medians); copy bandwidth "
            f"{bytes_per_us / 1e6:.2f} TB/s; bound = min(W, size / bandwidth)"
        )
        print(
            table(
                ["M", "W µs", "prefetch MB", "none", "same", "side", "fork", "hot",
                 "saved µs", "bound µs", "saved/bound"],
                [
                    [r["m"], r["window_us"], r["prefetch_mb"], r["none"], r["same"], r["side"],
                     r["fork"], r["hot"], r["saved_us"], r["bound_us"],
                     r["saved_us"] / r["bound_us"] if r["bound_us"] else float("nan")]
                    for r in micro_rows
                ],
            )
        )  # fmt: skip
    layer_rows: list[dict[str, Any]] = []
    if args.only != "micro":
        caps = [None, "auto"] if args.check else None
        layer_rows = layers(args.smoke, caps=caps, batches=args.batch, defaults=args.check)
        print(
            "\n(b) Llama-3-8B-shaped decode layers, CUDA graphs; speed-up = inductor / variant; "
            "predicted = the model's saving (fxprefetch.devices.prediction, not a measurement) "
            "taken off the measured inductor step"
        )
        for batch in sorted({r["batch"] for r in layer_rows}):
            print(f"\nbatch {batch}")
            print(layer_table(layer_rows, batch))
    met = goals_met(micro_rows, layer_rows)
    print(
        f"\ngoal: micro saving >= {GOALS['micro_saving_share_min']:.0%} of the bound for W >= "
        f"{GOALS['micro_window_us_min']} µs: {met['micro']} (worst "
        f"{met['micro_worst_saving_share']}); layers >= {GOALS['layer_speedup_batch1_min']}x "
        f"at batch 1 (H100/H200): {met['layers']} (best {met['layer_best_speedup_batch1']}); "
        f"default arm ({DEFAULT_ARM}) >= {GOALS['default_arm_min']}x against inductor: "
        f"{met['default_arm']} (worst {met['default_arm_worst']})"
    )
    write(
        "gpu_prefetch",
        {
            **header,
            "copy_bytes_per_us": bytes_per_us,
            "micro": micro_rows,
            "layers": layer_rows,
            "smoke": args.smoke,
            "check": args.check,
            "goals": GOALS,
            "goals_met": met,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
