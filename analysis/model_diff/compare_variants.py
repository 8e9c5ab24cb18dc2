"""Compare two model variants on identical tokens: mean activation difference and trait effect sizes per layer.

    compare_variants(experiment, variant_a, variant_b, prompt_set, ...) -> dict   the stage, importable
    scan_pairs(exp, variant_a, variant_b, prompt_set, component) -> PairScan       ids, tokens and layers checked
    prompt_means(scan, progress) -> (means_a, means_b)       fp32 [prompts, layers, hidden], one file at a time
    trait_statistics(means_a, means_b, diff, layers, vectors) -> dict              the per-layer numbers of one trait
    main(argv=None) -> int                                   the CLI: python analysis/model_diff/compare_variants.py --help
    CompareError                                             bad input; the message names the file, prompt or flag

Reads  experiments/{exp}/inference/{A|B}/raw/residual/{set}/{id}.pt  (response activations only)
       trait vectors of --vector-experiment (extraction/...), its steering results for --use-best-vector
Writes experiments/{exp}/model_diff/{A}_vs_{B}/{set}/diff_vectors.pt   {diff: fp32 [n_layers, hidden] (row i is
                                                                       layers[i]), layers, component, n_prompts, ...}
                                                 .../prompt_means.pt   per-prompt means of both variants (for
                                                                       --use-existing-diff: no raw files needed)
                                                 .../results.json      per-trait keys of the original + provenance

Definitions (every delta is B - A; A is the baseline). For prompt i and layer L, m_X[i, L] is the fp32 mean of
variant X's activations over the response tokens. D[L] = mean_i (m_B[i, L] - m_A[i, L]). With v the unit
trait vector at L: p_X[i] = <m_X[i, L], v>; cosine = cos(D[L], v); effect size = Cohen's d of p_B over p_A
(pooled sample std); paired effect size = d_z = mean(p_B - p_A) / std(p_B - p_A); std_a, std_b = std of p_A,
p_B. Every std is the sample std (ddof = 1); an undefined value (N = 1, zero variance) is null with a reason.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from core.errors import TraitError  # noqa: E402
from core import stats  # noqa: E402
from core.hooks import COMPONENTS  # noqa: E402
from utils import paths  # noqa: E402
from utils.cli import Parser as _Parser  # noqa: E402
from utils.config import ConfigError, load_config, resolve_variant  # noqa: E402
from utils.storage import StorageError, load_pt, read_json, write_json, write_pt  # noqa: E402
from utils.vectors import (VectorError, best_vector, check_trait_name, discover_traits, file_sha256,  # noqa: E402
                           list_vectors, load_vector, parse_position, sanitize_position)

DIFF_FILE = "diff_vectors.pt"
MEANS_FILE = "prompt_means.pt"
RESULTS_FILE = "results.json"
STATISTICS = {
    "delta": "B - A: positive means variant_b projects higher on the trait",
    "ddof": stats.DDOF,
    "per_prompt_mean": "fp32 mean over all response tokens of the activation component",
    "projection": "<mean activation, v/|v|> per prompt",
    "effect_size": "Cohen's d = (mean p_B - mean p_A) / pooled sample std",
    "paired_effect_size": "d_z = mean(p_B - p_A) / sample std(p_B - p_A)",
    "std_a/std_b": "sample std of the per-prompt projections",
    "peak": "layer of the largest |effect_size|; peak_paired_effect_size is d_z at that layer",
}


class CompareError(TraitError):
    """Bad input for compare_variants; the message names the file, prompt or flag."""


# ---------------------------------------------------------------------------------------------------------
# Pairing the raw files

@dataclass
class PairScan:
    """What both variants captured for the prompts they share, checked before any mean is computed."""
    files_a: dict[str, Path]
    files_b: dict[str, Path]
    ids: list[str]                       # paired prompts with response tokens, natural order
    layers: list[int]                    # layers both variants captured with the component, in every file
    component: str
    hidden: int
    unpaired: dict[str, list[str]] = field(default_factory=dict)     # variant -> ids only it has
    excluded: dict[str, str] = field(default_factory=dict)           # id -> reason (no response tokens)
    token_digest: str = ""


def _raw_files(exp: str, variant: str, prompt_set: str) -> dict[str, Path]:
    folder = paths.raw_dir(exp, variant, prompt_set)
    files = {p.stem: p for p in folder.glob("*.pt") if not p.name.startswith(".")} if folder.is_dir() else {}
    if not files:
        raise CompareError(f"no raw activations of variant {variant!r} for prompt set {prompt_set!r}: {folder} has no "
                           f".pt files (capture them with: python inference/capture_raw_activations.py --experiment "
                           f"{exp} --prompt-set {prompt_set} --model-variant {variant})")
    return files


def _load(path: Path) -> dict:
    try:
        data = load_pt(path)
    except StorageError as e:
        raise CompareError(str(e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("response"), dict):
        raise CompareError(f"{path}: not a raw activation file (no 'response' dict)")
    return data


def _response_layers(path: Path, data: dict, component: str) -> dict[int, int]:
    """layer -> hidden size of the captured response activations of `component`."""
    acts = data["response"].get("activations") or {}
    out = {}
    for layer, comps in acts.items():
        t = comps.get(component) if isinstance(comps, dict) else None
        if isinstance(t, torch.Tensor) and t.ndim == 2:
            out[int(layer)] = int(t.shape[1])
    return out


def scan_pairs(exp: str, variant_a: str, variant_b: str, prompt_set: str, component: str) -> PairScan:
    """Pair prompts by id and check, for all of them, identical token ids and the captured layers.

    Files are memory-mapped, so this reads only the small token lists. Errors list every bad prompt.
    """
    files_a, files_b = _raw_files(exp, variant_a, prompt_set), _raw_files(exp, variant_b, prompt_set)
    ids = sorted(set(files_a) & set(files_b), key=paths.natural_key)
    if not ids:
        raise CompareError(f"variants {variant_a!r} and {variant_b!r} share no prompt id in prompt set {prompt_set!r} "
                           f"({paths.raw_dir(exp, variant_a, prompt_set)}: {len(files_a)} files, "
                           f"{paths.raw_dir(exp, variant_b, prompt_set)}: {len(files_b)} files)")
    unpaired = {v: sorted(set(f) - set(ids), key=paths.natural_key) for v, f in ((variant_a, files_a), (variant_b, files_b))}
    mismatched, excluded, layer_sets = [], {}, []
    digest = hashlib.sha256()
    hidden: int | None = None
    for pid in ids:
        da, db = _load(files_a[pid]), _load(files_b[pid])
        ra, rb = da["response"].get("token_ids"), db["response"].get("token_ids")
        pa, pb = (da.get("prompt") or {}).get("token_ids"), (db.get("prompt") or {}).get("token_ids")
        if ra is None or rb is None:
            raise CompareError(f"{files_a[pid] if ra is None else files_b[pid]}: no response.token_ids")
        if list(ra) != list(rb) or (pa is not None and pb is not None and list(pa) != list(pb)):
            mismatched.append(pid)
            continue
        if not ra:
            excluded[pid] = "no response tokens: the per-prompt mean is undefined"
            continue
        digest.update(f"{pid}:{list(pa or [])}:{list(ra)};".encode())
        for path, data in ((files_a[pid], da), (files_b[pid], db)):
            have = _response_layers(path, data, component)
            if not have:
                comps = sorted({c for v in (data["response"].get("activations") or {}).values() for c in v})
                raise CompareError(f"{path}: no response activations of component {component!r} (captured: "
                                   f"{', '.join(comps) or 'none'}); capture with --components {component}")
            for h in have.values():
                if hidden is None:
                    hidden = h
                elif h != hidden:
                    raise CompareError(f"{path}: hidden size {h} differs from {hidden} in other files (another model?)")
            layer_sets.append((path, set(have)))
    if mismatched:
        shown = ", ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else "")
        raise CompareError(
            f"{len(mismatched)} prompt(s) of {prompt_set!r} have different token ids in {variant_a!r} and "
            f"{variant_b!r}: {shown}. Compare variants on identical tokens: capture {variant_a} on {variant_b}'s "
            f"responses with: python inference/capture_raw_activations.py --experiment {exp} --prompt-set "
            f"{prompt_set} --model-variant {variant_a} --responses-from {variant_b}")
    if not layer_sets:
        raise CompareError(f"every paired prompt of {prompt_set!r} has an empty response: nothing to compare")
    common = set.intersection(*(s for _, s in layer_sets))
    union = set.union(*(s for _, s in layer_sets))
    if common != union:  # a resumed capture with other --layers: say which file lacks what, never average unequal sets
        path, have = next((p, s) for p, s in layer_sets if s != union)
        raise CompareError(f"{path}: captured layers {_fmt(have)}, but other files of the pair have "
                           f"{_fmt(union)}; recapture so that every prompt has the same layers")
    return PairScan(files_a, files_b, [p for p in ids if p not in excluded], sorted(common), component, int(hidden),
                    {k: v for k, v in unpaired.items() if v}, excluded, digest.hexdigest())


def _fmt(layers) -> str:
    return ", ".join(str(x) for x in sorted(set(layers))) or "none"


def prompt_means(scan: PairScan, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [prompts, layers, hidden] means over response tokens, for A and B; one pair of files in memory at a time.

    Activations are cast to fp32 before averaging (a bf16 mean can be as coarse as a small LoRA's shift).
    """
    from tqdm.auto import tqdm

    n, k = len(scan.ids), len(scan.layers)
    means_a = torch.empty(n, k, scan.hidden, dtype=torch.float32)
    means_b = torch.empty(n, k, scan.hidden, dtype=torch.float32)
    for i, pid in enumerate(tqdm(scan.ids, desc="prompt means", unit="prompt", file=sys.stderr, disable=not progress)):
        for files, out in ((scan.files_a, means_a), (scan.files_b, means_b)):
            acts = _load(files[pid])["response"]["activations"]
            for j, layer in enumerate(scan.layers):
                out[i, j] = acts[layer][scan.component].to(torch.float32).mean(dim=0)
    return means_a, means_b


# ---------------------------------------------------------------------------------------------------------
# Statistics of one trait

def trait_statistics(means_a: torch.Tensor | None, means_b: torch.Tensor | None, diff: torch.Tensor,
                     layers: Sequence[int], vectors: dict[int, torch.Tensor]) -> dict:
    """The per-layer numbers for the layers in `vectors` (each a unit vector; rows of means/diff follow `layers`).

    Without per-prompt means (an old diff file), only cosines are computed and the rest is null with a reason.
    """
    sweep = sorted(vectors)
    row = {layer: i for i, layer in enumerate(layers)}
    out: dict[str, Any] = {k: [] for k in (
        "per_layer_cosine_sim", "per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_std_a",
        "per_layer_std_b", "per_layer_mean_projection_diff", "per_layer_projections_a", "per_layer_projections_b")}
    reasons: dict[str, dict[str, str]] = {}

    def put(key: str, layer: int, s: stats.Stat) -> None:
        out[key].append(s.value)
        if s.value is None:
            reasons.setdefault(key, {})[str(layer)] = s.reason

    for layer in sweep:
        v = vectors[layer].to(torch.float64)
        put("per_layer_cosine_sim", layer, stats.cosine(diff[row[layer]], v))
        if means_a is None:
            for key in ("per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_std_a", "per_layer_std_b",
                        "per_layer_mean_projection_diff"):
                put(key, layer, stats.Stat.undefined(f"no per-prompt means in {MEANS_FILE}: rerun without "
                                                     f"--use-existing-diff"))
            continue
        pa = means_a[:, row[layer]].to(torch.float64) @ v
        pb = means_b[:, row[layer]].to(torch.float64) @ v
        put("per_layer_effect_size", layer, stats.cohens_d(pb, pa))
        put("per_layer_paired_effect_size", layer, stats.paired_d(pb, pa))
        put("per_layer_std_a", layer, stats.std(pa))
        put("per_layer_std_b", layer, stats.std(pb))
        put("per_layer_mean_projection_diff", layer, stats.mean(pb - pa))
        out["per_layer_projections_a"].append(pa.tolist())
        out["per_layer_projections_b"].append(pb.tolist())
    if means_a is None:
        del out["per_layer_projections_a"], out["per_layer_projections_b"]
    peak = stats.peak_index(out["per_layer_effect_size"])
    result = {
        "layers": sweep,
        "per_layer_cosine_sim": out["per_layer_cosine_sim"],
        "per_layer_effect_size": out["per_layer_effect_size"],
        "per_layer_paired_effect_size": out["per_layer_paired_effect_size"],
        "peak_layer": None if peak is None else sweep[peak],
        "peak_effect_size": None if peak is None else out["per_layer_effect_size"][peak],
        "peak_paired_effect_size": None if peak is None else out["per_layer_paired_effect_size"][peak],
        "per_layer_std_a": out["per_layer_std_a"],
        "per_layer_std_b": out["per_layer_std_b"],
        "per_layer_mean_projection_diff": out["per_layer_mean_projection_diff"],
    }
    if peak is None:
        reasons["peak_layer"] = {"all": "no layer has a defined effect size"}
    if "per_layer_projections_a" in out:
        result["per_layer_projections_a"] = out["per_layer_projections_a"]
        result["per_layer_projections_b"] = out["per_layer_projections_b"]
    if reasons:
        result["null_reasons"] = reasons
    return result


# ---------------------------------------------------------------------------------------------------------
# Vector choice per trait

@dataclass
class TraitSpec:
    trait: str
    method: str
    position: str
    component: str
    available: list[int]                  # layers with a vector file
    selection: dict                       # how the spec was chosen


def _trait_spec(vec_exp: str, trait: str, ext_variant: str, steer_variant: str, use_best: bool, method: str | None,
                position: str | None, component: str) -> TraitSpec | str:
    """The vector spec of a trait, or the reason it has none (a str)."""
    try:
        if use_best:
            # Restricted to the activation component: a vector is only meaningful on the stream it came from.
            best = best_vector(vec_exp, trait, ext_variant, steer_variant, component=component)
            method, position = best.method, best.position
            selection = {"mode": "best", "source": best.selection_source, "best_layer": best.layer,
                         "score": best.score, "steering_variant": steer_variant}
        else:
            selection = {"mode": "explicit"}
        refs = list_vectors(vec_exp, trait, ext_variant, component=component, position=position, method=method)
    except VectorError as e:
        return str(e)
    if not refs:
        return (f"no vector files for method {method}, position {position}, component {component} under "
                f"{paths.vectors_dir(vec_exp, trait, ext_variant)}")
    return TraitSpec(trait, method, position, component, sorted({r.layer for r in refs}), selection)


# ---------------------------------------------------------------------------------------------------------
# The stage

def _fingerprint(diff: torch.Tensor, means_a: torch.Tensor | None, means_b: torch.Tensor | None, meta: dict) -> str:
    h = hashlib.sha256(repr(sorted(meta.items())).encode())
    for t in (diff, means_a, means_b):
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_existing_diff(out_dir: Path, variant_a: str, variant_b: str, component: str, results_path: Path,
                        warn) -> tuple[torch.Tensor, list[int], int | None, list[str] | None, str, torch.Tensor | None,
                                       torch.Tensor | None]:
    path = out_dir / DIFF_FILE
    if not path.exists():
        raise CompareError(f"--use-existing-diff: {path} not found (run once without --use-existing-diff)")
    try:
        obj = load_pt(path, mmap=False)
    except StorageError as e:
        raise CompareError(str(e)) from None
    old = read_json(results_path) if results_path.exists() else {}
    if isinstance(obj, torch.Tensor):  # the original's bare [max layer + 1, hidden] tensor, zero rows not captured
        layers = [i for i in range(obj.shape[0]) if bool(obj[i].abs().sum() > 0)]
        warn(f"{path}: a bare tensor from the original tool: layers {_fmt(layers)} taken from its non-zero rows, "
             f"component assumed {component!r}")
        diff = obj[layers].to(torch.float32)
        return diff, layers, old.get("n_prompts"), None, "", None, None
    if not isinstance(obj, dict) or not isinstance(obj.get("diff"), torch.Tensor):
        raise CompareError(f"{path}: expected a dict with a 'diff' tensor")
    for key, want in (("variant_a", variant_a), ("variant_b", variant_b), ("component", component)):
        if obj.get(key) != want:
            raise CompareError(f"--use-existing-diff: {path} was made with {key} {obj.get(key)!r}, not {want!r}")
    layers = [int(x) for x in obj["layers"]]
    means_a = means_b = None
    mpath = out_dir / MEANS_FILE
    if mpath.exists():
        try:
            m = load_pt(mpath, mmap=False)
        except StorageError as e:
            raise CompareError(str(e)) from None
        if m.get("fingerprint") == obj.get("fingerprint"):
            means_a, means_b = m["means_a"], m["means_b"]
        else:
            warn(f"{mpath} does not belong to {path} (fingerprints differ): effect sizes will be null")
    return (obj["diff"].to(torch.float32), layers, obj.get("n_prompts"), obj.get("prompt_ids"),
            obj.get("fingerprint", ""), means_a, means_b)


def compare_variants(experiment: str, variant_a: str, variant_b: str, prompt_set: str,
                     traits: str | Sequence[str] | None = None, use_best_vector: bool = False,
                     method: str | None = None, position: str | None = None, component: str = "residual",
                     vector_experiment: str | None = None, extraction_variant: str | None = None,
                     steering_variant: str | None = None, use_existing_diff: bool = False,
                     progress: bool = True) -> dict:
    """Write diff_vectors.pt, prompt_means.pt and results.json (merged trait by trait); returns a summary.

    Summary keys: out_dir, n_prompts, layers, traits ({trait: peak numbers}), skipped ({trait: reason}),
    failed ({trait: reason}), warnings, seconds.
    """
    t0 = time.perf_counter()
    # --- arguments (nothing read yet) -----------------------------------------------------------------
    if use_best_vector and (method or position):
        raise CompareError("give either --use-best-vector or --method and --position, not both")
    if not use_best_vector and not (method and position):
        if method or position:
            raise CompareError(f"--{'position' if method else 'method'} is missing: explicit vectors need both "
                               f"--method and --position (or use --use-best-vector)")
        raise CompareError("choose the vectors: --use-best-vector, or --method M --position P")
    if component not in COMPONENTS:
        raise CompareError(f"--component {component!r}: choose from {', '.join(COMPONENTS)}")
    if position is not None:
        try:
            parse_position(position)
        except VectorError as e:
            raise CompareError(str(e)) from None
    if variant_a == variant_b:
        raise CompareError(f"--variant-a and --variant-b are both {variant_a!r}")
    cfg = load_config(experiment)
    for flag, name in (("--variant-a", variant_a), ("--variant-b", variant_b)):
        if name not in cfg["model_variants"]:
            raise ConfigError(f"{flag} {name!r}: not a model variant of experiment {experiment!r} "
                              f"(variants: {', '.join(cfg['model_variants'])})")
    prompt_set = prompt_set.strip("/")
    vec_exp = vector_experiment or experiment
    vec_cfg = load_config(vec_exp)
    ext_variant = extraction_variant or resolve_variant(vec_exp, None, "extraction").name
    if steering_variant is not None and steering_variant not in vec_cfg["model_variants"]:
        raise ConfigError(f"--steering-variant {steering_variant!r}: not a model variant of experiment {vec_exp!r} "
                          f"(variants: {', '.join(vec_cfg['model_variants'])})")
    # the same default as the projection script, so both pick the same best vector
    steer_variant = steering_variant or resolve_variant(vec_exp, None, "application").name
    known = discover_traits(vec_exp, ext_variant)
    if traits is None:
        trait_list = known
        if not trait_list:
            raise CompareError(f"no trait vectors for extraction variant {ext_variant!r} in "
                               f"{paths.extraction_dir(vec_exp)} (pass --vector-experiment, or create vectors with "
                               f"python extraction/extract_vectors.py --experiment {vec_exp})")
    else:
        items = traits.split(",") if isinstance(traits, str) else list(traits)
        try:
            trait_list = list(dict.fromkeys(check_trait_name(t) for t in items))
        except VectorError as e:
            raise CompareError(str(e)) from None
        unknown = [t for t in trait_list if t not in known]
        if unknown:
            raise CompareError(f"--traits: no vectors for {', '.join(unknown)} (extraction variant {ext_variant!r} "
                               f"of {vec_exp!r}; traits with vectors: {', '.join(known) or 'none'})")

    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    out_dir = paths.model_diff_dir(experiment, variant_a, variant_b) / prompt_set
    results_path = out_dir / RESULTS_FILE

    # --- the data: scanned and checked, or an earlier diff ------------------------------------------------
    scan: PairScan | None = None
    if use_existing_diff:
        diff, layers, n_prompts, prompt_ids, fingerprint, means_a, means_b = _load_existing_diff(
            out_dir, variant_a, variant_b, component, results_path, warn)
        hidden = diff.shape[1]
    else:
        scan = scan_pairs(experiment, variant_a, variant_b, prompt_set, component)
        layers, hidden, n_prompts, prompt_ids = scan.layers, scan.hidden, len(scan.ids), scan.ids
        for v, ids in scan.unpaired.items():
            warn(f"{len(ids)} prompt(s) captured for {v!r} only, left out: {', '.join(ids[:10])}"
                 f"{' ...' if len(ids) > 10 else ''}")
        for pid, why in scan.excluded.items():
            warn(f"prompt {pid} left out: {why}")

    # --- vectors per trait, and their overlap with the captured layers, before anything is written ----------
    specs: dict[str, TraitSpec] = {}
    skipped: dict[str, str] = {}
    for t in trait_list:
        spec = _trait_spec(vec_exp, t, ext_variant, steer_variant, use_best_vector, method, position, component)
        if isinstance(spec, str):
            skipped[t] = spec
        elif not set(spec.available) & set(layers):
            skipped[t] = (f"no overlapping layers: vectors ({spec.method}, {spec.position}, {spec.component}) at "
                          f"layers {_fmt(spec.available)}, activations captured at layers {_fmt(layers)}")
        else:
            specs[t] = spec
    for t, why in skipped.items():
        warn(f"trait {t} skipped: {why}")
    if not specs:
        raise CompareError(f"no trait can be compared: {'; '.join(f'{t}: {w}' for t, w in skipped.items())}")

    # --- means and the diff ----------------------------------------------------------------------------
    if scan is not None:
        means_a, means_b = prompt_means(scan, progress)
        diff = (means_b.to(torch.float64) - means_a.to(torch.float64)).mean(dim=0).to(torch.float32)
        meta = {"experiment": experiment, "variant_a": variant_a, "variant_b": variant_b, "prompt_set": prompt_set,
                "component": component, "layers": layers, "n_prompts": n_prompts, "prompt_ids": prompt_ids,
                "tokens": scan.token_digest}
        fingerprint = _fingerprint(diff, means_a, means_b, meta)
        write_pt(out_dir / MEANS_FILE, {"means_a": means_a, "means_b": means_b, "prompt_ids": prompt_ids,
                                        "layers": layers, "component": component, "fingerprint": fingerprint})
        write_pt(out_dir / DIFF_FILE, {"diff": diff, "layers": layers, "component": component,
                                       "n_prompts": n_prompts, "variant_a": variant_a, "variant_b": variant_b,
                                       "prompt_set": prompt_set, "prompt_ids": prompt_ids, "experiment": experiment,
                                       "fingerprint": fingerprint, "dtype": "float32",
                                       "rows": "diff[i] is layer layers[i]: mean over prompts of (B - A)"})

    # --- results.json, merged trait by trait --------------------------------------------------------------
    results: dict[str, Any] = {}
    if results_path.exists():
        try:
            results = read_json(results_path)
        except StorageError as e:
            warn(f"{e}: starting a new results.json")
            results = {}
        if results.get("fingerprint") != fingerprint and results.get("traits"):
            warn(f"{results_path}: its {len(results['traits'])} trait(s) were computed from other data "
                 f"(different prompts, tokens or activations) and are dropped")
            results = {}
    results.update({
        "experiment": experiment, "variant_a": variant_a, "variant_b": variant_b, "prompt_set": prompt_set,
        "component": component, "n_prompts": n_prompts, "captured_layers": layers, "prompt_ids": prompt_ids,
        "vector_experiment": vec_exp, "extraction_variant": ext_variant, "fingerprint": fingerprint,
        "diff_file": str((out_dir / DIFF_FILE).relative_to(paths.experiment_dir(experiment))),
        "statistics": STATISTICS,
    })
    if scan is not None:
        results["unpaired_prompt_ids"] = scan.unpaired
        results["excluded_prompts"] = scan.excluded
    results.setdefault("traits", {})
    results["skipped_traits"] = {**{k: v for k, v in (results.get("skipped_traits") or {}).items()
                                    if k not in specs}, **skipped}
    for t in skipped:
        results["traits"].pop(t, None)  # an entry for a spec that no longer applies would read as current

    from tqdm.auto import tqdm

    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    vroot = paths.experiment_dir(vec_exp)
    for t, spec in tqdm(specs.items(), desc="traits", unit="trait", file=sys.stderr, disable=not progress):
        sweep = sorted(set(spec.available) & set(layers))
        try:
            vectors, files = {}, []
            for layer in sweep:
                v, _ = load_vector(vec_exp, t, ext_variant, spec.position, spec.component, spec.method, layer,
                                   hidden_size=hidden)
                vectors[layer] = v
                vf = paths.vector_file(vec_exp, t, ext_variant, sanitize_position(spec.position), spec.component,
                                       spec.method, layer)
                files.append({"layer": layer, "path": str(vf.relative_to(vroot)), "sha256": file_sha256(vf)})
            numbers = trait_statistics(means_a, means_b, diff, layers, vectors)
        except (VectorError, ValueError) as e:  # one bad vector file: record it, keep the other traits
            failed[t] = str(e)
            results["traits"].pop(t, None)
            results["skipped_traits"][t] = f"failed: {e}"
            warn(f"trait {t} failed: {e}")
            write_json(results_path, results, indent=1)
            continue
        missing = sorted(set(spec.available) - set(layers))
        entry = {"method": spec.method, "position": spec.position, **numbers,
                 "vector_component": spec.component, "vector_experiment": vec_exp,
                 "extraction_variant": ext_variant, "selection": spec.selection, "vector_files": files}
        if missing:
            entry["vector_layers_not_captured"] = missing
        results["traits"][t] = entry
        results["skipped_traits"].pop(t, None)
        write_json(results_path, results, indent=1)
        done[t] = {k: entry[k] for k in ("peak_layer", "peak_effect_size", "peak_paired_effect_size")}
    return {"out_dir": str(out_dir), "n_prompts": n_prompts, "layers": layers, "traits": done, "skipped": skipped,
            "failed": failed, "warnings": warnings, "variant_a": variant_a, "variant_b": variant_b,
            "prompt_set": prompt_set, "seconds": time.perf_counter() - t0}


def format_summary(s: dict) -> str:
    parts = [f"{t} peak L{r['peak_layer']} d={_num(r['peak_effect_size'])} d_z={_num(r['peak_paired_effect_size'])}"
             for t, r in s["traits"].items()]
    extra = "".join(f"; {len(s[k])} trait(s) {k}" for k in ("skipped", "failed") if s[k])
    return (f"compared {s['variant_b']} - {s['variant_a']} on {s['prompt_set']}: {s['n_prompts']} prompts, "
            f"{len(s['layers'])} layers; {'; '.join(parts) or 'no trait computed'}{extra} in {s['seconds']:.1f} s "
            f"-> {s['out_dir']}")


def _num(x: float | None) -> str:
    return "null" if x is None else f"{x:+.3f}"


# ---------------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
example (after capturing both variants on the same tokens, see the README's model-diff workflow):
  python analysis/model_diff/compare_variants.py \\
      --experiment rm_syco \\
      --variant-a instruct --variant-b rm_lora \\
      --prompt-set rm_syco/train_100 --use-best-vector

  # explicit vectors, two traits
  python analysis/model_diff/compare_variants.py --experiment rm_syco --variant-a instruct --variant-b rm_lora \\
      --prompt-set rm_syco/train_100 --method probe --position 'response[:5]' --traits behavioral/refusal,alignment/deception

Writes model_diff/{A}_vs_{B}/{prompt_set}/diff_vectors.pt, prompt_means.pt and results.json.
Every delta is B - A; every std is the sample std (ddof=1); undefined values are null with a reason.
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compare_variants.py",
                description="Compare two model variants on identical tokens: per-layer mean activation difference, "
                            "its cosine with each trait vector, and per-prompt effect sizes (Cohen's d, paired d_z).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="raw activations, output, and (by default) vectors")
    p.add_argument("--variant-a", required=True, help="baseline variant")
    p.add_argument("--variant-b", required=True, help="comparison variant (every delta is B - A)")
    p.add_argument("--prompt-set", required=True, help="prompt set captured for both (may be nested)")
    p.add_argument("--traits", help="comma list of category/name (default: every trait with vectors)")
    p.add_argument("--use-best-vector", action="store_true",
                   help="per trait, the best vector's method and position (all its layers are swept)")
    p.add_argument("--method", help="explicit vector method (with --position)")
    p.add_argument("--position", help="explicit vector position, e.g. 'response[:5]' (with --method)")
    p.add_argument("--component", default="residual", choices=COMPONENTS,
                   help="activation component compared, and the vectors' component (default: residual)")
    p.add_argument("--vector-experiment", help="experiment holding the vectors and steering results "
                                               "(default: --experiment)")
    p.add_argument("--extraction-variant", help="whose vectors (default: defaults.extraction of the vector experiment)")
    p.add_argument("--steering-variant", help="whose steering results pick the best vector (default: "
                                              "defaults.application of the vector experiment, as in projection)")
    p.add_argument("--use-existing-diff", action="store_true",
                   help="reuse diff_vectors.pt and prompt_means.pt instead of reading the raw activations")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = compare_variants(
            args.experiment, args.variant_a, args.variant_b, args.prompt_set, traits=args.traits,
            use_best_vector=args.use_best_vector, method=args.method, position=args.position,
            component=args.component, vector_experiment=args.vector_experiment,
            extraction_variant=args.extraction_variant, steering_variant=args.steering_variant,
            use_existing_diff=args.use_existing_diff, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 1 if not summary["traits"] else 0


if __name__ == "__main__":
    sys.exit(main())
