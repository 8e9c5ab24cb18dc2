"""The score store on a synthetic experiment: index build time, store bytes vs the JSONs, top-100 query vs a scan.

    python -m bench.bench_store                      # 1,000 prompts x 500 tokens x 8 traits (quick)
    python -m bench.bench_store --prompts 10000      # the issue's size: 10,000 x 500 x 8 (80,000 projection JSONs)

Writes a synthetic experiment under --root (default a temporary folder, removed after): one response JSON per prompt
(--prompt-tokens + response tokens = --tokens, token strings drawn from a 5,000-word vocabulary) and one projection
JSON per trait per prompt as the projection stage writes them (metadata with aggregates, one vector entry with
fp32 scores and token norms for both sides, activation_norms), then measures in one run:

    build     trait-index from nothing (utils.score_store.update_store(rebuild=True)), s and token rows/s
    bytes     the store's Parquet files vs the projection JSONs (and vs projection + response JSONs)
    query     the top-100 response tokens of one trait by z (trait-spans: connect + stats + top-k, DuckDB) vs a Python
              scan of that trait's projection JSONs (json.load each, heapq.nlargest); the two answers are compared,
              and the ratio is scan / query (medians of --rounds, interleaved)
    rerun     trait-index again with nothing changed (the manifest's size/mtime check only)

Targets (issue 24): query >= 50x faster than the scan, store <= 1/5 of the JSON bytes.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from bench.common import emit, machine

TRAIT_NAMES = [f"bench/trait_{i}" for i in range(64)]


def _words(n: int = 5000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for i in range(n):
        w = "".join(rng.choice(letters, size=int(rng.integers(1, 9))))
        out.append((" " if i % 3 else "") + w + ("," if i % 17 == 0 else "." if i % 29 == 0 else ""))
    return out


def _write_prompt(args) -> int:
    """One prompt's response JSON and its projection JSON per trait; returns the bytes written."""
    root, pid, n_traits, n_tokens, n_prompt, seed = args
    rng = np.random.default_rng(seed * 100_003 + pid)
    words = _WORDS
    ids = rng.integers(0, len(words), size=n_tokens)
    tokens = [words[i] for i in ids]
    inf = Path(root) / "inference" / "base"
    resp = {"prompt": "".join(tokens[:n_prompt]), "response": "".join(tokens[n_prompt:]), "system_prompt": None,
            "tokens": tokens, "token_ids": [int(i) for i in ids], "prompt_end": n_prompt, "inference_model": "bench",
            "prompt_note": None, "capture_date": "2026-12-04T00:00:00", "tags": []}
    n = _dump(inf / "responses" / "s" / f"{pid}.json", resp)
    norms = (rng.random(n_tokens, dtype=np.float32) * 4 + 20).tolist()
    for t in range(n_traits):
        # a slow drift plus noise plus rare spikes: fp32 values, as the projection writes them
        x = (np.cumsum(rng.normal(0, 0.05, n_tokens)) + rng.normal(0, 1, n_tokens)
             + (rng.random(n_tokens) < 0.01) * rng.normal(4, 1, n_tokens)).astype(np.float32).tolist()
        p, r = x[:n_prompt], x[n_prompt:]
        rec = {"metadata": {"prompt_id": str(pid), "prompt_set": "s", "n_prompt_tokens": n_prompt,
                            "n_response_tokens": n_tokens - n_prompt, "multi_vector": True, "n_vectors": 1,
                            "component": "residual", "position": "response[:5]", "centered": False,
                            "projection_date": "2026-12-04T00:00:00", "trait": TRAIT_NAMES[t], "experiment": "bench",
                            "model_variant": "base", "model": "bench",
                            "vectors": [{"layer": 12, "method": "probe", "component": "residual",
                                         "position": "response[:5]", "baseline": 0.5,
                                         "sha256": "0" * 64, "selection_source": "layers_arg"}],
                            "aggregates": [{"layer": 12, "method": "probe",
                                            "prompt": {"n": len(p), "mean": sum(p) / len(p), "max": max(p)},
                                            "response": {"n": len(r), "mean": sum(r) / len(r), "max": max(r)}}]},
               "projections": [{"method": "probe", "layer": 12, "position": "response[:5]", "component": "residual",
                                "selection_source": "layers_arg", "selected_by": "layers_arg",
                                "selection_reason": "--layers 12", "baseline": 0.5, "prompt": p, "response": r,
                                "token_norms": {"prompt": norms[:n_prompt], "response": norms[n_prompt:]}}],
               "activation_norms": {"layers": [12], "component": "residual", "statistic": "mean token norm",
                                    "prompt": [sum(norms[:n_prompt]) / n_prompt],
                                    "response": [sum(norms[n_prompt:]) / (n_tokens - n_prompt)]}}
        n += _dump(inf / "projections" / TRAIT_NAMES[t] / "s" / f"{pid}.json", rec)
    return n


_WORDS = _words()


def _dump(path: Path, obj) -> int:
    data = json.dumps(obj, ensure_ascii=False).encode()
    path.write_bytes(data)
    return len(data)


def make_experiment(root: Path, n_prompts: int, n_traits: int, n_tokens: int, n_prompt: int, workers: int) -> float:
    exp = root / "bench"
    (exp / "inference" / "base" / "responses" / "s").mkdir(parents=True)
    for t in range(n_traits):
        (exp / "inference" / "base" / "projections" / TRAIT_NAMES[t] / "s").mkdir(parents=True)
    (exp / "config.json").write_text(json.dumps({"model_variants": {"base": {"model": "bench"}}}))
    t0 = time.perf_counter()
    jobs = [(str(exp), pid, n_traits, n_tokens, n_prompt, 0) for pid in range(n_prompts)]
    with Pool(workers) as pool:
        sum(pool.imap_unordered(_write_prompt, jobs, chunksize=64))
    return time.perf_counter() - t0


def python_scan(folder: Path, k: int) -> list[tuple]:
    """The top-k response tokens of one trait by reading every projection JSON (what one would write without a store)."""
    best: list[tuple] = []
    for f in folder.glob("*.json"):
        with open(f) as fh:
            rec = json.load(fh)
        scores = rec["projections"][0]["response"]
        pid = f.stem
        for pos, x in enumerate(scores):
            item = (x, pid, pos)
            if len(best) < k:
                heapq.heappush(best, item)
            elif item > best[0]:
                heapq.heapreplace(best, item)
    return sorted(best, reverse=True)


def store_query(exp: str, trait: str, k: int) -> list[tuple]:
    from analysis.spans import SpanOptions, Store, query_tokens, trait_stats

    opts = SpanOptions(exp, top_k=k)
    db = Store(opts)
    rows = query_tokens(db, opts, trait, trait_stats(db, opts, trait))
    db.con.close()
    return [(r["mean_score"], r["prompt_id"], r["position"]) for r in rows]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1000, help="prompts (default 1000; the issue's size: 10000)")
    p.add_argument("--tokens", type=int, default=500, help="tokens per prompt, prompt + response (default 500)")
    p.add_argument("--prompt-tokens", type=int, default=50, help="of which prompt tokens (default 50)")
    p.add_argument("--traits", type=int, default=8, help="traits (default 8)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--rounds", type=int, default=6, help="query rounds (default 6; median), the scan every third")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes writing the JSONs")
    p.add_argument("--root", help="folder for the synthetic experiment (default: a temporary one, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic experiment")
    p.add_argument("--out", help="append the report to this file")
    a = p.parse_args(argv)
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix="bench-store-"))
    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root)
    from utils.score_store import update_store

    try:
        gen = make_experiment(root, a.prompts, a.traits, a.tokens, a.prompt_tokens, a.workers)
        inf = root / "bench" / "inference" / "base"
        proj_bytes = sum(f.stat().st_size for f in (inf / "projections").rglob("*.json"))
        resp_bytes = sum(f.stat().st_size for f in (inf / "responses").rglob("*.json"))
        t0 = time.perf_counter()
        s = update_store("bench", rebuild=True)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        rerun = update_store("bench")
        rerun_s = time.perf_counter() - t0
        assert rerun["prompts_indexed"] == 0
        trait, folder = TRAIT_NAMES[0], inf / "projections" / TRAIT_NAMES[0] / "s"
        t0 = time.perf_counter()
        import duckdb  # noqa: F401  (imported once per process, as by the CLI: not part of a query)
        import analysis.spans  # noqa: F401
        import_s = time.perf_counter() - t0
        q_times, s_times = [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            got = store_query("bench", trait, a.top_k)
            q_times.append(time.perf_counter() - t0)
            if len(s_times) < max(1, a.rounds // 3):
                t0 = time.perf_counter()
                want = python_scan(folder, a.top_k)
                s_times.append(time.perf_counter() - t0)
        if sorted(got, key=lambda t: (-t[0], t[1], t[2])) != sorted(want, key=lambda t: (-t[0], t[1], t[2])):
            raise SystemExit("error: the store's top-k differs from the scan's")
        q, sc = statistics.median(q_times), statistics.median(s_times)
        store_bytes = s["store_bytes"]
        rows = s["rows"]
        report = "\n".join([
            f"### Score store: {a.prompts:,} prompts x {a.tokens} tokens ({a.prompt_tokens} prompt) x {a.traits} traits "
            f"({time.strftime('%Y-%m-%d')}, {machine()}, load average {os.getloadavg()[0]:.1f})",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| synthetic JSONs written ({a.workers} processes) | {gen:.1f} s |",
            f"| token rows in the store | {rows:,} |",
            f"| index build from nothing (trait-index) | {build:.1f} s ({rows / build:,.0f} rows/s) |",
            f"| rerun, nothing changed | {rerun_s:.2f} s |",
            f"| projection JSONs | {proj_bytes / 1e6:,.1f} MB |",
            f"| projection + response JSONs | {(proj_bytes + resp_bytes) / 1e6:,.1f} MB |",
            f"| store (Parquet: tokens + prompts) | {store_bytes / 1e6:,.1f} MB |",
            f"| **store / projection JSONs** | **{store_bytes / proj_bytes:.3f}** (1/{proj_bytes / store_bytes:.1f}; "
            f"target <= 1/5) |",
            f"| store / (projection + response JSONs) | {store_bytes / (proj_bytes + resp_bytes):.3f} |",
            f"| top-{a.top_k} tokens of one trait, DuckDB (connect + stats + query), median of {len(q_times)} | "
            f"{q * 1000:.0f} ms (min {min(q_times) * 1000:.0f}; importing duckdb once: {import_s:.2f} s) |",
            f"| the same by a Python scan of {a.prompts:,} JSONs, median of {len(s_times)} | {sc:.1f} s |",
            f"| **scan / query** | **{sc / q:.0f}x** (target >= 50x; the two answers equal) |",
        ])
        emit(report, a.out)
    finally:
        if not a.keep and not a.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
