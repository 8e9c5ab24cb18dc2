"""Steering results (trait-interp's `steering/.../results.jsonl`): the typed records, a validating reader, the writer.

    read_steering_results(path, default_position=None, n_layers=None) -> SteeringResults   every line checked
    SteeringResults   path, direction, baseline, runs [SteeringRun], baseline_missing, header, baseline_result
    SteeringRun       layer, method, component, position, weight, trait_mean, coherence_mean, line,
                      relative_weight, result, config; .key (what makes two runs the same run)
    run_key(layer, component, position, method, weight) -> tuple   the identity of a run (resume, --skip-existing)
    header_line(...) / baseline_line(...) / run_line(...) -> dict  the lines, in trait-interp's key order
    append_lines(path, lines)     atomic: the file is rewritten whole (old lines + new), never left half-written
    SteeringResultsError          a TraitError naming the file (and line) and what is wrong

Format (docs/formats.md): one JSON object per line. A header `{"type": "header", "trait", "direction", ...}`, a
baseline `{"type": "baseline", "result": {"trait_mean", ...}}`, and runs `{"result": {"trait_mean",
"coherence_mean", ...}, "config": {"vectors": [{"layer", "component", "position", "method", "weight"}]}}`.
trait-interp's readers use only `vectors[0]`, `direction`, the baseline's `trait_mean` and the runs' two means;
our eval adds keys they ignore (relative_weight, residual_norm, per-response scores, the judge's scores).
A file without a baseline line (trait-interp's remove_baseline()) reads with baseline 0 and one warning.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.errors import TraitError
from utils.storage import atomic_write

__all__ = ["SteeringResultsError", "SteeringRun", "SteeringResults", "read_steering_results", "run_key",
           "header_line", "baseline_line", "run_line", "append_lines", "DIRECTIONS"]

DIRECTIONS = ("positive", "negative")


class SteeringResultsError(TraitError):
    """A results.jsonl line is malformed; the message names `path:line` and the key."""


@dataclass(frozen=True)
class SteeringRun:
    layer: int
    method: str
    component: str
    position: str
    weight: float | None
    trait_mean: float | None
    coherence_mean: float | None
    line: int
    relative_weight: float | None = None   # ours: the weight in residual norms at the layer (Cx); trait-interp has none
    result: dict = field(default_factory=dict, repr=False, compare=False)
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> tuple:
        return run_key(self.layer, self.component, self.position, self.method, self.weight)


@dataclass
class SteeringResults:
    path: Path
    direction: str                    # "positive" or "negative"
    baseline: float                   # 0.0 when the file has no baseline line (baseline_missing)
    runs: list[SteeringRun] = field(default_factory=list)
    baseline_missing: bool = False
    header: dict = field(default_factory=dict)
    baseline_result: dict = field(default_factory=dict)

    def keys(self) -> set[tuple]:
        return {r.key for r in self.runs}


def run_key(layer: int, component: str, position: str, method: str, weight: float | None) -> tuple:
    """Two runs are the same run when vector and weight agree (weight to 6 significant digits: JSON round trips)."""
    return (int(layer), component, position, method, None if weight is None else float(f"{weight:.6g}"))


_WARNED: set[str] = set()   # one warning per file and process, however many traits / variants read it


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr)


def _number(value, what: str, where: str, allow_none: bool = True, lo: float | None = None,
            hi: float | None = None) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteeringResultsError(f"{where}: {what} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SteeringResultsError(f"{where}: {what} must lie in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def read_steering_results(path: str | Path, default_position: str | None = None,
                          n_layers: int | None = None) -> SteeringResults:
    """Parse and check a results.jsonl; any malformed line is a SteeringResultsError naming `path:line`.

    Checks: every line a JSON object; one header at most, its direction positive/negative; means finite,
    coherence in [0, 100]; layers non-negative integers (below `n_layers` when given); weights finite.
    Run positions default to `default_position` (the folder's position). Runs without a score (null
    trait_mean / coherence_mean) are kept with None and never pass a filter. The last baseline line wins.
    """
    path = Path(path)
    direction, baseline, header, base_result = "positive", None, {}, {}
    runs: list[SteeringRun] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SteeringResultsError(f"{path}: cannot read ({e})") from None
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise SteeringResultsError(f"{where}: malformed JSON line ({e.msg})") from None
        if not isinstance(rec, dict):
            raise SteeringResultsError(f"{where}: expected a JSON object")
        kind = rec.get("type")
        if kind == "header":
            if header:
                raise SteeringResultsError(f"{where}: a second header line (one file holds one trait's sweep)")
            direction = rec.get("direction", "positive")
            if direction not in DIRECTIONS:
                raise SteeringResultsError(f"{where}: direction must be 'positive' or 'negative', got {direction!r}")
            header = rec
            continue
        if kind not in (None, "baseline"):
            raise SteeringResultsError(f"{where}: unknown line type {kind!r} (header, baseline, or a run without type)")
        result = rec.get("result")
        if not isinstance(result, dict):
            raise SteeringResultsError(f"{where}: missing 'result' object")
        if kind == "baseline":
            baseline = _number(result.get("trait_mean"), "result.trait_mean", where, allow_none=False)
            _number(result.get("coherence_mean"), "result.coherence_mean", where, lo=0, hi=100)
            base_result = result
            continue
        config = rec.get("config")
        vectors = config.get("vectors") if isinstance(config, dict) else None
        if not isinstance(vectors, list) or not vectors or not isinstance(vectors[0], dict):
            raise SteeringResultsError(f"{where}: a run line needs config.vectors[0] (layer, method, component, "
                                       f"position)")
        spec = vectors[0]
        layer = spec.get("layer")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise SteeringResultsError(f"{where}: config.vectors[0].layer must be a non-negative integer, "
                                       f"got {layer!r}")
        if n_layers is not None and layer >= n_layers:
            raise SteeringResultsError(f"{where}: config.vectors[0].layer {layer} is beyond the model's {n_layers} "
                                       f"layers")
        position = spec.get("position") or default_position
        if position is None:
            raise SteeringResultsError(f"{where}: config.vectors[0].position is missing")
        runs.append(SteeringRun(
            layer=layer, method=str(spec.get("method") or "probe"), component=str(spec.get("component") or "residual"),
            position=str(position), weight=_number(spec.get("weight"), "config.vectors[0].weight", where),
            trait_mean=_number(result.get("trait_mean"), "result.trait_mean", where),
            coherence_mean=_number(result.get("coherence_mean"), "result.coherence_mean", where, lo=0, hi=100),
            line=n,
            relative_weight=_number(spec.get("relative_weight"), "config.vectors[0].relative_weight", where),
            result=result, config=config,
        ))
    if baseline is None:
        _warn_once(str(path), f"{path}: no baseline line; taking baseline 0 as trait-interp does, so its "
                              f"steering deltas are raw trait means (re-run the baseline to restore it)")
        return SteeringResults(path, direction, 0.0, runs, True, header, base_result)
    return SteeringResults(path, direction, baseline, runs, False, header, base_result)


# ---------------------------------------------------------------------------------------------------------
# Writing (the eval's lines; key order as trait-interp writes them, ours after)

def header_line(trait: str, direction: str, steering_model: str, steering_experiment: str,
                vector_source: dict, eval_info: dict, prompts_file: str, **extra: Any) -> dict:
    if direction not in DIRECTIONS:
        raise SteeringResultsError(f"--direction must be positive or negative, got {direction!r}")
    return {"type": "header", "trait": trait, "direction": direction, "steering_model": steering_model,
            "steering_experiment": steering_experiment, "vector_source": vector_source, "eval": eval_info,
            "prompts_file": prompts_file, **extra}


def baseline_line(result: dict, eval_info: dict, **extra: Any) -> dict:
    if "trait_mean" not in result:
        raise SteeringResultsError("a baseline line needs result.trait_mean")
    return {"type": "baseline", "result": result, "eval": eval_info, **extra}


def run_line(result: dict, vector: dict, eval_info: dict, **extra: Any) -> dict:
    """A run: result (trait_mean, coherence_mean, ...) and config.vectors = [vector] (layer, component, position,
    method, weight, then ours)."""
    missing = [k for k in ("layer", "component", "position", "method", "weight") if k not in vector]
    if missing or "trait_mean" not in result or "coherence_mean" not in result:
        raise SteeringResultsError(f"a run line needs result.trait_mean, result.coherence_mean and config.vectors[0] "
                                   f"keys layer, component, position, method, weight (missing: {', '.join(missing)})")
    return {"result": result, "config": {"vectors": [vector]}, "eval": eval_info, **extra}


def append_lines(path: str | Path, lines: Iterable[dict]) -> None:
    """Append lines atomically: the whole file is rewritten through a temporary file and renamed into place, so a
    crash leaves the old file or the new one, never a torn last line."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    new = "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode("utf-8")
    with atomic_write(path) as tmp:
        tmp.write_bytes(old + new)
