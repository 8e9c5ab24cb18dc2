"""What every CLI script shares.

    Parser     argparse.ArgumentParser whose usage errors are one stderr line and exit status 2,
               like every other bad input
    run(parser, stage, format_summary, argv, status)
               the whole `main()` of a script: parse, call the stage, print its summary; a TraitError
               becomes one `error: ...` line on stderr and its exit status (2); any other exception is a
               bug and keeps its traceback

Example (the end of every script):

    def main(argv=None) -> int:
        return cli.run(build_parser(), lambda a: capture_raw_activations(CaptureOptions.from_args(a)),
                       format_summary, argv)
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from core.errors import TraitError


class Parser(argparse.ArgumentParser):
    """Usage errors are one line naming the flag, exit status 2. The epilog is printed as written (examples)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def run(parser: argparse.ArgumentParser, stage: Callable[[argparse.Namespace], Any],
        format_summary: Callable[[Any], str] = str, argv: Sequence[str] | None = None,
        status: Callable[[Any], int] = lambda _summary: 0) -> int:
    """Parse `argv`, run `stage(args)`, print `format_summary(result)`; return the exit status.

    Only the project's own errors (TraitError and its subclasses: bad input a user can fix) are turned into
    one line; their `exit_code` attribute (default 2) is the status. Everything else propagates with its
    traceback, so a bug inside torch, transformers or this project is never disguised as bad input.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    try:
        result = stage(args)
    except TraitError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    text = format_summary(result)
    if text:
        print(text)
    return status(result)
