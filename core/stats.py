"""Effect sizes and summary statistics for comparing two model variants, with no file knowledge.

    Stat(value, reason)                    a number, or None with the reason it is undefined (never NaN)
    mean(xs) / std(xs)                     fp64 mean and sample std (ddof=1) of a 1-D sequence
    cohens_d(b, a)                         unpaired signed Cohen's d of b over a, pooled sample std
    paired_d(b, a)                         paired d_z: mean(b - a) / std(b - a), sample std
    cosine(u, v)                           cosine similarity of two vectors (None for a zero vector)
    peak_index(values)                     index of the largest |value| among the defined ones (first wins ties)

One convention throughout: every standard deviation is the sample std, ddof = 1 (Bessel). trait-interp
mixed ddof 1 (unpaired d) with ddof 0 (paired d, per-side std); here N = 1 gives None with a
reason for all of them instead of NaN (invalid JSON) or a silent 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DDOF = 1

# Relative tolerance under which a spread counts as zero: fp32 rounding of identical values is not a signal.
_ZERO_SPREAD_RTOL = 1e-12


@dataclass(frozen=True)
class Stat:
    """A statistic that may be undefined: value is a finite float, or None and reason says why."""
    value: float | None
    reason: str | None = None

    @staticmethod
    def undefined(reason: str) -> "Stat":
        return Stat(None, reason)


def _as_f64(xs: Sequence[float] | torch.Tensor) -> torch.Tensor:
    # a Python list goes straight to fp64 (torch.as_tensor would round it through fp32 first)
    t = (xs.detach().to(dtype=torch.float64, device="cpu") if isinstance(xs, torch.Tensor)
         else torch.tensor(list(xs), dtype=torch.float64)).flatten()
    if not torch.isfinite(t).all():
        raise ValueError("statistics need finite values (got NaN or inf)")
    return t


def mean(xs: Sequence[float] | torch.Tensor) -> Stat:
    t = _as_f64(xs)
    if t.numel() == 0:
        return Stat.undefined("no values")
    return Stat(float(t.mean()))


def std(xs: Sequence[float] | torch.Tensor) -> Stat:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    t = _as_f64(xs)
    if t.numel() < 2:
        return Stat.undefined(f"n={t.numel()}: the sample std (ddof=1) needs at least 2 values")
    return Stat(float(t.std(correction=DDOF)))


def _is_zero_spread(s: float, scale: float) -> bool:
    return s <= _ZERO_SPREAD_RTOL * max(scale, 1e-300) or s == 0.0


def cohens_d(b: Sequence[float] | torch.Tensor, a: Sequence[float] | torch.Tensor) -> Stat:
    """Unpaired signed Cohen's d = (mean b - mean a) / sqrt((s_a^2 + s_b^2) / 2), s = sample std (ddof=1).

    With equal group sizes this pooled std equals the classical ((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2);
    for unequal sizes the classical weighting is used.
    """
    ta, tb = _as_f64(a), _as_f64(b)
    na, nb = ta.numel(), tb.numel()
    if na < 2 or nb < 2:
        return Stat.undefined(f"n={min(na, nb)}: Cohen's d needs at least 2 prompts per variant (sample std, ddof=1)")
    sa, sb = float(ta.std(correction=DDOF)), float(tb.std(correction=DDOF))
    pooled = math.sqrt(((na - 1) * sa ** 2 + (nb - 1) * sb ** 2) / (na + nb - 2))
    scale = max(float(ta.abs().max()), float(tb.abs().max()))
    if _is_zero_spread(pooled, scale):
        return Stat.undefined("zero variance: every prompt projects to the same value in both variants")
    return Stat((float(tb.mean()) - float(ta.mean())) / pooled)


def paired_d(b: Sequence[float] | torch.Tensor, a: Sequence[float] | torch.Tensor) -> Stat:
    """Paired d_z = mean(b_i - a_i) / std(b_i - a_i), sample std (ddof=1), prompts paired by position."""
    ta, tb = _as_f64(a), _as_f64(b)
    if ta.numel() != tb.numel():
        raise ValueError(f"paired effect size needs equal lengths, got {tb.numel()} and {ta.numel()}")
    if ta.numel() < 2:
        return Stat.undefined(f"n={ta.numel()}: the paired d_z needs at least 2 prompts (sample std, ddof=1)")
    diff = tb - ta
    s = float(diff.std(correction=DDOF))
    scale = max(float(ta.abs().max()), float(tb.abs().max()))
    if _is_zero_spread(s, scale):
        return Stat.undefined("zero variance of the per-prompt differences (B - A is the same for every prompt)")
    return Stat(float(diff.mean()) / s)


def cosine(u: torch.Tensor, v: torch.Tensor) -> Stat:
    """cos(u, v) in fp64; None when either vector is zero (trait-interp returned 0, which reads as 'orthogonal')."""
    u64, v64 = _as_f64(u), _as_f64(v)
    nu, nv = float(u64.norm()), float(v64.norm())
    if nu == 0.0 or nv == 0.0:
        which = "the mean difference" if nu == 0.0 else "the trait vector"
        return Stat.undefined(f"{which} is exactly zero: cosine undefined")
    return Stat(float(u64 @ v64) / (nu * nv))


def peak_index(values: Sequence[float | None]) -> int | None:
    """Index of the largest |value| among non-None values; the first one wins ties; None if all are None."""
    best, best_abs = None, -1.0
    for i, v in enumerate(values):
        if v is not None and abs(v) > best_abs:
            best, best_abs = i, abs(v)
    return best
