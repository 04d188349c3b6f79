"""fxprefetch's exception types, with one base class, :class:`FxprefetchError`.

``except fxprefetch.FxprefetchError`` catches any of them. Each keeps the builtin base it had
(``ValueError`` for bad input, ``RuntimeError`` for what fails at run time), so callers that
catch those keep working. The modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class FxprefetchError(Exception):
    """Base class of every exception fxprefetch raises on purpose."""


class ConfigError(FxprefetchError, ValueError):
    """A ``weight_prefetch_config`` (or backend option) that is not valid.

    ``path`` is the JSON path of the offending value, e.g.
    ``weight_prefetch_config.prefetch_ratio.mlp.down``.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class ModelError(FxprefetchError, ValueError):
    """A model name or config file that cannot be built."""


class PipelineOrderError(FxprefetchError, ValueError):
    """A pipeline runs a pass before one it requires, or after one it conflicts with."""


class CliError(FxprefetchError):
    """A user error: printed as one line, exit code 2."""


class SchemaError(FxprefetchError, RuntimeError):
    """The schema itself uses a keyword this validator does not implement."""


class PrefetchPassError(FxprefetchError, RuntimeError):
    """The weight-prefetch pass failed on a graph (raised only in strict mode)."""


class PassFailedError(FxprefetchError, RuntimeError):
    """A pass raised: the message names the pass and the passes run before it, then the
    pass's own exception (also the ``__cause__``)."""


class InvariantError(FxprefetchError, RuntimeError):
    """A pass left the graph breaking an invariant; the message names the pass."""


class NpuLoweringError(FxprefetchError, RuntimeError):
    """The graph cannot be lowered to ``npu.npu_prefetch``."""


class NpuUnavailableError(FxprefetchError, RuntimeError):
    """target 'npu' was asked for, but torchair/torch_npu cannot be imported."""


class ProfileError(FxprefetchError, ValueError):
    """A device profile that does not follow the format; the message names the field."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"device profile {where}: {message}")


class CalibrationError(FxprefetchError, RuntimeError):
    """The device cannot be calibrated (no device, too small, a measurement unusable)."""


class NpuStreamsUnavailableError(FxprefetchError, RuntimeError):
    """torch_npu's stream runtime (``torch.npu.Stream``) is not loaded."""


__all__ = [
    "CalibrationError",
    "CliError",
    "ConfigError",
    "FxprefetchError",
    "InvariantError",
    "ModelError",
    "NpuLoweringError",
    "NpuStreamsUnavailableError",
    "NpuUnavailableError",
    "PassFailedError",
    "PipelineOrderError",
    "PrefetchPassError",
    "ProfileError",
    "SchemaError",
]
