"""Steering evidence for trait vectors: a dose-response sweep that writes trait-interp's steering results.jsonl.

    run_steering_eval(experiment, traits=None, ...) -> dict      the stage, importable (keyword arguments)
    SteerEvalOptions / plan_steering_eval(opts) / run_plan(plan)  the same in its steps
    read_steering_prompts(trait, path=None) -> SteeringPrompts  datasets/traits/{trait}/steering.json
    residual_norms(model, prompt_ids, layers) -> {layer: norm}  the unit of a relative coefficient (Cx)
    score_response(loaded, prompt_ids, response_ids, judge) -> (trait score, mean NLL)   the probe judge
    coherence_from_nll(nll, response_ids) -> 0-100              perplexity (and repetition) mapped to 0-100
    LLMJudge(url, model, key_env)                               0-100 trait / coherence through any OpenAI-compatible API
    main(argv=None) -> int                                      the CLI: python steering/run_steering_eval.py --help

For each trait: the vector set (position, method) is the held-out best's unless --position / --method say
otherwise; the layers are the trait card's top layers (utils/cards.py) unless --layers says otherwise; the
coefficients are relative: C means C x the residual norm at that layer (each eval prompt's mean norm over its
non-special tokens, core.interventions.prompt_norms, averaged over the prompts), the `Cx` of the live chat. Every prompt of the trait's
question set is answered greedily, unsteered (the baseline line) and with every layer x coefficient (one run
line each, appended as it finishes).

Scores (each response read by the UNSTEERED model, prompt + response, no steering):
  trait      the probe judge: the mean projection of the response tokens on one fixed vector (the set's card-best
             layer: one ruler for every run), on the scale 0 = the held-out negative class mean, 100 = the
             positive class mean (the card's / metadata's reference points; raw projection when they are absent)
  coherence  100 at a per-token perplexity of e (mean NLL 1 nat) or less, 0 at e^6 (~400) or more, linear in
             log-perplexity between; times the share of distinct token 4-grams (a loop of one phrase reads as
             fluent to a language model but is not coherent)
  --judge-url / --judge-model: an LLM judge through any OpenAI-compatible endpoint (openai client; key from
             $OPENAI_API_KEY or --judge-key-env) rates every response 0-100 for the trait and for coherence; its
             means become result.trait_mean / coherence_mean (as trait-interp's judge), the probe's are kept in
             result.probe_trait_mean / probe_coherence_mean.

Writes experiments/{exp}/steering/{category}/{trait}/{variant}/{pos_dir}/steering/results.jsonl
(utils/steering_results.py; docs/formats.md): the header and baseline line together, then one run line per
(layer, coefficient) as it finishes, each write atomic, so a killed sweep leaves whole lines and a rerun with
--skip-existing appends the missing runs in the same order (the same file as an uninterrupted sweep). Runs
already in the file are an error without --skip-existing; --overwrite starts the file over. The variant's
results are what projection's best-vector choice then reads (utils/vectors.py, selected_by "steering").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from core.errors import TraitError
from core.generation import generate_in_batches
from core.hooks import ActivationCapture, SteeringHook, run_forward
from core.interventions import prompt_norms
from utils import cards, cli, paths
from utils.config import resolve_variant, use_chat_template
from utils.layers import parse_layers
from utils.model import LoadedModel, format_prompt, load_model_config, load_variant, stop_token_ids, tokenize_prompt
from utils.steering_results import (SteeringResultsError, append_lines, baseline_line, header_line,
                                    read_steering_results, run_key, run_line)
from utils.storage import atomic_write, read_json, StorageError
from utils.vectors import (MIN_COHERENCE, Reference, VectorError, load_vector, rank_held_out, resolve_vector_source,
                           vector_reference)

COMPONENT = "residual"
DEFAULT_COEFFICIENTS = "0.1,0.2,0.3,0.4"
DEFAULT_TOP_LAYERS = 3
DEFAULT_MAX_NEW_TOKENS = 32
NLL_GOOD, NLL_BAD = 1.0, 6.0            # coherence 100 at or below, 0 at or above (nats per token)
REPEAT_N = 4                            # distinct token n-grams: the repetition factor of coherence
TOOL = "trait-inference steering/run_steering_eval.py"


class SteerEvalError(TraitError):
    """Bad input for the steering eval; the message names the file or flag."""


# ---------------------------------------------------------------------------------------------------
# Inputs

@dataclass(frozen=True)
class SteeringPrompts:
    path: Path
    questions: list[str]
    definition: str
    direction: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.questions).encode()).hexdigest()[:16]


def steering_prompts_path(trait: str) -> Path:
    return paths.traits_data_dir(trait) / "steering.json"


def read_steering_prompts(trait: str, path: str | Path | None = None) -> SteeringPrompts:
    """A question set: {"questions": [str], "definition"?, "direction"?} (trait-interp's steering.json), or a prompt
    set's shapes ({"prompts": [{"id", "text"}]} or a bare list of those or of strings)."""
    path = Path(path) if path else steering_prompts_path(trait)
    if not path.is_file():
        raise SteerEvalError(f"trait {trait!r}: no steering questions at {path} (write one: "
                             f'{{"questions": ["...", "..."], "definition": "what the trait looks like"}}; or --prompts FILE)')
    try:
        data = read_json(path)
    except StorageError as e:
        raise SteerEvalError(str(e)) from None
    items = data.get("questions", data.get("prompts")) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise SteerEvalError(f"{path}: expected a non-empty 'questions' list (or 'prompts', or a bare list)")
    questions = []
    for k, item in enumerate(items):
        text = item.get("text", item.get("prompt")) if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise SteerEvalError(f"{path}: item {k} has no question text")
        questions.append(text.strip())
    meta = data if isinstance(data, dict) else {}
    direction = meta.get("direction", "positive")
    if direction not in ("positive", "negative"):
        raise SteerEvalError(f"{path}: direction must be positive or negative, got {direction!r}")
    definition = meta.get("definition") or f"the trait {trait.split('/')[-1]}"
    return SteeringPrompts(path, questions, str(definition), direction)


def parse_coefficients(spec: str | Sequence[float]) -> list[float]:
    """--coefficients 0.2,0.4,0.8 (relative: times the layer's residual norm) -> floats, order kept, unique."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        values = [float(str(x).strip().rstrip("x")) for x in items]
    except ValueError:
        raise SteerEvalError(f"--coefficients {spec!r}: expected a comma list of numbers like 0.2,0.4,0.8") from None
    if not values or any(not math.isfinite(v) for v in values):
        raise SteerEvalError(f"--coefficients {spec!r}: expected finite numbers")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------
# Mechanics (the model, no files)

def residual_norms(model, prompt_ids: Sequence[Sequence[int]], layers: Sequence[int],
                   skip_ids: Sequence[int] = ()) -> dict[int, float]:
    """Per layer: the mean over the prompts of each prompt's mean residual norm over its non-special tokens
    (core.interventions.prompt_norms, the norm a `Cx` of the live chat and generate multiplies)."""
    per_prompt = []
    for ids in prompt_ids:
        x = torch.tensor([list(ids)], device=_device(model))
        per_prompt.append(prompt_norms(model, x, torch.ones_like(x), list(layers), skip_ids))
    return {int(l): float(sum(float(p[l][0]) for p in per_prompt) / len(per_prompt)) for l in layers}


def _device(model):
    from core.hooks import input_device
    return input_device(model)


@dataclass(frozen=True)
class ProbeJudge:
    """The fixed ruler of one trait's sweep: a unit vector at a layer and the reference points of its 0-100 scale."""
    vector: torch.Tensor
    layer: int
    method: str
    position: str
    path: str
    reference: Reference

    @property
    def scaled(self) -> bool:
        r = self.reference
        return r.pos_mean is not None and r.neg_mean is not None and r.pos_mean != r.neg_mean

    def scale(self, raw: float) -> float:
        """0 = held-out negative class mean, 100 = positive class mean (unclipped); raw when those are unknown."""
        r = self.reference
        return 100.0 * (raw - r.neg_mean) / (r.pos_mean - r.neg_mean) if self.scaled else raw

    def describe(self) -> dict:
        r = self.reference
        return {"layer": self.layer, "method": self.method, "position": self.position, "component": COMPONENT,
                "path": self.path, "scale": ("0 = held-out negative class mean, 100 = positive class mean"
                                             if self.scaled else "raw projection (no class statistics)"),
                "neg_mean": r.neg_mean, "pos_mean": r.pos_mean}


def score_response(model, prompt_ids: Sequence[int], response_ids: Sequence[int],
                   judge: ProbeJudge) -> tuple[float | None, float | None]:
    """(mean projection of the response tokens on the judge vector, mean NLL of the response tokens), both under the
    unsteered model reading prompt + response; (None, None) for an empty response."""
    if not response_ids:
        return None, None
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=_device(model))
    with ActivationCapture(model, [judge.layer], stop_after_last=False) as cap:
        out = run_forward(model, input_ids=ids)
    n_prompt = len(prompt_ids)
    h = cap.activations[judge.layer]["residual"][0, n_prompt:].float()
    trait = float((h @ judge.vector.to(h.device)).mean())
    logits = out.logits[0, n_prompt - 1:-1].float()
    nll = float(torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:], reduction="mean"))
    return trait, nll


def coherence_from_nll(nll: float | None, response_ids: Sequence[int]) -> float:
    """0-100: linear in mean NLL from NLL_GOOD (100) to NLL_BAD (0), times the share of distinct token 4-grams."""
    if nll is None:
        return 0.0
    fluent = min(1.0, max(0.0, (NLL_BAD - nll) / (NLL_BAD - NLL_GOOD)))
    grams = [tuple(response_ids[i:i + REPEAT_N]) for i in range(len(response_ids) - REPEAT_N + 1)]
    distinct = len(set(grams)) / len(grams) if grams else 1.0
    return 100.0 * fluent * distinct


# ---------------------------------------------------------------------------------------------------
# The LLM judge (any OpenAI-compatible endpoint)

TRAIT_PROMPT = """You are grading one reply of an AI assistant for a single trait.
Trait: {definition}

The user wrote:
{question}

The assistant replied:
{answer}

How strongly does the reply show the trait? Answer with one whole number from 0 (not at all) to 100 (as \
strongly as possible), and nothing else."""

COHERENCE_PROMPT = """You are grading one reply of an AI assistant for coherence only, not for helpfulness or \
tone: is it fluent, grammatical, on one thread, free of loops and gibberish?

The user wrote:
{question}

The assistant replied:
{answer}

Answer with one whole number from 0 (gibberish) to 100 (perfectly coherent), and nothing else."""

_NUMBER = re.compile(r"(?<![\d.])(100|\d{1,2})(?!\d|\.\d)")


def parse_score(text: str | None) -> float | None:
    """The first whole number 0-100 in a judge's reply; None when there is none."""
    m = _NUMBER.search(text or "")
    return float(m.group(1)) if m else None


class LLMJudge:
    """0-100 trait and coherence ratings from a chat model behind an OpenAI-compatible API (temperature 0)."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", max_tokens: int = 8):
        try:
            import openai
        except ImportError:
            raise SteerEvalError("--judge-url needs the openai package (pip install -r requirements.txt)") from None
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get(key_env) or "none", max_retries=2)
        self._errors = (openai.APIError,)

    def describe(self) -> dict:
        return {"url": self.url, "model": self.model, "method": "chat, temperature 0, first whole number 0-100"}

    def ask(self, prompt: str) -> tuple[float | None, str]:
        try:
            reply = self.client.chat.completions.create(model=self.model, temperature=0, max_tokens=self.max_tokens,
                                                        messages=[{"role": "user", "content": prompt}])
        except self._errors as e:
            raise SteerEvalError(f"--judge-url {self.url}: the judge request failed ({type(e).__name__}: {e})") from None
        text = reply.choices[0].message.content or ""
        return parse_score(text), text

    def rate(self, definition: str, question: str, answer: str) -> dict:
        trait, trait_text = self.ask(TRAIT_PROMPT.format(definition=definition, question=question, answer=answer))
        coherence, coherence_text = self.ask(COHERENCE_PROMPT.format(question=question, answer=answer))
        return {"trait": trait, "coherence": coherence, "trait_reply": trait_text, "coherence_reply": coherence_text}


# ---------------------------------------------------------------------------------------------------
# The stage: options -> plan (every input checked, nothing generated) -> run

@dataclass(frozen=True)
class SteerEvalOptions:
    experiment: str
    traits: str | tuple[str, ...] | None = None
    model_variant: str | None = None
    extraction_variant: str | None = None
    position: str | None = None
    method: str | None = None
    layers: str | None = None
    top_layers: int = DEFAULT_TOP_LAYERS
    coefficients: str | tuple[float, ...] = DEFAULT_COEFFICIENTS
    prompts: str | None = None
    n_prompts: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_coherence: float = MIN_COHERENCE
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    batch_size: int = 8
    skip_existing: bool = False
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "SteerEvalOptions":
        return cls(ns.experiment, ns.traits, ns.model_variant, ns.extraction_variant, ns.position, ns.method,
                   ns.layers, ns.top_layers, ns.coefficients, ns.prompts, ns.n_prompts, ns.max_new_tokens,
                   ns.min_coherence, ns.judge_url, ns.judge_model, ns.judge_key_env, ns.batch_size,
                   ns.skip_existing, ns.overwrite, not ns.quiet)


@dataclass
class TraitPlan:
    trait: str
    prompts: SteeringPrompts
    position: str
    method: str
    layers: list[int]
    layers_from: str                   # "card" | "--layers"
    judge: ProbeJudge
    results_path: Path
    vectors: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)


@dataclass
class SteerEvalPlan:
    opts: SteerEvalOptions
    variant: Any
    extraction_variant: str
    vectors_experiment: str
    coefficients: list[float]
    traits: list[TraitPlan]


def plan_steering_eval(opts: SteerEvalOptions) -> SteerEvalPlan:
    """Check flags, vectors, cards, question sets and existing results before any model loads."""
    if opts.skip_existing and opts.overwrite:
        raise SteerEvalError("--skip-existing and --overwrite contradict each other: pass one")
    if opts.judge_url and not opts.judge_model:
        raise SteerEvalError("--judge-url needs --judge-model (the model name the endpoint serves)")
    if opts.n_prompts is not None and opts.n_prompts < 1:
        raise SteerEvalError(f"--n-prompts must be >= 1, got {opts.n_prompts}")
    if opts.max_new_tokens < 1:
        raise SteerEvalError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.top_layers < 1:
        raise SteerEvalError(f"--top-layers must be >= 1, got {opts.top_layers}")
    coefficients = parse_coefficients(opts.coefficients)
    variant = resolve_variant(opts.experiment, opts.model_variant, "application")
    traits = opts.traits if opts.traits is None or isinstance(opts.traits, str) else list(opts.traits)
    src = resolve_vector_source(opts.experiment, extraction_variant=opts.extraction_variant,
                                steering_variant=variant.name, traits=traits)
    n_layers = int(load_model_config(variant.model_path(opts.experiment)).num_hidden_layers)
    plans = []
    for trait in src.traits:
        prompts = read_steering_prompts(trait, opts.prompts)
        if opts.n_prompts:
            prompts = SteeringPrompts(prompts.path, prompts.questions[:opts.n_prompts], prompts.definition,
                                      prompts.direction)
        plans.append(_plan_trait(opts, src, trait, prompts, n_layers))
    return SteerEvalPlan(opts, variant, src.extraction_variant, src.vectors_experiment, coefficients, plans)


def _plan_trait(opts: SteerEvalOptions, src, trait: str, prompts: SteeringPrompts, n_layers: int) -> TraitPlan:
    exp, ext = src.vectors_experiment, src.extraction_variant
    try:
        best = rank_held_out(exp, trait, ext, COMPONENT, opts.position, opts.method)[0]
    except VectorError as e:
        raise SteerEvalError(str(e)) from None
    position, method, pos_dir = best.ref.position, best.ref.method, best.ref.pos_dir
    card = cards.load_card(exp, trait, ext)
    if opts.layers:
        layers, layers_from = parse_layers(opts.layers, n_layers), "--layers"
    elif card is not None and card.sets.get(cards.set_key(pos_dir, COMPONENT, method)):
        layers, layers_from = cards.top_layers(card, pos_dir, COMPONENT, method, opts.top_layers), "card"
    else:
        raise SteerEvalError(f"trait {trait!r}: no vector card for {position} {method} at "
                             f"{cards.card_path(exp, trait, ext)}: pass --layers, or write one with trait-card "
                             f"(or extraction/extract_vectors.py)")
    vectors = {}
    for layer in layers:
        try:
            vectors[layer], _ = load_vector(exp, trait, ext, pos_dir, COMPONENT, method, layer)
        except VectorError as e:
            raise SteerEvalError(f"--layers: {e}") from None
    judge_layer = (cards.top_layers(card, pos_dir, COMPONENT, method, 1) or [best.ref.layer])[0] \
        if card is not None and card.sets.get(cards.set_key(pos_dir, COMPONENT, method)) else best.ref.layer
    jvec, _ = load_vector(exp, trait, ext, pos_dir, COMPONENT, method, judge_layer)
    reference = vector_reference(exp, trait, ext, pos_dir, COMPONENT, method, judge_layer)
    judge_path = paths.vector_file(exp, trait, ext, pos_dir, COMPONENT, method, judge_layer)
    judge = ProbeJudge(jvec, judge_layer, method, position,
                       str(judge_path.relative_to(paths.experiment_dir(exp))), reference)
    out = paths.steering_results(opts.experiment, trait, resolve_variant(opts.experiment, opts.model_variant,
                                                                         "application").name, pos_dir)
    return TraitPlan(trait, prompts, position, method, layers, layers_from, judge, out, vectors)


def _settings(plan: SteerEvalPlan, tp: TraitPlan, judge: LLMJudge | None) -> dict:
    """What must agree between a file and a rerun that appends to it."""
    return {"questions_sha256": tp.prompts.digest, "n_questions": len(tp.prompts.questions),
            "max_new_tokens": plan.opts.max_new_tokens, "decoding": "greedy", "component": COMPONENT,
            "probe_judge": tp.judge.describe(), "llm_judge": judge.describe() if judge else None,
            "coherence": f"probe: 100 at mean NLL <= {NLL_GOOD:g}, 0 at >= {NLL_BAD:g} nats/token, linear between, "
                         f"times the share of distinct token {REPEAT_N}-grams",
            "coefficients": "relative: weight = relative_weight x the layer's residual norm (mean over the eval "
                            "prompts of each prompt's mean norm over its non-special tokens)"}


def _eval_info(plan: SteerEvalPlan, tp: TraitPlan, judge: LLMJudge | None) -> dict:
    if judge:
        return {"model": judge.model, "method": "llm_judge", "trait_judge": judge.url}
    return {"model": None, "method": "probe", "trait_judge": f"{tp.method} layer {tp.judge.layer} ({tp.position})"}


def _existing(tp: TraitPlan, settings: dict, opts: SteerEvalOptions):
    """The file's results when it is to be appended to; None when it is absent or --overwrite starts it over."""
    if opts.overwrite or not tp.results_path.exists():
        return None
    try:
        old = read_steering_results(tp.results_path, default_position=tp.position)
    except SteeringResultsError as e:
        raise SteerEvalError(f"{e} (fix or remove it, or pass --overwrite)") from None
    theirs = old.header.get("settings")
    if theirs != settings:
        diff = sorted(k for k in set(settings) | set(theirs or {}) if (theirs or {}).get(k) != settings.get(k))
        raise SteerEvalError(f"{tp.results_path}: written with other settings ({', '.join(diff) or 'no settings'}"
                             f" differ): pass --overwrite to start it over")
    return old


def run_plan(plan: SteerEvalPlan, loaded: LoadedModel | None = None) -> dict:
    """Generate and score the sweep of every trait; returns the summary (see format_summary)."""
    opts = plan.opts
    judge = LLMJudge(opts.judge_url, opts.judge_model, opts.judge_key_env) if opts.judge_url else None
    # every file checked before the model loads or anything is written
    todo = []
    for tp in plan.traits:
        settings = _settings(plan, tp, judge)
        old = _existing(tp, settings, opts)
        keys = old.keys() if old else set()
        todo.append((tp, settings, old, keys))
    t0 = time.perf_counter()
    lm = loaded or load_variant(opts.experiment, plan.variant.name)
    model, tok = lm.model, lm.tokenizer
    template = use_chat_template(opts.experiment)
    stops = stop_token_ids(tok, model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    summary: dict[str, Any] = {"experiment": opts.experiment, "model_variant": plan.variant.name, "traits": {},
                               "written": 0, "skipped": 0, "min_coherence": opts.min_coherence, "seconds": 0.0}
    for tp, settings, old, keys in todo:
        prompt_ids = [tokenize_prompt(tok, format_prompt(tok, q, None, template)[0]) for q in tp.prompts.questions]
        norms = residual_norms(model, prompt_ids, tp.layers, tok.all_special_ids)
        grid = [(layer, c) for layer in tp.layers for c in plan.coefficients]
        key = lambda layer, c: run_key(layer, COMPONENT, tp.position, tp.method,  # noqa: E731
                                       c * norms[layer])
        present = [(l, c) for l, c in grid if key(l, c) in keys]
        if present and not opts.skip_existing:
            raise SteerEvalError(f"{tp.results_path}: already has {len(present)} of the {len(grid)} planned runs "
                                 f"(e.g. layer {present[0][0]} at {present[0][1]:g}x): pass --skip-existing to add "
                                 f"only the missing ones, or --overwrite to start over")
        eval_info = _eval_info(plan, tp, judge)

        def sweep_run(layer: int | None, coefficient: float) -> tuple[dict, list[dict]]:
            """Generate (steered at layer when given) and score every question; (result, per-response rows)."""
            hook = (SteeringHook(model, tp.vectors[layer], layer, coefficient * norms[layer], COMPONENT, "all")
                    if layer is not None and coefficient != 0 else None)
            if hook:
                with hook:
                    gens, _ = generate_in_batches(model, prompt_ids, opts.batch_size, pad, opts.max_new_tokens,
                                                  stop_ids=stops)
            else:
                gens, _ = generate_in_batches(model, prompt_ids, opts.batch_size, pad, opts.max_new_tokens,
                                              stop_ids=stops)
            rows = []
            for q, p_ids, g in zip(tp.prompts.questions, prompt_ids, gens):
                raw, nll = score_response(model, p_ids, g.ids, tp.judge)
                text = tok.decode(g.ids, skip_special_tokens=True).strip()
                row = {"question": q, "response": text, "token_ids": g.ids,
                       "trait": None if raw is None else tp.judge.scale(raw), "projection": raw,
                       "perplexity": None if nll is None else math.exp(min(nll, 50.0)),
                       "coherence": coherence_from_nll(nll, g.ids)}
                if judge:
                    row["judge"] = judge.rate(tp.prompts.definition, q, text)
                rows.append(row)
            return _result(rows, judge is not None), rows

        if old is None:
            result, rows = sweep_run(None, 0.0)
            header = header_line(
                tp.trait, tp.prompts.direction, lm.info.get("model") or plan.variant.model, opts.experiment,
                {"model": plan.variant.model, "experiment": plan.vectors_experiment, "trait": tp.trait,
                 "extraction_variant": plan.extraction_variant},
                eval_info, _shown_path(tp.prompts.path), tool=TOOL, settings=settings)
            lines = [header, baseline_line(result, eval_info, responses=rows)]
            with atomic_write(tp.results_path) as tmp:     # a new file (or --overwrite): header and baseline at once
                tmp.write_text("".join(json.dumps(l, allow_nan=False) + "\n" for l in lines), encoding="utf-8")
            baseline = result
        else:
            baseline = old.baseline_result
        bar = cli.progress(grid, unit="run", desc=f"steer {tp.trait}", disable=not opts.progress)
        for layer, c in bar:
            if key(layer, c) in keys:
                summary["skipped"] += 1
                continue
            result, rows = sweep_run(layer, c)
            vector = {"layer": layer, "component": COMPONENT, "position": tp.position, "method": tp.method,
                      "weight": c * norms[layer], "relative_weight": c, "residual_norm": norms[layer]}
            append_lines(tp.results_path, [run_line(result, vector, eval_info, responses=rows)])
            summary["written"] += 1
        final = read_steering_results(tp.results_path, default_position=tp.position)
        summary["traits"][tp.trait] = _trait_summary(tp, final, baseline, opts.min_coherence)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _shown_path(path: Path) -> str:
    """datasets/... as trait-interp writes prompts_file, when the file lies under the datasets root."""
    try:
        return str(Path("datasets") / path.resolve().relative_to(paths.datasets_root().resolve()))
    except ValueError:
        return str(path)


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _std(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def _result(rows: list[dict], with_judge: bool) -> dict:
    """trait-interp's result keys (trait_mean, trait_std, coherence_mean, n) and ours."""
    probe_trait, probe_coh = _mean([r["trait"] for r in rows]), _mean([r["coherence"] for r in rows])
    out: dict[str, Any] = {"trait_mean": probe_trait, "trait_std": _std([r["trait"] for r in rows]),
                           "coherence_mean": probe_coh, "n": len(rows)}
    if with_judge:
        jt = [r["judge"]["trait"] for r in rows]
        jc = [r["judge"]["coherence"] for r in rows]
        out.update(trait_mean=_mean(jt), trait_std=_std(jt), coherence_mean=_mean(jc),
                   judge_unparsed=sum(v is None for v in jt + jc))
    out.update(probe_trait_mean=probe_trait, probe_coherence_mean=probe_coh,
               perplexity_mean=_mean([r["perplexity"] for r in rows]))
    return out


def _trait_summary(tp: TraitPlan, final, baseline: dict, min_coherence: float) -> dict:
    """The grid as written, and the best run under the coherence floor (the file's direction)."""
    sign = 1.0 if final.direction == "positive" else -1.0
    runs = [r for r in final.runs if r.method == tp.method and r.position == tp.position]
    grid = [{"layer": r.layer, "relative_weight": r.relative_weight, "weight": r.weight, "trait": r.trait_mean,
             "delta": None if r.trait_mean is None else r.trait_mean - final.baseline, "coherence": r.coherence_mean,
             "example": _first_response(final.path, r.line)}
            for r in runs]
    ok = [g for g in grid if g["delta"] is not None and g["coherence"] is not None and g["coherence"] >= min_coherence]
    best = max(ok, key=lambda g: (sign * g["delta"], -g["layer"])) if ok else None
    return {"position": tp.position, "method": tp.method, "layers": tp.layers, "layers_from": tp.layers_from,
            "judge_layer": tp.judge.layer, "scaled": tp.judge.scaled, "direction": final.direction,
            "baseline": final.baseline, "baseline_coherence": baseline.get("coherence_mean"),
            "baseline_example": (baseline.get("responses") or [{}])[0].get("response") if isinstance(baseline, dict)
            else None, "grid": grid, "best": best, "results": str(final.path)}


def _first_response(path: Path, line: int) -> str | None:
    """The response of a run line that scored highest for the trait (the summary's example of what steering did)."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8").splitlines()[line - 1])
        rows = [r for r in rec.get("responses") or [] if r.get("trait") is not None]
        return max(rows, key=lambda r: r["trait"])["response"] if rows else None
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


def run_steering_eval(experiment: str, traits: str | Sequence[str] | None = None, loaded: LoadedModel | None = None,
                      **kwargs) -> dict:
    """The stage with keyword options (SteerEvalOptions' fields); `loaded` reuses a loaded model (tests)."""
    if traits is not None and not isinstance(traits, str):
        traits = tuple(traits)
    if "coefficients" in kwargs and not isinstance(kwargs["coefficients"], str):
        kwargs["coefficients"] = tuple(kwargs["coefficients"])
    return run_plan(plan_steering_eval(SteerEvalOptions(experiment, traits, **kwargs)), loaded)


def format_summary(s: dict) -> str:
    """Per trait: the grid (trait delta from the baseline, coherence), and the best run under the coherence floor."""
    out = [f"steering eval of {len(s['traits'])} trait(s) on variant {s['model_variant']}: {s['written']} runs "
           f"written, {s['skipped']} already present, in {s['seconds']:.1f} s; trait scores relative to the unsteered "
           f"baseline, coherence 0-100, coefficients in residual norms at the layer (Cx)"]
    for trait, t in s["traits"].items():
        scale = "0 = negative class mean, 100 = positive" if t["scaled"] else "raw projection"
        out.append(f"\n{trait} ({t['position']} {t['method']}, layers from {t['layers_from']}; probe judge at layer "
                   f"{t['judge_layer']}, {scale}): baseline trait {t['baseline']:.1f}"
                   + (f", coherence {t['baseline_coherence']:.0f}" if t["baseline_coherence"] is not None else ""))
        out.append(f"  {'layer':>5} {'coef':>6} {'weight':>8} {'trait':>7} {'Δtrait':>7} {'coherence':>9}")
        for g in t["grid"]:
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            rel = "-" if g["relative_weight"] is None else f"{g['relative_weight']:g}x"
            out.append(f"  {g['layer']:>5} {rel:>6} {fmt(g['weight'], '.1f'):>8} {fmt(g['trait'], '.1f'):>7} "
                       f"{fmt(g['delta'], '+.1f'):>7} {fmt(g['coherence'], '.0f'):>9}")
        b = t["best"]
        if b is None:
            out.append(f"  no run keeps coherence >= {s['min_coherence']:g}: no steering evidence for this set")
        else:
            rel = f"{b['relative_weight']:g}x" if b["relative_weight"] is not None else f"weight {b['weight']:g}"
            out.append(f"  best under coherence {s['min_coherence']:g}: layer {b['layer']} at {rel} "
                       f"(weight {b['weight']:.1f}): {b['delta']:+.1f} trait at coherence {b['coherence']:.0f}")
            if b.get("example"):
                out.append(f"    e.g. {b['example']!r}")
        out.append(f"  ({t['results']})")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  # the demo's refusal sweep (make demo ran layer 10), extended by layer 9: runs already there are kept
  python steering/run_steering_eval.py --experiment demo --traits demo/refusal --layers 9,10 \\
      --coefficients 0.2,0.3 --n-prompts 3 --max-new-tokens 24 --skip-existing

  # every trait with vectors: the card's top 3 layers x 0.1, 0.2, 0.3, 0.4 residual norms, 3 questions each
  python steering/run_steering_eval.py --experiment demo --n-prompts 3 --max-new-tokens 24 --skip-existing

an LLM judge: add --judge-url URL --judge-model NAME (any OpenAI-compatible endpoint, e.g. trait-server's
http://127.0.0.1:8000/v1; key from $OPENAI_API_KEY). A file written with other settings (questions, tokens,
judge) is refused: --overwrite starts it over.
questions: datasets/traits/{category}/{trait}/steering.json, {"questions": [...], "definition": "..."}.
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="run_steering_eval.py", epilog=EPILOG,
                   description="Steer each trait's vectors over layers x coefficients, score every greedy answer "
                               "for the trait and for coherence, and write trait-interp's steering results.jsonl "
                               "(the evidence projection uses to choose each trait's vector).")
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    p.add_argument("--traits", help="comma list of category/name (default: every trait with vectors)")
    p.add_argument("--model-variant", help="variant to steer; its folder holds the results (default: "
                                           "defaults.application, the variant projection reads evidence from)")
    p.add_argument("--extraction-variant", help="variant whose vectors are steered (default: defaults.extraction)")
    p.add_argument("--position", help="vector position, e.g. response[:] (default: the held-out best's)")
    p.add_argument("--method", help="vector method, e.g. probe (default: the held-out best's)")
    p.add_argument("--layers", help="layers to sweep: 10, 8-12, 9,10 (default: the trait card's top layers)")
    p.add_argument("--top-layers", type=int, default=DEFAULT_TOP_LAYERS,
                   help=f"how many of the card's top layers (default: {DEFAULT_TOP_LAYERS})")
    p.add_argument("--coefficients", default=DEFAULT_COEFFICIENTS,
                   help=f"comma list, in residual norms at the layer (Cx) (default: {DEFAULT_COEFFICIENTS})")
    p.add_argument("--prompts", metavar="FILE", help="question set (default: the trait's steering.json)")
    p.add_argument("--n-prompts", type=int, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"tokens per answer (default: {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--min-coherence", type=float, default=MIN_COHERENCE,
                   help=f"coherence floor of the summary's best run (default: {MIN_COHERENCE:g}, the selection's)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of an LLM judge (e.g. http://localhost:8000/v1)")
    p.add_argument("--judge-model", help="the judge's model name at that endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (default: OPENAI_API_KEY)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together (default: 8)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip-existing", action="store_true", help="keep runs already in results.jsonl, add the rest")
    g.add_argument("--overwrite", action="store_true", help="start results.jsonl over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: run_plan(plan_steering_eval(SteerEvalOptions.from_args(a))),
                   format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
