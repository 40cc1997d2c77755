"""The graphkd command line: exit codes, one-line errors, --debug, validate, passes, show."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphkd as gk
from graphkd.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from graphkd.errors import ConfigError
from graphkd.viz import json_graph
from graphkd.zoo import resnet_tiny

RUNNABLE = """\
model: graphkd.zoo:digits_cnn
input_shape: [1, 1, 8, 8]
data: digits
pipeline:
  - pass: distill
    type: mse
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line_error(capsys: pytest.CaptureFixture, code: int, argv: list[str], expected: int) -> str:
    assert code == expected
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


ERROR_CASES = [
    (["validate", "{missing}"], "graphkd: config error: config file not found: "),
    (["run", "{missing}"], "graphkd: config error: config file not found: "),
    (["validate", "{bad_yaml}"], "graphkd: config error: line 2: "),
    (["validate", "{unknown_pass}"], "graphkd: config error: pipeline[0].pass (line 2): unknown pass "
                                     "'prunee'. Did you mean 'prune'?"),
    (["run", "{unknown_pass}"], "graphkd: config error: pipeline[0].pass (line 2): unknown pass"),
    (["validate", "{unknown_key}"], "graphkd: config error: trian (line 1): unknown top-level key "
                                    "'trian'. Did you mean 'train'?"),
    (["validate", "{bad_train}"], "graphkd: config error: train.epochs (line 5): must be an integer, "
                                  "got \"ten\" (str)"),
    (["validate", "{no_distill}"], "graphkd: config error: compare (line 5): 'no_distill' compares "
                                   "against the same pipeline without its distill pass"),
    (["run"], "graphkd run: error: the following arguments are required: config (see 'graphkd run "
              "--help')"),
    (["run", "x.yaml", "--epochs", "0"], "graphkd run: error: argument --epochs: must be a positive "
                                          "integer, got '0'"),
    (["frobnicate"], "graphkd: error: argument command: invalid choice: 'frobnicate'"),
    (["show", "graphkd.zoo:nope", "--input-shape", "1,3,8,8"], "graphkd: config error: model: "
                                                                "'graphkd.zoo' has no attribute 'nope'"),
    (["show", "graphkd.zoo:mlp", "--input-shape", "1,x"], "graphkd: config error: --input-shape: must "
                                                           "be comma-separated positive integers"),
    (["show", "graphkd.zoo:mlp", "--input-shape", "1,784", "-o", "g.pdf"],
     "graphkd: config error: --output: cannot tell the format of 'g.pdf'"),
    (["show", "graphkd.zoo:mlp"], "graphkd show: error: the following arguments are required: "
                                  "--input-shape"),
]


@pytest.mark.parametrize(("argv", "message"), ERROR_CASES)
def test_every_error_path_exits_2_with_one_line(tmp_path, capsys, argv, message) -> None:
    files = {
        "missing": str(tmp_path / "missing.yaml"),
        "bad_yaml": write(tmp_path, "pipeline: [\n", "bad.yaml"),
        "unknown_pass": write(tmp_path, "pipeline:\n  - pass: prunee\n", "p.yaml"),
        "unknown_key": write(tmp_path, "trian: {epochs: 1}\npipeline: []\n", "k.yaml"),
        "bad_train": write(tmp_path, RUNNABLE.replace("pipeline:", "train:\n  epochs: ten\npipeline:"),
                           "t.yaml"),
        "no_distill": write(tmp_path, "model: graphkd.zoo:mlp\ninput_shape: [1, 784]\ndata: digits\n"
                                      "pipeline: []\ncompare: no_distill\n", "n.yaml"),
    }
    argv = [a.format(**files) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    err = one_line_error(capsys, code, argv, EXIT_USAGE)
    assert err.startswith(message), err


def test_debug_shows_the_traceback(tmp_path) -> None:
    config = write(tmp_path, "pipeline:\n  - pass: prunee\n")
    with pytest.raises(ConfigError, match="unknown pass 'prunee'"):
        main(["validate", config, "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "validate", config])


def test_failures_that_are_not_usage_errors_exit_1(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code = main(["show", "graphkd.zoo:mlp", "--input-shape", "1,784", "-o", str(tmp_path / "g.svg")])
    err = one_line_error(capsys, code, [], EXIT_FAILURE)
    assert err.startswith("graphkd: error: cannot write g.svg: rendering svg needs the Graphviz "
                          "'dot' program")


def test_unexpected_exceptions_are_one_line_with_a_hint(tmp_path, capsys, monkeypatch) -> None:
    import graphkd.cli as cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "_passes", broken)
    code = main(["passes"])
    err = one_line_error(capsys, code, [], EXIT_FAILURE)
    assert err == ("graphkd: unexpected RuntimeError (rerun with --debug for the traceback): boom "
                   "second line")


def test_validate_reports_passes_and_run_readiness(tmp_path, capsys) -> None:
    assert main(["validate", write(tmp_path, RUNNABLE)]) == EXIT_OK
    assert capsys.readouterr().out.endswith("ok (1 passes: distill; ready for `graphkd run`)\n")
    assert main(["validate", write(tmp_path, "pipeline:\n  - pass: distill\n    type: mse\n",
                                   "p.yaml")]) == EXIT_OK
    assert capsys.readouterr().out.endswith("ok (1 passes: distill)\n")


def test_passes_lists_every_pass_with_options_and_defaults(capsys) -> None:
    assert main(["passes"]) == EXIT_OK
    out = capsys.readouterr().out
    for name in gk.available_passes():
        assert f"\n{name}: " in "\n" + out
    assert "    type: one of 'mse', 'softmax' (required)" in out
    assert "    weight: a number (default 1.0)" in out


def test_show_dumps_any_model(tmp_path, capsys) -> None:
    target = tmp_path / "graph.json"
    argv = ["show", "graphkd.zoo:resnet_tiny", "--input-shape", "1,3,16,16", "-o", str(target)]
    assert main(argv) == EXIT_OK
    expected = gk.trace(resnet_tiny(), torch.randn(1, 3, 16, 16))
    graph = json_graph(target.read_text())
    assert list(graph.nodes) == [n.name for n in expected.graph.nodes]
    assert graph.nodes["layer2_0_conv1"]["shape"] == [1, 32, 8, 8]
    assert capsys.readouterr().out == f"{target}: {len(expected.graph.nodes)} nodes\n"
    mermaid = tmp_path / "graph.md"
    assert main(["show", "graphkd.zoo:resnet_tiny", "--input-shape", "1,3,16,16", "-o",
                 str(mermaid)]) == EXIT_OK
    assert mermaid.read_text().startswith("```mermaid\nflowchart TD\n")


@pytest.mark.parametrize("argv", [[], ["run"], ["validate"], ["passes"], ["show"]])
def test_help_on_each_command(capsys, argv) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == EXIT_OK
    assert capsys.readouterr().out.startswith(f"usage: graphkd {' '.join(argv)}".rstrip())


def test_the_installed_command_runs() -> None:
    script = Path(sys.executable).with_name("graphkd")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "graphkd.cli"]
    done = subprocess.run([*command, "run", "--help"], capture_output=True, text=True, check=True)
    assert "--epochs EPOCHS" in done.stdout and "--out OUT" in done.stdout
    assert "--seed SEED" in done.stdout
