"""Graph transformation helpers: the API every pass, built-in or user-written, edits graphs with.

They keep the invariants passes rely on: inserted nodes carry a ``scope``, new submodules have
readable dotted names, and scope patterns that match nothing are reported instead of ignored.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import networkx as nx
import torch.nn.functional as F
from torch import fx, nn

from .errors import ConfigError
from .trace import node_shape

REGEX_PREFIX = "re:"


def find_nodes(
    gm: fx.GraphModule,
    *,
    op: str | None = None,
    module_type: type | tuple[type, ...] | None = None,
    scope: str | None = None,
    target: Any = None,
) -> list[fx.Node]:
    """Nodes of ``gm`` matching every given criterion, in graph order.

    ``module_type`` implies ``op="call_module"``; ``scope`` is an exact scope or a ``re:`` regex.

    Example::

        convs = find_nodes(gm, module_type=nn.Conv2d)
        adds = find_nodes(gm, op="call_function", target=operator.add)
    """
    found = []
    for node in gm.graph.nodes:
        if op is not None and node.op != op:
            continue
        if target is not None and node.target != target:
            continue
        if module_type is not None and not (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), module_type)
        ):
            continue
        if scope is not None and not scope_matches(scope, node.meta.get("scope", "")):
            continue
        found.append(node)
    return found


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def scope_matches(pattern: str, scope: str) -> bool:
    """Whether ``pattern`` selects ``scope``.

    A plain pattern is a module path: it selects that module and everything inside it
    (``layer1`` selects ``layer1.0.conv1``). A ``re:`` pattern must match the whole scope
    (``re:layer\\d\\.0\\..*``).
    """
    if pattern.startswith(REGEX_PREFIX):
        return re.fullmatch(pattern[len(REGEX_PREFIX):], scope) is not None
    return scope == pattern or scope.startswith(pattern + ".") or pattern == ""


class ScopeFilter:
    """Selects module scopes by ``target_scopes`` and ``ignored_scopes``.

    A scope is selected when it matches some target pattern (or there are none) and no ignored
    pattern. Every pattern must match at least one of ``known_scopes``, else :class:`ConfigError`
    with the closest real names; ``option_path`` (``pipeline[2]``) prefixes the error path.

    Example::

        select = ScopeFilter(scopes_of(gm), target_scopes=["re:layer.*"], ignored_scopes=["fc"])
        convs = [n for n in find_nodes(gm, module_type=nn.Conv2d) if select(n.target)]
    """

    def __init__(
        self,
        known_scopes: Iterable[str],
        target_scopes: Sequence[str] | None = None,
        ignored_scopes: Sequence[str] | None = None,
        option_path: str = "",
    ) -> None:
        self.known = sorted(set(known_scopes))
        self.targets = list(target_scopes or [])
        self.ignored = list(ignored_scopes or [])
        for key, patterns in (("target_scopes", self.targets), ("ignored_scopes", self.ignored)):
            for i, pattern in enumerate(patterns):
                self._check_pattern(pattern, f"{key}[{i}]", option_path)

    def _check_pattern(self, pattern: str, key: str, option_path: str) -> None:
        path = f"{option_path}.{key}" if option_path else key
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as exc:
                raise ConfigError(f"invalid regular expression {pattern!r}: {exc}", path) from None
        if any(scope_matches(pattern, s) for s in self.known):
            return
        probe = pattern[len(REGEX_PREFIX):] if pattern.startswith(REGEX_PREFIX) else pattern
        close = difflib.get_close_matches(probe, self.known, n=5, cutoff=0.4)
        hint = f"closest module paths: {', '.join(close)}" if close else (
            f"module paths look like: {', '.join(self.known[:8])}")
        raise ConfigError(
            f"scope pattern {pattern!r} matches no module of the model; {hint}. Use an exact "
            f"module path or a 're:' regular expression that matches the whole path.", path)

    def __call__(self, scope: str) -> bool:
        if self.targets and not any(scope_matches(p, scope) for p in self.targets):
            return False
        return not any(scope_matches(p, scope) for p in self.ignored)

    def skipped(self, scopes: Iterable[str]) -> list[str]:
        """The scopes among ``scopes`` this filter rejects (for pass statistics)."""
        return [s for s in scopes if not self(s)]


def scopes_of(gm: fx.GraphModule) -> list[str]:
    """Every module path of ``gm`` plus every scope recorded on its nodes."""
    names = {name for name, _ in gm.named_modules() if name}
    names.update(n.meta["scope"] for n in gm.graph.nodes if n.meta.get("scope"))
    return sorted(names)


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """``base`` if no submodule of ``gm`` has that dotted name yet, else ``base_1``, ``base_2``..."""
    name, i = base, 0
    while _has_submodule(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
    except AttributeError:
        return False
    return True


def flat_name(qualified: str) -> str:
    """``layer1.0.conv1`` -> ``layer1_0_conv1``: a module path usable as one attribute name."""
    return qualified.replace(".", "_") or "root"


def add_module(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    """Register ``module`` under dotted ``name`` (made unique), creating parent containers.

    Example::

        add_module(gm, "quantizers.conv1_weight", FakeQuantize())  # -> 'quantizers.conv1_weight'
    """
    name = unique_name(gm, name)
    if not gm.add_submodule(name, module):
        raise ValueError(f"cannot add submodule {name!r}: a parent path is not an nn.Module")
    return name


def insert_module_after(
    gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, *, scope: str | None = None
) -> fx.Node:
    """Call ``module`` on the output of ``node`` and route every former user of ``node`` through it.

    Returns the new ``call_module`` node (scope defaults to ``node``'s). One inserted module serves
    all consumers, which is what an activation quantizer on an edge needs.

    Example::

        q = insert_module_after(gm, relu_node, "quantizers.relu_out", FakeQuantize())
    """
    name = add_module(gm, name, module)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    for user in users:
        user.replace_input_with(node, new)
    _copy_meta(node, new, scope)
    return new


def insert_module_before(
    gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, *,
    arg_index: int = 0, scope: str | None = None,
) -> fx.Node:
    """Call ``module`` on ``node``'s positional input ``arg_index``, for ``node`` alone.

    Other consumers of that input are untouched. Returns the new node.

    Example::

        q = insert_module_before(gm, matmul_node, "quantizers.attn_k", FakeQuantize(), arg_index=1)
    """
    source = node.args[arg_index]
    if not isinstance(source, fx.Node):
        raise ValueError(f"input {arg_index} of node {node.name!r} is a constant, not a node")
    name = add_module(gm, name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (source,))
    node.update_arg(arg_index, new)
    _copy_meta(source, new, scope if scope is not None else node.meta.get("scope", ""))
    return new


def _copy_meta(source: fx.Node, new: fx.Node, scope: str | None) -> None:
    new.meta["scope"] = scope if scope is not None else source.meta.get("scope", "")
    if "tensor_meta" in source.meta:
        new.meta["tensor_meta"] = source.meta["tensor_meta"]


def replace_module(gm: fx.GraphModule, target: str, module: nn.Module) -> nn.Module:
    """Swap the submodule at dotted path ``target`` for ``module``; returns the old one.

    Every node calling ``target`` now calls ``module``.

    Example::

        replace_module(gm, "layer1.0.conv1", smaller_conv)
    """
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def remove_nodes(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase ``nodes`` (users first); each must have no users outside the set.

    Submodules they called that nothing else calls are deleted too.

    Example::

        remove_nodes(gm, [teacher_node, loss_node])
    """
    doomed = list(nodes)
    doomed_set = set(doomed)
    for node in doomed:
        outside = [u.name for u in node.users if u not in doomed_set]
        if outside:
            raise ValueError(f"cannot remove node {node.name!r}: still used by {outside}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(doomed, key=order.__getitem__, reverse=True):
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A ``networkx.DiGraph`` of ``gm``: one vertex per node name, an edge per data dependency.

    Vertex attributes: ``op``, ``target`` (string), ``scope``, ``shape`` (tuple or None),
    ``module_type`` (class name for call_module, else None).

    Example::

        g = to_networkx(gm)
        list(g.successors("conv1"))  # ['bn1']
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        g.add_node(
            node.name,
            op=node.op,
            target=target_name(node.target),
            scope=node.meta.get("scope", ""),
            shape=node_shape(node),
            module_type=type(module).__name__ if module is not None else None,
        )
        for source in node.all_input_nodes:
            g.add_edge(source.name, node.name)
    return g


def target_name(target: Any) -> str:
    """A readable name for a node target: the attribute path, method or function name."""
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or repr(target)


# --- Weight edges ---------------------------------------------------------------------------
# Passes that transform weights (quantizers, sparsity masks, pruning masks) put modules on the
# *weight edge* of a layer: the layer's call_module node is rewritten once into
#   get_attr(conv1.weight) -> [transforms...] -> F.conv2d(x, w, b, ...)
# so every transform is a visible, named node and several passes compose in pipeline order.
# The module (and so the state_dict key ``conv1.weight``) stays where it was.

def _conv_args(m: nn.Module) -> tuple:
    return (m.stride, m.padding, m.dilation, m.groups)


def _conv_transpose_args(m: nn.Module) -> tuple:
    return (m.stride, m.padding, m.output_padding, m.groups, m.dilation)


_FUNCTIONAL_FORMS: dict[type, tuple[Callable, Callable[[nn.Module], tuple]]] = {
    nn.Linear: (F.linear, lambda m: ()),
    nn.Conv1d: (F.conv1d, _conv_args),
    nn.Conv2d: (F.conv2d, _conv_args),
    nn.Conv3d: (F.conv3d, _conv_args),
    nn.ConvTranspose1d: (F.conv_transpose1d, _conv_transpose_args),
    nn.ConvTranspose2d: (F.conv_transpose2d, _conv_transpose_args),
    nn.ConvTranspose3d: (F.conv_transpose3d, _conv_transpose_args),
}
WEIGHT_LAYER_TYPES = tuple(_FUNCTIONAL_FORMS)
_LAYER_FUNCTIONS = {fn for fn, _ in _FUNCTIONAL_FORMS.values()}


def is_layer_node(node: fx.Node) -> bool:
    """Whether ``node`` is a functionalized weight layer (``F.conv2d``/``F.linear``... call)."""
    return node.op == "call_function" and node.target in _LAYER_FUNCTIONS and len(node.args) >= 2


def layer_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """``(module path, module)`` of the Conv/ConvTranspose/Linear that ``node`` runs, in either
    form (a ``call_module`` node or a functionalized call whose weight edge starts at
    ``get_attr <path>.weight``); None for any other node.

    Example::

        path, conv = layer_of(gm, node)   # ('layer1.0.conv1', Conv2d(...))
    """
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return (node.target, m) if isinstance(m, WEIGHT_LAYER_TYPES) else None
    if not is_layer_node(node):
        return None
    source = weight_source(node)
    if source is None:
        return None
    path = source.target.rpartition(".")[0]
    return path, gm.get_submodule(path)


def weight_source(layer_node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node a functionalized layer's weight edge starts from, walking back
    through the single-input transform modules inserted on it."""
    current = layer_node.args[1]
    while isinstance(current, fx.Node):
        if current.op == "get_attr":
            return current
        if current.op != "call_module" or len(current.all_input_nodes) != 1:
            return None
        current = current.all_input_nodes[0]
    return None


def weight_transforms(gm: fx.GraphModule, layer_node: fx.Node) -> list[nn.Module]:
    """The modules on a functionalized layer's weight edge, from the weight to the layer."""
    chain = []
    current = layer_node.args[1]
    while isinstance(current, fx.Node) and current.op == "call_module":
        chain.append(gm.get_submodule(current.target))
        current = current.all_input_nodes[0]
    return chain[::-1]


def functionalize_layer(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Rewrite a ``call_module`` Conv/ConvTranspose/Linear node into its functional form with the
    weight and bias as ``get_attr`` edges; returns the new node (or ``node`` if already done).

    Outputs are unchanged bit for bit. Convs with ``padding_mode != 'zeros'`` are refused.

    Example::

        fn_node = functionalize_layer(gm, conv_node)   # F.conv2d(x, conv1.weight, conv1.bias, ...)
    """
    if is_layer_node(node):
        return node
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if type(m) not in _FUNCTIONAL_FORMS:
        raise ValueError(f"node {node.name!r} is not a call to a Conv/ConvTranspose/Linear module")
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{node.target}: padding_mode={m.padding_mode!r} has no functional form")
    if len(node.args) != 1 or node.kwargs:
        raise ValueError(f"{node.target}: only single-input calls can be functionalized")
    fn, extra = _FUNCTIONAL_FORMS[type(m)]
    scope = node.meta.get("scope", node.target)
    with gm.graph.inserting_before(node):
        weight = gm.graph.get_attr(f"{node.target}.weight")
        bias = gm.graph.get_attr(f"{node.target}.bias") if m.bias is not None else None
        new = gm.graph.call_function(fn, (node.args[0], weight, bias, *extra(m)))
    for created in (weight, bias, new):
        if created is not None:
            created.meta["scope"] = scope
    new.meta.update({k: v for k, v in node.meta.items() if k != "scope"})
    new.meta["layer"] = node.target
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def insert_on_weight(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    """Put ``module`` on the weight edge of layer ``node`` (either form), after the transforms
    already there; returns the layer's functional node.

    Example::

        conv = insert_on_weight(gm, conv, "quantizers.conv1_weight", WeightQuantizer(...))
    """
    layer = functionalize_layer(gm, node)
    weight = layer.args[1]
    name = add_module(gm, name, module)
    with gm.graph.inserting_before(layer):
        new = gm.graph.call_module(name, (weight,))
    layer.update_arg(1, new)
    new.meta["scope"] = layer.meta.get("scope", "")
    return layer
