"""Fused scoring: per-token trait scores computed inside the prefill forward, on the device, with no activation
leaving it.

    ScoringSpec(component, vectors={layer: Tensor[K, H]}, dims=, dim_layers=, mean_layers=, mean_components=,
                store_dtype=)               what each batch computes; .deepest is the last block that has to run
    score_sequences(model, sequences, prompt_ends, spec, pad_id, max_batch_tokens=None, batch_size=None,
                    on_batch=None) -> Iterator[(indices, BatchScores)]
                                            core.capture.run_batches (length-sorted, token budget, OOM halving)
                                            around score_batch
    score_batch(model, seqs, prompt_ends, spec, pad_id, staging=None) -> BatchScores
                                            one right-padded forward that stops after spec.deepest; per hooked
                                            layer one stacked matmul for every vector there, the residual's token
                                            norms, the massive dims' values and per-side means; one host copy
    BatchScores                             one batch on the host: .scores(b, layer) [n, K], .norms(b, layer) [n],
                                            .dim_values(b, layer) [n, D], .means(b, side) {layer: {component: [H]}}
    calibrate_sequences(model, sequences, prompt_ends, stats, layers, pad_id, store_dtype=None, ...) -> int
                                            core.projection.MassiveDimStats accumulated on the device over each
                                            sequence's response tokens (its prompt tokens when the response is
                                            empty); nothing crosses to the host until stats.aggregate()

The numbers are the two-stage path's (capture, then project a raw file): each activation is first rounded to
the dtype a raw file would store (store_dtype; None keeps the model's), then scored in fp32 against
core.projection.unit_vectors; token norms are of the residual; a mean is the fp32 mean of the rounded values.
Only real tokens are reduced (core.capture.pad_batch), so padding never reaches a number. No files here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from core.capture import (BatchReport, default_max_batch_tokens, pad_batch, run_batches, to_host)
from core.hooks import COMPONENTS, ActivationCapture, HookError, input_device, run_forward
from core.projection import MassiveDimStats, score, unit_vectors

SIDES = ("prompt", "response")


@dataclass(frozen=True)
class ScoringSpec:
    """What a fused batch computes.

        spec = ScoringSpec("residual", vectors={6: torch.stack([v_a, v_b]), 9: v_c[None]}, dims=(12, 40),
                           dim_layers=(6,))
        spec.deepest          # 9: blocks after it never run (and neither does the LM head)

    `vectors[L]` are the rows scored at layer L (made unit length here), all in one matmul. `dims` are the
    hidden dims whose values of `component` are kept at each of `dim_layers` (the viewer's massive dims).
    `mean_layers` x `mean_components` ("residual" and/or `component`) get per-side means for the model diff.
    """

    component: str
    vectors: Mapping[int, torch.Tensor]
    dims: tuple[int, ...] = ()
    dim_layers: tuple[int, ...] = ()
    mean_layers: tuple[int, ...] = ()
    mean_components: tuple[str, ...] = ()
    store_dtype: torch.dtype | None = None
    units: Mapping[int, torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise HookError(f"unknown component {self.component!r} (choose from {', '.join(COMPONENTS)})")
        if not self.vectors and not self.mean_layers:
            raise HookError("nothing to score: no vectors and no mean layers")
        if set(self.dim_layers) - set(self.vectors):
            raise HookError(f"dim_layers {sorted(set(self.dim_layers) - set(self.vectors))} have no vectors")
        if set(self.mean_components) - {"residual", self.component}:
            raise HookError(f"mean_components must be residual and/or {self.component!r}, got {self.mean_components}")
        object.__setattr__(self, "units", {int(l): unit_vectors(v) for l, v in sorted(self.vectors.items())})

    @property
    def residual_layers(self) -> list[int]:
        """Residual hooks: every vector layer (token norms) and every mean layer."""
        return sorted(set(self.units) | set(self.mean_layers))

    @property
    def component_layers(self) -> list[int]:
        """Hooks on the projected component when it is not the residual."""
        if self.component == "residual":
            return []
        means = self.mean_layers if self.component in self.mean_components else ()
        return sorted(set(self.units) | set(means))

    @property
    def deepest(self) -> int:
        return self.residual_layers[-1]

    @cached_property
    def layout(self) -> "_Layout":
        return _Layout.of(self)


@dataclass(frozen=True)
class _Layout:
    """Columns of the per-token block [n_tokens, width] and slots of the means block [2 x batch, slots, H]."""

    score_cols: dict[int, tuple[int, int]]        # layer -> (first column, number of vectors)
    norm_cols: dict[int, int]                     # layer -> column of the residual's token norm
    dim_cols: dict[int, int]                      # layer -> first column of len(dims) massive-dim values
    width: int
    mean_slots: dict[tuple[int, str], int]        # (layer, component) -> slot

    @classmethod
    def of(cls, spec: ScoringSpec) -> "_Layout":
        col, score_cols, norm_cols, dim_cols = 0, {}, {}, {}
        for layer, u in spec.units.items():
            score_cols[layer] = (col, int(u.shape[0]))
            col += int(u.shape[0])
        for layer in spec.units:
            norm_cols[layer], col = col, col + 1
        for layer in sorted(spec.dim_layers):
            dim_cols[layer], col = col, col + len(spec.dims)
        slots = {(l, c): k for k, (l, c) in enumerate((l, c) for l in sorted(spec.mean_layers)
                                                      for c in sorted(spec.mean_components))}
        return cls(score_cols, norm_cols, dim_cols, col, slots)


@dataclass
class BatchScores:
    """One batch's results on the host. May view a pinned buffer reused by the next batch: copy what you keep."""

    spec: ScoringSpec
    tokens: torch.Tensor            # fp32 [real tokens, layout.width], sequence b at rows offsets[b] ...
    means_block: torch.Tensor       # fp32 [2 x batch, slots, H]: row 2b = sequence b's prompt, 2b + 1 its response
    offsets: list[int]
    lengths: list[int]
    stored_dtype: torch.dtype       # the dtype the activations were rounded to before scoring

    def _rows(self, b: int) -> slice:
        return slice(self.offsets[b], self.offsets[b] + self.lengths[b])

    def scores(self, b: int, layer: int) -> torch.Tensor:
        start, k = self.spec.layout.score_cols[layer]
        return self.tokens[self._rows(b), start:start + k]

    def norms(self, b: int, layer: int) -> torch.Tensor:
        return self.tokens[self._rows(b), self.spec.layout.norm_cols[layer]]

    def dim_values(self, b: int, layer: int) -> torch.Tensor:
        start = self.spec.layout.dim_cols[layer]
        return self.tokens[self._rows(b), start:start + len(self.spec.dims)]

    def means(self, b: int, side: str) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {component: fp32 [H]}} of one side (cloned: owns its storage); meaningless for an empty side."""
        row = 2 * b + SIDES.index(side)
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (layer, comp), slot in self.spec.layout.mean_slots.items():
            out.setdefault(layer, {})[comp] = self.means_block[row, slot].clone()
        return out


class _Reducer:
    """The hook callback of one batch: reduces each hooked tensor on its device into one output buffer."""

    def __init__(self, spec: ScoringSpec, seqs: list[list[int]], prompt_ends: Sequence[int], pad_id: int,
                 staging: dict):
        self.spec, self.layout, self.staging = spec, spec.layout, staging
        self.batch = pad_batch(seqs, pad_id)
        self.B, self.S, self.n = len(seqs), self.batch.seq_len, len(self.batch.real)
        sides = [torch.full((len(s),), 2 * b, dtype=torch.long) + (torch.arange(len(s)) >= pe).long()
                 for b, (s, pe) in enumerate(zip(seqs, prompt_ends))]
        self.segments = torch.cat(sides)                      # per real token: 2b (prompt) or 2b + 1 (response)
        self.counts = torch.bincount(self.segments, minlength=2 * self.B).clamp(min=1).to(torch.float64)
        self.buf: torch.Tensor | None = None
        self.hidden = 0
        self.stored_dtype: torch.dtype | None = None
        self.seen: set[tuple[int, str]] = set()
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _to(self, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on:
            self._on[key] = t.to(device)
        return self._on[key]

    def _unit(self, layer: int, device: torch.device) -> torch.Tensor:
        cache = self.staging.setdefault("units", {})   # the vectors move to the device once per run
        key = (layer, device)
        if key not in cache:
            cache[key] = self.spec.units[layer].to(device)
        return cache[key]

    def _views(self, hidden: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n_tok, n_slots = self.n * self.layout.width, len(self.layout.mean_slots)
        if self.buf is None:   # one buffer for everything, so the batch crosses to the host in a single copy
            self.hidden = hidden
            self.buf = torch.zeros(n_tok + 2 * self.B * n_slots * hidden, dtype=torch.float32, device=device)
        return (self.buf[:n_tok].view(self.n, self.layout.width),
                self.buf[n_tok:].view(2 * self.B, n_slots, hidden))

    def __call__(self, layer: int, comp: str, t: torch.Tensor) -> None:
        spec, lay = self.spec, self.layout
        x = t.reshape(self.B * self.S, -1).index_select(0, self._to("real", self.batch.real, t.device))
        if spec.store_dtype is not None:
            x = x.to(spec.store_dtype)
        self.stored_dtype = x.dtype
        x = x.to(torch.float32)
        tok, means = self._views(x.shape[-1], x.device)
        if comp == spec.component and layer in lay.score_cols:
            start, k = lay.score_cols[layer]
            tok[:, start:start + k].copy_(score(x, self._unit(layer, x.device)))
            if layer in lay.dim_cols:
                start = lay.dim_cols[layer]
                dims = self._to("dims", torch.tensor(spec.dims, dtype=torch.long), x.device)
                tok[:, start:start + len(spec.dims)].copy_(x.index_select(1, dims))
        if comp == "residual" and layer in lay.norm_cols:
            tok[:, lay.norm_cols[layer]].copy_(x.norm(dim=-1))
        slot = lay.mean_slots.get((layer, comp))
        if slot is not None:
            seg = self._to("segments", self.segments, x.device)
            sums = torch.zeros(2 * self.B, x.shape[-1], dtype=torch.float64, device=x.device).index_add_(
                0, seg, x.to(torch.float64))
            means[:, slot].copy_((sums / self._to("counts", self.counts, x.device)[:, None]).to(torch.float32))
        self.seen.add((layer, comp))
        return None

    def expected(self) -> set[tuple[int, str]]:
        comps = [(l, self.spec.component) for l in self.spec.component_layers]
        return {(l, "residual") for l in self.spec.residual_layers} | set(comps)


def _hooks(model: nn.Module, spec: ScoringSpec, reduce: Callable) -> contextlib.ExitStack:
    """Residual hooks that stop the forward after spec.deepest; the projected component's hooks when it differs."""
    stack = contextlib.ExitStack()
    if spec.component_layers:
        stack.enter_context(ActivationCapture(model, spec.component_layers, [spec.component],
                                              stop_after_last=False, on_capture=reduce))
    stack.enter_context(ActivationCapture(model, spec.residual_layers, ["residual"], stop_after_last=True,
                                          on_capture=reduce))
    return stack


def score_batch(model: nn.Module, seqs: list[list[int]], prompt_ends: Sequence[int], spec: ScoringSpec,
                pad_id: int, staging: dict | None = None) -> BatchScores:
    """One forward over a right-padded batch, reduced on the device; one copy of the results to the host."""
    staging = staging if staging is not None else {}
    reduce = _Reducer(spec, seqs, prompt_ends, pad_id, staging)
    device = input_device(model)
    with _hooks(model, spec, reduce):
        run_forward(model, input_ids=reduce.batch.ids.to(device), attention_mask=reduce.batch.mask.to(device),
                    use_cache=False)
    missing = reduce.expected() - reduce.seen
    if missing or reduce.buf is None:
        raise RuntimeError(f"fused scoring hooks did not run during the forward for {sorted(missing)[:3]}")
    host = to_host(reduce.buf, staging)
    n_tok = reduce.n * spec.layout.width
    lengths = [len(s) for s in seqs]
    offsets = [sum(lengths[:b]) for b in range(len(seqs))]
    return BatchScores(spec, host[:n_tok].view(reduce.n, spec.layout.width),
                       host[n_tok:].view(2 * len(seqs), len(spec.layout.mean_slots), reduce.hidden), offsets,
                       lengths, reduce.stored_dtype)


def _budget(model: nn.Module, sequences: Sequence[Sequence[int]], max_batch_tokens: int | None) -> int:
    # Two [tokens, hidden] tensors live per hook (the rounded copy and its fp32 view), not a capture buffer.
    return max_batch_tokens or default_max_batch_tokens(model, 2, max(len(s) for s in sequences))


def _check(sequences: Sequence[Sequence[int]], prompt_ends: Sequence[int]) -> None:
    if len(prompt_ends) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_ends)} prompt_ends")
    for i, (s, pe) in enumerate(zip(sequences, prompt_ends)):
        if not s:
            raise ValueError(f"sequence {i} is empty")
        if not 0 <= pe <= len(s):
            raise ValueError(f"sequence {i}: prompt_end {pe} is outside 0..{len(s)}")


def score_sequences(model: nn.Module, sequences: list[list[int]], prompt_ends: Sequence[int], spec: ScoringSpec,
                    pad_id: int, max_batch_tokens: int | None = None, batch_size: int | None = None,
                    on_batch: Callable[[BatchReport], None] | None = None,
                    ) -> Iterator[tuple[list[int], BatchScores]]:
    """Score every sequence; yields (indices into `sequences`, BatchScores) per batch, as soon as it is done.

        for idx, batch in score_sequences(model, seqs, ends, spec, pad_id=0):
            for b, i in enumerate(idx):
                batch.scores(b, 6)       # fp32 [len(seqs[i]), K]: sequence i's scores on layer 6's vectors

    Batching, the token budget (default: core.capture.default_max_batch_tokens) and out-of-memory halving are
    core.capture.run_batches'. Consume a batch before asking for the next (its host buffer may be reused).
    """
    if not sequences:
        return
    _check(sequences, prompt_ends)
    staging: dict = {}

    def forward(idx: list[int]) -> BatchScores:
        return score_batch(model, [sequences[i] for i in idx], [prompt_ends[i] for i in idx], spec, pad_id, staging)

    yield from run_batches([len(s) for s in sequences], forward, _budget(model, sequences, max_batch_tokens),
                           batch_size, on_batch)


def calibrate_batch(model: nn.Module, seqs: list[list[int]], prompt_ends: Sequence[int], stats: MassiveDimStats,
                    layers: Sequence[int], pad_id: int, store_dtype: torch.dtype | None = None) -> None:
    """Add one batch to `stats` on the device: each sequence's response tokens, its prompt tokens if none."""
    batch = pad_batch(seqs, pad_id)
    keep, seg = [], []
    for b, (s, pe) in enumerate(zip(seqs, prompt_ends)):
        lo, hi = (pe, len(s)) if len(s) > pe else (0, len(s))
        keep.append(torch.arange(lo, hi) + b * batch.seq_len)
        seg.append(torch.full((hi - lo,), b, dtype=torch.long))
    keep_t, seg_t = torch.cat(keep), torch.cat(seg)
    on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(layer: int, _comp: str, t: torch.Tensor) -> None:
        if t.device not in on:
            on[t.device] = (keep_t.to(t.device), seg_t.to(t.device))
        rows, segments = on[t.device]
        x = t.reshape(-1, t.shape[-1]).index_select(0, rows)
        stats.add(layer, x.to(store_dtype) if store_dtype is not None else x, segments, n_segments=len(seqs))
        return None

    device = input_device(model)
    with ActivationCapture(model, layers, ["residual"], stop_after_last=True, on_capture=add):
        run_forward(model, input_ids=batch.ids.to(device), attention_mask=batch.mask.to(device), use_cache=False)


def calibrate_sequences(model: nn.Module, sequences: list[list[int]], prompt_ends: Sequence[int],
                        stats: MassiveDimStats, layers: Sequence[int], pad_id: int,
                        store_dtype: torch.dtype | None = None, max_batch_tokens: int | None = None,
                        batch_size: int | None = None, on_batch: Callable[[BatchReport], None] | None = None) -> int:
    """calibrate_batch over every sequence (batched like score_sequences); returns the number of prompts added."""
    if not sequences:
        return 0
    _check(sequences, prompt_ends)

    def forward(idx: list[int]) -> MassiveDimStats:
        part = MassiveDimStats(stats.top_k)  # merged only once the forward succeeded: an OOM retry adds nothing twice
        calibrate_batch(model, [sequences[i] for i in idx], [prompt_ends[i] for i in idx], part, layers, pad_id,
                        store_dtype)
        return part

    n = 0
    for idx, part in run_batches([len(s) for s in sequences], forward, _budget(model, sequences, max_batch_tokens),
                                 batch_size, on_batch):
        stats.merge(part)
        n += len(idx)
    return n
