"""Trace a model into a ``torch.fx.GraphModule`` that every pass works on.

Two things are added to plain ``torch.fx.symbolic_trace``: each node records the module it came from
(``node.meta["scope"]``), and submodules that symbolic tracing cannot handle are kept whole as leaf
modules (``auto_leaf``), so one awkward block does not make a whole model uncompressible.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError

log = logging.getLogger(__name__)

LeafSpec = type | str
_FAILED_SCOPE = "_graphkd_failed_scope"


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise example inputs (a tensor or a tuple/list of them) to a tuple of positional args."""
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


class ScopeTracer(fx.Tracer):
    """An fx tracer that stamps every node with the qualified path of the module that made it.

    ``leaves`` are module classes or qualified paths traced as a single ``call_module`` node.
    When a non-leaf module's forward raises, the innermost such module's path is attached to the
    exception so that :func:`trace` can retry with that module as a leaf.
    """

    def __init__(self, leaves: Iterable[LeafSpec] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self.leaf_paths = {leaf for leaf in leaves if isinstance(leaf, str)}
        self.current_scope = ""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        outer, self.current_scope = self.current_scope, path
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, _FAILED_SCOPE):
                setattr(exc, _FAILED_SCOPE, path)
            raise
        finally:
            self.current_scope = outer

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self.current_scope
        return node

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace like ``fx.Tracer`` but keep ``torch.no_grad()`` / ``enable_grad()`` blocks.

        Plain symbolic tracing drops grad-mode changes, so an output the model computes under
        ``no_grad`` would require grad in the traced copy. Each switch becomes a
        ``torch._C._set_grad_enabled`` node (side-effectful: dead-code elimination keeps it), and
        the switch that closes a block restores the mode the caller had when the block opened
        (read at run time), so calling the graph under ``no_grad`` leaves grad off.
        """
        set_grad_enabled = torch._C._set_grad_enabled
        opened: list[tuple[bool, fx.Node]] = []  # (trace-time mode before the switch, its reading)

        def recording(mode: bool) -> None:
            if opened and opened[-1][0] == mode:
                self.create_node("call_function", set_grad_enabled, (opened.pop()[1],), {})
            else:
                before = self.create_node("call_function", torch.is_grad_enabled, (), {})
                opened.append((torch.is_grad_enabled(), before))
                self.create_node("call_function", set_grad_enabled, (mode,), {})
            set_grad_enabled(mode)

        torch._C._set_grad_enabled = recording
        try:
            return super().trace(root, concrete_args)
        finally:
            torch._C._set_grad_enabled = set_grad_enabled


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    auto_leaf: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` and propagate shapes with ``example_inputs``.

    The returned GraphModule shares its submodules and parameters with ``model`` (trace a deepcopy
    if you will modify it). ``leaf_modules`` are classes or qualified paths to keep whole. With
    ``auto_leaf`` a submodule whose forward cannot be traced becomes a leaf and tracing is retried;
    the chosen leaves are logged and stored in ``gm.meta["auto_leaves"]``.

    Example::

        gm = trace(resnet, torch.randn(1, 3, 32, 32))
        [n.meta["scope"] for n in gm.graph.nodes if n.op == "call_module"][:2]  # ['conv1', 'bn1']
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        gm = _trace_with_leaves(model, list(leaf_modules), auto_leaf)
    propagate_shapes(gm, example_inputs)
    return gm


def _trace_with_leaves(model: nn.Module, leaves: list[LeafSpec], auto_leaf: bool) -> fx.GraphModule:
    auto_leaves: list[str] = []
    while True:
        tracer = ScopeTracer(leaves + auto_leaves)
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:
            scope = getattr(exc, _FAILED_SCOPE, "")
            if not auto_leaf or not scope or scope in auto_leaves:
                raise _trace_error(model, scope, exc, auto_leaf) from exc
            log.warning(
                "graphkd.trace: %s (%s) cannot be traced symbolically (%s: %s); keeping it as a "
                "leaf module, so passes will not look inside it",
                scope, type(model.get_submodule(scope)).__name__, type(exc).__name__, exc,
            )
            auto_leaves.append(scope)
    for node in graph.nodes:
        if isinstance(node.type, str):  # `from __future__ import annotations`: fx cannot pickle it
            node.type = None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["auto_leaves"] = auto_leaves
    return gm


def _trace_error(model: nn.Module, scope: str, exc: Exception, auto_leaf: bool) -> TraceError:
    where = f"submodule '{scope}' ({type(model.get_submodule(scope)).__name__})" if scope else (
        f"the top-level forward of {type(model).__name__}")
    if scope and not auto_leaf:
        fix = (f"pass leaf_modules=['{scope}'] (or its class) to keep it whole, or "
               f"auto_leaf=True to do this automatically")
    elif scope:
        fix = f"pass leaf_modules=['{scope}'] and check its forward, it failed even as a leaf"
    else:
        fix = ("the failing code is not inside a submodule, so it cannot become a leaf: move it into "
               "a submodule and pass leaf_modules=[...], or wrap the function with torch.fx.wrap")
    return TraceError(
        f"cannot trace {where}: {type(exc).__name__}: {exc}. Fix: {fix}. Data-dependent control flow "
        f"and iteration over tensors are the usual causes."
    )


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> None:
    """Run ``gm`` once on ``example_inputs`` to fill ``node.meta["tensor_meta"]``.

    Runs in eval mode (training flags restored afterwards) so BatchNorm running statistics of the
    model are not touched; autograd stays on so ``tensor_meta.requires_grad`` is meaningful.
    """
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        ShapeProp(gm).propagate(*as_input_tuple(example_inputs))
    except Exception as exc:
        raise TraceError(
            f"{type(gm).__name__} failed on the example inputs ({type(exc).__name__}: {exc}); "
            f"check that example_inputs have the shapes and dtypes the model expects."
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The propagated output shape of ``node``, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None
