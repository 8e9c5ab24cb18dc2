"""Massive-dims calibration (inference/{variant}/massive_activations/calibration.json): read and write.

    Calibration                                  the typed record (frozen): path, source, top_dims_by_layer; .dims
    read_calibration(path, source) -> Calibration     validated: layer keys, non-negative int dims; CalibrationError
    load_calibration(exp, variant) -> Calibration | None   the variant's file, else the experiment-wide one
    write_calibration(exp, variant, stats, n_prompts, prompt_sets, computed_by) -> Calibration
                                                 calibration.json from core.projection.MassiveDimStats, atomically
    CALIBRATION_TOP_K                            dims kept per layer
    CalibrationError                             a malformed calibration file (names it)
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from core.errors import TraitError
from core.projection import MassiveDimStats
from utils import paths
from utils.config import resolve_variant
from utils.storage import StorageError, read_json, write_json

CALIBRATION_TOP_K = 5
MAX_DIM = 1 << 24                      # no hidden size is larger: a bigger dim is a corrupted file


class CalibrationError(TraitError):
    """A calibration.json that does not have the documented shape; the message names it."""


@dataclass(frozen=True)
class Calibration:
    path: Path
    source: str                                    # "variant" | "experiment" | "computed"
    top_dims_by_layer: Mapping[str, list[int]] = field(default_factory=dict)

    @property
    def dims(self) -> list[int]:
        return sorted({d for dims in self.top_dims_by_layer.values() for d in dims})

    def dims_below(self, hidden_size: int) -> list[int]:
        """The calibrated dims that exist in a model of this hidden size."""
        return [d for d in self.dims if d < hidden_size]


def read_calibration(path: str | Path, source: str = "variant") -> Calibration:
    path = Path(path)
    try:
        data = read_json(path)
    except StorageError as e:
        raise CalibrationError(str(e)) from e
    agg = data.get("aggregate", data) if isinstance(data, dict) else None
    top = agg.get("top_dims_by_layer") if isinstance(agg, dict) else None
    if not isinstance(top, dict):
        raise CalibrationError(f"{path}: expected aggregate.top_dims_by_layer, an object of layer -> [dim, ...]")
    for layer, dims in top.items():
        if not layer.isdigit() or not isinstance(dims, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in dims):
            raise CalibrationError(f"{path}: aggregate.top_dims_by_layer[{layer[:40]!r}] must be a list of "
                                   f"non-negative dims of a layer number")
    return Calibration(path, source, {str(k): list(v) for k, v in top.items()})


def load_calibration(exp: str, variant: str) -> Calibration | None:
    """The variant's calibration.json, else the experiment-wide one (where trait-interp looked), else None."""
    for path, source in ((paths.calibration_file(exp, variant), "variant"), (paths.calibration_file(exp), "experiment")):
        if path.exists():
            return read_calibration(path, source)
    return None


def write_calibration(exp: str, variant: str, stats: MassiveDimStats, n_prompts: int, prompt_sets: Sequence[str],
                      computed_by: str) -> Calibration:
    """calibration.json from accumulated statistics (docs/formats.md), written atomically to the variant's path."""
    agg = stats.aggregate()
    out = {
        "experiment": exp, "model_variant": variant, "model": resolve_variant(exp, variant).model,
        "prompt_set": "calibration", "is_calibration": True, "computed_by": computed_by,
        "computed_from": {"prompt_sets": list(prompt_sets), "component": "residual",
                          "tokens": "response (prompt when a response is empty)"},
        "date": _dt.datetime.now().isoformat(),
        "aggregate": {"n_prompts": n_prompts, "top_k": stats.top_k, **agg},
    }
    path = paths.calibration_file(exp, variant)
    write_json(path, out, indent=1)
    return Calibration(path, "computed", agg["top_dims_by_layer"])
