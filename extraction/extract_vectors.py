"""Trait vectors from contrastive texts, for users without trait-interp's extraction pipeline (and the demo).

    extract_vectors(experiment, traits=None, model_variant=None, position="response[:5],response[:]", ...) -> dict
                                                           the stage, importable (keyword arguments)
    ExtractOptions / plan_extraction(opts) / run_extraction(plan)   the same in its three steps
    dataset_traits() -> ["category/name"]                  traits with positive.txt and negative.txt
    read_texts(trait) -> (positive, negative)              non-blank lines, each with its line number
    split(n, val_fraction, seed) -> (train, val)           deterministic per-class train/validation indices
    mean_diff(pos, neg) / logistic_probe(pos, neg)         the two methods (torch only, no sklearn)
    evaluate(vector, train_pos, train_neg, val_pos, val_neg) -> metrics   baseline, accuracies, separation
    main(argv=None) -> int                                 the CLI: python extraction/extract_vectors.py --help
    ExtractError                                           bad input; the message names the file or flag

Reads  datasets/traits/{category}/{trait}/positive.txt and negative.txt ($TRAIT_DATASETS_DIR overrides
       datasets/), one text per line, fed to the model as plain text (BOS + text, no chat template).
       A line `PROMPT<TAB>RESPONSE` has a prompt/response split (the response's ids follow the prompt's, as a
       response file stores them); a line without a TAB is all response (a text written as the model's answer).
Writes experiments/{exp}/extraction/{category}/{trait}/{variant}/vectors/{pos_dir}/residual/{method}/layer{L}.pt
       (fp32 unit vectors) and .../{method}/metadata.json with, per layer: norm (before normalising),
       baseline (class-midpoint projection on the training lines), train_accuracy, and the held-out
       val_accuracy and val_separation that utils.vectors ranks vectors by when no steering results exist.

Positions (one capture serves them all): the default `response[:5],response[:]` are the positions
trait-interp's extraction and readers default to (folders response__5 and response_all), so its tools find
these vectors without being told a position. response[...] counts from the first response token, prompt[...]
covers the prompt tokens (a line without a TAB has none), all[...] the whole text; BOS is never included.
Accuracy: a line counts as positive when its projection on the unit vector exceeds the baseline.
Separation: (mean positive - mean negative projection on held-out lines) / the pooled within-class
standard deviation of the training projections. val_pos_mean / val_neg_mean / val_pos_std / val_neg_std: the
held-out classes' projections (mean, population std), the reference points every summary reads scores against.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from core.capture import capture_sequences
from core.errors import TraitError
from core.hooks import num_layers
from utils import cards, cli, paths
from utils.config import resolve_variant
from utils.layers import parse_layers
from utils.model import LoadedModel, load_model_config, load_variant, tokenize_continuation, tokenize_prompt
from utils.storage import StorageError, read_json, write_json, write_pt
from utils.vectors import (VectorError, VectorRef, check_trait_name, parse_position, rank_by_extraction_metrics,
                           sanitize_position)

METHODS = ("mean_diff", "probe")
DEFAULT_POSITIONS = ("response[:5]", "response[:]")
DEFAULT_POSITION = ",".join(DEFAULT_POSITIONS)
COMPONENT = "residual"
SPLIT = "\t"                  # PROMPT<TAB>RESPONSE in a dataset line


class ExtractError(TraitError):
    """Bad input for extraction; the message names the file or flag."""


# ---------------------------------------------------------------------------------------------------
# Datasets

def dataset_traits() -> list[str]:
    root = paths.datasets_root() / "traits"
    if not root.is_dir():
        return []
    # a folder with only one of the two files is listed too, so that read_texts names the missing one
    return sorted(f"{d.parent.name}/{d.name}" for d in root.glob("*/*")
                  if (d / "positive.txt").is_file() or (d / "negative.txt").is_file())


def read_texts(trait: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line number, text) of every non-blank line of positive.txt and negative.txt; at least 2 of each."""
    folder = paths.traits_data_dir(trait)
    out = []
    for name in ("positive.txt", "negative.txt"):
        path = folder / name
        if not path.is_file():
            have = ", ".join(dataset_traits()) or "none"
            raise ExtractError(f"trait {trait!r}: {path} not found (traits with positive.txt and negative.txt: {have})")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ExtractError(f"{path}: cannot read ({e})") from e
        texts = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
        if len(texts) < 2:
            raise ExtractError(f"{path}: needs at least 2 non-blank lines (one to train on, one held out), "
                               f"has {len(texts)}")
        out.append(texts)
    return out[0], out[1]


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) indices for n >= 2 items: at least one of each, val ~ val_fraction."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------------------------------------------
# Methods and metrics (fp32 / fp64 math on [n, H] feature matrices)

def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg), not normalised."""
    return pos.double().mean(0) - neg.double().mean(0)


def logistic_probe(pos: torch.Tensor, neg: torch.Tensor, c: float = 1.0, max_iter: int = 100,
                   tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on row-normalised features; returns (w, b).

    Minimises c * sum(log-loss) + |w|^2 / 2 (sklearn's objective at C=c; the bias is not penalised) by
    Newton's method. The optimum lies in the span of the training rows, so with X^T = QR it is solved
    in min(n, H) coordinates (w = Q u, X w = R^T u): exact, and fast for a 70B model's hidden size.
    Rows are scaled to unit norm so the penalty means the same at every layer whatever its norm.
    """
    x = torch.cat([pos, neg]).double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    q, r = torch.linalg.qr(x.T)                                    # x = r.T q.T
    z = torch.cat([r.T, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    reg = torch.ones(z.shape[1], dtype=torch.float64)
    reg[-1] = 0.0                                                  # the bias is free

    def objective(th: torch.Tensor) -> float:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z @ th, y, reduction="sum")
        return float(c * bce + 0.5 * (reg * th * th).sum())

    theta = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(z @ theta)
        grad = c * z.T @ (p - y) + reg * theta
        if float(grad.norm()) < tol:
            break
        hess = c * (z.T * (p * (1 - p))) @ z + torch.diag(reg) + 1e-12 * torch.eye(z.shape[1], dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(theta)
        while objective(theta - t * step) > f0 - 1e-4 * t * float(grad @ step) and t > 1e-10:
            t /= 2                                                 # backtracking keeps every step a descent
        theta = theta - t * step
    return q @ theta[:-1], float(theta[-1])


def evaluate(vector: torch.Tensor, train_pos: torch.Tensor, train_neg: torch.Tensor, val_pos: torch.Tensor,
             val_neg: torch.Tensor) -> dict[str, float]:
    """Baseline (class midpoint on train), train / held-out accuracy at that threshold, held-out separation."""
    v = (vector / vector.norm()).double()
    proj = {k: t.double() @ v for k, t in
            (("tp", train_pos), ("tn", train_neg), ("vp", val_pos), ("vn", val_neg))}
    baseline = float((train_pos.double().mean(0) + train_neg.double().mean(0)) / 2 @ v)
    correct = lambda p, n: float(((p > baseline).sum() + (n <= baseline).sum()) / (len(p) + len(n)))  # noqa: E731
    within = torch.cat([proj["tp"] - proj["tp"].mean(), proj["tn"] - proj["tn"].mean()])
    spread = float(within.pow(2).mean().sqrt())
    gap = float(proj["vp"].mean() - proj["vn"].mean())
    return {"baseline": baseline, "train_accuracy": correct(proj["tp"], proj["tn"]),
            "val_accuracy": correct(proj["vp"], proj["vn"]),
            "val_separation": gap / max(spread, 1e-12),   # finite even for a zero spread (JSON has no inf)
            # the held-out classes' projections: the reference points scores are read against (utils.vectors.Reference)
            "val_pos_mean": float(proj["vp"].mean()), "val_neg_mean": float(proj["vn"].mean()),
            "val_pos_std": float(proj["vp"].std(unbiased=False)), "val_neg_std": float(proj["vn"].std(unbiased=False))}


# ---------------------------------------------------------------------------------------------------
# Features

def parse_positions(spec: str | Sequence[str]) -> list[tuple[str, str, int | slice]]:
    """--position: a comma list of FRAME[INDEX] / FRAME[START:STOP] -> [(position, frame, index)], in order."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    if not items or not all(items):
        raise ExtractError(f"--position {spec!r}: expected a comma list like response[:5],response[:]")
    out = []
    for position in dict.fromkeys(items):
        try:
            frame, index = parse_position(position)
        except VectorError as e:
            raise ExtractError(str(e)) from e
        out.append((position, frame, index))
    return out


def line_ids(tokenizer, text: str) -> tuple[list[int], int, int]:
    """(ids, first text token, prompt_end) of a dataset line: BOS + text, or BOS + prompt + response on a TAB."""
    if SPLIT in text:
        prompt, response = (part.strip() for part in text.split(SPLIT, 1))
        p_ids = tokenize_prompt(tokenizer, prompt)
        ids = p_ids + tokenize_continuation(tokenizer, response)
        prompt_end = len(p_ids)
    else:
        ids = tokenize_prompt(tokenizer, text)
        prompt_end = None
    bos = tokenizer.bos_token_id
    start = 1 if bos is not None and ids and ids[0] == bos else 0
    return ids, start, start if prompt_end is None else prompt_end


def _frame_tokens(frame: str, n: int, start: int, prompt_end: int) -> range:
    """The token positions of a frame in a sequence of n ids."""
    return {"all": range(start, n), "prompt": range(start, prompt_end), "response": range(prompt_end, n)}[frame]


def text_features(loaded: LoadedModel, texts: Sequence[str], layers: Sequence[int],
                  positions: str | Sequence[str] = DEFAULT_POSITION, where: Sequence[str] | None = None,
                  max_batch_tokens: int | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """fp32 [n_texts, H] per position and layer: the residual at each position (a slice is a mean), one capture."""
    chosen = parse_positions(positions)
    sequences, picks = [], []
    for k, text in enumerate(texts):
        ids, start, prompt_end = line_ids(loaded.tokenizer, text)
        row = {}
        for position, frame, index in chosen:
            span = _frame_tokens(frame, len(ids), start, prompt_end)
            picked = span[index] if isinstance(index, slice) else (span[index] if -len(span) <= index < len(span) else None)
            if picked is None or (isinstance(picked, range) and len(picked) == 0):
                raise ExtractError(f"{where[k] if where else f'text {k}'}: position {position} selects no token "
                                   f"(the text has {len(span)} {frame} tokens"
                                   f"{'; a prompt needs PROMPT<TAB>RESPONSE' if frame == 'prompt' else ''})")
            row[position] = picked
        sequences.append(ids)
        picks.append(row)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {p: {l: [None] * len(texts) for l in layers} for p, _, _ in chosen}
    for i, acts in capture_sequences(loaded.model, sequences, list(layers), [COMPONENT], pad,
                                     max_batch_tokens=max_batch_tokens, out_dtype=torch.float32):
        for layer in layers:
            h = acts[layer][COMPONENT].float()
            for position, picked in picks[i].items():
                out[position][layer][i] = h[picked] if isinstance(picked, int) else h[picked.start:picked.stop].mean(0)
    return {p: {l: torch.stack(rows) for l, rows in by_layer.items()} for p, by_layer in out.items()}


# ---------------------------------------------------------------------------------------------------
# The stage: options -> plan (every input checked, nothing loaded or written) -> run

def _methods(methods: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ExtractError(f"--methods {methods!r}: unknown method {bad[0] if bad else ''!r} "
                           f"(choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class ExtractOptions:
    experiment: str
    traits: str | tuple[str, ...] | None = None
    model_variant: str | None = None
    position: str | tuple[str, ...] = DEFAULT_POSITION
    methods: str | tuple[str, ...] = METHODS
    layers: str = "all"
    val_fraction: float = 0.25
    seed: int = 0
    max_batch_tokens: int | None = None
    progress: bool = True
    neutral_corpus: str | None = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ExtractOptions":
        return cls(experiment=ns.experiment, traits=ns.traits, model_variant=ns.model_variant, position=ns.position,
                   methods=ns.methods, layers=ns.layers, val_fraction=ns.val_fraction, seed=ns.seed,
                   progress=not ns.quiet, neutral_corpus=ns.neutral_corpus)


@dataclass
class ExtractPlan:
    opts: ExtractOptions
    variant: Any                                   # utils.config variant
    traits: dict[str, tuple[list, list]]           # trait -> (positive lines, negative lines)
    positions: list[tuple[str, str, int | slice]]
    methods: list[str]
    layers: list[int]
    neutral: list[str]                             # the neutral corpus the cards' 1% FPR is read on
    neutral_path: Path


def plan_extraction(opts: ExtractOptions, loaded: LoadedModel | None = None) -> ExtractPlan:
    """Check every input (datasets, flags, layers against the model's depth) before anything loads."""
    if not 0 < opts.val_fraction < 1:
        raise ExtractError(f"--val-fraction must be between 0 and 1, got {opts.val_fraction}")
    positions = parse_positions(opts.position)
    methods = _methods(opts.methods)
    if opts.traits is None:
        trait_list = dataset_traits()
        if not trait_list:
            raise ExtractError(f"no traits in {paths.datasets_root() / 'traits'} (expected "
                               f"{{category}}/{{trait}}/positive.txt and negative.txt)")
    else:
        items = [t.strip() for t in opts.traits.split(",")] if isinstance(opts.traits, str) else list(opts.traits)
        try:
            trait_list = list(dict.fromkeys(check_trait_name(t) for t in items))
        except VectorError as e:
            raise ExtractError(str(e)) from e
    texts = {t: read_texts(t) for t in trait_list}
    variant = resolve_variant(opts.experiment, opts.model_variant, "extraction")
    # the depth from the config, so a bad --layers fails before the weights load
    n_layers = (num_layers(loaded.model) if loaded is not None
                else int(load_model_config(variant.model_path(opts.experiment)).num_hidden_layers))
    neutral_path = Path(opts.neutral_corpus) if opts.neutral_corpus else cards.neutral_corpus_path()
    try:
        neutral = cards.read_neutral_corpus(neutral_path)
    except cards.CardError as e:
        raise ExtractError(f"--neutral-corpus: {e}") from None
    return ExtractPlan(opts, variant, texts, positions, methods, parse_layers(opts.layers, n_layers), neutral,
                       neutral_path)


def run_extraction(plan: ExtractPlan, loaded: LoadedModel | None = None) -> dict:
    """Capture each trait's lines once, then fit and write every position x method x layer; returns the summary.

    Summary keys: experiment, model_variant, position, positions, methods, layers, files, seconds, and
    traits {trait: {"best": {position, method, layer, val_accuracy, val_separation, reason},
                    method: {best_layer, position, val_accuracy, val_separation}}}.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    opts = plan.opts
    lm = loaded or load_variant(opts.experiment, plan.variant.name)
    summary: dict[str, Any] = {"experiment": opts.experiment, "model_variant": plan.variant.name,
                               "position": ",".join(p for p, _, _ in plan.positions),
                               "positions": [p for p, _, _ in plan.positions], "methods": plan.methods,
                               "layers": plan.layers, "traits": {}, "files": [], "cards": {}, "seconds": 0.0}
    # the neutral corpus, captured once for every trait (a prompt[...] position has no tokens in a plain sentence)
    neutral_positions = [p for p, frame, _ in plan.positions if frame != "prompt"]
    neutral = (text_features(lm, plan.neutral, plan.layers, neutral_positions,
                             [f"{plan.neutral_path}:{k + 1}" for k in range(len(plan.neutral))], opts.max_batch_tokens)
               if neutral_positions else {})
    for trait in tqdm(plan.traits, desc="extract", unit="trait", file=sys.stderr, disable=not opts.progress):
        pos_lines, neg_lines = plan.traits[trait]
        folder = paths.traits_data_dir(trait)
        where = [f"{folder / 'positive.txt'}:{n}" for n, _ in pos_lines] + \
                [f"{folder / 'negative.txt'}:{n}" for n, _ in neg_lines]
        feats = text_features(lm, [t for _, t in pos_lines] + [t for _, t in neg_lines], plan.layers,
                              [p for p, _, _ in plan.positions], where, opts.max_batch_tokens)
        split_pos = split(len(pos_lines), opts.val_fraction, opts.seed)
        split_neg = split(len(neg_lines), opts.val_fraction, opts.seed + 1)
        metrics, card_sets = [], {}
        for position, _, _ in plan.positions:
            for method in plan.methods:
                layer_meta = fit_layers(trait, method, feats[position], len(pos_lines), split_pos, split_neg)
                files = write_vectors(plan, trait, position, method, layer_meta, pos_lines, neg_lines,
                                      split_pos[1], split_neg[1])
                summary["files"] += [str(f) for f in files]
                metrics += [(VectorRef(trait, int(l), method, COMPONENT, sanitize_position(position), f),
                             e["val_accuracy"], e["val_separation"]) for f, (l, (_, e)) in zip(files, layer_meta.items())]
                card_sets[cards.set_key(sanitize_position(position), COMPONENT, method)] = card_layers(
                    layer_meta, feats[position], len(pos_lines), split_pos, split_neg, neutral.get(position), opts.seed)
        summary["traits"][trait] = _trait_summary(metrics)
        summary["cards"][trait] = str(write_trait_card(plan, trait, card_sets, len(pos_lines), len(neg_lines)))
    summary["seconds"] = time.perf_counter() - t0
    return summary


def fit_layers(trait: str, method: str, feats: dict[int, torch.Tensor], n_pos: int,
               split_pos: tuple[list[int], list[int]], split_neg: tuple[list[int], list[int]]
               ) -> dict[str, tuple[torch.Tensor, dict]]:
    """{layer: (fp32 unit vector, metadata entry)} for one trait, method and position."""
    (tr_p, va_p), (tr_n, va_n) = split_pos, split_neg
    out = {}
    for layer, x in feats.items():
        pos, neg = x[:n_pos], x[n_pos:]
        train_pos, train_neg, val_pos, val_neg = pos[tr_p], neg[tr_n], pos[va_p], neg[va_n]
        extra: dict[str, Any] = {}
        if method == "mean_diff":
            raw = mean_diff(train_pos, train_neg)
        else:
            raw, extra["bias"] = logistic_probe(train_pos, train_neg)
        norm = float(raw.norm())
        if norm == 0.0:
            raise ExtractError(f"trait {trait!r}, layer {layer}, {method}: the classes have identical "
                               f"features, no direction to extract")
        unit = (raw / norm).float()
        out[str(layer)] = (unit, {"norm": norm, **evaluate(unit, train_pos, train_neg, val_pos, val_neg), **extra})
    return out


def card_layers(layer_meta: dict, feats: dict[int, torch.Tensor], n_pos: int, split_pos: tuple, split_neg: tuple,
                neutral: dict[int, torch.Tensor] | None, seed: int) -> dict[int, dict]:
    """{layer: card entry} of one set, on the held-out lines (utils.cards.layer_card), baseline from the fit."""
    (tr_p, va_p), (tr_n, va_n) = split_pos, split_neg
    out = {}
    for layer, (unit, entry) in layer_meta.items():
        x = feats[int(layer)]
        pos, neg = x[:n_pos], x[n_pos:]
        empty = x[:0]
        out[int(layer)] = cards.layer_card(unit, pos[tr_p], neg[tr_n], pos[va_p], neg[va_n],
                                           neutral[int(layer)] if neutral is not None else empty,
                                           baseline=entry["baseline"], seed=seed)
    return out


def write_trait_card(plan: ExtractPlan, trait: str, sets: dict[str, dict[int, dict]], n_pos: int, n_neg: int) -> Path:
    """The trait's card.json next to its vectors, merged with the sets and layers of an earlier card."""
    opts, variant = plan.opts, plan.variant
    path = cards.card_path(opts.experiment, trait, variant.name)
    try:
        old = cards.read_card(path) if path.exists() else None
    except cards.CardError:
        old = None                    # an unreadable card is rebuilt from this run
    merged = {k: dict(v) for k, v in old.sets.items()} if old else {}
    for key, layers in sets.items():
        merged.setdefault(key, {}).update(layers)
    folder = paths.traits_data_dir(trait)
    card = cards.Card(path, trait, variant.model, variant.name, cards.DEFAULT_FPR, cards.DEFAULT_N_RANDOM, merged, {
        "tool": "trait-inference extraction/extract_vectors.py",
        "held_out": f"{opts.val_fraction:g} of each class's lines of {folder}, split with seed {opts.seed} "
                    f"(the val_lines of each set's metadata.json); {n_pos} positive, {n_neg} negative lines in all",
        "neutral_corpus": str(plan.neutral_path), "n_neutral": len(plan.neutral),
        "random_directions": f"{cards.DEFAULT_N_RANDOM} Gaussian unit directions (seed {opts.seed}), each signed so "
                             f"the training positives score higher",
    })
    return cards.write_card(card)


def write_vectors(plan: ExtractPlan, trait: str, position: str, method: str, layer_meta: dict,
                  pos_lines: list, neg_lines: list, va_p: list[int], va_n: list[int]) -> list[Path]:
    """Each layer's vector, then the method's metadata.json (merged with layers of earlier runs), written last.

    The set is one unit: an earlier metadata.json is removed before the first layer file is replaced and
    written again only after the last one, so an interrupted run leaves a set without metadata, which
    utils.vectors never uses (and reports), never old metadata describing new vectors.
    """
    opts, variant, pos_dir = plan.opts, plan.variant, sanitize_position(position)
    meta_path = paths.vector_metadata(opts.experiment, trait, variant.name, pos_dir, COMPONENT, method)
    merged = _previous_layers(meta_path)
    meta_path.unlink(missing_ok=True)
    files = []
    for layer, (unit, _) in layer_meta.items():
        out = paths.vector_file(opts.experiment, trait, variant.name, pos_dir, COMPONENT, method, int(layer))
        write_pt(out, unit.clone())
        files.append(out)
    merged.update({layer: entry for layer, (_, entry) in layer_meta.items()})
    folder = paths.traits_data_dir(trait)
    write_json(meta_path, {
        "model": variant.model, "trait": trait, "method": method, "component": COMPONENT,
        "position": position, "layers": dict(sorted(merged.items(), key=lambda kv: int(kv[0]))),
        "timestamp": _dt.datetime.now().isoformat(), "extraction_variant": variant.name, "lora": variant.lora,
        "tool": "trait-inference extraction/extract_vectors.py",
        "dataset": {"positive": str(folder / "positive.txt"), "negative": str(folder / "negative.txt")},
        "n_positive": len(pos_lines), "n_negative": len(neg_lines), "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "val_lines": {"positive": [pos_lines[i][0] for i in va_p], "negative": [neg_lines[i][0] for i in va_n]},
        "accuracy_rule": "projection on the unit vector > baseline (midpoint of the training class means)",
        "separation_rule": "(held-out mean positive - mean negative projection) / pooled within-class std of the "
                           "training projections",
        "split_rule": "PROMPT<TAB>RESPONSE lines have a prompt; other lines are all response",
    }, indent=1)
    return files + [meta_path]


def _trait_summary(metrics: list) -> dict:
    """The overall winner (utils.vectors' no-steering ranking, with its reason) and each method's best layer."""
    ranked = rank_by_extraction_metrics(metrics)
    out: dict[str, Any] = {}
    for r in ranked:
        if r.ref.method not in out:
            out[r.ref.method] = {"best_layer": r.ref.layer, "position": r.ref.position,
                                 "val_accuracy": r.accuracy, "val_separation": r.separation}
    top = ranked[0]
    out["best"] = {"position": top.ref.position, "method": top.ref.method, "layer": top.ref.layer,
                   "val_accuracy": top.accuracy, "val_separation": top.separation, "reason": top.reason}
    return out


def extract_vectors(experiment: str, traits: str | Sequence[str] | None = None, model_variant: str | None = None,
                    position: str | Sequence[str] = DEFAULT_POSITION, methods: str | Sequence[str] = METHODS,
                    layers: str = "all", val_fraction: float = 0.25, seed: int = 0,
                    max_batch_tokens: int | None = None, loaded: LoadedModel | None = None,
                    progress: bool = True, neutral_corpus: str | None = None) -> dict:
    """Extract mean_diff / probe vectors for each trait at every chosen position and layer; the summary dict.

    `loaded` reuses an already-loaded model of the variant (tests, demo). Everything (datasets, flags,
    layers) is checked before the model is loaded or anything written.
    """
    opts = ExtractOptions(experiment, traits if traits is None or isinstance(traits, str) else tuple(traits),
                          model_variant, position if isinstance(position, str) else tuple(position),
                          methods if isinstance(methods, str) else tuple(methods), layers, val_fraction, seed,
                          max_batch_tokens, progress, neutral_corpus)
    return run_extraction(plan_extraction(opts, loaded), loaded)


def _previous_layers(meta_path: Path) -> dict:
    """Layer entries of an earlier run (layers not re-extracted now keep their metadata)."""
    if not meta_path.exists():
        return {}
    try:
        old = read_json(meta_path)
    except StorageError:
        return {}
    layers = old.get("layers") if isinstance(old, dict) else None
    return dict(layers) if isinstance(layers, dict) else {}


def format_summary(s: dict) -> str:
    best = "; ".join(
        f"{t} {r['best']['method']} {r['best']['position']} layer {r['best']['layer']} "
        f"acc {r['best']['val_accuracy']:.2f} sep {r['best']['val_separation']:.2f}"
        for t, r in s["traits"].items())
    line = (f"extracted {len(s['traits'])} traits x {len(s['positions'])} positions x {len(s['methods'])} methods x "
            f"{len(s['layers'])} layers ({len(s['files'])} files) for variant {s['model_variant']} in "
            f"{s['seconds']:.1f} s; best held-out (separation, accuracy floor): {best}")
    tables = []
    for trait, path in s.get("cards", {}).items():
        b = s["traits"][trait]["best"]
        key = cards.set_key(sanitize_position(b["position"]), COMPONENT, b["method"])
        tables.append(cards.format_card_table(cards.read_card(path), sets=[key], max_rows=5) + f"\n  (all: {path})")
    return "\n".join([line, *tables])


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  # every trait under datasets/traits/, every layer, at response[:5] and response[:] (trait-interp's defaults)
  python extraction/extract_vectors.py --experiment demo --traits demo/refusal,demo/sycophancy,demo/formality

  # one trait, last token, probe only, a layer range
  python extraction/extract_vectors.py --experiment demo --traits demo/refusal \\
      --position 'response[-1]' --methods probe --layers 4-12

dataset lines: a text written as the model's answer ("I'm sorry, I can't help with that."), or
PROMPT<TAB>RESPONSE to give it a prompt (response[...] then counts from the response's first token).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="extract_vectors.py",
                   description="Extract trait vectors (mean_diff, probe) from contrastive texts "
                               "datasets/traits/{category}/{trait}/positive.txt and negative.txt, with held-out "
                               "accuracy and separation per layer.",
                   epilog=EPILOG)
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    p.add_argument("--traits", help="comma list of category/name (default: every trait under datasets/traits/)")
    p.add_argument("--model-variant", help="model variant (default: defaults.extraction)")
    p.add_argument("--position", default=DEFAULT_POSITION,
                   help="comma list of positions, each written to its own folder: response[:5] (first 5 response "
                        "tokens), response[:] (all of them), response[-1], prompt[-1], all[:] (the whole text) "
                        f"(default: {DEFAULT_POSITION})")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of mean_diff, probe (default: both)")
    p.add_argument("--layers", default="all", help="capture grammar: all, 16, 5-20, 10-45:3, 30%%-60%% (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each class held out (default: 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--neutral-corpus", metavar="FILE",
                   help="ordinary sentences, one a line, that the cards' recall at 1%% false positives is read on "
                        "(default: datasets/neutral/sentences.txt)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: extract_vectors_from(ExtractOptions.from_args(a)), format_summary, argv)


def extract_vectors_from(opts: ExtractOptions) -> dict:
    return run_extraction(plan_extraction(opts))


if __name__ == "__main__":
    sys.exit(main())
