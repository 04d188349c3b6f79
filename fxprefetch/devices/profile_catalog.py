"""The built-in device profiles, as data in the device-profile file's form
(``fxprefetch.devices.profile_file``): every constant with its provenance; and the
catalogue's lookups: a profile by name (:func:`profile`), by name or file
(:func:`resolve_profile`), by a device's reported name (:func:`match_profile`,
:func:`gpu_profile`).

- ``h200``: measured on an NVIDIA H200 on 2026-11-30
  (``benchmarks/results/gpu-h200-2026-11-30/``) and fitted to that run
  (``fxprefetch.devices.profile_fit``; ``tests/devices/test_profile_fit.py`` re-derives each
  measured and fitted value from the files).
- ``h100``, ``a100``, ``b200``: derived from the H200's and their datasheets, labelled so,
  until a ``fxprefetch calibrate`` run measures them.
- ``ascend-910b``, ``ascend-a3``: δ fitted to vllm-ascend's published A3 result (Qwen3-235B-A22B,
  P90 TPOT 112 -> 102 ms); the Cmo cost and the bandwidth are assumptions.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from fxprefetch.devices.profile_file import Constant, DeviceProfile, ProfileError, from_dict, read

H200_RUN = "benchmarks/results/gpu-h200-2026-11-30"
H200_MACHINE = "NVIDIA H200 (sm_90, 132 SMs), torch 2.11.0+cu130, 2026-11-30"
MICRO = f"{H200_RUN}/bench_micro.json ({H200_MACHINE})"
LAYERS_B1 = f"{H200_RUN}/bench_b1.json ({H200_MACHINE})"

# The H200's δ (µs saved per MB made L2-resident, cuBLAS GEMV of a 32 MiB weight, median of
# none - hot over windows >= 2 µs), per MB; the fork/join alone (fork - none, same rows).
H200_DELTA_1 = 0.0553
H200_DELTA_16 = 0.0749
H200_FORK_US = 0.548
# fitted by fxprefetch.devices.profile_fit.fit_per_mb on ONE row: batch 1, default cap
# (bench_b1.json)
H200_SIDE_PER_MB = 0.1151
# fitted by fxprefetch.devices.profile_fit.fit_line to bench_micro's "same" arm (prefetch on the
# compute stream, no fork), M = 1, windows >= 2 µs: (same - none) + δ·MB = fixed + per_mb·MB
H200_COMPUTE_FIXED = 1.835
H200_COMPUTE_PER_MB = 0.147
# A3: δ that makes the model predict the published saving (fxprefetch.devices.profile_fit.fit_delta
# on the project's qwen3-235b-a22b preset, one layer planned as on one A3 die). Per MB that
# lands in the model's windows (about a quarter of the 65 MB prefetched per layer land with
# the assumed 3 µs per window kernel); per MB prefetched it is about 1.7 µs/MB.
A3_DELTA = 7.66
# κ: the share of a byte's HBM time that L2 residency removes on the H200 (δ x B_read)
H200_READ = 3.9e12
KAPPA_1 = H200_DELTA_1 * H200_READ / 1e12  # µs/MB x MB/µs
KAPPA_16 = H200_DELTA_16 * H200_READ / 1e12


def _c(value: float, kind: str, source: str) -> dict[str, Any]:
    return {"value": value, "provenance": {"kind": kind, "source": source}}


def _profile(name: str, label: str, kind: str, **constants: Any) -> dict[str, Any]:
    return {
        "schema": "fxprefetch.device_profile",
        "version": 1,
        "name": name,
        "label": label,
        "kind": kind,
        "device": {},
        "constants": constants,
    }


def _h200() -> dict[str, Any]:
    return _profile(
        "h200",
        "NVIDIA H200 SXM 141GB",
        "gpu",
        read_bytes_per_s=_c(
            H200_READ,
            "measured",
            "streaming HBM read: RRZE-HPC/gpu-benches gpu-l2-cache/h200.txt (3.89 TB/s); the "
            "2026-11-30 run's probe load arm read 32 MiB in 8.22 µs (4.1 TB/s)",
        ),
        hbm_peak_bytes_per_s=_c(4.8e12, "spec", "H200 datasheet: HBM3e 4.8 TB/s"),
        l2_bytes=_c(62914560, "measured", f"reported by torch.cuda, {H200_RUN}/facts.json"),
        cores=_c(132, "spec", "Hopper whitepaper: 132 SMs (GH100 SXM5)"),
        kernel_us=_c(
            1.3,
            "measured",
            "one small kernel in a replayed CUDA graph: RRZE-HPC/gpu-benches "
            "gpu-small-kernels/h200_graph.txt",
        ),
        delta_us_per_mb_1_token=_c(H200_DELTA_1, "measured", f"{MICRO}: none - hot, M = 1"),
        delta_us_per_mb_16_tokens=_c(H200_DELTA_16, "measured", f"{MICRO}: none - hot, M = 16"),
        margin_us=_c(
            0.5,
            "assumed",
            "do no harm: emit only where the net saving exceeds 0.5 µs (not measured)",
        ),
        lowerings={
            "side_stream": {
                "fixed_us": _c(H200_FORK_US, "measured", f"{MICRO}: fork - none, M = 1"),
                "per_mb_us": _c(
                    H200_SIDE_PER_MB,
                    "fitted",
                    f"{LAYERS_B1}: the batch-1 default-cap row only (fit_per_mb); the other "
                    "three rows are held out",
                ),
            },
            "compute_stream": {
                "fixed_us": _c(H200_COMPUTE_FIXED, "fitted", f"{MICRO}: same - none + δ·MB, M = 1"),
                "per_mb_us": _c(
                    H200_COMPUTE_PER_MB, "fitted", f"{MICRO}: same - none + δ·MB, M = 1"
                ),
            },
        },
    )


def _derived_gpu(
    name: str,
    label: str,
    peak: float,
    peak_source: str,
    l2: float,
    cores: int,
    spec: str,
    delta_1: float | None = None,
    delta_source: str = "",
    read: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """A GPU derived from the H200: read bandwidth at the H200's read/peak share, δ from the
    H200's κ (δ = κ / B_read), kernel and lowering costs carried over."""
    read_value, read_source = read or (
        round(peak * H200_READ / 4.8e12, -9),
        f"{peak_source} x the H200's measured read/peak (3.9/4.8)",
    )
    why = "derived from the H200's (same CUDA graph and stream machinery), until calibrated"
    d1 = delta_1 if delta_1 is not None else KAPPA_1 / (read_value / 1e12)
    d16 = d1 * H200_DELTA_16 / H200_DELTA_1
    d_src = delta_source or (f"the H200's κ = δ·B_read ({KAPPA_1:.3f}) over this read bandwidth")
    return _profile(
        name,
        label,
        "gpu",
        read_bytes_per_s=_c(read_value, "derived", read_source),
        hbm_peak_bytes_per_s=_c(peak, "spec", peak_source),
        l2_bytes=_c(l2, "spec", spec),
        cores=_c(cores, "spec", spec),
        kernel_us=_c(1.3, "derived", "the H200's measured 1.3 µs, " + why),
        delta_us_per_mb_1_token=_c(round(d1, 4), "derived", d_src),
        delta_us_per_mb_16_tokens=_c(
            round(d16, 4), "derived", "δ at 1 token x the H200's δ16/δ1 ratio"
        ),
        margin_us=_c(
            0.5,
            "assumed",
            "do no harm: emit only where the net saving exceeds 0.5 µs (not measured)",
        ),
        lowerings={
            "side_stream": {
                "fixed_us": _c(H200_FORK_US, "derived", "the H200's, " + why),
                "per_mb_us": _c(H200_SIDE_PER_MB, "derived", "the H200's, " + why),
            },
            "compute_stream": {
                "fixed_us": _c(H200_COMPUTE_FIXED, "derived", "the H200's, " + why),
                "per_mb_us": _c(H200_COMPUTE_PER_MB, "derived", "the H200's, " + why),
            },
        },
    )


def _ascend(name: str, label: str, spec: str) -> dict[str, Any]:
    fitted = (
        "makes the model predict vllm-ascend's published A3 result (Qwen3-235B-A22B, "
        "P90 TPOT 112 -> 102 ms, 94 layers) on the qwen3-235b-a22b preset (fit_delta)"
    )
    if name != "ascend-a3":
        fitted = "the A3 die's fitted δ (same Da Vinci cores and L2), which " + fitted
    kind = "fitted" if name == "ascend-a3" else "derived"
    cmo = "one Cmo task in a GE graph (not measured here)"
    side = "a prefetch on its own stream in aclgraph / npugraph_ex (not measured)"
    return _profile(
        name,
        label,
        "npu",
        read_bytes_per_s=_c(1.6e12, "spec", spec),
        l2_bytes=_c(192e6, "spec", spec),
        cores=_c(24, "spec", spec),
        kernel_us=_c(3.0, "assumed", "one vector op in a GE graph (not measured here)"),
        delta_us_per_mb_1_token=_c(A3_DELTA, kind, fitted),
        delta_us_per_mb_16_tokens=_c(A3_DELTA, kind, fitted + "; the same at every token count"),
        margin_us=_c(0.0, "assumed", "on Ascend the user's ratios are honoured: no gate"),
        lowerings={
            "ascend_cmo": {
                "fixed_us": _c(1.0, "assumed", cmo),
                "per_mb_us": _c(0.0, "assumed", cmo),
            },
            "ascend_side_stream": {
                "fixed_us": _c(1.0, "assumed", side),
                "per_mb_us": _c(0.0, "assumed", side),
            },
        },
    )


def catalogue() -> list[dict[str, Any]]:
    """The built-in profiles' JSON objects, in the CLI's order."""
    return [
        _derived_gpu(
            "a100",
            "NVIDIA A100 SXM4 80GB",
            2.039e12,
            "A100 datasheet: HBM2e 2,039 GB/s",
            40e6,
            108,
            "A100 whitepaper: 40 MB L2, 108 SMs",
        ),
        _derived_gpu(
            "h100",
            "NVIDIA H100 SXM5 80GB",
            3.35e12,
            "H100 datasheet: HBM3 3.35 TB/s",
            50e6,
            132,
            "Hopper whitepaper: 50 MB L2, 132 SMs",
            delta_1=0.13,
            read=(
                2.98e12,
                "the H800 SXM's measured read (2978 GB/s, chanzhennan/ChipBenchmarker README): "
                "the same GH100 and HBM3",
            ),
            delta_source=(
                "gpu-l2-round2 findings §2: GEMV hot time taken equal to the H200's, "
                "cold at 2.98 TB/s (H800 SXM read, chanzhennan/ChipBenchmarker)"
            ),
        ),
        _h200(),
        _derived_gpu(
            "b200",
            "NVIDIA B200 192GB",
            8.0e12,
            "DGX B200 datasheet: HBM3e 8 TB/s per GPU",
            126e6,
            148,
            "126 MB L2 and 148 SMs as measured (chipsandcheese, 2025)",
        ),
        _ascend(
            "ascend-910b",
            "Huawei Ascend 910B (Atlas A2)",
            "approximate: 64 GB HBM2e at about 1.6 TB/s, 192 MB L2, 24 AI cores (commonly "
            "cited figures; Huawei publishes no bandwidth)",
        ),
        _ascend(
            "ascend-a3",
            "Huawei Ascend 910_93 die (Atlas A3)",
            "approximate, per die (a device to torch_npu): 64 GB HBM at about 1.6 TB/s, "
            "192 MB L2, 24 AI cores (commonly cited figures)",
        ),
    ]


#: The built-in profiles, read from the catalogue's data like any profile file.
PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (from_dict(d) for d in catalogue())}

_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bB200\b|\bGB200\b", "b200"),
    (r"\bH200\b|\bGH200\b", "h200"),
    (r"\bH100\b", "h100"),
    (r"\bA100\b", "a100"),
    (r"910_?9[3-9]|\bA3\b", "ascend-a3"),
    (r"910B", "ascend-910b"),
)


def profile(name: str) -> DeviceProfile:
    """The profile named ``name`` (a key of :data:`PROFILES`); ``KeyError`` names them all."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown device profile {name!r}; expected one of {list(PROFILES)}"
        ) from None


def resolve_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or the profile file at a path (``device_profile``).
    :class:`ProfileError` says what was wrong."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ProfileError(
            "device_profile", f"expected a profile name or a file path, got {name_or_path!r}"
        )
    if name_or_path.lower() in PROFILES:
        return PROFILES[name_or_path.lower()]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists() or "/" in name_or_path:
        return read(path)
    raise ProfileError(
        repr(name_or_path),
        f"unknown device profile; expected a built-in one ({list(PROFILES)}) or a profile "
        "file's path (.json)",
    )


def match_profile(device_name: str) -> DeviceProfile | None:
    """The profile of a device by its reported name (``NVIDIA H200``, ``Ascend910B2``)."""
    for pattern, name in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PROFILES[name]
    return None


def gpu_profile(device_name: str, bytes_per_s: float, l2_bytes: int, sms: int) -> DeviceProfile:
    """The profile of a GPU present here: the matching built-in profile with what the device
    reports (peak bandwidth, L2, SMs); an unknown GPU gets the H200's constants scaled to its
    reported bandwidth, labelled derived."""
    reported = "reported by the device (torch.cuda.get_device_properties)"
    base = match_profile(device_name)
    if base is None or base.kind != "gpu":
        h200 = PROFILES["h200"]
        scale = bytes_per_s / h200.hbm_bytes_per_s if bytes_per_s > 0 else 1.0
        why = "derived: the H200's, scaled to this GPU's reported peak bandwidth"
        base = replace(
            h200,
            name="gpu",
            read_bytes_per_s=Constant(h200.read_bytes_per_s.value * scale, "derived", why),
            delta_1=Constant(h200.delta_1.value / scale, "derived", why),
            delta_16=Constant(h200.delta_16.value / scale, "derived", why),
        )
    return replace(
        base,
        label=device_name,
        hbm_peak_bytes_per_s=Constant(bytes_per_s, "measured", reported),
        l2_bytes=Constant(float(l2_bytes), "measured", reported),
        cores=Constant(float(sms), "measured", reported),
    )
