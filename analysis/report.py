#!/usr/bin/env python
"""One self-contained HTML page of per-token trait scores (and of a model diff) that opens offline from file://.

    report(opts) -> ReportSummary        the stage: plan -> build -> one atomic write
    plan_report(opts) -> ReportPlan      every input checked (variants, traits, files listed), nothing written
    build_data(plan) -> dict             what the page shows, compact: scores rounded to `precision` digits
    render_html(data) -> str             the page: the data and analysis/assets/*.js/.css inlined, no network
    ReportOptions / ReportError          the one options dataclass; bad input (one line, exit status 2)

Reads (file formats: docs/formats.md) the response JSONs (tokens, token_ids, prompt_end) or, for a variant captured
with --responses-from, its raw .pt; the projection JSONs of every trait; with --compare A,B the per_token_diff
files, aggregate.json and results.json under model_diff/{A}_vs_{B}/; and extract_viz's attention / logit-lens
files when they exist. Writes experiments/{exp}/analysis/report/{set}.html, or {set}_{A}_vs_{B}.html.

    python analysis/report.py --experiment demo --prompt-set single_trait --model-variant lora
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import re
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from analysis.model_diff.per_token_diff import read_response_tokens
from core.aggregates import response_aggregates
from core.errors import TraitError
from utils import cli, paths
from utils.config import resolve_variant
from utils.flags import add_traits_flag, parse_traits
from utils.model_diff import CompareError, read_aggregate, read_per_token_diff, read_results
from utils.projections import ProjectionError, list_projected_traits, read_projection
from utils.responses import ResponseError, scored_tokens
from utils.storage import add_write_flags, atomic_write, guard_outputs
from utils.viz import VizError, read_viz

ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_FILES = ("tokens.css", "report.css", "tokens.js", "report.js")
# Special-token strings when no tokenizer can be loaded: <s>, </s>, <|im_start|>, <bos>, <start_of_turn>, [CLS]
SPECIAL_PATTERN = re.compile(r"^(<\|?[/A-Za-z_][^<>\s]{0,40}\|?>|\[[A-Z]{2,10}\])$")


class ReportError(TraitError):
    """An input the report cannot be built from; the message names the file or flag."""


@dataclass(frozen=True)
class ReportOptions:
    experiment: str
    prompt_set: str
    model_variant: str | None = None
    traits: tuple[str, ...] | None = None
    compare: tuple[str, str] | None = None
    centered: bool = False                   # kept for old command lines: the baseline is the centre by default
    out: str | None = None
    precision: int = 4
    viz_suffix: str | None = None
    viz_top_k: int = 5
    progress: bool = True
    units: str = "baseline"                  # raw: colour centred on 0; baseline / z: on each vector's baseline
    overwrite: bool = False                  # replace an existing report (without it or skip_existing, refuse)
    skip_existing: bool = False              # keep an existing report and build nothing

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ReportOptions":
        traits = parse_traits(ns.traits)
        compare = None
        if ns.compare is not None:
            parts = [p.strip() for p in ns.compare.split(",")]
            if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
                raise ReportError(f"--compare {ns.compare!r}: give two different variants as A,B (B - A is shown)")
            compare = (parts[0], parts[1])
        return cls(ns.experiment, ns.prompt_set, ns.model_variant, traits, compare, ns.centered, ns.out,
                   ns.precision, ns.viz_suffix, ns.viz_top_k, progress=not ns.quiet, units=ns.units,
                   overwrite=ns.overwrite, skip_existing=ns.skip_existing)


@dataclass
class ReportPlan:
    opts: ReportOptions
    variant: str                              # whose tokens and scores (B with --compare)
    variant_a: str | None                     # A with --compare
    traits: list[str]
    prompt_ids: list[str]
    projections: dict[str, dict[str, Path]]   # trait -> prompt id -> projection JSON of `variant`
    projections_a: dict[str, dict[str, Path]] = field(default_factory=dict)
    diffs: dict[str, dict[str, Path]] = field(default_factory=dict)   # trait -> id -> per_token_diff JSON
    aggregates: dict[str, Path] = field(default_factory=dict)
    results: Path | None = None
    viz_dir: Path | None = None
    out: Path = Path()


@dataclass
class ReportSummary:
    path: str
    n_prompts: int
    n_tokens: int
    traits: list[str]
    bytes: int
    seconds: float
    warnings: list[str]
    kept: bool = False                       # --skip-existing kept the report that was there (nothing built)


# ---------------------------------------------------------------------------------------------------------
# Plan: every input checked, nothing written

def _json_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.glob("*.json") if not p.name.startswith(".") and p.stem != "aggregate"}


def _projections_of(exp: str, variant: str, prompt_set: str, traits: Sequence[str] | None,
                    flag: str) -> tuple[list[str], dict[str, dict[str, Path]]]:
    available = list_projected_traits(exp, variant, prompt_set)
    root = paths.inference_dir(exp, variant) / "projections"
    if not available:
        raise ReportError(
            f"no projections of variant {variant!r} for prompt set {prompt_set!r} (nothing under "
            f"{root}/*/*/{prompt_set.strip('/')}/); run: python inference/project_raw_activations_onto_traits.py "
            f"--experiment {exp} --prompt-set {prompt_set} --model-variant {variant}")
    unknown = [t for t in traits or [] if t not in available]
    if unknown:
        raise ReportError(f"{flag}: unknown trait {unknown[0]!r}: variant {variant!r} has projections of prompt set "
                          f"{prompt_set!r} for {', '.join(available)}")
    chosen = list(traits) if traits else available
    files = {t: _json_files(paths.projection_dir(exp, variant, t, prompt_set)) for t in chosen}
    empty = [t for t in chosen if not files[t]]
    if empty:
        raise ReportError(f"no projection files in {paths.projection_dir(exp, variant, empty[0], prompt_set)}")
    return chosen, files


def _check_same_tokens(exp: str, a: str, b: str, prompt_set: str, ids: Sequence[str]) -> None:
    for pid in ids:
        ta, tb = read_response_tokens(exp, a, prompt_set, pid), read_response_tokens(exp, b, prompt_set, pid)
        if ta.token_ids != tb.token_ids:
            raise ReportError(
                f"--compare {a},{b}: prompt {pid}: the variants scored different response tokens ({ta.source}: "
                f"{len(ta.token_ids)} ids, {tb.source}: {len(tb.token_ids)} ids); capture {a} on {b}'s responses: "
                f"python inference/capture_raw_activations.py --experiment {exp} --prompt-set {prompt_set} "
                f"--model-variant {a} --responses-from {b}")


def _plan_compare(opts: ReportOptions, plan: ReportPlan) -> None:
    exp, pset = opts.experiment, opts.prompt_set
    a, b = plan.variant_a, plan.variant
    _, plan.projections_a = _projections_of(exp, a, pset, plan.traits, "--compare")
    _check_same_tokens(exp, a, b, pset, [p for p in plan.prompt_ids if all(p in plan.projections_a[t]
                                                                            for t in plan.traits)])
    diff_root = paths.model_diff_dir(exp, a, b)
    for t in plan.traits:
        folder = diff_root / "per_token_diff" / t / pset.strip("/")
        plan.diffs[t] = _json_files(folder)
        if not plan.diffs[t] or not (folder / "aggregate.json").is_file():
            raise ReportError(
                f"--compare {a},{b}: no per_token_diff output for trait {t!r} in {folder}; run: python "
                f"analysis/model_diff/per_token_diff.py --experiment {exp} --variant-a {a} --variant-b {b} "
                f"--prompt-set {pset} --traits all")
        plan.aggregates[t] = folder / "aggregate.json"
    results = diff_root / pset.strip("/") / "results.json"
    plan.results = results if results.is_file() else None


def plan_report(opts: ReportOptions) -> ReportPlan:
    """Resolve variants, traits and every prompt's files; raise ReportError naming the first problem."""
    if not 2 <= opts.precision <= 17:
        raise ReportError(f"--precision {opts.precision}: give 2 to 17 significant digits")
    if opts.viz_top_k < 0:
        raise ReportError(f"--viz-top-k {opts.viz_top_k}: must be 0 (no attention / logit lens) or more")
    variant_a = None
    if opts.compare:
        if opts.model_variant:
            raise ReportError("--model-variant and --compare A,B: give one (with --compare the tokens are B's)")
        variant_a = resolve_variant(opts.experiment, opts.compare[0]).name
        variant = resolve_variant(opts.experiment, opts.compare[1]).name
    else:
        variant = resolve_variant(opts.experiment, opts.model_variant).name
    traits, files = _projections_of(opts.experiment, variant, opts.prompt_set, opts.traits, "--traits")
    ids = sorted({pid for t in traits for pid in files[t]}, key=paths.natural_key)
    out = Path(opts.out) if opts.out else paths.report_file(opts.experiment, opts.prompt_set, opts.compare)
    if out.exists() and out.is_dir():
        raise ReportError(f"--out {out}: is a folder; give a file name ending in .html")
    plan = ReportPlan(opts, variant, variant_a, traits, ids, files, out=out,
                      viz_dir=paths.per_token_dir(opts.experiment, paths.set_dir(opts.prompt_set, opts.viz_suffix)))
    if opts.compare:
        _plan_compare(opts, plan)
        plan.prompt_ids = sorted({pid for t in traits for pid in plan.diffs[t]}, key=paths.natural_key)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Reading one prompt

@dataclass
class PromptTokens:
    tokens: list[str]
    ids: list[int]
    prompt_end: int
    source: Path


def read_tokens(exp: str, variant: str, prompt_set: str, pid: str) -> PromptTokens:
    """All tokens the variant scored: its response JSON, else (captured with --responses-from) its raw .pt."""
    try:
        st = scored_tokens(exp, variant, prompt_set, pid, prefer="response")
    except ResponseError as e:
        raise ReportError(str(e)) from e
    if st.tokens is None:
        raise ReportError(f"{st.source}: 'tokens' must hold one string per token id ({len(st.token_ids)})")
    return PromptTokens(list(st.tokens), list(st.token_ids), st.prompt_end, st.source)


def read_entries(path: Path, n_prompt: int, n_response: int) -> tuple[dict, list[dict]]:
    """A projection JSON's metadata and vector entries (utils/projections.py), score counts checked against the tokens."""
    try:
        proj = read_projection(path, n_prompt, n_response)
    except ProjectionError as e:
        raise ReportError(str(e)) from e
    return dict(proj.metadata), [{**e.raw, "layer": e.layer, "method": e.method, "prompt": list(e.prompt),
                                  "response": list(e.response), "baseline": e.baseline} for e in proj.entries]


def _round(values: Sequence[float], digits: int) -> list[float]:
    return [float(f"{float(x):.{digits}g}") for x in values]


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------------------
# Views: what one trait can be coloured by (each projected vector; with --compare B - A, A and B)

def _vector_key(meta: dict, k: int, e: dict) -> tuple:
    vecs = meta.get("vectors") or []
    sha = vecs[k].get("sha256") if k < len(vecs) and isinstance(vecs[k], dict) else None
    return (e.get("layer"), e.get("method"), e.get("position") or meta.get("position"),
            e.get("component") or meta.get("component"), sha, bool(meta.get("centered")))


def _card_entry(meta: dict, e: dict) -> dict | None:
    """The vector card's row for this vector (utils/cards.py: held-out AUROC against random directions, recall at 1%
    false positives), when its vectors' experiment has a card here; None otherwise."""
    from utils import cards
    from utils.vectors import sanitize_position

    try:
        position = e.get("position") or meta["position"]
        entry = cards.card_layer_entry(meta["vectors_experiment"], meta["trait"], meta["extraction_variant"],
                                       sanitize_position(position), e.get("component") or meta["component"],
                                       e["method"], int(e["layer"]))
    except (KeyError, TypeError, ValueError):
        return None
    keys = ("auroc", "accuracy", "recall_at_fpr", "random_auroc_mean", "random_auroc_max", "sign_ok")
    return {k: entry.get(k) for k in keys} if entry else None


def _score_view(meta: dict, k: int, e: dict, variant: str, centered: bool, path: Path, prefix: str = "",
                units: str = "baseline") -> dict:
    """One view of a trait. The colour centre is the vector's baseline (its class midpoint: above it a token reads
    as the trait by the vector's own threshold); --units raw centres on 0 instead."""
    vecs = meta.get("vectors") or []
    vec = vecs[k] if k < len(vecs) and isinstance(vecs[k], dict) else {}
    baseline = e.get("baseline", vec.get("baseline"))
    ref = e.get("reference") if isinstance(e.get("reference"), dict) else vec.get("reference")
    spread = (ref or {}).get("spread") if isinstance(ref, dict) else None
    if meta.get("centered"):
        center, note = 0.0, "scores centered at projection (baseline subtracted): colour centred on the baseline"
    elif units == "raw" and not centered:
        center, note = 0.0, "colour centred on 0 (--units raw)"
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        center, note = float(baseline), f"colour centred on the vector's baseline {float(baseline):.4g}"
    elif centered:
        raise ReportError(f"--centered: {path}: the vector at layer {e.get('layer')} has no baseline")
    else:
        center, note = 0.0, "colour centred on 0 (the projection file records no baseline)"
    note += "; colour scale from the non-special tokens (BOS and chat-template tokens left out)"
    return {"kind": "score", "variant": variant, "label": f"{prefix}L{e.get('layer')} {e.get('method')}",
            "layer": e.get("layer"), "method": e.get("method"),
            "position": e.get("position") or meta.get("position"),
            "component": e.get("component") or meta.get("component"),
            "selection_source": e.get("selection_source") or vec.get("selection_source"),
            "explanation": vec.get("explanation"),     # why this vector, in plain words (utils.vectors)
            "card": _card_entry(meta, e),
            "baseline": baseline, "centered": bool(meta.get("centered")), "center": center, "note": note,
            "spread": spread, "reference": ref,
            "vector_path": vec.get("path"), "sha256": vec.get("sha256"),
            "extraction_variant": meta.get("extraction_variant"), "steering_variant": meta.get("steering_variant"),
            "source": str(path.parent)}


class _TraitViews:
    """The views of one trait, fixed by its first prompt; every later prompt must use the same vectors."""

    def __init__(self):
        self.views: list[dict] | None = None
        self.keys: list[tuple] | None = None
        self.first: Path | None = None
        self.abs_dev: list[array] = []

    def fix(self, views: list[dict], keys: list[tuple], path: Path) -> None:
        if self.views is None:
            self.views, self.keys, self.first = views, keys, path
            self.abs_dev = [array("d") for _ in views]
        elif keys != self.keys:
            raise ReportError(f"{path}: projected onto other vectors than {self.first} ({_describe(keys)} vs "
                              f"{_describe(self.keys)}); re-project the whole set")

    def add(self, k: int, values: Sequence[float], skip: frozenset[int] = frozenset()) -> None:
        """Deviations from the centre for the colour scale; `skip`: positions of special tokens (a BOS scoring
        -8432 on Gemma-3 would otherwise wash out every other token)."""
        c = self.views[k]["center"]
        self.abs_dev[k].extend(abs(float(v) - c) for i, v in enumerate(values) if i not in skip)

    def finish(self) -> list[dict]:
        for view, dev in zip(self.views, self.abs_dev):
            view["extent"] = _robust_extent(dev)
        return self.views


def _describe(keys: list[tuple]) -> str:
    return ", ".join(f"L{k[0]} {k[1]} {k[2]}" + (f" {k[4][:8]}" if k[4] else "") for k in keys)


def _robust_extent(dev: array) -> float:
    """The 99th percentile of |score - center|: a few outliers do not wash out every other token."""
    if not dev:
        return 1.0
    s = sorted(dev)
    e = s[min(len(s) - 1, int(0.99 * (len(s) - 1) + 0.5))]
    e = e if e > 0 else s[-1]
    return float(f"{e:.4g}") if e > 0 else 1.0


# ---------------------------------------------------------------------------------------------------------
# Build

def _special_ids(exp: str, variant: str) -> tuple[set[int] | None, str]:
    """The tokenizer's special token ids; None (match token strings instead) when no tokenizer loads here."""
    from utils.model import ModelLoadError, load_tokenizer

    try:
        tok = load_tokenizer(resolve_variant(exp, variant).model_path(exp))
    except (ModelLoadError, OSError, ValueError):
        return None, "special tokens by their text (<...>, <|...|>): the tokenizer could not be loaded here"
    ids = set(int(i) for i in tok.all_special_ids)
    ids |= {int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids, "special tokens from the tokenizer"


def _specials(toks: PromptTokens, ids: set[int] | None) -> list[int]:
    if ids is not None:
        return [i for i, t in enumerate(toks.ids) if t in ids]
    return [i for i, t in enumerate(toks.tokens) if SPECIAL_PATTERN.match(t)]


def _prompt_scores(plan: ReportPlan, pid: str, toks: PromptTokens, views: dict[str, _TraitViews],
                   specials: Sequence[int] = ()) -> tuple[list, list]:
    """Per trait: [[prompt scores, response scores] per view] (None when the trait lacks this prompt), and means.
    `specials`: token positions (prompt and response together) left out of the colour scale."""
    digits, n_p, n_r = plan.opts.precision, toks.prompt_end, len(toks.ids) - toks.prompt_end
    skip_p = frozenset(i for i in specials if i < n_p)
    skip_r = frozenset(i - n_p for i in specials if i >= n_p)
    scores, means, aggs = [], [], []
    for t in plan.traits:
        path = plan.projections[t].get(pid)
        if path is None:
            scores.append(None)
            means.append(None)
            aggs.append(None)
            continue
        meta, entries = read_entries(path, n_p, n_r)
        per_view = [(e.get("prompt") or [], e["response"]) for e in entries]
        if plan.opts.compare:
            per_view = _compare_views(plan, t, pid, toks, meta, entries, views[t], path)
        else:
            views[t].fix([_score_view(meta, k, e, plan.variant, plan.opts.centered, path, units=plan.opts.units)
                          for k, e in enumerate(entries)], [_vector_key(meta, k, e) for k, e in enumerate(entries)],
                         path)
        for k, (p, r) in enumerate(per_view):
            views[t].add(k, p, skip_p)
            views[t].add(k, r, skip_r)
        scores.append([[_round(p, digits), _round(r, digits)] for p, r in per_view])
        means.append([None if (m := _mean(r)) is None else float(f"{m:.{digits}g}") for _, r in per_view])
        aggs.append([_aggregates(r, view, digits) for (_, r), view in zip(per_view, views[t].views)])
    return scores, means, aggs


def _aggregates(response: Sequence[float], view: dict, digits: int) -> list:
    """[max, ema_max, frac_above] of the response scores for the sort menu; above the baseline (0 for B - A and
    for centered scores)."""
    thr = 0.0 if view["kind"] == "delta" or view.get("centered") else view.get("baseline")
    a = response_aggregates(response, thr if isinstance(thr, (int, float)) else None)
    return [None if a[k] is None else float(f"{a[k]:.{digits}g}") for k in ("max", "ema_max", "frac_above")]


def _compare_views(plan: ReportPlan, trait: str, pid: str, toks: PromptTokens, meta_b: dict, entries_b: list[dict],
                   tv: _TraitViews, path_b: Path) -> list[tuple[list, list]]:
    """B - A from per_token_diff, and A and B on the vector per_token_diff used."""
    dfile, afile = plan.diffs[trait].get(pid), plan.projections_a[trait].get(pid)
    if dfile is None or afile is None:
        raise ReportError(f"--compare: prompt {pid} of trait {trait!r} has projections of {plan.variant!r} but no "
                          f"{'per_token_diff file' if dfile is None else 'projection of ' + repr(plan.variant_a)}; "
                          f"rerun per_token_diff.py")
    try:
        d = read_per_token_diff(dfile)
    except CompareError as e:
        raise ReportError(str(e)) from e
    n_r = len(toks.ids) - toks.prompt_end
    if d.get("tokens") != toks.tokens[toks.prompt_end:] or len(d.get("per_token_delta") or []) != n_r:
        raise ReportError(f"{dfile}: its tokens are not {plan.variant!r}'s response tokens ({toks.source}); rerun "
                          f"per_token_diff.py")
    meta_a, entries_a = read_entries(afile, toks.prompt_end, n_r)

    def pick(meta, entries, path):
        for k, e in enumerate(entries):
            if e.get("layer") == d.get("layer") and e.get("method") == d.get("method"):
                return k, e
        raise ReportError(f"{path}: no vector at layer {d.get('layer')} ({d.get('method')}), the one {dfile} used")

    ka, ea = pick(meta_a, entries_a, afile)
    kb, eb = pick(meta_b, entries_b, path_b)
    a, b = plan.variant_a, plan.variant
    va = _score_view(meta_a, ka, ea, a, plan.opts.centered, afile, f"{a}: ", plan.opts.units)
    vb = _score_view(meta_b, kb, eb, b, plan.opts.centered, path_b, f"{b}: ", plan.opts.units)
    delta = {**vb, "kind": "delta", "label": f"{b} \u2212 {a}: L{d.get('layer')} {d.get('method')}", "center": 0.0,
             "note": f"per token, {b} minus {a} on identical tokens (per_token_diff)", "source": str(dfile.parent)}
    tv.fix([delta, va, vb], [("delta", d.get("layer"), d.get("method")), _vector_key(meta_a, ka, ea),
                             _vector_key(meta_b, kb, eb)], dfile)
    return [([], d["per_token_delta"]), (ea.get("prompt") or [], ea["response"]),
            (eb.get("prompt") or [], eb["response"])]


def _viz(plan: ReportPlan, pid: str, toks: PromptTokens, warnings: dict[str, int]) -> dict:
    """Logit-lens top-k and the top-k attended positions per layer, when extract_viz wrote them for this variant."""
    out: dict[str, Any] = {}
    k = plan.opts.viz_top_k
    if k == 0 or plan.viz_dir is None:
        return out
    for kind in ("logit_lens", "attention"):
        f = plan.viz_dir / f"{pid}_{kind}.json"
        if not f.is_file():
            continue
        try:
            d = read_viz(f, kind).data
        except VizError as e:
            raise ReportError(str(e)) from e
        if d.get("model_variant") not in (None, plan.variant) or len(d.get("tokens") or []) != len(toks.ids):
            warnings[f"{kind} files of another variant or other tokens, left out (give --viz-suffix)"] += 1
            continue
        layers = [int(x) for x in d.get("layers") or []]
        if kind == "logit_lens":
            out["lens"] = _lens_rows(d.get("predictions") or [], k)
        else:
            out["attn"] = {"layers": layers, "heads": d.get("heads"), "n_heads": d.get("n_heads"),
                           "rows": [_attended(a["by_layer"], layers, k) for a in d.get("attention") or []]}
    return out


def _lens_rows(predictions: list[dict], k: int) -> dict:
    """Per position: [actual_rank, [[token, prob], ...]] for each layer the lens was computed at."""
    kept = [e["layer"] for e in (predictions[0]["by_layer"] if predictions else []) if e.get("top_k")]
    rows = [[[e.get("actual_rank"), [[c["token"], float(f"{c['prob']:.3g}")] for c in e["top_k"][:k]]]
             for e in p["by_layer"] if e.get("top_k")] for p in predictions]
    return {"layers": kept, "rows": rows}


def _attended(by_layer: list, layers: list[int], k: int) -> list[list]:
    """The k most attended positions (mean over the stored heads) at each extracted layer.

    `by_layer` is either one entry per model layer (empty where not extracted) or one per entry of `layers`.
    """
    pairs = zip(layers, by_layer) if len(by_layer) == len(layers) else ((L, by_layer[L]) for L in layers)
    out = []
    for _, heads in pairs:
        if not heads:
            out.append([])
            continue
        mean = [math.fsum(h[j] for h in heads) / len(heads) for j in range(len(heads[0]))]
        top = sorted(range(len(mean)), key=lambda j: -mean[j])[:k]
        out.append([[j, float(f"{mean[j]:.3g}")] for j in top])
    return out


def _compare_block(plan: ReportPlan, digits: int) -> dict | None:
    if not plan.opts.compare:
        return None
    r4 = lambda x: None if x is None else float(f"{x:.{digits}g}")  # noqa: E731
    block: dict[str, Any] = {"a": plan.variant_a, "b": plan.variant, "effects": {}, "clauses": {},
                             "results": str(plan.results) if plan.results else None}
    res = {}
    if plan.results is not None:
        try:
            res = read_results(plan.results).get("traits") or {}
        except CompareError as e:
            raise ReportError(str(e)) from e
    for t in plan.traits:
        if t in res:
            e = res[t]
            block["effects"][t] = {
                "layers": e.get("layers") or [], "method": e.get("method"), "position": e.get("position"),
                **{k: [r4(x) for x in e.get(k) or []] for k in ("per_layer_effect_size", "per_layer_paired_effect_size",
                                                               "per_layer_cosine_sim", "per_layer_mean_projection_diff")},
                "peak_layer": e.get("peak_layer"), "peak_effect_size": r4(e.get("peak_effect_size")),
                "peak_paired_effect_size": r4(e.get("peak_paired_effect_size")),
                "headline_layer": e.get("headline_layer"), "headline_effect_size": r4(e.get("headline_effect_size")),
                "headline_paired_effect_size": r4(e.get("headline_paired_effect_size")),
                "headline_mean_projection_diff_z": r4(e.get("headline_mean_projection_diff_z")),
                "layers_searched": e.get("layers_searched", len(e.get("layers") or []))}
        try:
            agg = read_aggregate(plan.aggregates[t])
        except CompareError as e:
            raise ReportError(str(e)) from e
        clause = lambda c: {"id": str(c.get("prompt_id")), "text": c.get("text"), "range": c.get("token_range"),  # noqa: E731
                            "mean_delta": r4(c.get("mean_delta")), "n_tokens": c.get("n_tokens")}
        block["clauses"][t] = {"top": [clause(c) for c in agg.get("top_clauses_overall") or []],
                               "bottom": [clause(c) for c in agg.get("bottom_clauses_overall") or []],
                               "n_prompts": agg.get("n_prompts"), "layer": agg.get("layer"),
                               "top_pct": agg.get("top_pct"), "mean": r4(agg.get("mean_delta_across_prompts")),
                               "std": r4(agg.get("std_delta_across_prompts"))}
    return block


def build_data(plan: ReportPlan) -> tuple[dict, list[str]]:
    """Everything the page shows, read prompt by prompt; returns (data, warnings)."""
    from collections import Counter

    from tqdm.auto import tqdm

    opts = plan.opts
    special_ids, special_note = _special_ids(opts.experiment, plan.variant)
    views = {t: _TraitViews() for t in plan.traits}
    warn: Counter = Counter()
    prompts = []
    for pid in tqdm(plan.prompt_ids, desc="report", unit="prompt", file=sys.stderr, disable=not opts.progress):
        toks = read_tokens(opts.experiment, plan.variant, opts.prompt_set, pid)
        specials = _specials(toks, special_ids)
        scores, means, aggs = _prompt_scores(plan, pid, toks, views, specials)
        missing = [t for t, s in zip(plan.traits, scores) if s is None]
        if missing:
            warn[f"prompts without projections of some trait ({', '.join(missing)}), shown uncoloured there"] += 1
        rec = {"id": pid, "t": toks.tokens, "i": toks.ids, "e": toks.prompt_end, "sp": specials,
               "s": scores, "m": means, "g": aggs}
        rec.update(_viz(plan, pid, toks, warn))
        prompts.append(rec)
    data = {
        "title": f"{opts.experiment} / {opts.prompt_set}" + (f": {plan.variant_a} vs {plan.variant}" if opts.compare
                                                              else f" ({plan.variant})"),
        "experiment": opts.experiment, "prompt_set": opts.prompt_set, "variant": plan.variant,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"), "precision": opts.precision,
        "special_note": special_note,
        "traits": [{"name": t, "views": views[t].finish()} for t in plan.traits],
        "compare": _compare_block(plan, opts.precision),
        "prompts": prompts,
        "top_spans": _top_spans_link(plan),
    }
    return data, [f"{n} {msg}" for msg, n in warn.items()]


def _top_spans_link(plan: ReportPlan) -> str | None:
    """The relative link to analysis/spans.py's page, when it exists (it links back to each set's report)."""
    import os

    page = paths.experiment_dir(plan.opts.experiment) / "analysis" / "report" / "top_spans.html"
    return Path(os.path.relpath(page, plan.out.parent)).as_posix() if page.is_file() else None


def _script_safe(text: str) -> str:
    """JSON inside <script>: '<' as \\u003c, so no string can close the element or open a comment."""
    return text.replace("<", "\\u003c")


def render_html(data: dict) -> str:
    assets = {name: (ASSETS / name).read_text(encoding="utf-8") for name in ASSET_FILES}
    for name in ("tokens.js", "report.js"):
        if "</script" in assets[name].lower():
            raise RuntimeError(f"{ASSETS / name} contains '</script', which would end the inlined script")
    payload = _script_safe(json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
    title = html.escape(data["title"])
    # The CSP forbids every fetch: a report never reaches the network, whatever its data holds.
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\n"
        f"<style>\n{assets['tokens.css']}\n{assets['report.css']}\n</style></head>\n"
        f"<body><noscript>This report needs JavaScript.</noscript><div id=\"app\"></div>\n"
        f"<script type=\"application/json\" id=\"report-data\">{payload}</script>\n"
        f"<script>\n{assets['tokens.js']}\n</script>\n<script>\n{assets['report.js']}\n</script>\n</body></html>\n")


def write_report(path: Path, text: str) -> int:
    data = text.encode("utf-8")
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def report(opts: ReportOptions | None = None, **kwargs) -> ReportSummary:
    """The stage: plan (checks), build (reads), one atomic write. Keyword arguments build the options."""
    opts = opts or ReportOptions(**kwargs)
    t0 = time.perf_counter()
    plan = plan_report(opts)
    if guard_outputs([plan.out], overwrite=opts.overwrite, skip_existing=opts.skip_existing) and opts.skip_existing:
        return ReportSummary(str(plan.out), 0, 0, plan.traits, plan.out.stat().st_size, time.perf_counter() - t0,
                             [], kept=True)
    data, warnings = build_data(plan)
    n_bytes = write_report(plan.out, render_html(data))
    return ReportSummary(str(plan.out), len(data["prompts"]), sum(len(p["t"]) for p in data["prompts"]),
                         plan.traits, n_bytes, time.perf_counter() - t0, warnings)


# ---------------------------------------------------------------------------------------------------------
# CLI

def format_summary(s: ReportSummary) -> str:
    if s.kept:
        return f"report: {s.path} exists, kept (--skip-existing; --overwrite rebuilds it)"
    lines = [f"warning: {w}" for w in s.warnings]
    lines.append(f"report: {s.n_prompts} prompts, {s.n_tokens} tokens, {len(s.traits)} trait(s), "
                 f"{s.bytes / 1e6:.2f} MB in {s.seconds:.1f}s -> {s.path}")
    return "\n".join(lines)


EPILOG = """\
examples:
  python analysis/report.py --experiment demo --prompt-set single_trait --model-variant lora
  python analysis/report.py --experiment demo --prompt-set single_trait --compare instruct,lora --overwrite
  python analysis/report.py --experiment demo --prompt-set harmful --traits demo/refusal --units raw \\
      --out /tmp/refusal.html --overwrite

Open the file in any browser (it makes no network request). Writes analysis/report/{set}.html, or
{set}_{A}_vs_{B}.html with --compare (B - A per token from per_token_diff.py, its top clauses, and the
effect sizes of compare_variants.py's results.json). An existing report is replaced only with --overwrite
(--skip-existing keeps it).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="report.py", epilog=EPILOG,
                   description="One self-contained HTML report of per-token trait scores: every prompt's tokens "
                               "coloured by score (trait and layer pickers), a per-set plot of mean response "
                               "scores, the vectors used, and with --compare the model diff.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--prompt-set", required=True, help="the projected set (nested names allowed)")
    p.add_argument("--model-variant", default=None, help="whose projections (default: defaults.application)")
    add_traits_flag(p, help_default="every projected trait")
    p.add_argument("--compare", default=None, metavar="A,B",
                   help="model diff: B - A per token (per_token_diff.py output), top clauses, effect sizes")
    p.add_argument("--centered", action="store_true",
                   help="centre the colour scale on each vector's baseline (the default unless --units raw; kept for "
                        "old command lines)")
    p.add_argument("--units", choices=("raw", "baseline", "z"), default="baseline",
                   help="colour centre: each vector's baseline (baseline, z; the default: baseline) or 0 (raw); the "
                        "scale always leaves special tokens out")
    p.add_argument("--out", default=None, help="output file (default experiments/{exp}/analysis/report/{set}.html)")
    p.add_argument("--precision", type=int, default=4, help="significant digits of every score (default 4)")
    p.add_argument("--viz-suffix", default=None,
                   help="read extract_viz files from analysis/per_token/{set}_{S}/ (its --output-suffix)")
    p.add_argument("--viz-top-k", type=int, default=5,
                   help="logit-lens predictions and attended tokens kept per layer (default 5; 0: leave them out)")
    add_write_flags(p, "the report file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: report(ReportOptions.from_args(a)), format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
