#!/usr/bin/env python
"""Generation speed: our Mode A (core.generation.generate_batch) against plain HF `generate` on the same batch.

Times, interleaved (warm-up, then medians), greedy, the same left-padded prompts and max_new_tokens:
    HF generate         model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False)
    ours batch 8        generate_batch on the same 8 prompts (what generate_responses.py runs per batch)
    ours batch 1 x 8    the same 8 prompts one at a time: why batching matters
Throughput is generated tokens per second; the ratio ours / HF should be >= 0.95.

Example (from the repo root; bench is a package, not installed):
    python -m bench.bench_generate                       # llama-8x1024 on CPU
    python -m bench.bench_generate --shape gemma-2-2b --device cuda --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import statistics


import torch

from bench.common import add_model_args, build_random_model, emit, machine, model_dtype, timeit_interleaved, workload
from core.generation import generate_batch, left_pad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="also append the table to this markdown file")
    a = p.parse_args(argv)
    dtype = model_dtype(a)
    torch.set_grad_enabled(False)
    model = build_random_model(a.shape, a.device, dtype)
    prompts = workload(a.batch, a.prompt_len // 2, a.prompt_len, model.config.vocab_size, seed=1)
    stop = [2]
    ids, mask = left_pad(prompts, 0, a.device)
    counts = {}

    def hf():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=stop)
        counts["HF generate"] = int((out[:, ids.shape[1]:] != 0).sum())

    def ours():
        res = generate_batch(model, prompts, pad_id=0, max_new_tokens=a.max_new_tokens, stop_ids=stop)
        counts[f"ours batch {a.batch}"] = sum(len(r.ids) for r in res)

    def ours_one_by_one():
        n = 0
        for pr in prompts:
            n += sum(len(r.ids) for r in generate_batch(model, [pr], pad_id=0, max_new_tokens=a.max_new_tokens,
                                                        stop_ids=stop))
        counts[f"ours batch 1 x {a.batch}"] = n

    fns = {"HF generate": hf, f"ours batch {a.batch}": ours, f"ours batch 1 x {a.batch}": ours_one_by_one}
    times = timeit_interleaved(fns, rounds=a.rounds, warmup=1, device=a.device)
    med = {k: statistics.median(v) for k, v in times.items()}
    tput = {k: counts[k] / med[k] for k in med}
    lines = [f"bench_generate: {a.shape}, {dtype}, {a.device}; {a.batch} prompts of <= {a.prompt_len} tokens, "
             f"greedy, max_new_tokens {a.max_new_tokens}; medians of {a.rounds} interleaved rounds",
             f"machine: {machine()}", "", "| method | median s | tokens | tokens/s | ratio to HF generate |",
             "|---|---:|---:|---:|---:|"]
    for k in med:
        lines.append(f"| {k} | {med[k]:.3f} | {counts[k]} | {tput[k]:.1f} | {tput[k] / tput['HF generate']:.3f} |")
    lines += ["", f"ours / HF generate (throughput): {tput[f'ours batch {a.batch}'] / tput['HF generate']:.3f}; "
                  f"batch {a.batch} / batch 1: {tput[f'ours batch {a.batch}'] / tput[f'ours batch 1 x {a.batch}']:.2f}x"]
    report = "\n".join(lines) + "\n"
    emit(report, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
