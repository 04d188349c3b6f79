"""fxprefetch: hide LLM weight loads behind vector work with L2 prefetches in FX graphs."""

from __future__ import annotations

import logging

from fxprefetch import ops
from fxprefetch.config import ConfigError, PrefetchRatios, WeightPrefetchConfig
from fxprefetch.stats import PrefetchStats, WeightStats, collect_stats, reset_stats, stats

logging.getLogger("fxprefetch").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PrefetchRatios",
    "PrefetchStats",
    "WeightPrefetchConfig",
    "WeightStats",
    "collect_stats",
    "ops",
    "reset_stats",
    "stats",
]
