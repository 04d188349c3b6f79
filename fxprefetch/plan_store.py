"""Plans kept beside inductor's FX graph cache.

On a cache hit inductor skips its post-grad passes, so our pass does not run and would leave
no plan behind. The backend saves each graph's plans under a key of the dynamo graph, its
input shapes and the pass's uuid, and loads them back when a compile produced none.
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

from fxprefetch.plan import PrefetchPlan

logger = logging.getLogger("fxprefetch")


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


def save_plans(key: str, plans: Sequence[PrefetchPlan], elided: bool) -> None:
    """``elided``: the compiled code left its hint-only prefetches out (counted at the call)."""
    try:
        directory = _store_dir()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"elided": elided, "plans": [p.to_dict() for p in plans]}))
        tmp.replace(directory / f"{key}.json")
    except OSError as exc:  # a read-only cache must not break compilation
        logger.debug("could not save prefetch plans: %s", exc)


def load_plans(key: str) -> tuple[list[PrefetchPlan], bool]:
    """The plans stored under ``key`` and whether their prefetches were elided."""
    try:
        data = json.loads((_store_dir() / f"{key}.json").read_text())
        return [PrefetchPlan.from_dict(d) for d in data["plans"]], bool(data["elided"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("no stored prefetch plans for %s: %s", key[:12], exc)
        return [], False
