"""Model presets: tiny ones for demos and tests, real-size ones built on the meta device.

Used by the CLI, the demo, the benchmarks and the tests; fxprefetch's compile path never needs
them.
"""

from fxprefetch.presets.build import ModelError, build_model, example_inputs, load_config
from fxprefetch.presets.catalog import PRESETS, Preset, preset_names

__all__ = [
    "PRESETS",
    "ModelError",
    "Preset",
    "build_model",
    "example_inputs",
    "load_config",
    "preset_names",
]
