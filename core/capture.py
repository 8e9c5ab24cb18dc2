"""Batched prefill capture: token sequences in, per-sequence activations out, under a token budget, OOM-safe.

    capture_sequences(model, sequences, layers, components, pad_id, ...) -> Iterator[(index, {layer: {component: Tensor[n, H]}})]
                                           length-sorted batches, right padding, one GPU->CPU copy per batch,
                                           tensors that own their storage, halve-and-retry on out-of-memory,
                                           pipelined: the copy and the caller's writes overlap the next forward
    CopyPipeline(streams, depth)           reused device buffers -> side-stream copy -> pinned host ring of `depth`
    CudaStreams / SyncStreams              the stream/event interface: CUDA side streams, or synchronous (CPU, tests)
    DeviceRing / HostRing                  the reused buffers; a host slot is reused only after release()
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

import collections
import gc
import math
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


# ---- the copy pipeline: forward -> device buffer -> (side stream) -> pinned host ring -> consumer ----------------
#
# A stream object gives the pipeline three things: copy(dst, src) -> event (the device-to-host copy, ordered after
# the forward that filled src), wait(event, device) (the compute stream waits for an event on the device, no host
# sync), and `copies` (False: the buffer the forward fills already is a host tensor, so nothing is copied).
# Events have synchronize() and query(). CudaStreams is the real one; SyncStreams runs everything at once on the
# calling thread (the CPU default, and what tests drive the ring logic with).


class DoneEvent:
    """An event whose work has finished: what synchronous streams return."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


DONE = DoneEvent()


class SyncStreams:
    """Streams that run every copy at once on the calling thread (CPU). `copies=False` (the CPU default) lets the
    forward write straight into the host ring, so the CPU path pays for no extra copy."""

    def __init__(self, copies: bool = False):
        self.copies = copies
        self.pin_memory = False

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> DoneEvent:
        dst.copy_(src)
        return DONE

    def wait(self, event, device: torch.device) -> None:
        return None


class CudaStreams:
    """Device-to-host copies on one side stream per device, non_blocking into pinned memory, each with an event."""

    copies = True
    pin_memory = True

    def __init__(self):
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        compute = torch.cuda.current_stream(src.device)
        side = self._side.get(src.device)
        if side is None:
            side = self._side[src.device] = torch.cuda.Stream(device=src.device)
        side.wait_stream(compute)        # after the forward's writes into src, ordered on the device (no host sync)
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        src.record_stream(side)          # if src's memory is freed (a larger buffer replaces it), the allocator
        return event                     # hands it out again only after this copy

    def wait(self, event, device: torch.device) -> None:
        torch.cuda.current_stream(device).wait_event(event)


def default_streams(device: torch.device) -> SyncStreams | CudaStreams:
    return CudaStreams() if torch.device(device).type == "cuda" else SyncStreams()


class DeviceRing:
    """`n` device buffers used in turn, each reused while its dtype, device and size fit. Before a buffer is written
    again the compute stream waits (on the device) for the copy that last read it; on out-of-memory clear() drops
    them so the halved retry has the memory back."""

    def __init__(self, n: int, streams):
        self.streams, self.bufs, self.read = streams, [None] * n, [None] * n
        self.next = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[int, torch.Tensor]:
        k, numel = self.next, math.prod(shape)
        self.next = (k + 1) % len(self.bufs)
        buf = self.bufs[k]
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.bufs[k] = None  # a buffer a copy still reads is kept by that copy (record_stream on CUDA)
            buf = self.bufs[k] = torch.empty(numel, dtype=dtype, device=device)
        elif self.read[k] is not None:
            self.streams.wait(self.read[k], device)
        self.read[k] = None
        return k, buf[:numel].view(shape)

    def read_by(self, k: int, event) -> None:
        self.read[k] = event

    def clear(self) -> None:
        self.bufs, self.read = [None] * len(self.bufs), [None] * len(self.bufs)


class RingReuseError(RuntimeError):
    """A host ring slot was asked for while its batch was still being consumed (a bug in the pipeline)."""


class HostRing:
    """`depth` host buffers (pinned for CUDA copies) handed out in turn; a slot is handed out again only after
    release(slot), i.e. after its consumer has cloned what it keeps. `taken` logs the slots in hand-out order."""

    def __init__(self, depth: int, pin_memory: bool):
        if depth < 1:
            raise ValueError(f"pipeline depth must be at least 1, got {depth}")
        self.pin, self.bufs, self.busy = pin_memory, [None] * depth, [False] * depth
        self.next, self.taken = 0, []

    def take(self, numel: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        k = self.next
        if self.busy[k]:
            raise RingReuseError(f"host ring slot {k} of {len(self.bufs)} is still held by an unconsumed batch")
        buf = self.bufs[k]
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self.bufs[k] = None
            buf = self.bufs[k] = torch.empty(numel, dtype=dtype, pin_memory=self.pin)
        self.busy[k], self.next = True, (k + 1) % len(self.bufs)
        self.taken.append(k)
        return k, buf[:numel]

    def release(self, k: int) -> None:
        self.busy[k] = False


@dataclass
class InFlight:
    indices: list[int]       # the batch's sequences, in batch order
    host: torch.Tensor       # [layers x components, real tokens, H] on the CPU: valid once `event` has completed
    event: object
    slot: int                # the host ring slot `host` lives in


class CopyPipeline:
    """One capture call's buffers: the forward writes a batch into buffer(), launch() starts its copy to the host
    ring and returns an InFlight; emit() waits for the copy, clones each sequence out and then frees the slot.
    With depth d, up to d - 1 batches are in flight while the next forward runs (capture_sequences' lag)."""

    def __init__(self, streams, depth: int):
        self.streams, self.depth = streams, depth
        self.host = HostRing(depth, streams.pin_memory)
        self.device = DeviceRing(min(2, depth), streams) if streams.copies else None
        self._open: tuple[int | None, int | None] = (None, None)   # (device slot, host slot) of the batch being filled

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.device is not None:
            k, buf = self.device.take(shape, dtype, device)
            self._open = (k, None)
            return buf
        if device.type != "cpu":
            raise ValueError(f"streams that do not copy need a CPU buffer, got one on {device}")
        k, flat = self.host.take(math.prod(shape), dtype)
        self._open = (None, k)
        return flat.view(shape)

    def launch(self, indices: list[int], buf: torch.Tensor) -> InFlight:
        dev_slot, host_slot = self._open
        self._open = (None, None)
        if self.device is None:
            return InFlight(indices, buf, DONE, host_slot)
        host_slot, flat = self.host.take(buf.numel(), buf.dtype)
        try:
            host = flat.view(buf.shape)
            event = self.streams.copy(host, buf)
        except BaseException:
            self.host.release(host_slot)
            raise
        self.device.read_by(dev_slot, event)
        return InFlight(indices, host, event, host_slot)

    def abort(self, oom: bool) -> None:
        """The batch being filled failed: give back its host slot; after out-of-memory also the device buffers."""
        _, host_slot = self._open
        self._open = (None, None)
        if host_slot is not None:
            self.host.release(host_slot)
        if oom and self.device is not None:
            self.device.clear()

    def emit(self, fl: InFlight, lengths: Sequence[int], keys: list[tuple[int, str]]
             ) -> Iterator[tuple[int, dict[int, dict[str, torch.Tensor]]]]:
        fl.event.synchronize()  # the copy has landed; before this the host slot holds an older batch
        try:
            offset = 0
            for i in fl.indices:
                n = lengths[i]
                acts: dict[int, dict[str, torch.Tensor]] = {}
                for k, (layer, comp) in enumerate(keys):
                    # clone: a slice is a view of a reused ring slot, and torch.save of a view writes the whole
                    # slot's storage.
                    acts.setdefault(layer, {})[comp] = fl.host[k, offset:offset + n].clone()
                offset += n
                yield i, acts
        finally:
            self.host.release(fl.slot)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory with non_blocking, so the host does not wait for
    the previous batch's forward (a pageable copy would)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _forward_batch(model: nn.Module, seqs: list[list[int]], layers: list[int], components: list[str],
                   pad_id: int, out_dtype: torch.dtype | None,
                   buffer: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]) -> torch.Tensor:
    """One right-padded forward; fills and returns buffer(...) [layers x components, real tokens, H] on the device.

    Only real tokens are kept (pad_batch's order), so padding never crosses to the CPU. Nothing here waits for
    the device: the copy to the host is the pipeline's (CopyPipeline.launch).
    """
    device = input_device(model)
    batch = pad_batch(seqs, pad_id)
    B, S = len(seqs), batch.seq_len
    real = _to_device(batch.real, device)
    real_on: dict[torch.device, torch.Tensor] = {real.device: real}
    slots = {(layer, comp): k for k, (layer, comp) in enumerate((l, c) for l in layers for c in components)}
    buf: list[torch.Tensor] = []
    filled: set[tuple[int, str]] = set()

    def keep(layer: int, comp: str, t: torch.Tensor) -> None:
        # Write into one buffer so the whole batch crosses to the CPU in a single copy.
        if not buf:
            buf.append(buffer((len(slots), len(batch.real), t.shape[-1]), out_dtype or t.dtype, t.device))
        idx = real_on.get(t.device)
        if idx is None:
            idx = real_on[t.device] = real.to(t.device)
        buf[0][slots[(layer, comp)]].copy_(t.reshape(B * S, -1).index_select(0, idx))
        filled.add((layer, comp))
        return None

    with ActivationCapture(model, layers, components, stop_after_last=True, on_capture=keep):
        run_forward(model, input_ids=_to_device(batch.ids, device), attention_mask=_to_device(batch.mask, device),
                    use_cache=False)
    if len(filled) != len(slots):
        missing = sorted(set(slots) - filled)
        raise RuntimeError(f"capture hooks did not run during the forward for {missing[:3]}")
    return buf[0]


def capture_sequences(model: nn.Module, sequences: list[list[int]], layers: list[int], components: list[str],
                      pad_id: int, max_batch_tokens: int | None = None, batch_size: int | None = None,
                      out_dtype: torch.dtype | None = None,
                      on_batch: Callable[[BatchReport], None] | None = None,
                      depth: int | None = None, streams=None,
                      ) -> Iterator[tuple[int, dict[int, dict[str, torch.Tensor]]]]:
    """Capture `components` at `layers` for every sequence; yields (index into `sequences`, activations) per sequence.

        for i, acts in capture_sequences(model, [[1, 5, 9], [1, 7]], layers=[0, 3], components=["residual"], pad_id=0):
            acts[3]["residual"]          # Tensor[len(sequences[i]), hidden], on the CPU, owning its storage

    Sequences are batched by run_batches (longest first, under `max_batch_tokens` padded tokens, default
    default_max_batch_tokens, at most `batch_size` sequences, halve-and-retry on out-of-memory).
    `out_dtype` casts on the device before the copy (default: the model's activation dtype).

    Pipelined (CopyPipeline): a batch's activations land in a reused device buffer, are copied on a side stream into
    a pinned host ring `depth` batches deep (default 2 on CUDA, 1 on CPU) and are yielded once the next
    depth - 1 forwards are launched, so the copy and the caller's writes overlap the next forward. `streams`
    defaults to CudaStreams on CUDA and SyncStreams on CPU. When the batching stops with an error, the batches
    already done are still yielded first.
    """
    if not sequences:
        return
    if any(len(s) == 0 for s in sequences):
        raise ValueError(f"sequence {next(i for i, s in enumerate(sequences) if not s)} is empty")
    layers = sorted(set(int(l) for l in layers))
    components = list(dict.fromkeys(components))
    keys = [(l, c) for l in layers for c in components]
    lengths = [len(s) for s in sequences]
    streams = streams if streams is not None else default_streams(input_device(model))
    depth = depth if depth is not None else (2 if streams.copies else 1)
    pipe = CopyPipeline(streams, depth)
    on_device = len(pipe.device.bufs) if pipe.device is not None else 1  # capture buffers held on the device
    budget = max_batch_tokens or default_max_batch_tokens(model, len(keys) * on_device, max(lengths))

    def forward(idx: list[int]) -> InFlight:
        try:
            buf = _forward_batch(model, [sequences[i] for i in idx], layers, components, pad_id, out_dtype,
                                 pipe.buffer)
            return pipe.launch(idx, buf)
        except BaseException as e:
            pipe.abort(oom=isinstance(e, RuntimeError) and is_oom(e))
            raise

    pending: collections.deque[InFlight] = collections.deque()
    batches = run_batches(lengths, forward, budget, batch_size, on_batch)
    while True:
        try:
            _, fl = next(batches)
        except StopIteration:
            break
        except Exception:
            while pending:  # the finished batches are the caller's before the error is
                yield from pipe.emit(pending.popleft(), lengths, keys)
            raise
        pending.append(fl)
        while len(pending) >= depth:
            yield from pipe.emit(pending.popleft(), lengths, keys)
    while pending:
        yield from pipe.emit(pending.popleft(), lengths, keys)
