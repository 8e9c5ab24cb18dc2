"""Batched prefill capture: token sequences in, per-sequence activations out, under a token budget, OOM-safe.

    capture_sequences(model, sequences, layers, components, pad_id, ...) -> Iterator[(index, {layer: {component: Tensor[n, H]}})]
                                           length-sorted batches, right padding, one GPU->CPU copy per batch,
                                           tensors that own their storage, halve-and-retry on out-of-memory
    run_batches(lengths, forward, max_batch_tokens, ...) -> Iterator[(indices, result)]
                                           the batching loop alone, for any per-batch forward (capture, fused scoring)
    pad_batch(seqs, pad_id) -> PaddedBatch right-padded ids and mask, and the flat positions of the real tokens
    to_host(tensor, staging) -> Tensor     one device-to-host copy, through a pinned buffer reused across batches
    plan_batch(lengths, order, start, max_batch_tokens, cap) -> int   how many sequences the next batch takes
    default_max_batch_tokens(model, n_captured, max_len) -> int       from free memory on CUDA, CPU_BATCH_TOKENS on CPU
    BatchReport                            what on_batch receives after every forward attempt
    CaptureOOMError                        out of memory with a single sequence: carries the sequence's index

Why right padding: with a causal mask a real token only attends to earlier positions, which are all real,
and position ids count from 0 as in an unbatched forward; so padding never reaches a real token's
activations (batched == one by one, up to float summation order). No model file knowledge lives here.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from core.errors import is_oom
from core.hooks import ActivationCapture, input_device, run_forward, text_config

CPU_BATCH_TOKENS = 4096      # padded tokens per batch on CPU: large enough to amortise, small enough for RAM
GROW_AFTER = 4               # successful batches after an OOM before the batch cap doubles again
_CUDA_BUDGET_RANGE = (256, 1 << 18)

T = TypeVar("T")


class CaptureOOMError(RuntimeError):
    """Out of memory on a batch of one sequence: nothing smaller to retry. `index` is the sequence's index."""

    def __init__(self, index: int, n_tokens: int):
        super().__init__(f"out of memory capturing sequence {index} ({n_tokens} tokens) even at batch size 1")
        self.index = index
        self.n_tokens = n_tokens


@dataclass(frozen=True)
class BatchReport:
    indices: list[int]       # positions in `sequences` of this batch
    tokens: int              # real tokens
    padded_tokens: int       # batch size x longest sequence
    ok: bool                 # False: out of memory, the batch will be retried halved
    seconds: float


def default_max_batch_tokens(model: nn.Module, n_captured: int, max_len: int) -> int:
    """A padded-token budget per batch: CPU_BATCH_TOKENS on CPU; on CUDA half the free memory over a per-token estimate.

    The estimate counts the capture buffer, the hidden/MLP intermediates and one attention row per head;
    it is deliberately rough because an out-of-memory batch is halved and retried anyway.
    """
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if not devices:
        return CPU_BATCH_TOKENS
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    cfg = text_config(model)
    hidden = int(getattr(cfg, "hidden_size", 4096))
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", 32))
    elem = model.get_input_embeddings().weight.element_size()
    per_token = elem * (n_captured * hidden + 8 * hidden + 3 * inter) + 4 * heads * max_len
    lo, hi = _CUDA_BUDGET_RANGE
    return max(lo, min(hi, int(0.5 * free / per_token)))


def plan_batch(lengths: Sequence[int], order: Sequence[int], start: int, max_batch_tokens: int,
               cap: int | None) -> int:
    """Sequences the batch starting at order[start] takes: padded tokens within budget, at most `cap`, at least 1.

    `order` is longest first, so the first sequence sets the padded length of the batch.
    """
    longest = lengths[order[start]]
    take = max(1, max_batch_tokens // max(1, longest))
    if cap is not None:
        take = min(take, cap)
    return max(1, min(take, len(order) - start))


def run_batches(lengths: Sequence[int], forward: Callable[[list[int]], T], max_batch_tokens: int,
                batch_size: int | None = None, on_batch: Callable[[BatchReport], None] | None = None,
                ) -> Iterator[tuple[list[int], T]]:
    """The batching loop: yields (indices of the batch's sequences, forward(indices)) after each successful forward.

        for idx, out in run_batches([len(s) for s in seqs], lambda idx: my_forward([seqs[i] for i in idx]), 4096):
            ...                           # idx is longest first; out is whatever my_forward returned

    Sequences go longest first, under `max_batch_tokens` padded tokens and at most `batch_size` per batch.
    On out-of-memory (core.errors.is_oom) the batch is halved and retried from the same sequence; after
    GROW_AFTER successes the cap doubles again (never above `batch_size`). One sequence that does not fit
    raises CaptureOOMError; any other error propagates. `on_batch` sees every attempt, failed ones included.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    cap, streak, start = batch_size, 0, 0
    while start < len(order):
        take = plan_batch(lengths, order, start, max_batch_tokens, cap)
        idx = order[start:start + take]
        t0 = time.perf_counter()
        oom = False
        try:
            result = forward(idx)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            oom = True  # leave the except block first: the traceback holds the batch's device tensors
        report = BatchReport(idx, sum(lengths[i] for i in idx), take * lengths[idx[0]], not oom,
                             time.perf_counter() - t0)
        if on_batch is not None:
            on_batch(report)
        if oom:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if take == 1:
                raise CaptureOOMError(idx[0], lengths[idx[0]])
            cap, streak = take // 2, 0
            continue
        yield idx, result
        del result
        start += take
        if cap is not None and (batch_size is None or cap < batch_size):
            streak += 1
            if streak >= GROW_AFTER:
                cap, streak = cap * 2 if batch_size is None else min(batch_size, cap * 2), 0


@dataclass(frozen=True)
class PaddedBatch:
    ids: torch.Tensor        # [B, S] long, right-padded with pad_id (CPU)
    mask: torch.Tensor       # [B, S] long attention mask, 1 on real tokens
    real: torch.Tensor       # [n real tokens] flat positions b * S + t of the real tokens, sequence by sequence
    seq_len: int             # S


def pad_batch(seqs: list[list[int]], pad_id: int) -> PaddedBatch:
    """Right-pad a batch; `real` lists sequence b's tokens at rows offset_b .. offset_b + len_b, in batch order."""
    B, S = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    real = torch.cat([torch.arange(len(s)) + b * S for b, s in enumerate(seqs)])
    return PaddedBatch(ids, mask, real, S)


def to_host(out: torch.Tensor, staging: dict | None = None) -> torch.Tensor:
    """`out` on the CPU in one copy. From CUDA the copy lands in a pinned buffer kept in `staging` and reused
    across batches (pageable device-to-host copies are several times slower): the result may be that reused
    buffer, so callers copy out what they keep before the next batch.
    """
    if out.device.type != "cuda":
        return out if out.device.type == "cpu" else out.to("cpu")
    staging = staging if staging is not None else {}
    pinned = staging.get("pinned")
    if pinned is None or pinned.dtype != out.dtype or pinned.numel() < out.numel():
        staging["pinned"] = pinned = torch.empty(out.numel(), dtype=out.dtype, pin_memory=True)
    host = pinned[:out.numel()].view(out.shape)
    host.copy_(out)
    return host


def _forward_batch(model: nn.Module, seqs: list[list[int]], layers: list[int], components: list[str],
                   pad_id: int, out_dtype: torch.dtype | None, staging: dict | None = None) -> torch.Tensor:
    """One right-padded forward; returns a CPU tensor [layers x components, real tokens, H], copied from the device once.

    Only real tokens are kept (pad_batch's order), so padding never crosses to the CPU; see to_host for the copy.
    """
    device = input_device(model)
    batch = pad_batch(seqs, pad_id)
    B, S, real = len(seqs), batch.seq_len, batch.real
    real_on: dict[torch.device, torch.Tensor] = {}
    slots = {(layer, comp): k for k, (layer, comp) in enumerate((l, c) for l in layers for c in components)}
    buf: list[torch.Tensor] = []
    filled: set[tuple[int, str]] = set()

    def keep(layer: int, comp: str, t: torch.Tensor) -> None:
        # Write into one device buffer so the whole batch crosses to the CPU in a single copy.
        if not buf:
            buf.append(torch.empty((len(slots), len(real), t.shape[-1]), dtype=out_dtype or t.dtype, device=t.device))
        idx = real_on.get(t.device)
        if idx is None:
            idx = real_on[t.device] = real.to(t.device)
        buf[0][slots[(layer, comp)]].copy_(t.reshape(B * S, -1).index_select(0, idx))
        filled.add((layer, comp))
        return None

    with ActivationCapture(model, layers, components, stop_after_last=True, on_capture=keep):
        run_forward(model, input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device), use_cache=False)
    if len(filled) != len(slots):
        missing = sorted(set(slots) - filled)
        raise RuntimeError(f"capture hooks did not run during the forward for {missing[:3]}")
    return to_host(buf[0], staging)


def capture_sequences(model: nn.Module, sequences: list[list[int]], layers: list[int], components: list[str],
                      pad_id: int, max_batch_tokens: int | None = None, batch_size: int | None = None,
                      out_dtype: torch.dtype | None = None,
                      on_batch: Callable[[BatchReport], None] | None = None,
                      ) -> Iterator[tuple[int, dict[int, dict[str, torch.Tensor]]]]:
    """Capture `components` at `layers` for every sequence; yields (index into `sequences`, activations) per sequence.

        for i, acts in capture_sequences(model, [[1, 5, 9], [1, 7]], layers=[0, 3], components=["residual"], pad_id=0):
            acts[3]["residual"]          # Tensor[len(sequences[i]), hidden], on the CPU, owning its storage

    Sequences are batched by run_batches (longest first, under `max_batch_tokens` padded tokens, default
    default_max_batch_tokens, at most `batch_size` sequences, halve-and-retry on out-of-memory). A batch's
    sequences are yielded as soon as its forward is done (so a caller can write them before the next batch runs).
    `out_dtype` casts on the device before the copy (default: the model's activation dtype).
    """
    if not sequences:
        return
    if any(len(s) == 0 for s in sequences):
        raise ValueError(f"sequence {next(i for i, s in enumerate(sequences) if not s)} is empty")
    layers = sorted(set(int(l) for l in layers))
    components = list(dict.fromkeys(components))
    lengths = [len(s) for s in sequences]
    budget = max_batch_tokens or default_max_batch_tokens(model, len(layers) * len(components), max(lengths))
    staging: dict = {}  # the pinned host buffer, reused by every batch of this call

    def forward(idx: list[int]) -> torch.Tensor:
        return _forward_batch(model, [sequences[i] for i in idx], layers, components, pad_id, out_dtype, staging)

    for idx, cpu in run_batches(lengths, forward, budget, batch_size, on_batch):
        offset = 0
        for i in idx:
            n = lengths[i]
            acts: dict[int, dict[str, torch.Tensor]] = {}
            for k, (layer, comp) in enumerate((l, c) for l in layers for c in components):
                # clone: a slice is a view (of a reused buffer on CUDA), and torch.save of a view writes the
                # whole batch's storage.
                acts.setdefault(layer, {})[comp] = cpu[k, offset:offset + n].clone()
            offset += n
            yield i, acts
        del cpu
