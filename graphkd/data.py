"""Built-in datasets for ``graphkd run``: real digits with no download, synthetic data, or yours.

``data`` in a config is ``digits`` (the 8x8 handwritten digits that ship inside scikit-learn),
``synthetic`` (random inputs labelled by a fixed random linear rule, so a model can learn it), or
``"module:callable"`` returning ``(train, test)`` datasets of ``(input, label)`` pairs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from .errors import ConfigError
from .loading import resolve_callable

DIGITS_SPLIT_SEED = 0  # the split never depends on the run seed, so results are comparable


@dataclass(frozen=True)
class DataSpec:
    """A normalised ``data`` section."""

    name: str
    num_samples: int = 1024
    num_classes: int = 10
    test_fraction: float = 0.25
    kwargs: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, section: str | Mapping[str, Any], path: str = "data") -> DataSpec:
        """Accept ``"digits"`` or ``{name: digits, ...}``; range errors name the key."""
        if isinstance(section, str):
            section = {"name": section}
        spec = cls(**section)
        if spec.num_samples < 2:
            raise ConfigError(f"must be >= 2, got {spec.num_samples}", f"{path}.num_samples")
        if spec.num_classes < 2:
            raise ConfigError(f"must be >= 2, got {spec.num_classes}", f"{path}.num_classes")
        if not 0 < spec.test_fraction < 1:
            raise ConfigError(f"must be in (0, 1), got {spec.test_fraction}",
                              f"{path}.test_fraction")
        if spec.name not in BUILTIN and ":" not in spec.name:
            raise ConfigError(f"unknown data {spec.name!r}: use one of {', '.join(BUILTIN)} or a "
                              f"'module:callable' returning (train, test) datasets", path)
        return spec


def load_data(spec: DataSpec, input_shape: Sequence[int], path: str = "data"
              ) -> tuple[Dataset, Dataset]:
    """The ``(train, test)`` datasets ``spec`` names; ``input_shape`` is the model's (N, ...)."""
    if spec.name == "digits":
        return digits(spec.test_fraction)
    if spec.name == "synthetic":
        return synthetic(tuple(input_shape[1:]), spec.num_samples, spec.num_classes,
                         spec.test_fraction)
    build = resolve_callable(spec.name, path)
    result = build(**dict(spec.kwargs or {}))
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ConfigError(f"{spec.name} must return (train, test) datasets, got "
                          f"{type(result).__name__}", path)
    return result[0], result[1]


def digits(test_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) float tensors, standardised with the train
    split's mean and std; a fixed stratified split (seed ``DIGITS_SPLIT_SEED``)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError("data 'digits' needs scikit-learn: pip install 'graphkd[demo]'",
                          "data") from None
    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_fraction, random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target)
    x_train = torch.tensor(x_train, dtype=torch.float32)
    x_test = torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(), x_train.std()

    def tensors(x: torch.Tensor, y: Any) -> TensorDataset:
        return TensorDataset(((x - mean) / std).reshape(-1, 1, 8, 8),
                             torch.as_tensor(y, dtype=torch.long))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def synthetic(sample_shape: tuple[int, ...], num_samples: int = 1024, num_classes: int = 10,
              test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian inputs labelled by the argmax of a fixed random linear map: learnable, tiny, and
    the same for every run with the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *sample_shape, generator=gen)
    rule = torch.randn(math.prod(sample_shape), num_classes, generator=gen)
    y = (x.flatten(1) @ rule).argmax(1)
    n_test = max(1, round(num_samples * test_fraction))
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


BUILTIN = {"digits": digits, "synthetic": synthetic}
