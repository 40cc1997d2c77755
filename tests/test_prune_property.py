"""Property: on random small DAGs of conv/BN/ReLU/add/cat/depthwise/linear, pruning at any ratio
exports a model with no more channels that computes exactly what the masked student computes."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphkd as gk
from tests.models import randomize_norms

IN_CHANNELS, SIZE = 3, 6


class RandomDag(nn.Module):
    """Runs ``plan``: each step reads earlier tensors (0 is the input) and appends one tensor."""

    def __init__(self, plan: list[tuple], flatten_head: bool) -> None:
        super().__init__()
        self.plan = plan
        self.layers = nn.ModuleList()
        widths = [IN_CHANNELS]
        for op, *args in plan:
            src = args[0]
            if op == "conv":
                self.layers.append(nn.Conv2d(widths[src], args[1], args[2], padding=args[2] // 2,
                                             bias=args[3]))
                widths.append(args[1])
            elif op == "bn":
                self.layers.append(nn.BatchNorm2d(widths[src]))
                widths.append(widths[src])
            elif op == "dw":
                self.layers.append(nn.Conv2d(widths[src], widths[src], 3, padding=1,
                                             groups=widths[src]))
                widths.append(widths[src])
            elif op == "cat":
                self.layers.append(nn.Identity())
                widths.append(widths[src] + widths[args[1]])
            else:  # relu, add: same width
                self.layers.append(nn.Identity())
                widths.append(widths[src])
        self.flatten_head = flatten_head
        features = widths[-1] * SIZE * SIZE if flatten_head else widths[-1]
        self.head = nn.Linear(features, 5)

    def forward(self, x):
        values = [x]
        for (op, *args), layer in zip(self.plan, self.layers):
            a = values[args[0]]
            if op == "relu":
                values.append(torch.relu(a))
            elif op == "add":
                values.append(a + values[args[1]])
            elif op == "cat":
                values.append(torch.cat([a, values[args[1]]], 1))
            else:
                values.append(layer(a))
        last = values[-1]
        return self.head(last.flatten(1) if self.flatten_head else last.mean((2, 3)))


@st.composite
def plans(draw) -> tuple[list[tuple], bool]:
    widths = [IN_CHANNELS]
    plan: list[tuple] = [("conv", 0, draw(st.sampled_from([4, 6, 8])), 3, True)]
    widths.append(plan[0][2])
    for _ in range(draw(st.integers(2, 7))):
        src = draw(st.integers(1, len(widths) - 1))
        op = draw(st.sampled_from(["conv", "bn", "relu", "add", "cat", "dw"]))
        same = [i for i in range(1, len(widths)) if widths[i] == widths[src]]
        if op == "conv":
            step = ("conv", src, draw(st.sampled_from([2, 4, 6])), draw(st.sampled_from([1, 3])),
                    draw(st.booleans()))
            widths.append(step[2])
        elif op == "add":
            step = ("add", src, draw(st.sampled_from(same)))
            widths.append(widths[src])
        elif op == "cat":
            other = draw(st.integers(1, len(widths) - 1))
            step = ("cat", src, other)
            widths.append(widths[src] + widths[other])
        else:
            step = (op, src)
            widths.append(widths[src])
        plan.append(step)
    return plan, draw(st.booleans())


def channel_counts(model: nn.Module) -> dict[str, int]:
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            counts[name] = m.weight.shape[0] * m.weight.shape[1]
        elif isinstance(m, nn.BatchNorm2d):
            counts[name] = m.num_features
    return counts


@settings(max_examples=60, deadline=None, derandomize=True)
@given(plans(), st.floats(0.0, 0.95), st.sampled_from(["l1", "l2", "geometric_median"]),
       st.sampled_from([1, 2]))
def test_export_equals_masked_student_with_fewer_channels(spec, ratio, criterion, round_to):
    torch.manual_seed(0)
    plan, flatten_head = spec
    model = randomize_norms(RandomDag(plan, flatten_head))
    x = torch.randn(2, IN_CHANNELS, SIZE, SIZE)
    c = gk.compress(model, {"pipeline": [{"pass": "prune", "ratio": ratio, "criterion": criterion,
                                          "round_to": round_to, "prune_first_conv": True}]}, x)
    c.model.eval()
    exported = c.export()
    probe = torch.randn(3, IN_CHANNELS, SIZE, SIZE)
    torch.testing.assert_close(exported(probe), c.model(probe), atol=1e-5, rtol=0)
    before, after = channel_counts(c.model), channel_counts(exported)
    assert all(after[name] <= before[name] for name in after)
    # dead branches of the random plan vanish on export, so <= rather than ==
    assert gk.count_params(exported) <= c.statistics()["prune"]["params"]["after"]
