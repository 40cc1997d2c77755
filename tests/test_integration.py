"""All passes in one pipeline, in different orders: train, export, compare."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphkd as gk
from graphkd.passes.quantizers import FakeQuantize
from graphkd.zoo import resnet_tiny

PRUNE = {"pass": "prune", "ratio": 0.5, "criterion": "geometric_median", "prune_first_conv": True,
         "prune_downsample_convs": True}
QUANTIZE = {"pass": "quantize", "bits": 8}
SPARSIFY = {"pass": "sparsify", "level": 0.3}
DISTILL = {"pass": "distill", "type": "softmax", "temperature": 2.0}


@pytest.mark.parametrize("pipeline", [
    [PRUNE, QUANTIZE, DISTILL],
    [DISTILL, QUANTIZE, PRUNE],
    [SPARSIFY, PRUNE, QUANTIZE, DISTILL],
], ids=["prune-quantize-distill", "distill-quantize-prune", "all-four"])
def test_compressed_student_trains_and_exports_exactly(pipeline) -> None:
    model = resnet_tiny().eval()
    original = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    c = gk.compress(model, {"pipeline": pipeline}, x)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.01, momentum=0.9)
    c.model.train()
    kd_losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(c.model(x), y) + c.loss()
        kd_losses.append(c.loss().item())
        loss.backward()
        opt.step()
        opt.zero_grad()
        c.step()
    c.epoch_step()
    assert all(v > 0 for v in kd_losses) and all(torch.isfinite(torch.tensor(kd_losses)))

    # the teacher is the untouched original: no quantizer, no mask, same outputs
    assert not any(isinstance(m, FakeQuantize) for m in c.teacher.modules())
    assert torch.equal(c.teacher(x), original(x))

    c.model.eval()
    exported = c.export()
    torch.testing.assert_close(exported(x), c.model(x), rtol=1e-5, atol=1e-5)
    assert c.loss().item() == 0.0  # eval forward: no distillation loss
    assert gk.count_params(exported) < 0.4 * gk.count_params(model)
    names = [n.name for n in exported.graph.nodes]
    assert "teacher" not in names and "distill_loss" not in names
    assert any(isinstance(m, FakeQuantize) for m in exported.modules())
    stats = c.statistics()
    assert {"prune", "quantize", "distill"} <= set(stats)
    assert stats["prune"]["flops"]["after"] < 0.4 * stats["prune"]["flops"]["before"]
