from __future__ import annotations

import operator

import networkx as nx
import pytest
import torch
from torch import nn

import graphkd as gk
from graphkd.graph import (
    ScopeFilter, add_module, find_nodes, functionalize_layer, insert_module_after,
    insert_module_before, insert_on_weight, layer_of, remove_nodes, replace_module, scope_matches,
    scopes_of, to_networkx, weight_source, weight_transforms,
)
from graphkd.zoo import resnet_tiny
from tests import models as M
from tests.models import Scale


def test_find_nodes_by_op_type_scope_and_target() -> None:
    gm = gk.trace(resnet_tiny(), torch.randn(1, 3, 8, 8))
    convs = find_nodes(gm, module_type=nn.Conv2d)
    assert [n.target for n in convs] == ["conv1", "layer1.0.conv1", "layer1.0.conv2",
                                         "layer2.0.downsample.0", "layer2.0.conv1",
                                         "layer2.0.conv2"]
    assert [n.target for n in find_nodes(gm, module_type=nn.Conv2d, scope="layer2")] == [
        "layer2.0.downsample.0", "layer2.0.conv1", "layer2.0.conv2"]
    assert [n.target for n in find_nodes(gm, scope=r"re:layer\d\.0\.conv2")] == [
        "layer1.0.conv2", "layer2.0.conv2"]
    adds = find_nodes(gm, op="call_function", target=operator.add)
    assert [n.meta["scope"] for n in adds] == ["layer1.0", "layer2.0"]


@pytest.mark.parametrize("pattern,scope,expected", [
    ("layer1", "layer1", True), ("layer1", "layer1.0.conv1", True), ("layer1", "layer10", False),
    ("re:layer1", "layer1.0", False), (r"re:layer1\..*", "layer1.0", True),
    ("re:.*conv.*", "layer2.0.conv1", True), ("fc", "fc2", False),
])
def test_scope_matching_rules(pattern, scope, expected) -> None:
    assert scope_matches(pattern, scope) is expected


def test_scope_filter_targets_and_ignores() -> None:
    known = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
    select = ScopeFilter(known, target_scopes=["layer1"], ignored_scopes=["layer1.0.conv2"])
    assert [s for s in known if select(s)] == ["layer1.0.conv1"]
    assert select.skipped(known) == ["conv1", "layer1.0.conv2", "fc"]
    assert all(ScopeFilter(known)(s) for s in known)


def test_scope_pattern_matching_nothing_lists_closest_names() -> None:
    known = scopes_of(gk.trace(resnet_tiny(), torch.randn(1, 3, 8, 8)))
    with pytest.raises(gk.ConfigError) as info:
        ScopeFilter(known, ignored_scopes=["fc", "layer1.0.cnov1"], option_path="opts")
    message = str(info.value)
    assert message.startswith("opts.ignored_scopes[1]: scope pattern 'layer1.0.cnov1' matches no")
    assert "closest module paths: layer1.0.conv1" in message
    with pytest.raises(gk.ConfigError, match=r"target_scopes\[0\]: invalid regular expression"):
        ScopeFilter(known, target_scopes=["re:layer(1"])
    with pytest.raises(gk.ConfigError, match=r"target_scopes\[0\]: scope pattern 're:block.*'"):
        ScopeFilter(known, target_scopes=["re:block.*"])


def test_insert_module_after_routes_every_user_through_it() -> None:
    model = M.Concat()
    x = torch.randn(1, 3, 4, 4)
    gm = gk.trace(model, x)
    (a_node,) = find_nodes(gm, module_type=nn.Conv2d, scope="a")
    new = insert_module_after(gm, a_node, "scales.a_out", Scale(2.0))
    gm.recompile()
    assert new.target == "scales.a_out" and new.meta["scope"] == "a"
    assert list(a_node.users) == [new]
    expected = model.fuse(torch.cat([model.a(x) * 2, model.b(x)], 1))
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_insert_module_before_touches_one_consumer_only() -> None:
    model = M.Attention()
    x = torch.randn(2, 3, 8)
    gm = gk.trace(model, x)
    (matmul,) = find_nodes(gm, target=operator.matmul)
    insert_module_before(gm, matmul, "scales.q", Scale(0.5), arg_index=0)
    gm.recompile()
    q, k, v = model.q(x), model.k(x), model.v(x)
    attn = torch.softmax(0.5 * q @ k.transpose(-2, -1) * model.scale, dim=-1)
    torch.testing.assert_close(gm(x), model.norm(x + attn @ v))


def test_add_module_makes_unique_dotted_names() -> None:
    gm = gk.trace(M.ConvBnRelu(), torch.randn(1, 3, 4, 4))
    assert add_module(gm, "extra.one", Scale(1.0)) == "extra.one"
    assert add_module(gm, "extra.one", Scale(1.0)) == "extra.one_1"
    assert isinstance(gm.get_submodule("extra.one_1"), Scale)


def test_replace_module_and_remove_nodes() -> None:
    gm = gk.trace(M.ConvBnRelu(), torch.randn(1, 3, 4, 4))
    old = replace_module(gm, "relu", nn.Sigmoid())
    gm.recompile()
    assert isinstance(old, nn.ReLU) and (gm(torch.randn(1, 3, 4, 4)) > 0).all()
    (bn,) = find_nodes(gm, module_type=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="still used by"):
        remove_nodes(gm, [bn])
    (relu,) = find_nodes(gm, target="relu")
    relu.replace_all_uses_with(bn)
    remove_nodes(gm, [relu])
    gm.recompile()
    assert not hasattr(gm, "relu")
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_networkx_view_has_edges_and_attributes() -> None:
    gm = gk.trace(M.Residual(), torch.randn(1, 4, 5, 5))
    g = to_networkx(gm)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert sorted(g.predecessors("add")) == ["conv2", "x"]
    assert g.nodes["conv1"] == {"op": "call_module", "target": "conv1", "scope": "conv1",
                                "shape": (1, 4, 5, 5), "module_type": "Conv2d"}
    assert (g.nodes["relu"]["target"], g.nodes["add"]["target"]) == ("relu", "add")


def test_functionalize_layer_is_exact_and_idempotent() -> None:
    model = resnet_tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = gk.trace(model, x)
    layers = find_nodes(gm, module_type=(nn.Conv2d, nn.Linear))
    functional = [functionalize_layer(gm, n) for n in layers]
    assert [functionalize_layer(gm, n) for n in functional] == functional
    gm.recompile()
    assert torch.equal(gm(x), model(x))
    assert [layer_of(gm, n)[0] for n in functional] == [
        "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer2.0.conv1",
        "layer2.0.conv2", "fc"]
    assert set(gm.state_dict()) == set(model.state_dict())


def test_insert_on_weight_composes_transforms_in_order() -> None:
    model = M.FlattenLinear()
    x = torch.randn(2, 2, 6, 6)
    gm = gk.trace(model, x)
    (fc,) = find_nodes(gm, module_type=nn.Linear)
    fc = insert_on_weight(gm, fc, "t.first", Scale(2.0))
    fc = insert_on_weight(gm, fc, "t.second", Scale(3.0))
    gm.recompile()
    assert weight_source(fc).target == "fc.weight"
    assert [m.factor for m in weight_transforms(gm, fc)] == [2.0, 3.0]
    assert layer_of(gm, fc)[0] == "fc"
    h = model.conv(x).flatten(1)
    torch.testing.assert_close(gm(x), h @ (6 * model.fc.weight).T + model.fc.bias)
