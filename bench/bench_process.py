#!/usr/bin/env python
"""Whole-process capture cost: `python inference/capture_raw_activations.py` as a user runs it, against a bare
decoder forward over the same batches in its own process (never part of the test suite).

Both sides are fresh Python processes that import torch and transformers and load the same saved
random-weight model from disk; the capture process also loads the tokenizer, reads and checks the response
JSONs, runs the identity check and writes one fsync'd .pt per prompt (all layers, residual). The bare
process forms the batches capture forms (longest first, the same padded-token budget) and runs the
decoder stack on them (no LM head: capture stops after the last layer too). Pairs run back to back,
alternating which goes first, after one warm-up pair; the figure is the median of the per-pair ratios
(capture / bare) with their spread, and the load average says how busy the machine was.

Example (from the repo root):
    python -m bench.bench_process                          # llama-8x1024, 24 prompts (~5,300 tokens), 5 pairs
    python -m bench.bench_process --pairs 7 --out bench/results/process.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SET = "bench_set"


def _bare_worker(model_dir: str, responses: str, budget: int) -> None:
    """The bare side, in its own process: import, load the model, the decoder over capture's batches."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    from core.capture import plan_batch

    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    decoder = model.get_decoder()
    seqs = [json.loads(p.read_text())["token_ids"] for p in sorted(Path(responses).glob("*.json"))]
    t2 = time.perf_counter()
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (-lengths[i], i))
    start = 0
    with torch.no_grad():
        while start < len(order):
            idx = order[start:start + plan_batch(lengths, order, start, budget, None)]
            S = lengths[idx[0]]
            ids = torch.zeros((len(idx), S), dtype=torch.long)
            mask = torch.zeros((len(idx), S), dtype=torch.long)
            for b, i in enumerate(idx):
                ids[b, :lengths[i]] = torch.tensor(seqs[i])
                mask[b, :lengths[i]] = 1
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            start += len(idx)
    t3 = time.perf_counter()
    print(f"timings: imports {t1 - t0:.2f} s, load {t2 - t1:.2f} s, forward {t3 - t2:.2f} s", file=sys.stderr)


def _setup(root: Path, shape: str, n: int, min_len: int, max_len: int) -> tuple[Path, int]:
    """A saved random model of `shape` with a zoo tokenizer, and an experiment with n response JSONs."""
    import torch

    from bench.common import build_random_model, workload
    from utils import paths
    from utils.responses import build_response
    from utils.storage import write_json
    from utils.zoo import build_tokenizer

    model_dir = root / "model"
    tok = build_tokenizer()
    model = build_random_model(shape, "cpu", torch.float32)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    exp = root / "experiments" / "bench"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(json.dumps({"defaults": {"extraction": "v", "application": "v"},
                                                 "model_variants": {"v": {"model": str(model_dir)}}}))
    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root / "experiments")
    seqs = workload(n, min_len, max_len, len(tok))
    for i, ids in enumerate(seqs, start=1):
        end = len(ids) // 3
        rec = build_response("prompt", "response", ids, end, [tok.decode([t]) for t in ids], str(model_dir))
        write_json(paths.response_file("bench", "v", SET, i), rec)
    return model_dir, sum(len(s) for s in seqs)


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... exited {out.returncode}:\n{out.stderr[-2000:]}")
    timings = [line for line in out.stderr.splitlines() if line.startswith("timings:")]
    return seconds, (timings[-1] if timings else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-8x1024", help="bench/common.py SHAPES")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--min-len", type=int, default=120)
    p.add_argument("--max-len", type=int, default=320)
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="the padded-token budget (default 4096: capture's own CPU default, passed to both sides)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--out", default=None, help="also append the report to this markdown file")
    p.add_argument("--bare-worker", nargs=3, metavar=("MODEL", "RESPONSES", "BUDGET"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bare_worker:
        _bare_worker(a.bare_worker[0], a.bare_worker[1], int(a.bare_worker[2]))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench_process_"))
    try:
        model_dir, n_tokens = _setup(root, a.shape, a.prompts, a.min_len, a.max_len)
        env = dict(os.environ, TRAIT_EXPERIMENTS_DIR=str(root / "experiments"), TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(REPO))
        responses = root / "experiments" / "bench" / "inference" / "v" / "responses" / SET
        raw = root / "experiments" / "bench" / "inference" / "v" / "raw"
        capture_cmd = [sys.executable, "inference/capture_raw_activations.py", "--experiment", "bench",
                       "--prompt-set", SET, "--max-batch-tokens", str(a.max_batch_tokens), "--timings", "--overwrite"]
        bare_cmd = [sys.executable, "-m", "bench.bench_process", "--bare-worker", str(model_dir), str(responses),
                    str(a.max_batch_tokens)]
        sides = {"capture": capture_cmd, "bare": bare_cmd}
        times: dict[str, list[float]] = {"capture": [], "bare": []}
        phases: dict[str, list[str]] = {"capture": [], "bare": []}
        loads, size = [os.getloadavg()[0]], 0
        for pair in range(a.pairs + 1):  # pair 0 warms the page cache and the .pyc files
            for name in (("capture", "bare") if pair % 2 else ("bare", "capture")):
                shutil.rmtree(raw, ignore_errors=True)
                seconds, timing = _run(sides[name], env)
                if name == "capture":
                    size = sum(f.stat().st_size for f in raw.rglob("*.pt"))
                if pair:
                    times[name].append(seconds)
                    phases[name].append(timing)
            loads.append(os.getloadavg()[0])
            if pair:
                print(f"pair {pair}: capture {times['capture'][-1]:.2f} s, bare {times['bare'][-1]:.2f} s, ratio "
                      f"{times['capture'][-1] / times['bare'][-1]:.3f} (load average {loads[-1]:.2f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ratios = [c / b for c, b in zip(times["capture"], times["bare"])]
    from bench.common import machine

    report = "\n".join([
        f"bench_process: {a.shape}, fp32, CPU; {a.prompts} prompts, {n_tokens:,} tokens, residual at every layer, "
        f"<= {a.max_batch_tokens} padded tokens per batch, {size / 1e6:,.0f} MB of .pt per capture run; "
        f"{a.pairs} interleaved pairs of fresh processes (after one warm-up pair)",
        f"machine: {machine()}; 1-min load average {min(loads):.2f}-{max(loads):.2f} during the run",
        "",
        "| process | median s | min s | max s |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} |" for k, v in times.items()),
        "",
        f"capture / bare per pair: {', '.join(f'{r:.3f}' for r in ratios)}",
        f"**median {statistics.median(ratios):.3f}** (spread {min(ratios):.3f}-{max(ratios):.3f}); target <= 1.10",
        f"capture phases (last pair): {phases['capture'][-1].removeprefix('timings: ')}",
        f"bare phases (last pair): {phases['bare'][-1].removeprefix('timings: ')}",
    ])
    from bench.common import emit
    emit("\n" + report + "\n", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
