"""fxprefetch: hide LLM weight loads behind vector work with L2 prefetches in FX graphs."""

from __future__ import annotations

import logging

from fxprefetch import ops
from fxprefetch.backend import torchair_backend
from fxprefetch.config import PrefetchRatios, WeightPrefetchConfig
from fxprefetch.errors import ConfigError, FxprefetchError, PrefetchPassError
from fxprefetch.explainer import explain
from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason
from fxprefetch.planner import clear_plans, last_plans
from fxprefetch.runtime_stats import PrefetchStats, WeightStats, collect_stats, reset_stats, stats

logging.getLogger("fxprefetch").addHandler(logging.NullHandler())

__version__ = "0.1.0"


__all__ = [
    "ConfigError",
    "FxprefetchError",
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
