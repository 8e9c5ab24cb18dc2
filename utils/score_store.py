"""The score store (docs/formats.md): every per-token score of an experiment as Parquet, queried with DuckDB.

    store_dir(exp)                        experiments/{exp}/analysis/scores/
    TOKEN_COLUMNS, PROMPT_COLUMNS         the two tables' columns (tokens/: one row per scored token; prompts/: one row
                                          per scored side of a response, with its aggregates)
    update_store(exp, variants=None, prompt_sets=None, traits=None, rebuild=False, progress=False) -> dict
                                          index what is new or changed since the last run (a rerun equals a rebuild)
    read_manifest(exp, sources=False) -> dict   which part files make up the store (manifest.json); with sources,
                                          what each indexed source was (sources.json)
    part_files(exp, table, traits=..., variants=..., prompt_sets=...) -> [Path]   the Parquet files of `tokens` or
                                          `prompts` that the manifest lists, filtered (one group per file)
    connect(exp) -> duckdb connection     views `tokens` and `prompts` over the part files (in memory, no server)
    parquet_source(files) -> str          `read_parquet([...])` for SQL over some part files
    read_table(exp, table) -> pyarrow.Table   one whole table (tests, small stores)
    StoreError                            bad input; the message names the file or flag

Sources, per (variant, prompt set, trait, prompt id): the projection JSON, the variant's response JSON (tokens,
ids, prompt_end) and, where per_token_diff wrote one, model_diff/{A}_vs_{variant}/per_token_diff/{trait}/{set}/
{id}.json (its per_token_delta fills `delta` on the response rows of the vector it used). A source is indexed again
when the size or mtime of any of its files changed; a part whose sources changed or vanished is rewritten without
them. Parts are written atomically and the manifest last, so a killed run leaves the previous store readable.

    summary = update_store("demo")            # then: python analysis/spans.py --experiment demo
    con = connect("demo")
    con.sql("SELECT trait, max(score) FROM tokens GROUP BY trait").fetchall()
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from core.aggregates import EMA_ALPHA, response_aggregates
from core.clauses import clause_ids
from core.errors import TraitError
from utils import paths
from utils.model_diff import CompareError, read_per_token_diff
from utils.projections import ProjectionError, read_projection
from utils.responses import ResponseError, load_response
from utils.storage import StorageError, atomic_write, read_json, write_json

FORMAT = "trait-inference score store"
VERSION = 1
SIDES = ("prompt", "response")
KEY_COLUMNS = ("variant", "prompt_set", "prompt_id", "trait", "layer", "method", "vector", "side")
TOKEN_COLUMNS = KEY_COLUMNS + ("position", "token_index", "token_id", "token", "score", "delta", "clause")
PROMPT_COLUMNS = KEY_COLUMNS + ("n_tokens", "mean", "max", "ema_max", "frac_above", "threshold", "baseline",
                                "centered", "m2", "max_position", "max_token_index", "delta_mean", "delta_against")
ROWS_PER_PART = 1_000_000   # a part is flushed past this many token rows (bounded memory at any scale)


class StoreError(TraitError):
    """Bad input for the score store; the message names the file or flag."""


def store_dir(exp: str) -> Path:
    return paths.experiment_dir(exp) / "analysis" / "scores"


def manifest_file(exp: str) -> Path:
    return store_dir(exp) / "manifest.json"


def sources_file(exp: str) -> Path:
    return store_dir(exp) / "sources.json"


# ---------------------------------------------------------------------------------------------------------
# Schema

def _schemas():
    import pyarrow as pa

    dstr = pa.dictionary(pa.int32(), pa.string())
    key = [("variant", dstr), ("prompt_set", dstr), ("prompt_id", dstr), ("trait", dstr), ("layer", pa.int32()),
           ("method", dstr), ("vector", pa.int32()), ("side", dstr)]
    tokens = pa.schema(key + [("position", pa.int32()), ("token_index", pa.int32()), ("token_id", pa.int32()),
                              ("token", dstr), ("score", pa.float64()), ("delta", pa.float64()),
                              ("clause", pa.int32())])
    f8 = pa.float64()
    prompts = pa.schema(key + [("n_tokens", pa.int32()), ("mean", f8), ("max", f8), ("ema_max", f8),
                               ("frac_above", f8), ("threshold", f8), ("baseline", f8), ("centered", pa.bool_()),
                               ("m2", f8), ("max_position", pa.int32()), ("max_token_index", pa.int32()),
                               ("delta_mean", f8), ("delta_against", dstr)])
    return tokens, prompts


# ---------------------------------------------------------------------------------------------------------
# Sources

@dataclass(frozen=True)
class Group:
    """One (variant, prompt set, trait): a folder of projection JSONs, indexed into parts of its own."""
    variant: str
    prompt_set: str
    trait: str

    def key(self) -> str:
        return "\t".join((self.variant, self.prompt_set, self.trait))


@dataclass
class Source:
    prompt_id: str
    projection: Path
    response: Path
    diff: Path | None
    diff_against: str | None

    def signature(self) -> list:
        out = []
        for p in (self.projection, self.response, self.diff):
            if p is None:
                out.append(None)
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                out.append(None)
                continue
            out.append([st.st_size, st.st_mtime_ns])
        return out + [self.diff_against]


def _json_folders(root: Path) -> list[str]:
    """Every folder under `root` that directly holds JSON files, relative and in sorted order."""
    if not root.is_dir():
        return []
    found = set()
    for dirpath, _, files in os.walk(root):
        if any(f.endswith(".json") and not f.startswith(".") for f in files):
            found.add(Path(dirpath).relative_to(root).as_posix())
    return sorted(found)


def find_groups(exp: str, variants: Sequence[str] | None = None, prompt_sets: Sequence[str] | None = None,
                traits: Sequence[str] | None = None) -> list[Group]:
    """Every (variant, set, trait) with projection JSONs, filtered; traits are `category/name` (two folders)."""
    inf = paths.experiment_dir(exp) / "inference"
    out = []
    names = sorted(p.name for p in inf.iterdir() if (p / "projections").is_dir()) if inf.is_dir() else []
    for variant in names:
        if variants and variant not in variants:
            continue
        root = inf / variant / "projections"
        for rel in _json_folders(root):
            parts = rel.split("/")
            if len(parts) < 3:
                continue
            trait, pset = "/".join(parts[:2]), "/".join(parts[2:])
            if (traits and trait not in traits) or (prompt_sets and pset not in prompt_sets):
                continue
            out.append(Group(variant, pset, trait))
    return out


def _diff_folders(exp: str, group: Group) -> list[tuple[str, Path]]:
    """(variant A, per_token_diff folder) of every model diff whose B is this group's variant, sorted by A."""
    root = paths.experiment_dir(exp) / "model_diff"
    suffix = f"_vs_{group.variant}"
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.endswith(suffix) and len(d.name) > len(suffix):
            folder = d / "per_token_diff" / group.trait / group.prompt_set
            if folder.is_dir():
                out.append((d.name[:-len(suffix)], folder))
    return out


def group_sources(exp: str, group: Group) -> dict[str, Source]:
    """{prompt id: its files} of one group, in natural id order; the first model diff (sorted by A) gives deltas."""
    files = paths.files_by_id(paths.projection_dir(exp, group.variant, group.trait, group.prompt_set), ".json")
    diffs = [(a, paths.files_by_id(folder, ".json")) for a, folder in _diff_folders(exp, group)]
    out = {}
    for pid, path in files.items():
        against = next(((a, f[pid]) for a, f in diffs if pid in f), (None, None))
        out[pid] = Source(pid, path, paths.response_file(exp, group.variant, group.prompt_set, pid), against[1],
                          against[0])
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading one source (format owners: utils/responses.py, utils/projections.py, utils/model_diff.py)

def read_projection_entries(path: Path) -> tuple[dict, list[dict]]:
    """A projection JSON's metadata and vector entries, read and validated by utils/projections.py (multi-vector
    format; trait-interp's single-vector one too)."""
    try:
        proj = read_projection(path)
    except ProjectionError as e:
        raise StoreError(str(e)) from e
    return dict(proj.metadata), [{**e.raw, "layer": e.layer, "method": e.method, "prompt": list(e.prompt),
                                  "response": list(e.response)} for e in proj.entries]


def _read_delta(path: Path) -> dict:
    """A per_token_diff file, read and validated by utils/model_diff.py."""
    try:
        return dict(read_per_token_diff(path))
    except CompareError as e:
        raise StoreError(str(e)) from e


# ---------------------------------------------------------------------------------------------------------
# Building parts

@dataclass
class _Tokens:
    """One prompt's tokens as the variant scored them (its response JSON), read once for all its traits."""
    path: Path
    end: int
    ids: dict[str, Any]            # side -> int32 array
    tokens: dict[str, list[str]]   # side -> strings
    clause: dict[str, Any]         # side -> int32 array, -1 for whitespace-only spans

    @classmethod
    def read(cls, src: "Source") -> "_Tokens":
        import numpy as np

        try:
            resp = load_response(src.response)
        except ResponseError as e:
            raise StoreError(f"{e} (the tokens of {src.projection})") from e
        ids, end, tokens = resp["token_ids"], resp["prompt_end"], resp.get("tokens")
        if not isinstance(tokens, list) or len(tokens) != len(ids):
            raise StoreError(f"{src.response}: 'tokens' must hold one string per token id ({len(ids)})")
        sides = {"prompt": slice(0, end), "response": slice(end, len(ids))}
        toks = {side: [str(t) for t in tokens[sl]] for side, sl in sides.items()}
        return cls(src.response, end, {side: np.asarray(ids[sl], dtype=np.int32) for side, sl in sides.items()}, toks,
                   {side: np.asarray([-1 if c is None else c for c in clause_ids(t)], dtype=np.int32)
                    for side, t in toks.items()})


def _scores(values: Any, path: Path, layer: int, side: str):
    """A JSON list of numbers as a float64 array (exactly the JSON's values); anything else names the file."""
    import numpy as np

    if not isinstance(values, list) or any(isinstance(x, bool) for x in values):
        raise StoreError(f"{path}: the {side} scores at layer {layer} must be a list of numbers")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise StoreError(f"{path}: the {side} scores at layer {layer} must be a list of numbers") from None
    if arr.ndim != 1:
        raise StoreError(f"{path}: the {side} scores at layer {layer} must be a flat list of numbers")
    return arr


class _Columns:
    """Columns of one part under construction: key columns kept as runs (value, length), the rest as arrays."""

    def __init__(self):
        self.run_keys: list[tuple] = []
        self.run_len: list[int] = []
        self.run_offset: list[int] = []
        self.run_max: list[float] = []
        self.token_id: list = []
        self.token: list[list[str]] = []
        self.score: list = []
        self.delta: list = []
        self.clause: list = []
        self.prompt_rows: list[dict] = []
        self.prompt_ids: list[str] = []
        self.n_rows = 0

    def add_source(self, group: Group, src: Source, toks: _Tokens) -> None:
        import numpy as np

        meta, entries = read_projection_entries(src.projection)
        diff = _read_delta(src.diff) if src.diff is not None else None
        n_resp = len(toks.tokens["response"])
        if diff is not None and len(diff["per_token_delta"]) != n_resp:
            raise StoreError(f"{src.diff}: {len(diff['per_token_delta'])} deltas but {src.response} has {n_resp} "
                             f"response tokens")
        offset = {"prompt": 0, "response": toks.end}
        centered = bool(meta.get("centered"))
        for k, e in enumerate(entries):
            layer, method = int(e["layer"]), str(e.get("method"))
            baseline = e.get("baseline")
            baseline = float(baseline) if isinstance(baseline, (int, float)) and not isinstance(baseline, bool) else None
            threshold = 0.0 if centered else baseline
            for side in SIDES:
                values = e.get(side) or []
                if not values:
                    continue
                n = len(values)
                if n != len(toks.tokens[side]):
                    raise StoreError(f"{src.projection}: {n} {side} scores at layer {layer} but {src.response} has "
                                     f"{len(toks.tokens[side])} {side} tokens; re-project this prompt")
                arr = _scores(values, src.projection, layer, side)
                self.run_keys.append((group.variant, group.prompt_set, src.prompt_id, group.trait, layer, method, k,
                                      side))
                self.run_len.append(n)
                self.run_offset.append(offset[side])
                self.run_max.append(float(arr.max()))
                self.token_id.append(toks.ids[side])
                self.token.append(toks.tokens[side])
                self.score.append(arr)
                self.clause.append(toks.clause[side])
                deltas = None
                if (diff is not None and side == "response" and diff.get("layer") == layer
                        and diff.get("method") in (None, method)):
                    deltas = _scores(diff["per_token_delta"], src.diff, layer, side)
                self.delta.append(deltas if deltas is not None else np.full(n, np.nan))
                self.n_rows += n
                agg = response_aggregates(values, threshold)
                argmax = int(np.argmax(arr))
                self.prompt_rows.append({
                    "variant": group.variant, "prompt_set": group.prompt_set, "prompt_id": src.prompt_id,
                    "trait": group.trait, "layer": layer, "method": method, "vector": k, "side": side,
                    "n_tokens": n, "mean": agg["mean"], "max": agg["max"], "ema_max": agg["ema_max"],
                    "frac_above": agg["frac_above"], "threshold": threshold, "baseline": baseline,
                    "centered": centered, "m2": float(np.square(arr - agg["mean"]).sum()),
                    "max_position": argmax, "max_token_index": argmax + offset[side],
                    "delta_mean": float(deltas.mean()) if deltas is not None else None,
                    "delta_against": src.diff_against if deltas is not None else None,
                })
        self.prompt_ids.append(src.prompt_id)

    def tables(self):
        import numpy as np
        import pyarrow as pa

        tok_schema, prompt_schema = _schemas()
        # runs ordered by (vector, side, their max score, high first): with small row groups DuckDB's top-N skips
        # every row group whose max is below the k-th best found so far (a top-100 query reads a few row groups)
        order = sorted(range(len(self.run_keys)), key=lambda r: (self.run_keys[r][6], self.run_keys[r][7],
                                                                -self.run_max[r], r))
        for name in ("run_keys", "run_len", "run_offset", "run_max", "token_id", "token", "score", "delta", "clause"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in order])
        lens = np.asarray(self.run_len, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
        position = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(starts, lens)
        cols: dict[str, Any] = {}
        for j, name in enumerate(KEY_COLUMNS):
            values = [k[j] for k in self.run_keys]
            if name in ("layer", "vector"):
                cols[name] = pa.array(np.repeat(np.asarray(values, dtype=np.int32), lens), pa.int32())
            else:
                uniq = list(dict.fromkeys(values))
                code = {v: i for i, v in enumerate(uniq)}
                idx = np.repeat(np.asarray([code[v] for v in values], dtype=np.int32), lens)
                cols[name] = pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(uniq, pa.string()))
        cols["position"] = pa.array(position.astype(np.int32), pa.int32())
        cols["token_index"] = pa.array((position + np.repeat(np.asarray(self.run_offset, np.int64), lens))
                                       .astype(np.int32), pa.int32())
        cols["token_id"] = pa.array(np.concatenate(self.token_id), pa.int32())
        cols["token"] = pa.array([t for run in self.token for t in run], pa.string()).dictionary_encode()
        cols["score"] = pa.array(np.concatenate(self.score), pa.float64())
        delta = np.concatenate(self.delta)
        cols["delta"] = pa.array(delta, pa.float64(), mask=np.isnan(delta))
        clause = np.concatenate(self.clause)
        cols["clause"] = pa.array(clause, pa.int32(), mask=clause < 0)
        tokens = pa.table([cols[c] for c in TOKEN_COLUMNS], schema=tok_schema)
        prompts = pa.Table.from_pylist(self.prompt_rows, schema=prompt_schema)
        return tokens, prompts


def _write_parquet(table, path: Path) -> int:
    import pyarrow.parquet as pq

    # dictionaries only for the repeated strings and small integers; float columns byte-stream-split (an fp32
    # score held as float64 has four zero low bytes, which zstd then removes), never dictionary-encoded
    floats = [f.name for f in table.schema if f.type == "double"]
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=3, row_group_size=1 << 16,
                       use_dictionary=[f.name for f in table.schema if f.name not in floats],
                       use_byte_stream_split=floats)
        size = tmp.stat().st_size
    return size


# ---------------------------------------------------------------------------------------------------------
# The manifest and the update

def read_manifest(exp: str, sources: bool = False) -> dict:
    """manifest.json (the part files: small, read by every query); with `sources`, also `groups` from sources.json
    (each indexed prompt's part and file signature: read only by the update). A source whose part the manifest does
    not list (a run killed between the two writes) counts as not indexed."""
    path = manifest_file(exp)
    if not path.exists():
        return {"format": FORMAT, "version": VERSION, "experiment": exp, "parts": {}, "groups": {}}
    try:
        m = read_json(path)
        groups = read_json(sources_file(exp)) if sources and sources_file(exp).exists() else {}
    except StorageError as e:
        raise StoreError(f"{e}; index again with --rebuild") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise StoreError(f"{path}: not a version-{VERSION} score store manifest; index again with --rebuild")
    m["groups"] = {k: {pid: u for pid, u in units.items() if u.get("part") in m["parts"]}
                   for k, units in (groups.get("groups") or {}).items()} if sources else {}
    return m


def part_files(exp: str, table: str = "tokens", traits: Sequence[str] | None = None,
               variants: Sequence[str] | None = None, prompt_sets: Sequence[str] | None = None,
               manifest: dict | None = None) -> list[Path]:
    """The part files of `tokens` or `prompts` that the manifest lists (each holds one variant, set and trait, so a
    filter here spares DuckDB every other file), in name order."""
    if table not in ("tokens", "prompts"):
        raise ValueError(f"table {table!r}: tokens or prompts")
    parts = (manifest or read_manifest(exp))["parts"]
    return [store_dir(exp) / table / f"{name}.parquet" for name, info in sorted(parts.items())
            if (not traits or info["trait"] in traits) and (not variants or info["variant"] in variants)
            and (not prompt_sets or info["prompt_set"] in prompt_sets)]


def parquet_source(files: Sequence[Path]) -> str:
    """DuckDB's table function over these files (SQL text)."""
    return "read_parquet([" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "])"


def _new_part_name() -> str:
    return f"{_dt.datetime.now().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass
class _Update:
    exp: str
    manifest: dict
    progress: bool
    summary: dict = field(default_factory=lambda: {"prompts_indexed": 0, "prompts_removed": 0, "rows_added": 0,
                                                   "parts_written": 0, "parts_removed": 0, "bytes_written": 0})
    obsolete: list[str] = field(default_factory=list)
    new_parts: list[str] = field(default_factory=list)   # removed again when the run fails

    def write(self, group: Group, cols: _Columns) -> None:
        if not cols.prompt_ids:
            return
        tokens, prompts = cols.tables()
        name = _new_part_name()
        self.new_parts.append(name)
        root = store_dir(self.exp)
        self.summary["bytes_written"] += _write_parquet(tokens, root / "tokens" / f"{name}.parquet")
        self.summary["bytes_written"] += _write_parquet(prompts, root / "prompts" / f"{name}.parquet")
        self.manifest["parts"][name] = {"variant": group.variant, "prompt_set": group.prompt_set,
                                        "trait": group.trait, "rows": tokens.num_rows, "prompts": len(cols.prompt_ids)}
        units = self.manifest["groups"].setdefault(group.key(), {})
        self.summary["rows_added"] += tokens.num_rows
        self.summary["parts_written"] += 1
        for pid in cols.prompt_ids:
            units[pid]["part"] = name

    def drop(self, group: Group, part: str, pids: set[str]) -> None:
        """Rewrite `part` without `pids` (or drop it when nothing else is left)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        root = store_dir(self.exp)
        info = self.manifest["parts"].pop(part)
        self.obsolete.append(part)
        self.summary["parts_removed"] += 1
        keep = [pid for pid, u in self.manifest["groups"].get(group.key(), {}).items() if u.get("part") == part
                and pid not in pids]
        if not keep:
            return
        name = _new_part_name()
        self.new_parts.append(name)
        for table in ("tokens", "prompts"):
            t = pq.read_table(root / table / f"{part}.parquet")
            mask = pc.is_in(t["prompt_id"].cast(pa.string()), value_set=pa.array(keep, pa.string()))
            t = t.filter(mask)
            if table == "tokens":
                rows = t.num_rows
            self.summary["bytes_written"] += _write_parquet(t, root / table / f"{name}.parquet")
        self.manifest["parts"][name] = {**info, "rows": rows, "prompts": len(keep)}
        self.summary["parts_written"] += 1
        for pid in keep:
            self.manifest["groups"][group.key()][pid]["part"] = name


def update_store(exp: str, variants: Sequence[str] | None = None, prompt_sets: Sequence[str] | None = None,
                 traits: Sequence[str] | None = None, rebuild: bool = False, progress: bool = False) -> dict:
    """Index every projection JSON of the experiment (filtered by variant / set / trait) that is new or changed.

    With `rebuild` the store is deleted and written again from nothing. Returns a summary: groups, prompts (indexed
    in all), prompts_indexed / prompts_removed (this run), rows (in the store), rows_added, parts_written,
    parts_removed, bytes_written, store_bytes, source_bytes (of every indexed JSON), seconds, path.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not paths.experiment_dir(exp).is_dir():
        raise StoreError(f"--experiment {exp!r}: {paths.experiment_dir(exp)} does not exist")
    root = store_dir(exp)
    if rebuild and root.exists():
        shutil.rmtree(root)
    manifest = read_manifest(exp, sources=True)
    groups = find_groups(exp, variants, prompt_sets, traits)
    if not groups and not manifest["groups"]:
        what = "".join(f" {flag} {','.join(v)}" for flag, v in (("--variants", variants), ("--prompt-sets", prompt_sets),
                                                                ("--traits", traits)) if v)
        raise StoreError(f"no projection JSONs under {paths.experiment_dir(exp) / 'inference'}/*/projections/"
                         f"{what} (run project_raw_activations_onto_traits.py first)")
    up = _Update(exp, manifest, progress)
    found = {g.key() for g in groups}
    filtered = bool(variants or prompt_sets or traits)
    for key in list(manifest["groups"]):  # groups whose folder is gone (only when nothing is filtered out)
        if key not in found and not filtered:
            g = Group(*key.split("\t"))
            for part in sorted({u["part"] for u in manifest["groups"][key].values()}):
                up.drop(g, part, set(manifest["groups"][key]))
            up.summary["prompts_removed"] += len(manifest["groups"].pop(key))
    plan = []
    for g in groups:
        sources = group_sources(exp, g)
        known = manifest["groups"].get(g.key(), {})
        sigs = {pid: s.signature() for pid, s in sources.items()}
        stale = {pid for pid, u in known.items() if pid not in sources or u.get("sig") != sigs[pid]}
        new = [pid for pid in sources if pid not in known or pid in stale]
        plan.append((g, sources, sigs, stale, new))
    total = sum(len(new) for *_, new in plan)
    try:
        with tqdm(total=total, desc="trait-index", unit="file", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            by_set: dict[tuple[str, str], list] = {}
            for item in plan:
                by_set.setdefault((item[0].variant, item[0].prompt_set), []).append(item)
            for items in by_set.values():
                cols = {}
                for g, sources, sigs, stale, new in items:
                    known = manifest["groups"].setdefault(g.key(), {})
                    for part in sorted({known[pid]["part"] for pid in stale}):
                        up.drop(g, part, stale)
                    for pid in stale:
                        known.pop(pid)
                        if pid not in sources:
                            up.summary["prompts_removed"] += 1
                    cols[g.key()] = _Columns()
                todo = {g.key(): set(new) for g, _, _, _, new in items}
                order = sorted({pid for g, _, _, _, new in items for pid in new}, key=paths.natural_key)
                for pid in order:
                    toks = None
                    for g, sources, sigs, stale, new in items:
                        if pid not in todo[g.key()]:
                            continue
                        toks = toks or _Tokens.read(sources[pid])
                        c = cols[g.key()]
                        c.add_source(g, sources[pid], toks)
                        manifest["groups"][g.key()][pid] = {"part": None, "sig": sigs[pid]}
                        up.summary["prompts_indexed"] += 1
                        bar.update(1)
                        if c.n_rows >= ROWS_PER_PART:
                            up.write(g, c)
                            cols[g.key()] = _Columns()
                for g, *_ in items:
                    up.write(g, cols[g.key()])
                    if not manifest["groups"][g.key()]:
                        manifest["groups"].pop(g.key())
    except BaseException:
        for name in up.new_parts:  # nothing of a failed run stays: the previous manifest and parts are intact
            for table in ("tokens", "prompts"):
                (root / table / f"{name}.parquet").unlink(missing_ok=True)
        raise
    manifest["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    manifest["ema_alpha"] = EMA_ALPHA
    if up.summary["parts_written"] or up.summary["parts_removed"] or not manifest_file(exp).exists():
        write_json(sources_file(exp), {"experiment": exp, "groups": manifest["groups"]})
        write_json(manifest_file(exp), {k: v for k, v in manifest.items() if k != "groups"})  # last: the commit
    _remove_unlisted(exp, manifest)
    store_bytes = sum(p.stat().st_size for t in ("tokens", "prompts") for p in part_files(exp, t))
    source_bytes = 0
    for key, units in manifest["groups"].items():
        for u in units.values():
            source_bytes += sum(s[0] for s in u["sig"][:3] if s)
    return {"experiment": exp, "path": str(root), "groups": len(manifest["groups"]),
            "prompts": sum(len(u) for u in manifest["groups"].values()),
            "rows": sum(p["rows"] for p in manifest["parts"].values()), **up.summary, "store_bytes": store_bytes,
            "source_bytes": source_bytes, "rebuild": rebuild, "seconds": time.perf_counter() - t0}


def _remove_unlisted(exp: str, manifest: dict) -> None:
    """Part files the manifest no longer lists (rewritten parts, a killed run's leftovers)."""
    for table in ("tokens", "prompts"):
        folder = store_dir(exp) / table
        if folder.is_dir():
            for p in folder.glob("*.parquet"):
                if p.stem not in manifest["parts"]:
                    p.unlink()


# ---------------------------------------------------------------------------------------------------------
# Reading

def read_table(exp: str, table: str = "tokens"):
    """One whole table as a pyarrow.Table (string columns decoded), in part order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = part_files(exp, table)
    schema = _schemas()[0 if table == "tokens" else 1]
    if not files:
        return schema.empty_table()
    t = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    return t.cast(pa.schema([pa.field(f.name, pa.string() if pa.types.is_dictionary(f.type) else f.type)
                             for f in t.schema]))


def connect(exp: str):
    """An in-memory DuckDB connection with views `tokens` and `prompts` over the store's part files."""
    import duckdb

    tok, prm = part_files(exp, "tokens"), part_files(exp, "prompts")
    if not tok:
        raise StoreError(f"no score store at {store_dir(exp)}: index it first (python analysis/scores.py "
                         f"--experiment {exp})")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW tokens AS SELECT * FROM {parquet_source(tok)}")
    con.execute(f"CREATE VIEW prompts AS SELECT * FROM {parquet_source(prm)}")
    return con
