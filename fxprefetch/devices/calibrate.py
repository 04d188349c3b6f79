"""Measure the prediction model's constants on the device at hand (``fxprefetch calibrate``).

Every timing is a graph (a CUDA graph, or an NPU graph) replayed between two device events.
Arms are interleaved, their order reversed every other round, and each difference is paired
per round; a constant is the median over rounds, reported with its quartiles. The device is
the small :class:`Device` interface, so a simulated device with known constants
(``fxprefetch.devices.calibrate_sim``) drives this same code on the CPU.

Parts, in order:

- ``kernel``: a small kernel's time in a replayed graph (``N`` tiny kernels, time / ``N``).
- ``read``: streaming read bandwidth, the slope of a read kernel's time over two buffer
  sizes of 4x and 8x L2 (the slope leaves the launch out).
- ``delta``: δ, µs saved per MB resident in L2, on the device's own linear at 1 and 16
  tokens: cold (rotating over copies that cover >= 4x L2) against hot (one copy of at most
  40% of L2, repeated, read once before the timed replay), ``(cold - hot) / MB``.
- ``lowerings``: per lowering and per weight size (2 or more), ``[prefetch the whole
  weight] window [join] linear`` against the hot arm with the same window; the window lasts
  the prefetch's read time plus :data:`WINDOW_SLACK_US`. ``cost(size) = arm - hot`` (what
  the prefetch costs beyond the saving it lands), and ``c_fixed + β · MB`` is the
  least-squares line through the sizes' medians.

The budget (:data:`BUDGET_S`, under 2 minutes with start-up) is enforced by sizing the rounds:
each arm is replayed once to estimate a round, and :func:`plan_rounds` fits the rounds into
the part's share of what is left; a round is never started past the deadline.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MB = 10**6  # the model's MB (fxprefetch.devices.prediction)
MiB = 1 << 20
K = 4096  # the linear's input features: a Llama-sized hidden dimension
TOKENS = (1, 16)
BUDGET_S = 100.0  # measuring budget; with start-up and writing it stays under 2 minutes
MIN_BUDGET_S, MAX_BUDGET_S = 10.0, 110.0
MIN_ROUNDS, MAX_ROUNDS = 5, 61
HOST_US_PER_REPLAY = 60.0  # launch, events and the synchronize of one timed replay (estimate)
SMALL_KERNELS = 64  # tiny kernels per graph in the ``kernel`` part
HOT_SHARE = 0.4  # the hot copy: at most this share of L2
COLD_COVER = 4  # cold copies cover at least this many L2s
WINDOW_SLACK_US = 2.0  # the lowering window: the prefetch's read time plus this
MARGIN_US = 0.5  # the default margin: not measured here
SHARES = {"kernel": 0.05, "read": 0.10, "delta": 0.35, "lowerings": 0.50}


class CalibrationError(RuntimeError):
    """The device cannot be calibrated (no device, too small, a measurement unusable)."""


@dataclass(frozen=True)
class Facts:
    """The device as it reports itself (the profile's ``device`` block and its spec values)."""

    name: str
    kind: str  # "gpu" or "npu"
    driver: str
    torch: str
    runtime: str
    machine: str
    l2_bytes: int
    cores: int
    lowerings: tuple[str, ...]  # the lowering names the profile's ``lowerings`` block takes


class Device(Protocol):
    """What calibration needs of a device. Handles (weights, inputs, buffers) are opaque."""

    def facts(self) -> Facts: ...

    def clock(self) -> float:
        """Seconds, monotonic (the simulated device's is simulated)."""
        ...

    def weight(self, nbytes: int, k: int) -> Any:
        """A ``[nbytes / (2 k), k]`` bf16 weight."""
        ...

    def inputs(self, tokens: int, k: int) -> Any: ...

    def read(self, buffer: Any) -> None:
        """A streaming read of the whole buffer (one kernel)."""
        ...

    def linear(self, x: Any, weight: Any) -> None: ...

    def small_kernel(self) -> None: ...

    def spin(self, us: float) -> None:
        """Keep the compute stream busy, memory idle, for ``us`` µs."""
        ...

    def prefetch(self, lowering: str, weight: Any, nbytes: int) -> Callable[[], None]:
        """Issue a prefetch of ``nbytes`` of ``weight`` with ``lowering``; returns the join
        to call before the consumer (a no-op where the lowering has none)."""
        ...

    def capture(self, body: Callable[[], None]) -> Any:
        """Run ``body`` once (warm-up), then record it as a replayable graph."""
        ...

    def replay_us(self, graph: Any, prime: Any = None) -> float:
        """µs of one replay of ``graph`` (events around it); ``prime`` replays first, untimed."""
        ...

    def release(self) -> None:
        """Return freed memory (after a part drops its buffers)."""
        ...


@dataclass(frozen=True)
class Stat:
    """Median and quartiles of ``n`` values."""

    med: float
    p25: float
    p75: float
    n: int

    def scaled(self, factor: float) -> Stat:
        low, high = sorted((self.p25 * factor, self.p75 * factor))
        return Stat(self.med * factor, low, high, self.n)

    def text(self, digits: int = 3) -> str:
        med, p25, p75 = (f"{v:.{digits}g}" for v in (self.med, self.p25, self.p75))
        return f"median {med} (p25 {p25}, p75 {p75}, n={self.n})"


def quartiles(values: Sequence[float]) -> Stat:
    if not values:
        raise CalibrationError("no measurement to summarize")
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return Stat(statistics.median(ordered), q[0], q[2], len(ordered))


def plan_rounds(round_us: float, seconds: float) -> int:
    """How many rounds of a part's arms fit ``seconds`` when one round (every arm replayed
    once, host time included) takes ``round_us``: at least :data:`MIN_ROUNDS`, at most
    :data:`MAX_ROUNDS`."""
    if round_us <= 0 or not math.isfinite(round_us):
        raise CalibrationError(f"a round's estimate must be positive, got {round_us} µs")
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(seconds * 1e6 // round_us)))


def cold_copies(nbytes: int, l2_bytes: int) -> int:
    """Copies of a ``nbytes`` weight that cover at least :data:`COLD_COVER` L2s (>= 2)."""
    return max(2, -(-COLD_COVER * l2_bytes // nbytes))


def delta_weight_bytes(l2_bytes: int) -> int:
    """δ's weight: the largest whole MiB of at most :data:`HOT_SHARE` of L2 (so the hot copy
    stays resident), at most 32 MiB (a Llama-8B-sized decode weight)."""
    size = min(32 * MiB, int(HOT_SHARE * l2_bytes) // MiB * MiB)
    if size < 2 * MiB:
        raise CalibrationError(f"L2 of {l2_bytes} B is too small to calibrate δ (2 MiB at least)")
    return size


def lowering_sizes(weight_bytes: int) -> list[int]:
    """The prefetch sizes of the lowering fit: a quarter, a half and all of δ's weight, in
    whole multiples of the linear's row (``2 K`` bytes)."""
    row = 2 * K
    return [max(row, weight_bytes * f // 4 // row * row) for f in (1, 2, 4)]


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b x`` through ``points`` (two or more distinct x)."""
    if len({x for x, _ in points}) < 2:
        raise CalibrationError("a line needs two or more distinct sizes")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


@dataclass(frozen=True)
class Constant:
    """One measured (or spec, or assumed) value and where it came from."""

    value: float
    kind: str  # "measured", "fitted", "spec", "assumed"
    source: str
    stat: Stat | None = None  # the spread it was taken from, where measured

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "provenance": {"kind": self.kind, "source": self.source}}


@dataclass
class Calibration:
    """What :func:`calibrate` found: the constants and the rounds it planned per part."""

    facts: Facts
    date: str
    constants: dict[str, Constant] = field(default_factory=dict)
    lowerings: dict[str, dict[str, Constant]] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)  # part (and group) -> planned rounds
    cost_points: dict[str, list[tuple[float, Stat]]] = field(default_factory=dict)


Progress = Callable[[str], None]


class _Session:
    """Times arms against a device within a deadline."""

    def __init__(self, device: Device, budget_s: float, progress: Progress) -> None:
        self.device, self.progress = device, progress
        self.start = device.clock()
        self.deadline = self.start + budget_s
        self.left_shares = dict(SHARES)
        self.part_end = self.deadline

    def begin(self, part: str) -> None:
        """Start ``part``: it ends at its share of the time left (the shares of parts already
        run are spread over the rest)."""
        share = self.left_shares.pop(part)
        now = self.device.clock()
        left = max(0.0, self.deadline - now)
        self.part_end = now + left * share / (share + sum(self.left_shares.values()))

    def run(
        self,
        arms: dict[str, tuple[Any, Any, int]],
        groups_left: int = 1,
    ) -> tuple[dict[str, list[float]], int]:
        """``arms``: name -> (graph, prime or None, steps per replay). µs per step of each
        arm per round, and the planned rounds: one replay of each arm estimates a round,
        and the rounds fill this group's part of the time left to the part (``groups_left``:
        this group and those of the part still to run)."""
        device = self.device
        estimate = 0.0
        for graph, prime, _ in arms.values():
            estimate += device.replay_us(graph, prime) + HOST_US_PER_REPLAY
            if prime is not None:
                estimate += device.replay_us(prime) + HOST_US_PER_REPLAY
        seconds = max(0.0, self.part_end - device.clock()) / groups_left
        rounds = plan_rounds(estimate, seconds)
        names = list(arms)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            if r >= MIN_ROUNDS and device.clock() > self.deadline:
                logger.warning("calibrate: deadline reached after %d of %d rounds", r, rounds)
                break
            for name in names if r % 2 == 0 else names[::-1]:
                graph, prime, steps = arms[name]
                times[name].append(device.replay_us(graph, prime) / steps)
        return times, rounds


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def calibrate(
    device: Device,
    *,
    budget_s: float = BUDGET_S,
    date: str,
    progress: Progress | None = None,
) -> Calibration:
    """Measure ``device``'s constants within ``budget_s`` seconds of its clock."""
    if not MIN_BUDGET_S <= budget_s <= MAX_BUDGET_S:
        raise CalibrationError(
            f"budget must be within [{MIN_BUDGET_S:g}, {MAX_BUDGET_S:g}] s, got {budget_s:g}"
        )
    say = progress or (lambda text: logger.info("%s", text))
    facts = device.facts()
    session = _Session(device, budget_s, say)
    result = Calibration(facts, date)
    where = f"{date} on {facts.machine}"
    steps = ("kernel", "read", "delta", "lowerings")
    for number, part in enumerate(steps, 1):
        say(f"[{number}/{len(steps)}] {_PART_TEXT[part]} ...")
        session.begin(part)
        _PARTS[part](session, result, where)
        say(f"[{number}/{len(steps)}] {part}: {_summary(result, part)}")
    result.constants["l2_bytes"] = Constant(
        facts.l2_bytes, "spec", f"reported by the device ({facts.name}), {where}"
    )
    result.constants["cores"] = Constant(
        facts.cores, "spec", f"reported by the device ({facts.name}), {where}"
    )
    result.constants["margin_us"] = Constant(
        MARGIN_US, "assumed", "the default do-no-harm margin (0.5 µs): not measured"
    )
    return result


_PART_TEXT = {
    "kernel": f"a small kernel in a replayed graph ({SMALL_KERNELS} per graph)",
    "read": "streaming read bandwidth (4x and 8x L2)",
    "delta": "δ: the linear hot vs cold at 1 and 16 tokens",
    "lowerings": "c_fixed and β of each lowering (3 sizes)",
}


def _summary(result: Calibration, part: str) -> str:
    c = result.constants
    if part == "kernel":
        return f"{c['kernel_us'].value:.3f} µs"
    if part == "read":
        return f"{c['read_bytes_per_s'].value / 1e12:.3f} TB/s"
    if part == "delta":
        return ", ".join(f"{t} token(s) {c[delta_key(t)].value:.4f} µs/MB" for t in TOKENS)
    return ", ".join(
        f"{name} {v['fixed_us'].value:.3f} µs + {v['per_mb_us'].value:.4f} µs/MB"
        for name, v in result.lowerings.items()
    )


def delta_key(tokens: int) -> str:
    return f"delta_us_per_mb_{tokens}_token" + ("s" if tokens > 1 else "")


def _part_kernel(s: _Session, result: Calibration, where: str) -> None:
    device = s.device
    graph = device.capture(lambda: [device.small_kernel() for _ in range(SMALL_KERNELS)])
    times, rounds = s.run({"kernels": (graph, None, SMALL_KERNELS)})
    result.rounds["kernel"] = rounds
    stat = quartiles(times["kernels"])
    result.constants["kernel_us"] = Constant(
        stat.med,
        "measured",
        f"{SMALL_KERNELS} tiny kernels per replayed graph, time / {SMALL_KERNELS}; "
        f"{stat.text()} µs; {where}",
        stat,
    )


def _part_read(s: _Session, result: Calibration, where: str) -> None:
    device, l2 = s.device, result.facts.l2_bytes
    sizes = [-(-f * l2 // MiB) * MiB for f in (COLD_COVER, 2 * COLD_COVER)]
    times, rounds = _time_reads(s, sizes)
    device.release()  # the buffers went with _time_reads
    result.rounds["read"] = rounds
    slope = [(sizes[1] - sizes[0]) / d * 1e6 for d in _paired(times["read1"], times["read0"])]
    if min(slope) <= 0:
        raise CalibrationError("streaming read: the larger buffer did not take longer")
    stat = quartiles(slope)
    mib = " and ".join(f"{n // MiB}" for n in sizes)
    result.constants["read_bytes_per_s"] = Constant(
        stat.med,
        "measured",
        f"streaming read of {mib} MiB (one read kernel each, replayed graphs), slope of time "
        f"over size per round; {stat.scaled(1e-12).text()} TB/s; {where}",
        stat,
    )


def _time_reads(s: _Session, sizes: list[int]) -> tuple[dict[str, list[float]], int]:
    device = s.device
    buffers = [device.weight(n, K) for n in sizes]
    arms = {
        f"read{i}": (device.capture(lambda b=b: device.read(b)), None, 1)
        for i, b in enumerate(buffers)
    }
    return s.run(arms)


def _part_delta(s: _Session, result: Calibration, where: str) -> None:
    device, l2 = s.device, result.facts.l2_bytes
    nbytes = delta_weight_bytes(l2)
    copies = cold_copies(nbytes, l2)
    found = _time_delta(s, nbytes, copies)
    device.release()  # the copies went with _time_delta
    for tokens, (times, rounds) in found.items():
        result.rounds[f"delta_{tokens}"] = rounds
        stat = quartiles(_paired(times["cold"], times["hot"])).scaled(MB / nbytes)
        result.constants[delta_key(tokens)] = Constant(
            stat.med,
            "measured",
            f"linear at {tokens} token(s) on a {nbytes // MiB} MiB bf16 weight "
            f"[{nbytes // (2 * K)} x {K}]: cold (rotating over {copies} copies, "
            f"{copies * nbytes // MiB} MiB) minus hot (one other copy repeated, read before "
            f"each replay), per MB; {stat.text()} µs/MB; {where}",
            stat,
        )


def _time_delta(
    s: _Session, nbytes: int, copies: int
) -> dict[int, tuple[dict[str, list[float]], int]]:
    device = s.device
    cold = [device.weight(nbytes, K) for _ in range(copies)]
    hot = device.weight(nbytes, K)  # not one of the cold copies, which it would warm
    found = {}
    for i, tokens in enumerate(TOKENS):
        x = device.inputs(tokens, K)
        arms = {
            "cold": (device.capture(lambda x=x: [device.linear(x, w) for w in cold]), None, copies),
            "hot": (
                device.capture(lambda x=x: [device.linear(x, hot) for _ in cold]),
                device.capture(lambda x=x: device.linear(x, hot)),
                copies,
            ),
        }
        found[tokens] = s.run(arms, len(TOKENS) - i)
    return found


def _part_lowerings(s: _Session, result: Calibration, where: str) -> None:
    device, facts = s.device, result.facts
    sizes = lowering_sizes(delta_weight_bytes(facts.l2_bytes))
    bytes_per_us = result.constants["read_bytes_per_s"].value / 1e6
    points: dict[str, list[tuple[float, Stat]]] = {name: [] for name in facts.lowerings}
    for i, nbytes in enumerate(sizes):
        window = nbytes / bytes_per_us + WINDOW_SLACK_US
        times, rounds = _time_lowerings(s, nbytes, window, len(sizes) - i)
        device.release()  # the copies went with _time_lowerings
        result.rounds[f"lowerings_{nbytes / MiB:g}MiB"] = rounds
        for name in facts.lowerings:
            stat = quartiles(_paired(times[name], times["hot"]))
            points[name].append((nbytes / MB, stat))
    mib = ", ".join(f"{n / MiB:g}" for n in sizes)
    for name, pts in points.items():
        fixed, per_mb = fit_line([(mb, stat.med) for mb, stat in pts])
        spread = "; ".join(f"{mb:.2f} MB: {stat.text()} µs" for mb, stat in pts)
        how = (
            f"least-squares line through the median cost (arm minus the hot arm, paired per "
            f"round) of [{name} prefetch of the whole weight] window [join] linear at 1 token, "
            f"weights of {mib} MiB, window = read time + {WINDOW_SLACK_US:g} µs ({spread}); "
            f"{where}"
        )
        result.lowerings[name] = {
            "fixed_us": Constant(fixed, "fitted", how),
            "per_mb_us": Constant(per_mb, "fitted", how),
        }
        result.cost_points[name] = pts


def _time_lowerings(
    s: _Session, nbytes: int, window_us: float, groups_left: int
) -> tuple[dict[str, list[float]], int]:
    """Arms at one size: hot, cold, and each lowering, every step ``[prefetch] window [join]
    linear`` over the copies."""
    device = s.device
    x = device.inputs(1, K)
    copies = cold_copies(nbytes, s.device.facts().l2_bytes)
    weights = [device.weight(nbytes, K) for _ in range(copies)]
    hot_copy = device.weight(nbytes, K)  # not one of the cold copies, which it would warm

    def body(lowering: str | None, ws: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for w in ws:
                join = device.prefetch(lowering, w, nbytes) if lowering else None
                device.spin(window_us)
                if join is not None:
                    join()
                device.linear(x, w)

        return run

    arms = {
        "hot": (
            device.capture(body(None, [hot_copy] * copies)),
            device.capture(lambda: device.linear(x, hot_copy)),
            copies,
        ),
        "cold": (device.capture(body(None, weights)), None, copies),
    }
    for name in device.facts().lowerings:
        arms[name] = (device.capture(body(name, weights)), None, copies)
    return s.run(arms, groups_left)


_PARTS: dict[str, Callable[[_Session, Calibration, str], None]] = {
    "kernel": _part_kernel,
    "read": _part_read,
    "delta": _part_delta,
    "lowerings": _part_lowerings,
}

SCHEMA = "fxprefetch.device_profile"
SCHEMA_VERSION = 1
CONSTANT_ORDER = (
    "read_bytes_per_s",
    "l2_bytes",
    "cores",
    "kernel_us",
    "delta_us_per_mb_1_token",
    "delta_us_per_mb_16_tokens",
    "margin_us",
)


def profile_document(result: Calibration, name: str) -> dict[str, Any]:
    """The device-profile file (``fxprefetch.device_profile``, version 1) of ``result``."""
    facts = result.facts
    constants: dict[str, Any] = {k: result.constants[k].to_dict() for k in CONSTANT_ORDER}
    constants["lowerings"] = {
        lowering: {key: c.to_dict() for key, c in values.items()}
        for lowering, values in result.lowerings.items()
    }
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "name": name,
        "label": f"{facts.name} (calibrated)",
        "kind": facts.kind,
        "device": {
            "name": facts.name,
            "driver": facts.driver,
            "torch": facts.torch,
            "runtime": facts.runtime,
            "date": result.date,
            "machine": facts.machine,
        },
        "constants": constants,
    }


def render_table(result: Calibration) -> str:
    """The constants, one row each: value, unit, quartiles where measured, provenance kind."""
    rows = [("constant", "value", "unit", "p25 .. p75", "kind")]
    units = {
        "read_bytes_per_s": ("TB/s", 1e-12),
        "l2_bytes": ("MiB", 1 / MiB),
        "cores": ("", 1),
        "kernel_us": ("µs", 1),
        "delta_us_per_mb_1_token": ("µs/MB", 1),
        "delta_us_per_mb_16_tokens": ("µs/MB", 1),
        "margin_us": ("µs", 1),
    }
    for key in CONSTANT_ORDER:
        c = result.constants[key]
        unit, scale = units[key]
        spread = (
            f"{c.stat.scaled(scale).p25:.4g} .. {c.stat.scaled(scale).p75:.4g}" if c.stat else "-"
        )
        rows.append((key, f"{c.value * scale:.4g}", unit, spread, c.kind))
    for lowering, values in result.lowerings.items():
        for key, unit in (("fixed_us", "µs"), ("per_mb_us", "µs/MB")):
            c = values[key]
            rows.append((f"{lowering}.{key}", f"{c.value:.4g}", unit, "-", c.kind))
    for lowering, pts in result.cost_points.items():
        for mb, stat in pts:
            rows.append(
                (f"  {lowering} cost at {mb:.2f} MB", f"{stat.med:.4g}", "µs",
                 f"{stat.p25:.4g} .. {stat.p75:.4g}", "measured")
            )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    planned = ", ".join(f"{k} {v}" for k, v in result.rounds.items())
    lines.append(f"rounds planned: {planned}")
    return "\n".join(line.rstrip() for line in lines)
