"""The target registry: what each ``target`` option compiles to.

A :class:`TargetSpec` holds a target's pipeline (:class:`fxprefetch.pipeline.Pipeline`: its
passes, whether the driver regenerates the code after them, how the plan names what the
prefetches became), the function that lowers a dynamo graph with it, and whether the compiled
graph is replayed as a CUDA graph under a mode.

- ``inductor`` (:mod:`.inductor`): ``compile_fx`` with the pass as its post-grad pass (CPU/GPU);
- ``eager`` (:mod:`.eager`): AOT autograd with the pass and no code generation (debugging);
- ``npu`` (:mod:`.npu`): torchair's backend with the pass and the ``npu_prefetch`` lowering.

Adding a target is one module (its ``PIPELINE`` and its compile function) and one entry in
:data:`TARGET_SPECS`; see the README's "Extending" section. :func:`make_compile_setup`
resolves a compile's setup (:class:`fxprefetch.compile_setup.CompileSetup`) through this
registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fxprefetch.compile_setup import CompileSetup
from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup, device_setup
from fxprefetch.devices.prediction import DeviceProfile
from fxprefetch.passes.tables.rules import PrefetchRules, current_rules
from fxprefetch.pipeline import Pipeline
from fxprefetch.targets import eager, inductor, npu
from fxprefetch.targets.npu import npu_available

if TYPE_CHECKING:
    from fxprefetch.planner import GraphPlanner

AUTO = "auto"  # npu where torch_npu sees a device, else inductor


class TargetCompiler(Protocol):
    """Lowers a dynamo graph, running ``planner`` on its aten graph(s)."""

    def __call__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: Sequence[Any],
        planner: GraphPlanner,
        *,
        mode: str | None = None,
        compiler_config: Any = None,
    ) -> Callable[..., Any]: ...


def _never_replayed(mode: str | None) -> bool:
    return False


@dataclass(frozen=True)
class TargetSpec:
    """One target: its pipeline, its compile function, and how its graphs run.

    ``native_l2``: the pipeline lowers to native L2 prefetches, so the devices' setup turns
    on the CUDA prefetch (its cap, the GPU's profile) where the machine has one; ``ascend``:
    the graphs run on Ascend, so the NPU's profile applies (see
    :func:`fxprefetch.devices.device_setup`).
    """

    pipeline: Pipeline
    compile: TargetCompiler
    # torch.compile's mode -> whether the compiled graph is replayed as a CUDA graph
    replays_cudagraphs: Callable[[str | None], bool] = _never_replayed
    native_l2: bool = False
    ascend: bool = False

    @property
    def name(self) -> str:
        return self.pipeline.target


#: The registered targets, by name (the ``target`` option's values besides ``auto``).
TARGET_SPECS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in (
        TargetSpec(npu.PIPELINE, npu.compile_npu, ascend=True),
        TargetSpec(
            inductor.PIPELINE, inductor.compile_inductor, inductor.uses_cudagraphs, native_l2=True
        ),
        TargetSpec(eager.PIPELINE, eager.compile_eager),
    )
}
# the ``target`` option's values
TARGET_NAMES: tuple[str, ...] = (AUTO, *TARGET_SPECS)


def resolve_target(target: str) -> str:
    """``auto`` means ``npu`` where torch_npu sees a device, else ``inductor``."""
    if target != AUTO:
        return target
    return "npu" if npu_available() else "inductor"


def target_spec(target: str) -> TargetSpec:
    """The registered target ``target`` (``auto`` resolved); ``ValueError`` if unknown."""
    name = resolve_target(target)
    if name not in TARGET_SPECS:
        raise ValueError(f"unknown target {name!r}; expected one of {tuple(TARGET_SPECS)}")
    return TARGET_SPECS[name]


def make_compile_setup(
    config: WeightPrefetchConfig,
    *,
    target: str = AUTO,
    rules: PrefetchRules | None = None,
    strict: bool = False,
    split_at_attention: bool = False,
    mode: str | None = None,
    cudagraphs: bool | None = None,
    native_prefetch: str = "auto",
    cuda_lowering: str = "side_stream",
    cache_hint: str = "none",
    ascend_lowering: str = "side_stream",
    devices: DeviceSetup | None = None,
    devices_for: str | None = None,
    device_profile: DeviceProfile | None = None,
) -> CompileSetup:
    """The setup of one compile, resolved once.

    ``target``: ``auto`` is ``npu`` where torch_npu sees a device, else ``inductor``.
    ``rules``: None takes the current rules. ``cudagraphs``: whether the compiled graph is
    replayed as a CUDA graph (None: as the target does under torch.compile's ``mode``).
    ``devices``: the devices' setup as given (a simulated device); None: this process's for
    ``devices_for`` (default: the target), with ``native_prefetch``, ``cuda_lowering``,
    ``cache_hint`` and ``ascend_lowering`` (see :mod:`fxprefetch.devices`);
    ``device_profile``: the profile to predict with on this process's device instead of
    the built-in one its name matches.
    """
    spec = target_spec(target)
    if cudagraphs is None:
        cudagraphs = spec.replays_cudagraphs(mode)
    if devices is None:
        for_devices = target_spec(devices_for) if devices_for is not None else spec
        devices = device_setup(
            native_l2=for_devices.native_l2,
            ascend=for_devices.ascend,
            cudagraphs=cudagraphs,
            native_prefetch=native_prefetch,
            cuda_lowering=cuda_lowering,
            cache_hint=cache_hint,
            ascend_lowering=ascend_lowering,
            device_profile=device_profile,
        )
    return CompileSetup(
        config=config,
        rules=rules if rules is not None else current_rules(),
        pipeline=spec.pipeline,
        devices=devices,
        strict=strict,
        split_at_attention=split_at_attention,
        cudagraphs=cudagraphs,
    )


__all__ = [
    "AUTO",
    "TARGET_NAMES",
    "TARGET_SPECS",
    "TargetSpec",
    "make_compile_setup",
    "resolve_target",
    "target_spec",
]
