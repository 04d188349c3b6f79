"""``PrefetchPlan`` as text for people: the per-linear table, the totals, the log line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

# The plan's methods (``fxprefetch.plan.records``) call this module, so it does not import
# them back, not even for type checkers: it names the shape it reads.


class _Prediction(Protocol):
    @property
    def hidden_us(self) -> float: ...


class RecordView(Protocol):
    """What the text reads of a ``fxprefetch.plan.records.LinearRecord``."""

    @property
    def weight(self) -> str: ...
    @property
    def module(self) -> str | None: ...
    @property
    def layer(self) -> int | None: ...
    @property
    def role(self) -> str | None: ...
    @property
    def weight_shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def span_bytes(self) -> int | None: ...
    @property
    def prefetch_bytes(self) -> int: ...
    @property
    def prefetched(self) -> bool: ...
    @property
    def capped(self) -> bool: ...
    @property
    def window(self) -> tuple[str, ...]: ...
    @property
    def window_kind(self) -> str | None: ...
    @property
    def skip_reason(self) -> str | None: ...
    @property
    def note(self) -> str | None: ...
    @property
    def dependency(self) -> str | None: ...
    @property
    def prediction(self) -> _Prediction | None: ...


class _Summary(Protocol):
    @property
    def linears(self) -> int: ...
    @property
    def prefetched(self) -> int: ...
    @property
    def bytes_prefetched(self) -> int: ...
    @property
    def capped(self) -> int: ...
    @property
    def skipped(self) -> dict[str, int]: ...


class _PlanPrediction(Protocol):
    def line(self) -> str: ...


class PlanView(Protocol):
    """What the text reads of a ``fxprefetch.plan.records.PrefetchPlan``."""

    @property
    def graph(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def lowering(self) -> str | None: ...
    @property
    def records(self) -> Sequence[RecordView]: ...
    def summary(self) -> _Summary: ...
    def predicted(self) -> _PlanPrediction | None: ...


def summary_line(plan: PlanView) -> str:
    """One line for logs: linears seen and prefetched, bytes, skips, predicted saving."""
    s = plan.summary()
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s.skipped.items()))
    line = (
        f"{plan.graph}: {s.prefetched}/{s.linears} linears prefetched, "
        f"{format_bytes(s.bytes_prefetched)} in total, {s.capped} capped"
    )
    if skipped:
        line += f"; skipped: {skipped}"
    if len(plan.call_sites) > 1:
        line += f"; one graph for {len(plan.call_sites)} call sites ({', '.join(plan.call_sites)})"
    if plan.error:
        line += f"; pass failed: {plan.error}"
    predicted = plan.predicted()
    if predicted is not None:
        line += f"; {predicted.line()}"
    return line


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 KiB``, ``18.0 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def display_path(r: RecordView) -> str:
    """The parameter's owner path when known (``...experts.gate_up_proj``), else the module."""
    if "." in r.weight:
        return r.weight[: -len(".weight")] if r.weight.endswith(".weight") else r.weight
    return r.module or r.weight


def _row(r: RecordView) -> tuple[str, ...]:
    window = ",".join(w.split("::")[-1] for w in r.window)
    if len(window) > 40:
        window = window[:37] + "..."
    return (
        "" if r.layer is None else str(r.layer),
        display_path(r),
        r.role or "-",
        "x".join(map(str, r.weight_shape)) + f" {r.dtype.replace('torch.', '')}",
        _fmt_weight_bytes(r),
        format_bytes(r.prefetch_bytes) if r.prefetched else "-",
        "yes" if r.capped else "",
        f"{r.window_kind}: {window}" if r.prefetched else _reason(r),
        r.dependency or "",
        f"{r.prediction.hidden_us:.2f}" if r.prediction is not None and r.prefetched else "",
    )


def _fmt_weight_bytes(r: RecordView) -> str:
    """The bytes read, and the span a contiguous prefetch covers where it is larger."""
    read = format_bytes(r.weight_bytes)
    if r.span_bytes is not None and r.span_bytes != r.weight_bytes:
        return f"{read} (span {format_bytes(r.span_bytes)})"
    return read


def _reason(r: RecordView) -> str:
    reason = str(r.skip_reason or "")
    return f"{reason} ({r.note})" if r.note and r.skip_reason else reason


def _fold_key(r: RecordView) -> tuple[Any, ...]:
    module = display_path(r)
    if r.layer is not None:
        module = module.replace(f".{r.layer}.", ".*.", 1)
    return (
        module,
        r.role,
        r.weight_shape,
        r.dtype,
        r.prefetch_bytes,
        r.capped,
        r.window_kind,
        r.skip_reason,
        tuple(w.split("::")[-1] for w in r.window),
        round(r.prediction.hidden_us, 2) if r.prediction is not None else None,
    )


def render_totals(plans: Sequence[PlanView]) -> str:
    """One line of totals over several graphs' plans."""
    records = [r for p in plans for r in p.records]
    done = [r for r in records if r.prefetched]
    skipped = Counter(str(r.skip_reason) for r in records if not r.prefetched and r.skip_reason)
    line = (
        f"totals: {len(records)} linears seen, {len(done)} prefetched "
        f"({format_bytes(sum(r.prefetch_bytes for r in done))} of "
        f"{format_bytes(sum(r.weight_bytes for r in done))} weights), "
        f"{sum(r.capped for r in done)} capped"
    )
    if skipped:
        line += "; skipped: " + ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
    return line


def render_table(plans: Sequence[PlanView], fold: bool = False) -> str:
    """A fixed-width table of several graphs' plans, one row per linear (``fold`` merges
    identical layers), followed by each plan's summary line."""
    header = (
        "layer",
        "module",
        "role",
        "weight",
        "bytes",
        "prefetch",
        "capped",
        "window / skip reason",
        "dependency",
        "hides µs (model)",
    )
    rows: list[tuple[str, ...]] = []
    for plan in plans:
        if not fold:
            rows.extend(_row(r) for r in plan.records)
            continue
        groups: dict[tuple[Any, ...], list[RecordView]] = {}
        for r in plan.records:
            groups.setdefault(_fold_key(r), []).append(r)
        for members in groups.values():
            first = _row(members[0])
            layers = sorted({m.layer for m in members if m.layer is not None})
            layer = (
                first[0]
                if len(members) == 1
                else (
                    f"{layers[0]}-{layers[-1]} (x{len(members)})" if layers else f"x{len(members)}"
                )
            )
            module = _fold_key(members[0])[0] if len(members) > 1 else first[1]
            rows.append(
                (layer, module, *first[2:8], "" if len(members) > 1 else first[8], first[9])
            )
    if not any(row[-1] for row in rows):  # no device profile: no prediction column
        header = header[:-1]
        rows = [row[:-1] for row in rows]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    for p in plans:
        lines.append(summary_line(p))
        if p.lowering:
            lines.append(f"  lowering: {p.lowering}")
    return "\n".join(lines)
