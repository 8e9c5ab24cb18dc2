#!/usr/bin/env python
"""Attention patterns and logit-lens predictions per token, for the viewer's layer deep dive.

    extract_viz(experiment, prompt_set, attention=..., logit_lens=..., ...) -> VizSummary   the whole stage
    attention_record(...) / logit_lens_record(...)                          one prompt's JSON objects
    main(argv)                                                              the CLI (thin argparse layer)
    VizError                                                                bad flags / inputs (exit 2)

Reads the response JSONs of --model-variant (their exact `token_ids`), runs one prefill per batch of
prompts (right-padded, so real tokens never see padding) and writes
    analysis/per_token/{set}/{id}_attention.json     per-head probabilities from eager attention
    analysis/per_token/{set}/{id}_logit_lens.json    softmax(softcap(lm_head(final_norm(h)))) top-k per layer
Both come from the same forward when both are asked. The logit lens at the last layer is the model's own
output distribution (core.logit_lens verifies that per model); the actual next token is token_ids[i+1].
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from core.hooks import ActivationCapture, num_layers, run_forward  # noqa: E402
from core.logit_lens import AttentionCapture, LensHead, attn_implementation, find_lens_head, logit_lens  # noqa: E402
from utils import paths  # noqa: E402
from utils.config import resolve_variant  # noqa: E402
from utils.layers import parse_layers  # noqa: E402
from utils.model import LoadedModel, decode_tokens, input_device, load_variant  # noqa: E402
from utils.responses import ResponseError, load_responses  # noqa: E402
from utils.storage import write_json  # noqa: E402
from core.errors import TraitError

KINDS = ("attention", "logit_lens")


class VizError(TraitError):
    """A flag or input that extract_viz cannot work with; the message names it."""


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

    def line(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        parts = [f"{k.replace('_', ' ')} {self.written[k]} ({mb(self.bytes[k])})" for k in KINDS if self.written[k]]
        largest = f", largest {self.largest[0]} {mb(self.largest[1])}" if self.largest[1] else ""
        return (f"extract_viz: {self.n_prompts} prompts of variant {self.variant}: wrote {', '.join(parts) or 'nothing'}"
                f"{largest}; skipped {self.skipped} existing -> {self.output_dir} ({self.seconds:.1f}s)")


def _output_file(out_dir: Path, prompt_id: str, kind: str) -> Path:
    return out_dir / f"{prompt_id}_{kind}.json"


def _tokens(resp: dict, tokenizer) -> list[str]:
    """The stored decoded tokens when they match the ids, else one decoded string per id."""
    ids = resp["token_ids"]
    tokens = resp.get("tokens")
    if isinstance(tokens, list) and len(tokens) == len(ids) and all(isinstance(t, str) for t in tokens):
        return tokens
    return decode_tokens(tokenizer, ids)


def _round(t: torch.Tensor, decimals: int = 6) -> list:
    # float64 first: a float32 rounded to 6 dp prints as 0.12345699965953827 once it becomes a Python float.
    return t.double().round(decimals=decimals).tolist()


def _header(prompt_id: str, prompt_set: str, n_layers: int, tokens: list[str], prompt_end: int) -> dict:
    return {"prompt_id": prompt_id, "prompt_set": prompt_set, "n_layers": n_layers, "tokens": tokens,
            "n_prompt_tokens": prompt_end, "n_response_tokens": len(tokens) - prompt_end}


def attention_record(prompt_id: str, prompt_set: str, variant: str, tokens: list[str], prompt_end: int,
                     n_layers: int, n_heads: int, heads: str, layers: list[int],
                     probs: dict[int, torch.Tensor]) -> dict:
    """The viewer's attention JSON; probs[layer] is [heads (or 1 for mean), T, T] on the CPU."""
    per_layer = [_round(probs[layer]) for layer in layers]     # [layers][heads][T][T] as lists
    attention = [{"token_idx": i, "context_size": i + 1,
                  "by_layer": [[head[i][:i + 1] for head in layer_rows] for layer_rows in per_layer]}
                 for i in range(len(tokens))]
    rec = _header(prompt_id, prompt_set, n_layers, tokens, prompt_end)
    rec.update({"n_heads": n_heads, "heads": heads, "model_variant": variant, "layers": layers,
                "attention": attention})
    return rec


def logit_lens_record(prompt_id: str, prompt_set: str, variant: str, tokens: list[str], token_ids: list[int],
                      prompt_end: int, n_layers: int, layers: list[int], top_k: int, lens: dict,
                      id_to_token) -> dict:
    """The viewer's logit-lens JSON; lens[layer] = (top_probs [T-1, k], top_ids, actual_rank [T-1], actual_prob)."""
    rows = {}
    for layer in layers:
        top_p, top_i, rank, prob = lens[layer]
        rows[layer] = (_round(top_p), top_i.tolist(), rank.tolist(), prob.tolist())
    predictions = []
    for i in range(len(token_ids) - 1):
        by_layer = []
        for layer in layers:
            top_p, top_i, rank, prob = rows[layer]
            by_layer.append({
                "layer": layer,
                "top_k": [{"token": id_to_token(t), "prob": p} for t, p in zip(top_i[i], top_p[i])],
                "actual_rank": int(rank[i]),
                "actual_prob": float(f"{prob[i]:.6g}"),  # significant digits: a rank-1000 token keeps its value
            })
        predictions.append({"token_idx": i, "actual_next_token": tokens[i + 1],
                            "actual_next_token_id": int(token_ids[i + 1]), "by_layer": by_layer})
    rec = _header(prompt_id, prompt_set, n_layers, tokens, prompt_end)
    rec.update({"top_k": top_k, "model_variant": variant, "layers": layers, "predictions": predictions})
    return rec


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _prefill_inputs(batch: list[tuple[str, dict]], pad_id: int, device: torch.device) -> dict:
    """Right-padded ids and mask: position ids stay 0..T-1 and causal rows never reach the padding."""
    longest = max(len(r["token_ids"]) for _, r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for b, (_, r) in enumerate(batch):
        n = len(r["token_ids"])
        ids[b, :n] = torch.tensor(r["token_ids"], dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _lens_batch(head: LensHead, residuals: dict[int, torch.Tensor], batch: list[tuple[str, dict]],
                layers: list[int], top_k: int) -> list[dict]:
    """Every real position of every prompt and layer in one chunked lens call on the device."""
    hidden, next_ids, spans = [], [], []
    for layer in layers:
        h = residuals[layer]
        for b, (_, r) in enumerate(batch):
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


def extract_viz(experiment: str, prompt_set: str, model_variant: str | None = None, attention: bool = False,
                logit_lens: bool = False, layers: str = "all", heads: str = "all", top_k: int = 50,
                max_tokens: int = 512, batch_size: int = 4, limit: int | None = None, skip_existing: bool = False,
                output_suffix: str | None = None, dtype: str = "auto", load_in_8bit: bool = False,
                load_in_4bit: bool = False, loaded: LoadedModel | None = None, progress: bool = True) -> VizSummary:
    """Write {id}_attention.json and/or {id}_logit_lens.json for every response of the variant and set."""
    t0 = time.time()
    kinds = [k for k, on in zip(KINDS, (attention, logit_lens)) if on]
    if not kinds:
        raise VizError("nothing to extract: pass --attention and/or --logit-lens")
    if heads not in ("all", "mean"):
        raise VizError(f"--heads {heads!r}: choose all or mean")
    if top_k < 1:
        raise VizError(f"--top-k {top_k}: must be at least 1")
    if batch_size < 1:
        raise VizError(f"--batch-size {batch_size}: must be at least 1")
    if max_tokens < 1:
        raise VizError(f"--max-tokens {max_tokens}: must be at least 1")
    if limit is not None and limit < 1:
        raise VizError(f"--limit {limit}: must be at least 1")

    variant = loaded.info.get("variant") if loaded is not None and loaded.info.get("variant") else \
        resolve_variant(experiment, model_variant).name
    responses = load_responses(experiment, variant, prompt_set, limit=limit)
    out_dir = paths.per_token_dir(experiment, paths.set_dir(prompt_set, output_suffix))

    # What each prompt still needs (--skip-existing trusts files: they are only ever written atomically).
    todo: list[tuple[str, dict, list[str]]] = []
    skipped = 0
    for pid, resp in responses:
        need = [k for k in kinds if not (skip_existing and _output_file(out_dir, pid, k).exists())]
        if need:
            todo.append((pid, resp, need))
        else:
            skipped += 1
    if attention:
        long = [(pid, len(r["token_ids"])) for pid, r, need in todo if "attention" in need
                and len(r["token_ids"]) > max_tokens]
        if long:
            shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:5]) + (" ..." if len(long) > 5 else "")
            raise VizError(f"--max-tokens {max_tokens}: prompt(s) {shown} are longer; an attention file grows with "
                           f"tokens^2 x layers x heads (choose fewer --layers, --heads mean, or raise --max-tokens)")

    if loaded is None and todo:
        loaded = load_variant(experiment, variant, attn_implementation="eager" if attention else None, dtype=dtype,
                              load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    if loaded is None:  # everything already exists: nothing to load
        summary = VizSummary(variant, str(out_dir), [], n_prompts=len(responses), skipped=skipped)
        summary.seconds = time.time() - t0
        return summary
    model, tok = loaded.model, loaded.tokenizer
    if attention and attn_implementation(model) not in (None, "eager"):
        raise VizError(f"--attention needs eager attention, but the loaded model uses "
                       f"{attn_implementation(model)!r} (load it with attn_implementation='eager')")
    n_layers = num_layers(model)
    chosen = parse_layers(layers, n_layers)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    for pid, resp, _ in todo:
        bad = [i for i in resp["token_ids"] if not 0 <= i < vocab]
        if bad:
            raise ResponseError(f"{paths.response_file(experiment, variant, prompt_set, pid)}: token id {bad[0]} is "
                                f"outside the model's vocabulary (size {vocab})")
    head = find_lens_head(model) if logit_lens else None
    device = input_device(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoded: dict[int, str] = {}

    def id_to_token(i: int) -> str:
        if i not in decoded:
            decoded[i] = decode_tokens(tok, [i])[0]
        return decoded[i]

    n_heads = [0]  # the real head count, read off the probabilities before any mean

    def keep_attention(_layer: int, w: torch.Tensor) -> torch.Tensor:
        n_heads[0] = int(w.shape[1])
        w = w.float()
        return (w.mean(dim=1, keepdim=True) if heads == "mean" else w).cpu()

    summary = VizSummary(variant, str(out_dir), chosen, n_prompts=len(responses), skipped=skipped)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="extract_viz", unit="prompt", disable=not progress, file=sys.stderr)
    for batch3 in _batches(todo, batch_size):
        batch = [(pid, r) for pid, r, _ in batch3]
        inputs = _prefill_inputs(batch, pad_id, device)
        # One forward serves both kinds; it stops after the last chosen layer (the lens uses the model's own head).
        with contextlib.ExitStack() as stack:
            cap = stack.enter_context(ActivationCapture(model, chosen, ["residual"], stop_after_last=True,
                                                        on_capture=None if logit_lens else (lambda *_: None)))
            att = stack.enter_context(AttentionCapture(model, chosen, keep_attention)) if attention else None
            run_forward(model, **inputs)
        lens = _lens_batch(head, {L: cap.activations[L]["residual"] for L in chosen}, batch, chosen, top_k) \
            if logit_lens else None
        for b, (pid, resp, need) in enumerate(batch3):
            ids, end = resp["token_ids"], resp["prompt_end"]
            n = len(ids)
            tokens = _tokens(resp, tok)
            records = {}
            if "attention" in need:
                probs = {L: att.probs[L][b, :, :n, :n] for L in chosen}
                records["attention"] = attention_record(pid, prompt_set, variant, tokens, end, n_layers, n_heads[0],
                                                        heads, chosen, probs)
            if "logit_lens" in need:
                records["logit_lens"] = logit_lens_record(pid, prompt_set, variant, tokens, ids, end, n_layers,
                                                          chosen, top_k, lens[b], id_to_token)
            for kind, rec in records.items():
                size = write_json(_output_file(out_dir, pid, kind), rec)
                summary.written[kind] += 1
                summary.bytes[kind] += size
                if size > summary.largest[1]:
                    summary.largest = (f"{pid}_{kind}.json", size)
            bar.update(1)
            bar.set_postfix_str(f"{sum(summary.bytes.values()) / 1e6:.1f} MB")
    bar.close()
    summary.seconds = time.time() - t0
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extract_viz.py",
        description="Per-token attention patterns (per head, eager attention) and logit-lens predictions "
                    "(final norm + lm_head + soft-capping, top-k per layer) from the response JSONs of a "
                    "model variant, written to analysis/per_token/{set}/{id}_attention.json and _logit_lens.json.",
        epilog="example:\n  python inference/extract_viz.py --experiment my_exp --prompt-set single_trait "
               "--attention --logit-lens --layers 0-25:5 --heads mean",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--skip-existing", action="store_true", help="skip outputs that already exist")
    p.add_argument("--output-suffix", default=None,
                   help="write to analysis/per_token/{set}_{S}/ (e.g. one per variant: the folder is shared)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true")
    q.add_argument("--load-in-4bit", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.attention or args.logit_lens):
        parser.error("nothing to extract: pass --attention and/or --logit-lens")
    try:
        summary = extract_viz(
            args.experiment, args.prompt_set, model_variant=args.model_variant, attention=args.attention,
            logit_lens=args.logit_lens, layers=args.layers, heads=args.heads, top_k=args.top_k,
            max_tokens=args.max_tokens, batch_size=args.batch_size, limit=args.limit,
            skip_existing=args.skip_existing, output_suffix=args.output_suffix, dtype=args.dtype,
            load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
