"""Compare two model variants on identical tokens: mean activation difference and trait effect sizes per layer.

    compare_variants(experiment, variant_a, variant_b, prompt_set, ...) -> dict   the stage, importable
    CompareOptions(...) / CompareOptions.from_args(ns)        every option of one run (frozen)
    plan_compare(opts) -> ComparePlan                         every input checked; nothing loaded or written
    run_compare(plan) -> dict                                 means, diff, one trait at a time into results.json
    scan_pairs(exp, variant_a, variant_b, prompt_set, component) -> PairScan       ids, tokens and layers checked
    prompt_means(scan, progress) -> (means_a, means_b)       fp32 [prompts, layers, hidden], one file at a time
    trait_statistics(means_a, means_b, diff, layers, vectors) -> dict              the per-layer numbers of one trait
    main(argv=None) -> int                                   the CLI: python analysis/model_diff/compare_variants.py --help
    CompareError                                             bad input; the message names the file, prompt or flag

Reads  experiments/{exp}/inference/{A|B}/raw/means/{set}/{id}.pt    per-prompt means (utils/means.py), preferred
       experiments/{exp}/inference/{A|B}/raw/residual/{set}/{id}.pt  raw activations where a prompt has no means file
                                                                     (response activations only)
       trait vectors of --vectors-experiment (extraction/...), its steering results for --use-best-vector
Writes experiments/{exp}/model_diff/{A}_vs_{B}/{set}/diff_vectors.pt   fp32 [model layers, hidden], row L = layer L
                                                                       (zero rows: not captured), as trait-interp
                                                 .../diff_vectors.json layers, component, prompts, fingerprint
                                                 .../prompt_means.pt   per-prompt means of both variants (for
                                                                       --use-existing-diff: no raw files needed)
                                                 .../results.json      trait-interp's keys + provenance; traits
                                                                       without a peak under incomplete_traits
(formats, and what trait-interp's readers index: docs/formats.md; the owner of every one: utils/model_diff.py)

Definitions (every delta is B - A; A is the baseline). For prompt i and layer L, m_X[i, L] is the fp32 mean of
variant X's activations over the response tokens. D[L] = mean_i (m_B[i, L] - m_A[i, L]). With v the unit
trait vector at L: p_X[i] = <m_X[i, L], v>; cosine = cos(D[L], v); effect size = Cohen's d of p_B over p_A
(pooled sample std); paired effect size = d_z = mean(p_B - p_A) / std(p_B - p_A); std_a, std_b = std of p_A,
p_B. Every std is the sample std (ddof = 1); an undefined value (N = 1, zero variance) is null with a reason.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from core import stats
from core.hooks import COMPONENTS
from utils import cli, paths
from utils.config import ConfigError, load_config
from utils.flags import add_traits_flag, add_vector_flags
from utils.layers import format_layers
from utils.means import fp32_mean, load_means
from utils.model_diff import (DIFF_FILE, EFFECT_KEYS, INCOMPLETE, MEANS_FILE, RESULTS_FILE, CompareError, ExistingDiff,
                              check_writable, first_line, keep_earlier_effect_sizes, load_existing_diff,
                              read_old_results, write_diff_vectors, write_prompt_means, write_results)
from utils.prompts import only_set_ids
from utils.raw import check_finite, read_raw
from utils.summaries import DEFAULT_UNITS, add_units_flag
from utils.vectors import (VectorError, VectorSource, file_sha256, list_vectors, load_vector, parse_position,
                           resolve_vector_source, sanitize_position)

STATISTICS = {
    "delta": "B - A: positive means variant_b projects higher on the trait",
    "ddof": stats.DDOF,
    "per_prompt_mean": "fp32 mean over all response tokens of the activation component",
    "projection": "<mean activation, v/|v|> per prompt",
    "effect_size": "Cohen's d = (mean p_B - mean p_A) / pooled sample std",
    "paired_effect_size": "d_z = mean(p_B - p_A) / sample std(p_B - p_A)",
    "std_a/std_b": "sample std of the per-prompt projections",
    "headline": "headline_layer is the selected vector's layer (the one projection and per_token_diff use); "
                "headline_effect_size / headline_paired_effect_size are d and d_z there",
    "peak": "exploratory: layer of the largest |effect_size| over every layer searched (layers_searched), a "
            "selection over layers; peak_paired_effect_size is d_z at that layer",
    "headline_mean_projection_diff_z": "mean(p_B - p_A) at the headline layer in held-out spreads of the vector "
                                       "(its reference.spread); null without held-out class statistics",
}


# ---------------------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True)
class CompareOptions:
    experiment: str
    variant_a: str
    variant_b: str
    prompt_set: str
    traits: str | tuple[str, ...] | None = None
    use_best_vector: bool = False
    method: str | None = None
    position: str | None = None
    component: str = "residual"
    vector_experiment: str | None = None
    extraction_variant: str | None = None
    steering_variant: str | None = None
    use_existing_diff: bool = False
    progress: bool = True
    units: str = DEFAULT_UNITS

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CompareOptions":
        return cls(ns.experiment, ns.variant_a, ns.variant_b, ns.prompt_set, traits=ns.traits,
                   use_best_vector=ns.use_best_vector, method=ns.method, position=ns.position,
                   component=ns.component, vector_experiment=ns.vectors_experiment,
                   extraction_variant=ns.extraction_variant, steering_variant=ns.steering_variant,
                   use_existing_diff=ns.use_existing_diff, progress=not ns.quiet, units=ns.units)

    def check_flags(self) -> None:
        """The flag combinations, before any file is read."""
        if self.use_best_vector and (self.method or self.position):
            raise CompareError("give either --use-best-vector or --method and --position, not both")
        if not self.use_best_vector and not (self.method and self.position):
            if self.method or self.position:
                raise CompareError(f"--{'position' if self.method else 'method'} is missing: explicit vectors need "
                                   f"both --method and --position (or use --use-best-vector)")
            raise CompareError("choose the vectors: --use-best-vector, or --method M --position P")
        if self.component not in COMPONENTS:
            raise CompareError(f"--component {self.component!r}: choose from {', '.join(COMPONENTS)}")
        if self.position is not None:
            try:
                parse_position(self.position)
            except VectorError as e:
                raise CompareError(str(e)) from e
        if self.variant_a == self.variant_b:
            raise CompareError(f"--variant-a and --variant-b are both {self.variant_a!r}")


# ---------------------------------------------------------------------------------------------------------
# Pairing the per-prompt files

@dataclass(frozen=True)
class PromptInput:
    """One variant's file for one prompt: a means file (utils/means.py) or a raw activation file."""
    kind: str                            # "means" | "raw"
    path: Path


@dataclass(frozen=True)
class PromptFile:
    """What one variant's file of one prompt holds, read without its activations."""
    path: Path
    prompt_ids: list[int] | None
    response_ids: list[int]
    layers: dict[int, int]               # layer -> hidden size of the component's response activations
    components: list[str]                # every component captured (for error messages)


@dataclass
class PairScan:
    """What both variants captured for the prompts they share, checked before any mean is computed."""
    files_a: dict[str, PromptInput]
    files_b: dict[str, PromptInput]
    ids: list[str]                       # paired prompts with response tokens, natural order
    layers: list[int]                    # layers both variants captured with the component, in every file
    component: str
    hidden: int
    unpaired: dict[str, list[str]] = field(default_factory=dict)     # variant -> ids only it has
    excluded: dict[str, str] = field(default_factory=dict)           # id -> reason (no response tokens)
    token_digest: str = ""

    def input_counts(self) -> dict[str, dict[str, int]]:
        """Per side ("a", "b"): how many paired prompts come from means files and raw files, and their bytes."""
        out = {}
        for side, files in (("a", self.files_a), ("b", self.files_b)):
            used = [files[pid] for pid in self.ids]
            out[side] = {"means_files": sum(i.kind == "means" for i in used),
                         "raw_files": sum(i.kind == "raw" for i in used),
                         "bytes": sum(i.path.stat().st_size for i in used)}
        return out


def _read_raw(path: Path, component: str) -> PromptFile:
    """Token ids and captured layers of a raw .pt (memory-mapped: the activations are not read)."""
    raw = read_raw(path)
    acts = raw.side("response").get("activations") or {}
    layers = {layer: raw.hidden_size for layer, comps in acts.items() if component in comps}
    comps = sorted({c for v in acts.values() for c in v})
    pids = raw.side("prompt").get("token_ids")
    return PromptFile(path, None if pids is None else list(pids), list(raw.token_ids["response"]), layers, comps)


def _read_means(path: Path, component: str) -> PromptFile:
    m = load_means(path)
    ids, end = m["token_ids"], m["prompt_end"]
    layers = {layer: int(comps[component].shape[0]) for layer, comps in m["response"]["mean"].items()
              if component in comps}
    return PromptFile(path, ids[:end], ids[end:], layers, list(m["metadata"]["components"]))


def read_prompt_file(inp: PromptInput, component: str) -> PromptFile:
    return _read_means(inp.path, component) if inp.kind == "means" else _read_raw(inp.path, component)


def response_means(inp: PromptInput, layers: list[int], component: str) -> list[torch.Tensor]:
    """The fp32 response mean at each layer: stored in a means file, or taken from the raw activations."""
    if inp.kind == "means":
        mean = load_means(inp.path)["response"]["mean"]
        return [mean[layer][component] for layer in layers]
    raw = read_raw(inp.path)
    return [fp32_mean(check_finite(inp.path, f"response layer {layer} {component}",
                                   raw.activations("response", layer, component))) for layer in layers]


def _check_layers(layer_sets: list[tuple[Path, set[int]]]) -> list[int]:
    common = set.intersection(*(s for _, s in layer_sets))
    union = set.union(*(s for _, s in layer_sets))
    if common != union:  # a resumed capture with other --layers: say which file lacks what, never average unequal sets
        path, have = next((p, s) for p, s in layer_sets if s != union)
        raise CompareError(f"{path}: captured layers {format_layers(have)}, but other files of the pair have "
                           f"{format_layers(union)}; recapture so that every prompt has the same layers")
    return sorted(common)


def _mismatch_error(mismatched: list[str], exp: str, variant_a: str, variant_b: str, prompt_set: str) -> CompareError:
    shown = ", ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else "")
    return CompareError(
        f"{len(mismatched)} prompt(s) of {prompt_set!r} have different token ids in {variant_a!r} and "
        f"{variant_b!r}: {shown}. Compare variants on identical tokens: capture {variant_a} on {variant_b}'s "
        f"responses with: python inference/capture_raw_activations.py --experiment {exp} --prompt-set "
        f"{prompt_set} --model-variant {variant_a} --responses-from {variant_b}")


def inputs_of(exp: str, variant: str, prompt_set: str) -> dict[str, PromptInput]:
    """{id: input} of a variant: its means file where there is one (same numbers, far fewer bytes), else raw."""
    found = {pid: PromptInput("raw", p) for pid, p in paths.raw_files(exp, variant, prompt_set).items()}
    found.update({pid: PromptInput("means", p) for pid, p in paths.means_files(exp, variant, prompt_set).items()})
    found = only_set_ids(found, prompt_set, paths.inference_dir(exp, variant) / "raw" / "{means,residual}" / prompt_set)
    if not found:
        raise CompareError(f"no activations of variant {variant!r} for prompt set {prompt_set!r}: neither "
                           f"{paths.means_dir(exp, variant, prompt_set)} nor {paths.raw_dir(exp, variant, prompt_set)} "
                           f"has .pt files (capture them with: python inference/capture_raw_activations.py "
                           f"--experiment {exp} --prompt-set {prompt_set} --model-variant {variant})")
    return dict(sorted(found.items(), key=lambda kv: paths.natural_key(kv[0])))


def scan_pairs(exp: str, variant_a: str, variant_b: str, prompt_set: str, component: str) -> PairScan:
    """Pair prompts by id and check, for all of them, identical token ids and the captured layers.

    Raw files are memory-mapped, so this reads only their small token lists; means files are small.
    Errors list every bad prompt.
    """
    files_a, files_b = inputs_of(exp, variant_a, prompt_set), inputs_of(exp, variant_b, prompt_set)
    ids = sorted(set(files_a) & set(files_b), key=paths.natural_key)
    if not ids:
        raise CompareError(f"variants {variant_a!r} and {variant_b!r} share no prompt id in prompt set {prompt_set!r} "
                           f"({variant_a}: {len(files_a)} prompts, {variant_b}: {len(files_b)} prompts under "
                           f"inference/{{variant}}/raw/means|residual/{prompt_set})")
    unpaired = {v: sorted(set(f) - set(ids), key=paths.natural_key)
                for v, f in ((variant_a, files_a), (variant_b, files_b))}
    mismatched, excluded, layer_sets, hidden = [], {}, [], set()
    digest = hashlib.sha256()
    for pid in ids:
        fa, fb = read_prompt_file(files_a[pid], component), read_prompt_file(files_b[pid], component)
        if fa.response_ids != fb.response_ids or (fa.prompt_ids is not None and fb.prompt_ids is not None
                                                  and fa.prompt_ids != fb.prompt_ids):
            mismatched.append(pid)
            continue
        if not fa.response_ids:
            excluded[pid] = "no response tokens: the per-prompt mean is undefined"
            continue
        digest.update(f"{pid}:{fa.prompt_ids or []}:{fa.response_ids};".encode())
        for f in (fa, fb):
            if not f.layers:
                raise CompareError(f"{f.path}: no response activations of component {component!r} (captured: "
                                   f"{', '.join(f.components) or 'none'}); capture with --components {component}")
            if hidden and set(f.layers.values()) != hidden:
                raise CompareError(f"{f.path}: hidden size {sorted(set(f.layers.values()))} differs from "
                                   f"{sorted(hidden)} in other files (another model?)")
            hidden |= set(f.layers.values())
            layer_sets.append((f.path, set(f.layers)))
    if mismatched:
        raise _mismatch_error(mismatched, exp, variant_a, variant_b, prompt_set)
    if not layer_sets:
        raise CompareError(f"every paired prompt of {prompt_set!r} has an empty response: nothing to compare")
    return PairScan(files_a, files_b, [p for p in ids if p not in excluded], _check_layers(layer_sets), component,
                    hidden.pop(), {k: v for k, v in unpaired.items() if v}, excluded, digest.hexdigest())


def prompt_means(scan: PairScan, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [prompts, layers, hidden] means over response tokens, for A and B; one pair of files in memory at a time.

    Activations are cast to fp32 before averaging (a bf16 mean can be as coarse as a small LoRA's shift).
    """
    n, k = len(scan.ids), len(scan.layers)
    means_a = torch.empty(n, k, scan.hidden, dtype=torch.float32)
    means_b = torch.empty(n, k, scan.hidden, dtype=torch.float32)
    for i, pid in enumerate(tqdm(scan.ids, desc="prompt means", unit="prompt", file=sys.stderr, disable=not progress)):
        for files, out in ((scan.files_a, means_a), (scan.files_b, means_b)):
            for j, mean in enumerate(response_means(files[pid], scan.layers, scan.component)):
                out[i, j] = mean
    return means_a, means_b


# ---------------------------------------------------------------------------------------------------------
# Statistics of one trait

def _projection_stats(pa: torch.Tensor, pb: torch.Tensor) -> dict[str, stats.Stat]:
    return {"per_layer_effect_size": stats.cohens_d(pb, pa), "per_layer_paired_effect_size": stats.paired_d(pb, pa),
            "per_layer_std_a": stats.std(pa), "per_layer_std_b": stats.std(pb),
            "per_layer_mean_projection_diff": stats.mean(pb - pa)}


def trait_statistics(means_a: torch.Tensor | None, means_b: torch.Tensor | None, diff: torch.Tensor,
                     layers: Sequence[int], vectors: dict[int, torch.Tensor]) -> dict:
    """The per-layer numbers for the layers in `vectors` (each a unit vector; rows of means/diff follow `layers`).

    Without per-prompt means (an old diff file), only cosines are computed and the rest is null with a reason.
    """
    sweep = sorted(vectors)
    row = {layer: i for i, layer in enumerate(layers)}
    out: dict[str, list] = {k: [] for k in ("per_layer_cosine_sim", *EFFECT_KEYS)}
    projections: dict[str, list] = {"per_layer_projections_a": [], "per_layer_projections_b": []}
    reasons: dict[str, dict[str, str]] = {}
    no_means = stats.Stat.undefined(f"no per-prompt means in {MEANS_FILE}: rerun without --use-existing-diff")
    for layer in sweep:
        v = vectors[layer].to(torch.float64)
        numbers = {"per_layer_cosine_sim": stats.cosine(diff[row[layer]], v)}
        if means_a is None:
            numbers.update({k: no_means for k in EFFECT_KEYS})
        else:
            pa = means_a[:, row[layer]].to(torch.float64) @ v
            pb = means_b[:, row[layer]].to(torch.float64) @ v
            numbers.update(_projection_stats(pa, pb))
            projections["per_layer_projections_a"].append(pa.tolist())
            projections["per_layer_projections_b"].append(pb.tolist())
        for key, s in numbers.items():
            out[key].append(s.value)
            if s.value is None:
                reasons.setdefault(key, {})[str(layer)] = s.reason
    peak = stats.peak_index(out["per_layer_effect_size"])
    result = {
        "layers": sweep,
        "per_layer_cosine_sim": out["per_layer_cosine_sim"],
        "per_layer_effect_size": out["per_layer_effect_size"],
        "per_layer_paired_effect_size": out["per_layer_paired_effect_size"],
        "peak_layer": None if peak is None else sweep[peak],
        "peak_effect_size": None if peak is None else out["per_layer_effect_size"][peak],
        "peak_paired_effect_size": None if peak is None else out["per_layer_paired_effect_size"][peak],
        **{k: out[k] for k in EFFECT_KEYS[2:]},
    }
    if peak is None:
        reasons["peak_layer"] = {"all": "no layer has a defined effect size"}
    if means_a is not None:
        result.update(projections)
    if reasons:
        result["null_reasons"] = reasons
    return result


# ---------------------------------------------------------------------------------------------------------
# Vector choice per trait

@dataclass(frozen=True)
class TraitSpec:
    trait: str
    method: str
    position: str
    component: str
    available: tuple[int, ...]            # layers with a vector file
    selection: dict                       # how the spec was chosen
    headline_layer: int | None = None     # the selected vector's layer: the one number every view reports
    reference: dict | None = None         # that vector's Reference (baseline, held-out spreads), JSON
    explanation: str = ""                 # why that vector, in plain words


def trait_spec(source: VectorSource, trait: str, opts: CompareOptions) -> TraitSpec:
    """The vector spec of a trait (no vector loaded); VectorError when it has none."""
    method, position = opts.method, opts.position
    if opts.use_best_vector:
        # restricted to the activation component: a vector is only meaningful on the stream it came from
        top = source.rank(trait, component=opts.component)[0]
        method, position = top.ref.method, top.ref.position
        selection = {"mode": "best", "source": top.source, "best_layer": top.ref.layer, "score": top.score,
                     "steering_variant": source.steering_variant}
    else:
        selection = {"mode": "explicit"}
    refs = list_vectors(source.vectors_experiment, trait, source.extraction_variant, component=opts.component,
                        position=position, method=method)
    if not refs:
        raise VectorError(f"no vector files for method {method}, position {position}, component {opts.component} "
                          f"under {paths.vectors_dir(source.vectors_experiment, trait, source.extraction_variant)}")
    # the headline layer: the vector projection would select for this method and position (as per_token_diff reads)
    try:
        chosen = source.best(trait, component=opts.component, position=position, method=method)
    except VectorError as e:  # explicit vectors without evidence: no layer is "the" layer; the sweep stays
        return TraitSpec(trait, method, position, opts.component, tuple(sorted({r.layer for r in refs})), selection,
                         None, None, f"no selected vector: {first_line(e)}")
    return TraitSpec(trait, method, position, opts.component, tuple(sorted({r.layer for r in refs})), selection,
                     chosen.layer, chosen.reference.to_json(), getattr(chosen, "explanation", "") or
                     chosen.selection_reason)


# ---------------------------------------------------------------------------------------------------------
# The model's layer count (rows of diff_vectors.pt)

def model_layer_count(exp: str, variant: str, layers: Sequence[int]) -> tuple[int, str]:
    """Rows of diff_vectors.pt: the model's layers (its config), else the deepest captured layer + 1."""
    from utils.config import resolve_variant
    from utils.model import ModelLoadError, load_model_config

    try:
        n = getattr(load_model_config(resolve_variant(exp, variant).model_path(exp)), "num_hidden_layers", None)
    except ModelLoadError:
        n = None
    if isinstance(n, int) and n > max(layers):
        return n, "num_hidden_layers of the model config"
    return max(layers) + 1, "the deepest captured layer + 1 (model config not readable)"


# ---------------------------------------------------------------------------------------------------------
# The plan: every input checked, nothing loaded or written

@dataclass
class ComparePlan:
    opts: CompareOptions
    prompt_set: str
    source: VectorSource
    out_dir: Path
    scan: PairScan | None                 # the per-prompt files (full run)
    existing: ExistingDiff | None         # an earlier diff (--use-existing-diff)
    specs: dict[str, TraitSpec]
    skipped: dict[str, str]
    warnings: list[str]
    n_layers: int = 0                     # rows of diff_vectors.pt (the model's layers)
    n_layers_source: str = ""

    @property
    def layers(self) -> list[int]:
        return self.scan.layers if self.scan is not None else self.existing.layers

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS_FILE

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)


def _check_variants(opts: CompareOptions) -> None:
    cfg = load_config(opts.experiment)
    for flag, name in (("--variant-a", opts.variant_a), ("--variant-b", opts.variant_b)):
        if name not in cfg["model_variants"]:
            raise ConfigError(f"{flag} {name!r}: not a model variant of experiment {opts.experiment!r} "
                              f"(variants: {', '.join(cfg['model_variants'])})")


def _choose_specs(plan: ComparePlan) -> None:
    for t in plan.source.traits:
        try:
            spec = trait_spec(plan.source, t, plan.opts)
        except VectorError as e:
            plan.skipped[t] = str(e)
            continue
        if not set(spec.available) & set(plan.layers):
            plan.skipped[t] = (f"no overlapping layers: vectors ({spec.method}, {spec.position}, {spec.component}) "
                               f"at layers {format_layers(spec.available)}, activations captured at layers "
                               f"{format_layers(plan.layers)}")
        else:
            plan.specs[t] = spec
    for t, why in plan.skipped.items():
        plan.warn(f"trait {t} skipped: {why}")
    if not plan.specs:
        raise CompareError(f"no trait can be compared: {'; '.join(f'{t}: {w}' for t, w in plan.skipped.items())}")


def plan_compare(opts: CompareOptions) -> ComparePlan:
    """Check flags, variants, vectors and every per-prompt file (token ids, layers) before anything is written."""
    opts.check_flags()
    _check_variants(opts)
    source = resolve_vector_source(opts.experiment, opts.vector_experiment, opts.extraction_variant,
                                   opts.steering_variant, opts.traits)
    prompt_set = opts.prompt_set.strip("/")
    out_dir = paths.model_diff_dir(opts.experiment, opts.variant_a, opts.variant_b) / prompt_set
    plan = ComparePlan(opts, prompt_set, source, out_dir, None, None, {}, {}, [])
    if opts.use_existing_diff:
        plan.existing = load_existing_diff(out_dir, opts.variant_a, opts.variant_b, opts.component, plan.warn)
        plan.n_layers, plan.n_layers_source = plan.existing.n_layers, f"rows of {plan.existing.path}"
    else:
        plan.scan = scan_pairs(opts.experiment, opts.variant_a, opts.variant_b, prompt_set, opts.component)
        for v, ids in plan.scan.unpaired.items():
            plan.warn(f"{len(ids)} prompt(s) captured for {v!r} only, left out: {', '.join(ids[:10])}"
                      f"{' ...' if len(ids) > 10 else ''}")
        for pid, why in plan.scan.excluded.items():
            plan.warn(f"prompt {pid} left out: {why}")
        plan.n_layers, plan.n_layers_source = model_layer_count(opts.experiment, opts.variant_a, plan.scan.layers)
    _choose_specs(plan)
    check_writable(plan.out_dir)     # before the first write: an output path that is a folder fails here
    return plan


# ---------------------------------------------------------------------------------------------------------
# Running: the numbers, and the writers

@dataclass(frozen=True)
class DiffData:
    """The numbers every trait is computed from."""
    diff: torch.Tensor                    # fp32 [len(layers), hidden]
    layers: list[int]
    hidden: int
    n_prompts: int | None
    prompt_ids: list[str] | None
    fingerprint: str
    means_a: torch.Tensor | None          # fp32 [prompts, layers, hidden]
    means_b: torch.Tensor | None


def _fingerprint(diff: torch.Tensor, means_a: torch.Tensor | None, means_b: torch.Tensor | None, meta: dict) -> str:
    h = hashlib.sha256(repr(sorted(meta.items())).encode())
    for t in (diff, means_a, means_b):
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def compute_diff(plan: ComparePlan) -> DiffData:
    """Per-prompt means and the mean difference (full run), or the earlier run's (--use-existing-diff)."""
    if plan.existing is not None:
        e = plan.existing
        return DiffData(e.diff, e.layers, int(e.diff.shape[1]), e.n_prompts, e.prompt_ids, e.fingerprint,
                        e.means_a, e.means_b)
    scan, o = plan.scan, plan.opts
    means_a, means_b = prompt_means(scan, o.progress)
    diff = (means_b.to(torch.float64) - means_a.to(torch.float64)).mean(dim=0).to(torch.float32)
    meta = {"experiment": o.experiment, "variant_a": o.variant_a, "variant_b": o.variant_b,
            "prompt_set": plan.prompt_set, "component": o.component, "layers": scan.layers,
            "n_prompts": len(scan.ids), "prompt_ids": scan.ids, "tokens": scan.token_digest}
    return DiffData(diff, scan.layers, scan.hidden, len(scan.ids), scan.ids,
                    _fingerprint(diff, means_a, means_b, meta), means_a, means_b)


def write_diff_files(plan: ComparePlan, data: DiffData) -> None:
    """prompt_means.pt, then diff_vectors.pt and its sidecar (full runs only)."""
    o = plan.opts
    common = {"prompt_ids": data.prompt_ids, "layers": data.layers, "component": o.component,
              "fingerprint": data.fingerprint}
    write_prompt_means(plan.out_dir, data.means_a, data.means_b, common)
    write_diff_vectors(plan.out_dir, data.diff, data.layers, plan.n_layers, {
        "n_layers_source": plan.n_layers_source, "component": o.component, "n_prompts": data.n_prompts,
        "experiment": o.experiment, "variant_a": o.variant_a, "variant_b": o.variant_b,
        "prompt_set": plan.prompt_set, "prompt_ids": data.prompt_ids, "fingerprint": data.fingerprint})


def start_results(plan: ComparePlan, data: DiffData) -> dict:
    """The results.json to merge into: the run's metadata over the earlier traits that still apply."""
    o = plan.opts
    results = read_old_results(plan.results_path, data.fingerprint, plan.warn)
    results.update({
        "experiment": o.experiment, "variant_a": o.variant_a, "variant_b": o.variant_b,
        "prompt_set": plan.prompt_set, "component": o.component, "n_prompts": data.n_prompts,
        "captured_layers": data.layers, "prompt_ids": data.prompt_ids,
        "vector_experiment": plan.source.vectors_experiment, "extraction_variant": plan.source.extraction_variant,
        "fingerprint": data.fingerprint,
        "diff_file": str((plan.out_dir / DIFF_FILE).relative_to(paths.experiment_dir(o.experiment))),
        "statistics": STATISTICS,
    })
    if plan.scan is not None:
        results["unpaired_prompt_ids"] = plan.scan.unpaired
        results["excluded_prompts"] = plan.scan.excluded
        results["inputs"] = plan.scan.input_counts()
    results.setdefault("traits", {})
    results["skipped_traits"] = {**{k: v for k, v in (results.get("skipped_traits") or {}).items()
                                    if k not in plan.specs}, **plan.skipped}
    for t in plan.skipped:  # an entry for a spec that no longer applies would read as current
        results["traits"].pop(t, None)
        (results.get(INCOMPLETE) or {}).pop(t, None)
    return results


def trait_entry(plan: ComparePlan, data: DiffData, spec: TraitSpec, old: dict | None = None) -> dict:
    """The results.json entry of one trait: its vectors loaded, every number computed.

    Without per-prompt means (--use-existing-diff) the effect sizes of `old`, the earlier entry of the
    same vectors and layers, are kept, as trait-interp does.
    """
    src = plan.source
    vroot = paths.experiment_dir(src.vectors_experiment)
    vectors, files = {}, []
    for layer in sorted(set(spec.available) & set(data.layers)):
        vectors[layer], _ = load_vector(src.vectors_experiment, spec.trait, src.extraction_variant, spec.position,
                                        spec.component, spec.method, layer, hidden_size=data.hidden)
        vf = paths.vector_file(src.vectors_experiment, spec.trait, src.extraction_variant,
                               sanitize_position(spec.position), spec.component, spec.method, layer)
        files.append({"layer": layer, "path": str(vf.relative_to(vroot)), "sha256": file_sha256(vf)})
    entry = {"method": spec.method, "position": spec.position,
             **trait_statistics(data.means_a, data.means_b, data.diff, data.layers, vectors),
             **headline(spec, sorted(vectors)),
             "vector_component": spec.component, "vector_experiment": src.vectors_experiment,
             "extraction_variant": src.extraction_variant, "selection": spec.selection, "vector_files": files}
    missing = sorted(set(spec.available) - set(data.layers))
    if missing:
        entry["vector_layers_not_captured"] = missing
    if data.means_a is None:
        why = keep_earlier_effect_sizes(entry, old)
        if why:
            entry["effect_sizes_not_kept"] = why
    fill_headline(entry)
    return entry


def headline(spec: TraitSpec, sweep: list[int]) -> dict:
    """The layer rule of every view of this comparison: the selected vector's layer, and the exploratory peak's
    context (how many layers were searched for it)."""
    out = {"headline_layer": spec.headline_layer, "headline_rule": f"the selected vector's layer ({spec.explanation})"
           if spec.explanation else "the selected vector's layer", "reference": spec.reference,
           "layers_searched": len(sweep)}
    if spec.headline_layer is None:
        out["headline_missing"] = spec.explanation
    elif spec.headline_layer not in sweep:
        out["headline_missing"] = (f"the selected vector's layer {spec.headline_layer} was not captured or has no "
                                   f"vector file for {spec.method} {spec.position} (layers {format_layers(sweep)})")
    return out


def fill_headline(entry: dict) -> None:
    """d, d_z and the mean projection difference (raw and in held-out spreads) at the headline layer."""
    layer, layers = entry.get("headline_layer"), entry.get("layers") or []
    k = layers.index(layer) if layer in layers else None
    at = lambda key: (entry.get(key) or [None] * len(layers))[k] if k is not None else None  # noqa: E731
    entry["headline_effect_size"] = at("per_layer_effect_size")
    entry["headline_paired_effect_size"] = at("per_layer_paired_effect_size")
    diff = at("per_layer_mean_projection_diff")
    entry["headline_mean_projection_diff"] = diff
    spread = (entry.get("reference") or {}).get("spread")
    entry["headline_mean_projection_diff_z"] = diff / spread if diff is not None and spread else None
    entry["peak_is_exploratory"] = (f"exploratory: the largest |d| over {entry.get('layers_searched', len(layers))} "
                                    f"layers searched: a selection over layers, not the headline")


def run_compare(plan: ComparePlan) -> dict:
    """Compute and write; results.json is rewritten after every trait, so an interrupted run keeps finished ones."""
    t0 = time.perf_counter()
    data = compute_diff(plan)
    if plan.scan is not None:
        write_diff_files(plan, data)
    results = start_results(plan, data)
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for t, spec in tqdm(plan.specs.items(), desc="traits", unit="trait", file=sys.stderr,
                        disable=not plan.opts.progress):
        old = results["traits"].pop(t, None) or (results.get(INCOMPLETE) or {}).pop(t, None)
        try:
            results["traits"][t] = trait_entry(plan, data, spec, old)
        except VectorError as e:  # one bad vector file: record it, keep the other traits
            failed[t] = str(e)
            results["skipped_traits"][t] = f"failed: {e}"
            plan.warn(f"trait {t} failed: {e}")
        else:
            results["skipped_traits"].pop(t, None)
            done[t] = {k: results["traits"][t].get(k) for k in (
                "peak_layer", "peak_effect_size", "peak_paired_effect_size", "headline_layer", "headline_effect_size",
                "headline_paired_effect_size", "headline_mean_projection_diff", "headline_mean_projection_diff_z",
                "layers_searched", "reference")}
        write_results(plan.results_path, results)
    o = plan.opts
    return {"out_dir": str(plan.out_dir), "n_prompts": data.n_prompts, "layers": data.layers, "traits": done,
            "skipped": plan.skipped, "failed": failed, "warnings": plan.warnings, "variant_a": o.variant_a,
            "variant_b": o.variant_b, "prompt_set": plan.prompt_set, "seconds": time.perf_counter() - t0,
            "units": o.units,
            "inputs": plan.scan.input_counts() if plan.scan is not None else None,
            "incomplete": {t: e["reason"] for t, e in (results.get(INCOMPLETE) or {}).items() if t in done}}


def compare_variants(experiment: str, variant_a: str, variant_b: str, prompt_set: str,
                     traits: str | Sequence[str] | None = None, **options) -> dict:
    """Write diff_vectors.pt, prompt_means.pt and results.json (merged trait by trait); returns a summary.

    `options` are the other CompareOptions fields (use_best_vector, method, position, component, ...).
    Summary keys: out_dir, n_prompts, layers, traits ({trait: peak numbers}), skipped ({trait: reason}),
    failed ({trait: reason}), warnings, seconds.
    """
    traits = tuple(traits) if traits is not None and not isinstance(traits, str) else traits
    opts = CompareOptions(experiment, variant_a, variant_b, prompt_set, traits=traits, **options)
    return run_compare(plan_compare(opts))


def _trait_part(t: str, r: dict, units: str) -> str:
    """Headline first (the selected vector's layer), the all-layer peak after it, labelled exploratory."""
    if r.get("headline_layer") is None:
        return (f"{t}: no selected vector (no headline); exploratory peak L{r['peak_layer']} "
                f"d={_num(r['peak_effect_size'])} of {r.get('layers_searched')} layers searched")
    head = f"{t} L{r['headline_layer']} (selected vector): d={_num(r['headline_effect_size'])} " \
           f"d_z={_num(r['headline_paired_effect_size'])}"
    diff, diff_z = r.get("headline_mean_projection_diff"), r.get("headline_mean_projection_diff_z")
    if diff is not None:
        if units == "z" and diff_z is not None:
            head += f", mean B - A {diff_z:+.3g} held-out spreads ({(r.get('reference') or {}).get('spread'):.3g})"
        else:
            note = " (no held-out spread: raw)" if units == "z" else ""
            head += f", mean B - A {diff:+.3g} raw projection units{note}"
    return (f"{head}; exploratory peak L{r['peak_layer']} d={_num(r['peak_effect_size'])} of "
            f"{r.get('layers_searched')} layers searched")


def format_summary(s: dict) -> str:
    parts = [_trait_part(t, r, s.get("units") or DEFAULT_UNITS) for t, r in s["traits"].items()]
    extra = "".join(f"; {len(s[k])} trait(s) {k}" for k in ("skipped", "failed") if s[k])
    inputs = ""
    if s.get("inputs"):
        files = "; ".join(f"{s['variant_' + side]}: {c['means_files']} means + {c['raw_files']} raw files"
                          for side, c in s["inputs"].items())
        inputs = f" (read {files}, {sum(c['bytes'] for c in s['inputs'].values()) / 1e6:.1f} MB)"
    return (f"compared {s['variant_b']} - {s['variant_a']} on {s['prompt_set']}: {s['n_prompts']} prompts{inputs}, "
            f"{len(s['layers'])} layers; {'; '.join(parts) or 'no trait computed'}{extra} in {s['seconds']:.1f} s "
            f"-> {s['out_dir']}")


def _num(x: float | None) -> str:
    return "null" if x is None else f"{x:+.3f}"


# ---------------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
example (after capturing both variants on the same tokens, see the README's model-diff workflow):
  python analysis/model_diff/compare_variants.py \\
      --experiment demo \\
      --variant-a instruct --variant-b lora \\
      --prompt-set single_trait --use-best-vector

  # explicit vectors, two traits, the mean difference in raw projection units
  python analysis/model_diff/compare_variants.py --experiment demo --variant-a instruct --variant-b lora \\
      --prompt-set single_trait --method probe --position 'response[:5]' \\
      --traits demo/refusal,demo/formality --units raw

  # new vectors later, without the raw files: reuses diff_vectors.pt and prompt_means.pt
  python analysis/model_diff/compare_variants.py --experiment demo --variant-a instruct --variant-b lora \\
      --prompt-set single_trait --use-best-vector --traits demo/sycophancy --use-existing-diff

Reads inference/{A|B}/raw/means/{set}/{id}.pt (per-prompt means) where they exist, raw/residual/ elsewhere.
Writes model_diff/{A}_vs_{B}/{prompt_set}/diff_vectors.pt (trait-interp's [model layers, hidden] tensor),
diff_vectors.json, prompt_means.pt and results.json (traits without a defined peak under incomplete_traits).
Every delta is B - A; every std is the sample std (ddof=1); undefined values are null with a reason.
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="compare_variants.py",
                   description="Compare two model variants on identical tokens: per-layer mean activation "
                               "difference, its cosine with each trait vector, and per-prompt effect sizes "
                               "(Cohen's d, paired d_z).",
                   epilog=EPILOG)
    p.add_argument("--experiment", required=True, help="raw activations, output, and (by default) vectors")
    p.add_argument("--variant-a", required=True, help="baseline variant")
    p.add_argument("--variant-b", required=True, help="comparison variant (every delta is B - A)")
    p.add_argument("--prompt-set", required=True, help="prompt set captured for both (may be nested)")
    add_traits_flag(p)
    p.add_argument("--use-best-vector", action="store_true",
                   help="per trait, the best vector's method and position (all its layers are swept)")
    p.add_argument("--component", default="residual", choices=COMPONENTS,
                   help="activation component compared, and the vectors' component (default: residual)")
    add_vector_flags(p, aliases=True)     # --method / --position name the vectors explicitly (instead of --use-best-vector)
    p.add_argument("--use-existing-diff", action="store_true",
                   help="reuse diff_vectors.pt and prompt_means.pt instead of reading the activations (also "
                        "trait-interp's diff_vectors.pt; without per-prompt means the earlier effect sizes are kept)")
    add_units_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda ns: run_compare(plan_compare(CompareOptions.from_args(ns))),
                   format_summary, argv, status=lambda s: 0 if s["traits"] else 1)


if __name__ == "__main__":
    sys.exit(main())
