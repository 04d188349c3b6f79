"""fxprefetch/plan/store.py: the pipeline's reports kept beside the inductor cache (so a cache
hit still has its plans), and plan files written per graph and read back."""

from __future__ import annotations

import json

import pytest

from fxprefetch.pipeline import CompileReport, PassResult
from fxprefetch.plan import store
from fxprefetch.plan.records import LinearRecord, PrefetchPlan, SkipReason


def _plan(graph: str = "g0 (forward)") -> PrefetchPlan:
    records = [
        LinearRecord("mm", "aten.mm.default", "layers.0.mlp.down_proj",
                     "layers.0.mlp.down_proj.weight", 0, "mlp.down", (8, 16), "torch.float32",
                     512, ratio=1.0, prefetch_bytes=512),
        LinearRecord("mm_1", "aten.mm.default", "lm_head", "lm_head.weight", None, None, (4, 16),
                     "torch.float32", 256, skip_reason=SkipReason.NO_ROLE),
    ]  # fmt: skip
    return PrefetchPlan(records=records, graph=graph)


def _reports() -> list[CompileReport]:
    return [
        CompileReport(
            "inductor",
            (
                PassResult(1, _plan(), "plan_prefetches"),
                PassResult(0, None, "lower_native"),
                PassResult(2, None, "elide_hints", "kept as hints"),
            ),
            runs=2,
            run_names=({"w": "layers.0.w"}, {"w": "layers.1.w"}),
        )
    ]


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_store_dir", lambda: tmp_path)
    return tmp_path


def test_saved_reports_load_back_equal(store_dir):
    store.save_plans("k", _reports())
    (loaded,) = store.load_plans("k")
    (saved,) = _reports()
    assert (loaded.target, loaded.runs, loaded.run_names) == (
        saved.target,
        saved.runs,
        saved.run_names,
    )
    assert [(r.name, r.changed, r.mode) for r in loaded.results] == [
        ("plan_prefetches", 1, ""),
        ("lower_native", 0, ""),
        ("elide_hints", 2, "kept as hints"),  # a warm compile counts hints as a cold one
    ]
    assert loaded.hints_kept
    assert loaded.plan.to_json() == saved.plan.to_json()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d["reports"][0].update(runs=-1, run_names=[]),
        lambda d: d["reports"][0].update(run_names=[{"w": 3}]),
        lambda d: d["reports"][0].pop("target"),
    ],
    ids=["negative runs", "run name not a string", "no target"],
)
def test_a_missing_or_damaged_entry_loads_as_none(store_dir, corrupt):
    assert store.load_plans("absent") is None
    store.save_plans("k", _reports())
    path = store_dir / "k.json"
    data = json.loads(path.read_text())
    corrupt(data)
    path.write_text(json.dumps(data))
    assert store.load_plans("k") is None


def test_plan_files_of_graphs_with_one_name_do_not_overwrite_each_other(tmp_path):
    first, second = _plan("graph 0 / cond"), _plan("graph 0 / cond")
    second.records.pop()
    paths = [store.write_plan_file(p, tmp_path) for p in (first, second)]
    assert len(set(paths)) == 2
    assert [p.to_json() for p in store.read_plan_dir(tmp_path)] == [
        first.to_json(),
        second.to_json(),
    ]


def test_a_file_that_is_not_a_plan_is_refused_by_name(tmp_path):
    store.write_plan_file(_plan(), tmp_path)
    bad = tmp_path / "plan-1-bad.json"
    bad.write_text(json.dumps({"graph": "g"}))
    with pytest.raises(ValueError, match=r"plan-1-bad\.json: not a plan file"):
        store.read_plan_dir(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        store.read_plan_dir(tmp_path / "missing")
