"""The ``napari-esam`` console script: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and
sets ``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Sequence
from importlib import import_module

SUBCOMMAND_MODULES = (
    "napari_esam.cli.everything",
    "napari_esam.cli.embed",
    "napari_esam.cli.export",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-esam",
        description="EfficientSAM / MobileSAM segmentation of microscopy images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 on success, 1 on interrupt, 2 on error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, args.command)
        return _run(args)


def _show_warning(command: str, message: Warning | str, *args: object, **kwargs: object) -> None:
    """A warning as one line on stderr (no source line)."""
    print(f"napari-esam {command}: warning: {message}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("napari-esam: interrupted; finished work was kept", file=sys.stderr)
        return 1
    except (UserError, ValueError, OSError) as exc:
        print(f"napari-esam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
