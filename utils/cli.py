"""What every CLI script shares.

    Parser     argparse.ArgumentParser whose usage errors are one stderr line and exit status 2,
               like every other bad input (the scripts turn ValueErrors into the same shape)
"""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")
