"""Interventions on the residual stream at a layer, acting on what each generated token's score says: relative
steering, capping, conditional steering and stopping. One module shared by batched generation
(core.generation), the token stream (core.streaming: the live chat and the OpenAI routes) and the model server.

    Amount(value, relative=False)          a number, or `value` x the prompt's mean residual norm at the layer ("Cx")
    Intervention(kind, layer, ...)         one edit or monitor, checked when built; `trait` names its vector,
                                           `vector` is filled in by the caller (with_vector)
    parse_intervention(kind, spec, flag)   the CLI / request grammar (below) -> Intervention without a vector
    Interventions(model, items)            the hooks for one generation:
        .start(input_ids, attention_mask=None, skip_ids=())   measure the prompt norms relative amounts need,
                                                               reset the per-row state (call once per generation)
        .active()                          context: the hooks on the model (enter per forward or once per generate)
        .hits[row]                         the first stop-when hit of each row: {trait, layer, token_index, score}
        .record(row) -> [dict]             JSON-ready: each intervention with its numbers resolved for that row
        .stopping_criteria()               an HF StoppingCriteria: a row ends once its monitor fired
    InterventionError                      a spec or argument that cannot work (a TraitError: exit 2)

Grammar (one string per intervention; TRAIT is category/name; a trailing `x` makes a number relative):
    steer       TRAIT:L:C[x][:all|prompt|response]      add C x v at layer L (v as given: the trait's unit vector)
    cap         TRAIT:L:MAX[x]   or   TRAIT:L:MIN[x]:MAX[x]   (either bound may be empty: TRAIT:L:-2:)
                clamp <h, u> (u = v / |v|) into [MIN, MAX] on every token, leaving h - <h, u> u unchanged
    steer_when  TRAIT:L:THRESHOLD:C[x][:each]           add C x v from the first generated token whose score at L
                exceeds THRESHOLD on (that token included); with `each` only on tokens whose score exceeds it
    stop_when   TRAIT:L:THRESHOLD                       end the response at the first generated token whose score
                at L exceeds THRESHOLD (that token is the last one kept); stop_reason "monitor"

Scores are the projection convention of core/projection.py: <residual output of block L at the token's own
position, u> in fp32, so a monitor fires on exactly the number capture + project give offline (for the same
forward; an edit at an earlier layer or earlier in the list at the same layer is part of it). Edits at one
layer run in the order given; the hooks are prepended, so every other observer of the block (the live
chat's score projector, HF's hidden-state recorder) sees the edited residual, as the next layer does.

A relative amount is `value` x the mean L2 norm of the unsteered residual at L over the prompt's tokens
(padding and `skip_ids`, e.g. the tokenizer's special tokens, excluded; all tokens when none remain), measured
per row by one capture pass over the prompt that stops after the deepest layer needed. record() states the
norm and the absolute number used, so `Cx` can be reproduced with the absolute `C x norm`.

Positions follow SteeringHook: a multi-token forward is the prompt (positions 0..width-1 of the left-padded
batch), each one-token forward continues it; generated token k sits at position width + k.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn

from core.errors import TraitError
from core.hooks import ActivationCapture, component_module, num_layers, run_forward

KINDS = ("steer", "cap", "steer_when", "stop_when")
FLAGS = {"steer": "--steer", "cap": "--cap", "steer_when": "--steer-when", "stop_when": "--stop-when"}
GRAMMAR = {"steer": "TRAIT:LAYER:COEF[x][:all|prompt|response]",
           "cap": "TRAIT:LAYER:MAX[x] or TRAIT:LAYER:MIN[x]:MAX[x]",
           "steer_when": "TRAIT:LAYER:THRESHOLD:COEF[x][:each]", "stop_when": "TRAIT:LAYER:THRESHOLD"}
POSITIONS = ("all", "prompt", "response")
STOP_MONITOR = "monitor"


class InterventionError(TraitError):
    """An intervention spec or argument that cannot work; the message names the flag or field."""


@dataclass(frozen=True)
class Amount:
    """A number, absolute or relative to the prompt's mean residual norm at the layer (`C x norm`)."""

    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise InterventionError(f"{self.value!r}: a finite number is required")

    def resolve(self, norm: float | None) -> float:
        return self.value * norm if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"

    @classmethod
    def parse(cls, text: str, what: str) -> "Amount":
        t = text.strip()
        rel = t.endswith("x")
        try:
            return cls(float(t[:-1] if rel else t), rel)
        except ValueError:
            raise InterventionError(f"{what}: {text!r} is not a number (a trailing x means times the layer's "
                                    f"mean residual norm over the prompt)") from None


@dataclass(frozen=True)
class Intervention:
    """One intervention at `layer` (see the module docstring); `vector` [hidden] is set before use."""

    kind: str
    layer: int
    trait: str | None = None
    vector: torch.Tensor | None = None
    coefficient: Amount | None = None      # steer, steer_when
    low: Amount | None = None              # cap
    high: Amount | None = None             # cap
    threshold: float | None = None         # steer_when, stop_when
    each: bool = False                     # steer_when: only on tokens over the threshold
    positions: str = "all"                 # steer

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InterventionError(f"unknown intervention {self.kind!r} (choose from {', '.join(KINDS)})")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InterventionError(f"{FLAGS[self.kind]}: layer must be a non-negative integer, got {self.layer!r}")
        if self.kind in ("steer", "steer_when") and self.coefficient is None:
            raise InterventionError(f"{FLAGS[self.kind]}: a coefficient is required")
        if self.kind == "cap":
            if self.low is None and self.high is None:
                raise InterventionError("--cap: give a maximum, a minimum or both")
            if (self.low is not None and self.high is not None and self.low.relative == self.high.relative
                    and self.low.value > self.high.value):
                raise InterventionError(f"--cap: minimum {self.low} is above maximum {self.high}")
        if self.kind in ("steer_when", "stop_when") and (
                self.threshold is None or not math.isfinite(self.threshold)):
            raise InterventionError(f"{FLAGS[self.kind]}: a finite threshold is required")
        if self.positions not in POSITIONS:
            raise InterventionError(f"{FLAGS[self.kind]}: positions must be all, prompt or response, "
                                    f"got {self.positions!r}")
        if self.vector is not None:
            if not isinstance(self.vector, torch.Tensor) or self.vector.ndim != 1:
                raise InterventionError(f"{FLAGS[self.kind]} {self.trait or ''}: the vector must be 1-D")
            if not bool(torch.isfinite(self.vector).all()) or float(self.vector.float().norm()) == 0.0:
                raise InterventionError(f"{FLAGS[self.kind]} {self.trait or ''}: the vector must be finite and "
                                        f"non-zero")

    def with_vector(self, vector: torch.Tensor) -> "Intervention":
        return replace(self, vector=vector.detach().to(torch.float32).cpu())

    @property
    def relative(self) -> bool:
        return any(a is not None and a.relative for a in (self.coefficient, self.low, self.high))

    def spec(self) -> str:
        """The intervention in the CLI grammar (a relative amount keeps its `x`)."""
        head = f"{self.trait or 'vector'}:{self.layer}"
        if self.kind == "steer":
            return f"{head}:{self.coefficient}" + (f":{self.positions}" if self.positions != "all" else "")
        if self.kind == "cap":
            if self.low is None:
                return f"{head}:{self.high}"
            return f"{head}:{self.low}:{'' if self.high is None else self.high}"
        if self.kind == "steer_when":
            return f"{head}:{self.threshold:g}:{self.coefficient}" + (":each" if self.each else "")
        return f"{head}:{self.threshold:g}"


def parse_intervention(kind: str, spec: str, flag: str | None = None) -> Intervention:
    """One spec string of the grammar above -> an Intervention without its vector (the caller resolves TRAIT)."""
    flag = flag or FLAGS.get(kind, kind)
    if kind not in KINDS:
        raise InterventionError(f"unknown intervention {kind!r} (choose from {', '.join(KINDS)})")
    if not isinstance(spec, str):
        raise InterventionError(f"{flag}: expected a string {GRAMMAR[kind]}, got {spec!r}")
    parts = spec.split(":")
    bad = InterventionError(f"{flag} {spec!r}: expected {GRAMMAR[kind]}")
    if len(parts) < 3 or not parts[0].strip():
        raise bad
    trait = parts[0].strip().strip("/")
    try:
        layer = int(parts[1])
    except ValueError:
        raise InterventionError(f"{flag} {spec!r}: LAYER must be an integer") from None
    rest = parts[2:]

    def amount(text: str, what: str) -> Amount:
        return Amount.parse(text, f"{flag} {spec!r} {what}")

    def number(text: str, what: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise InterventionError(f"{flag} {spec!r}: {what} must be a number, got {text!r}") from None
        if not math.isfinite(x):
            raise InterventionError(f"{flag} {spec!r}: {what} must be finite")
        return x

    if kind == "steer":
        if len(rest) > 2:
            raise bad
        positions = rest[1] if len(rest) == 2 else "all"
        return Intervention("steer", layer, trait, coefficient=amount(rest[0], "COEF"), positions=positions)
    if kind == "cap":
        if len(rest) == 1:
            return Intervention("cap", layer, trait, high=amount(rest[0], "MAX"))
        if len(rest) != 2:
            raise bad
        low = amount(rest[0], "MIN") if rest[0].strip() else None
        high = amount(rest[1], "MAX") if rest[1].strip() else None
        return Intervention("cap", layer, trait, low=low, high=high)
    if kind == "steer_when":
        if len(rest) not in (2, 3) or (len(rest) == 3 and rest[2] != "each"):
            raise bad
        return Intervention("steer_when", layer, trait, threshold=number(rest[0], "THRESHOLD"),
                            coefficient=amount(rest[1], "COEF"), each=len(rest) == 3)
    if len(rest) != 1:
        raise bad
    return Intervention("stop_when", layer, trait, threshold=number(rest[0], "THRESHOLD"))


def prompt_norms(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int],
                 skip_ids: Sequence[int] = ()) -> dict[int, torch.Tensor]:
    """{layer: [B] mean L2 norm of the residual at that layer over each row's real, non-skipped prompt tokens}.

    One forward (no hooks of ours but the capture) that stops after the deepest layer.
    """
    with ActivationCapture(model, list(layers), ["residual"]) as cap:
        run_forward(model, input_ids=input_ids, attention_mask=attention_mask)
    mask = attention_mask.bool()
    keep = mask.clone()
    for i in set(int(s) for s in skip_ids):
        keep &= input_ids != i
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, mask)   # only special tokens: use them all
    out = {}
    for layer in layers:
        h = cap.activations[layer]["residual"].to(torch.float32)
        norms = h.norm(dim=-1) * keep.to(h.device)
        out[layer] = (norms.sum(dim=1) / keep.sum(dim=1).to(h.device)).cpu()
    return out


class Interventions:
    """The hooks of one generation (a batch of rows); see the module docstring.

        iv = Interventions(model, [parse_intervention("cap", "a/b:3:2.5").with_vector(v)])
        iv.start(input_ids, attention_mask, skip_ids=tokenizer.all_special_ids)
        with iv.active():
            model.generate(input_ids=input_ids, attention_mask=attention_mask,
                           stopping_criteria=StoppingCriteriaList([iv.stopping_criteria()]), ...)
        iv.hits[0], iv.record(0)
    """

    def __init__(self, model: nn.Module, items: Sequence[Intervention]):
        self.model = model
        self.items = list(items)
        n = num_layers(model)
        hidden = int(model.get_input_embeddings().weight.shape[-1])
        for it in self.items:
            if it.vector is None:
                raise InterventionError(f"{FLAGS[it.kind]} {it.spec()}: no vector resolved for {it.trait!r}")
            if it.vector.shape[0] != hidden:
                raise InterventionError(f"{FLAGS[it.kind]} {it.spec()}: vector of size {it.vector.shape[0]}, "
                                        f"the model's hidden size is {hidden}")
            if it.layer >= n:
                raise InterventionError(f"{FLAGS[it.kind]} {it.spec()}: layer {it.layer} is out of range for a "
                                        f"model with {n} layers (0-{n - 1})")
        self.layers = sorted({it.layer for it in self.items})
        self._units = [it.vector / it.vector.norm() for it in self.items]
        self._placed: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.norms: dict[int, list[float]] = {}
        self.hits: list[dict | None] = []
        self._resolved: list[dict[str, torch.Tensor]] = []
        self.batch = 0

    def __bool__(self) -> bool:
        return bool(self.items)

    # --- per generation ----------------------------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              skip_ids: Sequence[int] = ()) -> "Interventions":
        """Measure the prompt norms (relative amounts only) and reset every row's state for a new generation."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.batch = int(input_ids.shape[0])
        need = sorted({it.layer for it in self.items if it.relative})
        norms = prompt_norms(self.model, input_ids, attention_mask, need, skip_ids) if need else {}
        self.norms = {layer: v.tolist() for layer, v in norms.items()}
        self._resolved = []
        for it in self.items:
            norm = norms.get(it.layer)
            r = {}
            for key in ("coefficient", "low", "high"):
                a = getattr(it, key)
                if a is not None:
                    r[key] = (torch.full((self.batch,), a.value, dtype=torch.float32) * norm if a.relative
                              else torch.full((self.batch,), a.value, dtype=torch.float32))
            self._resolved.append(r)
        self.hits = [None] * self.batch
        self._triggered = torch.zeros((len(self.items), self.batch), dtype=torch.bool)
        self._stopped = torch.zeros(self.batch, dtype=torch.bool)
        self._pos: dict[int, list] = {layer: [0, None, None] for layer in self.layers}   # offset, last seq, width
        return self

    def record(self, row: int = 0) -> list[dict]:
        """Each intervention with its numbers for `row` (relative ones: the norm and the absolute value used)."""
        out = []
        for it, r in zip(self.items, self._resolved or [{}] * len(self.items)):
            d: dict = {"kind": it.kind, "spec": it.spec(), "trait": it.trait, "layer": it.layer}
            if it.kind == "steer":
                d["positions"] = it.positions
            if it.threshold is not None:
                d["threshold"] = it.threshold
            if it.kind == "steer_when":
                d["each"] = it.each
            for key in ("coefficient", "low", "high"):
                a = getattr(it, key)
                if a is None:
                    continue
                d[key] = float(r[key][row]) if key in r else a.value
                if a.relative:
                    d[f"{key}_relative"] = a.value
            if it.relative and it.layer in self.norms:
                d["norm"] = self.norms[it.layer][row]
            out.append(d)
        return out

    def stopping_criteria(self):
        from transformers import StoppingCriteria

        owner = self

        class _MonitorStop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
                return owner._stopped.to(input_ids.device).clone()

        return _MonitorStop()

    # --- hooks -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self) -> Iterator["Interventions"]:
        """The hooks on the model for the duration of the context (state persists between contexts)."""
        if not self._resolved and self.items:
            raise InterventionError("Interventions.start() must be called before active()")
        handles = []
        try:
            for layer in self.layers:
                module = component_module(self.model, layer, "residual")
                handles.append(module.register_forward_hook(self._hook(layer), prepend=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _on(self, i: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, device, dtype)
        got = self._placed.get(key)
        if got is None:
            got = self._placed[key] = (self.items[i].vector.to(device=device, dtype=dtype),
                                       self._units[i].to(device=device, dtype=torch.float32))
        return got

    def _hook(self, layer: int):
        mine = [i for i, it in enumerate(self.items) if it.layer == layer]

        def fn(_m, _inputs, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            batch, seq = h.shape[0], h.shape[-2]
            pos = self._pos[layer]
            if seq > 1 or pos[2] is None:      # a prompt forward starts the sequence at position 0
                pos[0], pos[2] = 0, seq
            start, pos[0], pos[1] = pos[0], pos[0] + seq, seq
            width = pos[2]
            positions = torch.arange(start, start + seq, device=h.device)
            response = positions >= width                                       # [seq]
            if batch != self.batch:
                raise InterventionError(f"a forward of batch {batch} under interventions started for {self.batch}")
            for i in mine:
                h = self._apply(i, h, response, positions - width)
            if isinstance(out, tuple):
                return (h,) + tuple(out[1:])
            if isinstance(out, list):
                return [h] + list(out[1:])
            return h

        return fn

    def _apply(self, i: int, h: torch.Tensor, response: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        it, r = self.items[i], self._resolved[i]
        vec, unit = self._on(i, h.device, h.dtype)
        if it.kind == "steer":
            mask = {"all": torch.ones_like(response), "prompt": ~response, "response": response}[it.positions]
            if not bool(mask.any()):
                return h
            coef = r["coefficient"].to(h.device)                                  # [B]
            scale = coef[:, None] * mask.to(torch.float32)[None, :]              # [B, seq]
            return h + scale.to(h.dtype)[..., None] * vec
        score = h.to(torch.float32) @ unit                                        # [B, seq]
        if it.kind == "cap":
            lo = r["low"].to(h.device)[:, None] if "low" in r else None
            hi = r["high"].to(h.device)[:, None] if "high" in r else None
            capped = torch.clamp(score, min=lo, max=hi)
            shift = capped - score
            if not bool((shift != 0).any()):
                return h
            return (h.to(torch.float32) + shift[..., None] * unit).to(h.dtype)
        over = (score > it.threshold) & response[None, :]                         # [B, seq]
        if it.kind == "steer_when":
            if it.each:
                on = over
            else:
                before = self._triggered[i].to(h.device)[:, None]
                on = (torch.cumsum(over.to(torch.int32), dim=1) > 0) | before
                self._triggered[i] |= on[:, -1].cpu()
            if not bool(on.any()):
                return h
            coef = r["coefficient"].to(h.device)
            return h + (coef[:, None] * on.to(torch.float32)).to(h.dtype)[..., None] * vec
        # stop_when: remember each row's first crossing (later tokens of a stopped row are ignored)
        if bool(over.any()):
            for row in torch.nonzero(over.any(dim=1)).flatten().tolist():
                if self.hits[row] is None:
                    k = int(torch.nonzero(over[row]).flatten()[0])
                    self.hits[row] = {"trait": it.trait, "layer": it.layer, "token_index": int(token_index[k]),
                                      "score": float(score[row, k]), "threshold": it.threshold}
                    self._stopped[row] = True
        return h
