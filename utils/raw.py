"""Raw activation files (inference/{variant}/raw/residual/{set}/{id}.pt): the one module that reads and writes them.

    read_raw(path, hidden_size=, n_layers=) -> RawRecord   torch.load(weights_only=True, memory-mapped) and the
                                          structure validated: sides, token ids, per-layer [n_tokens, hidden] float
                                          tensors (only shapes and dtypes are looked at: no activation is read)
    RawRecord                             the typed record: path, data (the dict as stored), layers, components per
                                          layer, hidden_size, n_tokens per side, token_ids; .activations(side, L, c)
    check_finite(path, what, t)           RawError when a tensor read for scoring holds NaN / inf
    build_raw(data, acts, tokens, response_only, metadata) -> dict   one sequence's record, split at prompt_end
    write_raw(path, record) -> bytes      atomic torch.save (utils/storage.py)
    RawError                              a malformed raw file (names it and what is wrong)

File format (docs/formats.md):

    {'prompt':   {'text', 'tokens', 'token_ids', 'activations': {layer: {component: Tensor[n_prompt, hidden]}}},
     'response': {... same ...},
     'metadata': {...}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from core.errors import TraitError
from utils.layers import MAX_LAYERS
from utils.storage import StorageError, load_pt, write_pt

SIDES = ("prompt", "response")


class RawError(TraitError):
    """A raw activation file that does not have the documented shape; the message names it."""


@dataclass(frozen=True)
class RawRecord:
    path: Path
    data: Mapping[str, Any] = field(repr=False)                  # the dict as stored (tensors memory-mapped)
    components: Mapping[int, frozenset[str]]                     # layer -> components captured (either side)
    hidden_size: int
    n_tokens: Mapping[str, int]                                  # side -> number of token ids
    token_ids: Mapping[str, list[int]]
    n_layers: int | None = None                                  # metadata.n_layers when the file says

    @property
    def layers(self) -> list[int]:
        return sorted(self.components)

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.data.get("metadata")
        return meta if isinstance(meta, dict) else {}

    def side(self, side: str) -> Mapping[str, Any]:
        return self.data[side]

    def check_finite(self, layers, components) -> None:
        """RawError unless every captured tensor at these layers and components is finite (reads those tensors)."""
        for side in SIDES:
            for layer in layers:
                for comp in components:
                    t = self.activations(side, layer, comp)
                    if t is not None:
                        check_finite(self.path, f"{side} layer {layer} {comp}", t)

    def activations(self, side: str, layer: int, component: str) -> torch.Tensor | None:
        """The [n_tokens, hidden] tensor, or None when that side / layer / component was not captured."""
        return (self.data[side].get("activations") or {}).get(layer, {}).get(component)


def _ids(obj: Any) -> bool:
    return isinstance(obj, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in obj)


def validate_raw(data: Any, path: str | Path, hidden_size: int | None = None, n_layers: int | None = None) -> RawRecord:
    """The typed record of a loaded raw .pt, or RawError naming `path` and the first problem."""
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in SIDES):
        raise RawError(f"{path}: not a raw activation file (expected 'prompt' and 'response' dicts)")
    meta = data.get("metadata", {})
    if meta is not None and not isinstance(meta, dict):
        raise RawError(f"{path}: 'metadata' must be a dict")
    limit = n_layers if n_layers is not None else MAX_LAYERS
    comps: dict[int, set[str]] = {}
    hidden = hidden_size
    n_tokens, token_ids = {}, {}
    for side in SIDES:
        s = data[side]
        ids = s.get("token_ids", [])
        if not _ids(ids):
            raise RawError(f"{path}: {side}.token_ids must be a list of non-negative ints")
        tokens = s.get("tokens")
        if tokens is not None and (not isinstance(tokens, list) or len(tokens) != len(ids)
                                   or not all(isinstance(t, str) for t in tokens)):
            raise RawError(f"{path}: {side}.tokens must hold one string per token id ({len(ids)})")
        if s.get("text") is not None and not isinstance(s["text"], str):
            raise RawError(f"{path}: {side}.text must be a string")
        n_tokens[side], token_ids[side] = len(ids), ids
        acts = s.get("activations") or {}
        if not isinstance(acts, dict):
            raise RawError(f"{path}: {side}.activations must be a dict of layer -> component -> tensor")
        for layer, by_comp in acts.items():
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < limit:
                raise RawError(f"{path}: {side}.activations has layer key {layer!r}, not a layer of the model "
                               f"(0..{limit - 1})"[:300])
            if not isinstance(by_comp, dict):
                raise RawError(f"{path}: {side}.activations[{layer}] must be a dict of component -> tensor")
            for comp, t in by_comp.items():
                where = f"{path}: {side} layer {layer} {str(comp)[:40]!r}"
                if not isinstance(comp, str) or not isinstance(t, torch.Tensor):
                    raise RawError(f"{where}: expected a component name holding a tensor")
                if t.ndim != 2 or not t.dtype.is_floating_point:
                    raise RawError(f"{where}: expected a float tensor [n_tokens, hidden], got {t.dtype} "
                                   f"{tuple(t.shape)}")
                if t.shape[0] != len(ids):
                    raise RawError(f"{where}: {t.shape[0]} rows for {len(ids)} token ids")
                if hidden is None:
                    hidden = int(t.shape[1])
                elif t.shape[1] != hidden:
                    what = "the model's hidden size" if hidden_size is not None else "other tensors"
                    raise RawError(f"{where}: hidden size {t.shape[1]}, {what} {hidden}; were these captured "
                                   f"from different models?")
                comps.setdefault(layer, set()).add(comp)
    if not comps or hidden is None:
        raise RawError(f"{path}: holds no activations")
    meta_layers = meta.get("n_layers") if isinstance(meta, dict) else None
    return RawRecord(Path(path), data, {l: frozenset(c) for l, c in comps.items()}, int(hidden), n_tokens, token_ids,
                     meta_layers if isinstance(meta_layers, int) and not isinstance(meta_layers, bool) else None)


def read_raw(path: str | Path, hidden_size: int | None = None, n_layers: int | None = None) -> RawRecord:
    """Load (memory-mapped, weights_only) and validate one raw .pt; no activation values are read here."""
    try:
        data = load_pt(path)
    except StorageError as e:
        raise RawError(str(e).strip().splitlines()[0]) from e
    return validate_raw(data, path, hidden_size, n_layers)


def check_finite(path: str | Path, what: str, t: torch.Tensor) -> torch.Tensor:
    """`t` when every value is finite; else RawError naming the file (NaN would reach the JSON writers)."""
    if not bool(torch.isfinite(t).all()):
        raise RawError(f"{path}: {what} holds NaN or infinite values")
    return t


def build_raw(data: dict, acts: dict[int, dict[str, torch.Tensor]], tokens: list[str], response_only: bool,
              metadata: dict) -> dict:
    """Split one sequence's activations at prompt_end into the .pt dict above.

    `data` is its response record (token_ids, prompt_end, prompt, response); `tokens` one string per id; every
    tensor stored owns its storage (torch.save writes a view's whole storage).
    """
    ids: list[int] = data["token_ids"]
    end: int = data["prompt_end"]

    def side(lo: int, hi: int, keep: bool) -> dict[int, dict[str, torch.Tensor]]:
        if not keep:
            return {}
        return {layer: {c: t[lo:hi].clone() for c, t in comps.items()} for layer, comps in acts.items()}

    return {
        "prompt": {"text": data.get("prompt") or "", "tokens": tokens[:end], "token_ids": ids[:end],
                   "activations": side(0, end, not response_only)},
        "response": {"text": data.get("response") or "", "tokens": tokens[end:], "token_ids": ids[end:],
                     "activations": side(end, len(ids), True)},
        "metadata": metadata,
    }


def write_raw(path: str | Path, record: dict) -> int:
    """Write one raw record atomically; returns the file size."""
    return write_pt(path, record)
