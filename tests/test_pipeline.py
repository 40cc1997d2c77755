from __future__ import annotations

import copy
from importlib import metadata

import pytest
import torch
from torch import fx, nn

import graphkd as gk
import graphkd.pipeline as pipeline_module
from graphkd.graph import ScopeFilter, find_nodes, insert_module_after, insert_on_weight, scopes_of
from tests import models as M
from tests.models import Scale


class ScaleConvOutputs(gk.Pass):
    """Multiply each selected conv's output by ``factor`` (a test pass with a visible effect)."""

    name = "scale_conv_outputs"

    def __init__(self, *, factor: float = 2.0, ignored_scopes: list[str] | None = None) -> None:
        if factor <= 0:
            raise gk.ConfigError(f"must be > 0, got {factor}", "factor")
        self.factor, self.ignored_scopes = factor, ignored_scopes

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        select = ScopeFilter(scopes_of(gm), ignored_scopes=self.ignored_scopes)
        done = []
        for node in find_nodes(gm, module_type=nn.Conv2d):
            if select(node.meta["scope"]):
                insert_module_after(gm, node, f"scales.{node.target}", Scale(self.factor))
                done.append(node.target)
        ctx.statistics[self.name] = {"scaled": done}


class ZeroWeights(gk.Pass):
    """Put a weight transform on every conv that zeroes it, counting steps (state + hooks)."""

    name = "zero_weights"

    def __init__(self) -> None:
        self.steps = {"step": 0, "epoch": 0}

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        for node in find_nodes(gm, module_type=nn.Conv2d):
            insert_on_weight(gm, node, f"zeros.{node.target}", Scale(0.0))
        ctx.on_step(lambda: self.steps.__setitem__("step", self.steps["step"] + 1))
        ctx.on_epoch(lambda: self.steps.__setitem__("epoch", self.steps["epoch"] + 1))
        ctx.statistics[self.name] = lambda: dict(self.steps)


class BreaksGraph(gk.Pass):
    name = "breaks_graph"

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        (conv,) = find_nodes(gm, module_type=nn.Conv2d)
        conv.args = (conv.args[0], "not a tensor")


class Crashes(gk.Pass):
    name = "crashes"

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def _registered():
    for cls in (ScaleConvOutputs, ZeroWeights, BreaksGraph, Crashes):
        gk.register_pass(cls)


def test_custom_pass_from_yaml_text_and_original_untouched() -> None:
    model = M.Concat()
    x = torch.randn(2, 3, 5, 5)
    before = copy.deepcopy(model.state_dict())
    reference = model(x)
    c = gk.compress(model, """
pipeline:
  - pass: scale_conv_outputs
    factor: 3
    ignored_scopes: [fuse]
""", x)
    expected = model.fuse(torch.cat([3 * model.a(x), 3 * model.b(x)], 1))
    torch.testing.assert_close(c.model(x), expected)
    assert c.statistics() == {"scale_conv_outputs": {"scaled": ["a", "b"]}}
    # the original model: same tensors, same structure, same outputs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, Scale) for m in model.modules())
    assert torch.equal(model(x), reference)


def test_compress_does_not_modify_original_with_weight_edges_and_batchnorm() -> None:
    model = M.ConvBnRelu().train()
    x = torch.randn(4, 3, 6, 6)
    before = copy.deepcopy(model.state_dict())
    c = gk.compress(model, [ZeroWeights()], x)
    assert type(model.conv) is nn.Conv2d and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert c.model.conv is not model.conv


def test_passes_run_in_order_and_compose() -> None:
    model = M.ConvBnRelu().eval()
    x = torch.randn(2, 3, 4, 4)
    c = gk.compress(model, gk.Pipeline([ScaleConvOutputs(factor=2.0), ZeroWeights()]), x)
    c.model.eval()
    # conv weight zeroed, bias kept, then scaled by 2 before BN
    z = 2 * model.conv.bias.view(1, -1, 1, 1).expand(2, 8, 4, 4)
    torch.testing.assert_close(c.model(x), model.relu(model.bn(z)))


def test_step_and_epoch_hooks_and_live_statistics() -> None:
    c = gk.compress(M.ConvBnRelu(), {"pipeline": [{"pass": "zero_weights"}]}, torch.randn(1, 3, 4, 4))
    for _ in range(3):
        c.step()
    c.epoch_step()
    assert c.statistics() == {"zero_weights": {"step": 3, "epoch": 1}}


def test_pass_that_breaks_the_graph_raises_pass_error_with_index() -> None:
    with pytest.raises(gk.PassError) as info:
        gk.compress(M.ConvBnRelu(), {"pipeline": [{"pass": "scale_conv_outputs"},
                                                   {"pass": "breaks_graph"}]},
                    torch.randn(1, 3, 4, 4))
    assert "pass pipeline[1] (breaks_graph) left the student graph broken" in str(info.value)
    with pytest.raises(gk.PassError, match=r"pass pipeline\[0\] \(crashes\) failed: RuntimeError: boom"):
        gk.compress(M.ConvBnRelu(), [Crashes()], torch.randn(1, 3, 4, 4))


def test_config_error_inside_apply_gets_the_pipeline_path() -> None:
    with pytest.raises(gk.ConfigError) as info:
        gk.compress(M.Concat(), {"pipeline": [{"pass": "scale_conv_outputs",
                                               "ignored_scopes": ["fusee"]}]},
                    torch.randn(1, 3, 4, 4))
    assert str(info.value).startswith("pipeline[0].ignored_scopes[0]: scope pattern 'fusee'")
    assert "closest module paths: fuse" in str(info.value)


def test_register_pass_rejects_non_passes_and_bad_names() -> None:
    with pytest.raises(TypeError):
        gk.register_pass(nn.ReLU)

    class Nameless(gk.Pass):
        pass

    with pytest.raises(ValueError, match="non-empty identifier"):
        gk.register_pass(Nameless)


def test_entry_point_passes_are_discovered(monkeypatch) -> None:
    class FromPlugin(gk.Pass):
        name = "from_plugin"

    fake = metadata.EntryPoint("from_plugin", "tests.test_pipeline:PLUGIN", "graphkd.passes")
    monkeypatch.setattr(pipeline_module, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(pipeline_module.metadata, "entry_points",
                        lambda group: [fake] if group == "graphkd.passes" else [])
    monkeypatch.setattr(__import__("tests.test_pipeline").test_pipeline, "PLUGIN", FromPlugin,
                        raising=False)
    monkeypatch.setattr(pipeline_module, "_REGISTRY", dict(pipeline_module._REGISTRY))
    assert gk.available_passes()["from_plugin"] is FromPlugin


def test_builtin_passes_are_registered_through_entry_points() -> None:
    declared = {ep.name for ep in metadata.entry_points(group="graphkd.passes")}
    assert {"distill", "quantize", "sparsify", "prune"} <= declared


def test_modules_the_passes_add_take_the_mode_of_an_eval_model() -> None:
    """An eval-mode model stays in eval mode as a whole: no quantizer range update, no teacher
    forward and no distillation loss until the user calls ``train()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    c = gk.compress(model, {"pipeline": [{"pass": "quantize"},
                                         {"pass": "distill", "type": "mse"}]}, x)
    assert not any(m.training for m in c.model.modules())
    c.model(x)
    assert float(c.loss()) == 0.0
    c.model.train()
    c.model(x)
    assert c.loss().item() > 0.0
