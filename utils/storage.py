"""Atomic writes and safe loads: the only place that touches output files.

    atomic_write(path)            context manager: yields a temp path in the same folder, renamed into place on success
    write_json(path, obj)         atomic JSON write; a standard serializer, so string contents are never altered
    write_pt(path, obj)           atomic torch.save
    BackgroundWriter(...)         write_pt / write_json on one background thread, so disk I/O overlaps the next forward
    load_pt(path, mmap=True)      torch.load(weights_only=True), memory-mapped when the file allows it
    read_json(path)               json.load with an error that names the file (also: a folder, deep nesting,
                                  non-UTF-8 bytes, NaN / Infinity literals)
    StorageError                  raised for unreadable / malformed files (message names the file)

Guarded writes (HF Trainer's overwrite_output_dir convention; every stage takes the rule from here):

    add_write_flags(parser)       --skip-existing / --overwrite, mutually exclusive
    guard_outputs(paths, overwrite=, skip_existing=, why=)   refuse (OutputExistsError, nothing written) when an
                                  output exists and neither flag is given; `why` adds what the file is to the message
    OutputExistsError             a rerun that would replace outputs without --overwrite
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.errors import TraitError


class StorageError(TraitError):
    """A file could not be read or parsed; the message names the file."""


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed.

    A crash at any moment leaves either the old file or the new one, never a partial file that
    --skip-existing would trust.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole file was written
        raise StorageError(f"{path}: is a folder where the output file belongs; move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would have
        os.chmod(tmp_path, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore, once, at import (before threads)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _finite(obj: Any) -> Any:
    """NaN/inf are not JSON: refuse them loudly rather than write invalid files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise StorageError(f"refusing to write non-finite number {obj!r} to JSON (use null with a reason)")
    return obj


def dumps_json(obj: Any, indent: int | None = None) -> str:
    """Standard-library JSON text; allow_nan=False so an invalid file is never produced."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise StorageError(f"cannot write JSON: {e} (use null with a reason instead of NaN)") from e


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> int:
    """Atomically write `obj` as JSON (UTF-8). Returns the number of bytes written."""
    data = dumps_json(obj, indent=indent).encode("utf-8")
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN / Infinity; the standard does not


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e999 parses to inf
        raise ValueError(f"number {text[:40]} overflows a float")
    return x


def read_json(path: str | Path, allow_nan: bool = False) -> Any:
    """The parsed file; StorageError names it when it is missing, a folder, unreadable, or not strict JSON.

    allow_nan: accept the NaN / Infinity literals (and overflowing numbers) Python's json writes by default, for
    a reader that replaces them (trait-interp's results.json had bare NaN).
    """
    path = Path(path)
    strict = {} if allow_nan else {"parse_constant": _no_constant, "parse_float": _finite_float}
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, **strict)
    except FileNotFoundError:
        raise StorageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a folder, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise StorageError(f"{path}: malformed JSON ({_short(e)})") from None
    except RecursionError:
        raise StorageError(f"{path}: malformed JSON (nested too deeply)") from None
    except OSError as e:
        raise StorageError(f"{path}: cannot read ({e.strerror or e})") from None


def _short(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def write_pt(path: str | Path, obj: Any) -> int:
    """Atomically torch.save `obj`. Returns the file size in bytes."""
    import torch  # here, not at import: config and JSON readers (the Modal deploy) load this module without torch

    with atomic_write(path) as tmp:
        # through a file object: torch.save names the zip records after a path's stem, which here is the
        # random temp name, so the same tensors would give different bytes (and sha256) on every write
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
        size = tmp.stat().st_size
    return size


class BackgroundWriter:
    """Atomic writes on one background thread: the caller computes the next batch while files are written.

        with BackgroundWriter(max_pending_bytes=2 << 30) as writer:
            for path, record in results:
                writer.submit(path, record)      # a .pt; blocks while the queued records' tensors exceed the budget
            writer.submit_json(other, obj)       # a JSON file, in the same queue (files land in submit order)
        writer.bytes, writer.files              # every write has finished here (or the first error was raised)

    Each file is still written atomically (write_pt), so a kill at any moment leaves finished files and no
    partial one. A failed write is re-raised by the next submit or at exit; after an error in the body, the
    writes already queued still finish (they are complete records) before that error propagates. Memory is
    bounded by `max_pending_bytes` of queued tensors (one record is always let through).
    """

    def __init__(self, max_pending_bytes: int = 2 << 30):
        self.max_pending_bytes = int(max_pending_bytes)
        self.bytes = 0
        self.files: list[str] = []
        self._pending = 0
        self._cond = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []

    def __enter__(self) -> "BackgroundWriter":
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pt-writer")
        return self

    def _write(self, write, path: Path, obj: Any, size: int) -> int:
        try:
            return write(path, obj)
        except Exception as e:
            e.add_note(f"while writing {path}")  # re-raised on the caller's thread: name the file (its prompt id)
            raise
        finally:
            with self._cond:
                self._pending -= size
                self._cond.notify_all()

    def submit(self, path: str | Path, obj: Any) -> None:
        """Queue an atomic torch.save of `obj` to `path`."""
        self._queue(write_pt, path, obj, _tensor_bytes(obj))

    def submit_json(self, path: str | Path, obj: Any) -> None:
        """Queue an atomic JSON write of `obj` to `path` (counted in `bytes` and `files` like a .pt)."""
        self._queue(write_json, path, obj, 0)

    def _queue(self, write, path: str | Path, obj: Any, size: int) -> None:
        if self._pool is None:
            raise RuntimeError("BackgroundWriter.submit outside its `with` block")
        self._collect(wait=False)
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0 or self._pending + size <= self.max_pending_bytes)
            self._pending += size
        self._futures.append(self._pool.submit(self._write, write, Path(path), obj, size))
        self.files.append(str(path))

    def _collect(self, wait: bool) -> None:
        """Account finished writes; re-raise the first failure."""
        pending = []
        for fut in self._futures:
            if wait or fut.done():
                self.bytes += fut.result()
            else:
                pending.append(fut)
        self._futures = pending

    def __exit__(self, exc_type, exc, tb) -> None:
        pool, self._pool = self._pool, None
        try:
            if exc_type is None:
                self._collect(wait=True)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


def _tensor_bytes(obj: Any) -> int:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_pt(path: str | Path, mmap: bool = True) -> Any:
    """torch.load with weights_only=True (never unpickles code); mmap so only touched tensors are read."""
    import torch

    path = Path(path)
    if not path.exists():
        raise StorageError(f"{path}: file not found")
    if path.is_dir():
        raise StorageError(f"{path}: is a folder, expected a .pt file")
    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except RuntimeError as e:
        if mmap and "mmap" in str(e).lower():
            return load_pt(path, mmap=False)
        raise StorageError(f"{path}: cannot load ({_short(e)})") from None
    except RecursionError:
        raise StorageError(f"{path}: cannot load (nested too deeply)") from None
    except Exception as e:  # truncated zip, unpickling refused (weights_only), random bytes, ...
        raise StorageError(f"{path}: cannot load ({type(e).__name__}: {_short(e)})") from None


# ---------------------------------------------------------------------------------------------------------
# Guarded writes: existing outputs are replaced only with --overwrite

class OutputExistsError(StorageError):
    """Outputs of this run exist and neither --skip-existing nor --overwrite was given."""


def add_write_flags(parser, what: str = "output files") -> None:
    """--skip-existing / --overwrite (mutually exclusive), the same words in every stage."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--skip-existing", action="store_true", help=f"keep {what} that exist, write only the missing ones")
    g.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} that exist (without this or --skip-existing, a rerun refuses)")


def guard_outputs(outputs: Iterable[str | Path], *, overwrite: bool, skip_existing: bool,
                  why: Callable[[list[Path]], str | None] | None = None) -> list[Path]:
    """The outputs that exist; OutputExistsError when there are any and neither flag allows it.

    Call it after every input was checked and before the first write: a refusal writes nothing. `why(existing)`
    may say what the existing files are (e.g. responses another variant replayed), added to the message.
    """
    if overwrite and skip_existing:
        raise OutputExistsError("--overwrite and --skip-existing contradict each other: choose one")
    existing = [Path(p) for p in outputs if Path(p).exists()]
    if not existing or overwrite or skip_existing:
        return existing
    note = why(existing) if why is not None else None
    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    raise OutputExistsError(f"{existing[0]}{more} exists{'; ' + note if note else ''}: nothing written; rerun with "
                            f"--skip-existing to keep existing files or --overwrite to replace them")
