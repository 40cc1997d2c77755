"""Graph dumps: DOT escaping, JSON round trip, Mermaid structure, labels, diff view, rendering."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
import time

import networkx as nx
import pydot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import graphkd as gk
from graphkd.errors import ConfigError, GraphKDError
from graphkd.graph import find_nodes, insert_module_after
from graphkd.viz import (FORMATS, diff_view, dot_quote, dump, graph_view, json_graph, label_lines,
                         mermaid_text, to_dot, to_json, to_mermaid)
from graphkd.zoo import digits_cnn, mlp

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")
NASTY = 'a<b> {c} "d" \\e | #f; g'


class Tagged(nn.Module):
    """A pass-style module that explains itself through the describe() convention."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def describe(self) -> str:
        return self.text


def small_graph() -> fx.GraphModule:
    return gk.trace(mlp((4, 8, 3)), torch.randn(2, 4))


def nasty_graph() -> nx.DiGraph:
    """A graph whose labels use every character DOT/Mermaid treat specially (names are fx
    identifiers, plus the ``removed:`` prefix of diff views)."""
    g = nx.DiGraph()
    for name in ("removed:add_1", "plain"):
        g.add_node(name, op="call_function", target=NASTY, scope="", shape=(1, 2), dtype="float32",
                   module_type=None, detail=NASTY, status="same", note="")
    g.add_edge("removed:add_1", "plain")
    return g


def test_dot_quote_escapes_quotes_and_backslashes_only() -> None:
    assert dot_quote(NASTY) == '"a<b> {c} \\"d\\" \\\\e | #f; g"'
    assert dot_quote("x\ny") == '"x\\ny"'


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's parser uses old pyparsing names
def test_dot_labels_survive_pydot_parsing() -> None:
    source = to_dot(nasty_graph())
    (parsed,) = pydot.graph_from_dot_data(source)
    names = {n.get_name() for n in parsed.get_nodes()} - {"node", "legend"}
    assert names == {'"removed:add_1"', '"plain"'}
    labels = {n.get_name(): n.get("label") for n in parsed.get_nodes()}
    assert labels['"plain"'] == dot_quote("\n".join(label_lines("plain", nasty_graph().nodes["plain"])))
    assert len(parsed.get_edges()) == 1


@needs_dot
def test_graphviz_draws_the_exact_label_text() -> None:
    """What Graphviz draws (the SVG text lines) must be the original characters."""
    source = to_dot(nasty_graph())
    svg = subprocess.run(["dot", "-Tsvg"], input=source.encode(), capture_output=True,
                         check=True).stdout.decode()
    drawn = [html.unescape(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", svg)]
    assert drawn[:4] == ["add_1", f"call_function: {NASTY}", "1x2", NASTY]


def test_json_round_trips_through_networkx() -> None:
    gm = small_graph()
    view = graph_view(gm)
    back = json_graph(to_json(view))
    assert list(back.nodes) == [n.name for n in gm.graph.nodes]
    assert set(back.edges) == {(s.name, n.name) for n in gm.graph.nodes for s in n.all_input_nodes}
    linear = back.nodes["_0"]
    assert linear["op"] == "call_module" and linear["module_type"] == "Linear"
    assert linear["shape"] == [2, 8] and linear["dtype"] == "float32"
    assert linear["scope"] == "0" and linear["detail"] == "4→8 features"
    for name, attrs in view.nodes(data=True):
        shape = attrs["shape"]
        assert back.nodes[name] == {**attrs, "shape": list(shape) if shape else shape}


_MERMAID_NODE = re.compile(r'^  (n\d+)\["([^"]*)"\]$')
_MERMAID_EDGE = re.compile(r"^  (n\d+) --> (n\d+)$")
_MERMAID_CLASS = re.compile(r"^  (classDef \w+ fill:#[0-9a-f]{6},stroke:#[0-9a-f]{6}|class [n\d,]+ \w+)$")


def parse_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """A structural parser of the flowchart subset graphkd writes; fails on anything else."""
    lines = text.rstrip("\n").split("\n")
    assert lines[0] == "```mermaid" and lines[1] == "flowchart TD" and lines[-1] == "```"
    nodes: dict[str, str] = {}
    edges = []
    for line in lines[2:-1]:
        if m := _MERMAID_NODE.match(line):
            assert m.group(1) not in nodes
            nodes[m.group(1)] = m.group(2)
        elif m := _MERMAID_EDGE.match(line):
            assert m.group(1) in nodes and m.group(2) in nodes
            edges.append((m.group(1), m.group(2)))
        else:
            assert _MERMAID_CLASS.match(line), line
    return nodes, edges


def test_mermaid_is_a_flowchart_with_every_node_and_edge(caplog) -> None:
    gm = small_graph()
    nodes, edges = parse_mermaid(to_mermaid(graph_view(gm)))
    assert "GitHub" not in caplog.text  # small enough to render
    assert len(nodes) == len(gm.graph.nodes)
    assert len(edges) == sum(len(n.all_input_nodes) for n in gm.graph.nodes)
    assert nodes["n1"].split("<br/>")[:3] == ["_0", "call_module: Linear", "2x8"]


def test_mermaid_escapes_reserved_characters() -> None:
    nodes, _ = parse_mermaid(to_mermaid(nasty_graph()))
    label = nodes["n0"]
    assert '"' not in label and "<b>" not in label
    escaped = "a#lt;b#gt; {c} #quot;d#quot; \\e | #35;f; g"
    assert label == f"add_1<br/>call_function: {escaped}<br/>1x2<br/>{escaped}"


def test_labels_use_describe_then_layer_channels_then_extra_repr() -> None:
    gm = small_graph()
    relu = find_nodes(gm, module_type=nn.ReLU)[0]
    insert_module_after(gm, relu, "probes.relu", Tagged("int4 <custom>"))
    gm.recompile()
    view = graph_view(gm)
    assert view.nodes["probes_relu"]["detail"] == "int4 <custom>"
    assert view.nodes["_2"]["detail"] == "8→3 features"
    assert view.nodes["_1"]["detail"] == ""  # a plain torch module has nothing to add


def test_diff_view_marks_added_changed_and_removed_nodes() -> None:
    before = gk.trace(mlp((4, 8, 3)), torch.randn(2, 4))
    after = gk.trace(mlp((4, 6, 3)), torch.randn(2, 4))
    relu = find_nodes(after, module_type=nn.ReLU)[0]
    insert_module_after(after, relu, "probes.relu", Tagged("probe"))
    head = find_nodes(after, module_type=nn.Linear)[1]
    head.replace_all_uses_with(head.args[0])  # drop the head: its node becomes "removed"
    after.graph.erase_node(head)
    after.recompile()
    view = diff_view(before, after)
    status = {n: a["status"] for n, a in view.nodes(data=True)}
    assert status["probes_relu"] == "added"
    assert status["removed:_2"] == "removed"
    assert view.nodes["_0"]["note"] == "channels 8→6" and status["_0"] == "changed"
    assert status["input_1"] == "same"
    assert {("_1", "removed:_2"), ("removed:_2", "output")} <= set(view.edges)  # its old edges
    dot = to_dot(view)
    assert '"probes_relu" [label="probes_relu\\ncall_module: Tagged\\n2x6\\nprobe\\n[added]", ' \
           'fillcolor="#c8e6c9"' in dot
    assert "legend" in dot


def test_diff_of_a_pruned_export_shows_channel_counts() -> None:
    model = digits_cnn()
    x = torch.randn(1, 1, 8, 8)
    c = gk.compress(model, {"pipeline": [{"pass": "prune", "ratio": 0.5}]}, x)
    exported = c.export()
    gk.trace(exported, x)  # refresh shapes
    view = diff_view(gk.trace(digits_cnn(), x), exported)
    notes = {a["note"] for _, a in view.nodes(data=True) if a["status"] == "changed"}
    assert "channels 64→32" in notes


@needs_dot
def test_every_format_is_written(tmp_path) -> None:
    written = dump(small_graph(), tmp_path / "g", FORMATS)
    assert [p.name for p in written] == ["g.dot", "g.svg", "g.png", "g.json", "g.md"]
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = written[1].read_text()
    assert svg.lstrip().startswith("<?xml") and "call_module: Linear" in svg


def test_missing_graphviz_names_the_program(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GraphKDError, match=r"rendering svg needs the Graphviz 'dot' program, which "
                                           r"is not on PATH. Install Graphviz"):
        dump(small_graph(), tmp_path / "g", ["svg"])


def test_unknown_format_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^formats: unknown dump format\(s\) 'pdf'; choose from "
                                          r"dot, svg, png, json, mermaid"):
        dump(small_graph(), tmp_path / "g", ["json", "pdf"])


def test_pipeline_dumps_every_stage_in_the_requested_formats(tmp_path) -> None:
    gk.compress(digits_cnn(), {"pipeline": [{"pass": "prune", "ratio": 0.5},
                                            {"pass": "distill", "type": "mse"}]},
                torch.randn(1, 1, 8, 8), dump_dir=tmp_path, dump_formats=["json", "mermaid"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_traced.json", "00_traced.md", "01_prune.json", "01_prune.md",
        "02_distill.json", "02_distill.md"]
    distilled = json_graph((tmp_path / "02_distill.json").read_text())
    assert {"teacher", "distill_loss"} <= set(distilled.nodes)


def test_a_large_graph_dumps_in_seconds(tmp_path, caplog) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) if i % 2 == 0 else nn.ReLU() for i in range(2000)])
    gm = gk.trace(model, torch.randn(1, 4), auto_leaf=False)
    assert len(gm.graph.nodes) >= 2000
    start = time.perf_counter()
    dump(gm, tmp_path / "big", ["dot", "json", "mermaid"])
    assert time.perf_counter() - start < 15.0  # 0.1 s alone on 2 cores; slack for busy CI
    assert "past what GitHub renders" in caplog.text  # the mermaid dump warns it is too big
    assert len(json_graph((tmp_path / "big.json").read_text())) == len(gm.graph.nodes)


def _undo_dot_quote(quoted: str) -> str:
    """How Graphviz reads a quoted label: the parser turns \\" into ", then escString turns \\\\
    into \\ and \\n into a line break."""
    assert quoted[0] == quoted[-1] == '"'
    body, out, i = quoted[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\":
            nxt = body[i + 1]
            out.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
            i += 2
        else:
            assert body[i] != '"', "unescaped quote ends the string early"
            out.append(body[i])
            i += 1
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")))
def test_dot_quote_round_trips_any_text(text: str) -> None:
    assert _undo_dot_quote(dot_quote(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_mermaid_text_never_breaks_the_quoted_label(text: str) -> None:
    escaped = mermaid_text(text)
    plain = escaped.replace("<br/>", "")
    assert not set(plain) & {'"', "<", ">", "\n"}  # nothing that ends the label or opens a tag
    decoded = escaped.replace("<br/>", "\n")
    for char, entity in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("#", "#35;")):
        decoded = decoded.replace(entity, char)
    assert decoded == text
