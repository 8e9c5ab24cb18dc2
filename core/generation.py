"""Generation mechanics on an already-loaded HF model (no files, no CLI): batched generation.

    GenerationResult(ids, stop_reason, monitor, interventions)   generated ids (stop/pad removed) and
                                                  "eos" | "length" | "monitor" (a stop-when hit, core.interventions)
    generate_batch(model, prompt_ids, pad_id, max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
                   stop_ids=None, row_seeds=None, interventions=None, skip_ids=()) -> [GenerationResult]
                                                  one `model.generate` call (interventions hooked for it)
    generate_in_batches(model, prompt_ids, batch_size, ...) -> ([GenerationResult], batch size that fit)
                                                  chunks of batch_size; a CUDA out-of-memory halves it and retries
    config_stop_ids(model, generation_config=None)   the generation config's eos ids (the default stop ids)
    auto_batch_size(model, seq_len)             a batch size that fits the free accelerator memory (8 on CPU)
    left_pad(prompt_ids, pad_id, device)        -> (input_ids, attention_mask)
    SeededSampler                               logits processor: temperature + top-p + a per-row seeded draw
    check_sampling(max_new_tokens, temperature, top_p, error=GenerationError)   the shared argument checks

Greedy decoding is plain HF `generate` with left padding and an attention mask (HF derives the position
ids from the mask), so batched output equals one-prompt-at-a-time output.

Sampling is reproducible per prompt: instead of `torch.multinomial` on the batch (whose random stream
depends on batch size and order), each row's random numbers are a pure function of
(row seed, step, token id) and the token is an argmax over them (the Gumbel-max trick, written as an
exponential race, draws exactly from softmax(logits / temperature) restricted to the top-p nucleus). The same prompt with the same row seed
therefore gives the same sample whatever the batch size, the batch neighbours, the padding or the
machine (the noise is integer arithmetic; only the logits themselves may differ across hardware).
Top-k is not applied.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from core.errors import TraitError, is_oom
from core.hooks import input_device, text_config
from core.interventions import STOP_MONITOR, Intervention, Interventions

STOP_EOS = "eos"
STOP_LENGTH = "length"
CPU_BATCH_SIZE = 8
MAX_AUTO_BATCH_SIZE = 128


@dataclass(frozen=True)
class GenerationResult:
    ids: list[int]      # generated ids only: no prompt, no stop token, no padding
    stop_reason: str    # "eos" (a stop id was generated), "length" (max_new_tokens reached) or "monitor"
    monitor: dict | None = None           # stop_reason "monitor": {trait, layer, token_index, score, threshold}
    interventions: list | None = None     # Interventions.record(row): each one's numbers for this row


def config_stop_ids(model=None, generation_config=None) -> list[int]:
    """The eos ids of a generation config: `generation_config`, else the model's (the default stop ids).

    The one place that reads eos ids from a generation config; utils.model.stop_token_ids adds the
    tokenizer's end-of-turn tokens to these.
    """
    gen = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return [int(e) for e in eos if e is not None]


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest prompt: generation appends on the right, so every row's last real token is aligned."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


# ---- counter-based noise: uniform(row seed, step, token) from 32-bit integer hashing -------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (split c into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons): good avalanche, integer-only, so identical on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """[B, V] floats in (0, 1), a pure function of (row seed, step, token id)."""
    device = row_seeds.device
    row = _hash32((row_seeds.to(torch.int64) & _M32) ^ int(_hash32(torch.tensor(step + 0x632BE5AB)).item()))
    tok = _hash32(torch.arange(vocab_size, device=device, dtype=torch.int64) * 2 + 1)
    x = _hash32(row[:, None] ^ tok[None, :])
    x = _hash32((x + row[:, None]) & _M32)
    # 23 bits: (k + 0.5) / 2**23 is exact in float32, so u is never 0 or 1 and u - 1 is exact as well
    return ((x >> 9).to(torch.float32) + 0.5) / float(1 << 23)


def mix_seed(seed: int, index: int) -> int:
    """A 32-bit row seed from a base seed and a row index (used when no per-row seeds are given)."""
    return int(_hash32(torch.tensor((int(seed) * 0x9E3779B1 + index) & _M32)).item())


class SeededSampler(LogitsProcessor):
    """Temperature, top-p, then a per-row seeded exponential race: greedy argmax of the result is a sample.

        LogitsProcessorList([SeededSampler(0.7, 0.9, row_seeds, prompt_len)]) with do_sample=False
    """

    def __init__(self, temperature: float, top_p: float, row_seeds: torch.Tensor, prompt_len: int):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.row_seeds = row_seeds
        self.prompt_len = int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.to(torch.float32) / self.temperature
        if self.top_p < 1.0:
            # the smallest set of tokens whose probability reaches top_p (the most likely one always stays)
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_scores.softmax(dim=-1)
            cum = probs.cumsum(dim=-1)
            drop_sorted = (cum - probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        step = input_ids.shape[1] - self.prompt_len  # tokens generated so far: independent of padding
        u = seeded_uniform(self.row_seeds.to(scores.device), step, scores.shape[-1])
        # exponential race, the same draw as Gumbel-max: argmax(s - log E) == argmax(exp(s - max) / E),
        # E = -log(u) ~ Exp(1) (log1p of the exact u - 1). Masked tokens get exp(-inf) = 0 and never win.
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        return weights / -torch.log1p(u - 1.0)


# ---- generation ---------------------------------------------------------------------------------------------
class GenerationError(TraitError):
    """Generation arguments that cannot work (max_new_tokens, temperature, top_p, prompts, row seeds)."""


def check_sampling(max_new_tokens, temperature, top_p, error: type[TraitError] = GenerationError) -> None:
    """The checks every generation loop shares (batched here, streamed in core.streaming); raises `error`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise error(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0.0 or temperature == float("inf"):
        raise error(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise error(f"top_p must be in (0, 1], got {top_p!r}")


def _check(prompt_ids, max_new_tokens, temperature, top_p, row_seeds) -> None:
    check_sampling(max_new_tokens, temperature, top_p)
    if any(len(p) == 0 for p in prompt_ids):
        raise GenerationError("every prompt needs at least one token id")
    if row_seeds is not None and len(row_seeds) != len(prompt_ids):
        raise GenerationError(f"row_seeds has {len(row_seeds)} entries for {len(prompt_ids)} prompts")


@torch.inference_mode()
def generate_batch(model, prompt_ids: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop_ids: Sequence[int] | None = None, row_seeds: Sequence[int] | None = None,
                   interventions: Sequence[Intervention] | None = None, skip_ids: Sequence[int] = ()
                   ) -> list[GenerationResult]:
    """Generate for all prompts in one left-padded `model.generate` call.

    temperature 0 is greedy (top_p and seeds unused). With temperature > 0, row r uses seed
    `row_seeds[r]`, else `mix_seed(seed, r)`, else a fresh random seed. stop_ids default to the
    model's generation_config eos ids; generation of a row ends at the first stop id, which is not
    returned (stop_reason "eos"); rows that never stop return max_new_tokens ids ("length").
    `interventions` (core.interventions, vectors resolved) act during the call; relative amounts use each
    row's own prompt norm (special tokens `skip_ids` excluded); a stop-when monitor ends its row after the
    token that crossed (stop_reason "monitor", the hit in `monitor`).
    """
    if not prompt_ids:
        return []
    _check(prompt_ids, max_new_tokens, temperature, top_p, row_seeds)
    stops = [int(s) for s in stop_ids] if stop_ids else config_stop_ids(model)
    input_ids, attention_mask = left_pad(prompt_ids, pad_id, input_device(model))
    kwargs: dict = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                        do_sample=False, pad_token_id=int(pad_id), eos_token_id=stops or None)
    if temperature > 0:
        if row_seeds is None:
            base = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            row_seeds = [mix_seed(base, r) for r in range(len(prompt_ids))]
        seeds = torch.tensor([int(s) & _M32 for s in row_seeds], dtype=torch.int64, device=input_ids.device)
        kwargs["logits_processor"] = LogitsProcessorList(
            [SeededSampler(temperature, top_p, seeds, input_ids.shape[1])])
    iv = Interventions(model, interventions or [])
    if iv:
        from transformers import StoppingCriteriaList

        iv.start(input_ids, attention_mask, skip_ids)
        kwargs["stopping_criteria"] = StoppingCriteriaList([iv.stopping_criteria()])
    with iv.active() if iv else contextlib.nullcontext():
        out = model.generate(**kwargs)
    new = out[:, input_ids.shape[1]:].tolist()
    stop_set = set(stops)
    results = []
    for r, row in enumerate(new):
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        hit = iv.hits[r] if iv else None
        record = iv.record(r) if iv else None
        if hit is not None and hit["token_index"] < (cut if cut is not None else len(row)):
            # the monitor fired on a kept token: that token is the last one
            results.append(GenerationResult(row[:hit["token_index"] + 1], STOP_MONITOR, hit, record))
        elif cut is not None:
            # after a row stops, HF fills it with pad ids: cutting at the first stop id removes both
            results.append(GenerationResult(row[:cut], STOP_EOS, None, record))
        else:
            results.append(GenerationResult(row, STOP_LENGTH, None, record))
    return results


def generate_in_batches(model, prompt_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                        max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                        seed: int | None = None, stop_ids: Sequence[int] | None = None,
                        row_seeds: Sequence[int] | None = None, interventions: Sequence[Intervention] | None = None,
                        skip_ids: Sequence[int] = ()) -> tuple[list[GenerationResult], int]:
    """generate_batch over chunks of batch_size; an out-of-memory halves the size and retries that chunk.

    Returns the results in prompt order and the batch size that last worked (callers keep it for later calls).
    Sampling draws do not depend on the chunking (per-row seeds), so the results are the same for any size.
    """
    if temperature > 0 and row_seeds is None:
        base = seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        row_seeds = [mix_seed(base, r) for r in range(len(prompt_ids))]
    batch_size = max(1, int(batch_size))
    results: list[GenerationResult] = []
    start = 0
    while start < len(prompt_ids):
        chunk = slice(start, start + batch_size)
        oom = False
        try:
            results += generate_batch(model, prompt_ids[chunk], pad_id, max_new_tokens, temperature, top_p,
                                      None, stop_ids, None if row_seeds is None else row_seeds[chunk],
                                      interventions, skip_ids)
            start += batch_size
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            oom = True
        if oom:  # outside the except block, so the traceback (and the tensors it holds) is already freed
            batch_size = max(1, batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results, batch_size


def auto_batch_size(model, seq_len: int, cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """How many sequences of seq_len (prompt + new tokens) fit in the free memory of the input device.

    Per sequence: the KV cache, one layer's prefill activations and two rows of fp32 logits, plus 20%.
    CPU (and other non-CUDA devices): CPU_BATCH_SIZE.
    """
    device = input_device(model)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _total = torch.cuda.mem_get_info(device)
    cfg = text_config(model)
    hidden = int(getattr(cfg, "hidden_size", 4096))
    heads = int(getattr(cfg, "num_attention_heads", 32))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    layers = int(getattr(cfg, "num_hidden_layers", 32))
    inter = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 32000))
    elt = 2 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else 4
    kv = 2 * layers * kv_heads * head_dim * seq_len * elt
    act = seq_len * (4 * hidden + 2 * inter) * elt + heads * seq_len * seq_len * 4
    per_seq = 1.2 * (kv + act + 2 * vocab * 4)
    return max(1, min(cap, int(0.8 * free // per_seq)))
