"""The files compare_variants.py writes, in the shapes trait-interp's own readers index (docs/formats.md).

    write_diff_vectors(out_dir, rows, layers, n_layers, meta)   diff_vectors.pt: a bare fp32 tensor
                                [n_layers, hidden] (row L = layer L, zero rows for layers not captured), and
                                diff_vectors.json beside it: layers, component, prompts, fingerprint, sha256
    write_prompt_means(out_dir, means_a, means_b, meta)          prompt_means.pt (ours: for --use-existing-diff)
    load_existing_diff(out_dir, variant_a, variant_b, component, warn) -> ExistingDiff
                                our tensor + sidecar, trait-interp's bare tensor, or our earlier dict format
    read_old_results(path, fingerprint, warn) -> dict            the results.json to merge into
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
from typing import Any, Callable

import torch

from core.errors import TraitError
from utils.layers import format_layers
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
    """diff_vectors.pt (and prompt_means.pt when it belongs to it) of an earlier run."""
    path: Path
    diff: torch.Tensor                    # fp32 [len(layers), hidden]
    layers: list[int]
    n_layers: int                         # rows of the file (the model's layers)
    n_prompts: int | None
    prompt_ids: list[str] | None
    fingerprint: str
    means_path: Path | None               # prompt_means.pt with the same fingerprint, else None


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
    return side


def _bare_tensor_sidecar(out_dir: Path, obj: torch.Tensor, component: str, warn: Warn) -> dict:
    """What a trait-interp diff_vectors.pt says on its own: its non-zero rows, and n_prompts from results.json."""
    side: dict[str, Any] = {"layers": [i for i in range(obj.shape[0]) if bool(obj[i].abs().sum() > 0)]}
    old = read_json(out_dir / RESULTS_FILE) if (out_dir / RESULTS_FILE).exists() else {}
    side["n_prompts"] = old.get("n_prompts") if isinstance(old, dict) else None
    warn(f"{out_dir / DIFF_FILE}: a bare tensor without {DIFF_SIDECAR} (trait-interp's): layers "
         f"{format_layers(side['layers'])} taken from its non-zero rows, component assumed {component!r}")
    return side


def load_existing_diff(out_dir: Path, variant_a: str, variant_b: str, component: str, warn: Warn) -> ExistingDiff:
    """The diff of an earlier run: our tensor + sidecar, trait-interp's bare tensor, or our earlier dict."""
    path = out_dir / DIFF_FILE
    if not path.exists():
        raise CompareError(f"--use-existing-diff: {path} not found (run once without --use-existing-diff)")
    obj = load_small(path)
    if isinstance(obj, dict) and isinstance(obj.get("diff"), torch.Tensor):  # written by an earlier version of ours
        side, rows = obj, obj["diff"].to(torch.float32)
        layers = [int(x) for x in obj["layers"]]
        n_layers = max(layers, default=-1) + 1
    elif isinstance(obj, torch.Tensor) and obj.ndim == 2 and obj.dtype.is_floating_point:
        side = _sidecar(out_dir, warn) or _bare_tensor_sidecar(out_dir, obj, component, warn)
        layers = [int(x) for x in side["layers"]]
        if layers and max(layers) >= obj.shape[0]:
            raise CompareError(f"{path}: {obj.shape[0]} rows, but {out_dir / DIFF_SIDECAR} lists layer {max(layers)}")
        rows, n_layers = obj[layers].to(torch.float32), int(obj.shape[0])
    else:
        raise CompareError(f"{path}: expected a float tensor [n_layers, hidden] (or an earlier dict with 'diff')")
    for key, want in (("variant_a", variant_a), ("variant_b", variant_b), ("component", component)):
        if key in side and side[key] != want:
            raise CompareError(f"--use-existing-diff: {path} was made with {key} {side[key]!r}, not {want!r}")
    if not layers:
        raise CompareError(f"{path}: no layer has a non-zero difference")
    return ExistingDiff(path, rows, layers, n_layers, side.get("n_prompts"), side.get("prompt_ids"),
                        side.get("fingerprint", ""), _matching_means(out_dir, side.get("fingerprint"), warn))


def _matching_means(out_dir: Path, fingerprint: str | None, warn: Warn) -> Path | None:
    mpath = out_dir / MEANS_FILE
    if not mpath.exists():
        return None
    if not fingerprint or load_small(mpath, mmap=True).get("fingerprint") != fingerprint:
        warn(f"{mpath} does not belong to {out_dir / DIFF_FILE} (fingerprints differ): it is not used")
        return None
    return mpath


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
        results = read_json(path)
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
