"""Logit lens and attention probabilities: reading a model's residual stream and attention heads.

    find_lens_head(model) -> LensHead       the model's own final norm, LM head and logit scaling/soft-capping,
                                            found structurally (PeftModel too) and checked against its logits
    lens_logits(head, hidden) -> Tensor     logits exactly as the model computes them from a residual
    logit_lens(head, hidden, next_ids, top_k) -> LensResult
                                            softmax(softcap(lm_head(final_norm(h)))) on the device, chunked;
                                            only top-k, the actual next token's rank and probability leave it
    attention_module(model, layer)          the attention module of decoder block `layer`
    AttentionCapture(model, layers, reduce) per-head attention probabilities (eager attention) at chosen layers
    LensError                               an architecture whose head cannot be reproduced, or a bad request

The lens at the last layer must equal the model's own output distribution: `find_lens_head` verifies
that on a tiny forward (like `core.hooks.block_sites`) and refuses a model where it does not hold,
rather than produce a plausible-looking but wrong lens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from core.hooks import ActivationCapture, HookError, HookManager, decoder_layers, run_forward, text_config

# The decoder's final norm, by the names HF architectures give it (Llama/Gemma/Qwen/Mistral, GPT-2, Phi/Falcon, ...).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")
# The attention child of a decoder block (Llama-family self_attn, GPT-2 attn, others).
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")


class LensError(HookError):
    """The logit lens or attention capture cannot be done as asked; the message says why."""


@dataclass
class LensHead:
    """What turns a residual into the model's logits: final norm -> lm_head -> scale -> soft-cap."""
    norm: nn.Module | None
    lm_head: nn.Module
    logit_scale: float = 1.0            # Cohere multiplies logits by config.logit_scale, Granite divides by logits_scaling
    softcap: float | None = None        # Gemma-2/3 final_logit_softcapping: cap * tanh(logits / cap)
    norm_path: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _final_norm(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The norm that sits beside the decoder layer list (same parent), by its conventional names."""
    layers = decoder_layers(model)
    for name, parent in model.named_modules():
        if any(child is layers for child in parent.children()):
            for norm_name in FINAL_NORM_NAMES:
                norm = getattr(parent, norm_name, None)
                if isinstance(norm, nn.Module):
                    return f"{name}.{norm_name}" if name else norm_name, norm
            return None, None
    return None, None


def find_lens_head(model: nn.Module, verify: bool = True) -> LensHead:
    """The model's own path from residual to logits; verified (cached per model) to reproduce its logits."""
    cached = getattr(model, "_trait_lens_head", None)
    if cached is not None:
        return cached
    lm_head = model.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise LensError(f"{type(model).__name__} has no output embedding (lm_head): the logit lens needs a causal LM")
    norm_path, norm = _final_norm(model)
    cfg = text_config(model)
    scale = 1.0
    if getattr(cfg, "logit_scale", None):
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    head = LensHead(norm, lm_head, scale, float(cap) if cap else None, norm_path)
    if verify:
        err = _reproduction_error(model, head)
        if err is not None:
            raise LensError(
                f"logit lens for {type(model).__name__}: final norm ({norm_path or 'none found'}) + lm_head"
                f"{' + soft-capping' if head.softcap else ''} does not reproduce the model's logits ({err})"
            )
    setattr(model, "_trait_lens_head", head)
    return head


def _reproduction_error(model: nn.Module, head: LensHead) -> str | None:
    """Run a few tokens; None when lens_logits(last residual) equals the model's logits within dtype precision."""
    last = len(decoder_layers(model)) - 1
    emb = model.get_input_embeddings()
    ids = ((torch.arange(6) * 7 + 3) % int(emb.weight.shape[0]))[None].to(emb.weight.device)
    with ActivationCapture(model, [last], ["residual"], stop_after_last=False) as cap:
        out = run_forward(model, input_ids=ids)
    if out is None or getattr(out, "logits", None) is None:
        return "the model returned no logits"
    dtype = out.logits.dtype
    want = out.logits[0].float()
    got = lens_logits(head, cap.activations[last]["residual"][0]).float().to(want.device)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    tol = 8 * torch.finfo(dtype).eps * want.abs().max().item() + 1e-5
    err = (got - want).abs().max().item()
    return None if err <= tol else f"max |difference| {err:.3g} > {tol:.3g}"


def lens_logits(head: LensHead, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from residuals [..., hidden], with the model's own modules, dtype and op order."""
    x = hidden
    if head.norm is not None:
        x = head.norm(x.to(_device(head.norm)))
    logits = head.lm_head(x.to(_device(head.lm_head)))
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


@dataclass
class LensResult:
    """Per row (position x layer), on the CPU: top-k probabilities and ids, and the actual next token's rank/prob."""
    top_probs: torch.Tensor          # [N, k] float32, descending
    top_ids: torch.Tensor            # [N, k] int64
    actual_rank: torch.Tensor | None  # [N] int64, 1-based: 1 + number of tokens strictly more probable
    actual_prob: torch.Tensor | None  # [N] float32


def logit_lens(head: LensHead, hidden: torch.Tensor, next_ids: torch.Tensor | None = None, top_k: int = 50,
               max_elements: int = 2 ** 25) -> LensResult:
    """softmax(softcap(lm_head(final_norm(h)))) for rows of `hidden` [N, hidden], in chunks of about
    `max_elements` logits so a 256k vocabulary never materialises N x V at once; only top-k leaves the device."""
    if top_k < 1:
        raise LensError(f"--top-k must be at least 1, got {top_k}")
    k = min(top_k, head.vocab_size)
    rows = max(1, max_elements // head.vocab_size)
    probs_out, ids_out, ranks, actual = [], [], [], []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            probs = torch.softmax(lens_logits(head, hidden[start:start + rows]).float(), dim=-1)
            top = torch.topk(probs, k, dim=-1)
            probs_out.append(top.values.cpu())
            ids_out.append(top.indices.cpu())
            if next_ids is not None:
                nxt = next_ids[start:start + rows].to(probs.device).long()[:, None]
                p = probs.gather(1, nxt)
                ranks.append(((probs > p).sum(dim=-1) + 1).cpu())
                actual.append(p[:, 0].cpu())
    empty = torch.zeros(0, k)
    return LensResult(
        top_probs=torch.cat(probs_out) if probs_out else empty,
        top_ids=torch.cat(ids_out) if ids_out else empty.long(),
        actual_rank=(torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)) if next_ids is not None else None,
        actual_prob=(torch.cat(actual) if actual else torch.zeros(0)) if next_ids is not None else None,
    )


# ---------------------------------------------------------------------------------------------------
# Attention probabilities

def attention_module(model: nn.Module, layer: int) -> nn.Module:
    """The self-attention child of decoder block `layer` (the module HF's output_attentions records)."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise LensError(f"layer {layer} is out of range for a model with {len(layers)} layers (0-{len(layers) - 1})")
    block = layers[layer]
    for name in ATTENTION_NAMES:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise LensError(f"cannot find the attention module of {type(block).__name__} "
                    f"(children: {', '.join(n for n, _ in block.named_children())})")


def attn_implementation(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


class AttentionCapture(HookManager):
    """Attention probabilities [batch, heads, query, key] at chosen layers, from the attention modules' outputs.

        with AttentionCapture(model, layers=[0, 3], reduce=lambda L, w: w.float().cpu()) as cap:
            run_forward(model, input_ids=ids)
        cap.probs[3]                          # what reduce returned for layer 3

    Only eager attention materialises probabilities (SDPA / flash return None): load the model with
    attn_implementation="eager". Only the chosen layers are kept, unlike output_attentions=True.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int],
                 reduce: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        super().__init__(model)
        impl = attn_implementation(model)
        if impl not in (None, "eager"):
            raise LensError(f"attention probabilities need eager attention, but this model uses {impl!r}: "
                            f"load it with attn_implementation='eager'")
        self.layers = sorted(set(int(l) for l in layers))
        self.modules = {layer: attention_module(model, layer) for layer in self.layers}
        self.reduce = reduce
        self.probs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "AttentionCapture":
        self.probs = {}
        for layer, mod in self.modules.items():
            self.add_forward_hook(mod, self._grab(layer))
        return self

    def _grab(self, layer: int):
        def fn(_m, _i, out):
            weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise LensError(f"layer {layer}: the attention module returned no probabilities "
                                f"(load the model with attn_implementation='eager')")
            w = weights.detach()
            self.probs[layer] = self.reduce(layer, w) if self.reduce is not None else w
        return fn
