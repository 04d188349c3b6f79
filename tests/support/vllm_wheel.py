"""vLLM 0.34.0's REAL Python source, read from its wheel (never installed).

vLLM 0.34 pins torch 2.14.0, which no environment here holds: the wheel (CUDA build, about
240 MB) is downloaded once a machine, checked against the pinned sha256, and only the
``.py`` files under ``vllm/`` are taken out of the zip, into ``~/.cache/fxprefetch/vllm-0.34.0``
(``$FXPREFETCH_VLLM_SOURCE_DIR`` overrides); the wheel itself is then deleted. Read with
:mod:`ast` by tests/vllm/test_vllm_symbols.py, never imported. Run
``python tests/support/vllm_wheel.py`` to fetch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the ``support`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.torchair_real import _sha256

VERSION = "0.34.0"
WHEEL = f"vllm-{VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2"
DEFAULT_DIR = Path.home() / ".cache" / "fxprefetch" / f"vllm-{VERSION}"


class VllmSourceUnavailableError(RuntimeError):
    """vLLM's wheel could not be fetched (the reason says why)."""


def source_dir() -> Path:
    return Path(os.environ.get("FXPREFETCH_VLLM_SOURCE_DIR", DEFAULT_DIR))


def fetch(dest: Path | None = None) -> Path:
    """The folder holding ``vllm/**/*.py`` of the pinned wheel; idempotent."""
    dest = dest or source_dir()
    if (dest / "vllm" / "__init__.py").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="fxprefetch-vllm-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
               "-d", tmp, f"vllm=={VERSION}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        wheel = Path(tmp) / WHEEL
        if done.returncode != 0 or not wheel.exists():
            raise VllmSourceUnavailableError(f"pip download failed: {done.stderr[-800:]}")
        if (got := _sha256(wheel)) != WHEEL_SHA256:
            raise VllmSourceUnavailableError(f"{WHEEL}: sha256 {got}, expected {WHEEL_SHA256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    target = staging / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(name))
    try:
        staging.rename(dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(fetch())
