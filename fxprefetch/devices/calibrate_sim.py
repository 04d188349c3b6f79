"""A simulated device with known constants, for ``fxprefetch calibrate`` on the CPU.

Nothing runs on hardware: each primitive adds its modelled µs to the replay it runs in, and
an L2 of ``l2_bytes`` (least recently used first out, whole buffers) decides what a linear
finds resident. Each replay's time is scaled by a factor drawn uniformly from
``[1 - jitter, 1 + jitter]`` (seeded), and the device's clock advances by the simulated time
plus a host cost per replay and per capture, so the budget logic is exercised on simulated
time. The constants are H200-like, from the 2026-11-30 H200 run
(``SIMULATED["h200"]``); a calibration must recover them.
"""

from __future__ import annotations

import platform
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fxprefetch.devices.calibrate import Facts

MB = 10**6
MiB = 1 << 20


@dataclass(frozen=True)
class SimConstants:
    """What the simulated device does (its ground truth)."""

    name: str
    kind: str
    l2_bytes: int
    cores: int
    read_bytes_per_s: float
    kernel_us: float
    delta_us_per_mb: dict[int, float]  # tokens -> µs saved per MB resident
    lowerings: dict[str, tuple[float, float]]  # name -> (fixed µs, µs per MB)
    linear_fixed_us: float = 2.0  # a cold linear: this plus its bytes at linear_bytes_per_s
    linear_bytes_per_s: float = 2.8e12
    jitter: float = 0.005  # each replay's time times U[1 - jitter, 1 + jitter]
    host_us: float = 40.0  # host time per replay (launch, events, synchronize)
    capture_us: float = 3000.0  # host time per capture
    time_scale: float = 1.0  # every kernel but the spin this many times slower (budget tests)


SIMULATED: dict[str, SimConstants] = {
    "h200": SimConstants(
        name="NVIDIA H200 (simulated)",
        kind="gpu",
        l2_bytes=60 * MiB,
        cores=132,
        read_bytes_per_s=3.9e12,
        kernel_us=1.3,
        delta_us_per_mb={1: 0.055, 16: 0.075},
        lowerings={"side_stream": (0.55, 0.13), "compute_stream": (0.30, 0.05)},
    )
}


@dataclass(eq=False)
class SimTensor:
    nbytes: int
    rows: int = 0  # an input's tokens


@dataclass
class SimGraph:
    body: Callable[[], None]


@dataclass
class SimulatedDevice:
    """:class:`fxprefetch.calibrate.Device` on simulated time."""

    constants: SimConstants
    seed: int = 0
    now_s: float = 0.0
    _elapsed_us: float = 0.0
    _l2: OrderedDict[int, int] = field(default_factory=OrderedDict)  # id -> resident bytes
    _tensors: dict[int, SimTensor] = field(default_factory=dict)
    replays: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def facts(self) -> Facts:
        c = self.constants
        lowerings = tuple(c.lowerings)
        return Facts(
            c.name, c.kind, "simulated", torch.__version__, "simulated",
            platform.node() or "unknown", c.l2_bytes, c.cores, lowerings,
        )  # fmt: skip

    def clock(self) -> float:
        return self.now_s

    def weight(self, nbytes: int, k: int) -> SimTensor:
        return SimTensor(nbytes // (2 * k) * 2 * k)

    def inputs(self, tokens: int, k: int) -> SimTensor:
        if tokens not in self.constants.delta_us_per_mb:
            raise ValueError(
                f"the simulated device models {list(self.constants.delta_us_per_mb)} tokens"
            )
        return SimTensor(tokens * k * 2, rows=tokens)

    # -- L2 ---------------------------------------------------------------------------------

    def _touch(self, t: SimTensor, nbytes: int) -> None:
        """``nbytes`` of ``t`` now resident, most recently used; the least recent leave."""
        key = id(t)
        self._tensors[key] = t
        self._l2.pop(key, None)
        if nbytes > self.constants.l2_bytes:
            return  # a buffer larger than L2 evicts its own head: nothing of it stays
        self._l2[key] = nbytes
        while sum(self._l2.values()) > self.constants.l2_bytes:
            self._l2.popitem(last=False)

    def _run(self, us: float) -> None:
        self._elapsed_us += us * self.constants.time_scale

    # -- primitives -------------------------------------------------------------------------

    def read(self, buffer: SimTensor) -> None:
        c = self.constants
        self._run(c.kernel_us + buffer.nbytes / (c.read_bytes_per_s / 1e6))
        self._touch(buffer, buffer.nbytes)

    def linear(self, x: SimTensor, weight: SimTensor) -> None:
        c = self.constants
        resident = self._l2.get(id(weight), 0) / weight.nbytes
        saved = c.delta_us_per_mb[x.rows] * weight.nbytes / MB * resident
        self._run(c.linear_fixed_us + weight.nbytes / (c.linear_bytes_per_s / 1e6) - saved)
        self._touch(weight, weight.nbytes)

    def small_kernel(self) -> None:
        self._run(self.constants.kernel_us)

    def spin(self, us: float) -> None:
        self._elapsed_us += us  # a requested duration: time_scale does not stretch it

    def prefetch(self, lowering: str, weight: SimTensor, nbytes: int) -> Callable[[], None]:
        fixed, per_mb = self.constants.lowerings[lowering]
        size = min(nbytes, weight.nbytes)

        def land() -> None:
            self._run(fixed + per_mb * size / MB)
            self._touch(weight, max(size, self._l2.get(id(weight), 0)))

        if lowering.endswith("side_stream"):
            return land  # the join waits for it
        land()
        return lambda: None

    # -- graphs and time --------------------------------------------------------------------

    def capture(self, body: Callable[[], None]) -> SimGraph:
        self._elapsed_us = 0.0
        body()  # the warm-up outside the capture
        self.now_s += (self._elapsed_us + self.constants.capture_us) / 1e6
        return SimGraph(body)

    def replay_us(self, graph: SimGraph, prime: SimGraph | None = None) -> float:
        if prime is not None:
            self.replay_us(prime)
        self._elapsed_us = 0.0
        graph.body()
        jitter = self.constants.jitter
        us = self._elapsed_us * (1 + self._random.uniform(-jitter, jitter))
        self.now_s += (us + self.constants.host_us) / 1e6
        self.replays += 1
        return us

    def release(self) -> None:
        live = set(self._l2)
        self._tensors = {k: v for k, v in self._tensors.items() if k in live}
