"""Graph dumps: write a traced or compressed graph for people (SVG/PNG, Mermaid) and tools (DOT, JSON).

Labels show the node name, op or module type, output shape, and what compression did to it. A
module inserted by a pass explains itself through an optional ``describe() -> str`` method
(``"int8 per-channel"``, ``"sparsity 50%"``); the dump calls it when present and otherwise shows
generic facts (layer channel counts, a ``bits`` attribute, the zero fraction of a ``mask``).
:func:`diff_view` compares two graphs of the same model and marks nodes that were added or whose
channel counts changed, so a dump shows at a glance what a pipeline did.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
from torch import fx, nn

from .errors import ConfigError, GraphKDError
from .graph import WEIGHT_LAYER_TYPES, layer_of, to_networkx

log = logging.getLogger(__name__)

FORMATS = ("dot", "svg", "png", "json", "mermaid")
SUFFIXES = {"dot": ".dot", "svg": ".svg", "png": ".png", "json": ".json", "mermaid": ".md"}
RENDER_TIMEOUT_S = 300
MERMAID_MAX_EDGES, MERMAID_MAX_CHARS = 500, 50_000  # GitHub's limits for rendering a diagram
MAX_DETAIL = 90

# Fill colours by diff status; "same" nodes are coloured by op so inputs/outputs stand out.
_STATUS_STYLE = {
    "added": ("#c8e6c9", "#2e7d32"),
    "changed": ("#ffe0b2", "#ef6c00"),
    "removed": ("#eeeeee", "#9e9e9e"),
}
_OP_FILL = {"placeholder": "#bbdefb", "output": "#bbdefb", "get_attr": "#f5f5f5"}


# --- Building the annotated graph -------------------------------------------------------------

def describe_module(module: nn.Module) -> str:
    """What a module does to its tensor, for node labels (``""`` when there is nothing to say).

    A module's own ``describe()`` wins; then a layer's channel counts; then, for modules that are
    not part of PyTorch (those passes insert), their ``extra_repr()``.
    """
    describe = getattr(module, "describe", None)
    if callable(describe):
        return str(describe())
    if isinstance(module, nn.Linear):
        return f"{module.in_features}→{module.out_features} features"
    if isinstance(module, WEIGHT_LAYER_TYPES):
        return f"{module.in_channels}→{module.out_channels} ch"
    if not type(module).__module__.startswith("torch."):
        text = module.extra_repr()
        return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 1] + "…"
    return ""


def graph_view(gm: fx.GraphModule) -> nx.DiGraph:
    """``to_networkx(gm)`` plus ``dtype``, ``layer`` (module path of a layer in either form) and
    ``detail`` (see :func:`describe_module`) on every vertex."""
    graph = to_networkx(gm)
    for node in gm.graph.nodes:
        attrs = graph.nodes[node.name]
        meta = node.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        attrs["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
        layer = layer_of(gm, node)
        attrs["layer"] = layer[0] if layer is not None else None
        if layer is not None and node.op != "call_module":
            attrs["module_type"] = f"{type(layer[1]).__name__} (functional)"
        module = layer[1] if layer is not None else (
            gm.get_submodule(node.target) if node.op == "call_module" else None)
        attrs["detail"] = describe_module(module) if module is not None else ""
        attrs["status"] = "same"
        attrs["note"] = ""
    return graph


def _identity(name: str, attrs: dict) -> tuple[str, str]:
    """What makes a vertex 'the same' across two graphs of one model: its module path when it
    runs a module (layers keep it after functionalization), else its node name."""
    if attrs.get("layer"):
        return ("module", attrs["layer"])
    if attrs["op"] == "call_module":
        return ("module", attrs["target"])
    return ("node", name)


def diff_view(before: fx.GraphModule, after: fx.GraphModule) -> nx.DiGraph:
    """``after``'s graph with ``status`` = added / changed / same on each vertex and ``note``
    saying what changed; vertices only ``before`` had are kept with status ``removed``.

    Parameter reads (``get_attr``) that merely expose a layer's own weight are not "added".
    """
    old, new = graph_view(before), graph_view(after)
    old_by_id = {_identity(n, a): n for n, a in old.nodes(data=True)}
    old_modules = {key for kind, key in old_by_id if kind == "module"}
    matched: dict[str, str] = {}
    for name, attrs in new.nodes(data=True):
        old_name = old_by_id.get(_identity(name, attrs))
        if old_name is None:
            own_weight = (attrs["op"] == "get_attr"
                          and attrs["target"].rpartition(".")[0] in old_modules)
            if not own_weight:
                attrs["status"], attrs["note"] = "added", "added"
            continue
        matched[old_name] = name
        note = _change_note(old.nodes[old_name], attrs)
        if note:
            attrs["status"], attrs["note"] = "changed", note
    for name, attrs in old.nodes(data=True):
        if name in matched:
            continue
        ghost = f"removed:{name}"
        new.add_node(ghost, **{**attrs, "status": "removed", "note": "removed"})
        for src, _ in old.in_edges(name):
            new.add_edge(matched.get(src, f"removed:{src}"), ghost)
        for _, dst in old.out_edges(name):
            new.add_edge(ghost, matched.get(dst, f"removed:{dst}"))
    return new


def _change_note(old: dict, new: dict) -> str:
    a, b = old.get("shape"), new.get("shape")
    if a and b and a != b:
        if len(a) == len(b) and len(a) > 1 and a[1] != b[1] and a[2:] == b[2:]:
            return f"channels {a[1]}→{b[1]}"
        return f"shape {_dims(a)}→{_dims(b)}"
    if old.get("detail") and new.get("detail") and old["detail"] != new["detail"]:
        return f"was {old['detail']}"
    return ""


# --- Writers ----------------------------------------------------------------------------------

def _dims(shape: Sequence[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else ""


def label_lines(name: str, attrs: dict) -> list[str]:
    """The text of a vertex's label: name, op / module type, shape and dtype, detail, change."""
    kind = attrs.get("module_type") or attrs.get("target") or ""
    lines = [name.removeprefix("removed:"), f"{attrs['op']}: {kind}" if kind != name else attrs["op"]]
    shape = _dims(attrs.get("shape"))
    dtype = attrs.get("dtype")
    if shape or (dtype and dtype != "float32"):
        lines.append(" ".join(x for x in (shape, dtype if dtype != "float32" else "") if x))
    if attrs.get("detail"):
        lines.append(attrs["detail"])
    if attrs.get("note"):
        lines.append(f"[{attrs['note']}]")
    return lines


def dot_quote(text: str) -> str:
    """``text`` as a double-quoted DOT string: backslashes and quotes escaped, newlines as
    centred line breaks (``<``, ``>``, ``{`` and ``}`` are literal inside quotes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "")
    return '"' + escaped.replace("\n", "\\n") + '"'


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz source with every identifier and label quoted and escaped."""
    lines = ["digraph G {", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname=Helvetica, '
             'fontsize=10];']
    for name, attrs in graph.nodes(data=True):
        fill, pen = _STATUS_STYLE.get(attrs.get("status"), (_OP_FILL.get(attrs["op"], "#ffffff"),
                                                              "#424242"))
        style = ', style="rounded,filled,dashed"' if attrs.get("status") == "removed" else ""
        label = dot_quote("\n".join(label_lines(name, attrs)))
        lines.append(f'  {dot_quote(name)} [label={label}, fillcolor="{fill}", color="{pen}"{style}];')
    for src, dst in graph.edges:
        lines.append(f"  {dot_quote(src)} -> {dot_quote(dst)};")
    if any(a.get("status") not in (None, "same") for _, a in graph.nodes(data=True)):
        lines.append(_dot_legend())
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_legend() -> str:
    cells = "".join(f'<td bgcolor="{fill}">{status}</td>' for status, (fill, _) in _STATUS_STYLE.items())
    return f'  legend [shape=plaintext, style="", label=<<table border="0"><tr>{cells}</tr></table>>];'


def to_json(graph: nx.DiGraph) -> str:
    """networkx node-link JSON (``nx.node_link_graph(data, edges="links")`` reads it back)."""
    return json.dumps(nx.node_link_data(graph, edges="links"), indent=1, default=list)


_MERMAID_ESCAPES = {"#": "#35;", '"': "#quot;", "<": "#lt;", ">": "#gt;"}


def mermaid_text(text: str) -> str:
    """``text`` safe inside a quoted Mermaid label (entity codes; newlines become ``<br/>``)."""
    escaped = "".join(_MERMAID_ESCAPES.get(ch, ch) for ch in text)
    return escaped.replace("\n", "<br/>")


def to_mermaid(graph: nx.DiGraph) -> str:
    """A Markdown file with a ``mermaid`` flowchart (GitHub renders it as a diagram).

    Vertices get generated ids (``n0``...) because fx names may contain characters Mermaid
    reserves; the real name is the first label line. GitHub stops rendering diagrams past about
    500 edges or 50,000 characters (a warning is logged then); use svg for such graphs.
    """
    ids = {name: f"n{i}" for i, name in enumerate(graph.nodes)}
    lines = ["```mermaid", "flowchart TD"]
    classes: dict[str, list[str]] = {}
    for name, attrs in graph.nodes(data=True):
        lines.append(f'  {ids[name]}["{mermaid_text(chr(10).join(label_lines(name, attrs)))}"]')
        status = attrs.get("status")
        if status in _STATUS_STYLE:
            classes.setdefault(status, []).append(ids[name])
    lines += [f"  {ids[src]} --> {ids[dst]}" for src, dst in graph.edges]
    for status, members in classes.items():
        fill, pen = _STATUS_STYLE[status]
        lines.append(f"  classDef {status} fill:{fill},stroke:{pen}")
        lines.append(f"  class {','.join(members)} {status}")
    lines.append("```")
    text = "\n".join(lines) + "\n"
    if graph.number_of_edges() > MERMAID_MAX_EDGES or len(text) > MERMAID_MAX_CHARS:
        log.warning("Mermaid diagram with %d edges and %d characters is past what GitHub renders "
                    "(%d edges, %d characters); dump svg for this graph", graph.number_of_edges(),
                    len(text), MERMAID_MAX_EDGES, MERMAID_MAX_CHARS)
    return text


def graphviz_program(what: str, fmt: str) -> str:
    """The path of Graphviz's ``dot``, or an error saying ``what`` needs it and how to get it."""
    program = shutil.which("dot")
    if program is None:
        raise GraphKDError(
            f"cannot write {what}: rendering {fmt} needs the Graphviz 'dot' program, which is not "
            f"on PATH. Install Graphviz (apt-get install graphviz, brew install graphviz, conda "
            f"install graphviz) or dump as dot/json/mermaid instead.")
    return program


def render(dot_source: str, fmt: str, target: Path) -> None:
    """Render DOT source to ``target`` as ``fmt`` (svg/png) with the Graphviz ``dot`` program."""
    program = graphviz_program(target.name, fmt)
    try:
        subprocess.run([program, f"-T{fmt}", "-o", str(target)], input=dot_source.encode(),
                       check=True, capture_output=True, timeout=RENDER_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode(errors="replace").strip().splitlines()
        raise GraphKDError(f"Graphviz 'dot' failed to render {target}: "
                           f"{message[-1] if message else exc}") from None
    except subprocess.TimeoutExpired:
        raise GraphKDError(f"Graphviz 'dot' took over {RENDER_TIMEOUT_S} s to lay out {target}; "
                           f"dump this graph as dot/json/mermaid instead") from None


# --- Entry points -----------------------------------------------------------------------------

def check_formats(formats: Sequence[str]) -> None:
    """Raise ConfigError for format names graphkd cannot write."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown dump format(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(FORMATS)}", "formats")


def write_graph(graph: nx.DiGraph, path: str | Path, formats: Sequence[str]) -> list[Path]:
    """Write an annotated graph to ``path`` + suffix for each format; returns the files."""
    check_formats(formats)
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    dot_source: str | None = None
    for fmt in formats:
        target = stem.with_name(stem.name + SUFFIXES[fmt])
        if fmt in ("dot", "svg", "png"):
            dot_source = dot_source or to_dot(graph)
            if fmt == "dot":
                target.write_text(dot_source, encoding="utf-8")
            else:
                render(dot_source, fmt, target)
        else:
            text = to_json(graph) if fmt == "json" else to_mermaid(graph)
            target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def dump(gm: fx.GraphModule, path: str | Path, formats: Sequence[str] = ("dot", "json"), *,
         before: fx.GraphModule | None = None) -> list[Path]:
    """Write ``gm`` to ``path`` + suffix for each format; returns the files written.

    With ``before`` (an earlier graph of the same model) the dump is the diff view: added and
    changed nodes coloured and labelled, removed ones dashed.

    Example::

        dump(student, "runs/graphs/diff", ["svg", "mermaid"], before=gk.trace(model, x))
    """
    graph = diff_view(before, gm) if before is not None else graph_view(gm)
    return write_graph(graph, path, formats)


def dump_pipeline_stage(gm: fx.GraphModule, dump_dir: str | Path, index: int, name: str,
                        formats: Sequence[str] = ("dot", "json")) -> list[Path]:
    """Dump the graph after pipeline stage ``index`` as ``NN_name.*`` in ``dump_dir``."""
    return dump(gm, Path(dump_dir) / f"{index:02d}_{name}", formats)


def json_graph(text: str) -> nx.DiGraph:
    """Read a JSON dump back into a ``networkx.DiGraph``."""
    data: Any = json.loads(text)
    return nx.node_link_graph(data, directed=True, edges="links")
