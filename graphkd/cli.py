"""The ``graphkd`` command line: run the main job, validate configs, list passes, draw graphs.

Exit codes: 0 ok, 1 failure, 2 bad config or arguments, 130 interrupted (Ctrl-C). Errors are one
line on stderr; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .config import build_passes, load_document
from .options import MISSING, pass_options, type_name
from .errors import ConfigError, GraphKDError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RUN_SECTIONS = ("model", "input_shape", "data")
SHOW_FORMATS = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot", ".json": "json",
                ".md": "mermaid", ".mmd": "mermaid"}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _run(args: argparse.Namespace) -> int:
    from .progress import progress_for
    from .report import markdown_table, rich_table, summary_lines
    from .run import run

    _log_to_stderr()
    result = run(args.config, out_dir=args.out, epochs=args.epochs, seed=args.seed,
                 progress=progress_for(sys.stderr))
    models = result.metrics["models"]
    if models:
        if sys.stdout.isatty():
            from rich.console import Console
            Console().print(rich_table(models, title=f"graphkd run {args.config}"))
        else:
            print(markdown_table(models))
    for line in summary_lines(models):
        print(line)
    print(f"outputs in {result.out_dir}/ (metrics.json, model.pt, curves.png, graphs)")
    if result.interrupted:
        print("interrupted: finished parts were saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _validate(args: argparse.Namespace) -> int:
    from .run import read_job

    document = load_document(args.config)
    ready = ""
    if any(key in document for key in RUN_SECTIONS):
        passes = read_job(args.config)[0].passes
        ready = "; ready for `graphkd run`"
    else:
        passes = build_passes(document)[0]
    print(f"{args.config}: ok ({len(passes)} passes: "
          f"{', '.join(p.name for p in passes) or 'none'}{ready})")
    return EXIT_OK


def _passes(args: argparse.Namespace) -> int:
    from .pipeline import available_passes

    for name, cls in available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        for option, (hint, default) in pass_options(cls).items():
            shown = "required" if default is MISSING else f"default {default!r}"
            print(f"    {option}: {type_name(hint)} ({shown})")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    import torch

    from .loading import build_model
    from .trace import trace
    from .viz import dump

    fmt = SHOW_FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {args.output!r}: use a file ending in "
                          f"{', '.join(SHOW_FORMATS)}", "--output")
    shape = _parse_shape(args.input_shape)
    model, _ = build_model(args.model, "model")
    gm = trace(model.eval(), torch.randn(shape))
    stem = Path(args.output).with_suffix("")
    written = dump(gm, stem, [fmt])
    if written[0] != Path(args.output):
        written[0].replace(args.output)
    print(f"{args.output}: {len(gm.graph.nodes)} nodes")
    return EXIT_OK


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ConfigError(f"must be comma-separated positive integers like 1,3,32,32, got {text!r}",
                          "--input-shape")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback on errors")
    parser = _Parser(prog="graphkd", description=__doc__, parents=[common],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], help="compress, fine-tune with KD, export, report",
                         description="Run the main job of CONFIG: teacher, compression, fine-tuning "
                                     "with distillation, export, metrics, curves and graph dumps.")
    run.add_argument("config", help="YAML config, e.g. configs/digits_prune_quant_kd.yaml")
    run.add_argument("--out", help="output folder (default runs/<config name>/)")
    run.add_argument("--epochs", type=_positive, help="fine-tuning epochs (overrides train.epochs)")
    run.add_argument("--seed", type=int, help="random seed (overrides seed)")
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", parents=[common], help="check a config without running it",
                              description="Check CONFIG's schema, pass names and options.")
    validate.add_argument("config")
    validate.set_defaults(func=_validate)

    passes = sub.add_parser("passes", parents=[common], help="list passes with options and defaults",
                            description="List every available pass with its options.")
    passes.set_defaults(func=_passes)

    show = sub.add_parser("show", parents=[common], help="trace a model and draw its graph",
                          description="Trace MODEL ('module:callable') on a random input and dump "
                                      "its graph; the format follows the output file's suffix.")
    show.add_argument("model", help="'module:callable' returning an nn.Module")
    show.add_argument("--input-shape", required=True, help="input shape, e.g. 1,3,32,32")
    show.add_argument("-o", "--output", default="graph.svg",
                      help="output file: .svg .png .dot .json or .md (Mermaid); default graph.svg")
    show.set_defaults(func=_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("graphkd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        if debug:
            raise
        _error("config error", exc)
        return EXIT_USAGE
    except GraphKDError as exc:
        if debug:
            raise
        _error("error", exc)
        return EXIT_FAILURE
    except Exception as exc:
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__} (rerun with --debug for the traceback)", exc)
        return EXIT_FAILURE


def _error(kind: str, exc: BaseException) -> None:
    message = " ".join(str(exc).split())
    print(f"graphkd: {kind}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
