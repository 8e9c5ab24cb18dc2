"""The score store (utils/score_store.py, trait-index) and trait-spans, against brute force over the stage's own files.

    `world` (built once): the zoo llama, vectors of two traits (nonzero baselines), responses of two sets; project
        --fused for variant base (2 vectors per trait) and for lora (a random LoRA replaying base's responses), then
        per_token_diff base -> lora, then trait-index
    the store holds exactly the projection JSONs' scores: row count and every value (score, token id, token, delta,
        clause) against the JSONs read with json.load; the prompts table's aggregates against a loop written here,
        and against the aggregates the projection wrote into each JSON's metadata
    top tokens, windows, clauses, prompt rankings and co-occurrence equal a brute-force scan of the JSONs
    incremental indexing (a subset, then the rest, then a changed file and a deleted one) equals a rebuild
    project --fused --index writes the same store as trait-index
    bad input: one line, exit 2, nothing written
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from analysis import scores as scores_cli
from analysis import spans as spans_cli
from analysis.spans import METRICS, SpanOptions, top_spans
from tests.helpers import PAIRS, write_responses, write_vectors
from utils import paths
from utils.score_store import read_manifest, read_table, update_store

EXP = "w"
TRAITS = ("behavioral/refusal", "cognitive/honesty")
PAIRS_S = PAIRS + [("Say more.", "Well, it depends: e.g. on the weather. Then again, who knows?"),
                   ("List three things.", "One, two and three; that is all.\nDone!")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, zoo, zoo_lora):
    from analysis.model_diff.per_token_diff import per_token_diff
    from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits as project

    root = tmp_path_factory.mktemp("scores") / "experiments"
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAIT_EXPERIMENTS_DIR", str(root))
    model, lora = zoo("llama"), zoo_lora("llama")
    (root / EXP).mkdir(parents=True)
    (root / EXP / "config.json").write_text(json.dumps({
        "defaults": {"extraction": "base", "application": "base"},
        "model_variants": {"base": {"model": model}, "lora": {"model": model, "lora": lora}}}))
    write_vectors(EXP, "base")
    for trait in TRAITS:  # nonzero baselines, so "fraction above the baseline" is not "fraction above 0"
        for f in (paths.vectors_dir(EXP, trait, "base")).rglob("metadata.json"):
            meta = json.loads(f.read_text())
            for layer, entry in meta["layers"].items():
                entry["baseline"] = 0.004 * int(layer) - 0.005
            f.write_text(json.dumps(meta))
    write_responses(EXP, "base", "s", model, pairs=PAIRS_S)
    write_responses(EXP, "base", "grp/inner", model, pairs=PAIRS[:2])
    project(EXP, "s", model_variant="base", fused=True, multi_vector=2, progress=False, no_calibration=True)
    # another layer first here: a trait's vector #0 then has two (layer, method) groups, each z-scored on its own
    project(EXP, "grp/inner", model_variant="base", fused=True, layers="1,3", progress=False, no_calibration=True)
    project(EXP, "s", model_variant="lora", fused=True, responses_from="base", multi_vector=2, progress=False,
            no_calibration=True)
    per_token_diff(EXP, "base", "lora", "s", progress=False)
    update_store(EXP)
    yield root
    mp.undo()


# ---------------------------------------------------------------------------------------------------------
# The brute-force oracle: the stage's files read with json.load, nothing of utils/score_store.py

def load(path: Path) -> dict:
    return json.loads(path.read_text())


def brute_rows(root: Path, exp: str = EXP) -> dict[tuple, dict]:
    """(variant, set, id, trait, layer, method, vector, side, position) -> the values the store must hold."""
    rows = {}
    inf = root / exp / "inference"
    for f in sorted(inf.glob("*/projections/*/*/**/*.json")):
        if f.name.startswith("."):
            continue
        rel = f.relative_to(inf).parts
        variant, trait, pset, pid = rel[0], "/".join(rel[2:4]), "/".join(rel[4:-1]), f.stem
        proj, resp = load(f), load(inf / variant / "responses" / pset / f"{pid}.json")
        end = resp["prompt_end"]
        diff_file = root / exp / "model_diff" / f"base_vs_{variant}" / "per_token_diff" / trait / pset / f"{pid}.json"
        diff = load(diff_file) if diff_file.exists() else None
        for k, e in enumerate(proj["projections"]):
            for side, offset in (("prompt", 0), ("response", end)):
                for pos, score in enumerate(e[side]):
                    delta = None
                    if diff and side == "response" and diff["layer"] == e["layer"] and diff["method"] == e["method"]:
                        delta = diff["per_token_delta"][pos]
                    rows[(variant, pset, pid, trait, e["layer"], e["method"], k, side, pos)] = {
                        "score": score, "delta": delta, "token_index": pos + offset,
                        "token_id": resp["token_ids"][pos + offset], "token": resp["tokens"][pos + offset]}
    return rows


def store_rows(exp: str = EXP) -> dict[tuple, dict]:
    t = read_table(exp, "tokens").to_pylist()
    out = {}
    for r in t:
        key = tuple(r[c] for c in ("variant", "prompt_set", "prompt_id", "trait", "layer", "method", "vector", "side",
                                   "position"))
        assert key not in out, f"duplicate row {key}"
        out[key] = r
    return out


def test_the_store_holds_exactly_the_projection_scores(world):
    brute, stored = brute_rows(world), store_rows()
    assert len(stored) == len(brute) > 1000
    assert set(stored) == set(brute)
    n_delta = 0
    for key, want in brute.items():
        got = stored[key]
        for col in ("score", "delta", "token_index", "token_id", "token"):
            assert got[col] == want[col], (key, col, got[col], want[col])   # exact: no rounding anywhere
        n_delta += want["delta"] is not None
    assert n_delta > 50 and any(abs(w["delta"]) > 1e-6 for w in brute.values() if w["delta"] is not None)
    # both sets (one nested), both variants, both traits, two vectors per trait, both sides
    assert {k[0] for k in stored} == {"base", "lora"} and {k[1] for k in stored} == {"s", "grp/inner"}
    assert {k[6] for k in stored} == {0, 1} and {k[7] for k in stored} == {"prompt", "response"}


def test_clause_column_is_per_token_diffs_clauses(world):
    """The clause numbers give back exactly the clauses per_token_diff wrote (token ranges and text)."""
    stored = store_rows()
    root = world / EXP / "model_diff" / "base_vs_lora" / "per_token_diff"
    checked = 0
    for f in sorted(root.glob("*/*/s/*.json")):
        if f.name == "aggregate.json":
            continue
        d = load(f)
        trait = "/".join(f.relative_to(root).parts[:2])
        k = 0 if load(paths.projection_file(EXP, "lora", trait, "s", f.stem))["projections"][0]["layer"] == d["layer"] else 1
        rows = sorted((r for key, r in stored.items() if key[:4] == ("lora", "s", f.stem, trait) and key[6] == k
                       and key[7] == "response"), key=lambda r: r["position"])
        spans = {}
        for r in rows:
            if r["clause"] is not None:
                spans.setdefault(r["clause"], []).append(r)
        got = sorted(([rs[0]["position"], rs[-1]["position"] + 1], "".join(x["token"] for x in rs)) for rs in spans.values())
        want = sorted((c["token_range"], c["text"]) for c in d["clauses"])
        assert got == want, f.name
        checked += 1
    assert checked >= 10


def ema_max(xs: list[float], alpha: float) -> float:
    best, e = -math.inf, 0.0
    for t, x in enumerate(xs):
        e = x if t == 0 else alpha * x + (1 - alpha) * e
        best = max(best, e)
    return best


def test_aggregates_in_the_store_and_in_each_projection_json(world):
    prompts = read_table(EXP, "prompts").to_pylist()
    alpha = read_manifest(EXP)["ema_alpha"]
    inf = world / EXP / "inference"
    n = 0
    for r in prompts:
        f = inf / r["variant"] / "projections" / r["trait"] / r["prompt_set"] / f"{r['prompt_id']}.json"
        proj = load(f)
        e = proj["projections"][r["vector"]]
        xs = e[r["side"]]
        base = e["baseline"]
        assert r["baseline"] == base and r["threshold"] == base and base != 0
        want = {"n_tokens": len(xs), "mean": math.fsum(xs) / len(xs), "max": max(xs), "ema_max": ema_max(xs, alpha),
                "frac_above": sum(x > base for x in xs) / len(xs), "max_position": xs.index(max(xs))}
        for col, value in want.items():
            assert r[col] == pytest.approx(value, rel=1e-12, abs=1e-15), (f, col)
        meta = proj["metadata"]["aggregates"][r["vector"]][r["side"]]
        assert (meta["n"], meta["threshold"]) == (len(xs), base)
        for col in ("mean", "max", "ema_max", "frac_above"):
            assert meta[col] == pytest.approx(want[col], rel=1e-12, abs=1e-15), (f, col)
        n += 1
    assert n == len({k[:8] for k in brute_rows(world)})


# ---------------------------------------------------------------------------------------------------------
# trait-spans against brute force

def zstats(values: list[float]) -> tuple[float, float]:
    mu = math.fsum(values) / len(values)
    return mu, math.sqrt(math.fsum((x - mu) ** 2 for x in values) / (len(values) - 1))


def series(brute: dict, trait: str, side: str = "response", vector: int = 0, by: str = "score") -> dict[tuple, list]:
    """(variant, set, id, layer, method) -> [(position, value, score, delta, token)] in position order."""
    out: dict[tuple, list] = {}
    for key, r in sorted(brute.items()):
        v, s, pid, t, layer, method, k, sd, pos = key
        if t == trait and sd == side and k == vector and (by == "score" or r["delta"] is not None):
            out.setdefault((v, s, pid, layer, method), []).append((pos, r[by], r["score"], r["delta"], r["token"]))
    for rows in out.values():
        rows.sort()
    return out


def group_stats(ser: dict) -> dict[tuple, tuple[float, float]]:
    by: dict[tuple, list] = {}
    for key, rows in ser.items():
        by.setdefault(key[3:5], []).extend(x[1] for x in rows)
    return {g: zstats(vals) for g, vals in by.items()}


SORT = {"pos": lambda z: -z, "neg": lambda z: z, "abs": lambda z: -abs(z)}


def ranked(cands: list[tuple], k: int, sort_by: str = "pos") -> list[tuple]:
    """cands: (z, variant, set, id, layer, method, position, ...): by z (highest, lowest or largest |z|), ties by keys."""
    return sorted(cands, key=lambda c: (SORT[sort_by](c[0]),) + c[1:7])[:k]


def brute_tokens(ser, st, k, sort_by="pos"):
    return ranked([((val - st[key[3:5]][0]) / st[key[3:5]][1],) + key + (pos, pos + 1, tok)
                   for key, rows in ser.items() for pos, val, _, _, tok in rows], k, sort_by)


def brute_windows(ser, st, k, w, sort_by="pos"):
    best = []
    for key, rows in ser.items():
        n = min(w, len(rows))
        mu, sd = st[key[3:5]]
        cands = [((math.fsum(x[1] for x in rows[i:i + n]) / n - mu) / sd, i) for i in range(len(rows) - n + 1)]
        z, i = sorted(cands, key=lambda c: (SORT[sort_by](c[0]), c[1]))[0]
        best.append((z,) + key + (i, i + n, "".join(x[4] for x in rows[i:i + n])))
    return ranked(best, k, sort_by)


def brute_clauses(ser, st, k, sort_by="pos"):
    from core.clauses import split_into_clauses

    out = []
    for key, rows in ser.items():
        mu, sd = st[key[3:5]]
        for c in split_into_clauses([x[4] for x in rows], [x[1] for x in rows]):
            a, b = c["token_range"]
            out.append(((c["mean_delta"] - mu) / sd,) + key + (a, b, c["text"]))
    return ranked(out, k, sort_by)


def as_tuples(spans: list[dict]) -> list[tuple]:
    return [(s["z"], s["variant"], s["prompt_set"], s["prompt_id"], s["layer"], s["method"], s["token_range"][0],
             s["token_range"][1], s["text"]) for s in spans]


def same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[1:] == w[1:], (g, w)
        assert g[0] == pytest.approx(w[0], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("by,sort_by,side,vector", [("score", "pos", "response", 0), ("delta", "abs", "response", 0),
                                                   ("score", "neg", "prompt", 1)])
def test_top_tokens_windows_clauses_equal_a_brute_force_scan(world, by, sort_by, side, vector):
    brute = brute_rows(world)
    k = 12
    res = top_spans(SpanOptions(EXP, top_k=k, window=4, context=3, by=by, sort_by=sort_by, side=side, vector=vector,
                                write=False))
    n_groups = 0
    for trait in TRAITS:
        ser = series(brute, trait, side=side, vector=vector, by=by)
        st = group_stats(ser)
        n_groups = max(n_groups, len(st))
        r = res["traits"][trait]
        got_stats = {(s["layer"], s["method"]): (s["mean"], s["std"]) for s in r["stats"]}
        assert set(got_stats) == set(st)
        for g, (mu, sd) in st.items():
            assert got_stats[g] == pytest.approx((mu, sd), rel=1e-9)
        same(as_tuples(r["tokens"]), brute_tokens(ser, st, k, sort_by))
        same(as_tuples(r["windows"]), brute_windows(ser, st, k, 4, sort_by))
        same(as_tuples(r["clauses"]), brute_clauses(ser, st, k, sort_by))
        # context: the tokens around the span, the span itself between >>> <<<
        for s in r["tokens"] + r["windows"] + r["clauses"]:
            toks = [x[4] for x in ser[(s["variant"], s["prompt_set"], s["prompt_id"], s["layer"], s["method"])]]
            a, b = s["token_range"]
            lo, hi = max(0, a - 3), min(len(toks), b + 3)
            assert s["context"] == ("..." if lo else "") + "".join(toks[lo:a]) + ">>>" + "".join(toks[a:b]) + "<<<" + \
                "".join(toks[b:hi])
            assert s["link"].endswith(f"#p-{s['prompt_id']}/t{s['token_index']}" + (f"-{s['token_index'] + b - a}"
                                                                                    if b - a > 1 else ""))
    assert n_groups == (1 if by == "delta" else 2)   # z per (layer, method): two groups merged by z


def test_prompt_rankings_and_cooccurrence_equal_a_brute_force_scan(world):
    brute = brute_rows(world)
    a, b = TRAITS
    res = top_spans(SpanOptions(EXP, top_k=5, cooccur=(a, b), z_threshold=1.0, modes=("prompts",), write=False))
    alpha = read_manifest(EXP)["ema_alpha"]
    for trait in TRAITS:
        ser = series(brute, trait)
        base = {key: load(paths.projection_file(EXP, key[0], trait, key[1], key[2]))["projections"][0]["baseline"]
                for key in ser}
        agg = {key: {"mean": math.fsum(x[1] for x in rows) / len(rows), "max": max(x[1] for x in rows),
                     "ema_max": ema_max([x[1] for x in rows], alpha),
                     "frac_above": sum(x[1] > base[key] for x in rows) / len(rows)} for key, rows in ser.items()}
        for metric in METRICS:
            want = sorted(agg, key=lambda key: (-agg[key][metric],) + key)[:5]
            got = res["traits"][trait]["prompts"][metric]
            assert [(g["variant"], g["prompt_set"], g["prompt_id"], g["layer"], g["method"]) for g in got] == want
            for g, key in zip(got, want):
                assert g[metric] == pytest.approx(agg[key][metric], rel=1e-12)
    sa, sb = series(brute, a), series(brute, b)
    za = {key[:3] + (pos,): (v - group_stats(sa)[key[3:5]][0]) / group_stats(sa)[key[3:5]][1]
          for key, rows in sa.items() for pos, v, *_ in rows}
    zb = {key[:3] + (pos,): (v - group_stats(sb)[key[3:5]][0]) / group_stats(sb)[key[3:5]][1]
          for key, rows in sb.items() for pos, v, *_ in rows}
    both = sorted(set(za) & set(zb))
    xs, ys = [za[t] for t in both], [zb[t] for t in both]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sum((x - mx) ** 2 for x in xs) *
                                                                       sum((y - my) ** 2 for y in ys))
    co = res["cooccurrence"]
    assert co["n_tokens"] == len(both) and co["pearson_r"] == pytest.approx(r, rel=1e-9)
    assert co["n_above_both"] == sum(za[t] > 1 and zb[t] > 1 for t in both)
    assert co["n_above_a"] == sum(za[t] > 1 for t in both) and co["n_above_b"] == sum(zb[t] > 1 for t in both)
    want = sorted(both, key=lambda t: (-min(za[t], zb[t]),) + t)[:5]
    assert [(s["variant"], s["prompt_set"], s["prompt_id"], s["position"]) for s in co["top"]] == want


# ---------------------------------------------------------------------------------------------------------
# Incremental = rebuild

def table_rows(exp: str, table: str) -> list[tuple]:
    t = read_table(exp, table).to_pylist()
    return sorted(tuple((k, v) for k, v in r.items()) for r in t)


def test_incremental_indexing_equals_a_rebuild(world):
    inc, full = "inc", "full"
    for name in (inc, full):
        shutil.copytree(world / EXP, world / name, ignore=shutil.ignore_patterns("analysis"))
    s1 = update_store(inc, traits=[TRAITS[0]], prompt_sets=["s"])          # a subset first
    s2 = update_store(inc)                                                  # then everything else
    assert s1["prompts_indexed"] + s2["prompts_indexed"] == s2["prompts"] and s1["prompts_indexed"] > 0
    assert update_store(inc)["prompts_indexed"] == 0                        # nothing new: nothing read
    # one projection re-written with other scores, one deleted, one new prompt of an indexed set
    changed = paths.projection_file(inc, "base", TRAITS[0], "s", "2")
    rec = load(changed)
    rec["projections"][0]["response"] = [x * 2.0 + 1.0 for x in rec["projections"][0]["response"]]
    changed.write_text(json.dumps(rec))
    paths.projection_file(inc, "lora", TRAITS[1], "s", "3").unlink()
    src = paths.projection_file(inc, "base", TRAITS[1], "grp/inner", "1")
    shutil.copy(paths.response_file(inc, "base", "grp/inner", "1"), paths.response_file(inc, "base", "grp/inner", "9"))
    shutil.copy(src, src.with_name("9.json"))
    s3 = update_store(inc)
    assert s3["prompts_indexed"] == 2 and s3["prompts_removed"] == 1
    for f in (changed, paths.projection_file(inc, "lora", TRAITS[1], "s", "3"), src.with_name("9.json")):
        target = Path(str(f).replace(f"/{inc}/", f"/{full}/"))
        if f.exists():
            shutil.copy(f, target)
        elif target.exists():
            target.unlink()
    shutil.copy(paths.response_file(inc, "base", "grp/inner", "9"), paths.response_file(full, "base", "grp/inner", "9"))
    update_store(full, rebuild=True)
    for table in ("tokens", "prompts"):
        assert table_rows(inc, table) == table_rows(full, table)
    assert len(brute_rows(world, inc)) == len(table_rows(inc, "tokens"))
    # no part file is left that the manifest does not list
    listed = set(read_manifest(inc)["parts"])
    on_disk = {p.stem for p in (world / inc / "analysis" / "scores").rglob("*.parquet")}
    assert on_disk == listed


def test_fused_index_flag_writes_the_store_trait_index_writes(world, zoo):
    from inference.project_raw_activations_onto_traits import main as project_main

    exp = "idx"
    shutil.copytree(world / EXP, world / exp, ignore=shutil.ignore_patterns("analysis", "projections", "model_diff"))
    assert project_main(["--experiment", exp, "--prompt-set", "s", "--model-variant", "base", "--fused", "--index",
                         "--multi-vector", "2", "--no-calibration", "--quiet"]) == 0
    via_flag = table_rows(exp, "tokens")
    update_store(exp, rebuild=True)
    assert via_flag == table_rows(exp, "tokens") and len(via_flag) == len(brute_rows(world, exp))


# ---------------------------------------------------------------------------------------------------------
# CLI and bad input

def test_cli_summaries_and_bad_input(world, capsys, tmp_path):
    assert scores_cli.main(["--experiment", EXP, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "indexed 0 new or changed" in out and "token scores" in out
    outs = ["--out", str(tmp_path / "spans.json"), "--html", str(tmp_path / "spans.html")]
    assert spans_cli.main(["--experiment", EXP, "--top-k", "3", *outs]) == 0
    out = capsys.readouterr().out
    assert "top spans of 2 trait(s)" in out and (tmp_path / "spans.json").is_file() and (tmp_path / "spans.html").is_file()

    # the outputs exist now: replaced only with --overwrite
    assert spans_cli.main(["--experiment", EXP, "--top-k", "3", *outs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "spans.json" in err[0]
    assert spans_cli.main(["--experiment", EXP, "--top-k", "3", *outs, "--overwrite"]) == 0
    capsys.readouterr()
    assert spans_cli.main(["--experiment", EXP, "--traits", "nope/none", *outs, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope/none" in err[0]
    assert scores_cli.main(["--experiment", "missing"]) == 2
    assert "missing" in capsys.readouterr().err

    bad = "bad"
    shutil.copytree(world / EXP, world / bad, ignore=shutil.ignore_patterns("analysis"))
    f = paths.projection_file(bad, "base", TRAITS[0], "s", "1")
    rec = load(f)
    rec["projections"][0]["response"] = rec["projections"][0]["response"][:-1]
    f.write_text(json.dumps(rec))
    assert scores_cli.main(["--experiment", bad, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0]
    assert not (world / bad / "analysis" / "scores" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------------
# The report's "top spans" page in Chromium: its links land on the right token of the prompt card

LANDED = """(function () {
  var e = document.querySelector('.tt-selected');
  if (!window.TraitReport || !e) return null;
  var card = e.closest('article'), D = TraitReport.data, p = D.prompts[+card.getAttribute('data-index')];
  var marked = Array.from(card.querySelectorAll('.tt-selected, .tt-attended')).map(function (x) { return +x.dataset.i; });
  return {card: card.id, i: +e.dataset.i, marked: marked, tokens: p.t, hash: location.hash,
          top: e.getBoundingClientRect().top, height: window.innerHeight};
})()"""


def landed(page, timeout: float = 30.0) -> dict:
    """LANDED once the clicked link's page has loaded (an evaluation cut by the navigation is retried)."""
    import time

    from tests.browser import BrowserError

    deadline = time.monotonic() + timeout
    while True:
        try:
            got = page.eval(LANDED)
        except BrowserError:
            got = None
        if got or time.monotonic() > deadline:
            assert got, "the link did not land on a token"
            return got
        time.sleep(0.05)


def test_top_spans_page_links_land_on_the_right_token(world):
    from analysis import report as rp
    from tests.browser import Browser, require_chromium

    require_chromium()
    res = top_spans(SpanOptions(EXP, top_k=4, window=3, context=2, variants=("base",), prompt_sets=("s",),
                                overwrite=True))
    assert rp.main(["--experiment", EXP, "--prompt-set", "s", "--model-variant", "base", "--quiet"]) == 0
    page_file = Path(res["_html"])
    assert page_file.parent == paths.report_file(EXP, "s").parent
    expected = sum(len(r["tokens"]) + len(r["windows"]) + len(r["clauses"]) + sum(len(x) for x in r["prompts"].values())
                   for r in res["traits"].values())
    with Browser() as b:
        page = b.new_page()
        page.goto(page_file.as_uri())
        links = page.eval("Array.from(document.querySelectorAll('a.span-link')).map(function (a, n) { return "
                          "{n: n, kind: a.dataset.kind, prompt: a.dataset.prompt, token: +a.dataset.token, "
                          "text: a.dataset.text}; })")
        assert len(links) == expected > 20
        # the spans of the JSON, in page order: their token ranges give the marked tokens
        spans = [s for r in res["traits"].values() for s in r["tokens"] + r["windows"] + r["clauses"] +
                 [x for m in METRICS for x in r["prompts"][m]]]
        checked = set()
        for link, span in zip(links, spans):
            if (link["kind"], span["token_range"][1] - span["token_range"][0] > 1) in checked:
                continue  # one of each kind (and width) is enough: every link goes through the same code
            checked.add((link["kind"], span["token_range"][1] - span["token_range"][0] > 1))
            page.goto(page_file.as_uri())
            page.eval(f"setTimeout(function () {{ document.querySelectorAll('a.span-link')[{link['n']}].click(); }}, 0)")
            got = landed(page)
            a, z = span["token_index"], span["token_index"] + span["token_range"][1] - span["token_range"][0]
            assert got["card"] == f"p-{span['prompt_id']}" and got["i"] == a, (link, got["hash"])
            assert sorted(got["marked"]) == list(range(a, z))
            assert "".join(got["tokens"][a:z]) == span["text"] == link["text"]
            assert 0 <= got["top"] < got["height"]          # scrolled into view
        assert {k for k, _ in checked} >= {"tokens", "windows", "clauses", "prompts-max"}
        # the report links back to the page, and sorts by every aggregate
        page = b.new_page()
        page.goto(paths.report_file(EXP, "s").as_uri())
        assert page.eval("document.getElementById('top-spans-link').getAttribute('href')") == "top_spans.html"
        opts = page.eval("Array.from(document.getElementById('sort-picker').options).map(function (o) { return o.value; })")
        assert {"desc", "asc", "max:desc", "ema_max:desc", "frac_above:desc", "frac_above:asc"} <= set(opts)
        order = page.eval("""(function () { var s = document.getElementById('sort-picker'); s.value = 'ema_max:desc';
            s.dispatchEvent(new Event('change'));
            return Array.from(document.querySelectorAll('#prompts article')).map(function (a) { return a.id; }); })()""")
        alpha = read_manifest(EXP)["ema_alpha"]
        t = sorted(TRAITS)[0]
        ema = {pid: ema_max(load(paths.projection_file(EXP, "base", t, "s", pid))["projections"][0]["response"], alpha)
               for pid in (f.stem for f in paths.projection_dir(EXP, "base", t, "s").glob("*.json"))}
        with_scores = [f"p-{pid}" for pid in sorted(ema, key=lambda p: (-float(f"{ema[p]:.4g}"), paths.natural_key(p)))]
        assert [x for x in order if x in with_scores] == with_scores
