"""Read the order of events in inductor's generated ``call()``: forks, vector kernels, joins,
GEMMs and other extern calls, so tests can check what the scheduler really emitted.

Device-independent: CPU kernels are ``cpp_fused_*(...)``, CUDA kernels ``triton_*.run(...)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FORK = re.compile(r"torch\.ops\.fxprefetch\.prefetch(?:_native)?\.default\((\w+)")
_JOIN = re.compile(r"torch\.ops\.fxprefetch\.prefetch_join\.default\((\w+)")
_KERNEL = re.compile(r"^\s*(cpp_fused_\w+)\(|^\s*(triton_\w+)\.run\(")
_GEMM = re.compile(r"extern_kernels\.(?:mm|addmm|bmm|baddbmm)\(|aten\.(?:mm|addmm|bmm)\.default\(")
_EXTERN = re.compile(r"torch\.ops\.\w+\.\w+\.default\(|extern_kernels\.\w+\(")
_ARG = re.compile(r"\barg\d+_1\b|\bprimals_\d+\b")
_BUF = re.compile(r"\bbuf\d+\b")


@dataclass(frozen=True)
class Event:
    kind: str  # "fork" | "join" | "kernel" | "gemm" | "extern"
    name: str  # the weight argument (fork/join), the kernel name, or the line
    reads: frozenset[str] = frozenset()  # graph inputs the call reads
    bufs: frozenset[str] = frozenset()  # buffers the call names


def emitted_events(code: str) -> list[Event]:
    """The events of the ``call()`` function of one generated module, in emitted order."""
    body = code[code.index("def call(") :]
    events: list[Event] = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        reads = frozenset(_ARG.findall(stripped))
        bufs = frozenset(_BUF.findall(stripped))
        if m := _FORK.search(stripped):
            events.append(Event("fork", m.group(1), reads, bufs))
        elif m := _JOIN.search(stripped):
            events.append(Event("join", m.group(1), reads, bufs))
        elif m := _KERNEL.search(line):
            events.append(Event("kernel", m.group(1) or m.group(2), reads, bufs))
        elif _GEMM.search(stripped):
            events.append(Event("gemm", stripped, reads, bufs))
        elif _EXTERN.search(stripped):
            events.append(Event("extern", stripped, reads, bufs))
        if stripped.startswith("return "):
            break
    return events


def check_fork_window_join_gemm(events: list[Event]) -> int:
    """Assert, for every fork of a weight:

    - no vector kernel sits between the previous barrier (a GEMM, an extern call, another
      fork or join, or the graph start) and the fork, except the one computing the fork's
      dependency (a buffer the fork names): none was moved ahead of it;
    - its join follows, with window work in between (a vector kernel, or the extern call of
      an attention window) and nothing reading the weight;
    - the first reader of the weight after the join is a GEMM, with no kernel between join
      and GEMM that computes the GEMM's input (the window's tail is not left after the join).

    Every join closes a fork. Returns the number of forks."""
    forks = [i for i, e in enumerate(events) if e.kind == "fork"]
    for i in forks:
        weight = events[i].name
        join = next(
            (
                j
                for j in range(i + 1, len(events))
                if events[j].kind == "join" and events[j].name == weight
            ),
            None,
        )
        assert join is not None, f"fork of {weight}: no join"
        between = events[i + 1 : join]
        work = [e for e in between if e.kind in ("kernel", "extern")]
        assert work, f"{weight}: empty window {between}"
        assert all(weight not in e.reads for e in between), f"{weight} read before its join"
        gemm = next(k for k in range(join + 1, len(events)) if weight in events[k].reads)
        assert events[gemm].kind == "gemm", f"{weight}: first reader after the join: {events[gemm]}"
        # a kernel computing the GEMM's input (it names a buffer the GEMM reads) is the
        # window's tail; unrelated work scheduled there is not
        tail = [
            e.name
            for e in events[join + 1 : gemm]
            if e.kind == "kernel" and e.bufs & events[gemm].bufs
        ]
        assert not tail, f"{weight}: {tail} emitted between the join and the GEMM"
        barrier = max((k for k in range(i) if events[k].kind != "kernel"), default=-1)
        ahead = [
            e.name
            for e in events[barrier + 1 : i]
            if e.kind == "kernel" and not e.bufs & events[i].bufs
        ]
        assert not ahead, f"{weight}: {ahead} emitted ahead of the fork"
    joins = sorted(e.name for e in events if e.kind == "join")
    assert joins == sorted(events[i].name for i in forks), "forks and joins do not pair up"
    return len(forks)
