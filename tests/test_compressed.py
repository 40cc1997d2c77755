from __future__ import annotations

import copy

import torch
from torch import fx, nn

import graphkd as gk
from graphkd.graph import find_nodes, insert_on_weight, remove_nodes
from tests import models as M


class LearnableGain(nn.Module):
    """A weight transform with a parameter, a buffer and an export-time fold."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, w):
        if self.training:
            self.calls += 1
        return w * self.gain


class GainPass(gk.Pass):
    """Learnable per-filter gains, an L2 loss on them, a counter state and an export fold."""

    name = "gain"

    def __init__(self, *, decay: float = 0.1) -> None:
        self.decay = decay
        self.counter = Counter()

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        gains = []
        for node in find_nodes(gm, module_type=nn.Conv2d):
            m = gm.get_submodule(node.target)
            insert_on_weight(gm, node, f"gains.{node.target}", LearnableGain(m.out_channels))
            gains.append(gm.get_submodule(f"gains.{node.target}"))
        ctx.add_loss(self.name, lambda: self.decay * sum(((g.gain - 1) ** 2).sum() for g in gains))
        ctx.add_loss("silent", lambda: None)
        ctx.on_step(self.counter.tick)
        ctx.add_state(self.name, self.counter)
        ctx.on_calibrate(lambda data, n: self.counter.seen.extend(list(data)[:n]))
        ctx.on_export(fold_gains)


class Counter:
    def __init__(self) -> None:
        self.steps = 0
        self.seen: list = []

    def tick(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def fold_gains(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("gains."):
            layer = node.target[len("gains."):]
            conv = gm.get_submodule(layer)
            with torch.no_grad():
                conv.weight.mul_(gm.get_submodule(node.target).gain)
            node.replace_all_uses_with(node.args[0])
            remove_nodes(gm, [node])


def _trained(seed: int = 0) -> tuple[gk.Compressed, torch.Tensor]:
    torch.manual_seed(seed)
    gk.register_pass(GainPass)
    x = torch.randn(4, 3, 5, 5)
    c = gk.compress(M.Concat(), [GainPass(decay=0.5)], x)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.1)
    for _ in range(3):
        loss = c.model(x).pow(2).mean() + c.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        c.step()
    return c, x


def test_loss_is_zero_tensor_without_losses() -> None:
    c = gk.compress(M.Concat(), [], torch.randn(1, 3, 4, 4))
    loss = c.loss()
    assert loss.shape == () and loss.item() == 0.0 and c.teacher is None


def test_loss_sums_registered_losses_and_trains() -> None:
    c, x = _trained()
    gains = [c.model.get_submodule(f"gains.{n}").gain for n in ("a", "b", "fuse")]
    expected = 0.5 * sum(((g - 1) ** 2).sum() for g in gains)
    torch.testing.assert_close(c.loss(), expected)
    assert c.loss().item() > 0  # the gains moved away from 1
    assert c.context.states["gain"].steps == 3


def test_state_dict_round_trip_restores_outputs_and_pass_state() -> None:
    c, x = _trained()
    state = copy.deepcopy(c.state_dict())
    assert {"gains.a.gain", "gains.a.calls", "a.weight"} <= set(state["model"])
    assert state["passes"] == {"gain": {"steps": 3}}
    fresh = gk.compress(M.Concat(), [GainPass(decay=0.5)], x)
    assert not torch.equal(fresh.model(x), c.model(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.model(x), c.model(x))
    assert fresh.context.states["gain"].steps == 3


def test_export_runs_export_steps_on_a_copy() -> None:
    c, x = _trained()
    c.model.eval()
    exported = c.export()
    assert not exported.training and not hasattr(exported, "gains")
    torch.testing.assert_close(exported(x), c.model(x), rtol=1e-5, atol=1e-6)
    assert hasattr(c.model, "gains") and find_nodes(c.model, scope="gains") == []
    c.model.train()
    assert c.model.gains.a.gain.requires_grad  # the student is still trainable


def test_init_ranges_and_calibration_data_reach_calibrators() -> None:
    c, _ = _trained()
    data = [torch.randn(1, 3, 5, 5) for _ in range(5)]
    c.init_ranges(data, num_samples=2)
    assert len(c.context.states["gain"].seen) == 2
    gk.register_pass(GainPass)
    p = GainPass()
    gk.compress(M.Concat(), [p], torch.randn(1, 3, 5, 5), calibration_data=data,
                num_calibration_samples=4)
    assert len(p.counter.seen) == 4


def test_statistics_and_dumps(tmp_path) -> None:
    c = gk.compress(M.Concat(), [GainPass()], torch.randn(1, 3, 5, 5), dump_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"00_traced.dot", "00_traced.json", "01_gain.dot", "01_gain.json"} <= names
    assert c.statistics() == {}
