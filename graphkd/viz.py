"""Graph dumps: write a traced or compressed graph as DOT or JSON for people and tools to read."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import networkx as nx
from torch import fx

from .graph import to_networkx

FORMATS = ("dot", "json")


def dump(gm: fx.GraphModule, path: str | Path, formats: Sequence[str] = ("dot", "json")) -> list[Path]:
    """Write ``gm`` to ``path`` + ``.<format>`` for each format; returns the files written.

    Example::

        dump(gm, "runs/graphs/resnet", formats=["dot", "json"])
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown dump format(s) {unknown}; choose from {', '.join(FORMATS)}")
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    graph = to_networkx(gm)
    written = []
    for fmt in formats:
        target = stem.with_name(f"{stem.name}.{fmt}")
        target.write_text(_WRITERS[fmt](graph), encoding="utf-8")
        written.append(target)
    return written


def dump_pipeline_stage(gm: fx.GraphModule, dump_dir: str | Path, index: int, name: str,
                        formats: Sequence[str] = ("dot", "json")) -> list[Path]:
    """Dump the graph after pipeline stage ``index`` as ``NN_name.*`` in ``dump_dir``."""
    return dump(gm, Path(dump_dir) / f"{index:02d}_{name}", formats)


def _label(attrs: dict) -> str:
    parts = [attrs["op"], attrs["module_type"] or attrs["target"]]
    if attrs["shape"] is not None:
        parts.append("x".join(map(str, attrs["shape"])))
    return "\n".join(parts)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz source with every label quoted and escaped."""
    lines = ["digraph G {", "  node [shape=box, fontname=Helvetica];"]
    for name, attrs in graph.nodes(data=True):
        lines.append(f'  "{_dot_escape(name)}" [label="{_dot_escape(_label(attrs))}"];')
    for src, dst in graph.edges:
        lines.append(f'  "{_dot_escape(src)}" -> "{_dot_escape(dst)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(graph: nx.DiGraph) -> str:
    """networkx node-link JSON (``nx.node_link_graph`` reads it back)."""
    return json.dumps(nx.node_link_data(graph, edges="links"), indent=1, default=list)


_WRITERS = {"dot": to_dot, "json": to_json}
