"""The ``napari-esam`` console script: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and
sets ``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from importlib import import_module

SUBCOMMAND_MODULES = (
    "napari_esam.cli.everything",
    "napari_esam.cli.embed",
    "napari_esam.cli.export",
    "napari_esam.cli.link",
    "napari_esam.cli.refine",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, systemd, Slurm) arrived: handled like Ctrl-C, exit code 143."""


#: exit code after SIGTERM (128 + 15, what a shell reports for a process it terminated)
EXIT_TERMINATED = 143


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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` (so the cleanup of Ctrl-C
    runs: temporary files removed, finished work kept); a second one during that cleanup
    is ignored. Only in the main thread (elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kept(args: argparse.Namespace) -> str:
    """What the interrupted or failed command kept and what to do (each subcommand sets
    ``kept``; errors while finding out give the general sentence)."""
    describe = getattr(args, "kept", None)
    try:
        return describe(args) if describe is not None else "finished work was kept"
    except Exception:  # noqa: BLE001 - only for the message
        return "finished work was kept"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 on success, 1 on Ctrl-C, 143 on
    SIGTERM, 2 on error)."""
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
        with _sigterm_as_interrupt():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"napari-esam {args.command}: {what}; {_kept(args)}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else 1
    except (UserError, ValueError, OSError) as exc:
        message = str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            message = (f"no space left on the device of {getattr(args, 'output', '?')!r} "
                       f"({exc.filename or exc.strerror}): free some space; {_kept(args)}")
        print(f"napari-esam {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
