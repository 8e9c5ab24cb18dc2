"""Prompt sets: `datasets/inference/{name}.json` (docs/formats.md), loaded and validated.

    load_prompt_set(name) -> PromptSet       name may be nested ("rm_syco/train_100"), or a path to a .json file of
                                             your own (the set is then named by the file's stem); errors name file/item
    set_ids(name) -> [str] | None            the ids of the set's file; None where there is no file (imported
                                             responses: the files in the folder are the set)
    only_set_ids(found, name, folder) -> {id: path}   a folder's files restricted to the set's ids; files of ids no
                                             longer in the set are reported once on stderr, never processed
    list_prompt_sets()    -> [name]          every set under datasets/inference/, nested names included
    PromptSet                                name, path, prompts, system_prompt, description;
                                             .select(ids) -> [Prompt] a subset in natural id order
    parse_prompt_ids(spec) -> [str] | None   --prompt-ids "1,2,10" (or a list) -> ids
    Prompt                                   id (str: the file stem), text, note, extra (other keys, kept)
    PromptSetError                           unknown set (close names listed) / malformed file

Accepted shapes: an object with `prompts` (and optional `name`, `description`, `system_prompt`) or a bare
list. Items: `{"id": str|int, "text"|"prompt": str, "note"?: str, ...}`; ids are unique and become file names.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from utils import paths
from utils.storage import StorageError, read_json
from core.errors import TraitError


class PromptSetError(TraitError):
    """A prompt set is unknown or malformed; the message names the file (and item) and what to do."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    note: str | None = None
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: Path
    prompts: list[Prompt]
    system_prompt: str | None = None
    description: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    def select(self, ids: Sequence[str | int]) -> list[Prompt]:
        """The prompts with these ids, in natural id order (1, 2, 10, b); an id the set lacks is an error."""
        by_id = {p.id: p for p in self.prompts}
        wanted = list(dict.fromkeys(str(i) for i in ids))
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise PromptSetError(f"--prompt-ids: id(s) {', '.join(missing)} not in prompt set {self.name!r} "
                                 f"({self.path}; {len(self.prompts)} prompts)")
        return [by_id[i] for i in sorted(wanted, key=paths.natural_key)]


def parse_prompt_ids(prompt_ids: str | Sequence[str | int] | None) -> list[str] | None:
    """--prompt-ids: a comma list ("1,2,10") or a sequence of ids -> [str]; None stays None (every prompt)."""
    if prompt_ids is None:
        return None
    items = prompt_ids.split(",") if isinstance(prompt_ids, str) else [str(i) for i in prompt_ids]
    items = [i.strip() for i in items]
    if not items or any(not i for i in items):
        raise PromptSetError(f"--prompt-ids {prompt_ids!r}: expected a comma list of ids such as 1,2,10")
    return items


def list_prompt_sets() -> list[str]:
    root = paths.prompt_sets_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.json")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _check_name(name: str) -> str:
    clean = name.strip().strip("/")
    if clean.endswith(".json"):
        clean = clean[: -len(".json")]
    parts = clean.split("/")
    if not clean or Path(clean).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise PromptSetError(f"--prompt-set {name!r}: give a set name under {paths.prompt_sets_dir()}, "
                             f"e.g. single_trait or rm_syco/train_100")
    return clean


def _unknown(name: str) -> PromptSetError:
    known = list_prompt_sets()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    # nested sets: also match on the last path component ("train_10" -> "rm_syco/train_100")
    leaf = name.split("/")[-1]
    leaves = difflib.get_close_matches(leaf, sorted({k.split("/")[-1] for k in known}), n=5, cutoff=0.6)
    close += [k for k in known if k.split("/")[-1] in leaves and k not in close]
    hint = f"did you mean: {', '.join(close)}" if close else (
        f"available: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}" if known else "no prompt sets exist")
    return PromptSetError(f"unknown prompt set {name!r}: {paths.prompt_set_file(name)} not found ({hint})")


def _item(path: Path, index: int, item) -> Prompt:
    where = f"{path}: prompt #{index}"
    if not isinstance(item, dict):
        raise PromptSetError(f"{where}: expected an object with 'id' and 'text', got {type(item).__name__}")
    if "id" not in item:
        raise PromptSetError(f"{where}: missing 'id'")
    pid = item["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise PromptSetError(f"{where}: 'id' must be a string or an integer, got {pid!r}")
    pid = str(pid)
    where = f"{path}: prompt #{index} (id {pid!r})"
    if not pid or pid in (".", "..") or "/" in pid or "\\" in pid or pid.startswith(".") or "\0" in pid:
        raise PromptSetError(f"{where}: the id becomes a file name: it must be non-empty, without '/', and not "
                             f"start with '.'")
    text = item["text"] if "text" in item else item.get("prompt")
    if text is None and "text" not in item and "prompt" not in item:
        raise PromptSetError(f"{where}: missing 'text' (or 'prompt')")
    if not isinstance(text, str):
        raise PromptSetError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    note = item.get("note")
    if note is not None and not isinstance(note, str):
        raise PromptSetError(f"{where}: 'note' must be a string, got {type(note).__name__}")
    extra = {k: v for k, v in item.items() if k not in ("id", "text", "prompt", "note")}
    return Prompt(id=pid, text=text, note=note or None, extra=extra)


def _as_file(name: str) -> Path | None:
    """--prompt-set given as a path to a JSON file of one's own (absolute, or relative to the current folder)."""
    if not name.strip().endswith(".json"):
        return None
    path = Path(name.strip()).expanduser()
    return path.resolve() if path.is_file() else None


def _file_name(path: Path) -> str:
    """The set's name of a JSON path: its name under datasets/inference/ when it lies there, else the file's stem."""
    try:
        return path.relative_to(paths.prompt_sets_dir().resolve()).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def load_prompt_set(name: str) -> PromptSet:
    """Load and validate `datasets/inference/{name}.json`, or the JSON file `name` points at."""
    own = _as_file(name)
    if own is not None:
        name, path = _file_name(own), own
    else:
        name = _check_name(name)
        path = paths.prompt_set_file(name)
    if not path.is_file():
        raise _unknown(name)
    try:
        data = read_json(path)
    except StorageError as e:
        raise PromptSetError(str(e)) from e
    system_prompt = description = None
    if isinstance(data, dict):
        if not isinstance(data.get("prompts"), list):
            raise PromptSetError(f"{path}: expected a 'prompts' list (or a bare list of prompts)")
        system_prompt, description = data.get("system_prompt"), data.get("description")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise PromptSetError(f"{path}: 'system_prompt' must be a string or null")
        if description is not None and not isinstance(description, str):
            raise PromptSetError(f"{path}: 'description' must be a string or null")
        items = data["prompts"]
    elif isinstance(data, list):
        items = data
    else:
        raise PromptSetError(f"{path}: expected an object with 'prompts' or a list, got {type(data).__name__}")
    prompts = [_item(path, i, it) for i, it in enumerate(items)]
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p.id in seen:
            raise PromptSetError(f"{path}: prompt #{i} (id {p.id!r}): duplicate id (also prompt #{seen[p.id]})")
        seen[p.id] = i
    return PromptSet(name=name, path=path, prompts=prompts, system_prompt=system_prompt or None,
                     description=description)


_reported: set[tuple[str, str]] = set()


def set_ids(name: str) -> list[str] | None:
    """The ids of prompt set `name` (its file under datasets/inference/, or a JSON path); None when no file exists."""
    own = _as_file(name)
    clean = name.strip().strip("/")
    if own is None and (not clean or not paths.prompt_set_file(clean).is_file()):
        return None
    return load_prompt_set(name).ids


def only_set_ids(found: dict, name: str, folder: Path | str) -> dict:
    """`found` ({id: file} of a folder) restricted to the ids of the set's file, in the order given. Files of ids
    that are no longer in the set (the set was edited after generation) are reported once per folder on stderr and
    left out. Without a set file (imported responses, a --output-suffix folder) every file is the set."""
    ids = set_ids(name)
    if ids is None:
        return found
    keep = set(ids)
    stale = [i for i in found if i not in keep]
    if stale and (str(folder), name) not in _reported:
        _reported.add((str(folder), name))
        import sys

        shown = ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else "")
        print(f"warning: {folder}: {len(stale)} file(s) of id(s) not in prompt set {name!r} "
              f"({_as_file(name) or paths.prompt_set_file(name.strip().strip('/'))}) left out: {shown} "
              f"(the set was edited after they were written; delete them or restore the ids)", file=sys.stderr)
    return {i: f for i, f in found.items() if i in keep}
