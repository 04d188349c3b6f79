"""The plan's room: what the pass saw and did (``records``), as text (``render``), on disk
(``store``), checked against ``plan_schema.json`` (``schema``), and drawn (``timeline``).

``fxprefetch.plan`` re-exports the records, so ``from fxprefetch.plan import PrefetchPlan``
keeps working.
"""

from __future__ import annotations

from fxprefetch.plan.records import (
    PLAN_SCHEMA_VERSION,
    READABLE_SCHEMA_VERSIONS,
    LinearRecord,
    PlanPrediction,
    PlanSummary,
    PredictedSaving,
    PrefetchPlan,
    SkipReason,
    predicted_saving,
)

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "LinearRecord",
    "PlanPrediction",
    "PlanSummary",
    "PredictedSaving",
    "PrefetchPlan",
    "SkipReason",
    "predicted_saving",
]
