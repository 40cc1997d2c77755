from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

import pytest

import graphkd as gk
from graphkd.config import load_document
from graphkd.nncf import nncf_scope
from graphkd.options import check_type, type_name


class Limits(TypedDict, total=False):
    low: float
    high: float


class Tuned(gk.Pass):
    """A pass with every kind of option the config loader checks."""

    name = "tuned"
    nncf_algorithm = "tuned_algorithm"

    def __init__(self, *, ratio: float, mode: Literal["fast", "slow"] = "fast", steps: int = 1,
                 scopes: list[str] | None = None, limits: Limits | bool = False) -> None:
        if not 0 <= ratio < 1:
            raise gk.ConfigError(f"must be in [0, 1), got {ratio}", "ratio")
        if isinstance(limits, dict) and limits.get("low", 0) > limits.get("high", 1):
            raise gk.ConfigError("low must not exceed high", "limits.low")
        self.ratio, self.mode, self.steps, self.limits = ratio, mode, steps, limits

    @classmethod
    def options_from_nncf(cls, section: dict[str, Any]) -> dict[str, Any]:
        options = {"ratio": section.get("params", {}).get("target", 0.5)}
        if "speed" in section:
            options["mode"] = section["speed"]
        return options


@pytest.fixture(autouse=True)
def _registered():
    gk.register_pass(Tuned)


def error_of(document) -> str:
    with pytest.raises(gk.ConfigError) as info:
        gk.Pipeline.from_dict(document) if isinstance(document, dict) else gk.Pipeline.from_yaml(document)
    return str(info.value)


def test_valid_document_builds_passes_with_options() -> None:
    pipe = gk.Pipeline.from_yaml("pipeline:\n  - pass: tuned\n    ratio: 0.25\n    mode: slow\n"
                                 "    limits: {low: 0, high: 2.5}\n")
    (p,) = pipe.passes
    assert (p.ratio, p.mode, p.steps, p.limits) == (0.25, "slow", 1, {"low": 0, "high": 2.5})


def test_unknown_pass_lists_available_and_suggests_closest() -> None:
    message = error_of({"pipeline": [{"pass": "tunde", "ratio": 0.1}]})
    assert message.startswith("pipeline[0].pass: unknown pass 'tunde'. Did you mean 'tuned'?")
    assert "Available passes:" in message and "tuned" in message


def test_unknown_option_suggests_closest() -> None:
    message = error_of({"pipeline": [{"pass": "tuned", "ratio": 0.1, "stpes": 3}]})
    assert message.startswith("pipeline[0].stpes: unknown option of pass 'tuned' 'stpes'. "
                              "Did you mean 'steps'?")


@pytest.mark.parametrize("options,expected", [
    ({"ratio": "half"}, 'pipeline[0].ratio: must be a number, got "half" (str)'),
    ({"ratio": 0.1, "steps": 2.5}, "pipeline[0].steps: must be an integer, got 2.5 (float)"),
    ({"ratio": 0.1, "steps": True}, "pipeline[0].steps: must be an integer, got true (bool)"),
    ({"ratio": 0.1, "mode": "medium"},
     "pipeline[0].mode: must be one of 'fast', 'slow', got \"medium\" (str)"),
    ({"ratio": 0.1, "scopes": ["a", 3]}, "pipeline[0].scopes[1]: must be a string, got 3 (int)"),
    ({"ratio": 0.1, "scopes": "a"}, "pipeline[0].scopes: must be a list of strings or null"),
    ({"ratio": 0.1, "limits": {"low": 1, "hi": 2}},
     "pipeline[0].limits.hi: unknown key 'hi'. Did you mean 'high'?"),
    ({"ratio": 0.1, "limits": {"low": "x"}}, "pipeline[0].limits.low: must be a number"),
    ({"ratio": 1.5}, "pipeline[0].ratio: must be in [0, 1), got 1.5"),
    ({"ratio": 0.1, "limits": {"low": 3, "high": 1}}, "pipeline[0].limits.low: low must not exceed"),
    ({}, "pipeline[0]: missing required option 'ratio' of pass 'tuned'"),
])
def test_wrong_types_and_ranges_name_the_exact_path(options, expected) -> None:
    assert error_of({"pipeline": [{"pass": "tuned", **options}]}).startswith(expected)


def test_document_shape_errors() -> None:
    assert error_of({"pipe": []}).startswith("missing 'pipeline': add a list of passes")
    assert "top-level keys found: pipe" in error_of({"pipe": []})
    assert error_of({"pipeline": [], "trian": {}}).startswith(
        "trian: unknown top-level key 'trian'. Did you mean 'train'?")
    assert error_of({"pipeline": {"pass": "tuned"}}).startswith("pipeline: must be a list")
    assert error_of({"pipeline": ["tuned"]}).startswith("pipeline[0]: each pipeline item must be a")
    assert error_of({"pipeline": [{"ratio": 0.1}]}).startswith("pipeline[0]: missing 'pass'")
    assert error_of({"pipeline": [], "input_shape": [1, "x"]}).startswith(
        "input_shape[1]: must be an integer")


def test_yaml_errors_carry_line_numbers() -> None:
    text = "pipeline:\n  - pass: tuned\n    ratio: 0.1\n  - pass: tuned\n    ratio: 2.0\n"
    assert error_of(text).startswith("pipeline[1].ratio (line 5): must be in [0, 1), got 2.0")
    broken = "pipeline:\n  - pass: tuned\n    ratio: [0.1\n"
    message = error_of(broken)
    assert message.startswith("line 4: <text> is not valid YAML") or message.startswith(
        "line 3: <text> is not valid YAML")


def test_yaml_is_loaded_safely() -> None:
    message = error_of("pipeline: !!python/object/apply:os.system ['echo pwned']\n")
    assert "is not valid YAML" in message and "python/object/apply" in message


def test_files_yaml_and_json(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("pipeline:\n  - pass: tuned\n    ratio: 0.3\n")
    assert gk.Pipeline.from_yaml(path).passes[0].ratio == 0.3
    assert gk.Pipeline.from_yaml(str(path)).passes[0].ratio == 0.3
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"pipeline": [{"pass": "tuned", "ratio": 0.4}]}))
    assert gk.Pipeline.from_yaml(js).passes[0].ratio == 0.4
    with pytest.raises(gk.ConfigError, match="config file not found: .*missing.yaml"):
        load_document(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(gk.ConfigError, match="must be a mapping with a 'pipeline' list, got list"):
        load_document(tmp_path / "list.yaml")


def test_nncf_config_is_translated() -> None:
    with pytest.warns(UserWarning, match="'target_device' has no meaning"):
        pipe = gk.Pipeline.from_dict({
            "input_info": {"sample_size": [1, 3, 32, 32]},
            "target_device": "CPU",
            "compression": [{"algorithm": "tuned_algorithm", "params": {"target": 0.3},
                             "speed": "slow"}],
        })
    assert pipe.document["input_shape"] == [1, 3, 32, 32]
    assert pipe.document["pipeline"] == [{"pass": "tuned", "ratio": 0.3, "mode": "slow"}]
    assert (pipe.passes[0].ratio, pipe.passes[0].mode) == (0.3, "slow")
    message = error_of({"compression": [{"algorithm": "tuned_algorithmm"}]})
    assert message.startswith("compression[0].algorithm: unknown NNCF algorithm 'tuned_algorithmm'"
                              ". Did you mean 'tuned_algorithm'?")
    assert error_of({"compression": [{"params": {}}]}).startswith(
        "compression[0]: each section needs an 'algorithm' key")


def test_type_names_read_well() -> None:
    assert type_name(int | None) == "an integer or null"
    assert type_name(list[str]) == "a list of strings"
    assert type_name(Literal["a", "b"]) == "one of 'a', 'b'"
    check_type({"low": 1.0}, Limits | bool, "x")
    with pytest.raises(gk.ConfigError, match="x: must be a mapping with keys low, high or true"):
        check_type("yes", Limits | bool, "x")


def test_nncf_scope_names() -> None:
    assert nncf_scope("ResNet/Sequential[layer1]/BasicBlock[0]/Conv2d[conv1]") == "layer1.0.conv1"
    assert nncf_scope("{re}.*classifier.*") == "re:.*classifier.*"
