"""Where the vLLM pass reads its settings: ``additional_config`` or ``FXPREFETCH_CONFIG``.

Two sources, validated by the same code (:class:`fxprefetch.config.WeightPrefetchConfig`)
with the same errors, the path naming the source:

- vLLM's ``additional_config["weight_prefetch_config"]`` (the flag route,
  ``--additional-config '{"weight_prefetch_config": {...}}'``);
- the environment variable ``FXPREFETCH_CONFIG`` (for the explicit pass route, which has no
  ``additional_config`` to carry them): either the JSON text itself or the path of a JSON file
  holding it. The JSON is the same object as ``--additional-config`` takes
  (``{"weight_prefetch_config": {...}}``), or the section alone (``{"enabled": true, ...}``).

Where both are given, ``additional_config`` wins (it belongs to one engine, the environment
to every process) and one warning says ``FXPREFETCH_CONFIG`` was ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fxprefetch.config import ROOT_KEY, WeightPrefetchConfig
from fxprefetch.validation import ConfigError, expect_object, parse_json

logger = logging.getLogger(__name__)

ENV_VAR = "FXPREFETCH_CONFIG"
# where take_section() keeps the section it took out of additional_config (an attribute of
# the VllmConfig: it pickles with it to the engine core and the workers)
TAKEN = "_fxprefetch_section"
_warned: set[str] = set()


def additional_config(vllm_config: Any) -> Mapping[str, Any]:
    """``vllm_config.additional_config`` where it is a mapping (else ``{}``), with our section
    back in it where :func:`take_section` took it out."""
    found = getattr(vllm_config, "additional_config", None) if vllm_config else None
    found = found if isinstance(found, Mapping) else {}
    taken = getattr(vllm_config, TAKEN, None) if vllm_config else None
    return {**found, ROOT_KEY: taken} if taken is not None else found


def take_section(vllm_config: Any) -> bool:
    """Take ``weight_prefetch_config`` out of ``vllm_config.additional_config`` (a new dict:
    the user's is not changed; every other key stays as written) and keep it on the
    ``VllmConfig`` for fxprefetch alone; True if taken. For a platform that refuses keys it
    does not know (vllm-ascend 0.27.1rc1 and later)."""
    found = getattr(vllm_config, "additional_config", None)
    if not isinstance(found, Mapping) or ROOT_KEY not in found:
        return False
    object.__setattr__(vllm_config, TAKEN, found[ROOT_KEY])
    rest = {key: value for key, value in found.items() if key != ROOT_KEY}
    object.__setattr__(vllm_config, "additional_config", rest)
    return True


def _env_text(raw: str) -> str:
    if raw.lstrip().startswith("{"):
        return raw
    path = Path(raw).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            ENV_VAR,
            f"expected a JSON object or the path of a JSON file, got {raw!r}, which is "
            f"neither ({exc.strerror or exc})",
        ) from None


def config_from_env(environ: Mapping[str, str] | None = None) -> WeightPrefetchConfig | None:
    """The settings in ``FXPREFETCH_CONFIG`` (validated; ``ConfigError``), or None if unset."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not raw.strip():
        return None
    obj = expect_object(parse_json(_env_text(raw), ENV_VAR), ENV_VAR)
    if ROOT_KEY in obj:  # the --additional-config object, copied as it is
        return WeightPrefetchConfig.from_additional_config(obj, ENV_VAR)
    return WeightPrefetchConfig.from_dict(obj, ENV_VAR)


def flag_given(vllm_config: Any) -> bool:
    """Whether ``additional_config`` holds the ``weight_prefetch_config`` section."""
    return ROOT_KEY in additional_config(vllm_config)  # also where take_section() took it


def settings(vllm_config: Any, environ: Mapping[str, str] | None = None) -> WeightPrefetchConfig:
    """The settings for ``vllm_config``: its ``additional_config`` section where it has one,
    else ``FXPREFETCH_CONFIG``, else the defaults (``enabled`` not written). Both sources are
    validated whenever they are given, so a bad one stops start-up even when not used."""
    from_env = config_from_env(environ)
    from_flag = WeightPrefetchConfig.from_additional_config(additional_config(vllm_config))
    if flag_given(vllm_config):
        if from_env is not None and "both" not in _warned:
            _warned.add("both")
            logger.warning(
                "%s and additional_config.%s are both given: additional_config wins, %s is ignored",
                ENV_VAR,
                ROOT_KEY,
                ENV_VAR,
            )
        return from_flag
    return from_env if from_env is not None else from_flag


__all__ = [
    "ENV_VAR",
    "TAKEN",
    "additional_config",
    "config_from_env",
    "flag_given",
    "settings",
    "take_section",
]
