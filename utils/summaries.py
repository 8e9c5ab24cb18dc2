"""What a score is relative to, in every line a person reads: the vector's baseline and held-out spread.

    add_units_flag(parser, default="z")      --units raw|baseline|z, the default shown in --help
    reference_of(entry) -> Reference          a projection entry's reference (its `reference`, else `baseline`)
    raw_scores(entry, metadata, side)         the entry's scores as projected (a --centered file adds the baseline back)
    tally(scores, trait, record)              add one projection JSON to a plain dict of per-trait tallies
    score_line(trait, t, units) / score_lines(scores, units)
                                              "demo/refusal L10: mean response -1.3 (held-out spreads (1.9) from the
                                              baseline 7.03), 12% of 310 response tokens above the baseline"
    in_units(value, ref, units) / unit_words(ref, units)   one number, and what it is relative to, in words
    delta_in_units(delta, ref, units)         a difference of two scores (baseline cancels): raw, or in spreads

Units: raw (as projected, what the files keep), baseline (minus the vector's class midpoint: above 0 reads as the
trait by the vector's own threshold), z (that, in held-out spreads: the pooled within-class std of the held-out
lines at that layer). A vector without held-out statistics (baseline only) falls back from z to baseline, and the
line says so. Raw scores stay in the files; only the summaries convert.
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

from utils.vectors import UNITS, Reference

DEFAULT_UNITS = "z"


def add_units_flag(parser: argparse.ArgumentParser, default: str = DEFAULT_UNITS) -> None:
    parser.add_argument("--units", choices=UNITS, default=default,
                        help=f"how summary lines show scores: raw (as projected), baseline (minus the vector's class "
                             f"midpoint), z (that, in held-out spreads of the vector's classes) (default: {default}); "
                             f"files always keep the raw scores")


def reference_of(entry: dict) -> Reference:
    """A projection entry's Reference: its `reference` block (utils/vectors.Reference.to_json), else its baseline."""
    ref = entry.get("reference")
    if isinstance(ref, dict) and isinstance(ref.get("baseline"), (int, float)):
        num = lambda k: float(ref[k]) if isinstance(ref.get(k), (int, float)) and not isinstance(ref.get(k), bool) \
            else None  # noqa: E731
        return Reference.from_stats(float(ref["baseline"]), num("pos_mean"), num("neg_mean"), num("pos_std"),
                                    num("neg_std"), str(ref.get("source") or "metadata"))
    base = entry.get("baseline")
    return Reference(float(base) if isinstance(base, (int, float)) and not isinstance(base, bool) else 0.0)


def raw_scores(entry: dict, metadata: dict | None, side: str = "response") -> list[float]:
    """The scores as projected: a file written with --centered stores score - baseline, so the baseline is added."""
    vals = [float(x) for x in entry.get(side) or []]
    if (metadata or {}).get("centered"):
        base = reference_of(entry).baseline
        vals = [x + base for x in vals]
    return vals


def effective_units(ref: Reference, units: str) -> str:
    """z needs a held-out spread; without one the summary shows baseline-relative numbers (and says so)."""
    return "baseline" if units == "z" and not ref.has_spread else units


def in_units(value: float, ref: Reference, units: str) -> float:
    return ref.relative(value, effective_units(ref, units))


def unit_words(ref: Reference, units: str) -> str:
    """What a number in `units` is relative to, for a summary line."""
    u = effective_units(ref, units)
    if u == "raw":
        return f"raw projection (baseline {ref.baseline:.3g})"
    if u == "baseline":
        note = " (no held-out spread recorded: z unavailable)" if units == "z" else ""
        return f"minus the baseline {ref.baseline:.3g}{note}"
    return f"held-out spreads ({ref.spread:.3g}) from the baseline {ref.baseline:.3g}"


def delta_in_units(delta: float, ref: Reference, units: str) -> tuple[float, str]:
    """A difference of two scores (B - A): the baseline cancels, so raw and baseline agree; z divides by the spread."""
    if units == "z" and ref.has_spread:
        return delta / ref.spread, f"held-out spreads ({ref.spread:.3g})"
    note = " (no held-out spread: raw)" if units == "z" else ""
    return delta, f"raw projection units{note}"


def tally(scores: dict, trait: str, record: dict) -> None:
    """Add one projection JSON (its first entry: the selected vector) to `scores`, a plain JSON-ready dict
    {trait: {layer, reference, prompt_means (raw, one per prompt), response_tokens, tokens_above_baseline}}."""
    entries = record.get("projections")
    if not isinstance(entries, list) or not entries:
        return
    entry = entries[0]
    ref = reference_of(entry)
    t = scores.setdefault(trait, {"layer": entry.get("layer"), "reference": ref.to_json(), "prompt_means": [],
                                  "response_tokens": 0, "tokens_above_baseline": 0})
    vals = raw_scores(entry, record.get("metadata"))
    if vals:
        t["prompt_means"].append(math.fsum(vals) / len(vals))
        t["response_tokens"] += len(vals)
        t["tokens_above_baseline"] += sum(v > ref.baseline for v in vals)


def score_line(trait: str, t: dict, units: str) -> str:
    """One trait of a tally: the mean response score (each prompt weighs the same) relative to the baseline, in
    `units`, and the share of response tokens above the baseline."""
    ref = reference_of(t)
    if not t["prompt_means"] or not t["response_tokens"]:
        return f"{trait} L{t['layer']}: no response tokens"
    mean = math.fsum(t["prompt_means"]) / len(t["prompt_means"])
    return (f"{trait} L{t['layer']}: mean response {in_units(mean, ref, units):+.3g} ({unit_words(ref, units)}), "
            f"{t['tokens_above_baseline'] / t['response_tokens']:.0%} of {t['response_tokens']} response tokens "
            f"above the baseline")


def score_lines(scores: dict, units: str) -> list[str]:
    return [score_line(trait, t, units) for trait, t in scores.items()]
