"""Project captured activations onto trait vectors: one projection JSON per trait per prompt.

    project_raw_activations_onto_traits(experiment, prompt_set=None, ...) -> dict   the stage, importable
    find_prompt_sets(exp, variant) -> [set]        every (nested) folder of raw/residual/ holding .pt files
    load_calibration(exp, variant) -> Calibration | None   the variant's file, else the experiment-wide one
    compute_calibration(exp, variant, files) -> Calibration  from captured residuals; written to the variant path
    format_summary(summary) -> str                 the one-line summary main() prints
    main(argv=None) -> int                         the CLI: python inference/project_raw_activations_onto_traits.py --help
    ProjectError                                   bad input; the message names the file or flag

Reads  experiments/{exp}/inference/{variant}/raw/residual/{set}/{id}.pt  (memory-mapped; only the layers
       the chosen vectors need are touched)
Writes experiments/{exp}/inference/{variant}/projections/{category}/{trait}/{set}/{id}.json
       (the multi-vector format of DESIGN.md §4), atomically.

Vectors are chosen once per prompt set by utils.vectors.select_vectors (steering evidence of one
--steering-variant for every projected variant, else held-out extraction metrics, else an explicit
--layer). Every trait's vectors at a layer are stacked, so each (prompt, layer) costs one matmul.
Everything is checked (layers captured, component captured, hidden size) before the first file is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from core.errors import TraitError  # noqa: E402
from core.hooks import COMPONENTS  # noqa: E402
from core.projection import MassiveDimStats, project, token_norms  # noqa: E402
from utils import paths  # noqa: E402
from utils.cli import Parser as _Parser  # noqa: E402
from utils.config import ConfigError, load_config, resolve_variant  # noqa: E402
from utils.layers import LayerSpecError, parse_projection_layers  # noqa: E402
from utils.model import load_model_config  # noqa: E402
from utils.storage import StorageError, load_pt, read_json, write_json  # noqa: E402
from utils.vectors import (SelectedVector, check_trait_name, discover_traits,  # noqa: E402
                           parse_position, select_vectors)

SIDES = ("prompt", "response")
CALIBRATION_TOP_K = 5


class ProjectError(TraitError):
    """Bad input for the projection stage; the message names the file or flag."""


# ---------------------------------------------------------------------------------------------------
# Prompt sets and raw files

def find_prompt_sets(exp: str, variant: str) -> list[str]:
    """Every folder under raw/residual/ that directly holds .pt files, as a (possibly nested) set name."""
    root = paths.inference_dir(exp, variant) / "raw" / "residual"
    if not root.is_dir():
        return []
    found = {p.parent.relative_to(root).as_posix() for p in root.rglob("*.pt") if not p.name.startswith(".")}
    return sorted(found)


def _raw_files(exp: str, variant: str, prompt_set: str) -> list[Path]:
    folder = paths.raw_dir(exp, variant, prompt_set)
    files = sorted((p for p in folder.glob("*.pt") if not p.name.startswith(".")),
                   key=lambda p: paths.natural_key(p.stem)) if folder.is_dir() else []
    if not files:
        sets = ", ".join(find_prompt_sets(exp, variant)) or "none"
        raise ProjectError(
            f"--prompt-set {prompt_set!r}: no .pt files in {folder} (captured sets of variant {variant!r}: {sets}; "
            f"create them with: python inference/capture_raw_activations.py --experiment {exp} "
            f"--prompt-set {prompt_set} --model-variant {variant})"
        )
    return files


@dataclass
class RawInfo:
    """What one .pt holds: captured layers and components per layer, hidden size."""

    path: Path
    layers: list[int]
    components: dict[int, set[str]]
    hidden_size: int
    n_layers: int | None


def _raw_info(path: Path, data: dict) -> RawInfo:
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in SIDES):
        raise ProjectError(f"{path}: not a raw activation file (expected 'prompt' and 'response' dicts)")
    comps: dict[int, set[str]] = {}
    hidden = None
    for side in SIDES:
        acts = data[side].get("activations") or {}
        if not isinstance(acts, dict):
            raise ProjectError(f"{path}: {side}.activations must be a dict of layer -> component -> tensor")
        for layer, by_comp in acts.items():
            if not isinstance(layer, int) or not isinstance(by_comp, dict):
                raise ProjectError(f"{path}: {side}.activations must map integer layers to component dicts")
            comps.setdefault(layer, set()).update(by_comp)
            for t in by_comp.values():
                hidden = hidden or (t.shape[-1] if isinstance(t, torch.Tensor) and t.ndim == 2 else None)
    if not comps or hidden is None:
        raise ProjectError(f"{path}: holds no activations")
    meta = data.get("metadata") or {}
    n_layers = meta.get("n_layers") if isinstance(meta.get("n_layers"), int) else None
    return RawInfo(path, sorted(comps), comps, int(hidden), n_layers)


def _check_captured(info: RawInfo, layers: Sequence[int], component: str) -> None:
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
# Massive-dims calibration

@dataclass
class Calibration:
    path: Path
    source: str                                    # "variant" | "experiment" | "computed"
    top_dims_by_layer: dict[str, list[int]] = field(default_factory=dict)

    @property
    def dims(self) -> list[int]:
        return sorted({d for dims in self.top_dims_by_layer.values() for d in dims})


def _parse_calibration(path: Path, source: str) -> Calibration:
    try:
        data = read_json(path)
    except StorageError as e:
        raise ProjectError(str(e)) from None
    agg = data.get("aggregate", data) if isinstance(data, dict) else None
    top = agg.get("top_dims_by_layer") if isinstance(agg, dict) else None
    if not isinstance(top, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for v in top.values()):
        raise ProjectError(f"{path}: expected aggregate.top_dims_by_layer, an object of layer -> [dim, ...]")
    return Calibration(path, source, {str(k): list(v) for k, v in top.items()})


def load_calibration(exp: str, variant: str) -> Calibration | None:
    """The variant's calibration.json, else the experiment-wide one (where the original looked), else None."""
    for path, source in ((paths.calibration_file(exp, variant), "variant"), (paths.calibration_file(exp), "experiment")):
        if path.exists():
            return _parse_calibration(path, source)
    return None


def compute_calibration(exp: str, variant: str, files: Sequence[Path], prompt_sets: Sequence[str],
                        top_k: int = CALIBRATION_TOP_K, progress: bool = False) -> Calibration | None:
    """Per layer, the top-k dims by |mean| of the residual over response tokens (prompt tokens when a
    response has none), plus dim magnitudes and mean norms; written to the variant's calibration path.
    None when no file holds residual activations.
    """
    from tqdm.auto import tqdm

    stats = MassiveDimStats(top_k)
    n_prompts = 0
    for path in tqdm(files, desc="calibration", unit="prompt", file=sys.stderr, disable=not progress):
        data = load_pt(path)
        used = False
        for side in ("response", "prompt"):
            acts = data[side].get("activations") or {}
            by_layer = {l: c["residual"] for l, c in acts.items() if "residual" in c and c["residual"].shape[0] > 0}
            if by_layer:
                for layer, t in by_layer.items():
                    stats.add(layer, t)
                used = True
                break
        n_prompts += used
    if not stats.layers:
        return None
    agg = stats.aggregate()
    out = {
        "experiment": exp, "model_variant": variant, "prompt_set": "calibration", "is_calibration": True,
        "computed_by": "project_raw_activations_onto_traits.py (no calibration file was found)",
        "computed_from": {"prompt_sets": list(prompt_sets), "component": "residual",
                          "tokens": "response (prompt when a response is empty)"},
        "date": _dt.datetime.now().isoformat(),
        "aggregate": {"n_prompts": n_prompts, "top_k": top_k, **agg},
    }
    path = paths.calibration_file(exp, variant)
    write_json(path, out, indent=1)
    return Calibration(path, "computed", agg["top_dims_by_layer"])


def _massive_dim_data(cal: Calibration, sel: SelectedVector, side_acts: dict[str, torch.Tensor | None]) -> dict:
    """The viewer's contract: dims, top_dims_by_layer, vec_norm, vec_components, activation_values per side."""
    dims = [d for d in cal.dims if d < sel.vector.shape[0]]
    return {
        "layer": sel.layer, "method": sel.method, "component": sel.component,
        "dims": dims,
        "top_dims_by_layer": cal.top_dims_by_layer,
        "vec_norm": float(sel.vector.norm()),
        "vec_components": {str(d): float(sel.vector[d]) for d in dims},
        "activation_values": {
            side: ({str(d): t[:, d].float().tolist() for d in dims} if t is not None else {})
            for side, t in side_acts.items()
        },
    }


# ---------------------------------------------------------------------------------------------------
# The stage

@dataclass
class _SetPlan:
    prompt_set: str
    files: list[Path]
    todo: list[tuple[Path, list[str]]]             # (.pt, traits still to write)
    vectors: dict[str, list[SelectedVector]] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    hidden_size: int = 0


def _split_traits(traits: str | Sequence[str] | None) -> list[str] | None:
    if traits is None:
        return None
    items = [t.strip() for t in traits.split(",")] if isinstance(traits, str) else [str(t).strip() for t in traits]
    if not items or any(not t for t in items):
        raise ProjectError(f"--traits {traits!r}: empty item (expected category/name,category/name)")
    return list(dict.fromkeys(check_trait_name(t) for t in items))


def project_raw_activations_onto_traits(
        experiment: str, prompt_set: str | None = None, all_prompt_sets: bool = False,
        model_variant: str | None = None, traits: str | Sequence[str] | None = None,
        layers: str | int | None = "best", method: str | None = None, component: str = "residual",
        position: str | None = None, extraction_variant: str | None = None, vectors_experiment: str | None = None,
        steering_variant: str | None = None, multi_vector: int | None = None, centered: bool = False,
        skip_existing: bool = False, no_calibration: bool = False, progress: bool = True) -> dict:
    """Project every captured prompt of the set(s) onto each trait's vectors and write the projection JSONs.

    `layers`: projection grammar (best, best+K, best-K, N; an int is one layer); ignored with `multi_vector`.
    Returns a summary: experiment, model_variant, prompt_sets, traits, written, skipped, prompts, files,
    vectors (per set and trait), calibration (path and source, or None), seconds.
    """
    t0 = time.perf_counter()
    # --- arguments -------------------------------------------------------------------------------
    if bool(prompt_set) == bool(all_prompt_sets):
        raise ProjectError("give exactly one of --prompt-set or --all-prompt-sets")
    if component not in COMPONENTS:
        raise ProjectError(f"--component {component!r}: choose from {', '.join(COMPONENTS)}")
    if position is not None:
        parse_position(position)
    if multi_vector is not None and multi_vector < 1:
        raise ProjectError(f"--multi-vector must be >= 1, got {multi_vector}")
    layer_spec = "best" if layers is None else str(layers)
    variant_cfg = resolve_variant(experiment, model_variant, "application")
    variant = variant_cfg.name
    n_layers = None
    if multi_vector is None:
        if re.search(r"(^|,)\s*-\d", layer_spec):  # a layer counted from the end needs the model's depth
            n_layers = int(load_model_config(variant_cfg.model_path(experiment)).num_hidden_layers)
        parse_projection_layers(layer_spec, n_layers)  # syntax errors before anything is read
    vec_exp = vectors_experiment or experiment
    load_config(vec_exp)
    ext_variant = extraction_variant or resolve_variant(vec_exp, None, "extraction").name
    if steering_variant is not None:
        known = load_config(vec_exp)["model_variants"]
        if steering_variant not in known:
            raise ConfigError(f"--steering-variant {steering_variant!r}: not a model variant of experiment "
                              f"{vec_exp!r} (variants: {', '.join(known)})")
        steer_variant = steering_variant
    else:
        steer_variant = resolve_variant(vec_exp, None, "application").name
    trait_list = _split_traits(traits)
    if trait_list is None:
        trait_list = discover_traits(vec_exp, ext_variant)
        if not trait_list:
            raise ProjectError(f"no trait vectors for extraction variant {ext_variant!r} in "
                               f"{paths.extraction_dir(vec_exp)}; create some with: python extraction/extract_vectors.py "
                               f"--experiment {vec_exp}")
    sets = find_prompt_sets(experiment, variant) if all_prompt_sets else [prompt_set.strip("/")]
    if not sets:
        raise ProjectError(f"--all-prompt-sets: no .pt files under {paths.inference_dir(experiment, variant) / 'raw' / 'residual'}")

    # --- plan: what is left to write (no .pt opened for this) --------------------------------------
    plans: list[_SetPlan] = []
    skipped = 0
    for s in sets:
        files = _raw_files(experiment, variant, s)
        todo = []
        for f in files:
            pending = [t for t in trait_list
                       if not (skip_existing and paths.projection_file(experiment, variant, t, s, f.stem).exists())]
            skipped += len(trait_list) - len(pending)
            if pending:
                todo.append((f, pending))
        plans.append(_SetPlan(s, files, todo))

    # --- vectors, checked against the first pending file of each set before anything is written ---
    for plan in plans:
        if not plan.todo:
            continue
        first = plan.todo[0][0]
        info = _raw_info(first, load_pt(first))
        captured = set().union(*info.components.values())
        if component not in captured:  # before vector selection: the clearer message
            raise ProjectError(f"{first}: component {component!r} was not captured (captured: "
                               f"{', '.join(sorted(captured))}); capture it with --components {component}")
        pending_traits = list(dict.fromkeys(t for _, ts in plan.todo for t in ts))
        for trait in pending_traits:
            try:
                plan.vectors[trait] = select_vectors(
                    vec_exp, trait, ext_variant, steer_variant, layers=layer_spec, available_layers=info.layers,
                    component=component, position=position, method=method, multi_vector=multi_vector,
                    hidden_size=info.hidden_size, n_layers=info.n_layers or n_layers)
            except LayerSpecError as e:
                raise LayerSpecError(f"trait {trait!r}: {e} (captured in {first})") from None
        plan.layers = sorted({v.layer for vs in plan.vectors.values() for v in vs})
        plan.hidden_size = info.hidden_size
        _check_captured(info, plan.layers, component)

    # --- calibration -------------------------------------------------------------------------------
    calibration: Calibration | None = None
    calibration_note = "off (--no-calibration)" if no_calibration else "none"
    if not no_calibration and any(p.todo for p in plans):
        calibration = load_calibration(experiment, variant)
        if calibration is None:
            files = [f for p in plans for f in p.files]
            calibration = compute_calibration(experiment, variant, files, [p.prompt_set for p in plans],
                                              progress=progress)
            if calibration is None:
                print("calibration: none found and none computable (no residual activations captured); "
                      "massive_dim_data omitted", file=sys.stderr)
            else:
                print(f"calibration: none found at {paths.calibration_file(experiment, variant)} or "
                      f"{paths.calibration_file(experiment)}; computed from {len(files)} captured prompts and "
                      f"written to {calibration.path}", file=sys.stderr)
        if calibration is not None:
            calibration_note = f"{calibration.source} ({calibration.path})"

    # --- project ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    summary: dict[str, Any] = {
        "experiment": experiment, "model_variant": variant, "vectors_experiment": vec_exp,
        "extraction_variant": ext_variant, "steering_variant": steer_variant, "prompt_sets": sets,
        "traits": trait_list, "written": 0, "skipped": skipped, "prompts": 0, "files": [],
        "vectors": {p.prompt_set: {t: [v.describe(paths.experiment_dir(vec_exp)) for v in vs]
                                   for t, vs in p.vectors.items()} for p in plans},
        "calibration": None if calibration is None else {"path": str(calibration.path), "source": calibration.source},
        "calibration_note": calibration_note, "seconds": 0.0,
    }
    total = sum(len(p.todo) for p in plans)
    bar = tqdm(total=total, unit="prompt", desc="project", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for plan in plans:
            for path, pending in plan.todo:
                written = _project_file(plan, path, pending, experiment, variant, vec_exp, ext_variant, steer_variant,
                                        component, position, layer_spec, multi_vector, centered, calibration)
                summary["files"].extend(str(p) for p in written)
                summary["written"] += len(written)
                summary["prompts"] += 1
                bar.update(1)
    finally:
        bar.close()
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _project_file(plan: _SetPlan, path: Path, pending: list[str], experiment: str, variant: str, vec_exp: str,
                  ext_variant: str, steer_variant: str, component: str, position: str | None, layer_spec: str,
                  multi_vector: int | None, centered: bool, calibration: Calibration | None) -> list[Path]:
    data = load_pt(path)
    info = _raw_info(path, data)
    needed = sorted({v.layer for t in pending for v in plan.vectors[t]})
    _check_captured(info, needed, component)
    if info.hidden_size != plan.hidden_size:
        raise ProjectError(f"{path}: hidden size {info.hidden_size} differs from the set's first file "
                           f"({plan.hidden_size}); were these captured from different models?")
    n_tokens = {s: len(data[s].get("token_ids") or data[s].get("tokens") or []) for s in SIDES}

    # Per layer: the projected component and the residual of both sides, scored in one matmul.
    scores: dict[tuple[int, int], dict[str, list[float]]] = {}     # (layer, id(vector)) -> side -> scores
    norms: dict[int, dict[str, list[float]]] = {}
    side_acts: dict[int, dict[str, torch.Tensor | None]] = {}
    norms_component = "residual"
    for layer in needed:
        acts = {s: (data[s].get("activations") or {}).get(layer, {}).get(component) for s in SIDES}
        side_acts[layer] = acts
        present = [s for s in SIDES if acts[s] is not None]
        stacked = [v for t in pending for v in plan.vectors[t] if v.layer == layer]
        matrix = torch.stack([v.vector for v in stacked])
        all_scores = project(torch.cat([acts[s] for s in present]), matrix)            # [n_tokens, K]
        split = dict(zip(present, torch.split(all_scores, [acts[s].shape[0] for s in present])))
        for k, v in enumerate(stacked):
            scores[(layer, id(v))] = {s: (split[s][:, k].tolist() if s in split else []) for s in SIDES}
        resid = {s: (data[s].get("activations") or {}).get(layer, {}).get("residual") for s in SIDES}
        if all(resid[s] is None for s in present):      # residual not captured: norms of the component itself
            resid, norms_component = acts, component
        norms[layer] = {s: (token_norms(resid[s]).tolist() if resid[s] is not None else []) for s in SIDES}

    written = []
    date = _dt.datetime.now().isoformat()
    for trait in pending:
        vectors = plan.vectors[trait]
        entries = []
        for v in vectors:
            sc = scores[(v.layer, id(v))]
            shift = v.baseline if centered else 0.0
            entries.append({
                "method": v.method, "layer": v.layer, "position": v.position, "component": v.component,
                "selection_source": v.selection_source, "baseline": v.baseline,
                "prompt": [x - shift for x in sc["prompt"]], "response": [x - shift for x in sc["response"]],
                "token_norms": norms[v.layer],
            })
        trait_layers = sorted({v.layer for v in vectors})
        out: dict[str, Any] = {
            "metadata": {
                "prompt_id": path.stem, "prompt_set": plan.prompt_set,
                "n_prompt_tokens": n_tokens["prompt"], "n_response_tokens": n_tokens["response"],
                "multi_vector": True, "n_vectors": len(entries), "component": component,
                "position": vectors[0].position, "centered": centered, "projection_date": date,
                "trait": trait, "experiment": experiment, "model_variant": variant,
                "model": (data.get("metadata") or {}).get("model"),
                "vectors_experiment": vec_exp, "extraction_variant": ext_variant, "steering_variant": steer_variant,
                "layers_spec": None if multi_vector else layer_spec, "multi_vector_n": multi_vector,
                "position_arg": position, "token_norms_component": norms_component,
                "vectors": [v.describe(paths.experiment_dir(vec_exp)) for v in vectors],
                "calibration": None if calibration is None else str(calibration.path),
            },
            "projections": entries,
            "activation_norms": {
                "layers": trait_layers, "component": norms_component, "statistic": "mean token norm",
                **{s: ([_mean(norms[l][s]) for l in trait_layers] if any(side_acts[l][s] is not None
                                                                         for l in trait_layers) else [])
                   for s in SIDES},
            },
        }
        if calibration is not None:
            first = vectors[0]
            out["massive_dim_data"] = _massive_dim_data(calibration, first, side_acts[first.layer])
        target = paths.projection_file(experiment, variant, trait, plan.prompt_set, path.stem)
        write_json(target, out)
        written.append(target)
    return written


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def format_summary(s: dict) -> str:
    sets = ", ".join(s["prompt_sets"])
    return (f"projected {s['prompts']} prompts of {sets} onto {len(s['traits'])} traits: {s['written']} files written, "
            f"{s['skipped']} existing skipped, in {s['seconds']:.1f} s "
            f"({paths.inference_dir(s['experiment'], s['model_variant']) / 'projections'}); "
            f"calibration: {s['calibration_note']}")


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  # every discovered trait, each at its best layer (steering evidence, else held-out extraction accuracy)
  python inference/project_raw_activations_onto_traits.py --experiment my_exp --prompt-set single_trait

  # one layer for every trait; two traits only; subtract the class-midpoint baseline
  python inference/project_raw_activations_onto_traits.py --experiment my_exp --prompt-set single_trait \\
      --layer 16 --traits behavioral/refusal,cognitive/retrieval --centered

  # both sides of a model diff with the same vectors (one steering variant for both)
  python inference/project_raw_activations_onto_traits.py --experiment rm_syco --all-prompt-sets \\
      --model-variant rm_lora --steering-variant instruct --layers best,best+2
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="project_raw_activations_onto_traits.py",
        description="Project captured activations (raw/residual/{set}/*.pt) onto trait vectors and write one "
                    "projection JSON per trait per prompt (per-token scalar projections <h, v/|v|>).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    sets = p.add_mutually_exclusive_group(required=True)
    sets.add_argument("--prompt-set", help="prompt set (may be nested, e.g. rm_syco/train_100)")
    sets.add_argument("--all-prompt-sets", action="store_true", help="every captured set, nested ones included")
    p.add_argument("--model-variant", help="whose raw/ to read and projections/ to write (default: defaults.application)")
    p.add_argument("--traits", help="comma list of category/name (default: every trait with vectors)")
    lay = p.add_mutually_exclusive_group()
    lay.add_argument("--layer", type=int, help="one layer for every trait (same as --layers N)")
    lay.add_argument("--layers", help="projection grammar: best, best+K, best-K, N, comma-separated (default: best)")
    p.add_argument("--method", help="vector method (default: the best's, else probe, mean_diff, gradient)")
    p.add_argument("--component", default="residual", choices=COMPONENTS,
                   help="which captured activation to project (default: residual)")
    p.add_argument("--position", help="vector position, e.g. response[:5] (default: the best's, else response[:5], "
                                      "else the first sorted)")
    p.add_argument("--extraction-variant", help="whose vectors (default: defaults.extraction of the vectors experiment)")
    p.add_argument("--vectors-experiment", help="take vectors from another experiment (default: --experiment)")
    p.add_argument("--steering-variant", help="whose steering results pick the best vector, for every projected "
                                              "variant (default: defaults.application of the vectors experiment)")
    p.add_argument("--multi-vector", type=int, metavar="N", help="the top N ranked vectors of each trait")
    p.add_argument("--centered", action="store_true", help="subtract each vector's baseline (class midpoint)")
    p.add_argument("--skip-existing", action="store_true", help="skip prompts whose projection JSON exists")
    p.add_argument("--no-calibration", action="store_true",
                   help="neither read nor compute massive-dims calibration (no massive_dim_data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.multi_vector is not None and (args.layer is not None or args.layers is not None):
        print("error: --multi-vector picks its own layers; drop --layer / --layers", file=sys.stderr)
        return 2
    layers = args.layer if args.layer is not None else (args.layers or "best")
    try:
        summary = project_raw_activations_onto_traits(
            args.experiment, prompt_set=args.prompt_set, all_prompt_sets=args.all_prompt_sets,
            model_variant=args.model_variant, traits=args.traits, layers=layers, method=args.method,
            component=args.component, position=args.position, extraction_variant=args.extraction_variant,
            vectors_experiment=args.vectors_experiment, steering_variant=args.steering_variant,
            multi_vector=args.multi_vector, centered=args.centered, skip_existing=args.skip_existing,
            no_calibration=args.no_calibration, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
