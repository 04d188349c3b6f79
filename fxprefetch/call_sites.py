"""Graphs dynamo compiled for one module's own frame, and every module that runs them.

A graph break inside a decoder layer (transformers' ``experts_implementation="eager"``, a
``.tolist()``) makes dynamo compile the layer's ``forward`` as a frame of its own: the graph's
sources are relative to that layer (``L['self'].self_attn.q_proj.weight``), and dynamo reuses
the graph for every layer its guards accept, passing each layer's parameters. Here:

- at compile time, the path of the frame's module in the model that ``torch.compile`` wraps
  (found on the Python stack; the model's parameters are matched by storage), so the graph's
  weights and modules are named by their parameter paths (:attr:`CallSites.prefix`);
- at run time, each call of the graph is matched to its call site by the storage of the
  weights it is given (one dictionary look-up per call): a new site's weights are named by
  their parameter paths and the site is added to the graph's plans (``call_sites``, and each
  record's note), so the plans list every prefetch that runs.

Nothing here guesses: where the model or a weight's path cannot be found, names stay as
dynamo gives them.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from fxprefetch.plan import PrefetchPlan

logger = logging.getLogger(__name__)

_SELF = "self"  # the receiver's name where the frame's code is not found


def _receiver_root() -> str:
    """The dynamo source root of the compiled frame's receiver (``L['self']``): the first
    argument of the frame's code object (of the function a graph break resumes), whatever
    ``forward`` names it (``def forward(s, x)``)."""
    name = _SELF
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = getattr(InstructionTranslator.current_tx(), "output", None)
        code = getattr(getattr(tx, "root_tx", None), "f_code", None)
        resumed = ContinueExecutionCache.generated_code_metadata
        while code is not None and code in resumed:  # a resume function: its original's
            code = resumed[code].code
    except (ImportError, AttributeError):  # another torch: assume ``self``
        code = None
    if code is not None and code.co_argcount > 0:
        name = code.co_varnames[0]
    return f"L[{name!r}]"


def _compiled_model() -> torch.nn.Module | None:
    """The module ``torch.compile`` wraps, from the Python stack: the innermost
    ``OptimizedModule`` (its ``_orig_mod``) or module compiled in place (``m.compile()``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule):
            return owner._orig_mod
        if isinstance(owner, torch.nn.Module) and owner._compiled_call_impl is not None:
            return owner
        frame = frame.f_back
    return None


def _storage_key(tensor: Any) -> tuple[int, tuple[int, ...]] | None:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.numel() == 0:
        return None
    return tensor.data_ptr(), tuple(tensor.shape)


@dataclasses.dataclass
class CallSites:
    """One graph compiled for a module's frame: its call sites, as they run."""

    prefix: str  # the first call site's module path in the model ("model.layers.0")
    relative: list[str | None]  # per graph input: its path below the frame's module
    paths: dict[tuple[int, tuple[int, ...]], list[str]]  # storage -> the model's paths
    sites: list[str] = dataclasses.field(default_factory=list)
    plans: list[PrefetchPlan] = dataclasses.field(default_factory=list)
    _by_key: dict[tuple[int, tuple[int, ...]], dict[int, str]] = dataclasses.field(
        default_factory=dict
    )
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def source_names(self) -> list[str | None]:
        """The graph's inputs named by the first call site's parameter paths."""
        return [f"{self.prefix}.{r}" if r else None for r in self.relative]

    def _site_of(self, inputs: Sequence[Any]) -> tuple[str, dict[int, str]] | None:
        """The call site whose parameters ``inputs`` holds, and each weight input's path."""
        names: dict[int, str] = {}
        site = None
        for i, rel in enumerate(self.relative):
            key = _storage_key(inputs[i]) if rel and i < len(inputs) else None
            full = next((p for p in self.paths.get(key, ()) if p.endswith(f".{rel}")), None)
            if full is None:
                continue
            names[i] = full
            site = site or full[: -len(rel) - 1]
        return (site, names) if site else None

    def names_for(self, inputs: Sequence[Any]) -> dict[int, str] | None:
        """Input index -> parameter path for this call; a new call site is recorded in the
        plans. None: the call's weights are not the model's (named as dynamo names them)."""
        first = next((i for i, r in enumerate(self.relative) if r and i < len(inputs)), None)
        key = _storage_key(inputs[first]) if first is not None else None
        if key is None:
            return None
        found = self._by_key.get(key)
        if found is not None:
            return found
        site = self._site_of(inputs)
        if site is None:
            return None
        with self._lock:
            self._by_key[key] = site[1]
            if site[0] not in self.sites:
                self.sites.append(site[0])
                self._note_sites()
        return site[1]

    def attach(self, plans: Sequence[PrefetchPlan]) -> None:
        """Record the call sites in ``plans`` (those of this graph), now and as they come."""
        with self._lock:
            self.plans.extend(plans)
            self._note_sites()

    def _note_sites(self) -> None:
        for plan in self.plans:
            plan.call_sites[:] = self.sites
            if len(self.sites) < 2:
                continue
            for i, record in enumerate(plan.records):
                if not record.weight.startswith(f"{self.prefix}."):
                    continue
                rel = record.weight[len(self.prefix) + 1 :]
                weights = ", ".join(f"{site}.{rel}" for site in self.sites)
                note = f"graph shared by {len(self.sites)} call sites ({weights})"
                plan.records[i] = dataclasses.replace(record, note=note)


def _under(name: str, root: str) -> bool:
    """Whether the source ``name`` is ``root`` or reached from it (not ``L['s2']``)."""
    return name.startswith(root) and name[len(root) : len(root) + 1] in ("", ".", "[")


def frame_call_sites(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], relative: Sequence[str | None]
) -> CallSites | None:
    """The call sites of ``gm`` where dynamo compiled it for a module's frame that is not the
    compiled model itself (``relative``: each input's parameter path below the frame's
    module, from its dynamo source); None otherwise, or where the model is not found."""
    root = _receiver_root()
    rooted = []
    for node, rel in zip(gm.graph.find_nodes(op="placeholder"), relative, strict=False):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        rooted.append(rel if rel and isinstance(name, str) and _under(name, root) else None)
    if not any(rooted):
        return None
    model = _compiled_model()
    if model is None:
        return None
    paths: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    named = (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    )
    for path, tensor in named:
        key = _storage_key(tensor)
        if key is not None:
            paths.setdefault(key, []).append(path)
    sites = CallSites(prefix="", relative=rooted, paths=paths)
    first = sites._site_of(example_inputs)
    if first is None or not first[0]:
        return None  # the frame is the model's own (or its weights are not the model's)
    sites.prefix = first[0]
    sites.names_for(example_inputs)  # the first call site
    logger.debug("graph compiled for %s's frame: named by parameter paths", sites.prefix)
    return sites
