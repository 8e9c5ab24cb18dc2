"""Per-response aggregates of one score series: what a single mean hides on a long response.

    EMA_ALPHA                                  the smoothing of ema_max (about a 9-token memory)
    response_aggregates(scores, threshold) -> dict   n, mean, max, ema_max, frac_above (the definitions below)
    ema(scores, alpha) -> [float]              the exponential moving average itself, one value per token

Definitions (the score store, the projection JSON's metadata and the report use these, and only these):
    mean        fsum(scores) / n
    max         the largest score
    ema_max     the largest value of e_t = alpha * x_t + (1 - alpha) * e_{t-1}, e_0 = x_0 (probe monitors pool
                with it: one spike does not count as much as a sustained stretch)
    frac_above  share of tokens with score > threshold (the vector's baseline, 0 for centered scores);
                None when there is no threshold
A series without scores gives n = 0 and None everywhere else.

    response_aggregates([0.1, 2.0, 0.3], threshold=0.5)
    # {'n': 3, 'mean': 0.8, 'max': 2.0, 'ema_max': 0.48, 'frac_above': 0.333.., 'threshold': 0.5}
"""
from __future__ import annotations

import math
from typing import Sequence

EMA_ALPHA = 0.2


def ema(scores: Sequence[float], alpha: float = EMA_ALPHA) -> list[float]:
    out: list[float] = []
    e = 0.0
    for t, x in enumerate(scores):
        e = float(x) if t == 0 else alpha * float(x) + (1.0 - alpha) * e
        out.append(e)
    return out


def response_aggregates(scores: Sequence[float], threshold: float | None, alpha: float = EMA_ALPHA) -> dict:
    n = len(scores)
    if n == 0:
        return {"n": 0, "mean": None, "max": None, "ema_max": None, "frac_above": None, "threshold": threshold}
    return {
        "n": n,
        "mean": math.fsum(scores) / n,
        "max": float(max(scores)),
        "ema_max": max(ema(scores, alpha)),
        "frac_above": None if threshold is None else sum(1 for x in scores if x > threshold) / n,
        "threshold": threshold,
    }
