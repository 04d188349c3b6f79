"""``fxprefetch calibrate`` on a simulated device with known constants: it recovers them, writes
a valid profile file, plans its rounds within its budget, and the command line reports no
device, bad arguments and its progress as it should."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from fxprefetch.cli import main
from fxprefetch.devices import calibrate as cal
from fxprefetch.devices.calibrate_sim import SIMULATED, SimulatedDevice

H200 = SIMULATED["h200"]
MB, MiB = 10**6, 1 << 20
DATE = "2026-12-07T10:00:00Z"


def _run(constants=H200, budget_s: float = cal.BUDGET_S, seed: int = 0):
    device = SimulatedDevice(constants, seed=seed)
    lines: list[str] = []
    result = cal.calibrate(device, budget_s=budget_s, date=DATE, progress=lines.append)
    return result, device, lines


@pytest.fixture(scope="module")
def h200():
    return _run()


def test_exact_constants_without_jitter():
    """With no timing noise, every constant comes back to rounding: the arithmetic (slopes,
    paired differences, per-MB scaling, the least-squares line) is the model's."""
    result, _, _ = _run(replace(H200, jitter=0.0))
    c = result.constants
    assert c["kernel_us"].value == pytest.approx(H200.kernel_us, rel=1e-9)
    assert c["read_bytes_per_s"].value == pytest.approx(H200.read_bytes_per_s, rel=1e-9)
    for tokens in (1, 16):
        assert c[cal.delta_key(tokens)].value == pytest.approx(
            H200.delta_us_per_mb[tokens], rel=1e-9
        )
    for name, (fixed, per_mb) in H200.lowerings.items():
        assert result.lowerings[name]["fixed_us"].value == pytest.approx(fixed, abs=1e-9)
        assert result.lowerings[name]["per_mb_us"].value == pytest.approx(per_mb, rel=1e-9)


def _bounds(c=H200) -> dict[str, float]:
    """Worst-case errors with each replay's time off by at most ``jitter`` (its relative
    bound): a difference of two replays is off by at most ``jitter`` times their sum, and so
    is any median of such differences; a least-squares line is linear in its points, so its
    error is at most the sum of |weight| x the point's bound. The arms' per-step times below
    are the simulated device's own cost model."""
    j = c.jitter
    cold = lambda n: c.linear_fixed_us + n / (c.linear_bytes_per_s / 1e6)  # noqa: E731
    out = {"kernel_us": j * c.kernel_us}
    t = [c.kernel_us + f * c.l2_bytes / (c.read_bytes_per_s / 1e6) for f in (4, 8)]
    out["read_rel"] = j * sum(t) / (t[1] - t[0] - j * sum(t))
    n = cal.delta_weight_bytes(c.l2_bytes)
    for tokens, delta in c.delta_us_per_mb.items():
        hot = cold(n) - delta * n / MB
        out[f"delta_{tokens}"] = j * (cold(n) + hot) / (n / MB)
    sizes = cal.lowering_sizes(n)
    xs = [s / MB for s in sizes]
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    wb = [(x - mx) / sxx for x in xs]
    wa = [1 / len(xs) - mx * w for w in wb]
    for name, (fixed, per_mb) in c.lowerings.items():
        err = []
        for s in sizes:
            hot = s / (c.read_bytes_per_s / 1e6) + cal.WINDOW_SLACK_US + cold(s)
            hot -= c.delta_us_per_mb[1] * s / MB
            err.append(j * (2 * hot + fixed + per_mb * s / MB))
        out[f"{name}.fixed_us"] = sum(abs(w) * e for w, e in zip(wa, err, strict=True))
        out[f"{name}.per_mb_us"] = sum(abs(w) * e for w, e in zip(wb, err, strict=True))
    return out


def test_recovers_the_simulated_constants_within_the_jitter_bound(h200):
    result, _, _ = h200
    c, bound = result.constants, _bounds()
    assert abs(c["kernel_us"].value - H200.kernel_us) <= bound["kernel_us"]
    read = c["read_bytes_per_s"].value
    assert abs(read / H200.read_bytes_per_s - 1) <= bound["read_rel"]
    for tokens, delta in H200.delta_us_per_mb.items():
        assert abs(c[cal.delta_key(tokens)].value - delta) <= bound[f"delta_{tokens}"]
    for name, (fixed, per_mb) in H200.lowerings.items():
        got = result.lowerings[name]
        assert abs(got["fixed_us"].value - fixed) <= bound[f"{name}.fixed_us"]
        assert abs(got["per_mb_us"].value - per_mb) <= bound[f"{name}.per_mb_us"]
    # the bounds are tight enough to matter: δ within 10%, β within 15%
    assert bound["delta_1"] < 0.1 * H200.delta_us_per_mb[1]
    assert bound["side_stream.per_mb_us"] < 0.15 * H200.lowerings["side_stream"][1]


def test_a_cold_arm_never_finds_its_weight_resident():
    """The hot copy is not one of the cold copies: were it, the cold arm's first step would
    find it left in L2 by the hot arm and δ would come out about 1/copies too small."""
    result, _, _ = _run(replace(H200, jitter=0.0))
    assert result.constants["delta_us_per_mb_1_token"].value == pytest.approx(0.055, rel=1e-9)


def _check_constant(entry, kind: str) -> None:
    assert set(entry) == {"value", "provenance"}
    value = entry["value"]
    assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    assert set(entry["provenance"]) == {"kind", "source"}
    assert entry["provenance"]["kind"] == kind
    assert isinstance(entry["provenance"]["source"], str) and entry["provenance"]["source"]


def test_the_profile_file_has_every_field_of_the_schema(h200):
    result, _, _ = h200
    doc = json.loads(json.dumps(cal.profile_document(result, "h200-simulated")))
    assert set(doc) == {"schema", "version", "name", "label", "kind", "device", "constants"}
    assert doc["schema"] == "fxprefetch.device_profile" and doc["version"] == 1
    assert doc["name"] == "h200-simulated"
    assert doc["label"] == "NVIDIA H200 (simulated) (calibrated)" and doc["kind"] == "gpu"
    device = doc["device"]
    assert set(device) == {"name", "driver", "torch", "runtime", "date", "machine"}
    assert device["name"] == H200.name and device["date"] == DATE
    assert all(isinstance(v, str) and v for v in device.values())
    constants = doc["constants"]
    assert set(constants) == {
        "read_bytes_per_s", "l2_bytes", "cores", "kernel_us", "delta_us_per_mb_1_token",
        "delta_us_per_mb_16_tokens", "margin_us", "lowerings",
    }  # fmt: skip
    for key in ("read_bytes_per_s", "kernel_us", "delta_us_per_mb_1_token"):
        _check_constant(constants[key], "measured")
        assert DATE in constants[key]["provenance"]["source"]
    _check_constant(constants["delta_us_per_mb_16_tokens"], "measured")
    _check_constant(constants["l2_bytes"], "spec")
    _check_constant(constants["cores"], "spec")
    _check_constant(constants["margin_us"], "assumed")
    assert constants["l2_bytes"]["value"] == H200.l2_bytes and constants["cores"]["value"] == 132
    assert constants["margin_us"]["value"] == 0.5
    assert set(constants["lowerings"]) == {"side_stream", "compute_stream"}
    for lowering in constants["lowerings"].values():
        assert set(lowering) == {"fixed_us", "per_mb_us"}
        for entry in lowering.values():
            _check_constant(entry, "fitted")
            assert "6, 12, 24 MiB" in entry["provenance"]["source"]  # the sizes it was fitted to
    delta = constants["delta_us_per_mb_1_token"]["provenance"]["source"]
    assert "24 MiB" in delta and "10 copies" in delta and "p25" in delta  # method and spread


def test_an_npu_profile_names_the_ascend_lowerings():
    npu = replace(
        H200, name="Ascend910B2 (simulated)", kind="npu",
        lowerings={"ascend_cmo": (0.2, 0.01), "ascend_side_stream": (0.6, 0.02)},
    )  # fmt: skip
    result, _, _ = _run(replace(npu, jitter=0.0))
    doc = cal.profile_document(result, "ascend-calibrated")
    assert doc["kind"] == "npu"
    assert set(doc["constants"]["lowerings"]) == {"ascend_cmo", "ascend_side_stream"}
    fixed = doc["constants"]["lowerings"]["ascend_cmo"]["fixed_us"]["value"]
    assert fixed == pytest.approx(0.2, abs=1e-9)


# -- the budget: rounds sized to fit, never a timed assert (the simulated clock) ------------


def test_plan_rounds_fills_the_seconds_between_the_bounds():
    assert cal.plan_rounds(1000.0, 0.02) == 20  # 20 ms of 1 ms rounds
    assert cal.plan_rounds(1000.0, 10.0) == cal.MAX_ROUNDS
    assert cal.plan_rounds(1000.0, 0.001) == cal.MIN_ROUNDS
    assert cal.plan_rounds(1e6, 0.0) == cal.MIN_ROUNDS
    with pytest.raises(cal.CalibrationError, match="positive"):
        cal.plan_rounds(0.0, 1.0)


def test_a_fast_device_gets_the_most_rounds_and_ends_well_inside_the_budget(h200):
    result, device, _ = h200
    assert set(result.rounds.values()) == {cal.MAX_ROUNDS}
    assert device.clock() < 0.2 * cal.BUDGET_S  # simulated seconds


def test_a_slow_device_gets_fewer_rounds_and_still_fits_the_budget():
    """Every kernel 1000x slower: a round of the lowering arms takes seconds of simulated
    time, so every part's rounds are sized down to its share, and the whole calibration
    (captures and estimates included) ends within its budget of simulated time."""
    slow = replace(H200, time_scale=1000.0)
    result, device, _ = _run(slow, budget_s=60.0)
    assert all(cal.MIN_ROUNDS <= r < cal.MAX_ROUNDS for r in result.rounds.values())
    assert max(r for k, r in result.rounds.items() if k.startswith("lowerings")) < 20
    assert device.clock() <= 60.0
    # the constants still come out, as slow as the device (spins are not stretched)
    assert result.constants["delta_us_per_mb_1_token"].value == pytest.approx(55.0, rel=0.1)


def test_the_budget_is_checked():
    with pytest.raises(cal.CalibrationError, match="budget"):
        cal.calibrate(SimulatedDevice(H200), budget_s=200.0, date=DATE)


def test_progress_is_one_line_before_and_after_each_part(h200):
    _, _, lines = h200
    assert [line.split("]")[0] for line in lines] == [f"[{n}/4" for n in (1, 1, 2, 2, 3, 3, 4, 4)]
    assert "TB/s" in lines[3] and "µs/MB" in lines[5] and "side_stream" in lines[7]


# -- the command line ------------------------------------------------------------------------


def test_cli_simulated_writes_the_file_prints_the_table_and_its_progress(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--simulate", "h200", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["name"] == "h200-simulated" and doc["schema"] == "fxprefetch.device_profile"
    assert "delta_us_per_mb_1_token" in captured.out and "side_stream.per_mb_us" in captured.out
    progress = [line for line in captured.err.splitlines() if line.startswith("calibrate: [")]
    assert len(progress) == 8 and progress[-1].startswith("calibrate: [4/4] lowerings:")


def test_cli_quiet_shows_no_progress_and_names_the_file_after_the_profile(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--simulate", "h200", "--quiet", "--name", "mine"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "mine.json").read_text())["name"] == "mine"


def test_cli_without_a_gpu_or_npu_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    import torch

    from fxprefetch.devices import calibrate_hw

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(calibrate_hw, "torch_npu_present", lambda: False)
    out = tmp_path / "p.json"
    assert main(["calibrate", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("fxprefetch: error: calibrate: no CUDA GPU or Ascend NPU here")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "5"], "--budget: expected seconds within [10, 110], got 5"),
        (["--budget", "soon"], "--budget: expected seconds, got 'soon'"),
        (["--name", "My Profile"], "--name: expected lower-case letters"),
        (["--simulate", "tpu"], "--simulate: invalid choice: 'tpu'"),
        (["-o", "."], "--output: . is a directory"),
        (["-o", "/no/such/dir/p.json"], "--output: the directory of /no/such/dir/p.json"),
    ],
)
def test_cli_argument_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(["calibrate", "--simulate", "h200", *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line


def test_the_cuda_read_kernel_compiles_for_sm_90_with_wide_cached_loads():
    pytest.importorskip("triton")
    from fxprefetch.devices.calibrate_hw import compile_read_kernel, read_launch

    ptx = compile_read_kernel(90).asm["ptx"]
    assert "ld.global.cg.v4.b32" in ptx  # 16-byte loads, L2 only
    words, per, programs = read_launch(240 * MiB, 132)
    assert words == 240 * MiB // 4 and per % 4096 == 0 and programs * per >= words
    assert (programs - 1) * per < words <= 4 * 132 * per  # no idle program, 4 per SM at most


def test_a_negative_fitted_cost_is_clamped_at_zero_and_says_so():
    """Noise can tip a near-zero per-MB cost below 0: the file keeps 0 (which the reader
    accepts), and the provenance says what the fit gave."""
    from fxprefetch.devices.profile_file import from_dict

    noisy = replace(
        H200, jitter=0.0, lowerings={"side_stream": (0.5, -0.0003), "compute_stream": (0.2, 0.01)}
    )
    result, _, _ = _run(noisy)
    doc = cal.profile_document(result, "h200-calibrated")
    per_mb = doc["constants"]["lowerings"]["side_stream"]["per_mb_us"]
    assert per_mb["value"] == 0
    assert "clamped at 0 (the fit gave -0.0003)" in per_mb["provenance"]["source"]
    assert (
        "clamped"
        not in doc["constants"]["lowerings"]["side_stream"]["fixed_us"]["provenance"]["source"]
    )
    assert from_dict(doc).cost("side_stream").per_mb_us.value == 0
