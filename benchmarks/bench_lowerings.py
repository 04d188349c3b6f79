"""Which lowering of an L2 prefetch pays on a decode layer: side stream, compute stream, or
fused into the window's own kernel.

Two decoders, hand-built from the same kernels in every arm: the window kernels of
``fused_prefetch.py`` (RMSNorm with the residual add, SiLU-and-mul; Triton), cuBLAS linears,
torch's SDPA over a static KV cache, all replayed as CUDA graphs:

- ``dense``: 4 Llama-3-8B layers at batch 1 (windows of a few µs);
- ``tp4``: 8 layers shaped as one rank of 4-way tensor parallelism, with an all-reduce
  stand-in of ``--ar-us`` µs (15; a spin kernel, memory idle) after o_proj and after
  down_proj: the long windows.

Arms, each prefetching qkv, o, gate/up and down of every layer, ``min(weight, cap)`` bytes
(the cap a compile on this GPU uses, ``fxprefetch.devices.profiles.default_cap``):

- ``base``: no prefetch;
- ``side``: fxprefetch's side stream (``cuda_prefetch.fork`` before the window, ``join``
  before the linear): today's lowering;
- ``compute``: fxprefetch's compute-stream launch before the window, no join;
- ``fused``: the window kernel's extra programs prefetch (no extra node, no fork/join). o's
  window is attention (torch's SDPA): the fused arm prefetches o on the compute stream.

In ``tp4``, gate/up and the next layer's qkv are prefetched at the start of the all-reduce
stand-in before them (``fused``: by the spin kernel's extra programs); the last layer's
stand-in prefetches layer 0's qkv for the next step.

Timing: per arm one CUDA graph of a decode step; rounds interleave the arms, their order
reversed every other round; a round times ``--reps`` replays per arm between events. Speed-up
= base / arm, paired per round, reported as median and quartiles. Every arm's output is
compared bit-exactly with the base arm's, and with the same step run with the windows in
torch (relative error at most ``REFERENCE_TOLERANCE``: the Triton windows compute the layer).

Predicted: the plan fxprefetch makes for a torch module of the same shapes and caps
(``fxprefetch.explain`` on the meta device, with ``--device-profile``: the file ``fxprefetch
calibrate`` wrote, or a built-in profile name), per step: the sum of its records' predicted
µs, taken off the measured base step. The plan models the side-stream lowering in the plan's
own windows: it has no fused lowering, and no all-reduce stand-in in the tp4 module.

Decision: a lowering whose tp4 speed-up has median >= 1.02x and p25 > 1 becomes the GPU
default for long windows; otherwise the default stays off.

    PYTHONPATH=. python benchmarks/bench_lowerings.py [--device-profile FILE] [--output F]
    python benchmarks/bench_lowerings.py --dry-run   # CPU: tiny shapes, torch windows

``--dry-run`` runs every arm of both decoders on the CPU (tiny shapes, the windows in torch,
the prefetches counted, plain calls timed by the clock: meaningless times), checks the outputs,
reads the plan's predictions, prints the decision from those rows, and compile-checks the
fused kernels for sm_90 where Triton is installed.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fused_prefetch as fp  # noqa: I001 (both from benchmarks/, on sys.path above)
from common import parser, table, write

MB, MiB = 10**6, 1 << 20
ARMS = ("base", "side", "compute", "fused")
GOAL = 1.02  # a lowering at or above this on long windows becomes the GPU default there
DENSE = {"hidden": 4096, "inter": 14336, "heads": 32, "kv_heads": 8, "dim": 128, "past": 512}
TP4 = {"hidden": 4096, "inter": 3584, "heads": 8, "kv_heads": 2, "dim": 128, "past": 512}
TINY = {"hidden": 64, "inter": 128, "heads": 4, "kv_heads": 2, "dim": 16, "past": 8}


# -- the torch module the plan is made for -----------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        v = x.float()
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + fp.EPS) * self.weight).to(x.dtype)


class Layer(nn.Module):
    """A decoder layer with vLLM's fused names and explicit head counts (one TP rank)."""

    def __init__(self, hidden, inter, heads, kv_heads, dim, past) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.input_layernorm = RMSNorm(hidden)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.self_attn = nn.ModuleDict(
            {
                "qkv_proj": nn.Linear(hidden, (heads + 2 * kv_heads) * dim, bias=False),
                "o_proj": nn.Linear(heads * dim, hidden, bias=False),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(hidden, 2 * inter, bias=False),
                "down_proj": nn.Linear(inter, hidden, bias=False),
            }
        )

    def forward(self, x, k_cache, v_cache):
        b, d = x.shape[0], self.dim
        q, k, v = self.self_attn["qkv_proj"](self.input_layernorm(x)).split(
            [self.heads * d, self.kv_heads * d, self.kv_heads * d], -1
        )
        q = q.view(b, self.heads, 1, d)
        k = torch.cat([k_cache, k.view(b, self.kv_heads, 1, d)], 2)
        v = torch.cat([v_cache, v.view(b, self.kv_heads, 1, d)], 2)
        attn = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.self_attn["o_proj"](attn.reshape(b, -1))
        gate, up = self.mlp["gate_up_proj"](self.post_attention_layernorm(x)).chunk(2, -1)
        return x + self.mlp["down_proj"](F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, layers: int, shapes: dict[str, int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(**shapes) for _ in range(layers))

    def forward(self, x, caches):
        for layer, (k, v) in zip(self.layers, caches, strict=True):
            x = layer(x, k, v)
        return x


def plan_prediction(
    shapes: dict[str, int], layers: int, batch: int, cap: int, profile: str
) -> dict[str, Any]:
    """The plan of :class:`Decoder` at these shapes and this cap on ``profile`` (a file or a
    name): predicted µs per step (each record's prediction, emitted or skipped: the arms here
    emit them all), prefetches and the profile used. Where the plan does not take a file, the
    built-in profile of the file's device is used, and ``profile_used`` says so."""
    import fxprefetch

    model = Decoder(layers, shapes).to(device="meta", dtype=torch.bfloat16)
    x = torch.empty(batch, shapes["hidden"], device="meta", dtype=torch.bfloat16)
    cache = (batch, shapes["kv_heads"], shapes["past"], shapes["dim"])
    caches = [
        tuple(torch.empty(cache, device="meta", dtype=torch.bfloat16) for _ in "kv")
        for _ in range(layers)
    ]
    config = {"max_prefetch_bytes": cap}
    used = profile
    try:
        plans = fxprefetch.explain(model, x, caches, config=config, device_profile=profile)
    except (KeyError, ValueError, TypeError) as exc:  # a file the plan cannot read yet
        used = _builtin_for(profile)
        if used is None:
            raise
        plans = fxprefetch.explain(model, x, caches, config=config, device_profile=used)
        used = f"{used} (the plan did not take {profile}: {type(exc).__name__})"
    records = [r for p in plans for r in p.records if getattr(r, "prediction", None) is not None]
    return {
        "profile_used": used,
        "predicted_us_per_step": sum(r.prediction.hidden_us for r in records) if records else None,
        "planned_prefetches": len(records),
        "roles": sorted({r.role for r in records}),
    }


def _builtin_for(profile: str) -> str | None:
    """The built-in profile of a profile file's device (``NVIDIA H200`` -> ``h200``)."""
    import json

    from fxprefetch.devices.profile_catalog import match_profile

    try:
        data = json.loads(Path(profile).read_text())
    except (OSError, ValueError):
        return None
    found = match_profile(str(data.get("device", {}).get("name", "")))
    return found.name if found is not None else None


# -- the hand-built decode step --------------------------------------------------------------


class Ops:
    """The step's kernels and prefetches: CUDA (Triton windows, fxprefetch's prefetches) or,
    with ``cuda=False``, torch windows and counted prefetches (the dry run)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.prefetches: dict[str, int] = {arm: 0 for arm in ARMS}  # counted at capture
        self.prefetched_bytes: dict[str, int] = {arm: 0 for arm in ARMS}
        self.open_forks = 0
        if cuda:
            from fxprefetch.devices import cuda_prefetch

            self.cp = cuda_prefetch
            self.sms = torch.cuda.get_device_properties(0).multi_processor_count
            cuda_prefetch.prepare(torch.device("cuda"))

    def slot(
        self, arm: str, weight: torch.Tensor, nbytes: int, via: str | None = None
    ) -> tuple[fp.Extra, Callable]:
        """Issue ``arm``'s prefetch before a window (lowered ``via`` another arm's way where
        given): the window kernel's extra programs (fused), and the join to call before the
        linear."""
        nbytes = min(nbytes, weight.nbytes)
        if arm == "base" or nbytes <= 0:
            return fp.NONE, lambda: None
        self.prefetches[arm] += 1
        self.prefetched_bytes[arm] += nbytes
        arm = via or arm
        if arm == "fused":
            if not self.cuda:
                return fp.Extra(weight.data_ptr(), nbytes, nbytes, 1), lambda: None
            return fp.extra_programs(weight.data_ptr(), nbytes, self.sms), lambda: None
        if arm == "side":
            self.open_forks += 1
            if self.cuda:
                self.cp.fork(weight, nbytes)

            def join() -> None:
                self.open_forks -= 1
                if self.cuda:
                    self.cp.join(weight)

            return fp.NONE, join
        if self.cuda:  # compute
            self.cp.prefetch_on_compute_stream(weight, nbytes)
        return fp.NONE, lambda: None

    def norm(self, x, res, w, extra: fp.Extra):
        y = torch.empty_like(x)
        resid = torch.empty_like(x) if res is not None else x
        if not self.cuda:
            fp.torch_window("rmsnorm", x, res, w, y, resid)
            return y, resid
        b, h = x.shape
        fp.launch(
            "rmsnorm", b, extra, x, x if res is None else res, w, y, resid, b,
            hidden=h, res_add=res is not None,
        )  # fmt: skip
        return y, resid

    def silu_mul(self, gu, extra: fp.Extra):
        b, inter = gu.shape[0], gu.shape[1] // 2
        y = torch.empty(b, inter, dtype=gu.dtype, device=gu.device)
        if not self.cuda:
            fp.torch_window("silu_mul", gu, y)
            return y
        blk = 512
        fp.launch("silu_mul", b * (inter // blk), extra, gu, y, b, inter=inter, blk=blk)
        return y

    def spin(self, us: float, extra: fp.Extra) -> None:
        if self.cuda:
            fp.launch("spin", 1, extra, int(us * 1000))


@dataclass
class Weights:
    n1: torch.Tensor
    n2: torch.Tensor
    wqkv: torch.Tensor
    wo: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor


def build(shapes, layers, batch, device, dtype, seed=0) -> tuple[list[Weights], dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, i, nq, nkv, d = (shapes[k] for k in ("hidden", "inter", "heads", "kv_heads", "dim"))

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ws = [
        Weights(
            rnd(h, scale=1).abs() + 0.5,
            rnd(h, scale=1).abs() + 0.5,
            rnd((nq + 2 * nkv) * d, h),
            rnd(h, nq * d),
            rnd(2 * i, h),
            rnd(h, i),
        )
        for _ in range(layers)
    ]
    length = shapes["past"] + 1  # the past and this step's slot
    state = {
        "x": rnd(batch, h, scale=1),
        "kv": [tuple(rnd(batch, nkv, length, d, scale=1) for _ in "kv") for _ in ws],
        "out": torch.empty(batch, h, device=device, dtype=dtype),
    }
    return ws, state


def decode_step(ops: Ops, ws: list[Weights], state: dict, arm: str, cap: int, ar_us: float):
    """One decode step of ``arm``; ``ar_us`` > 0: the tp4 decoder's all-reduce stand-ins."""
    x, res, pending = state["x"], None, None  # pending: the next qkv's (extra, join) in tp4
    for i, layer in enumerate(ws):
        nxt = ws[(i + 1) % len(ws)]
        b = x.shape[0]
        if ar_us and i == 0:  # the last layer's stand-in prefetched it, the step before
            extra, join = fp.NONE, lambda: None
        else:
            extra, join = pending or ops.slot(arm, layer.wqkv, cap)
        h, resid = ops.norm(x, res, layer.n1, extra if pending is None else fp.NONE)
        pending = None
        join()
        qkv = F.linear(h, layer.wqkv)
        nkv, length, d = state["kv"][i][0].shape[1:]
        nq = qkv.shape[1] // d - 2 * nkv
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], -1)
        kc, vc = state["kv"][i]
        kc[:, :, length - 1].copy_(k.view(b, nkv, d))
        vc[:, :, length - 1].copy_(v.view(b, nkv, d))
        _, join = ops.slot(arm, layer.wo, cap, via="compute" if arm == "fused" else None)
        attn = F.scaled_dot_product_attention(q.view(b, nq, 1, d), kc, vc, enable_gqa=True)
        join()
        o = F.linear(attn.reshape(b, nq * d), layer.wo)
        extra, join = ops.slot(arm, layer.wgu, cap)
        if ar_us:
            ops.spin(ar_us, extra)
            extra = fp.NONE
        h2, resid2 = ops.norm(o, resid, layer.n2, extra)
        join()
        gu = F.linear(h2, layer.wgu)
        extra, join = ops.slot(arm, layer.wd, cap)
        s = ops.silu_mul(gu, extra)
        join()
        x, res = F.linear(s, layer.wd), resid2
        if ar_us:
            extra, join = ops.slot(arm, nxt.wqkv, cap)
            ops.spin(ar_us, extra)
            if i + 1 < len(ws):
                pending = (fp.NONE, join)
            else:  # layer 0's qkv for the next step: joined now, no fork left open
                join()
    state["out"].copy_(x + res)


# -- timing -----------------------------------------------------------------------------------


def quartiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"med": statistics.median(ordered), "p25": q[0], "p75": q[2], "n": len(ordered)}


def measure(
    ops: Ops, ws, state, cap: int, ar_us: float, rounds: int, reps: int, deadline: float
) -> tuple[dict[str, list[float]], dict[str, bool], dict[str, tuple[int, int]]]:
    """µs per step of every arm per round, whether each arm's output equals base's bit for
    bit, and each arm's (prefetches, bytes) per step. ``state["out"]`` ends as the last arm's
    output."""
    runs: dict[str, Callable[[], None]] = {}
    outputs: dict[str, torch.Tensor] = {}
    counts: dict[str, tuple[int, int]] = {}
    for arm in ARMS:

        def step(arm: str = arm) -> None:
            decode_step(ops, ws, state, arm, cap, ar_us)

        if ops.cuda:
            step()  # warm-up: Triton compiles, cuBLAS handles
            torch.cuda.synchronize()
        before = ops.prefetches[arm], ops.prefetched_bytes[arm]
        if ops.cuda:  # the capture is the step the counts come from
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            runs[arm] = graph.replay
        else:
            step()
            runs[arm] = step
        assert ops.open_forks == 0, f"{arm}: a fork left unjoined"
        counts[arm] = (ops.prefetches[arm] - before[0], ops.prefetched_bytes[arm] - before[1])
        runs[arm]()
        outputs[arm] = state["out"].clone()
    same = {arm: bool(torch.equal(outputs[arm], outputs["base"])) for arm in ARMS}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        if r >= 3 and time.monotonic() > deadline:
            break
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            times[arm].append(_time(runs[arm], reps, ops.cuda) / reps)
    return times, same, counts


def _time(run: Callable[[], None], reps: int, cuda: bool) -> float:
    if not cuda:
        start = time.perf_counter()
        for _ in range(reps):
            run()
        return (time.perf_counter() - start) * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


REFERENCE_TOLERANCE = 0.05  # bf16 through 4 or 8 layers: rounding, never a wrong index


def reference_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    ref = reference.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def rows_for(config, times, same, counts, layers, prediction) -> list[dict[str, Any]]:
    base = times["base"]
    base_med = statistics.median(base)
    rows = []
    for arm in ARMS:
        predicted = prediction["predicted_us_per_step"] if arm != "base" else None
        calls, nbytes = counts[arm]
        rows.append(
            {
                "config": config,
                "arm": arm,
                "us_per_step": quartiles(times[arm]),
                "speedup": quartiles([b / a for b, a in zip(base, times[arm], strict=True)]),
                "same_output": same[arm],
                "prefetches_per_layer": calls / layers,
                "prefetch_mb_per_layer": nbytes / layers / MB,
                "predicted_saved_us": predicted,
                "predicted_ratio": base_med / (base_med - predicted)
                if predicted is not None and base_med > predicted
                else None,
                "predicted_by": prediction["profile_used"],
            }
        )
    return rows


def decision(rows: list[dict[str, Any]]) -> str:
    """The issue's rule on the long-window (tp4) rows."""
    long = [r for r in rows if r["config"].startswith("tp4") and r["arm"] != "base"]
    if not long:
        return "decision: no long-window rows measured: undecided"
    best = max(long, key=lambda r: r["speedup"]["med"])
    s = best["speedup"]
    passed = [r["arm"] for r in long if r["speedup"]["med"] >= GOAL and r["speedup"]["p25"] > 1.0]
    if passed:
        return (
            f"decision: {', '.join(passed)} measured >= {GOAL}x on long windows (best "
            f"{best['arm']} {s['med']:.4f}x, p25 {s['p25']:.4f}): make it the GPU default there"
        )
    return (
        f"decision: no lowering reaches {GOAL}x on long windows (best {best['arm']} "
        f"{s['med']:.4f}x, p25 {s['p25']:.4f}): the GPU default stays off"
    )


def render(rows: list[dict[str, Any]]) -> str:
    return table(
        ["config", "arm", "µs/step", "p25", "p75", "speed-up", "p25", "p75", "predicted",
         "same bits", "prefetches/layer", "MB/layer"],
        [
            [r["config"], r["arm"], r["us_per_step"]["med"], r["us_per_step"]["p25"],
             r["us_per_step"]["p75"], r["speedup"]["med"], r["speedup"]["p25"],
             r["speedup"]["p75"],
             "-" if r["predicted_ratio"] is None else r["predicted_ratio"],
             r["same_output"], r["prefetches_per_layer"], r["prefetch_mb_per_layer"]]
            for r in rows
        ],
    )  # fmt: skip


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, torch windows")
    p.add_argument("--device-profile", help="the profile file of fxprefetch calibrate, or a name")
    p.add_argument("--only", choices=["dense", "tp4"], help="one decoder")
    p.add_argument("--ar-us", type=float, default=15.0, help="all-reduce stand-in, µs")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--reps", type=int, default=20, help="replays per arm per round")
    p.add_argument("--budget", type=float, default=100.0, help="seconds of timing rounds")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("bench_lowerings: no CUDA GPU here; nothing to measure (--dry-run: the CPU form)")
        return 0
    header: dict[str, Any] = {"dry_run": not cuda}
    if not cuda:
        try:
            header["sm90_compile"] = fp.compile_check(90)
            print("sm_90 compile:", " ".join(header["sm90_compile"]))
        except ImportError as exc:
            header["sm90_compile"] = f"skipped: {exc}"
            print("sm_90 compile check skipped:", exc)
    if cuda:
        from fxprefetch.devices.profile_catalog import match_profile
        from fxprefetch.devices.profiles import cuda_profile, default_cap

        cap, device, dtype = default_cap(cuda_profile()), "cuda", torch.bfloat16
        found = match_profile(torch.cuda.get_device_name())
        profile = args.device_profile or (found.name if found else "h100")
        configs = [("dense-b1", DENSE, 4, 0.0), ("tp4-b1", TP4, 8, args.ar_us)]
        header["gpu"] = torch.cuda.get_device_name()
    else:
        cap, device, dtype = 4096, "cpu", torch.float32
        profile = args.device_profile or "h200"
        configs = [("dense-b1", TINY, 2, 0.0), ("tp4-b1", TINY, 2, args.ar_us)]
        args.rounds, args.reps = min(args.rounds, 3), 1
    if args.only:
        configs = [c for c in configs if c[0].startswith(args.only)]
    ops = Ops(cuda)
    rows: list[dict[str, Any]] = []
    bad_reference: list[str] = []
    deadline = time.monotonic() + args.budget
    for config, shapes, layers, ar_us in configs:
        prediction = plan_prediction(shapes, layers, 1, cap, profile)
        ws, state = build(shapes, layers, 1, device, dtype)
        share = (deadline - time.monotonic()) / (len(configs) - len(rows) // len(ARMS))
        times, same, counts = measure(
            ops, ws, state, cap, ar_us, args.rounds, args.reps, time.monotonic() + share
        )
        base_out = state["out"].clone()  # the last arm's, equal to base's where same[...]
        decode_step(Ops(cuda=False), ws, state, "base", cap, ar_us)  # the windows in torch
        err = reference_error(base_out, state["out"])
        print(f"{config}: the arms' output against the same step in torch: max rel err {err:.3g}")
        if err > REFERENCE_TOLERANCE:
            bad_reference.append(config)
        for row in rows_for(config, times, same, counts, layers, prediction):
            rows.append({**row, "reference_rel_err": err})
        del ws, state
        if cuda:
            torch.cuda.empty_cache()
    print(
        f"decode layers, batch 1, cap {cap / MiB:g} MiB; speed-up = base / arm, paired per "
        f"round; predicted: the plan's saving ({rows[0]['predicted_by'] if rows else '-'}; a "
        "model, side-stream lowering, the plan's own windows) off the measured base step"
        + ("" if cuda else " [dry run: CPU times, meaningless]")
    )
    print(render(rows))
    verdict = decision(rows)
    if not cuda:  # the rule ran on CPU times: say so on the line that carries it
        verdict = verdict.replace("decision: ", "decision: [dry run, CPU times mean nothing] ", 1)
    print(verdict)
    bad = [f"{r['config']}/{r['arm']}" for r in rows if not r["same_output"]]
    if bad:
        print(f"outputs differ from base: {', '.join(bad)}")
    if bad_reference:
        print(f"outputs off the torch step by more than {REFERENCE_TOLERANCE}: {bad_reference}")
        bad += bad_reference
    write(
        "lowerings",
        {**header, "cap_bytes": cap, "rows": rows, "decision": verdict,
         "goals": {"long_window_speedup_min": GOAL}},
        args.output,
    )  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
