"""fxprefetch: hide LLM weight loads behind vector work with L2 prefetches in FX graphs."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fxprefetch import ops
from fxprefetch.config import ConfigError, PrefetchRatios, WeightPrefetchConfig
from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason
from fxprefetch.runtime_stats import PrefetchStats, WeightStats, collect_stats, reset_stats, stats

# Loaded on first use: they import the passes, which import this package's core (a cycle
# if ``import passes`` comes first).
_LAZY = {
    "explain": "fxprefetch.explainer",
    "torchair_backend": "fxprefetch.backend",
    "PrefetchPassError": "fxprefetch.planner",
    "clear_plans": "fxprefetch.planner",
    "last_plans": "fxprefetch.planner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxprefetch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


logging.getLogger("fxprefetch").addHandler(logging.NullHandler())

__version__ = "0.1.0"


__all__ = [
    "ConfigError",
    "LinearRecord",
    "PrefetchPassError",
    "PrefetchPlan",
    "PrefetchRatios",
    "PrefetchStats",
    "SkipReason",
    "WeightPrefetchConfig",
    "WeightStats",
    "clear_plans",
    "collect_stats",
    "explain",
    "last_plans",
    "ops",
    "reset_stats",
    "stats",
    "torchair_backend",
]
