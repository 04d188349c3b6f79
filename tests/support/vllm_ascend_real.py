"""vllm-ascend's REAL Python source (0.23.0.post1, 0.26.0rc1, 0.30.0rc2), for tests without CANN.

vllm-ascend is never installed (it pins torch 2.10 and torch-npu 2.10, and its build needs
CANN): its sdist (or, where the release has one, its CPython 3.11 x86-64 wheel) is downloaded,
checked against the pinned sha256, and only the ``.py`` files under ``vllm_ascend/`` are
extracted, into ``~/.cache/fxprefetch/vllm-ascend-<version>`` (``$FXPREFETCH_VLLM_ASCEND_CACHE``
replaces ``~/.cache/fxprefetch``; ``$FXPREFETCH_VLLM_ASCEND_DIR`` the 0.23.0.post1 folder).
Never committed to this repository.

pip can only download the sdist after building its metadata, which needs a chip type
(``SOC_VERSION``) and setuptools-scm; setuptools-scm (pinned) is installed into a throw-away
folder for that one ``pip download``, so this script needs nothing but pip.

0.23.0.post1 is the last release that ships the built-in weight prefetch
(``vllm_ascend/ops/weight_prefetch.py``). Run ``python tests/support/vllm_ascend_real.py`` to
fetch (``python tests/support/vllm_ascend_real.py 0.30.0rc2`` for another pinned version).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the ``support`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# one pinned-download check for both sources
from support.torchair_real import _sha256

VERSION = "0.23.0.post1"  # the default: the last release with the built-in prefetch
SETUPTOOLS_SCM = "setuptools-scm==10.3.4"  # only to build an sdist's metadata
SOC_VERSION = "ascend910b1"  # any chip type: the metadata needs one, the Python code does not
WHEEL_PLATFORM = ("--only-binary=:all:", "--python-version", "3.11",
                  "--platform", "manylinux_2_34_x86_64")  # fmt: skip


@dataclass(frozen=True)
class Release:
    """One vllm-ascend release: the file pip downloads (an sdist, or a wheel where the
    release has one for CPython 3.11 on x86-64; both carry the same Python source) and its
    sha256."""

    version: str
    artifact: str
    sha256: str

    @property
    def is_wheel(self) -> bool:
        return self.artifact.endswith(".whl")


# the releases the tests run (README / docs/vllm.md: compatibility table)
RELEASES = {
    r.version: r
    for r in (
        Release("0.23.0.post1", "vllm_ascend-0.23.0.post1.tar.gz",
                "a3b9f4a5dd7aa50c37e03d1f35937c4ae5aeacc49b734cac74d59ce5757738e1"),
        Release("0.26.0rc1", "vllm_ascend-0.26.0rc1-cp311-cp311-manylinux_2_34_x86_64.whl",
                "f9ae1cbd28975658695191d78a2de0b141468a24e18951d680dc4ae674a6984a"),
        Release("0.30.0rc2", "vllm_ascend-0.30.0rc2.tar.gz",
                "05cb51448c0cd174ea338b16ebbfc8e215f44b373ea2a0d65f1314523a01152f"),
    )
}  # fmt: skip
SDIST = RELEASES[VERSION].artifact
SDIST_SHA256 = RELEASES[VERSION].sha256
CACHE = Path.home() / ".cache" / "fxprefetch"
DEFAULT_DIR = CACHE / f"vllm-ascend-{VERSION}"


class VllmAscendUnavailableError(RuntimeError):
    """vllm-ascend's source could not be fetched (the reason says why)."""


def source_dir(version: str = VERSION) -> Path:
    """Where ``version``'s source is extracted: ``$FXPREFETCH_VLLM_ASCEND_DIR`` for the default
    version; ``vllm-ascend-<version>`` under ``$FXPREFETCH_VLLM_ASCEND_CACHE`` (default
    ``~/.cache/fxprefetch``) for every version."""
    if version == VERSION and "FXPREFETCH_VLLM_ASCEND_DIR" in os.environ:
        return Path(os.environ["FXPREFETCH_VLLM_ASCEND_DIR"])
    return Path(os.environ.get("FXPREFETCH_VLLM_ASCEND_CACHE", CACHE)) / f"vllm-ascend-{version}"


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)
    if done.returncode != 0:
        raise VllmAscendUnavailableError(f"pip {args[0]} failed: {done.stderr.strip()[-800:]}")


def _download(release: Release, tmp: str) -> Path:
    requirement = f"vllm-ascend=={release.version}"
    if release.is_wheel:
        _pip("download", "-q", "--no-deps", *WHEEL_PLATFORM, "-d", tmp, requirement)
    else:
        tools = Path(tmp) / "build-tools"
        _pip("install", "-q", "--target", str(tools), SETUPTOOLS_SCM)
        env = dict(os.environ, SOC_VERSION=SOC_VERSION, PYTHONPATH=str(tools))
        _pip("download", "-q", "--no-deps", "--no-build-isolation", "--no-binary=vllm-ascend",
             "-d", tmp, requirement, env=env)  # fmt: skip
    found = Path(tmp) / release.artifact
    if not found.exists():
        raise VllmAscendUnavailableError(f"pip download did not produce {release.artifact}")
    if (got := _sha256(found)) != release.sha256:
        raise VllmAscendUnavailableError(
            f"{release.artifact}: sha256 {got}, expected {release.sha256}"
        )
    return found


def _python_files(artifact: Path, version: str) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every ``vllm_ascend/**/*.py`` in the sdist or wheel."""
    if artifact.name.endswith(".whl"):
        with zipfile.ZipFile(artifact) as wheel:
            for name in wheel.namelist():
                if name.startswith("vllm_ascend/") and name.endswith(".py"):
                    yield name, wheel.read(name)
        return
    prefix = f"vllm_ascend-{version}/"
    with tarfile.open(artifact) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(prefix)
            if member.isfile() and name.startswith("vllm_ascend/") and name.endswith(".py"):
                yield name, tar.extractfile(member).read()  # type: ignore[union-attr]


def fetch(dest: Path | None = None, version: str = VERSION) -> Path:
    """Download ``version``'s sdist or wheel (never install it), check its sha256, extract
    ``vllm_ascend/**/*.py``.

    Returns the folder to put on ``sys.path``. Idempotent: an extraction is reused.
    """
    if version not in RELEASES:
        raise VllmAscendUnavailableError(f"vllm-ascend {version} is not pinned here")
    dest = dest or source_dir(version)
    if (dest / "vllm_ascend" / "__init__.py").exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="fxprefetch-vllm-ascend-") as tmp:
        artifact = _download(RELEASES[version], tmp)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=dest.parent))
        for name, data in _python_files(artifact, version):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    try:
        staging.rename(dest)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# `python tests/support/vllm_ascend_real.py`: fetch once (CI may do this)
if __name__ == "__main__":
    for name in sys.argv[1:] or [VERSION]:
        print(fetch(version=name))
