"""What the toolkit's commands (`dam`, `dam-data`) share: argument types and the run loop.

A command's parser has subcommands that register ``set_defaults(handler=...)``; `run_command`
parses, sets up logging, runs the handler and turns errors the user can fix into one line
``PROG: error: ...`` with exit status 2, as argparse does for bad options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dam.errors import DamInputError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def run_command(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    configure_logging: Callable[[argparse.Namespace], None],
    user_errors: tuple[type[BaseException], ...] = (DamInputError,),
    interrupted_hint: str = "",
) -> int:
    """Parse `argv`, run the chosen subcommand's handler, return the exit status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad option (argparse already printed why)
        return int(exit_.code or 0)
    configure_logging(args)
    try:
        return int(args.handler(args))
    except user_errors as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted{interrupted_hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
