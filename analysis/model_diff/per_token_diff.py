"""Per-token and per-clause difference of two variants' trait projections on the same tokens (B - A).

    per_token_diff(experiment, variant_a, variant_b, prompt_set, trait="all", ...) -> dict   the stage, importable
    PerTokenOptions(...) / PerTokenOptions.from_args(ns)     every option of one run (frozen)
    plan_per_token(opts) -> PerTokenPlan                     flags, variants, traits, file pairs checked; nothing read
    run_per_token(plan) -> dict                              every trait computed and checked in memory, then written
    split_into_clauses(tokens, deltas) -> [clause]     clause spans with mean / max / min delta and token range
    clause_breaks(tokens) -> [bool]                    True where a clause closes after that token (both: core/clauses.py)
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

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from core import stats
from core.clauses import clause_breaks, split_into_clauses  # noqa: F401  (re-exported: the clause rule lives in core)
from core.errors import TraitError
from utils import cli, paths, projections
from utils.config import ConfigError, load_config, resolve_variant
from utils.layers import format_layers
from utils.flags import add_traits_flag, parse_traits
from utils.model_diff import AGGREGATE_FILE, write_aggregate, write_per_token_diff
from utils.projections import list_projected_traits
from utils.responses import ResponseError, scored_tokens
from utils.storage import add_write_flags, guard_outputs
from utils.summaries import DEFAULT_UNITS, add_units_flag
from utils.vectors import VectorError, resolve_vector_source

PROMPT_TEXT_CHARS = 100      # prompt text kept with each pooled clause in aggregate.json (as trait-interp)
BEST_SOURCES = ("steering", "extraction")     # selection values that mean "chosen by evidence"


class PerTokenDiffError(TraitError):
    """Bad input for per_token_diff; the message names the file, prompt or flag."""


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


def _is_best(entry: dict) -> bool:
    """An entry the projection chose by evidence: trait-interp's selection_source, or our selected_by."""
    return entry.get("selection_source") in BEST_SOURCES or entry.get("selected_by") in BEST_SOURCES


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
        return {e["layer"] for e in self.entries if _is_best(e)}

    def entry(self, layer: int) -> dict:
        at = [e for e in self.entries if e["layer"] == layer]
        if not at:
            raise PerTokenDiffError(f"{self.path}: no projection at layer {layer} (layers present: "
                                    f"{format_layers(self.layers)})")
        if len(at) > 1:
            best = [e for e in at if _is_best(e)]
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


def read_projection(path: Path) -> Projection:
    """A projection JSON read by its owner (utils/projections.py: multi-vector or trait-interp's legacy format)."""
    try:
        proj = projections.read_projection(path)
    except projections.ProjectionError as e:
        raise PerTokenDiffError(str(e)) from e
    entries = [{**e.raw, "layer": e.layer, "method": e.method, "response": list(e.response)} for e in proj.entries]
    return Projection(path, entries, dict(proj.metadata))


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
    JSON (utils.responses.scored_tokens, which validates both)."""
    try:
        st = scored_tokens(exp, variant, prompt_set, prompt_id, prefer="raw")
    except ResponseError as e:
        raise PerTokenDiffError(str(e)) from e
    toks = st.response_tokens
    return ResponseTokens(st.source, list(st.response_ids), None if toks is None else list(toks), st.response_text,
                          st.formatted_prompt, st.system_prompt)


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
        except TraitError:  # no such set (imported or renamed): fall back to the template
            pass
        self._affixes: dict[str | None, tuple[str, str] | None] = {}

    def _affix(self, system_prompt: str | None) -> tuple[str, str] | None:
        if system_prompt not in self._affixes:
            from jinja2 import TemplateError

            from utils.config import use_chat_template
            from utils.model import format_prompt, load_tokenizer

            try:
                tok = getattr(self, "_tok", None) or load_tokenizer(
                    resolve_variant(self.exp, self.variant).model_path(self.exp))
                self._tok = tok
                text, _ = format_prompt(tok, _SENTINEL, system_prompt, use_chat_template(self.exp))
                prefix, _, suffix = text.partition(_SENTINEL)
                self._affixes[system_prompt] = (prefix, suffix)
            except (TraitError, OSError, TemplateError):  # no tokenizer or template here: keep the formatted prompt
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
# Options and plan

@dataclass(frozen=True)
class PerTokenOptions:
    experiment: str
    variant_a: str
    variant_b: str
    prompt_set: str
    trait: str = "all"
    variant_a_prompt_set: str | None = None
    layer: int | None = None
    top_pct: float = 5.0
    progress: bool = True
    units: str = DEFAULT_UNITS
    overwrite: bool = False                  # replace existing outputs (without it or skip_existing, refuse)
    skip_existing: bool = False              # keep existing outputs, write only the missing ones

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "PerTokenOptions":
        return cls(ns.experiment, ns.variant_a, ns.variant_b, ns.prompt_set, ns.traits, ns.variant_a_prompt_set,
                   ns.layer, ns.top_pct, progress=not ns.quiet, units=ns.units, overwrite=ns.overwrite,
                   skip_existing=ns.skip_existing)

    def check_flags(self) -> None:
        if not (isinstance(self.top_pct, (int, float)) and 0 < self.top_pct <= 100):
            raise PerTokenDiffError(f"--top-pct {self.top_pct}: must be in (0, 100]")
        if self.layer is not None and self.layer < 0:
            raise PerTokenDiffError(f"--layer {self.layer}: must be a layer index >= 0")
        bad = [t for t in parse_traits(self.trait) or () if len(t.split("/")) != 2]
        if bad:
            raise PerTokenDiffError(f"--traits {bad[0]!r}: expected category/name (comma list) or all")


@dataclass(frozen=True)
class TraitInputs:
    """The projection files of one trait that both variants have."""
    trait: str
    files_a: dict[str, Path]
    files_b: dict[str, Path]
    ids: list[str]                        # paired ids, natural order
    unpaired: list[str]                   # ids projected for one variant only
    out_dir: Path


@dataclass
class PerTokenPlan:
    opts: PerTokenOptions
    prompt_set: str
    set_a: str
    traits: list[TraitInputs]
    skipped: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)


def trait_inputs(opts: PerTokenOptions, trait: str, prompt_set: str, set_a: str) -> TraitInputs:
    """Pair the trait's projection files by id; PerTokenDiffError when a side has none."""
    dir_a = paths.projection_dir(opts.experiment, opts.variant_a, trait, set_a)
    dir_b = paths.projection_dir(opts.experiment, opts.variant_b, trait, prompt_set)
    for variant, folder in ((opts.variant_b, dir_b), (opts.variant_a, dir_a)):
        if not folder.is_dir():
            raise PerTokenDiffError(f"no projections of variant {variant!r} ({folder})")
    files_a, files_b = paths.files_by_id(dir_a, ".json"), paths.files_by_id(dir_b, ".json")
    ids = sorted(set(files_a) & set(files_b), key=paths.natural_key)
    if not ids:
        raise PerTokenDiffError(f"no prompt id has projections in both {dir_a} and {dir_b}")
    out_dir = paths.model_diff_dir(opts.experiment, opts.variant_a, opts.variant_b) / "per_token_diff" / trait
    out_dir = out_dir / prompt_set
    return TraitInputs(trait, files_a, files_b, ids, sorted(set(files_a) ^ set(files_b), key=paths.natural_key),
                       out_dir)


def plan_per_token(opts: PerTokenOptions) -> PerTokenPlan:
    """Check flags, variants and which traits both variants projected; no projection file is read yet."""
    opts.check_flags()
    cfg = load_config(opts.experiment)
    for flag, name in (("--variant-a", opts.variant_a), ("--variant-b", opts.variant_b)):
        if name not in cfg["model_variants"]:
            raise ConfigError(f"{flag} {name!r}: not a model variant of experiment {opts.experiment!r} "
                              f"(variants: {', '.join(cfg['model_variants'])})")
    prompt_set = opts.prompt_set.strip("/")
    set_a = (opts.variant_a_prompt_set or prompt_set).strip("/")
    chosen = parse_traits(opts.trait)
    if chosen:
        names = list(chosen)
    else:
        names = list_projected_traits(opts.experiment, opts.variant_b, prompt_set)
        if not names:
            raise PerTokenDiffError(f"--trait all: variant {opts.variant_b!r} has no projections of prompt set "
                                    f"{prompt_set!r} under "
                                    f"{paths.inference_dir(opts.experiment, opts.variant_b) / 'projections'}")
    plan = PerTokenPlan(opts, prompt_set, set_a, [], {})
    for t in names:
        try:
            plan.traits.append(trait_inputs(opts, t, prompt_set, set_a))
        except PerTokenDiffError as e:
            if chosen:
                raise PerTokenDiffError(f"--traits {t}: {e}") from e
            plan.skipped[t] = str(e)
            plan.warn(f"trait {t} skipped: {e}")
    if not plan.traits:
        raise PerTokenDiffError(f"no trait has projections of both variants: {plan.skipped}")
    for ti in plan.traits:
        if ti.unpaired:
            plan.warn(f"trait {ti.trait}: {len(ti.unpaired)} prompt(s) projected for one variant only, left out: "
                      f"{', '.join(ti.unpaired[:10])}{' ...' if len(ti.unpaired) > 10 else ''}")
    return plan


# ---------------------------------------------------------------------------------------------------------
# One trait, in memory

@dataclass
class _TraitResult:
    trait: str
    out_dir: Path
    files: dict[str, dict] = field(default_factory=dict)       # prompt id -> per-prompt JSON
    aggregate: dict = field(default_factory=dict)


def _steering_layer(exp: str, trait: str, pb: Projection, shared: set[int]) -> tuple[int, str] | None:
    """The best layer by the experiment's steering results (else held-out extraction metrics), as trait-interp
    picks it when the projections do not say; None when there is no such evidence for B's vectors."""
    meta = pb.metadata
    methods = {e.get("method") for e in pb.entries if e["layer"] in shared}
    try:
        source = resolve_vector_source(exp, traits=[trait])
        top = source.rank(trait, component=meta.get("component") or "residual", position=meta.get("position"),
                          method=methods.pop() if len(methods) == 1 else None)[0]
    except VectorError:
        return None
    where = f"{top.source} evidence of variant {source.steering_variant!r}"
    if top.ref.layer not in shared:
        raise PerTokenDiffError(f"trait {trait!r}: the best layer by {where} is {top.ref.layer}, but the projection "
                                f"files share layers {format_layers(shared)}; pass --layer N, or re-project both "
                                f"variants with "
                                f"--layers {top.ref.layer}")
    return top.ref.layer, f"best vector by {where}"


def _resolve_layer(exp: str, trait: str, pid: str, pa: Projection, pb: Projection,
                   layer: int | None) -> tuple[int, str]:
    """(layer, why): --layer; else the entry both files mark as the best; else the only layer they share; else
    the layer the steering results pick (trait-interp's rule when B's projections mark none)."""
    shared = set(pa.layers) & set(pb.layers)
    listing = (f"A ({pa.path}) has layers {format_layers(pa.layers)} (best: {format_layers(pa.best_layers())}), "
               f"B ({pb.path}) has {format_layers(pb.layers)} (best: {format_layers(pb.best_layers())})")
    if layer is not None:
        if layer not in shared:
            raise PerTokenDiffError(f"--layer {layer}: trait {trait!r} prompt {pid}: not in both projection files: "
                                    f"{listing}")
        return layer, "--layer"
    best = pa.best_layers() & pb.best_layers() & shared
    if len(best) == 1:
        return best.pop(), "the best-vector entry of both projection files"
    if not best and len(shared) == 1:
        return next(iter(shared)), "the only layer both projection files hold"
    found = _steering_layer(exp, trait, pb, shared) if shared else None
    if found is not None:
        return found
    why = "they share no layer" if not shared else "no single best layer is common to both"
    raise PerTokenDiffError(f"trait {trait!r} prompt {pid}: cannot pick a layer ({why}, and no steering results or "
                            f"extraction metrics for its vectors in {exp!r}): {listing}; pass --layer N with a layer "
                            f"both hold, or re-project both variants with the same --steering-variant")


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


def _scored_deltas(plan: PerTokenPlan, trait: str, pid: str, layer: int, pa: Projection, pb: Projection,
                   ta: ResponseTokens, tb: ResponseTokens) -> tuple[list[float], list[str]]:
    """B - A per response token, after checking that both sides scored the same ids (and all of them)."""
    o = plan.opts
    if ta.token_ids != tb.token_ids:
        raise PerTokenDiffError(
            f"trait {trait!r} prompt {pid}: the variants scored different response tokens ({ta.source}: "
            f"{len(ta.token_ids)} ids, {tb.source}: {len(tb.token_ids)} ids); capture {o.variant_a} on "
            f"{o.variant_b}'s responses with: python inference/capture_raw_activations.py --experiment "
            f"{o.experiment} --prompt-set {plan.set_a} --model-variant {o.variant_a} --responses-from {o.variant_b}")
    a, b = pa.entry(layer)["response"], pb.entry(layer)["response"]
    n = len(tb.token_ids)
    for side, vals, p in (("A", a, pa), ("B", b, pb)):
        if len(vals) != n:
            raise PerTokenDiffError(f"{p.path}: {len(vals)} response scores at layer {layer} but the response "
                                    f"has {n} tokens ({tb.source}); re-project variant {side}")
    tokens = tb.tokens if tb.tokens is not None else ta.tokens
    if tokens is None:
        raise PerTokenDiffError(f"prompt {pid}: no per-token strings in {tb.source} or {ta.source}")
    return [float(y) - float(x) for x, y in zip(a, b)], list(tokens)


def _prompt_record(plan: PerTokenPlan, trait: str, pid: str, layer: int, key: VectorKey, deltas: list[float],
                   tokens: list[str], tb: ResponseTokens, texts: _PromptTexts) -> dict:
    o = plan.opts
    mean_d, std_d = stats.mean(deltas), stats.std(deltas)
    prompt_text, text_source = texts.get(pid, tb.formatted_prompt, tb.system_prompt)
    rec: dict[str, Any] = {
        "prompt_id": pid, "prompt_text": prompt_text, "trait": trait,
        "response_text": tb.response_text if tb.response_text is not None else "".join(tokens),
        "tokens": tokens, "per_token_delta": deltas, "mean_delta": mean_d.value, "std_delta": std_d.value,
        "clauses": sorted(split_into_clauses(tokens, deltas), key=lambda c: -c["mean_delta"]),
        "layer": layer, "method": key.method, "component": key.component, "variant_a": o.variant_a,
        "variant_b": o.variant_b, "prompt_set": plan.prompt_set, "prompt_text_source": text_source,
        "n_tokens": len(deltas),
    }
    reasons = {k: s.reason for k, s in (("mean_delta", mean_d), ("std_delta", std_d)) if s.value is None}
    if reasons:
        rec["null_reasons"] = reasons
    return rec


TokensOf = Callable[[str, str, str], ResponseTokens]


def trait_diff(plan: PerTokenPlan, ti: TraitInputs, texts: _PromptTexts, tokens_of: TokensOf) -> _TraitResult:
    """Every prompt of one trait, checked and computed in memory (nothing written)."""
    o = plan.opts
    result = _TraitResult(ti.trait, ti.out_dir)
    chosen, layer_source, first, sha_missing = -1, "", None, False
    for pid in ti.ids:
        pa, pb = read_projection(ti.files_a[pid]), read_projection(ti.files_b[pid])
        if first is None:  # the layer is fixed by the first prompt; every other prompt must hold it
            chosen, layer_source = _resolve_layer(o.experiment, ti.trait, pid, pa, pb, o.layer)
        ka, kb = pa.key(chosen), pb.key(chosen)
        _check_same_vector(ti.trait, pid, ka, kb, pa, pb)
        if first is None:
            first = (kb, pb)
        else:  # every prompt of the trait on the same vector: a re-projection mid-set is caught here
            _check_same_vector(ti.trait, pid, first[0], kb, first[1], pb,
                               "this prompt was projected onto another vector than the first prompt")
        sha_missing |= ka.sha256 is None or kb.sha256 is None
        tb = tokens_of(o.variant_b, plan.prompt_set, pid)
        deltas, tokens = _scored_deltas(plan, ti.trait, pid, chosen, pa, pb, tokens_of(o.variant_a, plan.set_a, pid),
                                        tb)
        result.files[pid] = _prompt_record(plan, ti.trait, pid, chosen, kb, deltas, tokens, tb, texts)
    if sha_missing:
        plan.warn(f"trait {ti.trait}: projection files without a vector sha256 (trait-interp's?): vector identity "
                  f"checked by layer, method, component and centering only")
    entry_b = first[1].entry(chosen)
    ref = entry_b.get("reference") if isinstance(entry_b.get("reference"), dict) else (
        {"baseline": entry_b["baseline"]} if isinstance(entry_b.get("baseline"), (int, float)) else None)
    result.aggregate = _aggregate(plan, result, chosen, first[0], ref)
    result.aggregate["layer_source"] = layer_source
    return result


def _aggregate(plan: PerTokenPlan, res: _TraitResult, layer: int, key: VectorKey, ref_json: dict | None) -> dict:
    o = plan.opts
    spread = (ref_json or {}).get("spread")
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
    top_n = max(1, int(len(pooled) * o.top_pct / 100)) if pooled else 0
    # ties broken by prompt order then text position, so the lists are reproducible; each list holds clauses of
    # its own sign only (a clause with delta +0.3 is never listed under "B < A")
    order = {pid: i for i, pid in enumerate(res.files)}
    top = sorted((c for c in pooled if c["mean_delta"] > 0),
                 key=lambda c: (-c["mean_delta"], order[c["prompt_id"]], c["token_range"][0]))[:top_n]
    bottom = sorted((c for c in pooled if c["mean_delta"] < 0),
                    key=lambda c: (c["mean_delta"], order[c["prompt_id"]], c["token_range"][0]))[:top_n]
    agg: dict[str, Any] = {
        "trait": res.trait, "variant_a": o.variant_a, "variant_b": o.variant_b, "n_prompts": len(recs),
        "mean_delta_across_prompts": across_mean.value, "std_delta_across_prompts": across_std.value,
        "per_position_mean_delta": per_pos, "per_position_count": counts,
        "top_clauses_overall": top, "bottom_clauses_overall": bottom,
        "layer": layer, "layer_rule": "the selected vector's layer (the best-vector entry of the projection files), "
                                      "the same layer compare_variants reports as headline_layer",
        "reference": ref_json, "mean_delta_across_prompts_z": None if across_mean.value is None or not spread
        else across_mean.value / spread,
        "clause_lists": "top: clauses with mean_delta > 0 (B above A), highest first; bottom: mean_delta < 0, lowest "
                        "first; each at most top_pct of all clauses",
        "method": key.method, "component": key.component, "position": key.position,
        "vector_sha256": key.sha256, "centered": key.centered,
        "prompt_set": plan.prompt_set, "variant_a_prompt_set": plan.set_a, "top_pct": o.top_pct,
        "n_clauses": len(pooled),
        "delta": "B - A: positive means variant_b projects higher on the trait",
        "statistics": "std is the sample std (ddof=1); mean_delta_across_prompts weights each prompt equally",
    }
    reasons = {k: s.reason for k, s in (("mean_delta_across_prompts", across_mean),
                                         ("std_delta_across_prompts", across_std)) if s.value is None}
    if reasons:
        agg["null_reasons"] = reasons
    return agg


# ---------------------------------------------------------------------------------------------------------
# Running and writing

def _outputs(res: _TraitResult) -> list[Path]:
    return [res.out_dir / f"{pid}.json" for pid in res.files] + [res.out_dir / AGGREGATE_FILE]


def _stale(res: _TraitResult) -> list[Path]:
    """Per-prompt files of an earlier run whose ids are not in this one (they would pass for current results)."""
    return [p for stem, p in paths.files_by_id(res.out_dir, ".json").items()
            if stem != "aggregate" and stem not in res.files]


def write_trait(res: _TraitResult, warn: Callable[[str], None], keep: frozenset[Path] = frozenset()) -> list[str]:
    """The per-prompt files and aggregate.json of one trait, except those in `keep` (--skip-existing); per-prompt
    files of an earlier run are removed unless kept."""
    files = []
    for path, rec in [(res.out_dir / f"{pid}.json", rec) for pid, rec in res.files.items()] + [
            (res.out_dir / AGGREGATE_FILE, res.aggregate)]:
        if path in keep:
            continue
        (write_aggregate if path.name == AGGREGATE_FILE else write_per_token_diff)(path, rec)
        files.append(str(path))
    stale = [p for p in _stale(res) if p not in keep]
    for p in stale:
        p.unlink()
    if stale:
        warn(f"trait {res.trait}: removed {len(stale)} per-prompt file(s) of an earlier run not in this one")
    return files


def run_per_token(plan: PerTokenPlan) -> dict:
    """Compute every trait in memory (all checks pass first), then write; returns a summary."""
    t0 = time.perf_counter()
    o = plan.opts
    texts = _PromptTexts(o.experiment, plan.prompt_set, o.variant_b)
    token_cache: dict[tuple[str, str, str], ResponseTokens] = {}

    def tokens_of(variant: str, pset: str, pid: str) -> ResponseTokens:  # read once, whatever the number of traits
        if (variant, pset, pid) not in token_cache:
            token_cache[(variant, pset, pid)] = read_response_tokens(o.experiment, variant, pset, pid)
        return token_cache[(variant, pset, pid)]

    results = [trait_diff(plan, ti, texts, tokens_of)
               for ti in tqdm(plan.traits, desc="per-token diff", unit="trait", file=sys.stderr,
                              disable=not o.progress)]
    # every trait computed and checked: the rule for existing files (utils/storage.py) before the first write
    existing = guard_outputs([p for r in results for p in _outputs(r) + _stale(r)], overwrite=o.overwrite,
                             skip_existing=o.skip_existing)
    keep = frozenset(existing) if o.skip_existing else frozenset()
    files = [f for r in results for f in write_trait(r, plan.warn, keep)]
    return {
        "experiment": o.experiment, "variant_a": o.variant_a, "variant_b": o.variant_b, "prompt_set": plan.prompt_set,
        "traits": [r.trait for r in results], "skipped": plan.skipped,
        "layers": {r.trait: r.aggregate["layer"] for r in results},
        "prompts": sum(len(r.files) for r in results), "files": files, "kept": len(keep),
        "output_dirs": [str(r.out_dir) for r in results], "warnings": plan.warnings,
        "aggregates": {r.trait: r.aggregate for r in results}, "seconds": time.perf_counter() - t0,
        "units": o.units,
    }


def per_token_diff(experiment: str, variant_a: str, variant_b: str, prompt_set: str, trait: str = "all",
                   variant_a_prompt_set: str | None = None, layer: int | None = None, top_pct: float = 5.0,
                   progress: bool = True, overwrite: bool = False, skip_existing: bool = False) -> dict:
    """Write per-prompt clause breakdowns and aggregate.json for each trait; returns a summary.

    Every trait is computed and checked in memory first; files are written only when all passed.
    Summary keys: traits (written), skipped ({trait: reason}), prompts, files, output_dirs, seconds.
    """
    return run_per_token(plan_per_token(PerTokenOptions(experiment, variant_a, variant_b, prompt_set, trait,
                                                        variant_a_prompt_set, layer, top_pct, progress,
                                                        overwrite=overwrite, skip_existing=skip_existing)))


def _trait_part(t: str, agg: dict, units: str) -> str:
    mean, z = agg.get("mean_delta_across_prompts"), agg.get("mean_delta_across_prompts_z")
    if units == "z" and z is not None:
        shown = f"{_num(z)} held-out spreads ({(agg.get('reference') or {}).get('spread'):.3g})"
    else:
        shown = f"{_num(mean)} raw projection units" + (" (no held-out spread)" if units == "z" else "")
    return f"{t} L{agg['layer']} (selected vector): mean delta {shown}"


def format_summary(s: dict) -> str:
    parts = [_trait_part(t, s["aggregates"][t], s.get("units") or DEFAULT_UNITS) for t in s["traits"]]
    skipped = f"; skipped {len(s['skipped'])} trait(s)" if s["skipped"] else ""
    if s.get("kept"):
        skipped += f"; kept {s['kept']} existing file(s) (--skip-existing), wrote {len(s['files'])}"
    return (f"per-token diff {s['variant_b']} - {s['variant_a']} on {s['prompt_set']}: {s['prompts']} prompt files for "
            f"{len(s['traits'])} trait(s) ({'; '.join(parts)}){skipped} in {s['seconds']:.1f} s -> "
            f"{paths.model_diff_dir(s['experiment'], s['variant_a'], s['variant_b']) / 'per_token_diff'}")


def _num(x: float | None) -> str:
    return "null" if x is None else f"{x:+.4g}"


# ---------------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
example (after projecting both variants, see the README's model-diff workflow; --overwrite: `make demo` wrote
these files):
  python analysis/model_diff/per_token_diff.py \\
      --experiment demo \\
      --variant-a instruct --variant-b lora \\
      --prompt-set single_trait \\
      --traits all --top-pct 5 --overwrite

  # one trait, the mean delta in raw projection units (--overwrite: replaces what the line above wrote)
  python analysis/model_diff/per_token_diff.py --experiment demo --variant-a instruct --variant-b lora \\
      --prompt-set single_trait --traits demo/formality --units raw --overwrite

A rerun whose output files exist refuses unless --skip-existing (keep them) or --overwrite (replace them).

Writes model_diff/{A}_vs_{B}/per_token_diff/{trait}/{prompt_set}/{id}.json and aggregate.json.
Delta = B - A per response token; clauses end after , . ; : ! ? em dash or newline.
Layer: --layer, else the best entry both projection files mark, else the only layer both hold, else the
best layer by the experiment's steering results.
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="per_token_diff.py",
                   description="Per-token and per-clause trait-projection difference (B - A) of two model variants "
                               "on identical response tokens.",
                   epilog=EPILOG)
    p.add_argument("--experiment", required=True)
    p.add_argument("--variant-a", required=True, help="baseline variant")
    p.add_argument("--variant-b", required=True, help="comparison variant (delta = B - A)")
    p.add_argument("--prompt-set", required=True, help="B's projection and response set, and the output set")
    p.add_argument("--variant-a-prompt-set", help="A's projection set (default: --prompt-set)")
    add_traits_flag(p, aliases=("--trait",), default="all", all_word=True,
                    help_default="all: every trait B has projections of")
    p.add_argument("--layer", type=int, help="projection layer (default: the best-vector layer both files share, "
                                            "else the steering results' best layer)")
    p.add_argument("--top-pct", type=float, default=5.0,
                   help="share of all clauses kept at each end in aggregate.json (default 5)")
    add_units_flag(p)
    add_write_flags(p, "per-token diff files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda ns: run_per_token(plan_per_token(PerTokenOptions.from_args(ns))),
                   format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
