"""Response JSONs (docs/formats.md): listing, loading and validating the files generate_responses.py writes.

    list_response_files(exp, variant, prompt_set, suffix=None) -> [Path]   natural id order, *_annotations.json skipped;
                                                                  only the ids of the set's file (utils/prompts.py)
    load_response(path, vocab_size=None) -> dict                          validated: token_ids ints, prompt_end in range
    load_responses(exp, variant, prompt_set, prompt_ids=None, limit=None, vocab_size=None, suffix=None)
                                                                  -> [(prompt_id, dict)]
    read_response(path, vocab_size=None) -> Response              the same checks, as the typed record (frozen)
    validate_response(data, where, vocab_size=None) -> dict       the checks load_response makes (types, ranges)
    write_response(path, record) -> bytes                          validate, then write atomically
    replay_note(exp, variant, prompt_set, existing, variants) -> str | None   why replacing existing responses
                                                                  breaks a model diff (for guarded writes)
    scored_tokens(exp, variant, prompt_set, prompt_id, prefer="raw") -> ScoredTokens
                                                                  the ids a variant's projections scored (raw .pt,
                                                                  else response JSON), with prompt_end and texts
    build_response(...) -> dict                                   the flat response record, keys in trait-interp's order
    replayed_response(source, tokens, inference_model, responses_from) -> dict
                                                                  the record a --responses-from variant gets
    TokenStrings(tokenizer).of(record) -> [str]                   token strings decoded from the ids (cached),
                                                                  counting those that differed from `tokens`
    ResponseError                                                 missing folder / malformed file (names it)
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

from utils import paths
from utils.model import decode_tokens
from utils.prompts import only_set_ids
from utils.storage import StorageError, read_json, write_json
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
    return validate_response(data, path, vocab_size)


@dataclass(frozen=True)
class Response:
    """One response JSON, validated: the ids (prompt + response), where the response starts, and its texts."""

    path: Path
    token_ids: tuple[int, ...]
    prompt_end: int
    tokens: tuple[str, ...] | None
    prompt: str | None
    response: str | None
    system_prompt: str | None
    responses_from: str | None
    data: dict = field(repr=False, compare=False)          # the record as stored (extra keys: generation, ...)

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_end:]


def read_response(path: str | Path, vocab_size: int | None = None) -> Response:
    """The typed record of one response JSON (load_response's checks)."""
    d = load_response(path, vocab_size)
    toks = d.get("tokens")
    return Response(Path(path), tuple(d["token_ids"]), d["prompt_end"], None if toks is None else tuple(toks),
                    d.get("prompt"), d.get("response"), d.get("system_prompt"), d.get("responses_from"), d)


def validate_response(data, path: str | Path, vocab_size: int | None = None) -> dict:
    """`data` when it is a response record capture can rely on, else ResponseError naming `path`."""
    if not isinstance(data, dict):
        raise ResponseError(f"{path}: expected a JSON object, got {type(data).__name__}")
    ids = data.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ResponseError(f"{path}: 'token_ids' must be a non-empty list of integers")
    if any(i < 0 for i in ids):
        raise ResponseError(f"{path}: token id {min(ids)} is negative")
    for key in ("prompt", "response", "system_prompt", "responses_from", "inference_model", "prompt_note"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ResponseError(f"{path}: '{key}' must be a string or null, got {type(data[key]).__name__}")
    toks = data.get("tokens")
    if toks is not None and (not isinstance(toks, list) or not all(isinstance(t, str) for t in toks)):
        raise ResponseError(f"{path}: 'tokens' must be a list of strings (one per token id)")
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


def write_response(path: str | Path, record: dict) -> int:
    """Validate `record`, then write it atomically; returns the bytes written."""
    validate_response(record, path)
    return write_json(path, record)


@dataclass(frozen=True)
class ScoredTokens:
    """The tokens a variant's projections scored for one prompt (prompt + response ids, as captured)."""

    source: Path                          # the raw .pt or response JSON they were read from
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...] | None        # one string per id, None when the file has none that fit
    prompt_end: int
    response_text: str | None
    formatted_prompt: str | None
    system_prompt: str | None

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.prompt_end:]

    @property
    def response_tokens(self) -> tuple[str, ...] | None:
        return None if self.tokens is None else self.tokens[self.prompt_end:]


def scored_tokens(exp: str, variant: str, prompt_set: str, prompt_id: str, prefer: str = "raw") -> ScoredTokens:
    """The ids a variant's projections of one prompt scored: its raw .pt (what the projection read) or its response
    JSON, whichever `prefer` names first and exists. A variant captured with --responses-from may also hold responses
    of its own generation. The formatted prompt and system prompt come from the response JSON when there is one.
    """
    from utils.raw import RawError, read_raw

    rfile = paths.response_file(exp, variant, prompt_set, prompt_id)
    raw = paths.raw_file(exp, variant, prompt_set, prompt_id)
    rec = read_response(rfile) if rfile.exists() else None
    if rec is not None and (prefer == "response" or not raw.exists()):
        toks = rec.tokens if rec.tokens is not None and len(rec.tokens) == len(rec.token_ids) else None
        return ScoredTokens(rfile, rec.token_ids, toks, rec.prompt_end, rec.response, rec.prompt, rec.system_prompt)
    if raw.exists():
        try:
            raw_rec = read_raw(raw)
        except RawError as e:
            raise ResponseError(str(e)) from e
        prm, resp = raw_rec.side("prompt"), raw_rec.side("response")
        ids = tuple(raw_rec.token_ids["prompt"]) + tuple(raw_rec.token_ids["response"])
        toks = (tuple(prm["tokens"]) + tuple(resp["tokens"])
                if prm.get("tokens") is not None and resp.get("tokens") is not None else None)
        formatted = rec.prompt if rec is not None else prm.get("text")
        system = rec.system_prompt if rec is not None else None
        return ScoredTokens(raw, ids, toks, raw_rec.n_tokens["prompt"], resp.get("text"), formatted, system)
    raise ResponseError(f"prompt {prompt_id}: no tokens for variant {variant!r}: neither {raw} nor {rfile} exists")


def replay_note(exp: str, variant: str, prompt_set: str, existing: list[Path], variants: list[str]) -> str | None:
    """What a guarded rerun of generate would break: responses of `variant` that another variant replayed with
    --responses-from (its captures and projections pair with these exact ids), or records `variant` itself replayed."""
    stems = {p.stem for p in existing}
    for other in variants:
        if other == variant:
            continue
        for stem in sorted(stems, key=paths.natural_key):
            f = paths.response_file(exp, other, prompt_set, stem)
            try:
                rec = load_response(f) if f.exists() else None
            except ResponseError:
                continue
            if rec is not None and rec.get("responses_from") == variant:
                return (f"variant {other!r} replayed these responses with --responses-from {variant} ({f}): new "
                        f"responses would break the model diff's pairing")
    for p in existing:
        try:
            source = load_response(p).get("responses_from")
        except ResponseError:
            continue
        if source and source != variant:
            return f"{p} holds responses of variant {source!r}, replayed with --responses-from"
    return None


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
