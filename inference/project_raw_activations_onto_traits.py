"""Project activations onto trait vectors: one projection JSON per trait per prompt.

    project_raw_activations_onto_traits(experiment, prompt_set=..., ...) -> dict   the stage, importable (keywords
                                                  are the fields of ProjectOptions)
    ProjectOptions                                every flag, frozen; ProjectOptions.from_args(namespace)
    plan_projection(opts) -> ProjectPlan          every input checked (sets, files, vectors, layers, calibration);
                                                  nothing loaded but small headers, nothing written
    run_projection(plan) -> dict                  read each raw .pt, score it, write its JSONs; the summary
    plan_fused(opts, loaded=None) -> ProjectPlan / run_fused(plan, loaded=None) -> dict
                                                  --fused: the same JSONs from a prefill forward over the stored
                                                  response token ids (core/fused.py), no raw file read or written
    project(opts, loaded=None) -> dict            plan + run of whichever path opts.fused picks
    find_prompt_sets(exp, variant) -> [set]       every (nested) folder of raw/residual/ holding .pt files
    compute_calibration(exp, variant, files, prompt_sets) -> Calibration | None   from captured residuals, written
    projection_record(plan, prompt_set, prompt_id, trait, scores) -> dict   one projection JSON (docs/formats.md)
    format_summary(summary) -> str                the one-line summary main() prints
    main(argv=None) -> int                        the CLI: python inference/project_raw_activations_onto_traits.py --help
    ProjectError                                  bad input; the message names the file or flag

Reads  experiments/{exp}/inference/{variant}/raw/residual/{set}/{id}.pt  (memory-mapped; only the layers
       the chosen vectors need are touched); with --fused instead inference/{responses_from or variant}/
       responses/{set}/{id}.json and the variant's model (forward stopped after the deepest needed layer)
Writes experiments/{exp}/inference/{variant}/projections/{category}/{trait}/{set}/{id}.json
       (the multi-vector projection format of docs/formats.md), atomically; with --fused --save-means also
       inference/{variant}/raw/means/{set}/{id}.pt (residual and projected component, every layer; the
       forward then runs to the last layer), and with --responses-from the variant's missing response JSONs.

Vectors are chosen once per prompt set by utils.vectors (steering evidence of one --steering-variant for
every projected variant, else held-out extraction metrics, else an explicit --layer). Every trait's vectors
at a layer are stacked, so each (prompt, layer) costs one matmul. Everything is checked (layers captured,
component captured, hidden size) before the first file is written.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from core.aggregates import response_aggregates
from core.capture import BatchReport, CaptureOOMError
from core.errors import TraitError
from core.fused import BatchScores, ScoringSpec, calibrate_sequences, score_sequences
from core.hooks import COMPONENTS, num_layers
from core.projection import MassiveDimStats, project as project_onto, token_norms
from utils import cli, paths
from utils.prompts import only_set_ids
from utils.summaries import DEFAULT_UNITS, add_units_flag, score_lines, tally
from utils.config import Variant, resolve_variant
from utils.flags import add_projection_flags
from utils.layers import LayerSpecError, parse_projection_layers
from utils.calibration import CALIBRATION_TOP_K, Calibration, load_calibration, write_calibration
from utils.means import validate_means
from utils.model import DTYPES, LoadedModel, load_model_config, load_tokenizer, load_variant
from utils.prompts import parse_prompt_ids
from utils.responses import TokenStrings, load_responses, replayed_response
from utils.projections import selection_note, validate_projection, write_projection
from utils.raw import RawRecord, check_finite, read_raw
from utils.score_store import update_store
from utils.storage import BackgroundWriter, add_write_flags, guard_outputs
from utils.vectors import SelectedVector, VectorSource, parse_position, resolve_vector_source

SIDES = ("prompt", "response")


class ProjectError(TraitError):
    """Bad input for the projection stage; the message names the file or flag."""


# ---------------------------------------------------------------------------------------------------
# Options and plan

@dataclass(frozen=True)
class ProjectOptions:
    """Every flag of the stage. `layers`: projection grammar (best, best+K, best-K, N; an int is one layer),
    ignored with `multi_vector`. `traits`: a comma list or a sequence of category/name (None: every trait)."""

    experiment: str
    prompt_set: str | None = None
    all_prompt_sets: bool = False
    prompt_ids: str | Sequence[str | int] | None = None   # only these prompts of each set (--prompt-ids)
    model_variant: str | None = None
    traits: str | Sequence[str] | None = None
    layers: str | int | None = "best"
    method: str | None = None
    component: str = "residual"
    position: str | None = None
    extraction_variant: str | None = None
    vectors_experiment: str | None = None
    steering_variant: str | None = None
    multi_vector: int | None = None
    centered: bool = False
    units: str = DEFAULT_UNITS                         # how the summary shows scores (files keep raw scores)
    skip_existing: bool = False
    overwrite: bool = False
    no_calibration: bool = False
    progress: bool = True
    # the fused path (--fused): a prefill forward over the stored token ids instead of raw files
    fused: bool = False
    responses_from: str | None = None
    save_means: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    dtype: str | torch.dtype | None = None           # storage dtype the activations are rounded to (capture's --dtype)
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    index: bool = False                              # fused --index: add the run's scores to the score store

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ProjectOptions":
        if ns.multi_vector is not None and ns.layers is not None:
            raise ProjectError("--multi-vector picks its own layers; drop --layer / --layers")
        layers = ns.layers or "best"
        names = {f.name for f in fields(cls)} - {"layers", "progress"}
        return cls(layers=layers, progress=not ns.quiet, **{k: getattr(ns, k) for k in names})

    @property
    def layer_spec(self) -> str:
        return "best" if self.layers is None else str(self.layers)


@dataclass(frozen=True)
class SetPlan:
    """One prompt set: its files, what is left to write, and the vectors every prompt of it is scored on."""

    prompt_set: str
    files: Mapping[str, Path]                        # prompt id -> raw .pt
    todo: tuple[tuple[str, tuple[str, ...]], ...]    # (prompt id, traits still to write)
    vectors: Mapping[str, tuple[SelectedVector, ...]]  # trait -> its vectors, in projection order
    hidden_size: int
    responses: Mapping[str, dict] = field(default_factory=dict)   # fused: prompt id -> response JSON replayed
    means_todo: frozenset[str] = frozenset()         # fused --save-means: prompt ids whose means file is due
    replay: tuple[str, ...] = ()                     # fused --responses-from: ids whose own response JSON is missing

    @property
    def layers(self) -> list[int]:
        return sorted({v.layer for vs in self.vectors.values() for v in vs})


@dataclass(frozen=True)
class ProjectPlan:
    opts: ProjectOptions
    variant: Variant
    source: VectorSource
    sets: tuple[SetPlan, ...]
    skipped: int                                     # (prompt, trait) outputs skipped by --skip-existing
    calibration: Calibration | None                # a calibration file found (None: compute one, or off)
    fused: "FusedSetup | None" = None                # the fused path's model facts (None: two-stage)

    @property
    def has_work(self) -> bool:
        return any(s.todo for s in self.sets)

    @property
    def has_scores(self) -> bool:
        return any(pending for s in self.sets for _, pending in s.todo)

    @property
    def wants_calibration(self) -> bool:
        """No calibration file was found, one is needed, and --no-calibration is not set."""
        return self.calibration is None and not self.opts.no_calibration and self.has_scores


# ---------------------------------------------------------------------------------------------------
# Prompt sets and raw files

def find_prompt_sets(exp: str, variant: str) -> list[str]:
    """Every folder under raw/residual/ that directly holds .pt files, as a (possibly nested) set name."""
    root = paths.inference_dir(exp, variant) / "raw" / "residual"
    if not root.is_dir():
        return []
    found = {p.parent.relative_to(root).as_posix() for p in root.rglob("*.pt") if not p.name.startswith(".")}
    return sorted(found)


def _raw_files(exp: str, variant: str, prompt_set: str) -> dict[str, Path]:
    files = only_set_ids(paths.raw_files(exp, variant, prompt_set), prompt_set, paths.raw_dir(exp, variant, prompt_set))
    if not files:
        sets = ", ".join(find_prompt_sets(exp, variant)) or "none"
        raise ProjectError(
            f"--prompt-set {prompt_set!r}: no .pt files in {paths.raw_dir(exp, variant, prompt_set)} (captured sets "
            f"of variant {variant!r}: {sets}; create them with: python inference/capture_raw_activations.py "
            f"--experiment {exp} --prompt-set {prompt_set} --model-variant {variant}, or project without raw "
            f"files with --fused)")
    return files


def _check_captured(info: RawRecord, layers: Sequence[int], component: str) -> None:
    """Each needed layer and the projected component must be in the file: never snapped, never zeros."""
    listing = ", ".join(str(l) for l in info.layers)
    for layer in layers:
        if layer not in info.components:
            raise ProjectError(f"{info.path}: layer {layer} was not captured (captured layers: {listing})")
        if component not in info.components[layer]:
            have = ", ".join(sorted(info.components[layer]))
            raise ProjectError(
                f"{info.path}: component {component!r} was not captured at layer {layer} (captured: {have}); "
                f"capture it with --components {component}"
            )


# ---------------------------------------------------------------------------------------------------
# Massive-dims calibration (the file's format: utils/calibration.py)

def compute_calibration(exp: str, variant: str, files: Sequence[Path], prompt_sets: Sequence[str],
                        top_k: int = CALIBRATION_TOP_K, progress: bool = False) -> Calibration | None:
    """Per layer, the top-k dims by |mean| of the residual over response tokens (prompt tokens when a
    response has none), plus dim magnitudes, mean norms and mean alignment; written to the variant's
    calibration path. None when no file holds residual activations.
    """
    stats = MassiveDimStats(top_k)
    n_prompts = 0
    for path in tqdm(files, desc="calibration", unit="prompt", file=sys.stderr, disable=not progress):
        raw = read_raw(path)
        for side in ("response", "prompt"):
            acts = raw.side(side).get("activations") or {}
            by_layer = {l: c["residual"] for l, c in acts.items() if "residual" in c and c["residual"].shape[0] > 0}
            if by_layer:
                for layer, t in by_layer.items():
                    stats.add(layer, check_finite(path, f"{side} layer {layer} residual", t))
                n_prompts += 1
                break
    if not stats.layers:
        return None
    return write_calibration(exp, variant, stats, n_prompts, prompt_sets,
                             "project_raw_activations_onto_traits.py (no calibration file was found)")


def _calibrate_from_raw(plan: ProjectPlan) -> Calibration | None:
    """Compute the calibration from every raw file of the run's sets and say so on stderr."""
    exp, variant = plan.opts.experiment, plan.variant.name
    files = [f for s in plan.sets for f in s.files.values()]
    calibration = compute_calibration(exp, variant, files, [s.prompt_set for s in plan.sets],
                                      progress=plan.opts.progress)
    if calibration is None:
        print("calibration: none found and none computable (no residual activations captured); "
              "massive_dim_data omitted", file=sys.stderr)
    else:
        print(f"calibration: none found at {paths.calibration_file(exp, variant)} or {paths.calibration_file(exp)}; "
              f"computed from {len(files)} captured prompts and written to {calibration.path}", file=sys.stderr)
    return calibration


# ---------------------------------------------------------------------------------------------------
# Planning: every input checked before anything is written

def _check_options(opts: ProjectOptions) -> None:
    if bool(opts.prompt_set) == bool(opts.all_prompt_sets):
        raise ProjectError("give exactly one of --prompt-set or --all-prompt-sets")
    if opts.component not in COMPONENTS:
        raise ProjectError(f"--component {opts.component!r}: choose from {', '.join(COMPONENTS)}")
    if opts.position is not None:
        parse_position(opts.position)
    if opts.multi_vector is not None and opts.multi_vector < 1:
        raise ProjectError(f"--multi-vector must be >= 1, got {opts.multi_vector}")


def _check_layer_spec(opts: ProjectOptions, variant: Variant) -> int | None:
    """Syntax errors in --layers before anything is read; the model's depth when a layer counts from the end."""
    if opts.multi_vector is not None:
        return None
    n_layers = None
    if re.search(r"(^|,)\s*-\d", opts.layer_spec):
        n_layers = int(load_model_config(variant.model_path(opts.experiment)).num_hidden_layers)
    parse_projection_layers(opts.layer_spec, n_layers)
    return n_layers


def _pending(opts: ProjectOptions, variant: str, prompt_set: str, ids: Sequence[str],
             traits: Sequence[str]) -> tuple[list[tuple[str, tuple[str, ...]]], int]:
    """(prompt id, traits still to write) per prompt, and how many outputs --skip-existing skips."""
    todo, skipped = [], 0
    for pid in ids:
        pending = tuple(t for t in traits if not (
            opts.skip_existing and paths.projection_file(opts.experiment, variant, t, prompt_set, pid).exists()))
        skipped += len(traits) - len(pending)
        if pending:
            todo.append((pid, pending))
    return todo, skipped


def select_set_vectors(opts: ProjectOptions, source: VectorSource, traits: Sequence[str], available: Sequence[int],
                       hidden_size: int, n_layers: int | None, where: str) -> dict[str, tuple[SelectedVector, ...]]:
    """Each trait's vectors for a set; a layer outside `available` is an error that says `where` they come from."""
    out = {}
    for trait in traits:
        try:
            out[trait] = tuple(source.select(
                trait, layers=opts.layer_spec, available_layers=list(available), component=opts.component,
                position=opts.position, method=opts.method, multi_vector=opts.multi_vector,
                hidden_size=hidden_size, n_layers=n_layers))
        except LayerSpecError as e:
            raise LayerSpecError(f"trait {trait!r}: {e} ({where})") from e
    return out


def _only_ids(files: dict[str, Path], prompt_ids, folder: Path) -> dict[str, Path]:
    """--prompt-ids: only those prompts' raw files, in natural id order; an id without a file is an error."""
    ids = parse_prompt_ids(prompt_ids)
    if ids is None:
        return files
    missing = [i for i in ids if i not in files]
    if missing:
        raise ProjectError(f"--prompt-ids: no raw file for id(s) {', '.join(missing)} in {folder}")
    return {i: files[i] for i in sorted(set(ids), key=paths.natural_key)}


def _plan_raw_set(opts: ProjectOptions, variant: str, source: VectorSource, prompt_set: str,
                  n_layers: int | None) -> tuple[SetPlan, int]:
    """The set's files and pending outputs; every pending file checked (structure, shapes, dtypes, and the tensors
    scoring will read are finite), vectors chosen against the first one."""
    files = _only_ids(_raw_files(opts.experiment, variant, prompt_set), opts.prompt_ids,
                      paths.raw_dir(opts.experiment, variant, prompt_set))
    todo, skipped = _pending(opts, variant, prompt_set, list(files), source.traits)
    if not todo:
        return SetPlan(prompt_set, files, (), {}, 0), skipped
    first = files[todo[0][0]]
    info = read_raw(first, n_layers=n_layers)
    captured = set().union(*info.components.values())
    if opts.component not in captured:  # before vector selection: the clearer message
        raise ProjectError(f"{first}: component {opts.component!r} was not captured (captured: "
                           f"{', '.join(sorted(captured))}); capture it with --components {opts.component}")
    traits = list(dict.fromkeys(t for _, ts in todo for t in ts))
    vectors = select_set_vectors(opts, source, traits, info.layers, info.hidden_size, info.n_layers or n_layers,
                                 f"captured in {first}")
    plan = SetPlan(prompt_set, files, tuple(todo), vectors, info.hidden_size)
    for pid, pending in todo:  # the whole set before the first write: a bad file in the middle fails here
        other = info if files[pid] == first else read_raw(files[pid], info.hidden_size, n_layers)
        needed = sorted({v.layer for t in pending for v in vectors[t]})
        _check_captured(other, needed, opts.component)
        other.check_finite(needed, {opts.component, "residual"})   # only the tensors scoring reads
    return plan, skipped


def plan_projection(opts: ProjectOptions) -> ProjectPlan:
    """Check every input of the two-stage path (raw files) and decide what is left to write."""
    _check_options(opts)
    variant = resolve_variant(opts.experiment, opts.model_variant, "application")
    n_layers = _check_layer_spec(opts, variant)
    source = resolve_vector_source(opts.experiment, opts.vectors_experiment, opts.extraction_variant,
                                   opts.steering_variant, opts.traits)
    sets = find_prompt_sets(opts.experiment, variant.name) if opts.all_prompt_sets else [opts.prompt_set.strip("/")]
    if not sets:
        raise ProjectError(f"--all-prompt-sets: no .pt files under "
                           f"{paths.inference_dir(opts.experiment, variant.name) / 'raw' / 'residual'}")
    planned = [_plan_raw_set(opts, variant.name, source, s, n_layers) for s in sets]
    set_plans = tuple(p for p, _ in planned)
    calibration = None
    if not opts.no_calibration and any(s.todo for s in set_plans):
        calibration = load_calibration(opts.experiment, variant.name)
    return guard_plan(ProjectPlan(opts, variant, source, set_plans, sum(n for _, n in planned), calibration))


def guard_plan(plan: ProjectPlan) -> ProjectPlan:
    """Refuse (nothing written) when outputs exist without --skip-existing / --overwrite (utils.storage.guard_outputs);
    the message says when the existing set was projected with another selection rule."""
    o, name = plan.opts, plan.variant.name
    outputs = [paths.projection_file(o.experiment, name, t, s.prompt_set, pid)
               for s in plan.sets for pid, pending in s.todo for t in pending]
    outputs += [paths.means_file(o.experiment, name, s.prompt_set, pid) for s in plan.sets for pid in s.means_todo]
    spec = None if o.multi_vector else o.layer_spec
    guard_outputs(outputs, overwrite=o.overwrite, skip_existing=o.skip_existing,
                  why=lambda existing: selection_note([p for p in existing if p.suffix == ".json"], spec, o.multi_vector))
    return plan


# ---------------------------------------------------------------------------------------------------
# Scores of one prompt, and its JSONs

@dataclass
class PromptScores:
    """One prompt's numbers for its projection JSONs, from a raw file or from a fused forward."""

    n_tokens: dict[str, int]                                   # side -> tokens
    scores: dict[tuple[str, int], dict[str, list[float]]]      # (trait, k-th vector of it) -> side -> per token
    norms: dict[int, dict[str, list[float]]]                   # layer -> side -> |h| per token
    captured: dict[int, dict[str, bool]]                       # layer -> side -> activations were there
    dim_values: dict[int, dict[str, dict[str, list[float]]]]   # layer -> side -> {dim: per token}, calibration dims
    norms_component: str = "residual"
    model: str | None = None


def calibration_dims(calibration: Calibration | None, hidden_size: int) -> list[int]:
    return calibration.dims_below(hidden_size) if calibration is not None else []


def scores_from_raw(plan: ProjectPlan, set_plan: SetPlan, path: Path, pending: Sequence[str]) -> PromptScores:
    """Score one raw .pt on the pending traits' vectors: per layer one matmul of both sides on all its vectors."""
    component = plan.opts.component
    info = read_raw(path, set_plan.hidden_size)
    needed = sorted({v.layer for t in pending for v in set_plan.vectors[t]})
    _check_captured(info, needed, component)
    dims = calibration_dims(plan.calibration, info.hidden_size)
    first_layers = {set_plan.vectors[t][0].layer for t in pending}
    out = PromptScores(dict(info.n_tokens), {}, {}, {}, {}, model=info.metadata.get("model"))
    for layer in needed:
        acts = {s: info.activations(s, layer, component) for s in SIDES}
        present = [s for s in SIDES if acts[s] is not None]
        stacked = [(t, k) for t in pending for k, v in enumerate(set_plan.vectors[t]) if v.layer == layer]
        matrix = torch.stack([set_plan.vectors[t][k].vector for t, k in stacked])
        all_scores = check_finite(path, f"layer {layer} {component}",
                                  project_onto(torch.cat([acts[s] for s in present]), matrix))   # [n_tokens, K]
        split = dict(zip(present, torch.split(all_scores, [acts[s].shape[0] for s in present])))
        for j, key in enumerate(stacked):
            out.scores[key] = {s: (split[s][:, j].tolist() if s in split else []) for s in SIDES}
        resid = {s: info.activations(s, layer, "residual") for s in SIDES}
        if all(resid[s] is None for s in present):      # residual not captured: norms of the component itself
            resid, out.norms_component = acts, component
        out.norms[layer] = {s: (check_finite(path, f"layer {layer} norms", token_norms(resid[s])).tolist()
                                if resid[s] is not None else []) for s in SIDES}
        out.captured[layer] = {s: acts[s] is not None for s in SIDES}
        if layer in first_layers:
            out.dim_values[layer] = {s: ({str(d): acts[s][:, d].float().tolist() for d in dims}
                                         if acts[s] is not None else {}) for s in SIDES}
    return out


def _massive_dim_data(cal: Calibration, sel: SelectedVector, values: dict[str, dict[str, list[float]]]) -> dict:
    """The viewer's contract: dims, top_dims_by_layer, vec_norm, vec_components, activation_values per side."""
    dims = [d for d in cal.dims if d < sel.vector.shape[0]]
    return {
        "layer": sel.layer, "method": sel.method, "component": sel.component,
        "dims": dims,
        "top_dims_by_layer": cal.top_dims_by_layer,
        "vec_norm": float(sel.vector.norm()),
        "vec_components": {str(d): float(sel.vector[d]) for d in dims},
        "activation_values": values,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0



def _under_root(path) -> str:
    """A file's path relative to the experiments root when it lies inside it (experiments/{exp}/...: the same on
    every machine a batch runs on), else as given."""
    root = paths.experiments_root().resolve()
    p = Path(path).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(path)

def projection_record(plan: ProjectPlan, prompt_set: str, prompt_id: str, trait: str, vectors: Sequence[SelectedVector],
                      sc: PromptScores, date: str) -> dict:
    """The projection JSON of one trait for one prompt (docs/formats.md); the same for both paths."""
    opts, vec_root = plan.opts, paths.experiment_dir(plan.source.vectors_experiment)
    entries = []
    for k, v in enumerate(vectors):
        got, shift = sc.scores[(trait, k)], (v.baseline if opts.centered else 0.0)
        entries.append({
            "method": v.method, "layer": v.layer, "position": v.position, "component": v.component,
            "selection_source": v.selection_source, "selected_by": v.selected_by,
            "selection_reason": v.selection_reason, "baseline": v.baseline, "reference": v.reference.to_json(),
            **{side: ([x - shift for x in got[side]] if shift else got[side]) for side in SIDES},
            "token_norms": sc.norms[v.layer],
        })
    trait_layers = sorted({v.layer for v in vectors})
    out: dict[str, Any] = {
        "metadata": {
            "prompt_id": prompt_id, "prompt_set": prompt_set,
            "n_prompt_tokens": sc.n_tokens["prompt"], "n_response_tokens": sc.n_tokens["response"],
            "multi_vector": True, "n_vectors": len(entries), "component": opts.component,
            "position": vectors[0].position, "centered": opts.centered, "projection_date": date,
            "trait": trait, "experiment": opts.experiment, "model_variant": plan.variant.name, "model": sc.model,
            **plan.source.describe(), "vector_source": plan.source.describe(),
            "layers_spec": None if opts.multi_vector else opts.layer_spec, "multi_vector_n": opts.multi_vector,
            "position_arg": opts.position, "token_norms_component": sc.norms_component,
            "vectors": [v.describe(vec_root) for v in vectors],
            "calibration": None if plan.calibration is None else _under_root(plan.calibration.path),
            # per vector and side: n, mean, max, ema_max, frac_above (over the threshold: the baseline, 0 when centered)
            "aggregates": [{"layer": e["layer"], "method": e["method"], **{side: response_aggregates(
                e[side], 0.0 if opts.centered else v.baseline) for side in SIDES}} for e, v in zip(entries, vectors)],
        },
        "projections": entries,
        "activation_norms": {
            "layers": trait_layers, "component": sc.norms_component, "statistic": "mean token norm",
            **{s: ([_mean(sc.norms[l][s]) for l in trait_layers] if any(sc.captured[l][s] for l in trait_layers)
                   else []) for s in SIDES},
        },
    }
    if plan.calibration is not None:
        out["massive_dim_data"] = _massive_dim_data(plan.calibration, vectors[0], sc.dim_values[vectors[0].layer])
    return out


def prompt_records(plan: ProjectPlan, set_plan: SetPlan, prompt_id: str, pending: Sequence[str],
                   sc: PromptScores) -> list[tuple[Path, dict]]:
    """(path, JSON) of each pending trait of one prompt."""
    date = _dt.datetime.now().isoformat()
    return [(paths.projection_file(plan.opts.experiment, plan.variant.name, t, set_plan.prompt_set, prompt_id),
             projection_record(plan, set_plan.prompt_set, prompt_id, t, set_plan.vectors[t], sc, date))
            for t in pending]


def write_prompt(plan: ProjectPlan, set_plan: SetPlan, prompt_id: str, pending: Sequence[str],
                 sc: PromptScores, scores: dict | None = None) -> list[tuple[Path, int]]:
    """Write the pending traits' JSONs of one prompt, each atomically; returns (path, bytes) per file.
    `scores` (the summary's) tallies each record for the summary line."""
    out = []
    for trait, (path, rec) in zip(pending, prompt_records(plan, set_plan, prompt_id, pending, sc)):
        if scores is not None:
            tally(scores, trait, rec)
        out.append((path, write_projection(path, rec)))
    return out


# ---------------------------------------------------------------------------------------------------
# Running

def new_summary(plan: ProjectPlan) -> dict[str, Any]:
    opts = plan.opts
    return {
        "experiment": opts.experiment, "model_variant": plan.variant.name, **plan.source.describe(),
        "prompt_sets": [s.prompt_set for s in plan.sets], "traits": list(plan.source.traits), "written": 0,
        "skipped": plan.skipped, "prompts": 0, "files": [], "bytes": 0, "fused": False,
        "vectors": {s.prompt_set: {t: [v.describe(paths.experiment_dir(plan.source.vectors_experiment)) for v in vs]
                                   for t, vs in s.vectors.items()} for s in plan.sets},
        "calibration": None, "calibration_note": "off (--no-calibration)" if opts.no_calibration else "none",
        "seconds": 0.0, "units": opts.units, "scores": {},
    }


def note_calibration(summary: dict, calibration: Calibration | None) -> None:
    if calibration is not None:
        summary["calibration"] = {"path": str(calibration.path), "source": calibration.source}
        summary["calibration_note"] = f"{calibration.source} ({calibration.path})"


def count_written(summary: dict, written: list[tuple[Path, int]]) -> None:
    summary["files"].extend(str(p) for p, _ in written)
    summary["written"] += len(written)
    summary["bytes"] += sum(n for _, n in written)
    summary["prompts"] += 1


def run_projection(plan: ProjectPlan) -> dict:
    """The two-stage path: compute the calibration when none exists, then score and write every pending prompt."""
    t0 = time.perf_counter()
    if plan.wants_calibration:
        plan = replace(plan, calibration=_calibrate_from_raw(plan))
    summary = new_summary(plan)
    if plan.calibration is not None and plan.calibration.source == "computed":
        summary["bytes"] += plan.calibration.path.stat().st_size
    note_calibration(summary, plan.calibration)
    bar = cli.Progress(total=sum(len(s.todo) for s in plan.sets), unit="prompt", desc="project", file=sys.stderr,
               disable=not plan.opts.progress, dynamic_ncols=True)
    with bar:
        for set_plan in plan.sets:
            for pid, pending in set_plan.todo:
                sc = scores_from_raw(plan, set_plan, set_plan.files[pid], pending)
                count_written(summary, write_prompt(plan, set_plan, pid, pending, sc, summary["scores"]))
                bar.update(1)
    summary["seconds"] = time.perf_counter() - t0
    return summary


# ---------------------------------------------------------------------------------------------------
# The fused path: scores straight from a prefill forward over the stored token ids; no raw file

@dataclass(frozen=True)
class FusedSetup:
    """What only the fused path needs: whose responses it replays, the tokenizer that checked their ids, the
    model's depth and width from its config (no weights loaded), and the dtype activations are rounded to."""

    responses: Variant
    tokenizer: Any
    n_layers: int
    hidden_size: int
    store_dtype: torch.dtype | None


FUSED_ONLY = {"responses_from": "--responses-from", "save_means": "--save-means", "load_in_8bit": "--load-in-8bit",
              "load_in_4bit": "--load-in-4bit", "dtype": "--dtype", "batch_size": "--batch-size",
              "max_batch_tokens": "--max-batch-tokens", "index": "--index"}


def find_response_sets(exp: str, variant: str) -> list[str]:
    """Every folder under responses/ that directly holds response JSONs, as a (possibly nested) set name."""
    root = paths.inference_dir(exp, variant) / "responses"
    if not root.is_dir():
        return []
    found = {p.parent.relative_to(root).as_posix() for p in root.rglob("*.json")
             if not p.name.startswith(".") and not p.name.endswith("_annotations.json")}
    return sorted(found)


def _check_fused_options(opts: ProjectOptions) -> torch.dtype | None:
    """The fused flags; returns the storage dtype (None: the model's)."""
    if not opts.fused:
        given = [flag for name, flag in FUSED_ONLY.items() if getattr(opts, name) not in (None, False)]
        if given:
            raise ProjectError(f"{given[0]} needs --fused (without it the projection reads captured raw files)")
        return None
    if opts.load_in_8bit and opts.load_in_4bit:
        raise ProjectError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")
    for flag, value in (("--batch-size", opts.batch_size), ("--max-batch-tokens", opts.max_batch_tokens)):
        if value is not None and value < 1:
            raise ProjectError(f"{flag} must be >= 1, got {value}")
    if opts.dtype is None or opts.dtype == "auto" or isinstance(opts.dtype, torch.dtype):
        return None if opts.dtype in (None, "auto") else opts.dtype
    if opts.dtype not in DTYPES:
        raise ProjectError(f"--dtype {opts.dtype!r}: choose from auto (the model's dtype), {', '.join(DTYPES)}")
    return DTYPES[opts.dtype]


def _fused_setup(opts: ProjectOptions, variant: Variant, store_dtype: torch.dtype | None,
                 loaded: LoadedModel | None) -> FusedSetup:
    exp = opts.experiment
    responses = resolve_variant(exp, opts.responses_from) if opts.responses_from else variant
    cfg = load_model_config(variant.model_path(exp))
    n_layers, hidden = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        raise ProjectError(f"{variant.model_path(exp)}: its config has no num_hidden_layers / hidden_size")
    tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(variant.model_path(exp))
    if responses.model_path(exp) != variant.model_path(exp) and \
            load_tokenizer(responses.model_path(exp)).get_vocab() != tokenizer.get_vocab():
        raise ProjectError(f"--responses-from {responses.name}: its tokenizer ({responses.model}) differs from "
                           f"{variant.name}'s ({variant.model}), so the stored token ids would mean other tokens; "
                           f"replay the responses of a variant with the same tokenizer")
    return FusedSetup(responses, tokenizer, n_layers, hidden, store_dtype)


def _plan_fused_set(opts: ProjectOptions, variant: Variant, source: VectorSource, setup: FusedSetup,
                    prompt_set: str) -> tuple[SetPlan, int]:
    """The set's response JSONs (each validated against the tokenizer), pending outputs and vectors."""
    exp, name = opts.experiment, variant.name
    items = dict(load_responses(exp, setup.responses.name, prompt_set, prompt_ids=parse_prompt_ids(opts.prompt_ids),
                                vocab_size=len(setup.tokenizer)))
    if not items:
        raise ProjectError(f"--fused: no response JSONs in {paths.responses_dir(exp, setup.responses.name, prompt_set)} "
                           f"(create them with: python inference/generate_responses.py --experiment {exp} "
                           f"--prompt-set {prompt_set} --model-variant {setup.responses.name})")
    pending, skipped = _pending(opts, name, prompt_set, list(items), source.traits)
    pending_of = dict(pending)
    means = frozenset(pid for pid in items if opts.save_means and not (
        opts.skip_existing and paths.means_file(exp, name, prompt_set, pid).exists()))
    todo = tuple((pid, pending_of.get(pid, ())) for pid in items if pid in pending_of or pid in means)
    replay = () if setup.responses.name == name else tuple(
        pid for pid in items if not paths.response_file(exp, name, prompt_set, pid).exists())
    traits = list(dict.fromkeys(t for _, ts in pending for t in ts))
    vectors = select_set_vectors(opts, source, traits, range(setup.n_layers), setup.hidden_size, setup.n_layers,
                                 f"--fused: the model {variant.model} has {setup.n_layers} layers, read from its "
                                 f"config")
    return SetPlan(prompt_set, {}, todo, vectors, setup.hidden_size, items, means, replay), skipped


def plan_fused(opts: ProjectOptions, loaded: LoadedModel | None = None) -> ProjectPlan:
    """Check every input of the fused path (responses, tokenizers, vectors against the model's config).

    Reads only JSONs, vector files, the model's config and tokenizer(s) (`loaded`'s tokenizer when given)."""
    _check_options(opts)
    store_dtype = _check_fused_options(opts)
    variant = resolve_variant(opts.experiment, opts.model_variant, "application")
    setup = _fused_setup(opts, variant, store_dtype, loaded)
    if opts.multi_vector is None:
        parse_projection_layers(opts.layer_spec, setup.n_layers)
    source = resolve_vector_source(opts.experiment, opts.vectors_experiment, opts.extraction_variant,
                                   opts.steering_variant, opts.traits)
    sets = (find_response_sets(opts.experiment, setup.responses.name) if opts.all_prompt_sets
            else [opts.prompt_set.strip("/")])
    if not sets:
        raise ProjectError(f"--fused --all-prompt-sets: no response JSONs under "
                           f"{paths.inference_dir(opts.experiment, setup.responses.name) / 'responses'}")
    planned = [_plan_fused_set(opts, variant, source, setup, s) for s in sets]
    set_plans = tuple(p for p, _ in planned)
    plan = ProjectPlan(opts, variant, source, set_plans, sum(n for _, n in planned), None, setup)
    if not opts.no_calibration and plan.has_scores:
        plan = replace(plan, calibration=load_calibration(opts.experiment, variant.name))
    return guard_plan(plan)


@dataclass(frozen=True)
class _SetScoring:
    """The device-side spec of one set, and where each (trait, k-th vector) lands in its layer's matmul."""

    spec: ScoringSpec
    columns: dict[tuple[str, int], tuple[int, int]]    # (trait, k) -> (layer, column)
    first_layers: tuple[int, ...]                       # layers whose massive-dim values the JSONs carry


def _set_scoring(plan: ProjectPlan, set_plan: SetPlan, n_layers: int) -> _SetScoring:
    stacked: dict[int, list[tuple[str, int]]] = {}
    for trait, vectors in set_plan.vectors.items():
        for k, v in enumerate(vectors):
            stacked.setdefault(v.layer, []).append((trait, k))
    columns = {key: (layer, j) for layer, keys in stacked.items() for j, key in enumerate(keys)}
    matrices = {layer: torch.stack([set_plan.vectors[t][k].vector for t, k in keys]) for layer, keys in stacked.items()}
    dims = tuple(calibration_dims(plan.calibration, set_plan.hidden_size))
    first = tuple(sorted({vs[0].layer for vs in set_plan.vectors.values()})) if dims else ()
    means = plan.opts.save_means and bool(set_plan.means_todo)
    spec = ScoringSpec(plan.opts.component, matrices, dims, first,
                       mean_layers=tuple(range(n_layers)) if means else (),
                       mean_components=tuple(dict.fromkeys(("residual", plan.opts.component))) if means else (),
                       store_dtype=plan.fused.store_dtype)
    return _SetScoring(spec, columns, first)


def _split(values: list, prompt_end: int) -> dict[str, list]:
    return {"prompt": values[:prompt_end], "response": values[prompt_end:]}


def scores_from_batch(scoring: _SetScoring, set_plan: SetPlan, batch: BatchScores, b: int, prompt_end: int,
                      model: str | None) -> PromptScores:
    """One prompt of a fused batch as the PromptScores the JSON builder takes (the same as scores_from_raw's)."""
    n = batch.lengths[b]
    by_layer = {layer: batch.scores(b, layer).T.tolist() for layer in scoring.spec.units}
    out = PromptScores({"prompt": prompt_end, "response": n - prompt_end}, {}, {}, {}, {}, "residual", model)
    for key, (layer, j) in scoring.columns.items():
        out.scores[key] = _split(by_layer[layer][j], prompt_end)
    for layer in scoring.spec.units:
        out.norms[layer] = _split(batch.norms(b, layer).tolist(), prompt_end)
        out.captured[layer] = {s: True for s in SIDES}
    for layer in scoring.first_layers:
        values = batch.dim_values(b, layer).T.tolist()
        out.dim_values[layer] = {side: {str(d): _split(values[i], prompt_end)[side]
                                        for i, d in enumerate(scoring.spec.dims)} for side in SIDES}
    for layer in set(scoring.spec.units) - set(out.dim_values):
        out.dim_values[layer] = {s: {} for s in SIDES}
    return out


def means_record(plan: ProjectPlan, set_plan: SetPlan, prompt_id: str, batch: BatchScores, b: int,
                 info: dict) -> dict:
    """The means file of one prompt (utils/means.py's format), from the fused batch's device-side means."""
    data = set_plan.responses[prompt_id]
    ids, end = data["token_ids"], data["prompt_end"]
    spec = batch.spec
    return {
        "prompt": {"n_tokens": end, "mean": batch.means(b, "prompt") if end else {}},
        "response": {"n_tokens": len(ids) - end, "mean": batch.means(b, "response") if len(ids) > end else {}},
        "token_ids": list(ids), "prompt_end": end,
        "metadata": {
            "model": info.get("model", plan.variant.model), "variant": plan.variant.name,
            "lora": info.get("lora", plan.variant.lora), "quantization": info.get("quantization"),
            "dtype": str(batch.stored_dtype).replace("torch.", ""), "compute_dtype": info.get("dtype"),
            "layers": sorted(spec.mean_layers), "components": sorted(spec.mean_components),
            "responses_from": plan.fused.responses.name, "prompt_id": prompt_id, "prompt_set": set_plan.prompt_set,
            "capture_date": _dt.datetime.now().isoformat(), "source": "fused",
        },
    }


def _load_fused(plan: ProjectPlan, loaded: LoadedModel | None) -> LoadedModel:
    opts, setup = plan.opts, plan.fused
    lm = loaded or load_variant(opts.experiment, plan.variant.name, load_in_8bit=opts.load_in_8bit,
                                load_in_4bit=opts.load_in_4bit, tokenizer=setup.tokenizer)
    if num_layers(lm.model) != setup.n_layers:  # only when `loaded` is not the variant's model
        raise ProjectError(f"the loaded model has {num_layers(lm.model)} layers, {plan.variant.name}'s config says "
                           f"{setup.n_layers}")
    return lm


def _pad_id(lm: LoadedModel) -> int:
    return lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0  # 0 is a valid pad id (B24)


def _oom_error(pid: str, n_tokens: int) -> ProjectError:
    return ProjectError(f"prompt {pid} ({n_tokens} tokens): out of memory even at batch size 1; load with "
                        f"--load-in-8bit / --load-in-4bit")


def _calibrate_fused(plan: ProjectPlan, lm: LoadedModel, summary: dict) -> Calibration:
    """The two-stage calibration, computed on the device over every prompt of the run's sets (one extra pass)."""
    opts, exp, variant = plan.opts, plan.opts.experiment, plan.variant.name
    items = [(pid, d) for s in plan.sets for pid, d in s.responses.items()]
    stats = MassiveDimStats(CALIBRATION_TOP_K)
    bar = tqdm(total=len(items), unit="prompt", desc="calibration", file=sys.stderr, disable=not opts.progress)
    try:
        n = calibrate_sequences(lm.model, [d["token_ids"] for _, d in items], [d["prompt_end"] for _, d in items],
                                stats, list(range(plan.fused.n_layers)), _pad_id(lm), plan.fused.store_dtype,
                                opts.max_batch_tokens, opts.batch_size, _on_batch(bar, summary, advance=True))
    except CaptureOOMError as e:
        raise _oom_error(items[e.index][0], e.n_tokens) from e
    finally:
        bar.close()
    calibration = write_calibration(exp, variant, stats, n, [s.prompt_set for s in plan.sets],
                                    "project_raw_activations_onto_traits.py --fused (no calibration file was found)")
    print(f"calibration: none found at {paths.calibration_file(exp, variant)} or {paths.calibration_file(exp)}; "
          f"computed on the device from {n} prompts and written to {calibration.path}", file=sys.stderr)
    return calibration


def _on_batch(bar, summary: dict, advance: bool = False):
    """Count out-of-memory retries (and say so); with `advance`, move the bar by each finished batch."""
    def on_batch(report: BatchReport) -> None:
        if report.ok:
            if advance:
                bar.update(len(report.indices))
            return
        summary["out_of_memory_retries"] += 1
        bar.write(f"out of memory on a batch of {len(report.indices)} prompts ({report.padded_tokens} padded "
                  f"tokens): retrying in halves", file=sys.stderr)
    return on_batch


def _score_set_fused(plan: ProjectPlan, set_plan: SetPlan, lm: LoadedModel, strings: TokenStrings,
                     writer: BackgroundWriter, summary: dict, bar) -> None:
    """Score one set's pending prompts batch by batch; each prompt's files are queued as soon as its batch is done."""
    scoring = _set_scoring(plan, set_plan, num_layers(lm.model))
    data = [set_plan.responses[pid] for pid, _ in set_plan.todo]
    model_name, replay = lm.info.get("model", plan.variant.model), set(set_plan.replay)
    try:
        for idx, batch in score_sequences(lm.model, [d["token_ids"] for d in data], [d["prompt_end"] for d in data],
                                          scoring.spec, _pad_id(lm), plan.opts.max_batch_tokens, plan.opts.batch_size,
                                          _on_batch(bar, summary)):
            for b, i in enumerate(idx):
                pid, pending = set_plan.todo[i]
                if pending:
                    sc = scores_from_batch(scoring, set_plan, batch, b, data[i]["prompt_end"], model_name)
                    for trait, (path, record) in zip(pending, prompt_records(plan, set_plan, pid, pending, sc)):
                        tally(summary["scores"], trait, record)
                        writer.submit_json(path, validate_projection(record, path))
                    summary["written"] += len(pending)
                if pid in set_plan.means_todo:
                    path = paths.means_file(plan.opts.experiment, plan.variant.name, set_plan.prompt_set, pid)
                    writer.submit(path, validate_means(means_record(plan, set_plan, pid, batch, b, lm.info), path))
                    summary["means_written"] += 1
                if pid in replay:
                    _submit_replay(plan, set_plan, pid, strings, writer)
                    summary["responses_written"] += 1
                summary["prompts"] += 1
                bar.update(1)
    except CaptureOOMError as e:
        raise _oom_error(set_plan.todo[e.index][0], e.n_tokens) from e


def _submit_replay(plan: ProjectPlan, set_plan: SetPlan, pid: str, strings: TokenStrings,
                   writer: BackgroundWriter) -> None:
    """The replaying variant's own response JSON (issue: the viewer needs token data under its name)."""
    data = set_plan.responses[pid]
    writer.submit_json(paths.response_file(plan.opts.experiment, plan.variant.name, set_plan.prompt_set, pid),
                       replayed_response(data, strings.of(data), plan.variant.model, plan.fused.responses.name))


def _submit_skipped_replays(plan: ProjectPlan, strings: TokenStrings, writer: BackgroundWriter) -> int:
    """Replayed response JSONs of prompts that need no forward (their outputs exist)."""
    n = 0
    for set_plan in plan.sets:
        todo = {pid for pid, _ in set_plan.todo}
        for pid in set_plan.replay:
            if pid not in todo:
                _submit_replay(plan, set_plan, pid, strings, writer)
                n += 1
    return n


def run_fused(plan: ProjectPlan, loaded: LoadedModel | None = None) -> dict:
    """Load the variant (unless `loaded`), compute the calibration when none exists, then score every pending
    prompt in batches; projection JSONs (and means files, replayed response JSONs) are written as each batch
    finishes, on a background thread, each atomically. No raw file is written."""
    t0 = time.perf_counter()
    summary = dict(new_summary(plan), fused=True, means_written=0, responses_written=0, out_of_memory_retries=0)
    strings = TokenStrings(plan.fused.tokenizer)
    lm = None
    try:
        with BackgroundWriter() as writer:
            summary["responses_written"] += _submit_skipped_replays(plan, strings, writer)
            if plan.has_work:  # decided before loading the model
                lm = _load_fused(plan, loaded)
                if plan.wants_calibration:
                    plan = replace(plan, calibration=_calibrate_fused(plan, lm, summary))
                    summary["bytes"] += plan.calibration.path.stat().st_size
                note_calibration(summary, plan.calibration)
                with cli.Progress(total=sum(len(s.todo) for s in plan.sets), unit="prompt", desc="project --fused",
                          file=sys.stderr, disable=not plan.opts.progress, dynamic_ncols=True) as bar:
                    for set_plan in plan.sets:
                        if set_plan.todo:
                            _score_set_fused(plan, set_plan, lm, strings, writer, summary, bar)
        summary["bytes"] += writer.bytes
        summary["files"] = [f for f in writer.files if f.endswith(".json") and "/projections/" in f]
    finally:
        if loaded is None and lm is not None and torch.cuda.is_available():
            del lm
            torch.cuda.empty_cache()
    if plan.opts.index:  # the JSONs just written, into analysis/scores/ (utils/score_store.py)
        summary["index"] = update_store(plan.opts.experiment, [plan.variant.name], [s.prompt_set for s in plan.sets],
                                        list(plan.source.traits))
    summary["seconds"] = time.perf_counter() - t0
    return summary


def project(opts: ProjectOptions, loaded: LoadedModel | None = None) -> dict:
    """The stage: plan_fused + run_fused with --fused, else plan_projection + run_projection."""
    if opts.fused:
        return run_fused(plan_fused(opts, loaded), loaded)
    _check_fused_options(opts)
    return run_projection(plan_projection(opts))


def project_raw_activations_onto_traits(experiment: str, prompt_set: str | None = None,
                                        loaded: LoadedModel | None = None, **options) -> dict:
    """Project every pending prompt of the set(s) onto each trait's vectors and write the projection JSONs.

    Keywords are ProjectOptions' fields (prompt_set may also come second, as capture_raw_activations takes it);
    `loaded` reuses an already-loaded LoadedModel of the variant (fused).
    Returns a summary: experiment, model_variant, prompt_sets, traits, written, skipped, prompts, files,
    bytes (everything the run wrote), vectors (per set and trait), calibration (path and source, or None),
    seconds; with fused also means_written, responses_written, out_of_memory_retries.
    """
    return project(ProjectOptions(experiment, prompt_set=prompt_set, **options), loaded)


def format_summary(s: dict) -> str:
    sets = ", ".join(s["prompt_sets"])
    per_prompt = s["bytes"] / s["prompts"] if s["prompts"] else 0.0
    how = "fused forward, no raw file read or written" if s.get("fused") else "read from raw files"
    extra = "".join(f", {s[k]} {what}" for k, what in (("means_written", "means files"),
                                                         ("responses_written", "replayed response JSONs"),
                                                         ("out_of_memory_retries", "out-of-memory retries"))
                    if s.get(k))
    if s.get("index"):
        extra += f", {s['index']['prompts_indexed']} files indexed into {s['index']['path']}"
    return (f"projected {s['prompts']} prompts of {sets} onto {len(s['traits'])} traits: {s['written']} files "
            f"written{extra}, {s['skipped']} existing skipped, {s['bytes']:,} bytes written ({per_prompt:,.0f} per "
            f"prompt; activations {how}) in {s['seconds']:.1f} s "
            f"({paths.inference_dir(s['experiment'], s['model_variant']) / 'projections'}); "
            f"calibration: {s['calibration_note']}" + _score_lines(s))


def _score_lines(s: dict) -> str:
    """What the scores written in this run say, relative to each vector's baseline (--units)."""
    lines = score_lines(s.get("scores") or {}, s.get("units") or DEFAULT_UNITS)
    return "".join(f"\n  {line}" for line in lines)


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  # every discovered trait, each at its best layer (steering evidence, else held-out extraction accuracy)
  python inference/project_raw_activations_onto_traits.py --experiment demo --prompt-set harmful --skip-existing

  # both sides of a model diff with the same vectors (one steering variant for both)
  python inference/project_raw_activations_onto_traits.py --experiment demo --all-prompt-sets \\
      --model-variant instruct --steering-variant instruct --skip-existing

  # one layer for every trait; two traits only; subtract the class-midpoint baseline; summaries in raw units;
  # --overwrite replaces the set's earlier projections (another layer rule)
  python inference/project_raw_activations_onto_traits.py --experiment demo --prompt-set harmful \\
      --layer 10 --traits demo/refusal,demo/formality --centered --units raw --overwrite

  # fused: no capture step and no raw files; the model runs over the stored responses' token ids
  python inference/project_raw_activations_onto_traits.py --experiment demo --prompt-set harmful --model-variant lora \\
      --fused

  # fused model diff: instruct replays the LoRA's responses, and writes the means compare_variants.py reads
  python inference/project_raw_activations_onto_traits.py --experiment demo --prompt-set single_trait \\
      --fused --model-variant instruct --responses-from lora --save-means --skip-existing
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="project_raw_activations_onto_traits.py",
        description="Project captured activations (raw/residual/{set}/*.pt) onto trait vectors and write one "
                    "projection JSON per trait per prompt (per-token scalar projections <h, v/|v|>). With "
                    "--fused, score inside a prefill forward over responses/{set}/*.json instead: the same "
                    "JSONs, no raw files.",
        epilog=EPILOG)
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    sets = p.add_mutually_exclusive_group(required=True)
    sets.add_argument("--prompt-set", help="prompt set (may be nested, e.g. rm_syco/train_100)")
    sets.add_argument("--all-prompt-sets", action="store_true", help="every captured set, nested ones included")
    p.add_argument("--model-variant", help="whose raw/ to read and projections/ to write (default: defaults.application)")
    add_projection_flags(p)
    p.add_argument("--prompt-ids", metavar="A,B", help="only these prompt ids of each set (comma list; an id without "
                                                     "a raw file, or with --fused a response JSON, is an error)")
    add_write_flags(p, "projection JSONs (and --save-means files)")
    add_units_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    f = p.add_argument_group("fused scoring (no raw files: a prefill forward over the stored response token ids)")
    f.add_argument("--fused", action="store_true",
                   help="score inside the forward instead of reading raw/residual/ (same JSONs; runs the model)")
    f.add_argument("--responses-from", metavar="VARIANT",
                   help="replay this variant's responses (model diff on identical tokens), write under --model-variant")
    f.add_argument("--save-means", action="store_true",
                   help="also write raw/means/{set}/{id}.pt (per-prompt residual means of every layer, for "
                        "compare_variants.py); the forward then runs to the last layer")
    f.add_argument("--load-in-8bit", action="store_true", help="load the model in 8-bit (bitsandbytes)")
    f.add_argument("--load-in-4bit", action="store_true", help="load the model in 4-bit NF4 (bitsandbytes)")
    f.add_argument("--dtype", help="round activations to this storage dtype before scoring, as capture's --dtype "
                                   "stores them: float16, bfloat16, float32 (default: the model's dtype)")
    f.add_argument("--index", action="store_true",
                   help="also add the written scores to the score store analysis/scores/ (as analysis/scores.py does)")
    f.add_argument("--batch-size", type=int, help="at most N prompts per forward (default: automatic)")
    f.add_argument("--max-batch-tokens", type=int, help="at most N padded tokens per forward (default: automatic)")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda ns: project(ProjectOptions.from_args(ns)), format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
