"""The two `--layers` grammars: which layers to capture, and which to project onto.

    parse_layers(spec, n_layers)                  -> [int]   capture grammar: all, 16, 5-20, 10-45:3, 30%-60%, -4--1
    parse_projection_layers(spec, n_layers=None)  -> [ProjectionLayer]   projection grammar: best, best+2, best-1, 16, -1
    resolve_projection_layers(items, best_layer, available) -> [int]   ProjectionLayers -> concrete captured layers
    ProjectionLayer(kind, value)                  one projection item: kind "best" (value = offset) or "fixed" (value = layer)
    format_layers(layers) -> str                  the one way messages list layers: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'
    LayerSpecError                                a TraitError; every message names the spec and the layer count / available layers
    MAX_LAYERS                                    no model has more blocks: a file naming a larger layer is corrupted

Nothing is ever clamped, snapped or silently dropped: a layer that does not exist, or was not captured,
is an error that says which layers do.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal
from core.errors import TraitError

__all__ = [
    "MAX_LAYERS",
    "LayerSpecError",
    "ProjectionLayer",
    "format_layers",
    "parse_layers",
    "parse_projection_layers",
    "resolve_projection_layers",
]


MAX_LAYERS = 100_000


class LayerSpecError(TraitError):
    """A `--layers` spec that is malformed, empty, or names a layer the model (or capture) lacks."""


# An endpoint is an integer (a leading minus counts from the end) or a non-negative percentage.
_END = r"(-?\d+|\d+(?:\.\d+)?%)"
_SINGLE_RE = re.compile(rf"^{_END}$")
_RANGE_RE = re.compile(rf"^{_END}-{_END}(?::(.*))?$")
_STEP_RE = re.compile(r"^[+-]?\d+$")


def _span(n_layers: int) -> str:
    return f"{n_layers} layers (0-{n_layers - 1})"


def format_layers(layers: Iterable[int]) -> str:
    """Layers for a message, sorted, consecutive runs compacted: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; none -> 'none'."""
    ordered = sorted(set(int(layer) for layer in layers))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(runs) or "none"


def _layer_index(layer: int, spec: str, n_layers: int) -> int:
    """A layer (negative counts from the end) -> an index in [0, n_layers), or LayerSpecError naming the spec."""
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        hint = f", or {-n_layers} to -1 from the end" if layer < 0 else ""
        raise LayerSpecError(
            f"--layers {spec!r}: layer {layer} is out of range for a model with "
            f"{n_layers} layers (0-{n_layers - 1}{hint})"
        )
    return index


# ---------------------------------------------------------------------------------------------------------
# Capture grammar
# ---------------------------------------------------------------------------------------------------------

def _resolve_end(end: str, spec: str, n_layers: int) -> int:
    """One range endpoint -> a layer index in [0, n_layers), or LayerSpecError."""
    if end.endswith("%"):
        pct = Fraction(end[:-1])  # exact, so 50% of 26 layers is exactly 12.5 before rounding
        if pct > 100:
            raise LayerSpecError(
                f"--layers {spec!r}: {end} is out of range (percentages run 0%-100%) "
                f"for a model with {_span(n_layers)}"
            )
        return round(pct * (n_layers - 1) / 100)
    return _layer_index(int(end), spec, n_layers)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse the capture grammar into a sorted, de-duplicated list of layer indices.

    Comma-separated tokens, freely mixed:
        all          every layer, 0..n_layers-1
        16           one layer
        -1           one layer counted from the end (-1 is the last)
        5-20         an inclusive range; either end may be negative: -4--1, 2--1
        10-45:3      a stepped range: 10, 13, ..., up to 45 inclusive if hit
        50%          the layer at round(p/100 * (n_layers-1)) (Python's round: halves go to even)
        30%-60%      an inclusive range of percentages (may be stepped, may mix with ints)

    Raises LayerSpecError, naming the spec and the layer count, for an empty spec, a malformed token,
    a layer out of range (never clamped or dropped), a step <= 0, or a token that selects nothing (5-3).
    """
    if n_layers < 1:
        raise LayerSpecError(f"--layers {spec!r}: a model must have at least 1 layer, got n_layers={n_layers}")
    if not spec.strip():
        raise LayerSpecError(f"--layers {spec!r}: empty spec; the model has {_span(n_layers)}")

    chosen: set[int] = set()
    for raw in spec.split(","):
        token = raw.strip().lower()
        if not token:
            raise LayerSpecError(
                f"--layers {spec!r}: empty item between commas; the model has {_span(n_layers)}"
            )
        if token == "all":
            chosen.update(range(n_layers))
            continue
        single = _SINGLE_RE.match(token)
        if single:
            chosen.add(_resolve_end(single.group(1), spec, n_layers))
            continue
        ranged = _RANGE_RE.match(token)
        if not ranged:
            raise LayerSpecError(
                f"--layers {spec!r}: malformed item {raw.strip()!r} (expected all, N, A-B, A-B:STEP, P%, P%-Q%); "
                f"the model has {_span(n_layers)}"
            )
        start_s, end_s, step_s = ranged.groups()
        step = 1
        if step_s is not None:
            if not _STEP_RE.match(step_s.strip()):
                raise LayerSpecError(
                    f"--layers {spec!r}: malformed step in {raw.strip()!r} (expected an integer); "
                    f"the model has {_span(n_layers)}"
                )
            step = int(step_s)
            if step <= 0:
                raise LayerSpecError(
                    f"--layers {spec!r}: step must be positive in {raw.strip()!r}; "
                    f"the model has {_span(n_layers)}"
                )
        start = _resolve_end(start_s, spec, n_layers)
        end = _resolve_end(end_s, spec, n_layers)
        if start > end:
            raise LayerSpecError(
                f"--layers {spec!r}: {raw.strip()!r} selects no layers (it resolves to {start}-{end}, "
                f"start after end); the model has {_span(n_layers)}"
            )
        chosen.update(range(start, end + 1, step))

    return sorted(chosen)


# ---------------------------------------------------------------------------------------------------------
# Projection grammar
# ---------------------------------------------------------------------------------------------------------

_BEST_RE = re.compile(r"^best(?:\s*([+-])\s*(\d+))?$")
_INT_RE = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class ProjectionLayer:
    """One item of the projection grammar.

    kind "best":  `value` is an offset from the trait's best layer (best-2 -> value=-2, best -> 0).
    kind "fixed": `value` is an absolute, non-negative layer index.
    str() gives the item back in the grammar: "best", "best+2", "best-1", "16".
    """

    kind: Literal["best", "fixed"]
    value: int

    def __post_init__(self) -> None:
        if self.kind not in ("best", "fixed"):
            raise LayerSpecError(f"ProjectionLayer kind must be 'best' or 'fixed', got {self.kind!r}")
        if self.kind == "fixed" and self.value < 0:
            raise LayerSpecError(f"a fixed ProjectionLayer needs a non-negative layer, got {self.value}")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.value)
        if self.value == 0:
            return "best"
        return f"best{self.value:+d}"


def parse_projection_layers(spec: str, n_layers: int | None = None) -> list[ProjectionLayer]:
    """Parse the projection grammar into ProjectionLayers, de-duplicated in first-seen order.

    Comma-separated tokens, freely mixed:
        best, best+K, best-K   the trait's best layer, or K (an integer >= 0) layers after / before it
        16                     a fixed layer
        -1                     a fixed layer counted from the end; needs n_layers

    With n_layers given, fixed layers are also checked against the model (0..n_layers-1). The best-layer
    items are checked later, by resolve_projection_layers, once the best layer is known.
    """
    where = f" for a model with {_span(n_layers)}" if n_layers is not None else ""
    if n_layers is not None and n_layers < 1:
        raise LayerSpecError(f"--layers {spec!r}: a model must have at least 1 layer, got n_layers={n_layers}")
    if not spec.strip():
        raise LayerSpecError(f"--layers {spec!r}: empty spec (expected best, best+K, best-K or a layer){where}")

    items: list[ProjectionLayer] = []
    for raw in spec.split(","):
        token = raw.strip().lower()
        best = _BEST_RE.match(token)
        if best:
            sign, k = best.groups()
            offset = 0 if k is None else (int(k) if sign == "+" else -int(k))
            item = ProjectionLayer("best", offset)
        elif _INT_RE.match(token):
            layer = int(token)
            if n_layers is None:
                if layer < 0:
                    raise LayerSpecError(
                        f"--layers {spec!r}: layer {layer} counts from the end, which needs the model's "
                        f"layer count; give a non-negative layer"
                    )
                index = layer
            else:
                index = _layer_index(layer, spec, n_layers)
            item = ProjectionLayer("fixed", index)
        else:
            raise LayerSpecError(
                f"--layers {spec!r}: malformed item {raw.strip()!r} "
                f"(expected best, best+K, best-K or a layer){where}"
            )
        if item not in items:
            items.append(item)
    return items


def resolve_projection_layers(
    items: Iterable[ProjectionLayer],
    best_layer: int | None,
    available: Iterable[int],
) -> list[int]:
    """Turn ProjectionLayers into concrete layers, de-duplicated in first-seen order.

    `best_layer` is the trait's best layer (None when unknown); `available` the layers actually captured.
    A resolved layer outside `available` is a LayerSpecError that lists the available layers (never
    snapped to the nearest); a best-relative item with best_layer None asks for an explicit layer.
    """
    have = set(available)
    listing = format_layers(have)
    out: list[int] = []
    for item in items:
        if item.kind == "best":
            if best_layer is None:
                raise LayerSpecError(
                    f"layer {str(item)!r} needs the trait's best layer, but none is known; "
                    f"pass an explicit layer instead (available layers: {listing})"
                )
            layer = best_layer + item.value
            what = f"layer {layer} ({item}, best layer {best_layer})" if item.value else f"best layer {layer}"
        else:
            layer = item.value
            what = f"layer {layer}"
        if layer not in have:
            raise LayerSpecError(f"{what} is not among the available layers: {listing}")
        if layer not in out:
            out.append(layer)
    return out
