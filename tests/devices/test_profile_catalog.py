"""fxprefetch/devices/profile_catalog.py: the built-in profiles are data in the device-profile
file's form, every constant labelled with where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxprefetch.devices import profile_catalog, profile_file

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = profile_catalog.catalogue()


def _constants(data: dict) -> list[tuple[str, dict]]:
    found = [(k, v) for k, v in data["constants"].items() if k != "lowerings"]
    for lowering, costs in data["constants"].get("lowerings", {}).items():
        found += [(f"lowerings.{lowering}.{k}", v) for k, v in costs.items()]
    return found


@pytest.mark.parametrize("data", CATALOGUE, ids=lambda d: d["name"])
def test_every_built_in_profile_reads_back_as_a_profile_file(data):
    """Each entry passes the same strict reader a calibrated file does, and writes back equal."""
    profile = profile_file.from_dict(data)
    assert profile.name == data["name"]
    assert profile_file.to_dict(profile_file.from_dict(profile_file.to_dict(profile))) == (
        profile_file.to_dict(profile)
    )


@pytest.mark.parametrize("data", CATALOGUE, ids=lambda d: d["name"])
def test_every_constant_says_where_it_came_from(data):
    for name, constant in _constants(data):
        provenance = constant["provenance"]
        assert provenance["kind"] in profile_file.PROVENANCE_KINDS, name
        assert provenance["source"].strip(), f"{data['name']}.{name}: no source"


def test_only_the_h200_claims_measurements_and_they_name_the_run_that_made_them():
    """A fitted constant names the run it was fitted to, a measured one its result file (ours
    or a public benchmark's), and the run's files exist;
    the GPUs nobody measured are labelled derived, never measured."""
    for data in CATALOGUE:
        kinds = {c["provenance"]["kind"] for _, c in _constants(data)}
        if data["name"] != "h200":
            assert "measured" not in kinds, data["name"]
            continue
        assert {"measured", "fitted"} <= kinds
        for name, constant in _constants(data):
            source = constant["provenance"]["source"]
            if constant["provenance"]["kind"] == "fitted":
                assert profile_catalog.H200_RUN in source, name
            if constant["provenance"]["kind"] == "measured":  # ours, or a public benchmark's
                assert ".json" in source or ".txt" in source, f"{name}: names no result file"
    assert (ROOT / profile_catalog.H200_RUN / "bench_micro.json").is_file()
    assert (ROOT / profile_catalog.H200_RUN / "bench_b1.json").is_file()


def test_names_are_unique_and_each_kind_has_its_own_lowerings():
    names = [d["name"] for d in CATALOGUE]
    assert len(names) == len(set(names))
    for data in CATALOGUE:
        assert set(data["constants"]["lowerings"]) <= set(profile_file.LOWERINGS[data["kind"]])
