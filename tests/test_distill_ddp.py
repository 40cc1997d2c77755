"""The distill pass under DistributedDataParallel: 2 gloo processes on CPU.

DDP averages gradients, so with equal per-rank batches and an mse loss (a mean over elements), two
ranks training on halves of a batch must follow exactly the single-process run on the whole batch;
the teacher, being outside the module tree, is never broadcast or synced and stays the original.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import graphkd as gk

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # per rank
MSE = {"pipeline": [{"pass": "distill", "type": "mse"}]}


class Student(nn.Module):
    """No BatchNorm: per-rank batch statistics would make DDP differ from one big batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


def make_data() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Student()
    example = torch.randn(2, 3, 8, 8)
    batches = [torch.randn(WORLD_SIZE * BATCH, 3, 8, 8) for _ in range(STEPS)]
    return model, example, batches


def perturbed(c: gk.Compressed) -> None:
    """Move the student away from the teacher so there is something to distill."""
    with torch.no_grad():
        for i, p in enumerate(c.model.parameters()):
            p.add_(0.05 * (i + 1))


def train_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        model, example, batches = make_data()
        c = gk.compress(model, MSE, example)
        perturbed(c)
        ddp = DistributedDataParallel(c.model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for batch in batches:
            ddp(batch[rank * BATCH:(rank + 1) * BATCH])
            c.loss().backward()
            opt.step()
            opt.zero_grad()
        ddp_tensors = {name for name, _ in ddp.named_parameters()} | {
            name for name, _ in ddp.named_buffers()}
        torch.save({"student": c.model.state_dict(), "teacher": c.teacher.state_dict(),
                    "ddp_tensors": sorted(ddp_tensors)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_match_single_process_training(tmp_path):
    mp.spawn(train_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE,
             join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    model, example, batches = make_data()
    original = copy.deepcopy(model)
    c = gk.compress(model, MSE, example)
    perturbed(c)
    start = copy.deepcopy(c.model.state_dict())
    opt = torch.optim.SGD(c.model.parameters(), lr=0.5)
    for batch in batches:
        c.model(batch)
        c.loss().backward()
        opt.step()
        opt.zero_grad()

    for rank, result in enumerate(results):
        assert result["ddp_tensors"] == sorted(f"module.{k}" for k in model.state_dict())
        for key, value in c.model.state_dict().items():
            torch.testing.assert_close(result["student"][key], value, rtol=0, atol=1e-6,
                                       msg=f"rank {rank}: {key}")
        for key, value in original.state_dict().items():
            assert torch.equal(result["teacher"][key], value), f"rank {rank} teacher {key}"
    for key in results[0]["student"]:
        assert torch.equal(results[0]["student"][key], results[1]["student"][key]), key
    moved = (c.model.state_dict()["conv1.weight"] - start["conv1.weight"]).abs().max()
    assert moved > 1e-3  # training did something, so the comparison above means something
