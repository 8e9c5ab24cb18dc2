#!/usr/bin/env python
"""Capture speed against plain HF, on a random-weight model of a real shape (never part of the test suite).

Times, interleaved in one run (warm-up, then medians over rounds), over the same length-sorted batches:
    bare forward        the model's decoder stack alone (no LM head): the floor any capture pays
    ours in memory      core.capture.capture_sequences: hooks, stop after the last layer, one copy per batch
    ours to .pt files   the same plus build_raw + atomic .pt writes on a background thread (the script's loop)
    HF hidden states    model(..., output_hidden_states=True, logits_to_keep=1), copied to the CPU per prompt
    nnsight             the same layers saved through nnsight's trace (only when nnsight is installed)
and prints each as a ratio to the bare forward, plus bytes stored per token against layers x hidden x dtype.

Example (from the repo root; bench is a package, not installed):
    python -m bench.bench_capture                              # 8-layer 1024-wide Llama, CPU, fp32
    python -m bench.bench_capture --shape gemma-2-2b --device cuda --dtype bfloat16 --prompts 64
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path


import torch

from bench.common import add_model_args, build_random_model, emit, machine, model_dtype, table, timeit_interleaved, workload
from core.capture import capture_sequences, plan_batch
from utils.raw import build_raw
from utils.storage import BackgroundWriter


def batches(seqs: list[list[int]], budget: int) -> list[list[int]]:
    """The batches capture_sequences forms: longest first, padded tokens under the budget."""
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: (-lengths[i], i))
    out, start = [], 0
    while start < len(order):
        take = plan_batch(lengths, order, start, budget, None)
        out.append(order[start:start + take])
        start += take
    return out


def padded(seqs: list[list[int]], idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(seqs[i]) for i in idx)
    ids = torch.zeros((len(idx), S), dtype=torch.long)
    mask = torch.zeros((len(idx), S), dtype=torch.long)
    for b, i in enumerate(idx):
        ids[b, :len(seqs[i])] = torch.tensor(seqs[i])
        mask[b, :len(seqs[i])] = 1
    return ids.to(device), mask.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="also append the table to this markdown file")
    a = p.parse_args(argv)
    dtype = model_dtype(a)
    torch.set_grad_enabled(False)

    model = build_random_model(a.shape, a.device, dtype)
    cfg = model.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    layers = list(range(n_layers))
    seqs = workload(a.prompts, a.min_len, a.max_len, cfg.vocab_size)
    groups = batches(seqs, a.max_batch_tokens)
    decoder = model.get_decoder()
    tmp = Path(tempfile.mkdtemp(prefix="bench_capture_"))
    written = {"bytes": 0}

    def bare():
        for idx in groups:
            ids, mask = padded(seqs, idx, a.device)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def ours_memory():
        for _ in capture_sequences(model, seqs, layers, ["residual"], pad_id=0, max_batch_tokens=a.max_batch_tokens):
            pass

    def ours_disk():  # capture_raw_activations' loop: build_raw + atomic writes on the background writer
        with BackgroundWriter() as writer:
            for i, acts in capture_sequences(model, seqs, layers, ["residual"], pad_id=0,
                                             max_batch_tokens=a.max_batch_tokens):
                ids = seqs[i]
                data = {"token_ids": ids, "prompt_end": len(ids) // 2, "tokens": [str(t) for t in ids],
                        "prompt": "", "response": ""}
                writer.submit(tmp / f"{i}.pt", build_raw(data, acts, data["tokens"], False, {"bench": True}))
        written["bytes"] = writer.bytes

    def hf_hidden_states():
        for idx in groups:
            ids, mask = padded(seqs, idx, a.device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                        logits_to_keep=1)
            hs = torch.stack(out.hidden_states[1:]).to("cpu")
            for b, i in enumerate(idx):
                _ = [hs[layer, b, :len(seqs[i])].clone() for layer in layers]

    fns = {"bare forward": bare, "ours in memory": ours_memory, "ours to .pt files": ours_disk,
           "HF hidden states": hf_hidden_states}
    try:
        from nnsight import NNsight

        wrapped = NNsight(model)
        blocks = wrapped.model.layers

        def nnsight_capture():
            for idx in groups:
                ids, mask = padded(seqs, idx, a.device)
                saved: list = []  # filled inside the trace (nnsight runs the body out of this frame)
                with wrapped.trace(input_ids=ids, attention_mask=mask, use_cache=False):
                    for layer in layers:
                        saved.append(blocks[layer].output.save())
                for b, i in enumerate(idx):
                    _ = [(s[0] if isinstance(s, tuple) else s)[b, :len(seqs[i])].to("cpu") for s in saved]

        fns["nnsight"] = nnsight_capture
    except Exception as e:  # optional: pip install nnsight
        print(f"(nnsight not run: {type(e).__name__}: {e})")

    times = timeit_interleaved(fns, rounds=a.rounds, warmup=1, device=a.device)
    n_tokens = sum(len(s) for s in seqs)
    elem = torch.finfo(dtype).bits // 8
    per_token = written["bytes"] / n_tokens
    ideal = n_layers * hidden * elem
    shutil.rmtree(tmp, ignore_errors=True)

    head = (f"bench_capture: {a.shape} ({n_layers} layers x {hidden}), {dtype}, {a.device}; {a.prompts} prompts, "
            f"{n_tokens} tokens, {len(groups)} batches (<= {a.max_batch_tokens} padded tokens), residual at every "
            f"layer; medians of {a.rounds} interleaved rounds\nmachine: {machine()}")
    body = table(times, "bare forward")
    tail = (f"bytes stored per token: {per_token:,.0f} vs layers x hidden x dtype = {ideal:,} "
            f"({per_token / ideal:.4f}x)\n"
            f"capture to disk / bare forward: {statistics.median(times['ours to .pt files']) / statistics.median(times['bare forward']):.3f}")
    if "nnsight" in times:
        tail += (f"\ncapture in memory / nnsight: "
                 f"{statistics.median(times['ours in memory']) / statistics.median(times['nnsight']):.3f}")
    report = f"{head}\n\n{body}\n\n{tail}\n"
    emit(report, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
