"""Model-diff outputs (model_diff/{A}_vs_{B}/...): the one module that reads and writes them, in the shapes
trait-interp's own readers index (docs/formats.md).

    write_diff_vectors(out_dir, rows, layers, n_layers, meta)   diff_vectors.pt: a bare fp32 tensor
                                [n_layers, hidden] (row L = layer L, zero rows for layers not captured), and
                                diff_vectors.json beside it: layers, component, prompts, fingerprint, sha256
    write_prompt_means(out_dir, means_a, means_b, meta)          prompt_means.pt (ours: for --use-existing-diff)
    load_existing_diff(out_dir, variant_a, variant_b, component, warn) -> ExistingDiff
                                our tensor + sidecar, trait-interp's bare tensor, or our earlier dict format; every
                                tensor checked (shape, dtype, finite), the sidecar's layers against the rows, and
                                prompt_means.pt against the diff (prompts, layers, hidden size)
    read_old_results(path, fingerprint, warn) -> dict            the results.json to merge into
    read_results(path) -> dict                                   a results.json for reading (report, demo): traits
                                                                 entries with finite numbers or null
    write_results(path, results) -> bytes                        atomically, viewer-safe
    check_writable(out_dir)                                      no output path is a folder (before the first write)
    read_per_token_diff(path, n_tokens=None) -> dict             one per_token_diff/{trait}/{set}/{id}.json
    read_aggregate(path) -> dict                                 per_token_diff/{trait}/{set}/aggregate.json
    write_per_token_diff(path, rec) / write_aggregate(path, agg) validated, atomic
    keep_earlier_effect_sizes(entry, old) -> str | None          --use-existing-diff without per-prompt means
    viewer_safe(results)                                         entries without a peak go to incomplete_traits
    CompareError                                                 bad input; the message names the file or flag

What the viewer (trait-interp's model-analysis.js) needs from results.json: every entry under `traits` has a
number in `peak_effect_size`, a `peak_layer` among its `layers`, and a number among `per_layer_cosine_sim`
(it calls .toFixed on them). An entry without them (one prompt, zero variance, only cosines) is kept under
`incomplete_traits` with a `reason` instead, where the viewer does not look. Entries of a results.json
without a fingerprint (written by trait-interp) cannot be checked against this run's data: they are kept
and marked `unverified`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core.errors import TraitError
from utils.layers import MAX_LAYERS, format_layers
from utils.storage import StorageError, load_pt, read_json, write_json, write_pt
from utils.vectors import file_sha256

DIFF_FILE = "diff_vectors.pt"
DIFF_SIDECAR = "diff_vectors.json"
MEANS_FILE = "prompt_means.pt"
RESULTS_FILE = "results.json"
INCOMPLETE = "incomplete_traits"
UNVERIFIED = ("kept from a results.json without a fingerprint (trait-interp's?): not checked against the prompts "
              "and activations of this comparison")
EFFECT_KEYS = ("per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_std_a", "per_layer_std_b",
               "per_layer_mean_projection_diff")
KEPT_KEYS = (*EFFECT_KEYS, "peak_layer", "peak_effect_size", "peak_paired_effect_size", "per_layer_projections_a",
             "per_layer_projections_b")

Warn = Callable[[str], None]


class CompareError(TraitError):
    """Bad input for compare_variants; the message names the file, prompt or flag."""


def first_line(e: Exception) -> str:
    """torch's load errors can run over many lines; the first names the file, the exception chain keeps the rest."""
    return str(e).strip().splitlines()[0]


def load_small(path: Path, mmap: bool = False) -> Any:
    try:
        return load_pt(path, mmap=mmap)
    except StorageError as e:
        raise CompareError(first_line(e)) from e


# ---------------------------------------------------------------------------------------------------------
# diff_vectors.pt + diff_vectors.json, prompt_means.pt

def write_prompt_means(out_dir: Path, means_a: torch.Tensor, means_b: torch.Tensor, meta: dict) -> None:
    """fp32 [prompts, layers, hidden] per-prompt means of both variants, with the run's fingerprint."""
    write_pt(out_dir / MEANS_FILE, {"means_a": means_a, "means_b": means_b, **meta})


def write_diff_vectors(out_dir: Path, rows: torch.Tensor, layers: list[int], n_layers: int, meta: dict) -> None:
    """The tensor trait-interp reads, then the sidecar that says what it holds (with the tensor file's sha256)."""
    full = torch.zeros(n_layers, rows.shape[1], dtype=torch.float32)
    full[layers] = rows.to(torch.float32)
    write_pt(out_dir / DIFF_FILE, full)
    write_json(out_dir / DIFF_SIDECAR, {
        "rows": "row L is layer L: the mean over prompts of (B - A) response means; zero rows were not captured",
        "shape": [n_layers, int(rows.shape[1])], "dtype": "float32", "layers": layers, "n_layers": n_layers,
        **meta, "diff_sha256": file_sha256(out_dir / DIFF_FILE)}, indent=1)


@dataclass(frozen=True)
class ExistingDiff:
    """diff_vectors.pt (and prompt_means.pt when it belongs to it) of an earlier run, validated."""
    path: Path
    diff: torch.Tensor                    # fp32 [len(layers), hidden]
    layers: list[int]
    n_layers: int                         # rows of the file (the model's layers)
    n_prompts: int | None
    prompt_ids: list[str] | None
    fingerprint: str
    means_path: Path | None               # prompt_means.pt with the same fingerprint, else None
    means_a: torch.Tensor | None = None   # its fp32 [prompts, len(layers), hidden] tensors
    means_b: torch.Tensor | None = None


def _float_matrix(obj: Any, path: Path, what: str, ndim: int = 2) -> torch.Tensor:
    if not isinstance(obj, torch.Tensor) or obj.ndim != ndim or not obj.dtype.is_floating_point or 0 in obj.shape:
        shape = f"{obj.dtype} {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise CompareError(f"{path}: {what} must be a non-empty {ndim}-D float tensor, got {shape}")
    if not bool(torch.isfinite(obj).all()):
        raise CompareError(f"{path}: {what} holds NaN or infinite values")
    return obj


def _layer_list(obj: Any, path: Path, rows: int | None) -> list[int]:
    hi = rows if rows is not None else MAX_LAYERS
    if not isinstance(obj, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < hi
                                            for x in obj) or len(set(obj)) != len(obj):
        raise CompareError(f"{path}: 'layers' must list distinct layers 0..{hi - 1}, got {str(obj)[:80]}")
    return list(obj)


def _side_fields(side: dict, path: Path) -> None:
    n = side.get("n_prompts")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise CompareError(f"{path}: 'n_prompts' must be a non-negative int")
    ids = side.get("prompt_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool)
                                                                   for i in ids)):
        raise CompareError(f"{path}: 'prompt_ids' must be a list of ids")
    for key in ("fingerprint", "variant_a", "variant_b", "component"):
        if side.get(key) is not None and not isinstance(side[key], str):
            raise CompareError(f"{path}: {key!r} must be a string")


def _sidecar(out_dir: Path, warn: Warn) -> dict | None:
    """Our sidecar of diff_vectors.pt when it describes the file as it is now, else None."""
    path = out_dir / DIFF_SIDECAR
    if not path.exists():
        return None
    try:
        side = read_json(path)
    except StorageError as e:
        raise CompareError(str(e)) from e
    if not isinstance(side, dict) or side.get("diff_sha256") != file_sha256(out_dir / DIFF_FILE):
        warn(f"{path} does not describe {out_dir / DIFF_FILE} any more (rewritten since, by trait-interp?): "
             f"reading the tensor on its own")
        return None
    _side_fields(side, path)
    return side


def _bare_tensor_sidecar(out_dir: Path, obj: torch.Tensor, component: str, warn: Warn) -> dict:
    """What a trait-interp diff_vectors.pt says on its own: its non-zero rows, and n_prompts from results.json."""
    side: dict[str, Any] = {"layers": [i for i in range(obj.shape[0]) if bool(obj[i].abs().sum() > 0)]}
    old = read_results(out_dir / RESULTS_FILE) if (out_dir / RESULTS_FILE).exists() else {}
    n = old.get("n_prompts")
    side["n_prompts"] = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
    warn(f"{out_dir / DIFF_FILE}: a bare tensor without {DIFF_SIDECAR} (trait-interp's): layers "
         f"{format_layers(side['layers'])} taken from its non-zero rows, component assumed {component!r}")
    return side


def load_existing_diff(out_dir: Path, variant_a: str, variant_b: str, component: str, warn: Warn) -> ExistingDiff:
    """The diff of an earlier run: our tensor + sidecar, trait-interp's bare tensor, or our earlier dict."""
    path = out_dir / DIFF_FILE
    if not path.exists():
        raise CompareError(f"--use-existing-diff: {path} not found (run once without --use-existing-diff)")
    obj = load_small(path)
    if isinstance(obj, dict) and "diff" in obj:  # written by an earlier version of ours
        side = obj
        rows = _float_matrix(obj["diff"], path, "'diff'").to(torch.float32)
        layers = _layer_list(obj.get("layers"), path, None)
        if len(layers) != rows.shape[0]:
            raise CompareError(f"{path}: {rows.shape[0]} diff rows for {len(layers)} layers")
        _side_fields(side, path)
        n_layers = max(layers, default=-1) + 1
    elif isinstance(obj, torch.Tensor):
        _float_matrix(obj, path, "the diff tensor [n_layers, hidden]")
        side = _sidecar(out_dir, warn) or _bare_tensor_sidecar(out_dir, obj, component, warn)
        layers = _layer_list(side.get("layers"), out_dir / DIFF_SIDECAR, int(obj.shape[0]))
        rows, n_layers = obj[layers].to(torch.float32), int(obj.shape[0])
    else:
        raise CompareError(f"{path}: expected a float tensor [n_layers, hidden] (or an earlier dict with 'diff')")
    for key, want in (("variant_a", variant_a), ("variant_b", variant_b), ("component", component)):
        if key in side and side[key] != want:
            raise CompareError(f"--use-existing-diff: {path} was made with {key} {side[key]!r}, not {want!r}")
    if not layers:
        raise CompareError(f"{path}: no layer has a non-zero difference")
    ids = side.get("prompt_ids")
    means = _matching_means(out_dir, side.get("fingerprint"), len(layers), int(rows.shape[1]), side.get("n_prompts"),
                            warn)
    return ExistingDiff(path, rows, layers, n_layers, side.get("n_prompts"),
                        None if ids is None else [str(i) for i in ids], side.get("fingerprint") or "",
                        *(means or (None, None, None)))


def _matching_means(out_dir: Path, fingerprint: str | None, n_layers: int, hidden: int, n_prompts: int | None,
                    warn: Warn) -> tuple[Path, torch.Tensor, torch.Tensor] | None:
    """prompt_means.pt when it belongs to the diff (same fingerprint), validated against it; else None."""
    mpath = out_dir / MEANS_FILE
    if not mpath.exists():
        return None
    obj = load_small(mpath)
    if not isinstance(obj, dict):
        raise CompareError(f"{mpath}: expected a dict with means_a, means_b and fingerprint")
    if not fingerprint or obj.get("fingerprint") != fingerprint:
        warn(f"{mpath} does not belong to {out_dir / DIFF_FILE} (fingerprints differ): it is not used")
        return None
    a = _float_matrix(obj.get("means_a"), mpath, "'means_a' [prompts, layers, hidden]", 3)
    b = _float_matrix(obj.get("means_b"), mpath, "'means_b' [prompts, layers, hidden]", 3)
    want = (n_prompts if n_prompts is not None else a.shape[0], n_layers, hidden)
    for name, t in (("means_a", a), ("means_b", b)):
        if tuple(t.shape) != want:
            raise CompareError(f"{mpath}: {name} has shape {tuple(t.shape)}, the diff needs {want} "
                               f"(prompts, layers, hidden)")
    return mpath, a.to(torch.float32), b.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# results.json

def _finite(obj: Any, found: list[bool]) -> Any:
    """NaN / inf (trait-interp wrote bare NaN) -> None, which JSON and the viewer's null checks accept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(True)
        return None
    if isinstance(obj, list):
        return [_finite(x, found) for x in obj]
    if isinstance(obj, dict):
        return {k: _finite(v, found) for k, v in obj.items()}
    return obj


def _kept_entry(entry: Any, unverified: bool) -> dict | None:
    if not isinstance(entry, dict):
        return None
    found: list[bool] = []
    entry = _finite(entry, found)
    if found:
        entry.setdefault("null_reasons", {})["non_finite"] = "NaN or infinity in the earlier results.json, kept as null"
    if unverified:
        entry.setdefault("unverified", UNVERIFIED)
    return entry


def read_old_results(path: Path, fingerprint: str, warn: Warn) -> dict:
    """The earlier results.json to merge into.

    Same fingerprint: everything kept. No fingerprint (trait-interp's file): every entry kept, marked
    `unverified`. Another fingerprint (our run on other data): its entries are dropped, except those
    already marked unverified.
    """
    if not path.exists():
        return {}
    try:
        results = read_json(path, allow_nan=True)   # trait-interp wrote bare NaN: kept as null below
    except StorageError as e:
        warn(f"{e}: starting a new results.json")
        return {}
    if not isinstance(results, dict):
        warn(f"{path}: not a JSON object: starting a new results.json")
        return {}
    old_fp = results.get("fingerprint")
    sections = {k: results.get(k) if isinstance(results.get(k), dict) else {} for k in ("traits", INCOMPLETE)}
    if old_fp is None:
        if sections["traits"]:
            warn(f"{path}: {len(sections['traits'])} trait(s) without a fingerprint (trait-interp's file?) are kept, "
                 f"marked unverified")
    elif old_fp != fingerprint:
        stale = [t for s in sections.values() for t, e in s.items() if isinstance(e, dict) and "unverified" not in e]
        if stale:
            warn(f"{path}: {len(stale)} trait(s) were computed from other data (different prompts, tokens or "
                 f"activations) and are dropped")
        sections = {k: {t: e for t, e in s.items() if t not in stale} for k, s in sections.items()}
    for key, section in sections.items():
        results[key] = {t: e for t, e in ((t, _kept_entry(e, old_fp is None)) for t, e in section.items()) if e}
    return results


def keep_earlier_effect_sizes(entry: dict, old: dict | None) -> str | None:
    """Copy the effect sizes of the earlier entry of the same vectors and layers into `entry` (cosines only:
    --use-existing-diff without per-prompt means); returns why they could not be kept, None when they were."""
    if not old:
        return "no earlier entry of this trait"
    if (old.get("method"), old.get("position")) != (entry["method"], entry["position"]) or \
            old.get("vector_component", entry["vector_component"]) != entry["vector_component"]:
        return f"the earlier entry used other vectors ({old.get('method')}, {old.get('position')})"
    if old.get("layers") != entry["layers"]:
        return (f"the earlier entry covers layers {format_layers(old.get('layers') or [])}, this one "
                f"{format_layers(entry['layers'])}")
    if "vector_files" in old and [f.get("sha256") for f in old["vector_files"]] != \
            [f["sha256"] for f in entry["vector_files"]]:
        return "the vector files changed since the earlier entry"
    effect = old.get("per_layer_effect_size")
    if not isinstance(effect, list) or len(effect) != len(entry["layers"]) or \
            not any(isinstance(x, (int, float)) for x in effect):
        return "the earlier entry has no effect sizes"
    reasons = entry.get("null_reasons", {})
    for key in KEPT_KEYS:
        if key in old:
            entry[key] = old[key]
            reasons.pop(key, None)
    for key, why in (old.get("null_reasons") or {}).items():
        if key in KEPT_KEYS:
            reasons[key] = why
    if reasons:
        entry["null_reasons"] = reasons
    else:
        entry.pop("null_reasons", None)
    entry["effect_sizes_from"] = ("the earlier results.json entry of the same vectors and layers (not recomputed: "
                                  "no per-prompt means)")
    if old.get("unverified"):
        entry["unverified"] = old["unverified"]
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def viewer_problem(entry: dict) -> str | None:
    """Why trait-interp's viewer could not draw this entry (it would throw), or None."""
    if not _number(entry.get("peak_effect_size")):
        reasons = (entry.get("null_reasons") or {}).get("per_layer_effect_size") or {}
        detail = next(iter(reasons.values()), None) if isinstance(reasons, dict) else None
        return "no defined effect size at any layer" + (f" ({detail})" if detail else "")
    layers = entry.get("layers")
    if not isinstance(layers, list) or entry.get("peak_layer") not in layers:
        return "peak_layer is not one of its layers"
    cos = entry.get("per_layer_cosine_sim")
    if not isinstance(cos, list) or not any(_number(c) for c in cos):
        return "no defined cosine at any layer"
    return None


def viewer_safe(results: dict) -> dict:
    """Move every entry the viewer cannot draw from `traits` to `incomplete_traits` (with its reason)."""
    incomplete = {t: e for t, e in (results.get(INCOMPLETE) or {}).items() if t not in results["traits"]}
    for t in list(results["traits"]):
        why = viewer_problem(results["traits"][t])
        if why:
            incomplete[t] = {"reason": why, **results["traits"].pop(t)}
    if incomplete:
        results[INCOMPLETE] = incomplete
    else:
        results.pop(INCOMPLETE, None)
    return results


def check_writable(out_dir: Path) -> None:
    """CompareError when one of compare_variants' output paths in `out_dir` is a folder (nothing written yet)."""
    for name in (DIFF_FILE, DIFF_SIDECAR, MEANS_FILE, RESULTS_FILE):
        if (out_dir / name).is_dir():
            raise CompareError(f"{out_dir / name}: is a folder where an output file belongs; move it away")


def write_results(path: Path, results: dict) -> int:
    """results.json, viewer-safe (entries the viewer cannot draw moved to incomplete_traits), atomically."""
    return write_json(path, viewer_safe(results), indent=1)


# ---------------------------------------------------------------------------------------------------------
# Reading for display (the report, the demo): every number the page or a summary uses is checked

def _num_or_null(x: Any) -> bool:
    return x is None or _number(x)


def _check_numbers(entry: dict, keys: Sequence[str], where: str) -> None:
    for key in keys:
        v = entry.get(key)
        if isinstance(v, list):
            if not all(_num_or_null(x) for x in v):
                raise CompareError(f"{where}: {key} must hold finite numbers or null")
        elif not _num_or_null(v):
            raise CompareError(f"{where}: {key} must be a finite number or null, got {str(v)[:40]}")


RESULT_NUMBERS = ("per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_cosine_sim",
                  "per_layer_mean_projection_diff", "peak_effect_size", "peak_paired_effect_size")


def read_results(path: Path) -> dict:
    """A results.json whose `traits` entries hold finite numbers or null (NaN read from a file is refused)."""
    try:
        results = read_json(path)
    except StorageError as e:
        raise CompareError(str(e)) from e
    if not isinstance(results, dict):
        raise CompareError(f"{path}: expected a JSON object")
    for section in ("traits", INCOMPLETE):
        entries = results.get(section, {})
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise CompareError(f"{path}: '{section}' must map trait names to objects")
        for t, e in entries.items():
            where = f"{path}: {section}.{t}"
            _check_numbers(e, RESULT_NUMBERS, where)
            layers = e.get("layers", [])
            if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) and
                                                       0 <= x < MAX_LAYERS for x in layers):
                raise CompareError(f"{where}: layers must be a list of layers")
            if e.get("peak_layer") is not None and e["peak_layer"] not in layers:
                raise CompareError(f"{where}: peak_layer is not one of its layers")
            for key in RESULT_NUMBERS[:4]:
                if isinstance(e.get(key), list) and len(e[key]) != len(layers):
                    raise CompareError(f"{where}: {key} has {len(e[key])} values for {len(layers)} layers")
    return results


# ---------------------------------------------------------------------------------------------------------
# per_token_diff/{trait}/{set}/{id}.json and aggregate.json

AGGREGATE_FILE = "aggregate.json"


def _clauses(clauses: Any, where: str, n_tokens: int | None = None) -> None:
    if not isinstance(clauses, list):
        raise CompareError(f"{where}: clauses must be a list")
    for c in clauses:
        rng = c.get("token_range") if isinstance(c, dict) else None
        if not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                  and x >= 0 for x in rng) or rng[0] > rng[1] or \
                (n_tokens is not None and rng[1] > n_tokens):
            raise CompareError(f"{where}: a clause without a valid token_range [start, end]")
        if not isinstance(c.get("text", ""), str):
            raise CompareError(f"{where}: a clause's text must be a string")
        _check_numbers(c, ("mean_delta", "max_delta", "min_delta"), where)


def validate_per_token_diff(rec: Any, where: str | Path, n_tokens: int | None = None) -> dict:
    where = str(where)
    if not isinstance(rec, dict):
        raise CompareError(f"{where}: expected a JSON object")
    toks, deltas = rec.get("tokens"), rec.get("per_token_delta")
    if not isinstance(toks, list) or not all(isinstance(t, str) for t in toks):
        raise CompareError(f"{where}: 'tokens' must be a list of strings")
    if not isinstance(deltas, list) or len(deltas) != len(toks) or not all(_number(x) for x in deltas):
        raise CompareError(f"{where}: 'per_token_delta' must hold one finite number per token ({len(toks)})")
    if n_tokens is not None and len(toks) != n_tokens:
        raise CompareError(f"{where}: {len(toks)} tokens, the response has {n_tokens}")
    layer = rec.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < MAX_LAYERS:
        raise CompareError(f"{where}: 'layer' must be a layer number")
    if rec.get("method") is not None and not isinstance(rec["method"], str):
        raise CompareError(f"{where}: 'method' must be a string")
    _check_numbers(rec, ("mean_delta", "std_delta"), where)
    _clauses(rec.get("clauses", []), where, len(toks))
    return rec


def read_per_token_diff(path: Path, n_tokens: int | None = None) -> dict:
    try:
        rec = read_json(path)
    except StorageError as e:
        raise CompareError(str(e)) from e
    return validate_per_token_diff(rec, path, n_tokens)


def write_per_token_diff(path: Path, rec: dict) -> int:
    validate_per_token_diff(rec, path)
    return write_json(path, rec, indent=1)


def validate_aggregate(agg: Any, where: str | Path) -> dict:
    where = str(where)
    if not isinstance(agg, dict):
        raise CompareError(f"{where}: expected a JSON object")
    _check_numbers(agg, ("mean_delta_across_prompts", "std_delta_across_prompts", "per_position_mean_delta"), where)
    for key in ("top_clauses_overall", "bottom_clauses_overall"):
        _clauses(agg.get(key, []), f"{where}: {key}")
    for key in ("n_prompts", "layer"):
        v = agg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 40):
            raise CompareError(f"{where}: {key!r} must be a non-negative int")
    if agg.get("top_pct") is not None and not _number(agg["top_pct"]):
        raise CompareError(f"{where}: 'top_pct' must be a finite number")
    return agg


def read_aggregate(path: Path) -> dict:
    try:
        agg = read_json(path)
    except StorageError as e:
        raise CompareError(str(e)) from e
    return validate_aggregate(agg, path)


def write_aggregate(path: Path, agg: dict) -> int:
    validate_aggregate(agg, path)
    return write_json(path, agg, indent=1)
