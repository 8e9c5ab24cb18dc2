#!/usr/bin/env python
"""trait-spans: where, across every set and variant, each trait fires most, and on what text (DuckDB over the store).

    top_spans(opts) -> dict          the JSON result (below); SpanOptions holds every flag
    Store(opts)                      the DuckDB connection; src(table, trait): SQL over that trait's part files only
    query_tokens / query_windows / query_clauses / query_prompts / query_cooccurrence(db, opts, ...)   one mode each
    render_page(result, out) -> str  the report's "top spans" page: every span in context, linked to its prompt card
    main(argv=None) -> int           python analysis/spans.py --help

Reads experiments/{exp}/analysis/scores/ (analysis/scores.py writes it). Writes the JSON (default
analysis/spans/top_spans.json) and the page analysis/report/top_spans.html, whose links open the prompt set's
report (analysis/report.py) on the span's first token (#p-{id}/t{index}).

Definitions (docs/formats.md):
- z: per (trait, layer, method), over the tokens of the query's scope (side, vector, variants, sets):
  (x - mean) / sample std, x the score (or with --by delta the per_token_diff delta). Spans rank by z:
  --sort-by pos (highest first, the default), neg (lowest first) or abs (largest |z|).
- tokens: single tokens. windows: runs of --window tokens inside one side of one response (a shorter side is one
  window), the best of each response only, so one passage does not fill the list. clauses: core/clauses.py's
  clauses (per_token_diff's rule). Each span's value is its mean; z of that mean uses the token statistics.
- prompt rankings: one row per response side, by mean, max, ema_max, frac_above (core/aggregates.py: fraction of
  tokens above the vector's baseline, 0 for centered scores).
- co-occurrence (--cooccur A,B): tokens of both traits joined on position; Pearson r of the two z's, how many
  tokens pass --z-threshold in each and in both, and the tokens with the largest min(z_A, z_B).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from core.errors import TraitError
from utils import cli, paths
from utils.score_store import StoreError, parquet_source, part_files, read_manifest, store_dir
from utils.storage import atomic_write, write_json

MODES = ("tokens", "windows", "clauses", "prompts")
METRICS = ("mean", "max", "ema_max", "frac_above")
ORDER = {"pos": "z DESC", "neg": "z ASC", "abs": "abs(z) DESC"}
GROUP = "variant, prompt_set, prompt_id, layer, method, side"
TIE = "variant, prompt_set, prompt_id, layer, method, side, position"


class SpanError(TraitError):
    """Bad input for trait-spans; the message names the flag."""


@dataclass(frozen=True)
class SpanOptions:
    experiment: str
    traits: tuple[str, ...] | None = None
    variants: tuple[str, ...] | None = None
    prompt_sets: tuple[str, ...] | None = None
    modes: tuple[str, ...] = MODES
    side: str = "response"
    vector: int = 0
    by: str = "score"                  # score | delta
    sort_by: str = "pos"               # pos | neg | abs
    top_k: int = 20
    window: int = 8
    context: int = 10
    cooccur: tuple[str, str] | None = None
    z_threshold: float = 2.0
    out: str | None = None
    html: str | None = None
    write: bool = True
    overwrite: bool = False            # replace an existing JSON / page (otherwise an error, nothing queried)

    def check(self) -> None:
        for flag, value, allowed in (("--side", self.side, ("prompt", "response")), ("--by", self.by, ("score", "delta")),
                                     ("--sort-by", self.sort_by, tuple(ORDER))):
            if value not in allowed:
                raise SpanError(f"{flag} {value!r}: choose from {', '.join(allowed)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise SpanError(f"--modes {bad[0]!r}: choose from {', '.join(MODES)}")
        for flag, value in (("--top-k", self.top_k), ("--window", self.window)):
            if value < 1:
                raise SpanError(f"{flag} must be >= 1, got {value}")
        if self.context < 0 or self.vector < 0:
            raise SpanError("--context and --vector must be >= 0")
        if self.cooccur is not None and (len(self.cooccur) != 2 or self.cooccur[0] == self.cooccur[1]):
            raise SpanError(f"--cooccur {','.join(self.cooccur)}: give two different traits as A,B")


# ---------------------------------------------------------------------------------------------------------
# SQL pieces

class Store:
    """A DuckDB connection (in memory) and the part files of the store; `src(table, trait)` is the SQL source of one
    trait's parts within the scope (the manifest knows which file holds which trait, variant and set)."""

    def __init__(self, opts: SpanOptions):
        import duckdb

        self.exp, self.opts = opts.experiment, opts
        self.manifest = read_manifest(opts.experiment)
        if not self.manifest["parts"]:
            raise StoreError(f"no score store at {store_dir(opts.experiment)}: index it first (python "
                             f"analysis/scores.py --experiment {opts.experiment})")
        self.con = duckdb.connect()
        self.traits = sorted({p["trait"] for p in self.manifest["parts"].values()})

    def src(self, table: str, trait: str) -> str:
        files = part_files(self.exp, table, [trait], self.opts.variants, self.opts.prompt_sets, self.manifest)
        if not files:  # an empty relation with the table's columns
            files = part_files(self.exp, table, manifest=self.manifest)[:1]
            return f"(SELECT * FROM {parquet_source(files)} WHERE false)"
        return parquet_source(files)

    def execute(self, sql: str):
        return self.con.execute(sql)


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _in(column: str, values: Sequence[str] | None) -> str:
    return f" AND {column} IN ({', '.join(_q(v) for v in values)})" if values else ""


def _scope(opts: SpanOptions) -> str:
    """The rows a query looks at, besides the trait: side, vector, variants, sets (and defined deltas)."""
    s = f"side = {_q(opts.side)} AND vector = {int(opts.vector)}"
    s += _in("variant", opts.variants) + _in("prompt_set", opts.prompt_sets)
    return s + (" AND delta IS NOT NULL" if opts.by == "delta" else "")


def _value(opts: SpanOptions) -> str:
    return "delta" if opts.by == "delta" else "score"


def trait_stats(db: Store, opts: SpanOptions, trait: str) -> list[dict]:
    """Mean, sample std and counts per (layer, method) of one trait over the scope (the z-score's reference)."""
    if opts.by == "score":  # from the per-response table: mean and M2 combined exactly (Chan et al.)
        sql = f"""
            WITH p AS (SELECT * FROM {db.src('prompts', trait)} WHERE trait = {_q(trait)} AND {_scope(opts)}),
                 g AS (SELECT layer, method, sum(n_tokens) AS n, sum(n_tokens * mean) / sum(n_tokens) AS mu,
                              count(*) AS n_prompts FROM p GROUP BY layer, method)
            SELECT g.layer, g.method, g.mu, sqrt((sum(p.m2) + sum(p.n_tokens * (p.mean - g.mu) ^ 2)) /
                   nullif(g.n - 1, 0)), g.n, g.n_prompts
            FROM p JOIN g USING (layer, method) GROUP BY g.layer, g.method, g.mu, g.n, g.n_prompts
            ORDER BY g.layer, g.method"""
    else:
        sql = f"""SELECT layer, method, avg(delta), stddev_samp(delta), count(*),
                         count(DISTINCT (variant, prompt_set, prompt_id))
                  FROM {db.src('tokens', trait)} WHERE trait = {_q(trait)} AND {_scope(opts)} GROUP BY layer, method
                  ORDER BY layer, method"""
    return [{"layer": r[0], "method": r[1], "mean": r[2], "std": r[3] if r[3] else None, "n_tokens": int(r[4]),
             "n_prompts": int(r[5])} for r in db.execute(sql).fetchall()]


def _stats_select(stats: list[dict]) -> str:
    rows = ", ".join(f"({s['layer']}, {_q(s['method'])}, {s['mean']!r}, {s['std']!r})"
                     for s in stats if s["std"] is not None)
    if not rows:
        return "SELECT NULL::INTEGER AS layer, NULL::VARCHAR AS method, NULL::DOUBLE AS mu, NULL::DOUBLE AS sd WHERE false"
    return f"SELECT * FROM (VALUES {rows}) AS s(layer, method, mu, sd)"


def _stats_cte(stats: list[dict]) -> str:
    return f"st AS ({_stats_select(stats)})"


def _rows(db: Store, sql: str) -> list[dict]:
    cur = db.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


# ---------------------------------------------------------------------------------------------------------
# The queries (each: one trait, the scope of opts)

def query_tokens(db: Store, opts: SpanOptions, trait: str, stats: list[dict]) -> list[dict]:
    """Top tokens: per (layer, method) the top-k by the value itself (DuckDB's top-N on one column: z is monotone
    in it within a group), then the groups merged by z."""
    v, k = _value(opts), int(opts.top_k)
    subs = []
    for g in stats:
        if g["std"] is None:
            continue
        mu, sd = repr(float(g["mean"])), repr(float(g["std"]))
        order = {"pos": f"{v} DESC", "neg": f"{v} ASC", "abs": f"abs({v} - {mu}) DESC"}[opts.sort_by]
        subs.append(f"""SELECT * FROM (SELECT variant, prompt_set, prompt_id, layer, method, side, position,
                   position + 1 AS "end", token_index, 1 AS n_tokens, score AS mean_score, delta AS mean_delta,
                   ({v} - {mu}) / {sd} AS z
            FROM {db.src('tokens', trait)}
            WHERE trait = {_q(trait)} AND layer = {int(g['layer'])} AND method = {_q(g['method'])} AND {_scope(opts)}
            ORDER BY {order}, {TIE} LIMIT {k})""")
    if not subs:
        return []
    return _rows(db, f"SELECT * FROM ({' UNION ALL '.join(subs)}) ORDER BY {ORDER[opts.sort_by]}, {TIE} LIMIT {k}")


def query_windows(db: Store, opts: SpanOptions, trait: str, stats: list[dict]) -> list[dict]:
    v, k = _value(opts), int(opts.window)
    sql = f"""WITH {_stats_cte(stats)},
        w AS (SELECT variant, prompt_set, prompt_id, layer, method, side, position, token_index,
                     avg(score) OVER win AS mean_score, avg(delta) OVER win AS mean_delta,
                     (avg({v}) OVER win - st.mu) / st.sd AS z, count(*) OVER win AS wn,
                     count(*) OVER (PARTITION BY {GROUP}) AS side_n
              FROM {db.src('tokens', trait)} JOIN st USING (layer, method)
              WHERE trait = {_q(trait)} AND {_scope(opts)}
              WINDOW win AS (PARTITION BY {GROUP} ORDER BY position ROWS BETWEEN CURRENT ROW AND {k - 1} FOLLOWING)),
        best AS (SELECT * FROM w WHERE wn = least({k}, side_n)
                 QUALIFY row_number() OVER (PARTITION BY {GROUP} ORDER BY {ORDER[opts.sort_by]}, position) = 1)
        SELECT variant, prompt_set, prompt_id, layer, method, side, position, position + wn AS "end", token_index,
               wn AS n_tokens, mean_score, mean_delta, z
        FROM best ORDER BY {ORDER[opts.sort_by]}, {TIE} LIMIT {int(opts.top_k)}"""
    return _rows(db, sql)


def query_clauses(db: Store, opts: SpanOptions, trait: str, stats: list[dict]) -> list[dict]:
    v = _value(opts)
    sql = f"""WITH {_stats_cte(stats)},
        c AS (SELECT variant, prompt_set, prompt_id, layer, method, side, clause, min(position) AS position,
                     max(position) + 1 AS "end", min(token_index) AS token_index, count(*) AS n_tokens,
                     avg(score) AS mean_score, avg(delta) AS mean_delta, avg({v}) AS cv
              FROM {db.src('tokens', trait)} WHERE trait = {_q(trait)} AND {_scope(opts)} AND clause IS NOT NULL
              GROUP BY variant, prompt_set, prompt_id, layer, method, side, clause)
        SELECT variant, prompt_set, prompt_id, layer, method, side, position, "end", token_index, n_tokens,
               mean_score, mean_delta, (cv - st.mu) / st.sd AS z
        FROM c JOIN st USING (layer, method) ORDER BY {ORDER[opts.sort_by]}, {TIE} LIMIT {int(opts.top_k)}"""
    return _rows(db, sql)


def query_prompts(db: Store, opts: SpanOptions, trait: str, metric: str) -> list[dict]:
    """Response sides ranked by one aggregate (high first; low first with --sort-by neg)."""
    direction = "ASC" if opts.sort_by == "neg" else "DESC"
    sql = f"""SELECT variant, prompt_set, prompt_id, layer, method, side, n_tokens, mean, max, ema_max, frac_above,
                     threshold, baseline, delta_mean, max_position AS position, max_position + 1 AS "end",
                     max_token_index AS token_index
              FROM {db.src('prompts', trait)} WHERE trait = {_q(trait)} AND {_scope(opts).replace(' AND delta IS NOT NULL', '')}
                    AND {metric} IS NOT NULL
              ORDER BY {metric} {direction}, variant, prompt_set, prompt_id, layer, method
              LIMIT {int(opts.top_k)}"""
    return _rows(db, sql)


def query_cooccurrence(db: Store, opts: SpanOptions, a: str, b: str, stats_a: list[dict], stats_b: list[dict]) -> dict:
    v, thr = _value(opts), float(opts.z_threshold)
    base = f"""WITH sa AS ({_stats_select(stats_a)}), sb AS ({_stats_select(stats_b)}),
        ta AS (SELECT variant, prompt_set, prompt_id, side, position, token_index, layer AS layer_a, method AS method_a,
                      ({v} - sa.mu) / sa.sd AS za FROM {db.src('tokens', a)} JOIN sa USING (layer, method)
               WHERE trait = {_q(a)} AND {_scope(opts)}),
        tb AS (SELECT variant, prompt_set, prompt_id, side, position, layer AS layer_b,
                      ({v} - sb.mu) / sb.sd AS zb FROM {db.src('tokens', b)} JOIN sb USING (layer, method)
               WHERE trait = {_q(b)} AND {_scope(opts)}),
        j AS (SELECT * FROM ta JOIN tb USING (variant, prompt_set, prompt_id, side, position))"""
    r = db.execute(f"""{base} SELECT corr(za, zb), count(*), count(*) FILTER (WHERE za > {thr}),
                        count(*) FILTER (WHERE zb > {thr}), count(*) FILTER (WHERE za > {thr} AND zb > {thr}) FROM j""").fetchone()
    top = _rows(db, f"""{base} SELECT variant, prompt_set, prompt_id, layer_a, method_a, layer_b, side, position,
                     position + 1 AS "end", token_index, 1 AS n_tokens, za AS z_a, zb AS z_b, least(za, zb) AS z
                     FROM j ORDER BY z DESC, variant, prompt_set, prompt_id, side, position LIMIT {int(opts.top_k)}""")
    n, na, nb, both = (int(x or 0) for x in r[1:])
    return {"traits": [a, b], "pearson_r": r[0], "n_tokens": n, "z_threshold": thr, "n_above_a": na,
            "n_above_b": nb, "n_above_both": both, "expected_both_if_independent": (na * nb / n) if n else None,
            "top": top}


# ---------------------------------------------------------------------------------------------------------
# Text in context

def add_context(db: Store, opts: SpanOptions, trait: str, spans: list[dict], page_dir: Path) -> None:
    """Each span's text, its context (--context tokens each side, same side of the same response) with the span
    in >>> <<< (as trait-interp prints it), the tokens themselves, and the link to its prompt card."""
    if not spans:
        return
    keys = ", ".join(f"({i}, {_q(s['variant'])}, {_q(s['prompt_set'])}, {_q(s['prompt_id'])}, "
                     f"{int(s['layer'])}, {_q(s['method'])}, {_q(s['side'])}, {int(s['position'])}, {int(s['end'])})"
                     for i, s in enumerate(spans))
    c = int(opts.context)
    rows = db.execute(f"""
        WITH r AS (SELECT * FROM (VALUES {keys}) AS r(i, variant, prompt_set, prompt_id, layer, method, side, s0, s1))
        SELECT r.i, t.position, t.token, t.score FROM r JOIN {db.src('tokens', trait)} t
          ON t.variant = r.variant AND t.prompt_set = r.prompt_set AND t.prompt_id = r.prompt_id
         AND t.layer = r.layer AND t.method = r.method AND t.side = r.side AND t.position >= r.s0 - {c} AND t.position < r.s1 + {c}
        WHERE t.trait = {_q(trait)} AND t.vector = {int(opts.vector)}{_in('t.variant', sorted({s['variant'] for s in spans}))}
        ORDER BY r.i, t.position""").fetchall()
    by_span: dict[int, list] = {}
    for i, pos, tok, score in rows:
        by_span.setdefault(i, []).append((pos, tok, score))
    for i, s in enumerate(spans):
        toks = by_span.get(i, [])
        # one row per position: the method column may hold several vectors at one layer
        seen, uniq = set(), []
        for pos, tok, score in toks:
            if pos not in seen:
                seen.add(pos)
                uniq.append((pos, tok, score))
        start, end = int(s["position"]), int(s["end"])
        before = "".join(t for p, t, _ in uniq if p < start)
        inside = "".join(t for p, t, _ in uniq if start <= p < end)
        after = "".join(t for p, t, _ in uniq if p >= end)
        first = uniq[0][0] if uniq else start
        s["text"] = inside
        s["token_range"] = [start, end]
        s["context_before"], s["context_after"] = before, after
        s["context"] = ("..." if first > 0 else "") + before + ">>>" + inside + "<<<" + after
        s["context_tokens"] = [t for _, t, _ in uniq]
        s["context_range"] = [first, first + len(uniq)]
        report = paths.report_file(opts.experiment, s["prompt_set"])
        start_index = int(s["token_index"])
        s["link"] = (Path(os.path.relpath(report, page_dir)).as_posix() +
                     f"#p-{s['prompt_id']}/t{start_index}" + (f"-{start_index + end - start}" if end - start > 1 else ""))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# The whole result

def top_spans(opts: SpanOptions) -> dict:
    """Every mode for every trait of the scope, as one JSON-ready dict; written to opts.out / opts.html."""
    opts.check()
    t0 = time.perf_counter()
    db = Store(opts)
    have = db.traits
    unknown = [t for t in (opts.traits or ()) + (opts.cooccur or ()) if t not in have]
    if unknown:
        raise SpanError(f"--traits: {unknown[0]!r} is not in the score store of {opts.experiment} (it holds: "
                        f"{', '.join(have)}); index it with python analysis/scores.py --experiment {opts.experiment}")
    page = Path(opts.html) if opts.html else paths.experiment_dir(opts.experiment) / "analysis" / "report" / "top_spans.html"
    path = Path(opts.out) if opts.out else paths.experiment_dir(opts.experiment) / "analysis" / "spans" / "top_spans.json"
    if opts.write and not opts.overwrite:
        for f, flag in ((path, "--out"), (page, "--html")):
            if f.exists():
                raise SpanError(f"{f} exists: pass --overwrite to replace it, or give another {flag}")
    out: dict[str, Any] = {
        "experiment": opts.experiment, "store": str(store_dir(opts.experiment)),
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "scope": {"side": opts.side, "vector": opts.vector, "by": opts.by, "variants": list(opts.variants or []),
                  "prompt_sets": list(opts.prompt_sets or [])},
        "sort_by": opts.sort_by, "top_k": opts.top_k, "window": opts.window, "context": opts.context,
        "z": "per (trait, layer, method) over the scope's tokens: (x - mean) / sample std",
        "traits": {},
    }
    for trait in opts.traits or have:
        stats = trait_stats(db, opts, trait)
        res: dict[str, Any] = {"stats": stats}
        for mode, fn in (("tokens", query_tokens), ("windows", query_windows), ("clauses", query_clauses)):
            if mode in opts.modes:
                res[mode] = fn(db, opts, trait, stats)
                add_context(db, opts, trait, res[mode], page.parent)
                for i, s in enumerate(res[mode]):
                    s["rank"] = i + 1
        if "prompts" in opts.modes:
            res["prompts"] = {}
            for metric in METRICS:
                rows = query_prompts(db, opts, trait, metric)
                add_context(db, opts, trait, rows, page.parent)
                res["prompts"][metric] = rows
        out["traits"][trait] = res
    if opts.cooccur:
        a, b = opts.cooccur
        co = query_cooccurrence(db, opts, a, b, trait_stats(db, opts, a), trait_stats(db, opts, b))
        for s in co["top"]:
            s["layer"], s["method"] = s["layer_a"], s["method_a"]
        add_context(db, opts, a, co["top"], page.parent)
        out["cooccurrence"] = co
    out = _clean(out)
    out["seconds"] = time.perf_counter() - t0
    if opts.write:
        write_json(path, out, indent=1)
        out["_json"] = str(path)
        with atomic_write(page) as tmp:
            tmp.write_text(render_page(out), encoding="utf-8")
        out["_html"] = str(page)
    return out


# ---------------------------------------------------------------------------------------------------------
# The report page "top spans"

PAGE_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.4em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin:1.2em 0 .3em}
table{border-collapse:collapse;width:100%}td,th{padding:3px 6px;border-bottom:1px solid #eee;vertical-align:top;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.ctx{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12.5px}
mark{background:#ffd3c2;padding:0 1px}.muted{color:#777}nav a{margin-right:1em}"""


def _fmt(x: Any) -> str:
    if x is None:
        return "\u2013"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _span_rows(spans: list[dict], value_cols: list[tuple[str, str]], kind: str) -> str:
    head = "".join(f"<th>{html.escape(lbl)}</th>" for lbl, _ in value_cols)
    rows = []
    for i, s in enumerate(spans):
        ctx = (html.escape(("..." if s["context_range"][0] > 0 else "") + s["context_before"]) +
               f"<mark>{html.escape(s['text'])}</mark>" + html.escape(s["context_after"]))
        where = f"{s['variant']} / {s['prompt_set']} / #{s['prompt_id']}"
        link = (f"<a class=\"span-link\" data-kind=\"{kind}\" data-prompt=\"{html.escape(s['prompt_id'])}\" "
                f"data-token=\"{s['token_index']}\" data-text=\"{html.escape(s['text'])}\" "
                f"href=\"{html.escape(s['link'])}\">{html.escape(where)}</a>")
        vals = "".join(f"<td class=\"num\">{_fmt(s.get(k))}</td>" for _, k in value_cols)
        rows.append(f"<tr><td class=\"num\">{i + 1}</td>{vals}<td>{link}<br><span class=\"muted\">L{s.get('layer')} "
                    f"{html.escape(str(s.get('method', '')))}, {s['side']} tokens {s['token_range'][0]}\u2013"
                    f"{s['token_range'][1]}</span></td><td class=\"ctx\">{ctx}</td></tr>")
    if not rows:
        return "<p class=\"muted\">none</p>"
    return f"<table><tr><th>#</th>{head}<th>where</th><th>in context</th></tr>{''.join(rows)}</table>"


def render_page(result: dict) -> str:
    """The "top spans" page: per trait its token, window and clause spans and prompt rankings, each in context."""
    title = f"{result['experiment']}: top spans"
    sc = result["scope"]
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"Content-Security-"
             f"Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\"><title>{html.escape(title)}</title>"
             f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=\"muted\">{sc['side']} tokens of vector #{sc['vector']} (0: each trait's selected vector), "
             f"ranked by z of the {sc['by']} ({html.escape(result['z'])}), sort {result['sort_by']}; variants: "
             f"{html.escape(', '.join(sc['variants']) or 'all')}; sets: {html.escape(', '.join(sc['prompt_sets']) or 'all')}. "
             f"Each link opens the prompt set's report on the span's first token. Generated {result['generated']} "
             f"from {html.escape(result['store'])}.</p>"]
    traits = result["traits"]
    parts.append("<nav>" + "".join(f"<a href=\"#trait-{i}\">{html.escape(t)}</a>" for i, t in enumerate(traits)) + "</nav>")
    cols = [("z", "z"), ("mean score", "mean_score"), ("mean delta", "mean_delta")]
    for i, (trait, res) in enumerate(traits.items()):
        parts.append(f"<section class=\"trait\" id=\"trait-{i}\" data-trait=\"{html.escape(trait)}\">"
                     f"<h2>{html.escape(trait)}</h2>")
        parts.append("<p class=\"muted\">" + "; ".join(
            f"L{s['layer']} {html.escape(str(s['method']))}: mean {_fmt(s['mean'])}, std {_fmt(s['std'])} over "
            f"{s['n_tokens']} tokens of {s['n_prompts']} responses" for s in res["stats"]) + "</p>")
        for mode, label in (("tokens", "Top tokens"), ("windows", f"Top windows of {result['window']} tokens "
                                                               "(the best of each response)"), ("clauses", "Top clauses")):
            if mode in res:
                parts.append(f"<h3>{label}</h3><div class=\"mode\" data-mode=\"{mode}\">"
                             f"{_span_rows(res[mode], cols, mode)}</div>")
        for metric, rows in (res.get("prompts") or {}).items():
            parts.append(f"<h3>Responses by {metric.replace('_', ' ')}</h3><div class=\"mode\" data-mode=\"prompts-{metric}\">"
                         + _span_rows(rows, [(m.replace("_", " "), m) for m in METRICS], f"prompts-{metric}") + "</div>")
        parts.append("</section>")
    co = result.get("cooccurrence")
    if co:
        a, b = co["traits"]
        parts.append(f"<section id=\"cooccurrence\"><h2>Co-occurrence: {html.escape(a)} and {html.escape(b)}</h2><p>"
                     f"Pearson r of the two z's over {co['n_tokens']} tokens: {_fmt(co['pearson_r'])}; z &gt; "
                     f"{co['z_threshold']}: {co['n_above_a']} ({html.escape(a)}), {co['n_above_b']} ({html.escape(b)}), "
                     f"{co['n_above_both']} both ({_fmt(co['expected_both_if_independent'])} if independent).</p>"
                     + _span_rows(co["top"], [("min z", "z"), ("z A", "z_a"), ("z B", "z_b")], "cooccurrence")
                     + "</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------
# CLI

def format_summary(r: dict) -> str:
    n = sum(len(res.get(m, [])) for res in r["traits"].values() for m in ("tokens", "windows", "clauses"))
    return (f"top spans of {len(r['traits'])} trait(s) ({r['scope']['side']} tokens, z of the {r['scope']['by']} per "
            f"trait, layer and method over the scope): {n} spans and prompt rankings in {r['seconds']:.2f} s -> "
            f"{r.get('_json')} and {r.get('_html')}")


def _tuple(value: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in value.split(",") if x.strip()) or None if value else None


EPILOG = """\
examples:
  python analysis/spans.py --experiment demo
  python analysis/spans.py --experiment demo --traits demo/refusal --modes tokens,clauses --top-k 50 --context 15 \
      --overwrite
  python analysis/spans.py --experiment demo --by delta --variants lora --sort-by abs --overwrite
  python analysis/spans.py --experiment demo --cooccur demo/refusal,demo/formality --out /tmp/cooccur.json \
      --html /tmp/cooccur.html

Index first: python analysis/scores.py --experiment demo. The page analysis/report/top_spans.html links each span
to the report of its prompt set (python analysis/report.py --experiment demo --prompt-set SET).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="spans.py", epilog=EPILOG,
                   description="Top tokens, windows and clauses per trait across every prompt set and variant of the "
                               "score store (z-scored per trait), prompt rankings by mean, max, EMA-max and fraction "
                               "above the baseline, and co-occurrence of two traits; each with its text in context. "
                               "DuckDB over the Parquet store, no server.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--traits", help="comma list (default: every trait in the store)")
    p.add_argument("--variants", help="comma list (default: all)")
    p.add_argument("--prompt-sets", help="comma list (default: all)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default: all)")
    p.add_argument("--side", default="response", choices=("prompt", "response"), help="whose tokens (default response)")
    p.add_argument("--vector", type=int, default=0,
                   help="which vector of each projection file (0, the default: the selected one; --multi-vector runs "
                        "have more)")
    p.add_argument("--by", default="score", choices=("score", "delta"),
                   help="rank by the score, or by per_token_diff's B - A delta (default score)")
    p.add_argument("--sort-by", default="pos", choices=tuple(ORDER), help="pos (highest), neg (lowest), abs (default pos)")
    p.add_argument("--top-k", type=int, default=20, help="results per trait and mode (default 20)")
    p.add_argument("--window", type=int, default=8, help="window length in tokens (default 8)")
    p.add_argument("--context", type=int, default=10, help="tokens of context on each side (default 10)")
    p.add_argument("--cooccur", metavar="A,B", help="co-occurrence of two traits")
    p.add_argument("--z-threshold", type=float, default=2.0, help="co-occurrence: z above which a token counts (default 2)")
    p.add_argument("--out", help="JSON output (default experiments/{exp}/analysis/spans/top_spans.json)")
    p.add_argument("--html", help="the page (default experiments/{exp}/analysis/report/top_spans.html)")
    p.add_argument("--overwrite", action="store_true", help="replace the JSON and the page when they exist")
    return p


def options_from_args(a: argparse.Namespace) -> SpanOptions:
    co = _tuple(a.cooccur)
    if co is not None and len(co) != 2:
        raise SpanError(f"--cooccur {a.cooccur!r}: give two traits as A,B")
    return SpanOptions(a.experiment, _tuple(a.traits), _tuple(a.variants), _tuple(a.prompt_sets),
                       _tuple(a.modes) or MODES, a.side, a.vector, a.by, a.sort_by, a.top_k, a.window, a.context,
                       co, a.z_threshold, a.out, a.html, overwrite=a.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: top_spans(options_from_args(a)), format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
