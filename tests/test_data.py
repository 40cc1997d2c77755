"""Built-in data (digits, synthetic, user callables) and model loading from config sections."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from graphkd.data import DataSpec, digits, load_data, synthetic
from graphkd.errors import ConfigError
from graphkd.loading import build_model, resolve_callable
from graphkd.zoo import mlp


def tiny_datasets(n: int = 6) -> tuple[TensorDataset, TensorDataset]:
    """A user's data callable (used through 'tests.test_data:tiny_datasets')."""
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)
    return TensorDataset(x, torch.zeros(n, dtype=torch.long)), TensorDataset(x[:2], torch.ones(2))


def not_a_pair() -> int:
    return 3


def test_digits_are_the_sklearn_images_with_their_labels_standardised() -> None:
    from sklearn.datasets import load_digits

    train, test = digits()
    x_train, y_train = train.tensors
    assert x_train.shape == (1347, 1, 8, 8) and test.tensors[0].shape == (450, 1, 8, 8)
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-4
    # Raw pixels are integers 0..16 and both extremes occur in the train split, so mapping the
    # standardised min/max back to 0/16 must give integer images: exactly sklearn's, labels kept.
    x = torch.cat([x_train, test.tensors[0]]).flatten(1).double()
    low, high = x_train.min().double(), x_train.max().double()
    raw = (x - low) / (high - low) * 16
    assert (raw - raw.round()).abs().max() < 1e-3
    ours = Counter((tuple(r), int(y)) for r, y in zip(raw.round().int().tolist(),
                                                      torch.cat([y_train, test.tensors[1]])))
    bunch = load_digits()
    theirs = Counter((tuple(r), int(y)) for r, y in zip(bunch.data.astype(int).tolist(), bunch.target))
    assert ours == theirs


def test_digits_split_is_fixed_and_stratified() -> None:
    first, second = digits(), digits()
    assert torch.equal(first[1].tensors[0], second[1].tensors[0])
    from sklearn.datasets import load_digits

    totals = torch.bincount(torch.as_tensor(load_digits().target), minlength=10)
    in_test = torch.bincount(first[1].tensors[1], minlength=10)
    assert ((in_test - totals * 0.25).abs() <= 1).all()  # every class keeps its share


def test_synthetic_labels_follow_one_fixed_linear_rule() -> None:
    train, test = synthetic((2, 3), num_samples=40, num_classes=3, test_fraction=0.25)
    assert len(train) == 30 and len(test) == 10
    x = torch.cat([test.tensors[0], train.tensors[0]]).flatten(1)
    y = torch.cat([test.tensors[1], train.tensors[1]])
    # Regenerate the documented rule: inputs first, then the map, from one seeded generator.
    gen = torch.Generator().manual_seed(0)
    torch.randn(40, 2, 3, generator=gen)
    rule = torch.randn(6, 3, generator=gen)
    assert torch.equal((x @ rule).argmax(1), y)
    again = synthetic((2, 3), num_samples=40, num_classes=3)
    assert torch.equal(again[0].tensors[0], train.tensors[0])


def test_load_data_calls_a_user_callable_with_kwargs() -> None:
    spec = DataSpec.parse({"name": "tests.test_data:tiny_datasets", "kwargs": {"n": 5}})
    train, test = load_data(spec, [1, 4])
    assert len(train) == 5 and len(test) == 2


@pytest.mark.parametrize(("section", "path", "message"), [
    ({"name": "digits", "test_fraction": 1.0}, "data.test_fraction", "must be in (0, 1), got 1.0"),
    ({"name": "synthetic", "num_samples": 1}, "data.num_samples", "must be >= 2, got 1"),
    ({"name": "synthetic", "num_classes": 1}, "data.num_classes", "must be >= 2, got 1"),
    ("mnist", "data", "unknown data 'mnist': use one of digits, synthetic or a 'module:callable'"),
])
def test_data_section_errors_name_the_key(section: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataSpec.parse(section)
    assert info.value.path == path and message in info.value.problem


def test_a_data_callable_must_return_a_pair() -> None:
    with pytest.raises(ConfigError, match=r"^data: tests.test_data:not_a_pair must return \(train, "
                                          r"test\) datasets, got int"):
        load_data(DataSpec.parse("tests.test_data:not_a_pair"), [1, 4])


@pytest.mark.parametrize(("spec", "message"), [
    ("graphkd.zoo.digits_cnn", "expected 'module:callable'"),
    ("graphkd.nothing_here:f", "cannot import module 'graphkd.nothing_here'"),
    ("graphkd.zoo:digits_cn", "'graphkd.zoo' has no attribute 'digits_cn'; it has: "),
    ("graphkd.errors:__doc__", "is not callable (str)"),
])
def test_resolve_callable_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^model: ") as info:
        resolve_callable(spec, "model")
    assert message in str(info.value)


def test_build_model_loads_a_state_dict(tmp_path) -> None:
    trained = mlp((4, 5, 3))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    model, has_weights = build_model({"callable": "graphkd.zoo:mlp", "kwargs": {"sizes": [4, 5, 3]},
                                      "weights": str(tmp_path / "w.pt")})
    assert has_weights
    x = torch.randn(2, 4)
    assert torch.equal(model(x), trained(x))
    assert build_model("graphkd.zoo:digits_cnn")[1] is False


def test_build_model_weight_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^model.weights: weights file not found: .*nope.pt"):
        build_model({"callable": "graphkd.zoo:mlp", "weights": str(tmp_path / "nope.pt")})
    torch.save(mlp((4, 5, 3)).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"^model.weights: .*w.pt does not fit graphkd.zoo:mlp: "):
        build_model({"callable": "graphkd.zoo:mlp", "weights": str(tmp_path / "w.pt")})
    with pytest.raises(ConfigError, match=r"^model.kwargs: calling graphkd.zoo:mlp failed"):
        build_model({"callable": "graphkd.zoo:mlp", "kwargs": {"width": 3}})
