"""The target registry: what each ``target`` option compiles to.

A :class:`TargetSpec` names a target, the passes of its pipeline (``fxprefetch.pipeline``),
the function that lowers a dynamo graph with them, whether the driver regenerates the code
after the passes, and whether the compiled graph is replayed as a CUDA graph under a mode.

- ``inductor`` (:mod:`.inductor`): ``compile_fx`` with the pass as its post-grad pass (CPU/GPU);
- ``eager`` (:mod:`.eager`): AOT autograd with the pass and no code generation (debugging);
- ``npu`` (:mod:`.npu`): torchair's backend with the pass and the ``npu_prefetch`` lowering.

Adding a target is one entry in :data:`TARGETS` and one module with its compile function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fxprefetch.pipeline import PIPELINES, RECOMPILES, GraphPass
from fxprefetch.targets.eager import compile_eager
from fxprefetch.targets.inductor import compile_inductor, uses_cudagraphs
from fxprefetch.targets.npu import compile_npu, npu_available

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
    """One target: its pipeline, its compile function, and how its graphs run."""

    name: str
    compile: TargetCompiler
    # torch.compile's mode -> whether the compiled graph is replayed as a CUDA graph
    replays_cudagraphs: Callable[[str | None], bool] = _never_replayed

    @property
    def passes(self) -> tuple[GraphPass, ...]:
        """The passes that run on each aten graph, in order."""
        return tuple(PIPELINES[self.name])

    @property
    def recompiles(self) -> bool:
        """Whether the driver regenerates the code (inductor does it itself)."""
        return RECOMPILES[self.name]


TARGETS: Mapping[str, TargetSpec] = MappingProxyType(
    {
        "npu": TargetSpec("npu", compile_npu),
        "inductor": TargetSpec("inductor", compile_inductor, uses_cudagraphs),
        "eager": TargetSpec("eager", compile_eager),
    }
)
# the ``target`` option's values
TARGET_NAMES: tuple[str, ...] = (AUTO, *TARGETS)


def resolve_target(target: str) -> str:
    """``auto`` means ``npu`` where torch_npu sees a device, else ``inductor``."""
    if target != AUTO:
        return target
    return "npu" if npu_available() else "inductor"


def target_spec(target: str) -> TargetSpec:
    """The registered target ``target`` (``auto`` resolved); ``ValueError`` if unknown."""
    name = resolve_target(target)
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {tuple(TARGETS)}")
    return TARGETS[name]


__all__ = ["AUTO", "TARGETS", "TARGET_NAMES", "TargetSpec", "resolve_target", "target_spec"]
