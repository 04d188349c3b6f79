"""``fxprefetch.explain``: the prefetch plan of every graph a model compiles to, without
running it on a device.

The model is traced by dynamo and AOT autograd exactly as the backend would trace it; the
pass runs on the aten graphs; nothing is lowered. A model on the meta device (see
:func:`fxprefetch.presets.build_model`) costs no weight memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.eval_frame import OptimizedModule
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.devices.prediction import DeviceProfile
from fxprefetch.isolated_compile import compile_and_run
from fxprefetch.options import parse_options
from fxprefetch.passes.analysis.graph_utils import placeholder_source_names
from fxprefetch.passes.analysis.roles import layer_index, match_role, owner_path
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import make_compile_setup

logger = logging.getLogger(__name__)


def explain(
    model: torch.nn.Module | Callable[..., Any],
    *example_inputs: Any,
    config: WeightPrefetchConfig | dict | str | None = None,
    device_profile: str | DeviceProfile | None = None,
    **example_kwargs: Any,
) -> list[PrefetchPlan]:
    """Plans of every graph ``model(*example_inputs, **example_kwargs)`` compiles to.

    ``config`` takes the same forms as the backend's ``weight_prefetch_config`` option
    (``enabled`` defaults to true). Inputs may live on the meta device. For a module, a last
    plan, ``outside compiled graphs``, lists the weights with a role that no graph read:
    those that eager code read (a graph break), and those nothing read (unused), told apart
    by running the model once more without compiling it (only where such weights exist).
    ``device_profile`` (a name of ``fxprefetch.devices.profile_catalog.PROFILES``, e.g.
    ``"h200"``, a
    device profile file's path, or a profile) plans as a compile on that device would: its
    default cap, its window policy (on a GPU, ``mlp.down`` and attention windows), ``"auto"``
    sizes, each prefetch's predicted saving (a model, never a measurement), and on a GPU
    which prefetches are emitted (those predicted to pay, unless ``force_prefetch``).
    """
    opts = parse_options({"weight_prefetch_config": config} if config is not None else None)
    plans: list[PrefetchPlan] = []
    graph_inputs: set[int] = set()  # ids of every tensor some graph took as an input

    # the devices a compile for this target would set up (CUDA: window x bandwidth caps), or
    # those of the simulated device; the eager pipeline plans without lowering
    simulated = None
    if device_profile is not None:
        from fxprefetch.devices import simulated_setup

        weights_on = (
            {p.device.type for p in model.parameters()}
            if isinstance(model, torch.nn.Module)
            else set()
        )
        from fxprefetch.devices.profiles import device_profile_option

        found = device_profile_option(device_profile, "device_profile")
        simulated = simulated_setup(found, weights_on or {"meta", "cpu"})
    setup = make_compile_setup(
        opts.config,
        target="eager",
        rules=opts.rules,
        strict=True,
        devices=simulated,
        devices_for=opts.target,
    )

    def backend(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        graph_inputs.update(id(t) for t in inputs if isinstance(t, torch.Tensor))
        planner = GraphPlanner(setup, record=False, source_names=placeholder_source_names(gm))

        def plan_only(aten_gm: torch.fx.GraphModule, _: Any) -> Callable[..., Any]:
            planner(aten_gm)
            return make_boxed_func(aten_gm.forward)

        aot_autograd(
            fw_compiler=plan_only,
            bw_compiler=plan_only,
            inference_compiler=plan_only,
            decompositions=select_decomp_table(),
        )(gm, inputs)
        plans.extend(planner.plans)
        return gm.forward  # the traced graph itself: cheap on meta tensors

    if isinstance(model, OptimizedModule):  # torch.compile(m): explain m itself
        model = model._orig_mod
    # No dynamo reset, and no entry left behind (fxprefetch/isolated_compile.py): other
    # compiled code keeps its graphs, and later compiles of this model their recompile budget.
    limits = {"recompile_limit": 1 << 20, "accumulated_recompile_limit": 1 << 20}
    with torch._dynamo.config.patch(limits), torch.no_grad():
        compile_and_run(model, backend, example_inputs, example_kwargs)
    if isinstance(model, torch.nn.Module):
        outside = outside_graphs_plan(model, graph_inputs, setup.config, setup.rules)
        if outside.records:
            used = _read_eagerly(model, example_inputs, example_kwargs)
            params = {name: id(p) for name, p in model.named_parameters()}
            outside.records = [_ran_or_unused(r, used, params[r.weight]) for r in outside.records]
            plans.append(outside)
    return plans


class _ReadTensors(torch.overrides.TorchFunctionMode):
    """Notes the id of every tensor a torch function is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                self.ids.add(id(leaf))
        return func(*args, **kwargs)


def _read_eagerly(
    model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]
) -> set[int] | None:
    """Ids of the tensors the model's ops read when it runs eagerly (no compile), or None
    where it cannot run so (data-dependent code on the meta device)."""
    mode = _ReadTensors()
    try:  # eagerly even where the model, or a part of it, was compiled in place
        with torch.compiler.set_stance("force_eager"), torch.no_grad(), mode:
            model(*args, **kwargs)
    except Exception as exc:  # only a label depends on it
        logger.info("explain: cannot run the model eagerly to tell unused weights: %s", exc)
        return None
    return mode.ids


def _ran_or_unused(record: LinearRecord, used: set[int] | None, param_id: int) -> LinearRecord:
    """A weight no graph took: read by eager code (a graph break), or by nothing at all."""
    if used is None:
        return replace(
            record,
            note="no compiled graph took this weight as an input: a graph break, or a weight "
            "this call does not use (the model could not run eagerly to tell which)",
        )
    if param_id in used:
        return record
    return replace(
        record,
        skip_reason=SkipReason.UNUSED,
        note="no compiled graph took this weight and no op of this call read it",
    )


def outside_graphs_plan(
    model: torch.nn.Module,
    graph_inputs: set[int],
    config: WeightPrefetchConfig,
    rules: PrefetchRules,
) -> PrefetchPlan:
    """Weights with a prefetch role that no compiled graph took as an input.

    Their matmuls ran in eager code between graphs (a graph break, e.g. a data-dependent
    loop over MoE experts), where no pass can see them; listing them keeps the plan whole.
    """
    records = []
    for name, param in model.named_parameters():
        if id(param) in graph_inputs or param.dim() < 2:
            continue
        owner = owner_path(name, rules)
        rule = match_role(owner, rules)
        if rule is None or rule.role is None:
            continue
        records.append(
            LinearRecord(
                node="-",
                op="-",
                module=owner,
                weight=name,
                layer=layer_index(owner, rules),
                role=rule.role,
                weight_shape=tuple(param.shape),
                dtype=str(param.dtype),
                weight_bytes=param.numel() * param.element_size(),
                ratio=config.ratio(rule.role),
                skip_reason=SkipReason.OUTSIDE_GRAPHS,
                note="a graph break: no compiled graph took this weight as an input",
            )
        )
    return PrefetchPlan(
        records=records,
        graph="outside compiled graphs",
        config_digest=config.digest,
        enabled=bool(config.enabled),
    )
