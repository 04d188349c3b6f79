"""fxprefetch/profile_file.py: the device profile file (read, validated, written), and a
file's profile used by a compile and in its cache key."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from fxprefetch.devices import profile_catalog
from fxprefetch.devices.profile_catalog import PROFILES, profile, resolve_profile
from fxprefetch.devices.profile_file import ProfileError, from_dict, read, to_dict, write

#: the example agreed with ``fxprefetch calibrate`` (issue 26, point 2)
EXAMPLE = {
    "schema": "fxprefetch.device_profile",
    "version": 1,
    "name": "h200-calibrated",
    "label": "NVIDIA H200 (calibrated)",
    "kind": "gpu",
    "device": {
        "name": "NVIDIA H200",
        "driver": "570.86",
        "torch": "2.11.0",
        "runtime": "CUDA 12.8",
        "date": "2026-12-07T10:00:00Z",
        "machine": "hostname",
    },
    "constants": {
        key: {"value": value, "provenance": {"kind": "measured", "source": "calibrate"}}
        for key, value in {
            "read_bytes_per_s": 3.9e12,
            "l2_bytes": 62914560,
            "cores": 132,
            "kernel_us": 1.3,
            "delta_us_per_mb_1_token": 0.055,
            "delta_us_per_mb_16_tokens": 0.075,
            "margin_us": 0.5,
        }.items()
    }
    | {
        "lowerings": {
            name: {
                "fixed_us": {"value": 0.55, "provenance": {"kind": "measured", "source": "x"}},
                "per_mb_us": {"value": 0.13, "provenance": {"kind": "fitted", "source": "y"}},
            }
            for name in ("side_stream", "compute_stream")
        }
    },
}


def test_the_agreed_example_reads_and_writes_back_unchanged(tmp_path):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(EXAMPLE))
    found = read(path)
    assert found.name == "h200-calibrated" and found.kind == "gpu" and found.origin == str(path)
    assert found.delta_1.value == 0.055 and found.cost("side_stream").per_mb_us.kind == "fitted"
    assert dict(found.device)["driver"] == "570.86"
    again = write(found, tmp_path / "again.json")
    assert json.loads(again.read_text()) == EXAMPLE
    assert resolve_profile(str(path)) == found


@pytest.mark.parametrize("name", list(PROFILES))
def test_the_built_in_profiles_are_data_of_the_same_form(name):
    data = to_dict(profile(name))
    assert data in profile_catalog.catalogue()
    assert from_dict(json.loads(json.dumps(data))) == profile(name)


def _broken(edit) -> dict:
    data = copy.deepcopy(EXAMPLE)
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d.update(version=2), r"\.version: expected 1"),
        (lambda d: d.update(schema="x"), r"\.schema: expected 'fxprefetch.device_profile'"),
        (lambda d: d.update(kind="tpu"), r"\.kind: expected one of \['gpu', 'npu'\]"),
        (lambda d: d["constants"].pop("kernel_us"), r"\.constants\.kernel_us: missing"),
        (lambda d: d["constants"].update(extra=1), r"\.constants\.extra: unknown field"),
        (
            lambda d: d["constants"]["cores"].update(value=1.5),
            r"\.constants\.cores\.value: expected an integer",
        ),
        (
            lambda d: d["constants"]["read_bytes_per_s"].update(value=0),
            r"\.constants\.read_bytes_per_s\.value: expected a positive number",
        ),
        (
            lambda d: d["constants"]["margin_us"].update(value="0.5"),
            r"\.constants\.margin_us\.value: expected a number",
        ),
        (
            lambda d: d["constants"]["kernel_us"]["provenance"].update(kind="guessed"),
            r"\.constants\.kernel_us\.provenance\.kind: expected one of \['spec'",
        ),
        (
            lambda d: d["constants"]["lowerings"].update(ascend_cmo={}),
            r"\.constants\.lowerings\.ascend_cmo: unknown lowering for a gpu",
        ),
        (
            lambda d: d["device"].update(gpu="H200"),
            r"\.device\.gpu: unknown field",
        ),
        (
            lambda d: d["constants"]["l2_bytes"].update(value=1e308),
            r"\.constants\.l2_bytes\.value: implausibly large: 1e\+308 "
            r"\(expected at most 4\.29497e\+09\)",
        ),
        (
            lambda d: d["constants"]["cores"].update(value=1e6),
            r"\.constants\.cores\.value: implausibly large: 1000000\.0 \(expected at most 100000\)",
        ),
        (
            lambda d: d["constants"]["delta_us_per_mb_16_tokens"].update(value=1e300),
            r"\.constants\.delta_us_per_mb_16_tokens\.value: implausibly large: 1e\+300 "
            r"\(expected at most 100\)",
        ),
        (
            lambda d: d["constants"]["lowerings"]["side_stream"]["fixed_us"].update(value=5e3),
            r"\.lowerings\.side_stream\.fixed_us\.value: implausibly large: 5000\.0 "
            r"\(expected at most 1000\)",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_the_field(edit, where):
    with pytest.raises(ProfileError, match=where):
        from_dict(_broken(edit), origin="p.json")


def test_an_unreadable_or_unknown_profile_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        resolve_profile(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ProfileError, match="not JSON"):
        read(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="unknown device profile"):
        resolve_profile("h300")


def test_a_duplicate_key_in_a_profile_file_is_refused(tmp_path):
    text = json.dumps(EXAMPLE).replace('"version": 1', '"version": 1, "version": 1', 1)
    (tmp_path / "dup.json").write_text(text)
    with pytest.raises(ProfileError, match="not JSON: duplicate key 'version'"):
        read(tmp_path / "dup.json")


def test_a_profile_file_is_used_by_a_compile(tmp_path, monkeypatch, fresh_dynamo):
    """The same model compiled (the CPU standing in for a GPU) with the built-in H200 profile
    emits no prefetch (each predicted to lose); with the profile file `fxprefetch calibrate`
    writes for a simulated GPU whose side stream is cheap and δ large, the prefetches it
    predicts to pay are emitted."""
    import torch

    import fxprefetch
    from fxprefetch.devices import calibrate as cal
    from fxprefetch.devices import simulated_setup
    from fxprefetch.devices.calibrate_sim import SIMULATED, SimulatedDevice

    from support.synthetic import SynthModel, SynthSpec

    monkeypatch.setattr(
        "fxprefetch.targets.device_setup",
        lambda **kw: simulated_setup(kw["device_profile"] or profile("h200"), {"cpu"}),
    )
    # `fxprefetch calibrate` on a simulated GPU whose side stream is cheap and δ large
    sim = replace(
        SIMULATED["h200"],
        delta_us_per_mb={1: 1.0, 16: 1.0},
        lowerings={"side_stream": (0.1, 0.02), "compute_stream": (0.1, 0.02)},
    )
    result = cal.calibrate(SimulatedDevice(sim), date="2026-12-07T10:00:00Z")
    path = tmp_path / "paying.json"
    path.write_text(json.dumps(cal.profile_document(result, "cheap-simulated")))
    assert read(path).delta_1.kind == "measured"
    model = SynthModel(SynthSpec(layers=2, hidden=512, intermediate=2048))
    ids = torch.randint(0, 64, (1, 4))
    emitted = {}
    for name, extra in (("built-in", {}), ("file", {"device_profile": str(path)})):
        torch._dynamo.reset()
        options = {"target": "eager", **extra}
        compiled = torch.compile(model, backend="npu_prefetch", options=options)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids))
        plans = fxprefetch.last_plans()
        emitted[name] = [r for p in plans for r in p.prefetched]
        assert any(r.prediction is not None for p in plans for r in p.records)
    assert emitted["built-in"] == [] and len(emitted["file"]) > 0
    assert all(r.prediction.hidden_us > 0.5 for r in emitted["file"])


def test_the_files_calibrate_writes_are_read_back():
    from fxprefetch.devices import calibrate as cal
    from fxprefetch.devices.calibrate_sim import SIMULATED, SimulatedDevice

    result = cal.calibrate(SimulatedDevice(SIMULATED["h200"]), date="2026-12-07T10:00:00Z")
    found = from_dict(json.loads(json.dumps(cal.profile_document(result, "h200-simulated"))))
    assert found.name == "h200-simulated" and found.kind == "gpu"
    assert {n for n, _ in found.lowerings} == {"side_stream", "compute_stream"}
    assert found.delta_1.value == pytest.approx(0.055, rel=0.2)
