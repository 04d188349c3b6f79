"""vllm-ascend 0.23.0.post1's REAL Python source, for tests on a machine without CANN.

vllm-ascend is never installed (it pins torch 2.10 and torch-npu 2.10, and its build needs
CANN): its sdist is downloaded, checked against the pinned sha256, and only the ``.py`` files
under ``vllm_ascend/`` are extracted, into ``~/.cache/fxprefetch/vllm-ascend-0.23.0.post1``
(``$FXPREFETCH_VLLM_ASCEND_DIR`` overrides). Never committed to this repository.

pip can only download the sdist after building its metadata, which needs a chip type
(``SOC_VERSION``) and setuptools-scm; setuptools-scm (pinned) is installed into a throw-away
folder for that one ``pip download``, so this script needs nothing but pip.

0.23.0.post1 is the last release that ships the built-in weight prefetch
(``vllm_ascend/ops/weight_prefetch.py``). Run ``python tests/support/vllm_ascend_real.py`` to
fetch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the ``support`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# one pinned-download check for both sources
from support.torchair_real import _sha256

VERSION = "0.23.0.post1"
SDIST = f"vllm_ascend-{VERSION}.tar.gz"
SDIST_SHA256 = "a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1"
SETUPTOOLS_SCM = "setuptools-scm==10.3.4"  # only to build the sdist's metadata
SOC_VERSION = "ascend910b1"  # any chip type: the metadata needs one, the Python code does not
DEFAULT_DIR = Path.home() / ".cache" / "fxprefetch" / f"vllm-ascend-{VERSION}"


class VllmAscendUnavailableError(RuntimeError):
    """vllm-ascend's source could not be fetched (the reason says why)."""


def source_dir() -> Path:
    return Path(os.environ.get("FXPREFETCH_VLLM_ASCEND_DIR", DEFAULT_DIR))


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    if done.returncode != 0:
        raise VllmAscendUnavailableError(f"pip {args[0]} failed: {done.stderr.strip()[-800:]}")


def fetch(dest: Path | None = None) -> Path:
    """Download the sdist (never install it), check it, extract ``vllm_ascend/**/*.py``.

    Returns the folder to put on ``sys.path``. Idempotent: an extraction is reused.
    """
    dest = dest or source_dir()
    if (dest / "vllm_ascend" / "__init__.py").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="fxprefetch-vllm-ascend-") as tmp:
        tools = Path(tmp) / "build-tools"
        _pip("install", "-q", "--target", str(tools), SETUPTOOLS_SCM)
        env = dict(os.environ, SOC_VERSION=SOC_VERSION, PYTHONPATH=str(tools))
        _pip("download", "-q", "--no-deps", "--no-build-isolation", "-d", tmp,
             f"vllm-ascend=={VERSION}", env=env)  # fmt: skip
        sdist = Path(tmp) / SDIST
        if not sdist.exists():
            raise VllmAscendUnavailableError(f"pip download did not produce {SDIST}")
        if (got := _sha256(sdist)) != SDIST_SHA256:
            raise VllmAscendUnavailableError(f"{SDIST}: sha256 {got}, expected {SDIST_SHA256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        prefix = f"vllm_ascend-{VERSION}/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix(prefix)
                if member.isfile() and name.startswith("vllm_ascend/") and name.endswith(".py"):
                    target = staging / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    try:
        staging.rename(dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# `python tests/support/vllm_ascend_real.py`: fetch once (CI may do this)
if __name__ == "__main__":
    print(fetch())
