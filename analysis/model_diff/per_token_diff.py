"""Per-token and per-clause difference of two variants' trait projections on the same tokens (B - A).

    per_token_diff(experiment, variant_a, variant_b, prompt_set, trait="all", ...) -> dict   the stage, importable
    split_into_clauses(tokens, deltas) -> [clause]     clause spans with mean / max / min delta and token range
    clause_breaks(tokens) -> [bool]                    True where a clause closes after that token
    user_prompt_text(...) -> (text, source)            the user's prompt for identification (not the template)
    main(argv=None) -> int                             the CLI: python analysis/model_diff/per_token_diff.py --help
    PerTokenDiffError                                  bad input; the message names the file, prompt or flag

Reads  experiments/{exp}/inference/{A|B}/projections/{trait}/{set}/{id}.json  (A may use --variant-a-prompt-set)
       the response token ids each side scored (raw/residual/{set}/{id}.pt, else responses/{set}/{id}.json)
Writes experiments/{exp}/model_diff/{A}_vs_{B}/per_token_diff/{trait}/{prompt_set}/{id}.json and aggregate.json

Both projection files of a prompt must hold the same vector (layer, method, component, position, sha256,
centered) and both variants must have scored the same response token ids; anything else is an error
naming the prompt, found before a single file is written. Deltas are never rounded.

Prompt text: the user's prompt from the prompt set (datasets/inference/{set}.json) when it has the id;
otherwise the formatted prompt with the chat template stripped (rendered around a sentinel with B's
tokenizer); otherwise the formatted prompt itself. `prompt_text_source` says which.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from core import stats  # noqa: E402
from utils import paths  # noqa: E402
from utils.config import ConfigError, load_config, resolve_variant  # noqa: E402
from utils.storage import StorageError, load_pt, read_json, write_json  # noqa: E402
from utils.cli import Parser as _Parser  # noqa: E402
from core.errors import TraitError

PROMPT_TEXT_CHARS = 100      # prompt text kept with each pooled clause in aggregate.json (as the original)


class PerTokenDiffError(TraitError):
    """Bad input for per_token_diff; the message names the file, prompt or flag."""


# ---------------------------------------------------------------------------------------------------------
# Clause splitting (pure text, no files)

# A clause closes after one of these characters (em dash included); a newline anywhere in a token closes one.
CLAUSE_END = frozenset(",.;:!?\u2014")
# Closing quotes and brackets stay with the clause they close: `He said "no."` closes after the quote.
_CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb")
_OPENERS = "\"'([{\u201c\u2018\u00ab"
# Words whose final period does not close a clause (lower-case, leading quotes / brackets removed).
ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "cf.", "vs.", "approx.", "dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "jr.", "sr.",
    "fig.", "eq.", "vol.", "inc.", "ltd.", "a.m.", "p.m.",
})
_DOTTED_INITIALS = re.compile(r"^(?:[a-z]\.){2,}$")     # u.s., e.g., i.e. and the like


def clause_breaks(tokens: Sequence[str]) -> list[bool]:
    """For each token, whether a clause closes right after it (the last token always closes one).

    A clause closes after `, . ; : ! ?` or an em dash (followed by any closing quotes / brackets), or a token
    holding a newline. Not after: a mark inside a number or word (`3.5`, `1,000`, `10:30`, `example.com`),
    an abbreviation (`e.g.`, `Dr.`, `U.S.`), or a mark that more punctuation follows (`...`, `?!`).
    """
    text = "".join(tokens)
    breaks, end = [], 0
    for i, tok in enumerate(tokens):
        start, end = end, end + len(tok)
        breaks.append(i == len(tokens) - 1 or "\n" in tok or _closes(text, start, end))
    return breaks


def _closes(text: str, start: int, end: int) -> bool:
    j = end
    while j > start and (text[j - 1] in _CLOSERS or text[j - 1] in " \t"):
        j -= 1
    if j == start:
        return False  # only closers / spaces: the mark before them already decided
    p = j - 1
    mark = text[p]
    if mark not in CLAUSE_END:
        return False
    nxt = text[end] if end < len(text) else ""
    if nxt and (nxt in CLAUSE_END or nxt in _CLOSERS):
        return False  # punctuation goes on ("...", "?!", '."'): close after the last of it
    if mark in ".,:" and p == end - 1 and p > 0 and text[p - 1].isalnum() and nxt.isalnum():
        return False  # inside a number or a word
    if mark == ".":
        ws = max(text.rfind(" ", 0, p), text.rfind("\n", 0, p), text.rfind("\t", 0, p))
        word = text[ws + 1:p + 1].lstrip(_OPENERS).lower()
        if word in ABBREVIATIONS or _DOTTED_INITIALS.match(word):
            return False
    return True


def split_into_clauses(tokens: Sequence[str], deltas: Sequence[float]) -> list[dict]:
    """Clauses in text order: {text, token_range [start, end), mean_delta, max_delta, min_delta, n_tokens}.

    A whitespace-only span (e.g. a lone newline) is not a clause; its tokens still count in the prompt's mean.
    """
    if len(tokens) != len(deltas):
        raise ValueError(f"{len(tokens)} tokens but {len(deltas)} deltas")
    clauses, start = [], 0
    for i, closes in enumerate(clause_breaks(tokens)):
        if not closes:
            continue
        text = "".join(tokens[start:i + 1])
        if text.strip():
            span = [float(d) for d in deltas[start:i + 1]]
            clauses.append({"text": text, "token_range": [start, i + 1], "mean_delta": math.fsum(span) / len(span),
                            "max_delta": max(span), "min_delta": min(span), "n_tokens": len(span)})
        start = i + 1
    return clauses


# ---------------------------------------------------------------------------------------------------------
# Reading one side of one prompt

@dataclass
class VectorKey:
    """What identifies the vector behind a projection entry; two sides must agree on every known field."""
    layer: int
    method: str | None
    component: str | None
    position: str | None
    sha256: str | None
    centered: bool
    baseline: float | None

    def describe(self) -> str:
        sha = (self.sha256 or "unrecorded")[:12]
        return (f"layer {self.layer}, method {self.method}, component {self.component}, position {self.position}, "
                f"sha256 {sha}, centered {self.centered}")


@dataclass
class Projection:
    path: Path
    entries: list[dict]
    metadata: dict

    @property
    def layers(self) -> list[int]:
        return sorted({e["layer"] for e in self.entries})

    def best_layers(self) -> set[int]:
        """Layers whose entry was chosen as the best vector (steering or extraction evidence)."""
        return {e["layer"] for e in self.entries if e.get("selection_source") in ("steering", "extraction")}

    def entry(self, layer: int) -> dict:
        at = [e for e in self.entries if e["layer"] == layer]
        if not at:
            raise PerTokenDiffError(f"{self.path}: no projection at layer {layer} (layers present: "
                                    f"{_fmt(self.layers)})")
        if len(at) > 1:
            best = [e for e in at if e.get("selection_source") in ("steering", "extraction")]
            if len(best) != 1:
                raise PerTokenDiffError(f"{self.path}: {len(at)} vectors at layer {layer} "
                                        f"({', '.join(str(e.get('method')) for e in at)}); cannot tell which to use")
            return best[0]
        return at[0]

    def key(self, layer: int) -> VectorKey:
        e = self.entry(layer)
        meta = self.metadata
        component = e.get("component") or meta.get("component")
        position = e.get("position") or (meta.get("position") if len(self.entries) == 1 else None)
        sha = None
        for v in meta.get("vectors") or []:
            if isinstance(v, dict) and v.get("layer") == layer and v.get("method") == e.get("method") and \
                    v.get("component", component) == component and v.get("position", position) == position:
                sha = v.get("sha256")
                break
        centered = bool(meta.get("centered", False))
        return VectorKey(layer, e.get("method"), component, position, sha, centered,
                         e.get("baseline") if centered else None)


def _fmt(layers) -> str:
    return ", ".join(str(x) for x in sorted(set(layers))) or "none"


def read_projection(path: Path) -> Projection:
    """A projection JSON in the multi-vector format (DESIGN.md §4), or the original's legacy single-vector one."""
    try:
        data = read_json(path)
    except StorageError as e:
        raise PerTokenDiffError(str(e)) from None
    if not isinstance(data, dict) or "projections" not in data:
        raise PerTokenDiffError(f"{path}: not a projection JSON (no 'projections')")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    proj = data["projections"]
    if isinstance(proj, dict):  # legacy: {"prompt": [...], "response": [...]} + metadata.vector_source
        src = meta.get("vector_source") or {}
        proj = [{"layer": src.get("layer"), "method": src.get("method"), "response": proj.get("response"),
                 "selection_source": None}]
    if not isinstance(proj, list) or not proj:
        raise PerTokenDiffError(f"{path}: 'projections' must be a non-empty list")
    for e in proj:
        if not isinstance(e, dict) or not isinstance(e.get("layer"), int) or isinstance(e.get("layer"), bool):
            raise PerTokenDiffError(f"{path}: every projection entry needs an integer 'layer'")
        resp = e.get("response")
        if not isinstance(resp, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in resp):
            raise PerTokenDiffError(f"{path}: projection at layer {e['layer']} has no numeric 'response' list")
    return Projection(path, proj, meta)


@dataclass
class ResponseTokens:
    """A variant's view of one prompt's response: the ids it scored and, for B, the text to show."""
    source: Path
    token_ids: list[int]
    tokens: list[str] | None
    response_text: str | None
    formatted_prompt: str | None
    system_prompt: str | None


def read_response_tokens(exp: str, variant: str, prompt_set: str, prompt_id: str) -> ResponseTokens:
    """The response ids a variant's projections scored: its raw .pt (what projection read), else its response
    JSON. A variant captured with --responses-from may also hold responses of its own generation, which were
    not what it scored. The formatted prompt and system prompt come from the response JSON when there is one.
    """
    rfile = paths.response_file(exp, variant, prompt_set, prompt_id)
    raw = paths.raw_file(exp, variant, prompt_set, prompt_id)
    rjson = None
    if rfile.exists():
        try:
            rjson = read_json(rfile)
        except StorageError as e:
            raise PerTokenDiffError(str(e)) from None
    if raw.exists():
        try:
            d = load_pt(raw)
        except StorageError as e:
            raise PerTokenDiffError(str(e)) from None
        resp, prm = d.get("response") or {}, d.get("prompt") or {}
        ids = resp.get("token_ids")
        if not isinstance(ids, list):
            raise PerTokenDiffError(f"{raw}: no response.token_ids")
        toks = resp.get("tokens") if isinstance(resp.get("tokens"), list) and len(resp["tokens"]) == len(ids) else None
        formatted = rjson.get("prompt") if isinstance(rjson, dict) else prm.get("text")
        system = rjson.get("system_prompt") if isinstance(rjson, dict) else None
        return ResponseTokens(raw, [int(i) for i in ids], toks, resp.get("text"), formatted, system)
    if isinstance(rjson, dict):
        ids, end = rjson.get("token_ids"), rjson.get("prompt_end")
        if not isinstance(ids, list) or not isinstance(end, int) or not 0 <= end <= len(ids):
            raise PerTokenDiffError(f"{rfile}: needs 'token_ids' and an in-range 'prompt_end'")
        toks = rjson.get("tokens")
        toks = toks[end:] if isinstance(toks, list) and len(toks) == len(ids) else None
        return ResponseTokens(rfile, [int(i) for i in ids[end:]], toks, rjson.get("response"), rjson.get("prompt"),
                              rjson.get("system_prompt"))
    raise PerTokenDiffError(
        f"prompt {prompt_id}: cannot check which tokens variant {variant!r} scored: neither {raw} nor {rfile} exists")


# ---------------------------------------------------------------------------------------------------------
# The user's prompt text

_SENTINEL = "\u2063PER_TOKEN_DIFF_PROMPT\u2063"


class _PromptTexts:
    """user_prompt_text for many prompts: the prompt set is read once, the tokenizer loaded at most once."""

    def __init__(self, exp: str, prompt_set: str, variant: str):
        self.exp, self.variant = exp, variant
        self.by_id: dict[str, str] = {}
        try:
            from utils.prompts import load_prompt_set
            self.by_id = {p.id: p.text for p in load_prompt_set(prompt_set).prompts}
        except (ValueError, ImportError):  # no such set (imported or renamed): fall back to the template
            pass
        self._affixes: dict[str | None, tuple[str, str] | None] = {}

    def _affix(self, system_prompt: str | None) -> tuple[str, str] | None:
        if system_prompt not in self._affixes:
            try:
                from utils.config import use_chat_template
                from utils.model import format_prompt, load_tokenizer

                tok = getattr(self, "_tok", None) or load_tokenizer(
                    resolve_variant(self.exp, self.variant).model_path(self.exp))
                self._tok = tok
                text, _ = format_prompt(tok, _SENTINEL, system_prompt, use_chat_template(self.exp))
                prefix, _, suffix = text.partition(_SENTINEL)
                self._affixes[system_prompt] = (prefix, suffix)
            except Exception:  # noqa: BLE001 - no tokenizer here: keep the formatted prompt
                self._affixes[system_prompt] = None
        return self._affixes[system_prompt]

    def get(self, prompt_id: str, formatted: str | None, system_prompt: str | None) -> tuple[str, str]:
        if prompt_id in self.by_id:
            return self.by_id[prompt_id], "prompt_set"
        if formatted is None:
            return "", "unavailable"
        return user_prompt_text(formatted, self._affix(system_prompt))


def user_prompt_text(formatted: str, affixes: tuple[str, str] | None) -> tuple[str, str]:
    """Strip a chat template's prefix and suffix (rendered around a sentinel) from a formatted prompt.

    The suffix is searched from the right, so a --prefill after the template is dropped too.
    """
    if affixes:
        prefix, suffix = affixes
        cut = formatted.rfind(suffix) if suffix else len(formatted)
        if formatted.startswith(prefix) and cut >= len(prefix):
            return formatted[len(prefix):cut], "chat_template_stripped"
    return formatted, "formatted_prompt"


# ---------------------------------------------------------------------------------------------------------
# The stage

def list_projected_traits(exp: str, variant: str, prompt_set: str) -> list[str]:
    """`category/name` of every trait of `variant` with projections of the prompt set (sorted)."""
    root = paths.inference_dir(exp, variant) / "projections"
    if not root.is_dir():
        return []
    return sorted(f"{c.name}/{t.name}" for c in root.iterdir() if c.is_dir() for t in c.iterdir()
                  if t.is_dir() and paths.projection_dir(exp, variant, f"{c.name}/{t.name}", prompt_set).is_dir())


def _json_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.glob("*.json") if not p.name.startswith(".")}


@dataclass
class _TraitResult:
    trait: str
    out_dir: Path
    files: dict[str, dict] = field(default_factory=dict)       # prompt id -> per-prompt JSON
    aggregate: dict = field(default_factory=dict)


def _resolve_layer(trait: str, pid: str, pa: Projection, pb: Projection, layer: int | None) -> int:
    shared = set(pa.layers) & set(pb.layers)
    listing = (f"A ({pa.path}) has layers {_fmt(pa.layers)} (best: {_fmt(pa.best_layers())}), "
               f"B ({pb.path}) has {_fmt(pb.layers)} (best: {_fmt(pb.best_layers())})")
    if layer is not None:
        if layer not in shared:
            raise PerTokenDiffError(f"--layer {layer}: trait {trait!r} prompt {pid}: not in both projection files: "
                                    f"{listing}")
        return layer
    best = pa.best_layers() & pb.best_layers() & shared
    if len(best) == 1:
        return best.pop()
    if not best and len(shared) == 1:
        return next(iter(shared))
    why = "they share no layer" if not shared else "no single best layer is common to both"
    raise PerTokenDiffError(f"trait {trait!r} prompt {pid}: cannot pick a layer ({why}): {listing}; pass --layer N "
                            f"with a layer both hold, or re-project both variants with the same --steering-variant")


def _check_same_vector(trait: str, pid: str, ka: VectorKey, kb: VectorKey, pa: Projection, pb: Projection,
                       what: str = "the variants were projected onto different vectors") -> None:
    fields = ("layer", "method", "component", "position", "sha256", "centered", "baseline")
    bad = [f for f in fields if getattr(ka, f) is not None and getattr(kb, f) is not None
           and getattr(ka, f) != getattr(kb, f)]
    if bad:
        raise PerTokenDiffError(
            f"trait {trait!r} prompt {pid}: {what} ({', '.join(bad)} differ): {ka.describe()} ({pa.path}) vs "
            f"{kb.describe()} ({pb.path}); project both variants with the same --steering-variant / --layer / "
            f"--method / --position (and --centered or not)")


def _trait_diff(exp: str, variant_a: str, variant_b: str, prompt_set: str, set_a: str, trait: str,
                layer: int | None, top_pct: float, texts: _PromptTexts, tokens_of, warn) -> _TraitResult | str:
    """Everything for one trait, in memory; a str is the reason the trait is skipped."""
    dir_a = paths.projection_dir(exp, variant_a, trait, set_a)
    dir_b = paths.projection_dir(exp, variant_b, trait, prompt_set)
    if not dir_b.is_dir():
        return f"no projections of variant {variant_b!r} ({dir_b})"
    if not dir_a.is_dir():
        return f"no projections of variant {variant_a!r} ({dir_a})"
    files_a, files_b = _json_files(dir_a), _json_files(dir_b)
    ids = sorted(set(files_a) & set(files_b), key=paths.natural_key)
    if not ids:
        return f"no prompt id has projections in both {dir_a} and {dir_b}"
    unpaired = sorted(set(files_a) ^ set(files_b), key=paths.natural_key)
    if unpaired:
        warn(f"trait {trait}: {len(unpaired)} prompt(s) projected for one variant only, left out: "
             f"{', '.join(unpaired[:10])}{' ...' if len(unpaired) > 10 else ''}")

    out_dir = paths.model_diff_dir(exp, variant_a, variant_b) / "per_token_diff" / trait / prompt_set.strip("/")
    result = _TraitResult(trait, out_dir)
    chosen = -1
    first: tuple[VectorKey, Projection] | None = None
    sha_missing = False
    for pid in ids:
        pa, pb = read_projection(files_a[pid]), read_projection(files_b[pid])
        if first is None:  # the layer is fixed by the first prompt; every other prompt must hold it
            chosen = _resolve_layer(trait, pid, pa, pb, layer)
        ka, kb = pa.key(chosen), pb.key(chosen)
        _check_same_vector(trait, pid, ka, kb, pa, pb)
        if first is None:
            first = (kb, pb)
        else:  # every prompt of the trait on the same vector: a re-projection mid-set is caught here
            _check_same_vector(trait, pid, first[0], kb, first[1], pb,
                               "this prompt was projected onto another vector than the first prompt")
        sha_missing |= ka.sha256 is None or kb.sha256 is None
        ta, tb = tokens_of(variant_a, set_a, pid), tokens_of(variant_b, prompt_set, pid)
        if ta.token_ids != tb.token_ids:
            raise PerTokenDiffError(
                f"trait {trait!r} prompt {pid}: the variants scored different response tokens ({ta.source}: "
                f"{len(ta.token_ids)} ids, {tb.source}: {len(tb.token_ids)} ids); capture {variant_a} on "
                f"{variant_b}'s responses with: python inference/capture_raw_activations.py --experiment {exp} "
                f"--prompt-set {set_a} --model-variant {variant_a} --responses-from {variant_b}")
        a, b = pa.entry(chosen)["response"], pb.entry(chosen)["response"]
        n = len(tb.token_ids)
        for side, vals, p in (("A", a, pa), ("B", b, pb)):
            if len(vals) != n:
                raise PerTokenDiffError(f"{p.path}: {len(vals)} response scores at layer {chosen} but the response "
                                        f"has {n} tokens ({tb.source}); re-project variant {side}")
        tokens = tb.tokens if tb.tokens is not None else (ta.tokens if ta.tokens is not None else None)
        if tokens is None:
            raise PerTokenDiffError(f"prompt {pid}: no per-token strings in {tb.source} or {ta.source}")
        deltas = [float(y) - float(x) for x, y in zip(a, b)]
        mean_d, std_d = stats.mean(deltas), stats.std(deltas)
        clauses = sorted(split_into_clauses(tokens, deltas), key=lambda c: -c["mean_delta"])
        prompt_text, text_source = texts.get(pid, tb.formatted_prompt, tb.system_prompt)
        rec: dict[str, Any] = {
            "prompt_id": pid, "prompt_text": prompt_text, "trait": trait,
            "response_text": tb.response_text if tb.response_text is not None else "".join(tokens),
            "tokens": list(tokens), "per_token_delta": deltas, "mean_delta": mean_d.value, "std_delta": std_d.value,
            "clauses": clauses,
            "layer": chosen, "method": kb.method, "component": kb.component, "variant_a": variant_a,
            "variant_b": variant_b, "prompt_set": prompt_set, "prompt_text_source": text_source, "n_tokens": n,
        }
        reasons = {k: s.reason for k, s in (("mean_delta", mean_d), ("std_delta", std_d)) if s.value is None}
        if reasons:
            rec["null_reasons"] = reasons
        result.files[pid] = rec
    if sha_missing:
        warn(f"trait {trait}: projection files without a vector sha256 (original tool?): vector identity checked by "
             f"layer, method, component and centering only")
    result.aggregate = _aggregate(result, variant_a, variant_b, prompt_set, set_a, chosen, first[0], top_pct)
    return result


def _aggregate(res: _TraitResult, variant_a: str, variant_b: str, prompt_set: str, set_a: str, layer: int,
               key: VectorKey, top_pct: float) -> dict:
    recs = list(res.files.values())
    means = [r["mean_delta"] for r in recs if r["mean_delta"] is not None]
    across_mean, across_std = (stats.mean(means), stats.std(means))
    longest = max((len(r["per_token_delta"]) for r in recs), default=0)
    per_pos, counts = [], []
    for i in range(longest):  # ragged: position i averages the prompts that reach it (counts say how many)
        col = [r["per_token_delta"][i] for r in recs if len(r["per_token_delta"]) > i]
        per_pos.append(math.fsum(col) / len(col))
        counts.append(len(col))
    pooled = [{"prompt_id": r["prompt_id"], "prompt_text": r["prompt_text"][:PROMPT_TEXT_CHARS], **c}
              for r in recs for c in r["clauses"]]
    top_n = max(1, int(len(pooled) * top_pct / 100)) if pooled else 0
    # ties broken by prompt order then text position, so the lists are reproducible
    order = {pid: i for i, pid in enumerate(res.files)}
    top = sorted(pooled, key=lambda c: (-c["mean_delta"], order[c["prompt_id"]], c["token_range"][0]))[:top_n]
    bottom = sorted(pooled, key=lambda c: (c["mean_delta"], order[c["prompt_id"]], c["token_range"][0]))[:top_n]
    agg: dict[str, Any] = {
        "trait": res.trait, "variant_a": variant_a, "variant_b": variant_b, "n_prompts": len(recs),
        "mean_delta_across_prompts": across_mean.value, "std_delta_across_prompts": across_std.value,
        "per_position_mean_delta": per_pos, "per_position_count": counts,
        "top_clauses_overall": top, "bottom_clauses_overall": bottom,
        "layer": layer, "method": key.method, "component": key.component, "position": key.position,
        "vector_sha256": key.sha256, "centered": key.centered,
        "prompt_set": prompt_set, "variant_a_prompt_set": set_a, "top_pct": top_pct, "n_clauses": len(pooled),
        "delta": "B - A: positive means variant_b projects higher on the trait",
        "statistics": "std is the sample std (ddof=1); mean_delta_across_prompts weights each prompt equally",
    }
    reasons = {k: s.reason for k, s in (("mean_delta_across_prompts", across_mean),
                                         ("std_delta_across_prompts", across_std)) if s.value is None}
    if reasons:
        agg["null_reasons"] = reasons
    return agg


def per_token_diff(experiment: str, variant_a: str, variant_b: str, prompt_set: str, trait: str = "all",
                   variant_a_prompt_set: str | None = None, layer: int | None = None, top_pct: float = 5.0,
                   progress: bool = True) -> dict:
    """Write per-prompt clause breakdowns and aggregate.json for each trait; returns a summary.

    Every trait is computed and checked in memory first; files are written only when all passed.
    Summary keys: traits (written), skipped ({trait: reason}), prompts, files, output_dirs, seconds.
    """
    t0 = time.perf_counter()
    if not (isinstance(top_pct, (int, float)) and 0 < top_pct <= 100):
        raise PerTokenDiffError(f"--top-pct {top_pct}: must be in (0, 100]")
    if layer is not None and layer < 0:
        raise PerTokenDiffError(f"--layer {layer}: must be a layer index >= 0")
    cfg = load_config(experiment)
    for flag, name in (("--variant-a", variant_a), ("--variant-b", variant_b)):
        if name not in cfg["model_variants"]:
            raise ConfigError(f"{flag} {name!r}: not a model variant of experiment {experiment!r} "
                              f"(variants: {', '.join(cfg['model_variants'])})")
    prompt_set = prompt_set.strip("/")
    set_a = (variant_a_prompt_set or prompt_set).strip("/")
    if trait == "all":
        traits = list_projected_traits(experiment, variant_b, prompt_set)
        if not traits:
            raise PerTokenDiffError(f"--trait all: variant {variant_b!r} has no projections of prompt set "
                                    f"{prompt_set!r} under {paths.inference_dir(experiment, variant_b) / 'projections'}")
    else:
        if len(trait.strip("/").split("/")) != 2:
            raise PerTokenDiffError(f"--trait {trait!r}: expected category/name or all")
        traits = [trait.strip("/")]

    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    from tqdm.auto import tqdm

    texts = _PromptTexts(experiment, prompt_set, variant_b)
    token_cache: dict[tuple[str, str, str], ResponseTokens] = {}

    def tokens_of(variant: str, pset: str, pid: str) -> ResponseTokens:  # read once, whatever the number of traits
        if (variant, pset, pid) not in token_cache:
            token_cache[(variant, pset, pid)] = read_response_tokens(experiment, variant, pset, pid)
        return token_cache[(variant, pset, pid)]

    results: list[_TraitResult] = []
    skipped: dict[str, str] = {}
    for t in tqdm(traits, desc="per-token diff", unit="trait", file=sys.stderr, disable=not progress):
        r = _trait_diff(experiment, variant_a, variant_b, prompt_set, set_a, t, layer, top_pct, texts, tokens_of,
                        warn)
        if isinstance(r, str):
            if trait != "all":
                raise PerTokenDiffError(f"--trait {t}: {r}")
            skipped[t] = r
            warn(f"trait {t} skipped: {r}")
        else:
            results.append(r)
    if not results:
        raise PerTokenDiffError(f"no trait has projections of both variants: {skipped}")

    files: list[str] = []
    for r in results:
        for pid, rec in r.files.items():
            path = r.out_dir / f"{pid}.json"
            write_json(path, rec, indent=1)
            files.append(str(path))
        write_json(r.out_dir / "aggregate.json", r.aggregate, indent=1)
        stale = [p for stem, p in _json_files(r.out_dir).items() if stem != "aggregate" and stem not in r.files]
        for p in stale:  # ids of an earlier run that are not in this one would pass for current results
            p.unlink()
        if stale:
            warn(f"trait {r.trait}: removed {len(stale)} per-prompt file(s) of an earlier run not in this one")
    return {
        "experiment": experiment, "variant_a": variant_a, "variant_b": variant_b, "prompt_set": prompt_set,
        "traits": [r.trait for r in results], "skipped": skipped,
        "layers": {r.trait: r.aggregate["layer"] for r in results},
        "prompts": sum(len(r.files) for r in results), "files": files,
        "output_dirs": [str(r.out_dir) for r in results], "warnings": warnings,
        "aggregates": {r.trait: r.aggregate for r in results}, "seconds": time.perf_counter() - t0,
    }


def format_summary(s: dict) -> str:
    parts = [f"{t} L{s['layers'][t]}: mean delta {_num(s['aggregates'][t]['mean_delta_across_prompts'])}"
             for t in s["traits"]]
    skipped = f"; skipped {len(s['skipped'])} trait(s)" if s["skipped"] else ""
    return (f"per-token diff {s['variant_b']} - {s['variant_a']} on {s['prompt_set']}: {s['prompts']} prompt files for "
            f"{len(s['traits'])} trait(s) ({'; '.join(parts)}){skipped} in {s['seconds']:.1f} s -> "
            f"{paths.model_diff_dir(s['experiment'], s['variant_a'], s['variant_b']) / 'per_token_diff'}")


def _num(x: float | None) -> str:
    return "null" if x is None else f"{x:+.4g}"


# ---------------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
example (after projecting both variants, see the README's model-diff workflow):
  python analysis/model_diff/per_token_diff.py \\
      --experiment rm_syco \\
      --variant-a instruct --variant-b rm_lora \\
      --prompt-set rm_syco/train_100 \\
      --trait all --top-pct 5

Writes model_diff/{A}_vs_{B}/per_token_diff/{trait}/{prompt_set}/{id}.json and aggregate.json.
Delta = B - A per response token; clauses end after , . ; : ! ? em dash or newline.
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="per_token_diff.py",
                description="Per-token and per-clause trait-projection difference (B - A) of two model variants "
                            "on identical response tokens.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--variant-a", required=True, help="baseline variant")
    p.add_argument("--variant-b", required=True, help="comparison variant (delta = B - A)")
    p.add_argument("--prompt-set", required=True, help="B's projection and response set, and the output set")
    p.add_argument("--variant-a-prompt-set", help="A's projection set (default: --prompt-set)")
    p.add_argument("--trait", required=True, help="category/name, or all (every trait B has projections of)")
    p.add_argument("--layer", type=int, help="projection layer (default: the best-vector layer both files share)")
    p.add_argument("--top-pct", type=float, default=5.0,
                   help="share of all clauses kept at each end in aggregate.json (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = per_token_diff(args.experiment, args.variant_a, args.variant_b, args.prompt_set, args.trait,
                                 args.variant_a_prompt_set, args.layer, args.top_pct, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
