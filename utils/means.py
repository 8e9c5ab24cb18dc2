"""Per-prompt mean activations: the small file the model diff needs instead of a raw activation file.

    fp32_mean(t)                          the mean over tokens of a [n_tokens, hidden] tensor, in float32
    side_means(acts, storage_dtype)       {layer: {component: Tensor[n, hidden]}} -> (n_tokens, {layer: {comp: mean}})
    build_means(prompt_acts, response_acts, token_ids=, prompt_end=, metadata=)   a means record (validated)
    build_means_from_sequence(acts, prompt_end, token_ids=, metadata=)           the same from whole-sequence tensors
    means_from_raw(record, prompt_id=, prompt_set=)                              the same from a raw .pt record
    write_means(path, obj) -> bytes       validate, then write atomically (utils/storage.py)
    load_means(path) -> dict              torch.load(weights_only=True) and validate; MeansError names the file
    MeansError                            a malformed means file or record

The file, inference/{variant}/raw/means/{set}/{id}.pt (utils.paths.means_file), holds (docs/formats.md):

    {'prompt':   {'n_tokens': int, 'mean': {layer: {component: Tensor[hidden] float32}}},
     'response': {'n_tokens': int, 'mean': {layer: {component: Tensor[hidden] float32}}},
     'token_ids': [int, ...],  'prompt_end': int,
     'metadata': {'model', 'variant', 'lora', 'quantization', 'dtype', 'compute_dtype', 'layers', 'components',
                  'responses_from', 'prompt_id', 'prompt_set', 'capture_date', 'source': 'fused' | 'capture'}}

A mean is taken over the activations as a raw file stores them: cast to the storage dtype (metadata.dtype)
first, then to float32, then averaged. So a means file gives exactly the numbers that averaging the raw
.pt of the same capture gives. A side with no tokens has an empty `mean`; so does a side that was not
captured (a response-only raw file has no prompt activations).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from core.errors import TraitError
from utils.storage import StorageError, load_pt, write_pt

SIDES = ("prompt", "response")
METADATA_KEYS = ("model", "variant", "lora", "quantization", "dtype", "compute_dtype", "layers", "components",
                 "responses_from", "prompt_id", "prompt_set", "capture_date", "source")
SOURCES = ("fused", "capture")

Acts = Mapping[int, Mapping[str, torch.Tensor]]


class MeansError(TraitError):
    """A means file (or a record about to be written) that does not have the documented shape."""


def fp32_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 in float32, on t's device. The one way every model-diff mean is taken."""
    return t.to(torch.float32).mean(dim=0)


def side_means(acts: Acts, storage_dtype: torch.dtype | None = None) -> tuple[int, dict[int, dict[str, torch.Tensor]]]:
    """(n_tokens, {layer: {component: fp32 mean on the CPU}}) of one side's [n_tokens, hidden] activations.

    With storage_dtype, each tensor is first rounded to it, as a raw file of that dtype would store it.
    """
    n_tokens: int | None = None
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer, comps in acts.items():
        for comp, t in comps.items():
            if t.ndim != 2:
                raise MeansError(f"layer {layer} {comp}: expected [n_tokens, hidden], got shape {tuple(t.shape)}")
            if n_tokens is None:
                n_tokens = int(t.shape[0])
            elif t.shape[0] != n_tokens:
                raise MeansError(f"layer {layer} {comp}: {t.shape[0]} tokens, other tensors have {n_tokens}")
            if t.shape[0] == 0:
                continue
            stored = t.to(storage_dtype) if storage_dtype is not None else t
            out.setdefault(int(layer), {})[str(comp)] = fp32_mean(stored).cpu()
    return (n_tokens or 0), out


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def build_means(prompt_acts: Acts, response_acts: Acts, *, token_ids: list[int], prompt_end: int, metadata: dict,
                storage_dtype: torch.dtype | None = None) -> dict:
    """A validated means record from each side's activations ({layer: {component: Tensor[n, hidden]}}).

    `metadata` gives the METADATA_KEYS (missing ones are filled: dtype from storage_dtype or the tensors,
    layers / components from the activations, capture_date now). An empty `prompt_acts` means the prompt
    was not captured: its n_tokens is still prompt_end.
    """
    n_p, mean_p = side_means(prompt_acts, storage_dtype)
    n_r, mean_r = side_means(response_acts, storage_dtype)
    ids = [int(i) for i in token_ids]
    first = next((t for acts in (response_acts, prompt_acts) for comps in acts.values() for t in comps.values()), None)
    layers = sorted({int(layer) for acts in (prompt_acts, response_acts) for layer in acts})
    comps = sorted({str(c) for acts in (prompt_acts, response_acts) for cs in acts.values() for c in cs})
    meta = {
        "model": None, "variant": None, "lora": None, "quantization": None,
        "dtype": _dtype_name(storage_dtype or (first.dtype if first is not None else None)),
        "compute_dtype": None, "layers": layers, "components": comps, "responses_from": None,
        "prompt_id": None, "prompt_set": None, "capture_date": _dt.datetime.now().isoformat(), "source": "fused",
        **metadata,
    }
    if prompt_acts and n_p != prompt_end:
        raise MeansError(f"prompt activations have {n_p} tokens but prompt_end is {prompt_end}")
    if response_acts and n_r != len(ids) - prompt_end:
        raise MeansError(f"response activations have {n_r} tokens but token_ids has {len(ids) - prompt_end} "
                         f"after prompt_end {prompt_end}")
    record = {"prompt": {"n_tokens": int(prompt_end), "mean": mean_p},
              "response": {"n_tokens": len(ids) - int(prompt_end), "mean": mean_r},
              "token_ids": ids, "prompt_end": int(prompt_end), "metadata": meta}
    return validate_means(record, "means record")


def build_means_from_sequence(acts: Acts, prompt_end: int, *, token_ids: list[int], metadata: dict,
                              storage_dtype: torch.dtype | None = None) -> dict:
    """build_means from whole-sequence activations [n_tokens, hidden], split at prompt_end."""
    prompt = {layer: {c: t[:prompt_end] for c, t in comps.items()} for layer, comps in acts.items()}
    response = {layer: {c: t[prompt_end:] for c, t in comps.items()} for layer, comps in acts.items()}
    return build_means(prompt, response, token_ids=token_ids, prompt_end=prompt_end, metadata=metadata,
                       storage_dtype=storage_dtype)


def means_from_raw(record: dict, *, prompt_id: str, prompt_set: str, where: str = "raw record") -> dict:
    """The means record of a raw .pt record (docs/formats.md): the tensors are already in the storage dtype."""
    try:
        prompt, response = record["prompt"], record["response"]
        ids = [int(i) for i in prompt["token_ids"]] + [int(i) for i in response["token_ids"]]
        prompt_end = len(prompt["token_ids"])
        pacts, racts = prompt.get("activations") or {}, response["activations"]
    except (KeyError, TypeError) as e:
        raise MeansError(f"{where}: not a raw activation record (missing {e})") from e
    raw_meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    meta = {k: raw_meta[k] for k in METADATA_KEYS if k in raw_meta and k not in ("dtype", "source")}
    meta.update(prompt_id=str(prompt_id), prompt_set=prompt_set, source="capture")
    meta.setdefault("compute_dtype", raw_meta.get("compute_dtype"))
    return build_means(pacts, racts, token_ids=ids, prompt_end=prompt_end, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# Validation, writing, loading

def _side(obj: Any, side: str, where: str, hidden: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    s = obj.get(side)
    if not isinstance(s, dict) or not isinstance(s.get("n_tokens"), int) or not isinstance(s.get("mean"), dict):
        raise MeansError(f"{where}: '{side}' must be {{'n_tokens': int, 'mean': {{layer: {{component: tensor}}}}}}")
    if s["n_tokens"] == 0 and s["mean"]:
        raise MeansError(f"{where}: '{side}' has 0 tokens but a mean")
    for layer, comps in s["mean"].items():
        if not isinstance(layer, int) or isinstance(layer, bool) or not isinstance(comps, dict) or not comps:
            raise MeansError(f"{where}: '{side}.mean' keys must be int layers holding {{component: tensor}}")
        for comp, t in comps.items():
            if not isinstance(comp, str) or not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype != torch.float32:
                raise MeansError(f"{where}: {side} layer {layer} {comp!r}: expected a 1-D float32 tensor")
            if not hidden:
                hidden.append(int(t.shape[0]))
            elif t.shape[0] != hidden[0]:
                raise MeansError(f"{where}: {side} layer {layer} {comp!r}: hidden size {t.shape[0]}, others "
                                 f"{hidden[0]}")
            if not bool(torch.isfinite(t).all()):
                raise MeansError(f"{where}: {side} layer {layer} {comp!r}: non-finite values")
    return s["mean"]


def validate_means(obj: Any, where: str | Path) -> dict:
    """`obj` if it has the documented shape, else MeansError naming `where` and the first problem."""
    if not isinstance(obj, dict):
        raise MeansError(f"{where}: not a means file (expected a dict, got {type(obj).__name__})")
    missing = [k for k in (*SIDES, "token_ids", "prompt_end", "metadata") if k not in obj]
    if missing:
        raise MeansError(f"{where}: not a means file (missing {', '.join(missing)})")
    ids, end, meta = obj["token_ids"], obj["prompt_end"], obj["metadata"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise MeansError(f"{where}: 'token_ids' must be a list of ints")
    if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= len(ids):
        raise MeansError(f"{where}: 'prompt_end' {end!r} is not an index into {len(ids)} token_ids")
    if not isinstance(meta, dict) or [k for k in METADATA_KEYS if k not in meta]:
        gone = [k for k in METADATA_KEYS if not isinstance(meta, dict) or k not in meta]
        raise MeansError(f"{where}: 'metadata' lacks {', '.join(gone)}")
    if meta["source"] not in SOURCES:
        raise MeansError(f"{where}: metadata.source {meta['source']!r} is not one of {', '.join(SOURCES)}")
    hidden: list[int] = []
    for side, want in (("prompt", end), ("response", len(ids) - end)):
        mean = _side(obj, side, where, hidden)
        if obj[side]["n_tokens"] != want:
            raise MeansError(f"{where}: {side}.n_tokens {obj[side]['n_tokens']} but token_ids / prompt_end give {want}")
        layers = sorted(mean)
        if mean and layers != sorted(int(x) for x in meta["layers"]):
            raise MeansError(f"{where}: {side} means at layers {layers}, metadata.layers {meta['layers']}")
        for layer in layers:
            if sorted(mean[layer]) != sorted(meta["components"]):
                raise MeansError(f"{where}: {side} layer {layer} has components {sorted(mean[layer])}, "
                                 f"metadata.components {meta['components']}")
    return obj


def write_means(path: str | Path, obj: dict) -> int:
    """Validate `obj`, then write it atomically; returns the file size. A bad record writes nothing."""
    validate_means(obj, path)
    return write_pt(path, obj)


def load_means(path: str | Path) -> dict:
    """A validated means file (loaded with weights_only=True, not memory-mapped: it is small)."""
    try:
        obj = load_pt(path, mmap=False)
    except StorageError as e:  # torch's own message can run over many lines: keep the first, the chain has the rest
        raise MeansError(str(e).strip().splitlines()[0]) from e
    return validate_means(obj, path)
