#!/usr/bin/env python
"""Attention patterns and logit-lens predictions per token, for the viewer's layer deep dive.

    VizOptions(experiment, prompt_set, attention=..., logit_lens=..., ...)   every setting (the CLI flags)
    plan_viz(opts, loaded=None) -> VizPlan       every input checked (flags, responses, --layers); nothing loaded
    run_viz(plan, loaded=None) -> VizSummary     load the model, one prefill per batch, write the JSON files
    viz(opts, loaded=None) -> VizSummary         plan + run
    extract_viz(experiment, prompt_set, loaded=None, **options) -> VizSummary   plan + run (keyword callers)
    attention_record(...) / logit_lens_record(...)                            one prompt's JSON objects
    main(argv)                                                                the CLI
    VizError                                                                  bad flags / inputs (exit 2)

Reads the response JSONs of --model-variant (their exact `token_ids`; token strings are decoded again from
the ids), runs one prefill per batch of prompts (right-padded, so real tokens never see padding) and writes
    analysis/per_token/{set}/{id}_attention.json     per-head probabilities from eager attention
    analysis/per_token/{set}/{id}_logit_lens.json    softmax(softcap(lm_head(final_norm(h)))) top-k per layer
Both come from the same forward when both are asked. `by_layer` holds one entry per model layer, indexed by
layer as the viewer reads it; a layer not in --layers gets an empty entry (no heads / no predictions), and
`layers` lists the computed ones (docs/formats.md). The logit lens at the last layer is the model's own
output distribution (core.logit_lens verifies that per model); the actual next token is token_ids[i+1].
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import TraitError
from core.hooks import ActivationCapture, num_layers, run_forward
from core.logit_lens import AttentionCapture, LensHead, attn_implementation, find_lens_head, logit_lens
from utils import cli, paths
from utils.config import resolve_variant
from utils.layers import parse_layers
from utils.model import LoadedModel, input_device, load_model_config, load_variant
from utils.responses import TokenStrings, load_responses
from utils.storage import add_write_flags, guard_outputs
from utils.viz import viz_file, write_viz

KINDS = ("attention", "logit_lens")


class VizError(TraitError):
    """A flag or input that extract_viz cannot work with; the message names it."""


@dataclass(frozen=True)
class VizOptions:
    """What one extract_viz run is asked to do; the fields are the CLI flags (see build_parser)."""

    experiment: str
    prompt_set: str
    model_variant: str | None = None
    attention: bool = False
    logit_lens: bool = False
    layers: str = "all"
    heads: str = "all"                  # all | mean
    top_k: int = 50
    max_tokens: int = 512
    batch_size: int = 4
    limit: int | None = None
    skip_existing: bool = False
    overwrite: bool = False
    output_suffix: str | None = None
    dtype: str = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    progress: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "VizOptions":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    @property
    def kinds(self) -> list[str]:
        return [k for k, on in zip(KINDS, (self.attention, self.logit_lens)) if on]


@dataclass(frozen=True)
class VizPlan:
    opts: VizOptions
    variant: str
    out_dir: Path
    n_prompts: int
    n_layers: int
    layers: list[int]                            # the computed layers (--layers)
    todo: list[tuple[str, dict, list[str]]]      # (prompt id, response, kinds still to write)
    skipped: int


@dataclass
class VizSummary:
    variant: str
    output_dir: str
    layers: list[int]
    n_prompts: int = 0
    written: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    bytes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    skipped: int = 0
    largest: tuple[str, int] = ("", 0)
    seconds: float = 0.0
    tokens_corrected: int = 0                    # token strings decoded from the ids that differed from the JSON

    def line(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        parts = [f"{k.replace('_', ' ')} {self.written[k]} ({mb(self.bytes[k])})" for k in KINDS if self.written[k]]
        largest = f", largest {self.largest[0]} {mb(self.largest[1])}" if self.largest[1] else ""
        fixed = (f"; {self.tokens_corrected:,} token strings decoded from the ids differed from the response JSONs "
                 f"(corrected)") if self.tokens_corrected else ""
        return (f"extract_viz: {self.n_prompts} prompts of variant {self.variant}: wrote {', '.join(parts) or 'nothing'}"
                f"{largest}; skipped {self.skipped} existing -> {self.output_dir} ({self.seconds:.1f}s){fixed}")


def _round(t: torch.Tensor, decimals: int = 6) -> list:
    # float64 first: a float32 rounded to 6 dp prints as 0.12345699965953827 once it becomes a Python float.
    return t.double().round(decimals=decimals).tolist()


# ---------------------------------------------------------------------------------------------------
# The records

def _header(prompt_id: str, prompt_set: str, n_layers: int, tokens: list[str], prompt_end: int) -> dict:
    return {"prompt_id": prompt_id, "prompt_set": prompt_set, "n_layers": n_layers, "tokens": tokens,
            "n_prompt_tokens": prompt_end, "n_response_tokens": len(tokens) - prompt_end}


def attention_record(prompt_id: str, prompt_set: str, variant: str, tokens: list[str], prompt_end: int,
                     n_layers: int, n_heads: int, heads: str, layers: list[int],
                     probs: dict[int, torch.Tensor]) -> dict:
    """The viewer's attention JSON; probs[layer] is [heads (or 1 for mean), T, T] on the CPU.

    by_layer[L] is layer L's list of head rows ([] for a layer not in `layers`).
    """
    rows = {layer: _round(probs[layer]) for layer in layers}     # [heads][T][T] as lists
    attention = [{"token_idx": i, "context_size": i + 1,
                  "by_layer": [[head[i][:i + 1] for head in rows[layer]] if layer in rows else []
                               for layer in range(n_layers)]}
                 for i in range(len(tokens))]
    rec = _header(prompt_id, prompt_set, n_layers, tokens, prompt_end)
    rec.update({"n_heads": n_heads, "heads": heads, "model_variant": variant, "layers": layers,
                "attention": attention})
    return rec


def _no_prediction(layer: int) -> dict:
    """A layer that was not computed: the entry trait-interp writes for missing data."""
    return {"layer": layer, "top_k": [], "actual_rank": None, "actual_prob": None}


def logit_lens_record(prompt_id: str, prompt_set: str, variant: str, tokens: list[str], token_ids: list[int],
                      prompt_end: int, n_layers: int, layers: list[int], top_k: int, lens: dict,
                      id_to_token) -> dict:
    """The viewer's logit-lens JSON; lens[layer] = (top_probs [T-1, k], top_ids, actual_rank [T-1], actual_prob).

    by_layer[L] is layer L's prediction (an empty one for a layer not in `layers`).
    """
    rows = {}
    for layer in layers:
        top_p, top_i, rank, prob = lens[layer]
        rows[layer] = (_round(top_p), top_i.tolist(), rank.tolist(), prob.tolist())

    def entry(layer: int, i: int) -> dict:
        if layer not in rows:
            return _no_prediction(layer)
        top_p, top_i, rank, prob = rows[layer]
        return {"layer": layer,
                "top_k": [{"token": id_to_token(t), "prob": p} for t, p in zip(top_i[i], top_p[i])],
                "actual_rank": int(rank[i]),
                "actual_prob": float(f"{prob[i]:.6g}")}  # significant digits: a rank-1000 token keeps its value

    predictions = [{"token_idx": i, "actual_next_token": tokens[i + 1], "actual_next_token_id": int(token_ids[i + 1]),
                    "by_layer": [entry(layer, i) for layer in range(n_layers)]}
                   for i in range(len(token_ids) - 1)]
    rec = _header(prompt_id, prompt_set, n_layers, tokens, prompt_end)
    rec.update({"top_k": top_k, "model_variant": variant, "layers": layers, "predictions": predictions})
    return rec


# ---------------------------------------------------------------------------------------------------
# Planning: every input checked before the model is loaded

def _check_flags(opts: VizOptions) -> None:
    if not opts.kinds:
        raise VizError("nothing to extract: pass --attention and/or --logit-lens")
    if opts.heads not in ("all", "mean"):
        raise VizError(f"--heads {opts.heads!r}: choose all or mean")
    for flag, value in (("--top-k", opts.top_k), ("--batch-size", opts.batch_size),
                        ("--max-tokens", opts.max_tokens), ("--limit", opts.limit)):
        if value is not None and value < 1:
            raise VizError(f"{flag} {value}: must be at least 1")


def _model_shape(opts: VizOptions, variant: str, loaded: LoadedModel | None) -> tuple[int, int]:
    """(layers, vocabulary size) of the loaded model, else from the variant's config (no weights read)."""
    if loaded is not None:
        return num_layers(loaded.model), int(loaded.model.get_input_embeddings().weight.shape[0])
    model_path = resolve_variant(opts.experiment, variant).model_path(opts.experiment)
    cfg = load_model_config(model_path)
    n, vocab = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "vocab_size", None)
    if not isinstance(n, int) or not isinstance(vocab, int):
        raise VizError(f"{model_path}: config has no num_hidden_layers / vocab_size")
    return n, vocab


def _check_lengths(opts: VizOptions, todo: list[tuple[str, dict, list[str]]]) -> None:
    long = [(pid, len(r["token_ids"])) for pid, r, need in todo
            if "attention" in need and len(r["token_ids"]) > opts.max_tokens]
    if long:
        shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:5]) + (" ..." if len(long) > 5 else "")
        raise VizError(f"--max-tokens {opts.max_tokens}: prompt(s) {shown} are longer; an attention file grows with "
                       f"tokens^2 x layers x heads (choose fewer --layers, --heads mean, or raise --max-tokens)")


def plan_viz(opts: VizOptions, loaded: LoadedModel | None = None) -> VizPlan:
    """Check flags, the variant, every response file (ids inside the vocabulary), lengths and --layers."""
    _check_flags(opts)
    variant = loaded.info.get("variant") if loaded is not None and loaded.info.get("variant") else \
        resolve_variant(opts.experiment, opts.model_variant).name
    n_layers, vocab = _model_shape(opts, variant, loaded)
    responses = load_responses(opts.experiment, variant, opts.prompt_set, limit=opts.limit, vocab_size=vocab)
    layers = parse_layers(opts.layers, n_layers)
    out_dir = paths.per_token_dir(opts.experiment, paths.set_dir(opts.prompt_set, opts.output_suffix))
    todo, skipped = [], 0
    for pid, resp in responses:  # --skip-existing trusts files: they are only ever written atomically
        need = [k for k in opts.kinds if not (opts.skip_existing and viz_file(out_dir, pid, k).exists())]
        if need:
            todo.append((pid, resp, need))
        else:
            skipped += 1
    _check_lengths(opts, todo)
    guard_outputs([viz_file(out_dir, pid, k) for pid, _, need in todo for k in need], overwrite=opts.overwrite,
                  skip_existing=opts.skip_existing)
    return VizPlan(opts, variant, out_dir, len(responses), n_layers, layers, todo, skipped)


# ---------------------------------------------------------------------------------------------------
# Running

def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _prefill_inputs(batch: list[tuple[str, dict, list[str]]], pad_id: int, device: torch.device) -> dict:
    """Right-padded ids and mask: position ids stay 0..T-1 and causal rows never reach the padding."""
    longest = max(len(r["token_ids"]) for _, r, _ in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for b, (_, r, _) in enumerate(batch):
        n = len(r["token_ids"])
        ids[b, :n] = torch.tensor(r["token_ids"], dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _lens_batch(head: LensHead, residuals: dict[int, torch.Tensor], batch: list[tuple[str, dict, list[str]]],
                layers: list[int], top_k: int) -> list[dict]:
    """Every real position of every prompt and layer in one chunked lens call on the device."""
    hidden, next_ids, spans = [], [], []
    for layer in layers:
        h = residuals[layer]
        for b, (_, r, _) in enumerate(batch):
            ids = r["token_ids"]
            n = len(ids) - 1
            hidden.append(h[b, :n])
            next_ids.append(torch.tensor(ids[1:], dtype=torch.long))
            spans.append((layer, b, n))
    res = logit_lens(head, torch.cat(hidden), torch.cat(next_ids).to(hidden[0].device), top_k)
    out: list[dict] = [{} for _ in batch]
    start = 0
    for layer, b, n in spans:
        sl = slice(start, start + n)
        out[b][layer] = (res.top_probs[sl], res.top_ids[sl], res.actual_rank[sl], res.actual_prob[sl])
        start += n
    return out


def _load(plan: VizPlan, loaded: LoadedModel | None) -> LoadedModel:
    o = plan.opts
    if loaded is None:
        loaded = load_variant(o.experiment, plan.variant, attn_implementation="eager" if o.attention else None,
                              dtype=o.dtype, load_in_8bit=o.load_in_8bit, load_in_4bit=o.load_in_4bit)
    if o.attention and attn_implementation(loaded.model) not in (None, "eager"):
        raise VizError(f"--attention needs eager attention, but the loaded model uses "
                       f"{attn_implementation(loaded.model)!r} (load it with attn_implementation='eager')")
    if num_layers(loaded.model) != plan.n_layers:
        raise VizError(f"the loaded model has {num_layers(loaded.model)} layers, its config {plan.n_layers}")
    return loaded


class _Forward:
    """One prefill per batch serving both kinds; it stops after the last chosen layer."""

    def __init__(self, lm: LoadedModel, plan: VizPlan):
        self.model, self.plan = lm.model, plan
        self.head = find_lens_head(lm.model) if plan.opts.logit_lens else None
        self.device = input_device(lm.model)
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.n_heads = 0  # the real head count, read off the probabilities before any mean

    def _keep_attention(self, _layer: int, w: torch.Tensor) -> torch.Tensor:
        self.n_heads = int(w.shape[1])
        w = w.float()
        return (w.mean(dim=1, keepdim=True) if self.plan.opts.heads == "mean" else w).cpu()

    def __call__(self, batch: list[tuple[str, dict, list[str]]]) -> tuple[dict | None, list[dict] | None]:
        """(attention probs {layer: [B, heads, S, S]} or None, per-prompt lens rows or None)."""
        o, layers = self.plan.opts, self.plan.layers
        with contextlib.ExitStack() as stack:
            cap = stack.enter_context(ActivationCapture(self.model, layers, ["residual"], stop_after_last=True,
                                                        on_capture=None if o.logit_lens else (lambda *_: None)))
            att = stack.enter_context(AttentionCapture(self.model, layers, self._keep_attention)) \
                if o.attention else None
            run_forward(self.model, **_prefill_inputs(batch, self.pad_id, self.device))
        lens = _lens_batch(self.head, {L: cap.activations[L]["residual"] for L in layers}, batch, layers,
                           o.top_k) if o.logit_lens else None
        return (att.probs if att is not None else None), lens


def _records(plan: VizPlan, fwd: _Forward, b: int, pid: str, resp: dict, need: list[str], tokens: list[str],
             probs: dict | None, lens: list[dict] | None, id_to_token) -> dict[str, dict]:
    ids, end, n, o = resp["token_ids"], resp["prompt_end"], len(resp["token_ids"]), plan.opts
    records = {}
    if "attention" in need:
        records["attention"] = attention_record(pid, o.prompt_set, plan.variant, tokens, end, plan.n_layers,
                                                fwd.n_heads, o.heads, plan.layers,
                                                {L: probs[L][b, :, :n, :n] for L in plan.layers})
    if "logit_lens" in need:
        records["logit_lens"] = logit_lens_record(pid, o.prompt_set, plan.variant, tokens, ids, end, plan.n_layers,
                                                  plan.layers, o.top_k, lens[b], id_to_token)
    return records


def _write(summary: VizSummary, out_dir: Path, pid: str, records: dict[str, dict]) -> None:
    for kind, rec in records.items():
        size = write_viz(viz_file(out_dir, pid, kind), rec, kind)
        summary.written[kind] += 1
        summary.bytes[kind] += size
        if size > summary.largest[1]:
            summary.largest = (f"{pid}_{kind}.json", size)


def run_viz(plan: VizPlan, loaded: LoadedModel | None = None, started: float | None = None) -> VizSummary:
    """Write {id}_attention.json and/or {id}_logit_lens.json for every prompt of plan.todo."""
    t0 = started if started is not None else time.time()
    summary = VizSummary(plan.variant, str(plan.out_dir), plan.layers if plan.todo else [],
                         n_prompts=plan.n_prompts, skipped=plan.skipped)
    if plan.todo:  # else everything exists already: nothing to load
        lm = _load(plan, loaded)
        fwd = _Forward(lm, plan)
        strings = TokenStrings(lm.tokenizer)

        def id_to_token(i: int) -> str:
            return strings.decode([i])[0]

        bar = cli.Progress(total=len(plan.todo), desc="extract_viz", unit="prompt", disable=not plan.opts.progress,
                   file=sys.stderr)
        for batch in _batches(plan.todo, plan.opts.batch_size):
            probs, lens = fwd(batch)
            for b, (pid, resp, need) in enumerate(batch):
                records = _records(plan, fwd, b, pid, resp, need, strings.of(resp), probs, lens, id_to_token)
                _write(summary, plan.out_dir, pid, records)
                bar.update(1)
                bar.set_postfix_str(f"{sum(summary.bytes.values()) / 1e6:.1f} MB")
        bar.close()
        summary.tokens_corrected = strings.corrected
    summary.seconds = time.time() - t0
    return summary


def viz(opts: VizOptions, loaded: LoadedModel | None = None) -> VizSummary:
    """plan_viz then run_viz; `loaded` reuses an already-loaded model (eager attention for --attention)."""
    t0 = time.time()
    return run_viz(plan_viz(opts, loaded), loaded, started=t0)


def extract_viz(experiment: str, prompt_set: str, loaded: LoadedModel | None = None, **options) -> VizSummary:
    """Write {id}_attention.json and/or {id}_logit_lens.json for every response of the variant and set.

    `options` are VizOptions' fields (attention=, logit_lens=, layers=, heads=, top_k=, ...).
    """
    return viz(VizOptions(experiment, prompt_set, **options), loaded)


# ---------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="extract_viz.py",
        description="Per-token attention patterns (per head, eager attention) and logit-lens predictions "
                    "(final norm + lm_head + soft-capping, top-k per layer) from the response JSONs of a "
                    "model variant, written to analysis/per_token/{set}/{id}_attention.json and _logit_lens.json. "
                    "by_layer has one entry per model layer (empty for layers not in --layers).",
        epilog="example:\n  python inference/extract_viz.py --experiment demo --prompt-set benign "
               "--attention --logit-lens --layers 0-29:5 --heads mean --limit 2")
    p.add_argument("--experiment", required=True)
    p.add_argument("--prompt-set", required=True, help="responses/{set}/ to read (nested names allowed)")
    p.add_argument("--model-variant", default=None, help="default: the config's defaults.application")
    p.add_argument("--attention", action="store_true", help="write {id}_attention.json (loads eager attention)")
    p.add_argument("--logit-lens", action="store_true", help="write {id}_logit_lens.json")
    p.add_argument("--layers", default="all", help="capture grammar: all, 16, 5-20, 10-45:3, 30%%-60%%, -1 (default all)")
    p.add_argument("--heads", choices=("all", "mean"), default="all", help="per-head rows, or their mean (default all)")
    p.add_argument("--top-k", type=int, default=50, help="logit-lens predictions kept per layer (default 50)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="--attention refuses prompts longer than this (files grow with tokens^2; default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per prefill (default 4)")
    p.add_argument("--limit", type=int, default=None, help="first N responses (natural id order)")
    add_write_flags(p, "attention / logit-lens files")
    p.add_argument("--output-suffix", default=None,
                   help="write to analysis/per_token/{set}_{S}/ (e.g. one per variant: the folder is shared)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true")
    q.add_argument("--load-in-4bit", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: viz(VizOptions.from_args(a)), VizSummary.line, argv)


if __name__ == "__main__":
    sys.exit(main())
