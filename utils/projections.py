"""Projection JSONs (docs/formats.md): the one module that reads and writes them.

    read_projection(path, n_prompt=, n_response=, n_layers=) -> Projection   validated (types, lengths, finite
                                          numbers, layer range); the multi-vector format or trait-interp's legacy
                                          single-vector one; ProjectionError names the file and the problem
    validate_projection(obj, where) -> obj       the same checks on a record about to be written
    write_projection(path, record) -> bytes      validate, then write atomically (utils/storage.py)
    list_projection_files(exp, variant, trait, prompt_set) -> {prompt id: Path}   natural id order
    list_projected_traits(exp, variant, prompt_set) -> [trait]   every category/name with files for the set
    selection_note(existing, layers_spec, multi_vector) -> str | None   existing files chosen by another rule
    Projection / ProjectionEntry                 the typed record (frozen)
    ProjectionError                              a malformed projection JSON (names it)

Example:

    proj = read_projection(paths.projection_file(exp, "instruct", "behavioral/refusal", "harmful", "3"))
    proj.entries[0].layer, proj.entries[0].response     # the first vector's layer and per-token scores
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.errors import TraitError
from utils import paths
from utils.layers import MAX_LAYERS
from utils.storage import StorageError, read_json, write_json

SIDES = ("prompt", "response")


class ProjectionError(TraitError):
    """A projection JSON (or a record about to be written) that does not have the documented shape."""


@dataclass(frozen=True)
class ProjectionEntry:
    """One vector's scores for one prompt."""

    layer: int
    method: str | None
    prompt: tuple[float, ...]             # () when the prompt side was not captured
    response: tuple[float, ...]
    baseline: float | None = None
    position: str | None = None
    component: str | None = None
    selection_source: str | None = None
    token_norms: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)   # the entry as stored

    def get(self, key: str, default: Any = None) -> Any:
        """The stored entry's key (for keys without a field here, e.g. selected_by)."""
        return getattr(self, key) if key in _ENTRY_FIELDS else self.raw.get(key, default)


_ENTRY_FIELDS = ("layer", "method", "prompt", "response", "baseline", "position", "component", "selection_source",
                 "token_norms")


@dataclass(frozen=True)
class Projection:
    """A projection JSON: metadata, one entry per vector, and the optional norm / massive-dim blocks."""

    path: Path
    metadata: Mapping[str, Any]
    entries: tuple[ProjectionEntry, ...]
    activation_norms: Mapping[str, Any] | None = None
    massive_dim_data: Mapping[str, Any] | None = None
    legacy: bool = False                  # trait-interp's single-vector file
    data: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)   # the whole file as stored

    @property
    def n_prompt_tokens(self) -> int | None:
        n = self.metadata.get("n_prompt_tokens")
        return n if _is_int(n) else None

    @property
    def n_response_tokens(self) -> int:
        return len(self.entries[0].response)

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.entries]

    def entry(self, layer: int, method: str | None = None) -> ProjectionEntry | None:
        """The first entry at `layer` (and `method`, when given), else None."""
        return next((e for e in self.entries if e.layer == layer and (method is None or e.method == method)), None)

    def vector_info(self, k: int) -> Mapping[str, Any]:
        """metadata.vectors[k] (path, sha256, baseline, selection ...) when the file has it, else {}."""
        vecs = self.metadata.get("vectors")
        return vecs[k] if isinstance(vecs, list) and k < len(vecs) and isinstance(vecs[k], dict) else {}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scores(values: Any, where: str, what: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(_is_number(x) for x in values):
        raise ProjectionError(f"{where}: {what} must be a list of finite numbers")
    return tuple(float(x) for x in values)


def _optional_str(d: Mapping, key: str, where: str, what: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise ProjectionError(f"{where}: {what}.{key} must be a string, got {type(v).__name__}")
    return v


def _entry(e: Any, k: int, where: str, n_layers: int | None) -> ProjectionEntry:
    if not isinstance(e, dict):
        raise ProjectionError(f"{where}: projections[{k}] must be an object, got {type(e).__name__}")
    layer = e.get("layer")
    limit = n_layers if n_layers is not None else MAX_LAYERS
    if not _is_int(layer) or not 0 <= layer < limit:
        raise ProjectionError(f"{where}: projections[{k}].layer {layer!r} is not a layer of the model "
                              f"(0..{limit - 1})")
    what = f"projections[{k}] (layer {layer})"
    response = _scores(e.get("response"), where, f"{what}.response")
    prompt = _scores(e.get("prompt") if e.get("prompt") is not None else [], where, f"{what}.prompt")
    baseline = e.get("baseline")
    if baseline is not None and not _is_number(baseline):
        raise ProjectionError(f"{where}: {what}.baseline must be a finite number or null, got {baseline!r}")
    norms = e.get("token_norms")
    if norms is not None and not isinstance(norms, dict):
        raise ProjectionError(f"{where}: {what}.token_norms must be an object with prompt / response lists")
    token_norms = {s: _scores(norms[s], where, f"{what}.token_norms.{s}") for s in SIDES if s in (norms or {})}
    return ProjectionEntry(layer, _optional_str(e, "method", where, what), prompt, response,
                           None if baseline is None else float(baseline), _optional_str(e, "position", where, what),
                           _optional_str(e, "component", where, what),
                           _optional_str(e, "selection_source", where, what), token_norms, e)


def _check_lengths(proj: Projection, where: str, n_prompt: int | None, n_response: int | None) -> None:
    meta = proj.metadata
    want_r = n_response if n_response is not None else (
        meta.get("n_response_tokens") if _is_int(meta.get("n_response_tokens")) else None)
    want_p = n_prompt if n_prompt is not None else proj.n_prompt_tokens
    for e in proj.entries:
        if want_r is not None and len(e.response) != want_r:
            raise ProjectionError(f"{where}: {len(e.response)} response scores at layer {e.layer} but the response "
                                  f"has {want_r} tokens; re-project this prompt")
        if want_r is None and len(e.response) != len(proj.entries[0].response):
            raise ProjectionError(f"{where}: its entries hold different numbers of response scores")
        if want_p is not None and len(e.prompt) not in (0, want_p):
            raise ProjectionError(f"{where}: {len(e.prompt)} prompt scores at layer {e.layer} but the prompt has "
                                  f"{want_p} tokens; re-project this prompt")
        for side, values in e.token_norms.items():
            want = len(e.response) if side == "response" else len(e.prompt)
            if len(values) not in (0, want):
                raise ProjectionError(f"{where}: token_norms.{side} at layer {e.layer} has {len(values)} values "
                                      f"for {want} scores")


def _massive(obj: Any, where: str) -> Mapping[str, Any] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ProjectionError(f"{where}: massive_dim_data must be an object")
    dims = obj.get("dims", [])
    if not isinstance(dims, list) or not all(_is_int(d) and d >= 0 for d in dims):
        raise ProjectionError(f"{where}: massive_dim_data.dims must be a list of non-negative ints")
    values = obj.get("activation_values", {})
    if not isinstance(values, dict):
        raise ProjectionError(f"{where}: massive_dim_data.activation_values must be an object")
    for side, by_dim in values.items():
        if not isinstance(by_dim, dict):
            raise ProjectionError(f"{where}: massive_dim_data.activation_values.{side} must be an object")
        for d, vs in by_dim.items():
            _scores(vs, where, f"massive_dim_data.activation_values.{side}.{d}")
    return obj


def _norms_block(obj: Any, where: str) -> Mapping[str, Any] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ProjectionError(f"{where}: activation_norms must be an object")
    for side in SIDES:
        if side in obj:
            _scores(obj[side], where, f"activation_norms.{side}")
    return obj


def parse_projection(data: Any, where: str | Path, n_prompt: int | None = None, n_response: int | None = None,
                     n_layers: int | None = None) -> Projection:
    """The typed record of a parsed projection JSON; ProjectionError names `where` and the first problem."""
    where = str(where)
    if not isinstance(data, dict) or "projections" not in data:
        raise ProjectionError(f"{where}: not a projection JSON (expected an object with 'projections')")
    meta = data.get("metadata", {})
    if not isinstance(meta, dict):
        raise ProjectionError(f"{where}: 'metadata' must be an object")
    for key, kind in (("centered", bool), ("vectors", list), ("prompt_set", str), ("n_prompt_tokens", int),
                      ("n_response_tokens", int)):
        if meta.get(key) is not None and (not isinstance(meta[key], kind) or (kind is int and (
                isinstance(meta[key], bool) or meta[key] < 0))):
            raise ProjectionError(f"{where}: metadata.{key} must be {'a non-negative int' if kind is int else kind.__name__}, "
                                  f"got {meta[key]!r}"[:300])
    entries, legacy = data["projections"], False
    if isinstance(entries, dict):  # trait-interp's legacy file: one vector, its layer and method in metadata
        src = meta.get("vector_source") if isinstance(meta.get("vector_source"), dict) else {}
        layer = meta.get("layer", src.get("layer"))
        entries = [{**entries, "layer": layer, "method": meta.get("method", src.get("method"))}]
        legacy = True
    if not isinstance(entries, list) or not entries:
        raise ProjectionError(f"{where}: 'projections' must be a non-empty list")
    proj = Projection(Path(where), meta, tuple(_entry(e, k, where, n_layers) for k, e in enumerate(entries)),
                      _norms_block(data.get("activation_norms"), where), _massive(data.get("massive_dim_data"), where),
                      legacy, data)
    _check_lengths(proj, where, n_prompt, n_response)
    return proj


def read_projection(path: str | Path, n_prompt: int | None = None, n_response: int | None = None,
                    n_layers: int | None = None) -> Projection:
    """Read and validate one projection JSON. `n_prompt` / `n_response`: the token counts its scores must have
    (default: the file's own metadata); `n_layers`: the model's depth, when known."""
    try:
        data = read_json(path)
    except StorageError as e:
        raise ProjectionError(str(e)) from e
    return parse_projection(data, path, n_prompt, n_response, n_layers)


def validate_projection(obj: dict, where: str | Path) -> dict:
    """`obj` if it is a well-formed projection record (the checks read_projection makes), else ProjectionError."""
    parse_projection(obj, where)
    return obj


def write_projection(path: str | Path, record: dict) -> int:
    """Validate `record`, then write it atomically; returns the bytes written. A bad record writes nothing."""
    validate_projection(record, path)
    return write_json(path, record)


def selection_note(existing: list[Path], layers_spec: str | None, multi_vector: int | None) -> str | None:
    """When existing projection files were chosen by another rule (--layers / --multi-vector) than this run's,
    say so (a guarded rerun then names what it would mix into the set)."""
    for path in existing:
        try:
            meta = read_projection(path).metadata
        except ProjectionError:
            continue
        old_spec, old_multi = meta.get("layers_spec"), meta.get("multi_vector_n")
        if (old_spec, old_multi) != (layers_spec, multi_vector) and ("layers_spec" in meta or "multi_vector_n" in meta):
            old = f"--multi-vector {old_multi}" if old_multi else f"--layers {old_spec}"
            new = f"--multi-vector {multi_vector}" if multi_vector else f"--layers {layers_spec}"
            return (f"{path} was projected with {old}, this run asks for {new}: the set would mix two selection "
                    f"rules")
    return None


def list_projection_files(exp: str, variant: str, trait: str, prompt_set: str) -> dict[str, Path]:
    """{prompt id: file} of one trait and set, in natural id order (hidden temp files left out)."""
    return paths.files_by_id(paths.projection_dir(exp, variant, trait, prompt_set), ".json")


def list_projected_traits(exp: str, variant: str, prompt_set: str) -> list[str]:
    """Every category/name with at least one projection JSON of `prompt_set` for `variant`."""
    root = paths.inference_dir(exp, variant) / "projections"
    if not root.is_dir():
        return []
    return sorted(f"{c.name}/{t.name}" for c in root.iterdir() if c.is_dir() for t in c.iterdir()
                  if t.is_dir() and paths.projection_dir(exp, variant, f"{c.name}/{t.name}", prompt_set).is_dir())
