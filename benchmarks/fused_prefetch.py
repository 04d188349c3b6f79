"""Window kernels that prefetch the next weight themselves: benchmark code for
``bench_lowerings.py`` (the ``fused`` arm: no extra graph node, no fork/join).

Each kernel is an ordinary decode window (RMSNorm with the residual add, SiLU-and-mul, or a
spin standing in for an all-reduce) launched with extra programs: programs past the window's
own work each issue ``cp.async.bulk.prefetch.L2`` (the instruction fxprefetch's own kernel
uses on sm_90, ``fxprefetch.cuda_prefetch``) over their share of the next weight, one
instruction per lane. With no extra program (``pf=False``) the kernels are the window alone:
the ``base``, ``side`` and ``compute`` arms launch the same kernels, so every arm computes the
same bits. :func:`torch_window` holds the same math in torch for the CPU (dry run, reference).

``compile_check()`` compiles every kernel for sm_90 without a GPU (Triton ships ptxas) and
checks that the PTX holds the prefetch instruction where ``PF`` is on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

MAX_BULK = (1 << 20) - 16  # bytes one cp.async.bulk.prefetch encodes (fxprefetch.cuda_prefetch)
WARPS = 4
LANES = 32 * WARPS  # one bulk instruction per lane: a lane per thread
BYTES_PER_PROGRAM = 256 << 10  # the least an extra program prefetches before another is added
EPS = 1e-5


@dataclass(frozen=True)
class Extra:
    """The extra programs of one fused prefetch: ``programs`` of ``per_program`` bytes."""

    address: int
    nbytes: int
    per_program: int
    programs: int


NONE = Extra(0, 0, 0, 0)


def extra_programs(address: int, nbytes: int, sms: int) -> Extra:
    """Programs (at most one per SM, each at least :data:`BYTES_PER_PROGRAM`) covering
    ``nbytes`` from the 16-byte aligned ``address``; each lane's share a multiple of 16."""
    nbytes = nbytes // 16 * 16
    if nbytes <= 0:
        return NONE
    if address % 16:
        raise ValueError(f"fused prefetch: address {address:#x} is not 16-byte aligned")
    programs = min(sms, max(1, -(-nbytes // BYTES_PER_PROGRAM)))
    unit = LANES * 16
    per = -(-nbytes // (programs * unit)) * unit
    if per // LANES > MAX_BULK:
        raise ValueError(f"fused prefetch: {per // LANES} B per lane > {MAX_BULK} B")
    return Extra(address, nbytes, per, -(-nbytes // per))


@functools.cache
def kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch(pid, address, nbytes, per_program, lanes: tl.constexpr):
        per_lane = per_program // lanes
        first = pid.to(tl.int64) * per_program + tl.arange(0, lanes).to(tl.int64) * per_lane
        left = tl.maximum(tl.minimum(nbytes - first, per_lane), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], "
            "$2; mov.u32 $0, 0; }",
            "=r,l,r", [address + first, left], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip

    @triton.jit(do_not_specialize=["rows", "address", "nbytes", "per_program"])
    def rmsnorm(
        x, res, w, y, res_out, rows, address, nbytes, per_program,
        hidden: tl.constexpr, res_add: tl.constexpr, pf: tl.constexpr, lanes: tl.constexpr,
    ):  # fmt: skip
        """y = rmsnorm(x (+ res)) * w; res_out = x + res (bf16)."""
        pid = tl.program_id(0)
        if pid < rows:
            o = tl.arange(0, hidden)
            v = tl.load(x + pid * hidden + o).to(tl.float32)
            if res_add:
                v = (v + tl.load(res + pid * hidden + o).to(tl.float32)).to(tl.bfloat16)
                tl.store(res_out + pid * hidden + o, v)
                v = v.to(tl.float32)
            rs = tl.rsqrt(tl.sum(v * v, 0) / hidden + 1e-5)
            w_ = tl.load(w + o).to(tl.float32)
            tl.store(y + pid * hidden + o, (v * rs * w_).to(tl.bfloat16))
        elif pf:
            _prefetch(pid - rows, address, nbytes, per_program, lanes)

    @triton.jit(do_not_specialize=["rows", "address", "nbytes", "per_program"])
    def silu_mul(
        gu, y, rows, address, nbytes, per_program,
        inter: tl.constexpr, blk: tl.constexpr, pf: tl.constexpr, lanes: tl.constexpr,
    ):  # fmt: skip
        """y = silu(gate) * up, gate and up the halves of each row of gu."""
        pid = tl.program_id(0)
        blocks = inter // blk
        if pid < rows * blocks:
            b = pid // blocks
            c = (pid % blocks) * blk + tl.arange(0, blk)
            g = tl.load(gu + b * 2 * inter + c).to(tl.float32)
            u = tl.load(gu + b * 2 * inter + inter + c).to(tl.float32)
            tl.store(y + b * inter + c, (g / (1 + tl.exp(-g)) * u).to(tl.bfloat16))
        elif pf:
            _prefetch(pid - rows * blocks, address, nbytes, per_program, lanes)

    @triton.jit
    def _now(x):
        return tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1
        )

    @triton.jit(do_not_specialize=["ns", "address", "nbytes", "per_program"])
    def spin(ns, address, nbytes, per_program, pf: tl.constexpr, lanes: tl.constexpr):
        """Program 0 spins ``ns`` ns on the global timer (memory idle: an all-reduce's
        stand-in); the others prefetch."""
        pid = tl.program_id(0)
        if pid == 0:
            t0 = _now(pid)
            t = t0
            while t - t0 < ns:
                t = _now(pid)
        elif pf:
            _prefetch(pid - 1, address, nbytes, per_program, lanes)

    return {"rmsnorm": rmsnorm, "silu_mul": silu_mul, "spin": spin}


def launch(name: str, work: int, extra: Extra, *args: Any, **constexprs: Any) -> None:
    """Launch kernel ``name``: ``work`` programs of window work, then ``extra``'s programs."""
    kernels()[name][(work + extra.programs,)](
        *args, extra.address, extra.nbytes, extra.per_program,
        pf=extra.programs > 0, lanes=LANES, num_warps=WARPS, **constexprs,
    )  # fmt: skip


def torch_window(name: str, *args: Any) -> None:
    """The same math as kernel ``name`` in torch (no prefetch): the CPU's window kernels."""
    if name == "rmsnorm":
        x, res, w, y, res_out = args
        v = x.float()
        if res is not None:
            v = (v + res.float()).to(res_out.dtype)
            res_out.copy_(v)
            v = v.float()
        y.copy_((v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(y.dtype))
    elif name == "silu_mul":
        gu, y = args
        half = gu.shape[-1] // 2
        g, u = gu[:, :half].float(), gu[:, half:].float()
        y.copy_((g / (1 + torch.exp(-g)) * u).to(y.dtype))
    else:
        raise ValueError(f"no torch form of window kernel {name!r}")


def compile_check(capability: int = 90) -> list[str]:
    """Compile every kernel with and without its extra programs for ``sm_<capability>`` (no
    GPU needed); one ``name/pf=...: ok`` line each, ``MISSING`` where a prefetching build
    lacks the prefetch instruction."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k, p, i = kernels(), "*bf16", "i32"
    pf = {"address": "i64", "nbytes": i, "per_program": i}
    specs = {
        "rmsnorm": (
            {"x": p, "res": p, "w": p, "y": p, "res_out": p, "rows": i, **pf},
            {"hidden": 4096, "res_add": True},
        ),
        "silu_mul": ({"gu": p, "y": p, "rows": i, **pf}, {"inter": 3584, "blk": 512}),
        "spin": ({"ns": i, **pf}, {}),
    }
    lines = []
    for name, (signature, fixed) in specs.items():
        for on in (False, True):
            constexprs = {**fixed, "pf": on, "lanes": LANES}
            sig = {**signature, **{c: "constexpr" for c in constexprs}}
            ptx = triton.compile(
                ASTSource(fn=k[name], signature=sig, constexprs=constexprs),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": WARPS},
            ).asm["ptx"]
            found = "cp.async.bulk.prefetch.L2.global" in ptx
            lines.append(f"{name}/pf={on}: " + ("ok" if found == on else "MISSING"))
    return lines
