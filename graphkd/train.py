"""The fine-tuning loop ``graphkd run`` uses: task loss + the passes' losses, schedules stepped.

It is the loop from the README made reusable: ``criterion(model(x), y) + hooks.loss()``, then
``hooks.step()`` after every optimizer step and ``hooks.epoch_step()`` after every epoch, where
``hooks`` is a :class:`graphkd.Compressed` (or None to train a plain model, e.g. the teacher).
Ctrl-C ends training after the current batch and returns what was done, marked ``interrupted``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError
from .progress import LogProgress, Progress

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainSpec:
    """A normalised ``train`` section: fine-tuning settings, and the teacher's when ``graphkd
    run`` has to train the original model first."""

    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    teacher_epochs: int = 20
    teacher_lr: float = 3e-3
    calibration_samples: int | None = None  # None: each pass's own count; 0: no calibration

    @classmethod
    def parse(cls, section: Mapping[str, Any] | None, path: str = "train", **overrides: Any
              ) -> TrainSpec:
        """Build from a (type-checked) section; ranges are checked here, errors name the key."""
        values = {**(section or {}), **{k: v for k, v in overrides.items() if v is not None}}
        spec = cls(**values)
        for name in ("epochs", "batch_size", "teacher_epochs", "calibration_samples"):
            minimum = 0 if name in ("teacher_epochs", "calibration_samples") else 1
            if getattr(spec, name) is not None and getattr(spec, name) < minimum:
                raise ConfigError(f"must be >= {minimum}, got {getattr(spec, name)}", f"{path}.{name}")
        for name in ("lr", "teacher_lr"):
            if not getattr(spec, name) > 0:
                raise ConfigError(f"must be > 0, got {getattr(spec, name)}", f"{path}.{name}")
        if spec.weight_decay < 0 or not 0 <= spec.momentum < 1:
            bad = "weight_decay" if spec.weight_decay < 0 else "momentum"
            raise ConfigError(f"out of range: {getattr(spec, bad)}", f"{path}.{bad}")
        return spec

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingHooks(Protocol):
    """What the loop needs from a :class:`graphkd.Compressed`."""

    def loss(self) -> torch.Tensor: ...
    def step(self) -> None: ...
    def epoch_step(self) -> None: ...


@dataclass
class History:
    """Per-epoch metrics of one training phase; ``interrupted`` after Ctrl-C."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def make_optimizer(params: Iterable[nn.Parameter], spec: TrainSpec, lr: float
                   ) -> torch.optim.Optimizer:
    """The optimizer ``spec.optimizer`` names, over the trainable ``params``."""
    params = [p for p in params if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay)


def learning_rate_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (cosine decays to 0)."""
    if schedule == "cosine" and total_steps > 0:
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 1.0


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process loader whose shuffling depends on ``seed`` only (comparable runs)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in model.parameters()), torch.device("cpu"))


def _batches(data: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for inputs, targets in data:
        yield inputs.to(device), targets.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` in eval mode over ``(inputs, labels)`` batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for inputs, targets in _batches(data, _device_of(model)):
            correct += (model(inputs).argmax(1) == targets).sum().item()
            total += targets.numel()
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def fit(model: nn.Module, train_data: DataLoader, spec: TrainSpec, *, epochs: int, lr: float,
        hooks: TrainingHooks | None = None, test_data: Iterable | None = None,
        progress: Progress | None = None, label: str = "train") -> History:
    """Train ``model`` for ``epochs`` on ``criterion + hooks.loss()``; returns the history.

    Stops cleanly on Ctrl-C (after the batch in flight) with ``history.interrupted = True``.
    """
    progress = progress or LogProgress()
    criterion = nn.CrossEntropyLoss()
    optimizer = make_optimizer(model.parameters(), spec, lr)
    total_steps = epochs * len(train_data)
    history, step = History(), 0
    device = _device_of(model)
    progress.start(label, epochs, len(train_data))
    try:
        for epoch in range(epochs):
            model.train()
            sums = {"loss": 0.0, "extra_loss": 0.0, "correct": 0, "seen": 0}
            for inputs, targets in _batches(train_data, device):
                for group in optimizer.param_groups:
                    group["lr"] = lr * learning_rate_factor(spec.schedule, step, total_steps)
                outputs = model(inputs)
                extra = hooks.loss() if hooks is not None else None
                loss = criterion(outputs, targets) + (extra if extra is not None else 0.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if hooks is not None:
                    hooks.step()
                step += 1
                n = targets.numel()
                sums["loss"] += loss.item() * n
                sums["extra_loss"] += float(extra.item() if extra is not None else 0.0) * n
                sums["correct"] += (outputs.detach().argmax(1) == targets).sum().item()
                sums["seen"] += n
                progress.batch(sums["loss"] / sums["seen"], sums["correct"] / sums["seen"])
            if hooks is not None:
                hooks.epoch_step()
            metrics = {"epoch": epoch + 1, "loss": sums["loss"] / sums["seen"],
                       "extra_loss": sums["extra_loss"] / sums["seen"],
                       "train_accuracy": sums["correct"] / sums["seen"],
                       "test_accuracy": evaluate(model, test_data) if test_data is not None else None,
                       "lr": optimizer.param_groups[0]["lr"]}
            history.epochs.append(metrics)
            progress.epoch(epoch, metrics)
    except KeyboardInterrupt:
        history.interrupted = True
        log.warning("%s interrupted after %d complete epoch(s)", label, len(history.epochs))
    finally:
        progress.finish()
        model.eval()
    return history

