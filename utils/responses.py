"""Response JSONs (docs/formats.md): listing, loading and validating the files generate_responses.py writes.

    list_response_files(exp, variant, prompt_set, suffix=None) -> [Path]   natural id order, *_annotations.json skipped;
                                                                  only the ids of the set's file (utils/prompts.py)
    load_response(path, vocab_size=None) -> dict                          validated: token_ids ints, prompt_end in range
    load_responses(exp, variant, prompt_set, prompt_ids=None, limit=None, vocab_size=None, suffix=None)
                                                                  -> [(prompt_id, dict)]
    build_response(...) -> dict                                   the flat response record, keys in trait-interp's order
    replayed_response(source, tokens, inference_model, responses_from) -> dict
                                                                  the record a --responses-from variant gets
    TokenStrings(tokenizer).of(record) -> [str]                   token strings decoded from the ids (cached),
                                                                  counting those that differed from `tokens`
    ResponseError                                                 missing folder / malformed file (names it)
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from utils import paths
from utils.model import decode_tokens
from utils.prompts import only_set_ids
from utils.storage import StorageError, read_json
from core.errors import TraitError


class ResponseError(TraitError):
    """A response folder or file is missing or malformed; the message names it."""


def list_response_files(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> list[Path]:
    folder = paths.responses_dir(exp, variant, prompt_set, suffix)
    if not folder.is_dir():
        raise ResponseError(
            f"no responses for variant {variant!r}, prompt set {paths.set_dir(prompt_set, suffix)!r}: {folder} does not "
            f"exist (create it with: python inference/generate_responses.py --experiment {exp} "
            f"--prompt-set {prompt_set} --model-variant {variant})"
        )
    files = [p for p in folder.glob("*.json") if not p.name.endswith("_annotations.json") and not p.name.startswith(".")]
    if not suffix:  # the set's ids, not whatever lies in the folder (stale ids are reported, never processed)
        files = list(only_set_ids({p.stem: p for p in files}, prompt_set, folder).values())
    return sorted(files, key=lambda p: paths.natural_key(p.stem))


def load_response(path: str | Path, vocab_size: int | None = None) -> dict:
    """Read one response JSON and check what capture relies on; errors name the file."""
    path = Path(path)
    try:
        data = read_json(path)
    except StorageError as e:
        raise ResponseError(str(e)) from e
    if not isinstance(data, dict):
        raise ResponseError(f"{path}: expected a JSON object, got {type(data).__name__}")
    ids = data.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ResponseError(f"{path}: 'token_ids' must be a non-empty list of integers")
    end = data.get("prompt_end")
    if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= len(ids):
        raise ResponseError(f"{path}: 'prompt_end' = {end!r} is out of range for {len(ids)} token ids")
    if vocab_size is not None:
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ResponseError(f"{path}: token id {bad[0]} is outside the model's vocabulary (size {vocab_size})")
    return data


def load_responses(exp: str, variant: str, prompt_set: str, prompt_ids: list[str] | None = None,
                   limit: int | None = None, vocab_size: int | None = None,
                   suffix: str | None = None) -> list[tuple[str, dict]]:
    """All (prompt_id, response) of a set, naturally sorted, filtered by ids, then limited. Validates every file first."""
    files = list_response_files(exp, variant, prompt_set, suffix)
    if prompt_ids:
        wanted = [str(i) for i in prompt_ids]
        have = {p.stem: p for p in files}
        missing = [i for i in wanted if i not in have]
        if missing:
            raise ResponseError(f"--prompt-ids: no response for id(s) {', '.join(missing)} in "
                                f"{paths.responses_dir(exp, variant, prompt_set, suffix)}")
        files = [have[i] for i in sorted(set(wanted), key=paths.natural_key)]
    if limit is not None:
        files = files[:limit]
    return [(p.stem, load_response(p, vocab_size)) for p in files]


def build_response(prompt: str, response: str, token_ids: list[int], prompt_end: int, tokens: list[str],
                   inference_model: str, system_prompt: str | None = None, prompt_note: str | None = None,
                   **extra) -> dict:
    """The flat response record, keys in trait-interp's order (docs/formats.md), extra keys (e.g. `generation`) after."""
    rec = {
        "prompt": prompt, "response": response, "system_prompt": system_prompt, "tokens": tokens,
        "token_ids": [int(i) for i in token_ids], "prompt_end": int(prompt_end), "inference_model": inference_model,
        "prompt_note": prompt_note or None, "capture_date": _dt.datetime.now().isoformat(), "tags": [],
    }
    rec.update(extra)
    return rec


def replayed_response(source: dict, tokens: list[str], inference_model: str, responses_from: str) -> dict:
    """The response JSON a variant gets when it captured another variant's responses (--responses-from).

    The source record with its own keys kept (prompt_note, system_prompt, tags, ...), `tokens` decoded again
    from the ids, `inference_model` the model that captured, `responses_from` the variant whose ids were
    replayed, and a fresh `capture_date`: the viewer then finds token data under the capturing variant.
    """
    rec = build_response(source.get("prompt") or "", source.get("response") or "", source["token_ids"],
                         source["prompt_end"], tokens, inference_model, system_prompt=source.get("system_prompt"),
                         prompt_note=source.get("prompt_note"))
    rec.update({k: v for k, v in source.items() if k not in rec})  # e.g. generation, turn_boundaries
    rec["tags"] = list(source.get("tags") or [])
    rec["responses_from"] = responses_from
    return rec


class TokenStrings:
    """One decoded string per token id (the ids are the truth), cached across prompts; counts corrections.

        strings = TokenStrings(tokenizer)
        tokens = strings.of(record)      # utils.model.decode_tokens of record["token_ids"], from the cache
        strings.corrected                # how many strings so far differed from the records' own `tokens`
        strings.decode([5, 9])           # plain ids, nothing counted
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.corrected = 0
        self._cache: dict[int, str] = {}

    def of(self, record: dict) -> list[str]:
        tokens = self.decode(record["token_ids"])
        stored = record.get("tokens")
        if isinstance(stored, list):  # a missing list is filled, not corrected
            self.corrected += sum(1 for k, t in enumerate(tokens) if k >= len(stored) or stored[k] != t)
        return tokens

    def decode(self, ids: list[int]) -> list[str]:
        new = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if new:
            self._cache.update(zip(new, decode_tokens(self.tokenizer, new)))
        return [self._cache[i] for i in ids]
