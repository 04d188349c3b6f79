"""Probe the CUDA L2 prefetch kernel on one GPU: what one prefetch costs, and what it saves.

For sizes from 16 B to 32 MiB, inside CUDA graphs (as the prefetch runs under
``reduce-overhead`` or vLLM), two measurements per row:

- ``cost_us``: replay time per prefetch of a graph of ``REPEAT`` prefetches, minus the same
  graph without them (the prefetch's own cost on the stream that issues it);
- ``saved_us`` (sizes >= 64 KiB): a graph that evicts L2, prefetches, spins for a window of
  ``size / bandwidth`` and then reads the bytes, against the same graph without the prefetch
  (positive: the read found the bytes in L2).

Swept: warps per program and bytes per program (the launch, compute stream, no hint), then
both lowerings (``side``: fork onto a side stream and join; ``compute``: fire-and-forget on
the compute stream) with and without the ``evict_last`` cache hint, at the default launch.

    python benchmarks/probe_gpu_kernel.py --out results/probe.json [--smoke]

Each row is written to the JSON file as soon as it is measured (a timeout keeps what ran) and
printed as a table line. Without a GPU it prints what it would run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, uninstalled

KiB, MiB = 1 << 10, 1 << 20
SIZES = [16, 256, 4 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB]
SMOKE_SIZES = [16, 64 * KiB, 4 * MiB, 32 * MiB]
WARPS = [1, 2, 4, 8]
BYTES_PER_PROGRAM = [16 * KiB, 64 * KiB, 256 * KiB, MiB]
LOWERINGS = ["side", "compute"]
HINTS = ["none", "evict_last"]
# The instruction: ``bulk`` (cp.async.bulk.prefetch.L2, the library's sm_90 default),
# ``line`` (prefetch.global.L2, one per 128-byte line) and ``load`` (four volatile 4-byte
# loads per line, one per 32-byte sector: the data surely reach L2, at the cost of the lanes).
INSTRUCTIONS = ["bulk", "line", "load"]
_LOAD_ASM = (
    "{ .reg .pred p; .reg .b32 t<4>; setp.gt.s32 p, $2, 0; "
    "@p ld.volatile.global.b32 t0, [$1]; @p ld.volatile.global.b32 t1, [$1+32]; "
    "@p ld.volatile.global.b32 t2, [$1+64]; @p ld.volatile.global.b32 t3, [$1+96]; "
    "mov.u32 $0, 0; }"
)
REPEAT = 16  # prefetches per graph for cost_us
COLUMNS = (
    "part",
    "size",
    "instruction",
    "lowering",
    "hint",
    "warps",
    "per_program",
    "grid",
    "cost_us",
    "saved_us",
)


def plan(smoke: bool) -> list[dict[str, Any]]:
    """Every row the probe measures, in order."""
    sizes = SMOKE_SIZES if smoke else SIZES
    warps = [1, 4] if smoke else WARPS
    chunks = [64 * KiB, MiB] if smoke else BYTES_PER_PROGRAM
    # What the prefetch saves comes first: the instruction, the lowering and the hint.
    rows = [
        {"part": "lowering", "size": s, "instruction": i, "lowering": lo, "hint": h,
         "warps": None, "per_program": None}
        for s in sizes for i in INSTRUCTIONS for lo in LOWERINGS for h in HINTS
        if not (i == "load" and h != "none")
    ]  # fmt: skip
    rows += [
        {"part": "launch", "size": s, "instruction": "bulk", "lowering": "compute",
         "hint": "none", "warps": w, "per_program": c}
        for s in sizes for w in warps for c in chunks
    ]  # fmt: skip
    return rows


class Probe:
    """The buffers, streams and calibration of one device."""

    def __init__(self, device: torch.device) -> None:
        from fxprefetch.devices import cuda_prefetch

        self.cp = cuda_prefetch
        self.device = device
        props = torch.cuda.get_device_properties(device)
        self.l2 = props.L2_cache_size
        self.weight = torch.empty(max(SIZES) + 4 * KiB, dtype=torch.uint8, device=device)
        self.weight.fill_(1)
        self.flush = torch.empty(4 * self.l2, dtype=torch.uint8, device=device)
        self.side = torch.cuda.Stream(device)
        self.bytes_per_us = self._read_bandwidth()
        self.cycles_per_us = self._sleep_cycles_per_us()

    def _time(self, graph: torch.cuda.CUDAGraph, repeats: int = 7) -> float:
        """Median µs per replay."""
        graph.replay()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def _graph(self, body: Any) -> torch.cuda.CUDAGraph:
        body()  # warm-up outside the capture (compiles the kernel variant)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    def _read_bandwidth(self) -> float:
        """Bytes/µs of a read of 32 MiB after L2 was evicted."""
        data = self.weight[: 32 * MiB]
        out = torch.empty((), dtype=torch.int64, device=self.device)

        def evict_and_read() -> None:
            self.flush.zero_()
            torch.sum(data, dim=0, dtype=torch.int64, out=out)

        def evict() -> None:
            self.flush.zero_()

        us = self._time(self._graph(evict_and_read)) - self._time(self._graph(evict))
        return data.numel() / max(us, 1e-3)

    def _sleep_cycles_per_us(self) -> float:
        cycles = 1_000_000
        return cycles / self._time(self._graph(lambda: torch.cuda._sleep(cycles)))

    def prefetch(self, row: dict[str, Any]) -> Any:
        """One prefetch of ``row``'s size, lowering, hint and launch (None: the defaults)."""
        start, size = self.cp.clamp_range(
            self.weight.data_ptr(), self.weight.nbytes, row["size"], 0
        )
        if row["lowering"] == "compute":
            return self._launch(row, start, size)
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            launch = self._launch(row, start, size)
        current.wait_stream(self.side)
        return launch

    def _launch(self, row: dict[str, Any], start: int, size: int) -> Any:
        """The library's launch for ``bulk``; the same kernel with another instruction else."""
        instruction = row.get("instruction", "bulk")
        if instruction == "bulk":
            return self.cp.launch_prefetch(
                start, size, self.device, cache_hint=row["hint"], num_warps=row["warps"],
                bytes_per_program=row["per_program"],
            )  # fmt: skip
        if size <= 0:
            return None
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        launch = self.cp.launch_params(size, False, sms, row["warps"], row["per_program"])
        asm = _LOAD_ASM if instruction == "load" else self.cp._ASM[False, row["hint"]]
        self.cp.kernel()[(launch.grid,)](
            start, size, launch.per_lane, launch.steps, lanes=launch.lanes, bulk=False,
            asm=asm, num_warps=launch.num_warps,
        )  # fmt: skip
        return launch

    def cost_us(self, row: dict[str, Any]) -> tuple[float, int]:
        launches = []

        def body() -> None:
            for _ in range(REPEAT):
                launches.append(self.prefetch(row))

        with_prefetch = self._time(self._graph(body))
        empty = self._time(self._graph(lambda: torch.cuda._sleep(1)))
        launch = launches[-1]
        return (with_prefetch - empty) / REPEAT, launch.grid if launch else 0

    def saved_us(self, row: dict[str, Any]) -> float | None:
        size = row["size"]
        if size < 64 * KiB:
            return None
        data = self.weight[:size]
        out = torch.empty((), dtype=torch.int64, device=self.device)
        window = max(1, round(size / self.bytes_per_us * self.cycles_per_us))

        def body(prefetch: bool) -> None:
            self.flush.zero_()
            if prefetch:
                self.prefetch(row)
            torch.cuda._sleep(window)
            torch.sum(data, dim=0, dtype=torch.int64, out=out)

        return self._time(self._graph(lambda: body(False))) - self._time(
            self._graph(lambda: body(True))
        )


def _machine() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def _line(values: Any) -> str:
    return "  ".join(f"{'-' if v is None else v!s:>10}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--smoke", action="store_true", help="a small subset")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop after this long")
    args = parser.parse_args(argv)
    rows = plan(args.smoke)
    if not torch.cuda.is_available():
        print(
            f"probe_gpu_kernel: no CUDA GPU here; on one it would time {len(rows)} prefetch "
            f"variants (sizes {SIZES[0]} B - {SIZES[-1] // MiB} MiB, warps {WARPS}, bytes per "
            f"program {[c // KiB for c in BYTES_PER_PROGRAM]} KiB, lowerings {LOWERINGS}, "
            f"cache hints {HINTS}) and write them to {args.out}"
        )
        return 0
    from fxprefetch.devices.cuda_prefetch import register

    if not register():
        print("probe_gpu_kernel: needs Triton and an sm_80+ GPU; nothing to measure")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    probe = Probe(torch.device("cuda", 0))
    result: dict[str, Any] = {
        "machine": _machine(),
        "read_bytes_per_us": probe.bytes_per_us,
        "rows": [],
        "complete": False,
    }
    _write(args.out, result)
    print(result["machine"], f"read bandwidth {probe.bytes_per_us / 1e6:.2f} TB/s")
    print(_line(COLUMNS))
    for row in rows:
        if time.monotonic() - began > args.budget_s:
            result["stopped"] = f"budget of {args.budget_s:g} s spent"
            print(f"probe_gpu_kernel: {result['stopped']}; {len(result['rows'])} rows measured")
            break
        try:
            cost, grid = probe.cost_us(row)
            saved = probe.saved_us(row)
            measured = {**row, "grid": grid, "cost_us": round(cost, 3),
                        "saved_us": None if saved is None else round(saved, 3)}  # fmt: skip
        except Exception as exc:  # keep going: one failing variant must not lose the rest
            measured = {**row, "error": f"{type(exc).__name__}: {exc}"}
        result["rows"].append(measured)
        _write(args.out, result)
        print(_line(measured.get(c, measured.get("error") if c == "cost_us" else None)
                    for c in COLUMNS))  # fmt: skip
    else:
        result["complete"] = True
        _write(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
