"""Training progress reporters: rich bars on a terminal, plain log lines everywhere else.

The training loop talks to a :class:`Progress`; the command line picks the implementation, so
library code never writes to the terminal itself.
"""
from __future__ import annotations

import logging
import time
from typing import IO, Any, Protocol

log = logging.getLogger("graphkd.train")


class Progress(Protocol):
    """What :func:`graphkd.train.fit` reports: one ``start`` per phase, ``batch`` per optimizer
    step, ``epoch`` with the epoch's metrics, ``finish`` once (also after Ctrl-C)."""

    def start(self, label: str, epochs: int, batches: int) -> None: ...
    def batch(self, loss: float, accuracy: float) -> None: ...
    def epoch(self, index: int, metrics: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.123  train 97.1%  test 96.0%`` from an epoch's metrics."""
    parts = [f"loss {metrics['loss']:.4f}"]
    if metrics.get("extra_loss"):
        parts.append(f"(pass losses {metrics['extra_loss']:.4f})")
    parts.append(f"train {metrics['train_accuracy']:.1%}")
    if metrics.get("test_accuracy") is not None:
        parts.append(f"test {metrics['test_accuracy']:.1%}")
    return "  ".join(parts)


class LogProgress:
    """One ``logging`` line per epoch (for logs, CI and pipes)."""

    def __init__(self) -> None:
        self.label, self.epochs, self.started = "", 0, 0.0

    def start(self, label: str, epochs: int, batches: int) -> None:
        self.label, self.epochs, self.started = label, epochs, time.perf_counter()
        log.info("%s: %d epochs x %d batches", label, epochs, batches)

    def batch(self, loss: float, accuracy: float) -> None:
        pass

    def epoch(self, index: int, metrics: dict[str, Any]) -> None:
        log.info("%s epoch %d/%d: %s (%.1f s)", self.label, index + 1, self.epochs,
                 format_metrics(metrics), time.perf_counter() - self.started)

    def finish(self) -> None:
        pass


class RichProgress:
    """Two live bars (epochs, batches) with the running loss and accuracy."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                              console=Console(file=stream), transient=False)
        self._epoch_task = self._batch_task = None
        self.label, self.epochs = "", 0

    def start(self, label: str, epochs: int, batches: int) -> None:
        self.finish()
        self.label, self.epochs = label, epochs
        self._bars.start()
        self._epoch_task = self._bars.add_task(f"{label} epochs", total=epochs, info="")
        self._batch_task = self._bars.add_task("  batches", total=batches, info="")

    def batch(self, loss: float, accuracy: float) -> None:
        self._bars.update(self._batch_task, advance=1, info=f"loss {loss:.4f} acc {accuracy:.1%}")

    def epoch(self, index: int, metrics: dict[str, Any]) -> None:
        self._bars.update(self._epoch_task, completed=index + 1, info=format_metrics(metrics))
        if index + 1 < self.epochs:
            self._bars.reset(self._batch_task)

    def finish(self) -> None:
        if self._epoch_task is not None:
            self._bars.stop()
            for task in list(self._bars.task_ids):
                self._bars.remove_task(task)
            self._epoch_task = self._batch_task = None


def progress_for(stream: IO[str]) -> Progress:
    """Rich bars when ``stream`` is a terminal and rich is installed, else log lines."""
    if stream.isatty():
        try:
            return RichProgress(stream)
        except ImportError:
            pass
    return LogProgress()
