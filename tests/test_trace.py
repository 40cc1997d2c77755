from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import graphkd as gk
from graphkd.graph import find_nodes
from tests import models as M

ZOO = [
    (M.ConvBnRelu, (torch.randn(2, 3, 8, 8),)),
    (M.Residual, (torch.randn(2, 4, 6, 6),)),
    (M.Concat, (torch.randn(2, 3, 5, 5),)),
    (M.Depthwise, (torch.randn(2, 6, 7, 7),)),
    (M.FlattenLinear, (torch.randn(3, 2, 6, 6),)),
    (M.Attention, (torch.randn(2, 5, 8),)),
    (M.MHABlock, (torch.randn(2, 5, 8),)),
    (M.TwoInputs, (torch.randn(3, 4), torch.randn(3, 6))),
    (M.TupleDictOutputs, (torch.randn(3, 4),)),
]


def _assert_same_outputs(a, b) -> None:
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls,inputs", ZOO, ids=[c.__name__ for c, _ in ZOO])
def test_trace_output_equals_model_bit_for_bit(cls, inputs) -> None:
    model = cls().eval()
    gm = gk.trace(model, inputs)
    _assert_same_outputs(gm(*inputs), model(*inputs))
    model.train()  # train mode too (BatchNorm uses batch statistics)
    gm.train()
    _assert_same_outputs(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("cls,inputs", ZOO, ids=[c.__name__ for c, _ in ZOO])
def test_every_node_has_scope_and_tensor_meta(cls, inputs) -> None:
    gm = gk.trace(cls(), inputs)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        assert node.meta["scope"] == "" or node.meta["scope"] in modules
        if node.op == "call_module":
            assert node.meta["scope"] == node.target
        if node.op != "output" and node.meta["type"] is torch.Tensor:
            assert len(node.meta["tensor_meta"].shape) >= 1, node.name


def test_scopes_of_functional_calls_name_their_module() -> None:
    gm = gk.trace(M.Residual(), torch.randn(1, 4, 5, 5))
    scopes = {n.name: n.meta["scope"] for n in gm.graph.nodes}
    assert scopes == {"x": "", "conv1": "conv1", "relu": "", "conv2": "conv2", "add": "",
                      "relu_1": "", "output": ""}
    nested = nn.Sequential(M.Residual())
    gm = gk.trace(nested, torch.randn(1, 4, 5, 5))
    assert {n.meta["scope"] for n in gm.graph.nodes if n.op == "call_function"} == {"0"}


def test_tensor_meta_shapes_and_requires_grad() -> None:
    gm = gk.trace(M.FlattenLinear(), torch.randn(3, 2, 6, 6))
    meta = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert tuple(meta["conv"].shape) == (3, 3, 4, 4)
    assert tuple(meta["view"].shape) == (3, 48)
    assert tuple(meta["fc"].shape) == (3, 5)
    assert meta["fc"].requires_grad and not meta["x"].requires_grad


def test_shape_propagation_leaves_batchnorm_statistics_alone() -> None:
    model = M.ConvBnRelu().train()
    before = model.bn.running_mean.clone()
    gk.trace(model, torch.randn(4, 3, 8, 8) + 3)
    assert torch.equal(model.bn.running_mean, before)
    assert model.training and model.bn.training


def test_auto_leaf_keeps_untraceable_submodule_whole(caplog) -> None:
    model = M.WithDataDependentBlock()
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="graphkd.trace"):
        gm = gk.trace(model, x)
    assert gm.meta["auto_leaves"] == ["gate"]
    assert [n.target for n in find_nodes(gm, op="call_module")] == ["stem", "gate", "head"]
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(-x.abs() * 10), model(-x.abs() * 10))  # both branches still live
    assert "gate (DataDependent)" in caplog.text


def test_auto_leaf_off_names_the_failing_submodule() -> None:
    with pytest.raises(gk.TraceError) as info:
        gk.trace(M.WithDataDependentBlock(), torch.randn(2, 3, 6, 6), auto_leaf=False)
    message = str(info.value)
    assert "submodule 'gate' (DataDependent)" in message
    assert "control flow" in message  # the original reason
    assert "leaf_modules=['gate']" in message and "auto_leaf" in message


def test_explicit_leaf_modules_by_class_and_path() -> None:
    x = torch.randn(2, 3, 6, 6)
    for leaf in (M.DataDependent, "gate"):
        gm = gk.trace(M.WithDataDependentBlock(), x, leaf_modules=[leaf], auto_leaf=False)
        assert "gate" in [n.target for n in find_nodes(gm, op="call_module")]
    gm = gk.trace(M.Residual(), torch.randn(1, 4, 5, 5), leaf_modules=[M.Residual])
    assert gm.meta["auto_leaves"] == []


def test_failure_outside_submodules_cannot_become_a_leaf() -> None:
    with pytest.raises(gk.TraceError) as info:
        gk.trace(M.TopLevelControlFlow(), torch.randn(2, 3))
    assert "top-level forward of TopLevelControlFlow" in str(info.value)
    assert "torch.fx.wrap" in str(info.value)


def test_wrong_example_inputs_raise_trace_error() -> None:
    with pytest.raises(gk.TraceError, match="failed on the example inputs"):
        gk.trace(M.ConvBnRelu(), torch.randn(2, 5, 8, 8))
    with pytest.raises(gk.TraceError, match="needs a torch.nn.Module"):
        gk.trace(lambda x: x, torch.randn(1))


def test_traced_graph_of_a_module_with_string_annotations_pickles() -> None:
    import pickle

    from graphkd.zoo import resnet_tiny  # its source uses `from __future__ import annotations`

    model = resnet_tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    restored = pickle.loads(pickle.dumps(gk.trace(model, x)))
    assert torch.equal(restored(x), model(x))
