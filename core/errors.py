"""The project's error base class, and the one out-of-memory test.

    TraitError(ValueError)   base of every error a user can act on (bad input, unsupported model, missing files);
                             the CLI layer (utils.cli.run) turns it into one `error:` line and exit status 2.
                             Anything else (a bug in torch, transformers or here) keeps its traceback.
    is_oom(exc) -> bool      torch.cuda.OutOfMemoryError, or a RuntimeError saying "out of memory"
"""
from __future__ import annotations

import sys


class TraitError(ValueError):
    """A problem with the user's input or setup; the message says what and where."""


def is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")   # not imported here: the Modal app and the CLIs import this module without torch
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
