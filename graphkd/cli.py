"""The ``graphkd`` command line."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import pass_options, type_name, MISSING
from .errors import ConfigError, GraphKDError
from .pipeline import Pipeline, available_passes

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _validate(args: argparse.Namespace) -> int:
    pipeline = Pipeline.from_yaml(args.config)
    print(f"{args.config}: ok ({len(pipeline.passes)} passes: "
          f"{', '.join(p.name for p in pipeline.passes)})")
    return EXIT_OK


def _passes(args: argparse.Namespace) -> int:
    for name, cls in available_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        for option, (hint, default) in pass_options(cls).items():
            shown = "required" if default is MISSING else f"default {default!r}"
            print(f"    {option}: {type_name(hint)} ({shown})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphkd", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a pipeline config without running it")
    validate.add_argument("config")
    validate.set_defaults(func=_validate)
    passes = sub.add_parser("passes", help="list the available passes and their options")
    passes.set_defaults(func=_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"graphkd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GraphKDError as exc:
        if args.debug:
            raise
        print(f"graphkd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
