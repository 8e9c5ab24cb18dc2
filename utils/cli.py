"""What every CLI script shares.

    Parser     argparse.ArgumentParser whose usage errors are one stderr line and exit status 2,
               like every other bad input
    run(parser, stage, format_summary, argv, status)
               the whole `main()` of a script: parse, call the stage, print its summary; a TraitError
               becomes one `error: ...` line on stderr and its exit status (2); any other exception is a
               bug and keeps its traceback; SIGINT / SIGTERM end the stage with exit status 130 and one line
               ("interrupted after N of M prompts; files written so far are complete: rerun with --skip-existing")
    progress(iterable=None, total=None, unit="prompt", ...)
               a tqdm progress bar that counts what is done even when disabled (--quiet), so an interrupt can say
               how far the stage got
    INTERRUPTED = 130   the exit status of an interrupted stage (128 + SIGINT, as a shell reports it)

Example (the end of every script):

    def main(argv=None) -> int:
        return cli.run(build_parser(), lambda a: capture_raw_activations(CaptureOptions.from_args(a)),
                       format_summary, argv)
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

from core.errors import TraitError

INTERRUPTED = 130
_bars: "weakref.WeakValueDictionary[int, Progress]" = weakref.WeakValueDictionary()
_order = 0


class Progress(tqdm):
    """tqdm that keeps `done` (items finished) also when disabled; the newest bar is what an interrupt reports."""

    def __init__(self, *args, **kwargs):
        global _order
        self.done, self.counts = 0, kwargs.get("unit", "it")   # a disabled tqdm keeps no `unit`
        super().__init__(*args, **kwargs)
        _order += 1
        _bars[_order] = self

    def update(self, n: float | None = 1):
        self.done += 1 if n is None else n
        return super().update(n)

    def __iter__(self):
        for item in super().__iter__():
            yield item
            if self.disable:  # an enabled bar counts through update()
                self.done += 1

    @property
    def count(self) -> int:
        return int(self.done)


def progress(iterable=None, *, total: int | None = None, unit: str = "prompt", **kwargs) -> Progress:
    """A progress bar on stderr (tqdm's arguments) whose count survives --quiet; see Progress."""
    kwargs.setdefault("file", sys.stderr)
    return Progress(iterable, total=total, unit=unit, **kwargs)


def _how_far() -> str:
    """"after N of M prompts" from the newest progress bar of prompts (ours, else any live tqdm bar)."""
    ours = [b for _, b in sorted(_bars.items()) if b.counts == "prompt" and b.total]
    if ours:
        b = ours[-1]
        return f" after {b.count} of {int(b.total)} prompts"
    live = [b for b in list(getattr(tqdm, "_instances", [])) if getattr(b, "unit", "") == "prompt" and b.total]
    if live:
        b = live[-1]
        return f" after {int(b.n)} of {int(b.total)} prompts"
    return ""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system, `kill`) ends the stage the way Ctrl-C does: through KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        with _sigterm_as_interrupt():
            result = stage(args)
    except TraitError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:  # every write is atomic: what exists is whole, and --skip-existing resumes
        sys.stderr.write(f"\ninterrupted{_how_far()}; files written so far are complete: rerun with "
                         f"--skip-existing\n")
        sys.stderr.flush()
        return INTERRUPTED
    text = format_summary(result)
    if text:
        print(text)
    return status(result)
