"""Run a function on N ranks of a real torch.distributed process group (gloo, loopback).

Every rank has a deadline; a rank that fails or hangs makes the whole run fail quickly, and
every child is terminated on the way out.
"""

from __future__ import annotations

import importlib
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: str, results: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=90),
        )
        module, name = target.split(":")
        out = getattr(importlib.import_module(module), name)(rank, world)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: str, world: int = 2, timeout: float = 300.0) -> list[Any]:
    """Run ``module:function(rank, world)`` on ``world`` ranks; returns each rank's result."""
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, target, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world)) - set(outputs))} did not "
                    f"finish within {timeout:.0f}s"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 5.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs]
                if dead and results.empty():
                    raise RuntimeError(f"rank(s) {dead} exited without a result") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = payload
        return [outputs[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
