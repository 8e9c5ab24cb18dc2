"""Trait vectors: discovery, safe loading, and best-vector selection (file layout: docs/formats.md).

    sanitize_position(position) / desanitize_position(pos_dir)   response[:5] <-> response__5, response[:] <-> response_all
    parse_position(position) -> (frame, index | slice)              validate a position such as all[:], prompt[-1]
    discover_traits(exp, variant=None) -> ["category/name"]         traits with at least one layer{L}.pt
    list_vectors(exp, trait, variant, component=, position=, method=, layer=) -> [VectorRef]   deterministic order
    load_vector(exp, trait, variant, position_or_pos_dir, component, method, layer, hidden_size=None)
                                                 -> (fp32 unit Tensor[H], metadata.json dict)
    incomplete_sets(exp, trait=None, variant=None) -> [Path]       method folders with layer files but no metadata.json
                                                 (an interrupted extraction): never used, reported (one warning each)
    read_steering_results(path) -> SteeringResults                  header / baseline / runs; malformed line named
    rank_vectors(exp, trait, extraction_variant, steering_variant, ...) -> [RankedVector]   best first
    rank_by_extraction_metrics([(VectorRef, accuracy, separation)]) -> [RankedVector]   the no-steering fallback
    rank_held_out(exp, trait, variant, ...) -> [RankedVector]      held-out metrics only (what the steering eval sweeps)
    vector_reference(exp, trait, variant, pos_dir, component, method, layer) -> Reference
    best_vector(exp, trait, extraction_variant, steering_variant, ...)  -> SelectedVector
    select_vectors(exp, trait, extraction_variant, steering_variant, layers="best", available_layers=, ...,
                   multi_vector=None) -> [SelectedVector]          the vectors a projection uses, one per layer
    SelectedVector   trait, layer, method, component, position, path, sha256, baseline, selected_by, vector,
                     selection_reason, reference, ...; .selection_source (the value trait-interp's viewer knows),
                     .explanation (the plain-words why), .describe()
    Reference        baseline, pos_mean, neg_mean, pos_std, neg_std, spread, source: what a score is read against;
                     .relative(score, units) with units raw | baseline | z;  reference_from_metadata(entry, ...)
    resolve_vector_source(experiment, vectors_experiment=None, extraction_variant=None, steering_variant=None,
                          traits=None, require_traits=True) -> VectorSource
                                                 the experiment, variants and traits a run's vectors come from
    VectorSource     experiment, vectors_experiment, extraction_variant, steering_variant, traits, discovered;
                     .rank(trait, ...) / .best(trait, ...) / .select(trait, ...) / .describe()
    VectorError / NoEvidenceError / VectorConfigError               TraitErrors whose message names the file or flag

Selection: candidates are the vector files filtered by component / position / method / layer.
Evidence is the steering results of ONE steering variant (the same for every projected variant); runs
count when coherence >= 77; candidates whose naturalness is < 50 drop out; the best is the largest delta
from the baseline in the trait's direction (selected_by "steering"). Without steering evidence the
held-out metrics in the vectors' metadata.json (written by extraction/extract_vectors.py) rank them
(rank_by_extraction_metrics): held-out separation, among the vectors whose held-out accuracy reaches
ACCURACY_FLOOR_FRACTION of the best one (selected_by "extraction"); other layers asked for are
selected_by "layers_arg". Every pick carries a one-line `selection_reason`. Files carry
`selection_source` in trait-interp's vocabulary ("steering" / "layers_arg"; its viewer aims at the
steering entry and knows no other value) next to our `selected_by` (docs/formats.md).
Ties and fallbacks are deterministic: positions the best's, then POSITION_ORDER (response[:5],
response[:], all[:]), then the rest sorted; methods probe, mean_diff, gradient, then the rest sorted;
then component; then layer.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

import torch

from utils import cards, paths, steering_results
from utils.steering_results import SteeringResults, SteeringRun
from utils.config import ConfigError, load_config, resolve_variant
from utils.layers import (LayerSpecError, ProjectionLayer, format_layers, parse_projection_layers,
                          resolve_projection_layers)
from utils.storage import StorageError, load_pt, read_json
from core.errors import TraitError

__all__ = [
    "METHOD_ORDER", "DEFAULT_POSITION", "MIN_COHERENCE", "MIN_NATURALNESS", "ACCURACY_FLOOR_FRACTION",
    "POSITION_ORDER",
    "VectorError", "NoEvidenceError", "VectorRef", "SteeringRun", "SteeringResults", "RankedVector",
    "SelectedVector", "sanitize_position", "desanitize_position", "parse_position", "discover_traits",
    "list_vectors", "load_vector", "load_vector_metadata", "file_sha256", "read_steering_results",
    "read_naturalness", "rank_vectors", "best_vector", "select_vectors", "check_trait_name",
    "SELECTION_SOURCES", "viewer_selection_source", "VectorSource", "VectorConfigError", "resolve_vector_source",
    "split_traits", "rank_by_extraction_metrics", "rank_held_out", "vector_reference", "incomplete_sets", "Reference", "reference_from_metadata", "UNITS",
]

METHOD_ORDER = ("probe", "mean_diff", "gradient")
DEFAULT_POSITION = "response[:5]"   # trait-interp's extraction default
MIN_COHERENCE = 77.0
MIN_NATURALNESS = 50.0
# Fallback ranking (no steering evidence): a vector must reach this fraction of the best held-out accuracy
# among the candidates to compete on separation. Relative, so a hard trait whose best layer reaches 0.70
# still has candidates; 0.9, so that when every layer reaches 1.00 a layer that misclassifies more than one
# held-out line in ten cannot win on separation alone (a mean gap can be large with lines on the wrong side).
ACCURACY_FLOOR_FRACTION = 0.9
# Positions in preference order when evidence ties or is absent: trait-interp's extraction default, its
# readers' default, our extractor's plain-text default; any other position after these, sorted.
POSITION_ORDER = ("response[:5]", "response[:]", "all[:]")

_LAYER_FILE = re.compile(r"^layer(\d+)\.pt$")
_POSITION = re.compile(r"^(prompt|response|all)\[(-?\d+|-?\d*:-?\d*)\]$")


class VectorError(TraitError):
    """A vector, its metadata or its evidence is missing or malformed; the message names the file or flag."""


class NoEvidenceError(VectorError):
    """Neither steering results nor held-out extraction metrics exist to pick a best vector."""


class VectorConfigError(VectorError, ConfigError):
    """A flag names a model variant the vectors' experiment does not have (both a VectorError and a ConfigError)."""


# ---------------------------------------------------------------------------------------------------------
# Positions

def sanitize_position(position: str) -> str:
    """The folder name of a position: `[:]` -> `_all`, `[` -> `_`, `]` -> ``, `:` -> `_`."""
    return position.replace("[:]", "_all").replace("[", "_").replace("]", "").replace(":", "_")


def desanitize_position(pos_dir: str) -> str:
    """Inverse of sanitize_position: response__5 -> response[:5], response_-5_ -> response[-5:]."""
    frame, sep, rest = pos_dir.partition("_")
    if not sep or frame not in ("prompt", "response", "all"):
        raise VectorError(f"{pos_dir!r} is not a sanitized position (expected e.g. response__5, response_all)")
    position = f"{frame}[:]" if rest == "all" else f"{frame}[{rest.replace('_', ':')}]"
    if not _POSITION.match(position):
        raise VectorError(f"{pos_dir!r} is not a sanitized position (expected e.g. response__5, response_all)")
    return position


def parse_position(position: str) -> tuple[str, int | slice]:
    """`frame[index]` or `frame[start:stop]` -> (frame, int or slice); frames: prompt, response, all."""
    m = _POSITION.match(position.strip())
    if not m:
        raise VectorError(
            f"--position {position!r}: expected FRAME[INDEX] or FRAME[START:STOP] with FRAME prompt, response "
            f"or all (e.g. response[:5], prompt[-1], all[:])"
        )
    frame, inner = m.groups()
    if ":" not in inner:
        return frame, int(inner)
    start, stop = inner.split(":")
    return frame, slice(int(start) if start else None, int(stop) if stop else None)


def _position_of(pos_dir: str) -> str:
    """The position a folder stands for; a folder this grammar does not know keeps its own name."""
    try:
        return desanitize_position(pos_dir)
    except VectorError:
        return pos_dir


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _position_rank(position: str, preferred: str | None = None) -> tuple[int, str]:
    if preferred is not None and position == preferred:
        return (0, "")
    if position in POSITION_ORDER:
        return (1 + POSITION_ORDER.index(position), "")
    return (1 + len(POSITION_ORDER), position)


def _tie_rank(ref: VectorRef, preferred: str | None = None) -> tuple:
    """The deterministic order among equally good candidates: position, method, component, layer."""
    return (_position_rank(ref.position, preferred), _method_rank(ref.method), ref.component, ref.layer)


# ---------------------------------------------------------------------------------------------------------
# Discovery and loading

def check_trait_name(trait: str) -> str:
    """A trait is exactly `category/name`."""
    parts = trait.strip().strip("/").split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise VectorError(f"--traits: {trait!r} is not a trait name of the form category/name")
    return "/".join(parts)


def discover_traits(exp: str, variant: str | None = None) -> list[str]:
    """Sorted `category/name` of every trait with a vector file (under `variant`, or any variant)."""
    root = paths.extraction_dir(exp)
    if not root.is_dir():
        return []
    found = []
    for cat in sorted(p for p in root.iterdir() if p.is_dir()):
        for trait in sorted(p for p in cat.iterdir() if p.is_dir()):
            variants = [trait / variant] if variant else sorted(p for p in trait.iterdir() if p.is_dir())
            if any(_has_vector_file(v / "vectors") for v in variants):
                found.append(f"{cat.name}/{trait.name}")
    return found


def _has_vector_file(folder: Path) -> bool:
    """A complete set (layer files with their metadata.json) somewhere under `folder`."""
    return folder.is_dir() and any(_LAYER_FILE.match(p.name) and _set_complete(p.parent)
                                   for p in folder.rglob("layer*.pt"))


def _set_complete(method_dir: Path) -> bool:
    """A (position, component, method) set is used only with its metadata.json, which the extractor writes last."""
    if (method_dir / "metadata.json").is_file():
        return True
    _warn_once(f"incomplete:{method_dir}",
               f"{method_dir}: vector files without metadata.json (an interrupted extraction, or copied without "
               f"it): this set is not used; re-run extraction/extract_vectors.py for this trait")
    return False


def incomplete_sets(exp: str, trait: str | None = None, variant: str | None = None) -> list[Path]:
    """Method folders holding layer files but no metadata.json (never used; listed so summaries can report them)."""
    root = paths.extraction_dir(exp)
    if not root.is_dir():
        return []
    pattern = f"{trait or '*/*'}/{variant or '*'}/vectors/*/*/*"
    return sorted(d for d in root.glob(pattern)
                  if d.is_dir() and not (d / "metadata.json").is_file() and any(d.glob("layer*.pt")))


@dataclass(frozen=True)
class VectorRef:
    """One vector file: vectors/{pos_dir}/{component}/{method}/layer{layer}.pt of a trait and variant."""

    trait: str
    layer: int
    method: str
    component: str
    pos_dir: str
    path: Path

    @property
    def position(self) -> str:
        return _position_of(self.pos_dir)


def list_vectors(exp: str, trait: str, variant: str, component: str | None = None, position: str | None = None,
                 method: str | None = None, layer: int | None = None) -> list[VectorRef]:
    """Every vector file of a trait and extraction variant that matches the filters, in deterministic order.

    An unknown trait or variant is a VectorError that lists what exists.
    """
    trait = check_trait_name(trait)
    root = paths.vectors_dir(exp, trait, variant)
    if not root.is_dir():
        known = discover_traits(exp)
        if trait in known:
            variants = sorted(p.name for p in (paths.extraction_dir(exp) / trait).iterdir()
                              if _has_vector_file(p / "vectors"))
            raise VectorError(f"trait {trait!r} has no vectors for extraction variant {variant!r} ({root} not found; "
                              f"variants with vectors: {', '.join(variants) or 'none'})")
        raise VectorError(f"unknown trait {trait!r}: {root} not found "
                          f"(traits with vectors in {exp!r}: {', '.join(known) or 'none'})")
    pos_dirs = [sanitize_position(position)] if position else sorted(p.name for p in root.iterdir() if p.is_dir())
    refs = []
    for pos_dir in pos_dirs:
        comp_dirs = [component] if component else sorted(p.name for p in (root / pos_dir).glob("*") if p.is_dir())
        for comp in comp_dirs:
            method_dirs = [method] if method else sorted(
                p.name for p in (root / pos_dir / comp).glob("*") if p.is_dir())
            for meth in method_dirs:
                folder = root / pos_dir / comp / meth
                if not folder.is_dir() or not any(folder.glob("layer*.pt")) or not _set_complete(folder):
                    continue
                for f in folder.glob("layer*.pt"):
                    m = _LAYER_FILE.match(f.name)
                    if m and (layer is None or int(m.group(1)) == layer):
                        refs.append(VectorRef(trait, int(m.group(1)), meth, comp, pos_dir, f))
    refs.sort(key=lambda r: (_position_rank(r.position), _method_rank(r.method), r.component, r.layer))
    return refs


# ---------------------------------------------------------------------------------------------------------
# Where the vectors come from (one rule for the projection, the model diff and the chat)

@dataclass(frozen=True)
class VectorSource:
    """The experiment, variants and traits every vector of a run comes from.

        src = resolve_vector_source("demo", traits="behavioral/refusal")
        for trait in src.traits:
            vectors = src.select(trait, layers="best", available_layers=[0, 1, 2])

    `vectors_experiment` holds extraction/ (the vector files) and steering/ (the evidence); it is
    `experiment` unless another experiment's vectors were asked for. `discovered` is True when the
    traits were found on disk rather than named by the caller.
    """

    experiment: str
    vectors_experiment: str
    extraction_variant: str
    steering_variant: str
    traits: tuple[str, ...]
    discovered: bool

    def describe(self) -> dict:
        """JSON-ready: where the vectors and the evidence were read from."""
        return {"vectors_experiment": self.vectors_experiment, "extraction_variant": self.extraction_variant,
                "steering_variant": self.steering_variant}

    def rank(self, trait: str, **kwargs) -> list[RankedVector]:
        return rank_vectors(self.vectors_experiment, trait, self.extraction_variant, self.steering_variant, **kwargs)

    def best(self, trait: str, **kwargs) -> SelectedVector:
        return best_vector(self.vectors_experiment, trait, self.extraction_variant, self.steering_variant, **kwargs)

    def select(self, trait: str, **kwargs) -> list[SelectedVector]:
        return select_vectors(self.vectors_experiment, trait, self.extraction_variant, self.steering_variant,
                              **kwargs)


def split_traits(traits: str | Sequence[str] | None) -> list[str] | None:
    """`--traits a/b,c/d` (or a list) -> unique checked names in the given order; None stays None."""
    if traits is None:
        return None
    items = [t.strip() for t in traits.split(",")] if isinstance(traits, str) else [str(t).strip() for t in traits]
    if not items or any(not t for t in items):
        raise VectorError(f"--traits {traits!r}: empty item (expected category/name,category/name)")
    return list(dict.fromkeys(check_trait_name(t) for t in items))


def _variants_with_vectors(exp: str, trait: str | None = None) -> list[str]:
    """Extraction variants that hold at least one vector file (of `trait`, or of any trait)."""
    root = paths.extraction_dir(exp)
    trait_dirs = [root / trait] if trait else [t for c in root.glob("*") if c.is_dir() for t in c.glob("*")]
    return sorted({v.name for t in trait_dirs if t.is_dir() for v in t.iterdir() if _has_vector_file(v / "vectors")})


def _missing_traits_error(exp: str, variant: str, missing: list[str], known: list[str]) -> VectorError:
    elsewhere = [t for t in missing if _variants_with_vectors(exp, t)]
    if elsewhere:
        t = elsewhere[0]
        return VectorError(f"trait {t!r} has no vectors for extraction variant {variant!r} of {exp!r} "
                           f"(variants with vectors: {', '.join(_variants_with_vectors(exp, t))}; pass "
                           f"--extraction-variant)")
    names = ", ".join(repr(t) for t in missing)
    return VectorError(f"unknown trait{'s' if len(missing) > 1 else ''} {names}: no vectors under "
                       f"{paths.extraction_dir(exp)} (traits with vectors for extraction variant {variant!r} of "
                       f"{exp!r}: {', '.join(known) or 'none'})")


def resolve_vector_source(experiment: str, vectors_experiment: str | None = None,
                          extraction_variant: str | None = None, steering_variant: str | None = None,
                          traits: str | Sequence[str] | None = None, *, require_traits: bool = True) -> VectorSource:
    """Which experiment, extraction variant, steering variant and traits the vectors come from.

    Defaults: the vectors live in `experiment`; the extraction variant is the vectors experiment's
    `defaults.extraction`, the steering variant (whose results.jsonl rank the vectors) its
    `defaults.application` (each else its first model variant), so every variant projected or
    compared is scored with the same vectors. `traits` (a comma list or a sequence) must all have
    vectors for the extraction variant; None means every trait that has some (an error when there
    are none, unless `require_traits=False`).

    Raises VectorError (a TraitError): VectorConfigError for a steering variant the experiment does
    not have; an unknown experiment stays the ConfigError utils.config raises.
    """
    vec_exp = vectors_experiment or experiment
    cfg = load_config(vec_exp)
    variants = cfg["model_variants"]
    ext_variant = extraction_variant or resolve_variant(vec_exp, None, "extraction").name
    if steering_variant is not None and steering_variant not in variants:
        raise VectorConfigError(f"--steering-variant {steering_variant!r}: not a model variant of experiment "
                                f"{vec_exp!r} (variants: {', '.join(variants)})")
    steer_variant = steering_variant or resolve_variant(vec_exp, None, "application").name
    known = discover_traits(vec_exp, ext_variant)
    wanted = split_traits(traits)
    if wanted is None:
        if not known and require_traits:
            others = _variants_with_vectors(vec_exp)
            raise VectorError(
                f"no trait vectors for extraction variant {ext_variant!r} in {paths.extraction_dir(vec_exp)}"
                + (f" (extraction variants with vectors: {', '.join(others)}; pass --extraction-variant)" if others
                   else f"; create some with: python extraction/extract_vectors.py --experiment {vec_exp}"))
        return VectorSource(experiment, vec_exp, ext_variant, steer_variant, tuple(known), True)
    missing = [t for t in wanted if t not in known]
    if missing:
        raise _missing_traits_error(vec_exp, ext_variant, missing, known)
    return VectorSource(experiment, vec_exp, ext_variant, steer_variant, tuple(wanted), False)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_vector_metadata(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str) -> dict:
    """The method folder's metadata.json; a set without one is incomplete and never used (VectorError)."""
    path = paths.vector_metadata(exp, trait, variant, pos_dir, component, method)
    if not path.exists():
        raise VectorError(f"{path.parent}: no metadata.json: an incomplete vector set (interrupted extraction?) is "
                          f"never used; re-run extraction/extract_vectors.py for trait {trait!r}")
    try:
        meta = read_json(path, allow_nan=True)   # trait-interp wrote NaN metrics; they count as missing
    except StorageError as e:
        raise VectorError(str(e)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("layers", {}), dict):
        raise VectorError(f"{path}: expected an object with a 'layers' object")
    for key, entry in meta.get("layers", {}).items():
        if not str(key).isdigit():
            raise VectorError(f"{path}: layers.{key}: layer keys are non-negative integers")
        if not isinstance(entry, dict):
            raise VectorError(f"{path}: layers.{key}: expected an object, got {type(entry).__name__}")
        for name in ("norm", "baseline"):     # what scores depend on must be finite; metrics may be NaN (missing)
            v = entry.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise VectorError(f"{path}: layers.{key}.{name} must be a finite number, got {v!r}")
    return meta


def _layer_meta(meta: dict, layer: int) -> dict:
    entry = (meta.get("layers") or {}).get(str(layer)) or {}
    return entry if isinstance(entry, dict) else {}


def _pos_dir(position_or_pos_dir: str) -> str:
    return sanitize_position(position_or_pos_dir) if "[" in position_or_pos_dir else position_or_pos_dir


def load_vector(exp: str, trait: str, variant: str, position_or_pos_dir: str, component: str, method: str,
                layer: int, hidden_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """A vector file as an fp32 unit Tensor[H], and its method's metadata.json ({} when absent).

    Refuses (VectorError naming the file) anything but a finite, non-zero 1-D float tensor, and a
    hidden size other than `hidden_size` when given.
    """
    pos_dir = _pos_dir(position_or_pos_dir)
    path = paths.vector_file(exp, check_trait_name(trait), variant, pos_dir, component, method, layer)
    if not path.exists():
        raise VectorError(f"{path}: vector file not found")
    try:
        obj = load_pt(path, mmap=False)
    except StorageError as e:
        raise VectorError(str(e)) from None
    if not isinstance(obj, torch.Tensor):
        raise VectorError(f"{path}: expected a tensor, got {type(obj).__name__}")
    if obj.ndim != 1 or not obj.dtype.is_floating_point:
        raise VectorError(f"{path}: expected a 1-D float tensor, got shape {tuple(obj.shape)} dtype {obj.dtype}")
    if hidden_size is not None and obj.shape[0] != hidden_size:
        raise VectorError(f"{path}: vector has {obj.shape[0]} dims but the activations have hidden size "
                          f"{hidden_size} (a vector from another model?)")
    v = obj.to(torch.float32)
    norm = float(v.norm())
    if not torch.isfinite(v).all() or norm == 0.0:
        raise VectorError(f"{path}: vector is zero or not finite")
    meta = load_vector_metadata(exp, trait, variant, pos_dir, component, method)
    return v / norm, meta


# ---------------------------------------------------------------------------------------------------------
# Steering evidence

def read_steering_results(path: str | Path, default_position: str | None = None) -> SteeringResults:
    """utils.steering_results' validating reader, its errors as VectorError (the evidence of a vector choice)."""
    try:
        return steering_results.read_steering_results(path, default_position)
    except steering_results.SteeringResultsError as e:
        raise VectorError(str(e)) from None


_WARNED: set[str] = set()   # one warning per folder and process


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr)


def _number(value, what: str, where: str, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise VectorError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def read_naturalness(path: str | Path) -> dict[tuple[int, str, str], float]:
    """naturalness.json scores keyed by (layer, method, component); {} when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except StorageError as e:
        raise VectorError(str(e)) from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, dict):
        raise VectorError(f"{path}: expected an object with a 'scores' object")
    out = {}
    for key, s in scores.items():
        if not isinstance(s, dict) or isinstance(s.get("layer"), bool) or not isinstance(s.get("layer"), int):
            raise VectorError(f"{path}: score {key!r} needs an integer 'layer'")
        mean = _number(s.get("mean"), f"scores.{key}.mean", str(path))
        if mean is not None:
            out[(s["layer"], str(s.get("method") or "probe"), str(s.get("component") or "residual"))] = mean
    return out


# ---------------------------------------------------------------------------------------------------------
# Ranking and selection

@dataclass(frozen=True)
class RankedVector:
    """A candidate with its evidence: a steering delta (signed, from baseline) or held-out extraction metrics."""

    ref: VectorRef
    source: str                        # "steering" | "extraction"
    score: float | None                # steering: delta from baseline; extraction: held-out separation
    coefficient: float | None = None   # steering weight of the winning run
    direction: str | None = None
    naturalness: float | None = None
    separation: float | None = None    # extraction: held-out separation (val_separation)
    accuracy: float | None = None      # extraction: held-out accuracy (val_accuracy)
    reason: str = ""                   # why it ranks where it does, one short line
    coherence: float | None = None     # steering: the winning run's coherence
    relative_coefficient: float | None = None   # steering: the winning run's coefficient in residual norms


UNITS = ("raw", "baseline", "z")   # how a summary shows a score: as projected, minus the baseline, in held-out spreads


@dataclass(frozen=True)
class Reference:
    """What a vector's scores are read against, at its layer.

    baseline   the class midpoint on the training lines (metadata.json `baseline`): above it a token reads as
               the trait, by the vector's own threshold
    pos_mean / neg_mean / pos_std / neg_std   held-out projections of the positive and negative lines (mean,
               population std); None when neither the metadata nor the trait's card records them
    spread     the pooled held-out within-class std, sqrt((pos_std^2 + neg_std^2) / 2): one "z" unit
    source     where the numbers came from: "metadata" (our extractor), "card" (card.json, e.g. trait-card on
               vectors from elsewhere), or "baseline only" (no held-out statistics: z units unavailable)

        ref = selected.reference
        ref.relative(7.9, "z")   # (7.9 - baseline) / spread
    """

    baseline: float
    pos_mean: float | None = None
    neg_mean: float | None = None
    pos_std: float | None = None
    neg_std: float | None = None
    spread: float | None = None
    source: str = "baseline only"

    @classmethod
    def from_stats(cls, baseline: float, pos_mean: float | None, neg_mean: float | None, pos_std: float | None,
                   neg_std: float | None, source: str) -> "Reference":
        """The spread pooled from the two stds (None unless both are known and it is positive)."""
        spread = None
        if pos_std is not None and neg_std is not None:
            pooled = math.sqrt((pos_std * pos_std + neg_std * neg_std) / 2)
            spread = pooled if pooled > 0 else None
        return cls(float(baseline), pos_mean, neg_mean, pos_std, neg_std, spread, source)

    @property
    def has_spread(self) -> bool:
        return self.spread is not None

    def relative(self, score: float, units: str = "baseline") -> float:
        """A raw score in `units`: raw (as projected), baseline (minus the baseline), z (that over the spread)."""
        if units == "raw":
            return float(score)
        if units == "baseline":
            return float(score) - self.baseline
        if units == "z":
            if self.spread is None:
                raise VectorError("--units z: this vector has no held-out spread (its metadata.json and card.json "
                                  "record no class statistics; run trait-card on it, or use --units baseline)")
            return (float(score) - self.baseline) / self.spread
        raise VectorError(f"--units {units!r}: expected one of {', '.join(UNITS)}")

    def unit_label(self, units: str = "baseline") -> str:
        """What a number in `units` is relative to, in words (for summary lines)."""
        return {"raw": "raw projection",
                "baseline": f"relative to the vector's baseline {self.baseline:.3g}",
                "z": (f"relative to the baseline {self.baseline:.3g}, in held-out spreads of {self.spread:.3g}"
                      if self.spread is not None else "z units unavailable (no held-out spread)")}[units]

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "pos_mean": self.pos_mean, "neg_mean": self.neg_mean,
                "pos_std": self.pos_std, "neg_std": self.neg_std, "spread": self.spread, "source": self.source}


_REFERENCE_KEYS = ("val_pos_mean", "val_neg_mean", "val_pos_std", "val_neg_std")


def reference_from_metadata(entry: dict, card_entry: dict | None = None, where: str = "metadata.json") -> Reference:
    """The Reference of one layer's metadata entry; the class statistics from the card when the metadata lacks them.

    The baseline is the metadata's `baseline`, else the card's, else the midpoint of the held-out class means,
    else 0 (trait-interp's default). Non-numbers are a VectorError naming `where`.
    """
    def num(d: dict | None, key: str) -> float | None:
        if not d or d.get(key) is None:
            return None
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise VectorError(f"{where}: {key} must be a finite number, got {v!r}")
        return float(v)

    stats = [num(entry, k) for k in _REFERENCE_KEYS]
    source = "metadata"
    if any(v is None for v in stats) and card_entry:
        stats = [num(card_entry, k) for k in ("pos_mean", "neg_mean", "pos_std", "neg_std")]
        source = "card"
    if any(v is None for v in stats):
        stats, source = [None] * 4, "baseline only"
    baseline = num(entry, "baseline")
    if baseline is None:
        baseline = num(card_entry, "baseline")
    if baseline is None:
        baseline = (stats[0] + stats[1]) / 2 if stats[0] is not None else 0.0
    return Reference.from_stats(baseline, *stats, source=source)


SELECTION_SOURCES = ("steering", "layers_arg")   # the selection_source values trait-interp writes and reads


def viewer_selection_source(selected_by: str | None) -> str:
    """Our `selected_by` as a trait-interp `selection_source`: steering stays, anything else is layers_arg."""
    return "steering" if selected_by == "steering" else "layers_arg"


def explain_selection(selected_by: str, layer: int, *, score: float | None = None, coherence: float | None = None,
                      coefficient: float | None = None, relative_coefficient: float | None = None,
                      separation: float | None = None, accuracy: float | None = None) -> str:
    """The plain-words reason for a pick, e.g. "chosen by steering: +31 trait at coherence 82, layer 10, 0.8x" or
    "chosen by held-out separation at layer 5 (no steering evidence)"."""
    if selected_by == "steering":
        parts = []
        if score is not None:
            parts.append(f"{score:+.0f} trait" + (f" at coherence {coherence:.0f}" if coherence is not None else ""))
        parts.append(f"layer {layer}")
        if relative_coefficient is not None:
            parts.append(f"{relative_coefficient:g}x")
        elif coefficient is not None:
            parts.append(f"coefficient {coefficient:g}")
        return "chosen by steering: " + ", ".join(parts)
    if selected_by == "extraction":
        detail = ", ".join(x for x in (None if separation is None else f"separation {separation:.2f}",
                                       None if accuracy is None else f"accuracy {accuracy:.2f}") if x)
        return (f"chosen by held-out separation at layer {layer} (no steering evidence"
                + (f"; {detail})" if detail else ")"))
    return f"layer {layer} as requested (--layers), not ranked"


@dataclass
class SelectedVector:
    """A loaded vector and why it was chosen; `vector` is an fp32 unit Tensor[H]."""

    trait: str
    layer: int
    method: str
    component: str
    position: str
    path: Path
    sha256: str
    baseline: float
    selected_by: str                   # "steering" | "extraction" | "layers_arg"
    vector: torch.Tensor = field(repr=False)
    score: float | None = None
    coefficient: float | None = None
    direction: str | None = None
    metadata: dict = field(default_factory=dict, repr=False)
    selection_reason: str = ""         # one short line: the evidence that made it win (for summaries)
    accuracy: float | None = None      # held-out accuracy from metadata.json, when the fallback ranked it
    separation: float | None = None    # held-out separation from metadata.json, when the fallback ranked it
    reference: Reference | None = None  # baseline and held-out class statistics at this layer (None: baseline only)
    coherence: float | None = None     # steering: coherence of the winning run
    relative_coefficient: float | None = None   # steering: the winning run's coefficient in residual norms (Cx)

    def __post_init__(self):
        if self.reference is None:
            self.reference = Reference(self.baseline)

    @property
    def pos_dir(self) -> str:
        return sanitize_position(self.position)

    @property
    def selection_source(self) -> str:
        """`selected_by` in trait-interp's vocabulary: "steering", else "layers_arg" (what it writes for a vector
        no steering result chose; its viewer aims at the "steering" entry and knows no other value)."""
        return viewer_selection_source(self.selected_by)

    @property
    def explanation(self) -> str:
        """Why this vector, in plain words (every human-facing text shows this, never the selection codes)."""
        return explain_selection(self.selected_by, self.layer, score=self.score, coherence=self.coherence,
                                 coefficient=self.coefficient, relative_coefficient=self.relative_coefficient,
                                 separation=self.separation, accuracy=self.accuracy)

    def describe(self, relative_to: Path | None = None) -> dict:
        """JSON-ready provenance: which file, its hash, and why it was chosen."""
        path = self.path
        if relative_to is not None:
            try:
                path = self.path.relative_to(relative_to)
            except ValueError:
                pass
        out = {"layer": self.layer, "method": self.method, "component": self.component, "position": self.position,
               "path": str(path), "sha256": self.sha256, "selection_source": self.selection_source,
               "selected_by": self.selected_by, "selection_reason": self.selection_reason, "baseline": self.baseline,
               "explanation": self.explanation, "reference": self.reference.to_json()}
        for key in ("score", "coefficient", "relative_coefficient", "coherence", "direction", "accuracy",
                    "separation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _steering_evidence(exp: str, trait: str, steering_variant: str, refs: list[VectorRef],
                       min_coherence: float, min_naturalness: float) -> tuple[list[RankedVector], set[VectorRef], str]:
    """Per candidate, its best qualifying run; also the candidates naturalness drops, and a note of what was seen."""
    by_pos: dict[str, list[VectorRef]] = {}
    for r in refs:
        by_pos.setdefault(r.pos_dir, []).append(r)
    ranked, dropped, seen_files, seen_runs, low_coherence = [], set(), 0, 0, 0
    for pos_dir, group in by_pos.items():
        results_path = paths.steering_results(exp, trait, steering_variant, pos_dir)
        naturalness = read_naturalness(results_path.parent / "naturalness.json")
        for r in group:
            nat = naturalness.get((r.layer, r.method, r.component))
            if nat is not None and nat < min_naturalness:
                dropped.add(r)
        if not results_path.exists():
            continue
        seen_files += 1
        results = read_steering_results(results_path, default_position=_position_of(pos_dir))
        sign = 1.0 if results.direction == "positive" else -1.0
        best: dict[VectorRef, tuple[float, float | None, float, float | None]] = {}
        index = {(r.layer, r.method, r.component, r.pos_dir): r for r in group}
        for run in results.runs:
            r = index.get((run.layer, run.method, run.component, sanitize_position(run.position)))
            if r is None or run.trait_mean is None:
                continue
            seen_runs += 1
            if run.coherence_mean is None or run.coherence_mean < min_coherence:
                low_coherence += 1
                continue
            delta = run.trait_mean - results.baseline
            if r not in best or sign * delta > sign * best[r][0]:
                best[r] = (delta, run.weight, run.coherence_mean, run.relative_weight)
        for r, (delta, weight, coherence, relative) in best.items():
            if r not in dropped:
                coef = "" if weight is None else f" at coefficient {weight:g}"
                reason = (f"steering delta {delta:+.1f}{coef} (coherence {coherence:.0f}, {results.direction}, "
                          f"variant {steering_variant}"
                          f"{', no baseline line: baseline 0' if results.baseline_missing else ''})")
                ranked.append(RankedVector(r, "steering", delta, weight, results.direction,
                                           naturalness.get((r.layer, r.method, r.component)), reason=reason,
                                           coherence=coherence, relative_coefficient=relative))
    note = (f"{seen_files} steering results file(s) under variant {steering_variant!r} with {seen_runs} matching "
            f"run(s), {low_coherence} below coherence {min_coherence:g}, {len(dropped)} vector(s) dropped for "
            f"naturalness < {min_naturalness:g}")
    return ranked, dropped, note


def rank_vectors(exp: str, trait: str, extraction_variant: str, steering_variant: str,
                 component: str | None = "residual", position: str | None = None, method: str | None = None,
                 layer: int | None = None, min_coherence: float = MIN_COHERENCE,
                 min_naturalness: float = MIN_NATURALNESS) -> list[RankedVector]:
    """Candidates with evidence, best first: steering deltas if any qualify, else held-out extraction metrics.

    Raises VectorError when no vector file matches the filters, NoEvidenceError when none has evidence.
    """
    refs = list_vectors(exp, trait, extraction_variant, component, position, method, layer)
    if not refs:
        wanted = ", ".join(f"{k}={v}" for k, v in
                           (("component", component), ("position", position), ("method", method), ("layer", layer)) if v is not None)
        have = list_vectors(exp, trait, extraction_variant)
        listing = sorted({f"{r.position} {r.component} {r.method}" for r in have})
        raise VectorError(f"trait {trait!r}: no vector files with {wanted or 'any settings'} under "
                          f"{paths.vectors_dir(exp, trait, extraction_variant)} (have: {'; '.join(listing) or 'none'})")
    ranked, dropped, note = _steering_evidence(exp, trait, steering_variant, refs, min_coherence, min_naturalness)
    if ranked:
        # direction-aware: a negative trait's best run lowers the trait score the most
        ranked.sort(key=lambda c: (-(1.0 if c.direction == "positive" else -1.0) * c.score, _tie_rank(c.ref)))
        return ranked
    ranked = rank_by_extraction_metrics(_extraction_metrics(exp, trait, extraction_variant, refs, dropped))
    if not ranked:
        raise NoEvidenceError(
            f"trait {trait!r}: cannot pick a best vector: no steering evidence "
            f"({paths.steering_dir(exp, trait, steering_variant, '{pos_dir}')}: {note}) and no held-out metrics "
            f"(val_accuracy / val_separation) in the vectors' metadata.json; pass --layer N (and --method / "
            f"--position) to choose a vector, or create vectors with python extraction/extract_vectors.py"
        )
    return ranked


def _metric(entry: dict, *keys: str) -> float | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _extraction_metrics(exp: str, trait: str, variant: str, refs: list[VectorRef],
                        dropped: set[VectorRef]) -> list[tuple[VectorRef, float | None, float | None]]:
    """(ref, held-out accuracy, held-out separation) from the metadata.json entries; None where not recorded.

    Separation is our extractor's `val_separation`, else `val_effect_size` (trait-interp's evaluation name).
    """
    metas: dict[tuple[str, str, str], dict] = {}
    out = []
    for r in refs:
        if r in dropped:
            continue
        key = (r.pos_dir, r.component, r.method)
        if key not in metas:
            metas[key] = load_vector_metadata(exp, trait, variant, *key)
        entry = _layer_meta(metas[key], r.layer)
        out.append((r, _metric(entry, "val_accuracy"), _metric(entry, "val_separation", "val_effect_size")))
    return out


def rank_held_out(exp: str, trait: str, variant: str, component: str | None = "residual",
                  position: str | None = None, method: str | None = None) -> list[RankedVector]:
    """The candidates ranked by held-out metrics only, never by steering evidence (what the steering eval sweeps:
    a resumed sweep must pick the same set however many runs it already wrote)."""
    refs = list_vectors(exp, trait, variant, component, position, method)
    ranked = rank_by_extraction_metrics(_extraction_metrics(exp, trait, variant, refs, set()))
    if not ranked:
        raise NoEvidenceError(f"trait {trait!r}: no held-out metrics (val_accuracy / val_separation) in the "
                              f"metadata.json of its vectors under {paths.vectors_dir(exp, trait, variant)} "
                              f"(matching component={component}, position={position}, method={method}): pass "
                              f"--position and --method")
    return ranked


def vector_reference(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str,
                     layer: int) -> Reference:
    """The Reference of one vector file: its metadata.json layer entry, the card's class statistics when missing."""
    meta_path = paths.vector_metadata(exp, trait, variant, pos_dir, component, method)
    meta = load_vector_metadata(exp, trait, variant, pos_dir, component, method)
    ref = VectorRef(trait, layer, method, component, pos_dir, paths.vector_file(exp, trait, variant, pos_dir,
                                                                                   component, method, layer))
    return reference_from_metadata(_layer_meta(meta, layer), _card_layer(exp, ref, variant),
                                   where=f"{meta_path} layers.{layer}")


def rank_by_extraction_metrics(metrics: list[tuple[VectorRef, float | None, float | None]],
                               floor_fraction: float = ACCURACY_FLOOR_FRACTION) -> list[RankedVector]:
    """Rank candidates by held-out metrics, best first; candidates with neither metric are left out.

    The floor is `floor_fraction` x the best held-out accuracy. Order: (1) accuracy at or above the floor,
    by separation, largest first; (2) at or above the floor without a separation, by accuracy; (3) a
    separation but no accuracy (the floor cannot be checked), by separation; (4) below the floor, by
    separation then accuracy. Equal values fall to accuracy, then the tie order: position (response[:5],
    response[:], all[:], the rest sorted), method (probe, mean_diff, gradient, the rest sorted),
    component, layer (lowest first).
    """
    accs = [a for _, a, _ in metrics if a is not None]
    floor = floor_fraction * max(accs) if accs else None
    ranked = []
    for ref, acc, sep in metrics:
        if acc is None and sep is None:
            continue
        shown = ", ".join(x for x in (None if sep is None else f"separation {sep:.2f}",
                                      None if acc is None else f"accuracy {acc:.2f}") if x)
        if acc is None:
            group, why = 2, f"held-out {shown} (no accuracy recorded, floor not checked)"
        elif acc < floor:
            group, why = 3, f"held-out {shown}, below the accuracy floor {floor:.3g}"
        else:
            group = 0 if sep is not None else 1
            why = f"held-out {shown} (accuracy floor {floor:.3g})"
        ranked.append((group, ref, acc, sep, why))
    ranked.sort(key=lambda g: (g[0], -(g[3] if g[3] is not None else 0.0), -(g[2] if g[2] is not None else 0.0),
                               _tie_rank(g[1])))
    best_of = f", best of {len(ranked)}" if ranked else ""
    return [RankedVector(ref, "extraction", sep, separation=sep, accuracy=acc,
                         reason=why + (best_of if k == 0 else ""))
            for k, (group, ref, acc, sep, why) in enumerate(ranked)]


def _load_selected(exp: str, extraction_variant: str, ref: VectorRef, source: str, hidden_size: int | None,
                   ranked: RankedVector | None = None, reason: str = "") -> SelectedVector:
    vector, meta = load_vector(exp, ref.trait, extraction_variant, ref.pos_dir, ref.component, ref.method, ref.layer,
                               hidden_size=hidden_size)
    meta_path = paths.vector_metadata(exp, ref.trait, extraction_variant, ref.pos_dir, ref.component, ref.method)
    entry = _layer_meta(meta, ref.layer)
    baseline = entry.get("baseline", 0.0)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise VectorError(f"{meta_path}: layers.{ref.layer}.baseline must be a number, got {baseline!r}")
    reference = reference_from_metadata(entry, _card_layer(exp, ref, extraction_variant),
                                        where=f"{meta_path} layers.{ref.layer}")
    return SelectedVector(
        trait=ref.trait, layer=ref.layer, method=ref.method, component=ref.component, position=ref.position,
        path=ref.path, sha256=file_sha256(ref.path), baseline=float(baseline), selected_by=source,
        vector=vector, score=ranked.score if ranked else None, coefficient=ranked.coefficient if ranked else None,
        direction=ranked.direction if ranked else None, metadata=meta,
        selection_reason=ranked.reason if ranked else reason,
        accuracy=ranked.accuracy if ranked else None, separation=ranked.separation if ranked else None,
        reference=reference, coherence=ranked.coherence if ranked else None,
        relative_coefficient=ranked.relative_coefficient if ranked else None,
    )


def _card_layer(exp: str, ref: VectorRef, variant: str) -> dict | None:
    """The trait card's entry for this vector's layer (class statistics for vectors whose metadata lacks them)."""
    return cards.card_layer_entry(exp, ref.trait, variant, ref.pos_dir, ref.component, ref.method, ref.layer)


def best_vector(exp: str, trait: str, extraction_variant: str, steering_variant: str,
                component: str = "residual", position: str | None = None, method: str | None = None,
                hidden_size: int | None = None, min_coherence: float = MIN_COHERENCE,
                min_naturalness: float = MIN_NATURALNESS) -> SelectedVector:
    """The single best vector of a trait (see rank_vectors), loaded."""
    top = rank_vectors(exp, trait, extraction_variant, steering_variant, component, position, method,
                       min_coherence=min_coherence, min_naturalness=min_naturalness)[0]
    return _load_selected(exp, extraction_variant, top.ref, top.source, hidden_size, top)


def select_vectors(exp: str, trait: str, extraction_variant: str, steering_variant: str,
                   layers: str | list[ProjectionLayer] = "best", available_layers: list[int] | None = None,
                   component: str = "residual", position: str | None = None, method: str | None = None,
                   multi_vector: int | None = None, hidden_size: int | None = None,
                   n_layers: int | None = None) -> list[SelectedVector]:
    """The vectors to project a trait onto: one per resolved layer, or the top `multi_vector` ranked ones.

    `layers` is the projection grammar (best, best+K, best-K, N). A layer outside `available_layers`
    (the captured layers) is an error listing them. The best layer's vector keeps the best's method and
    position and its evidence source; other layers take `--method` / `--position` or the deterministic
    order (best's position, response[:5], the rest; probe, mean_diff, gradient, the rest), with
    selection_source "layers_arg".
    """
    if multi_vector is not None:
        if multi_vector < 1:
            raise VectorError(f"--multi-vector must be >= 1, got {multi_vector}")
        ranked = rank_vectors(exp, trait, extraction_variant, steering_variant, component, position, method)
        chosen = ranked[:multi_vector]
        if available_layers is not None:
            missing = [c.ref.layer for c in chosen if c.ref.layer not in set(available_layers)]
            if missing:
                raise LayerSpecError(f"trait {trait!r}: --multi-vector {multi_vector} picks layer(s) "
                                     f"{format_layers(missing)}, which were not captured (captured layers: "
                                     f"{format_layers(available_layers)})")
        return [_load_selected(exp, extraction_variant, c.ref, c.source, hidden_size, c) for c in chosen]

    items = parse_projection_layers(layers, n_layers) if isinstance(layers, str) else list(layers)
    needs_best = any(i.kind == "best" for i in items)
    try:
        ranked = rank_vectors(exp, trait, extraction_variant, steering_variant, component, position, method)
    except NoEvidenceError:
        if needs_best:
            raise
        ranked = []
    best = ranked[0] if ranked else None
    candidates = list_vectors(exp, trait, extraction_variant, component, position, method)
    have = sorted({r.layer for r in candidates})
    available = available_layers if available_layers is not None else have
    resolved = resolve_projection_layers(items, best.ref.layer if best else None, available)
    out = []
    for layer in resolved:
        if best is not None and layer == best.ref.layer:
            out.append(_load_selected(exp, extraction_variant, best.ref, best.source, hidden_size, best))
            continue
        at_layer = [r for r in candidates if r.layer == layer]
        if not at_layer:
            raise VectorError(
                f"trait {trait!r}: no vector at layer {layer} (component={component}"
                f"{', position=' + position if position else ''}{', method=' + method if method else ''}) under "
                f"{paths.vectors_dir(exp, trait, extraction_variant)}; vectors exist at layers {format_layers(have)}"
            )
        preferred = best.ref.position if best else None
        at_layer.sort(key=lambda r: _tie_rank(r, preferred))
        pick = at_layer[0]
        how = "as given" if method and position else "first in the method/position order"
        out.append(_load_selected(exp, extraction_variant, pick, "layers_arg", hidden_size,
                                  reason=f"layer {layer} requested; {pick.method} at {pick.position} {how}"))
    return out
