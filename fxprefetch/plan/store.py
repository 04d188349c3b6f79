"""Compile reports kept beside inductor's FX graph cache.

On a cache hit inductor skips its post-grad passes, so our pipeline does not run and would
leave no plan behind. The backend saves each graph's reports under a key of the dynamo
graph, its input shapes and the pass's uuid, and loads them back when a compile produced
none. A missing or unreadable entry is None: the backend then bypasses the graph cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fxprefetch.pipeline import CompileReport, PassResult
from fxprefetch.plan.records import PrefetchPlan, SkipReason
from fxprefetch.plan.schema import plan_schema, schema_errors
from fxprefetch.roles import ROLES
from fxprefetch.validation import load_json

logger = logging.getLogger(__name__)


def plan_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], pass_uuid: str) -> str:
    h = hashlib.sha256(gm.code.encode())
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            h.update(f"{tuple(x.shape)}{x.dtype}{x.device.type}".encode())
        else:
            h.update(repr(type(x)).encode())
    h.update(pass_uuid.encode())
    return h.hexdigest()


def _store_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "fxprefetch_plans"


def save_plans(key: str, reports: Sequence[CompileReport]) -> None:
    """Store what the pipeline did to each graph (the plan and what each pass changed)."""
    data = [
        {
            "target": r.target,
            "runs": r.runs,
            "run_names": [dict(names) for names in r.run_names],
            "results": [
                {
                    "name": x.name,
                    "changed": x.changed,
                    "mode": x.mode,
                    "plan": x.plan.to_dict() if x.plan is not None else None,
                }
                for x in r.results
            ],
        }
        for r in reports
    ]
    try:
        directory = _store_dir()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"reports": data}))
        tmp.replace(directory / f"{key}.json")
    except OSError as exc:  # a read-only cache must not break compilation
        logger.warning("could not save prefetch plans beside the inductor cache: %s", exc)


def load_plans(key: str) -> list[CompileReport] | None:
    """The reports stored under ``key``; None when missing or unreadable."""
    try:
        data = json.loads((_store_dir() / f"{key}.json").read_text())
        reports = [
            CompileReport(
                r["target"],
                tuple(
                    PassResult(
                        int(x["changed"]),
                        PrefetchPlan.from_dict(x["plan"]) if x["plan"] is not None else None,
                        x["name"],
                        str(x.get("mode", "")),
                    )
                    for x in r["results"]
                ),
                _runs(r.get("runs", 1)),
                _run_names(r.get("run_names", [])),
            )
            for r in data["reports"]
        ]
        for report in reports:
            report.plan  # noqa: B018 - every report has a plan, or the entry is unreadable
        return reports
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        logger.debug("no stored prefetch plans for %s: %s", key[:12], exc)
        return None


def _run_names(value: Any) -> tuple[dict[str, str], ...]:
    """Stored ``run_names``: a list of string -> string mappings."""
    if not isinstance(value, list) or not all(
        isinstance(names, dict) and all(isinstance(x, str) for kv in names.items() for x in kv)
        for names in value
    ):
        raise ValueError(f"run_names must be a list of name mappings, got {value!r}")
    return tuple(value)


def _runs(value: Any) -> int | None:
    """A stored ``runs``: a count >= 0, or None (the graph runs a varying number of times)."""
    if value is None or (type(value) is int and value >= 0):
        return value
    raise ValueError(f"runs must be a count or null, got {value!r}")


PLAN_DIR_ENV = "FXPREFETCH_PLAN_DIR"


def write_plan_file(plan: PrefetchPlan, directory: str | os.PathLike[str]) -> Path:
    """Write one graph's plan as JSON (``plan_schema.json``'s ``plan``), one file per graph."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in plan.graph).strip("_")
    path = folder / f"plan-{os.getpid()}-{stem}.json"
    n = 1
    while path.exists():
        n += 1
        path = folder / f"plan-{os.getpid()}-{stem}-{n}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(plan.to_json())
    tmp.replace(path)
    return path


def read_plan_dir(directory: str | os.PathLike[str]) -> list[PrefetchPlan]:
    """Every plan written to ``directory``, oldest first; ValueError names a bad file."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ValueError(f"{directory} is not a directory")
    files = sorted(folder.glob("plan-*.json"), key=lambda f: (f.stat().st_mtime_ns, f.name))
    plans = []
    for path in files:
        try:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            data = load_json(path.read_text())
            check_plan_data(data)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a plan file: {exc}") from None
        plans.append(PrefetchPlan.from_dict(data))
    return plans


def check_plan_data(data: Any) -> None:
    """ValueError naming what is wrong, unless ``data`` is a ``plan`` of ``plan_schema.json``
    whose roles and skip reasons are ones this fxprefetch knows (the schema names neither)."""
    errors = schema_errors(data, {"$ref": "#/$defs/plan"}, plan_schema())
    if not errors:
        known = {str(reason) for reason in SkipReason}
        for i, linear in enumerate(data["linears"]):
            if linear["role"] is not None and linear["role"] not in ROLES:
                errors.append(
                    f"linears[{i}].role: expected one of {list(ROLES)}, got {linear['role']!r}"
                )
            span = linear["span_bytes"]
            if span >= 0 and linear["prefetch_bytes"] > span:
                errors.append(
                    f"linears[{i}].prefetch_bytes: expected at most span_bytes ({span}, the "
                    f"bytes the weight's part covers from offset), got {linear['prefetch_bytes']}"
                )
            if linear["skip_reason"] is not None and linear["skip_reason"] not in known:
                errors.append(
                    f"linears[{i}].skip_reason: expected a reason fxprefetch gives "
                    f"(e.g. {str(SkipReason.NO_ROLE)!r}), got {linear['skip_reason']!r}"
                )
    if errors:
        more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
        raise ValueError("; ".join(errors[:2]) + more)
