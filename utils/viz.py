"""Attention and logit-lens JSONs (analysis/per_token/{set}/{id}_attention.json, {id}_logit_lens.json).

    viz_file(folder, prompt_id, kind) -> Path         kind: "attention" | "logit_lens"
    read_attention(path, n_tokens=None) -> VizFile    validated: header, layers in range, per token one list of
                                                      head rows per layer, each a finite probability per position
    read_logit_lens(path, n_tokens=None) -> VizFile   validated: per token but the last, per layer top_k entries
                                                      {token: str, prob: finite}, actual_rank, actual_prob
    read_viz(path, kind, n_tokens=None) -> VizFile    whichever of the two `kind` names
    write_viz(path, record, kind) -> bytes            validate, then write atomically (utils/storage.py)
    VizFile                                           the typed record (frozen): path, kind, header fields, data
    VizError                                          a malformed file (names it and what is wrong)

Formats: docs/formats.md ("Attention and logit lens").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.errors import TraitError
from utils.layers import MAX_LAYERS
from utils.storage import StorageError, read_json, write_json

KINDS = ("attention", "logit_lens")


@dataclass(frozen=True)
class VizFile:
    """One attention or logit-lens file: its header fields typed, the rows in `data` (checked, as stored)."""

    path: Path
    kind: str
    n_layers: int
    data: Mapping[str, Any] = field(repr=False)      # the whole record as stored
    tokens: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    model_variant: str | None = None

    @property
    def rows(self) -> list:
        """attention: one entry per token; logit lens: one prediction per token but the last."""
        return self.data["attention" if self.kind == "attention" else "predictions"]


class VizError(TraitError):
    """An attention / logit-lens JSON that does not have the documented shape; the message names it."""


def viz_file(folder: Path, prompt_id: str, kind: str) -> Path:
    return Path(folder) / f"{prompt_id}_{kind}.json"


def _int(x: Any, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x < hi)


def _prob(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _header(d: Any, where: str, n_tokens: int | None) -> tuple[int, list[str], list[int]]:
    if not isinstance(d, dict):
        raise VizError(f"{where}: expected a JSON object")
    n_layers, tokens, layers = d.get("n_layers"), d.get("tokens"), d.get("layers")
    if not _int(n_layers, 1, MAX_LAYERS):
        raise VizError(f"{where}: 'n_layers' must be a positive int, got {str(n_layers)[:40]}")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise VizError(f"{where}: 'tokens' must be a list of strings")
    if n_tokens is not None and len(tokens) != n_tokens:
        raise VizError(f"{where}: {len(tokens)} tokens, expected {n_tokens}")
    if layers is None:
        layers = list(range(n_layers))
    if not isinstance(layers, list) or not all(_int(x, 0, n_layers) for x in layers):
        raise VizError(f"{where}: 'layers' must list layers of the model (0..{n_layers - 1})")
    if d.get("model_variant") is not None and not isinstance(d["model_variant"], str):
        raise VizError(f"{where}: 'model_variant' must be a string")
    if d.get("n_prompt_tokens") is not None and not _int(d["n_prompt_tokens"], 0, len(tokens) + 1):
        raise VizError(f"{where}: 'n_prompt_tokens' is not within the {len(tokens)} tokens")
    return n_layers, tokens, layers


def _check_attention(d: dict, where: str, n_layers: int, tokens: list[str], layers: list[int]) -> None:
    rows = d.get("attention")
    if not isinstance(rows, list) or len(rows) != len(tokens):
        raise VizError(f"{where}: 'attention' must hold one entry per token ({len(tokens)})")
    for i, row in enumerate(rows):
        by_layer = row.get("by_layer") if isinstance(row, dict) else None
        if not isinstance(by_layer, list) or len(by_layer) not in (n_layers, len(layers)):
            raise VizError(f"{where}: attention[{i}].by_layer must hold one list per layer ({n_layers})")
        for L, heads in enumerate(by_layer):
            if not isinstance(heads, list) or not all(
                    isinstance(h, list) and 0 < len(h) <= i + 1 and all(_prob(x) for x in h) for h in heads):
                raise VizError(f"{where}: attention[{i}].by_layer[{L}] must be head rows of finite weights over "
                               f"at most {i + 1} positions")
            if heads and len({len(h) for h in heads}) != 1:
                raise VizError(f"{where}: attention[{i}].by_layer[{L}]: head rows of different lengths")


def _check_lens(d: dict, where: str, n_layers: int, tokens: list[str]) -> None:
    preds = d.get("predictions")
    if not isinstance(preds, list) or len(preds) != max(len(tokens) - 1, 0):
        raise VizError(f"{where}: 'predictions' must hold one entry per token but the last ({len(tokens) - 1})")
    if not _int(d.get("top_k", 1), 0):
        raise VizError(f"{where}: 'top_k' must be a non-negative int")
    for i, p in enumerate(preds):
        by_layer = p.get("by_layer") if isinstance(p, dict) else None
        if not isinstance(by_layer, list) or not by_layer:
            raise VizError(f"{where}: predictions[{i}].by_layer must be a non-empty list")
        for e in by_layer:
            ok = isinstance(e, dict) and _int(e.get("layer"), 0, n_layers) and isinstance(e.get("top_k", []), list)
            ok = ok and all(isinstance(c, dict) and isinstance(c.get("token"), str) and _prob(c.get("prob"))
                            for c in e.get("top_k", []))
            ok = ok and (e.get("actual_rank") is None or _int(e["actual_rank"], 0))
            ok = ok and (e.get("actual_prob") is None or _prob(e["actual_prob"]))
            if not ok:
                raise VizError(f"{where}: predictions[{i}].by_layer has an entry that is not {{layer, top_k: "
                               f"[{{token, prob}}], actual_rank, actual_prob}} with finite numbers")


def parse_viz(d: Any, where: str | Path, kind: str, n_tokens: int | None = None) -> VizFile:
    if kind not in KINDS:
        raise VizError(f"unknown visualisation kind {kind!r} (choose from {', '.join(KINDS)})")
    where = str(where)
    n_layers, tokens, layers = _header(d, where, n_tokens)
    if kind == "attention":
        _check_attention(d, where, n_layers, tokens, layers)
    else:
        _check_lens(d, where, n_layers, tokens)
    return VizFile(Path(where), kind, n_layers, d, tuple(tokens), tuple(layers), d.get("model_variant"))


def read_viz(path: str | Path, kind: str, n_tokens: int | None = None) -> VizFile:
    try:
        data = read_json(path)
    except StorageError as e:
        raise VizError(str(e)) from e
    return parse_viz(data, path, kind, n_tokens)


def read_attention(path: str | Path, n_tokens: int | None = None) -> VizFile:
    return read_viz(path, "attention", n_tokens)


def read_logit_lens(path: str | Path, n_tokens: int | None = None) -> VizFile:
    return read_viz(path, "logit_lens", n_tokens)


def write_viz(path: str | Path, record: dict, kind: str) -> int:
    """Validate `record` as `kind`, then write it atomically; returns the bytes written."""
    parse_viz(record, path, kind)
    return write_json(path, record)
