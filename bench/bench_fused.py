#!/usr/bin/env python
"""Fused projection speed: `project_raw_activations_onto_traits.py --fused` against the bare forward it rides
on and against the two-stage path it replaces (never part of the test suite).

Builds a scratch experiment around a random-weight model of a real shape (bench/common.py; the model stays in
memory and is handed to the stages as `loaded=`, so only its config and a word-level tokenizer covering the
vocabulary are written), response JSONs of random token ids, and K traits with vectors at a few layers. Then
times, interleaved in one run (a warm-up that also computes each path's calibration, then medians):
    bare forward to L      the decoder blocks 0..L alone (L = the deepest vector layer), over the batches the
                           fused path forms (same token budget): the floor a fused run pays
    fused projection       the stage with --fused: plan, forward with on-device scoring, every JSON written
    two-stage              capture_raw_activations (residual at every layer, .pt files) + the projection script
and prints fused / bare (target <= 1.05 on CPU, <= 1.10 on a GPU), fused / two-stage, and bytes written per
prompt by each path.

Example (from the repo root; bench is a package, not installed):
    python -m bench.bench_fused                                   # llama-8x1024, CPU, fp32
    python -m bench.bench_fused --device cuda                     # gemma-2-2b shape, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench.common import add_model_args, build_random_model, emit, machine, model_dtype, table, timeit_interleaved, workload


def word_tokenizer(vocab_size: int, folder: Path):
    """A word-level tokenizer with one token per id (t0, t1, ...): the stages only check ids against its vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t0")
    fast.save_pretrained(folder)
    return fast


def build_experiment(root: Path, model, seqs: list[list[int]], n_traits: int, layers: list[int]) -> str:
    from utils import paths
    from utils.responses import build_response
    from utils.storage import write_json

    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root / "experiments")
    model_dir = root / "model"
    model.config.save_pretrained(model_dir)      # the plan reads the depth and width from here; no weights
    word_tokenizer(model.config.vocab_size, model_dir)
    exp = "bench"
    d = paths.experiment_dir(exp)
    d.mkdir(parents=True)
    variants = {v: {"model": str(model_dir)} for v in ("base", "fused", "two")}
    (d / "config.json").write_text(json.dumps({"defaults": {"extraction": "base", "application": "base"},
                                               "model_variants": variants}))
    g = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    for t in range(n_traits):
        folder = paths.vector_method_dir(exp, f"bench/t{t}", "base", "response__5", "residual", "probe")
        folder.mkdir(parents=True)
        meta = {"trait": f"bench/t{t}", "method": "probe", "component": "residual", "position": "response[:5]",
                "layers": {}}
        for layer in layers:
            v = torch.randn(hidden, generator=g)
            torch.save(v / v.norm(), folder / f"layer{layer}.pt")
            meta["layers"][str(layer)] = {"norm": 1.0}
        (folder / "metadata.json").write_text(json.dumps(meta))
    for i, ids in enumerate(seqs):
        end = len(ids) // 2
        write_json(paths.response_file(exp, "base", "set", i),
                   build_response("", "", ids, end, [f"t{t}" for t in ids], str(model_dir)))
    return exp


def truncated_decoder(model, deepest: int):
    """The decoder with blocks 0..deepest only (the final norm is the one extra op): the bare floor."""
    decoder = model.get_decoder()
    full = decoder.layers

    def run(**inputs):
        decoder.layers = nn.ModuleList(full[:deepest + 1])
        try:
            return decoder(**inputs)
        finally:
            decoder.layers = full
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(shape=None)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--traits", type=int, default=8)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="also append the report to this markdown file")
    a = p.parse_args(argv)
    a.shape = a.shape or ("gemma-2-2b" if a.device.startswith("cuda") else "llama-8x1024")
    dtype = model_dtype(a)
    torch.set_grad_enabled(False)

    from bench.bench_capture import batches, padded
    from inference.capture_raw_activations import capture_raw_activations
    from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits as project
    from utils.model import LoadedModel, load_tokenizer

    model = build_random_model(a.shape, a.device, dtype)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    layers = sorted({n_layers // 4, n_layers // 2, (2 * n_layers) // 3})   # the deepest sets the floor
    seqs = workload(a.prompts, a.min_len, a.max_len, model.config.vocab_size)
    root = Path(tempfile.mkdtemp(prefix="bench_fused_"))
    exp = build_experiment(root, model, seqs, a.traits, layers)
    tok = load_tokenizer(str(root / "model"))
    lm = LoadedModel(model, tok, {"model": str(root / "model"), "lora": None, "quantization": None,
                                  "dtype": str(dtype).replace("torch.", "")})
    common = dict(prompt_set="set", layers=",".join(map(str, layers)), overwrite=True, progress=False)
    groups = batches(seqs, a.max_batch_tokens)
    bare_run = truncated_decoder(model, layers[-1])
    summaries: dict[str, dict] = {}

    def bare():
        for idx in groups:
            ids, mask = padded(seqs, idx, a.device)
            bare_run(input_ids=ids, attention_mask=mask, use_cache=False)

    def fused():
        summaries["fused"] = project(exp, model_variant="fused", fused=True, responses_from="base", loaded=lm,
                                     max_batch_tokens=a.max_batch_tokens, **common)

    def two_stage():
        cap = capture_raw_activations(exp, "set", model_variant="two", responses_from="base", loaded=lm,
                                      max_batch_tokens=a.max_batch_tokens, overwrite=True, progress=False)
        summaries["capture"], summaries["project"] = cap, project(exp, model_variant="two", **common)
        os.sync()  # its .pt data reaches the disk inside its own time, not during the next method's fsyncs

    names = {"bare": f"bare forward to layer {layers[-1]}", "fused": "fused projection",
             "two": "two-stage (capture all layers + project)"}
    times = timeit_interleaved({names["bare"]: bare, names["fused"]: fused, names["two"]: two_stage},
                               rounds=a.rounds, warmup=1, device=a.device)
    med = {k: statistics.median(times[v]) for k, v in names.items()}
    n, n_tokens = a.prompts, sum(len(s) for s in seqs)
    fused_bytes = summaries["fused"]["bytes"] / n
    two_bytes = (summaries["capture"]["bytes"] + summaries["project"]["bytes"]) / n
    shutil.rmtree(root, ignore_errors=True)

    head = (f"bench_fused: {a.shape} ({n_layers} layers x {hidden}), {dtype}, {a.device}; {n} prompts, {n_tokens} "
            f"tokens, {len(groups)} batches (<= {a.max_batch_tokens} padded tokens), {a.traits} traits at layers "
            f"{', '.join(map(str, layers))}; medians of {a.rounds} interleaved rounds\nmachine: {machine()}")
    tail = (f"fused / bare forward to layer {layers[-1]}: {med['fused'] / med['bare']:.3f} "
            f"(target <= {'1.10' if a.device.startswith('cuda') else '1.05'})\n"
            f"fused / two-stage: {med['fused'] / med['two']:.3f}\n"
            f"bytes written per prompt: fused {fused_bytes:,.0f} (projection JSONs), two-stage {two_bytes:,.0f} "
            f"(.pt of {n_layers} layers + the same JSONs; {two_bytes / max(fused_bytes, 1):.1f}x)")
    report = f"{head}\n\n{table(times, names['bare'])}\n\n{tail}\n"
    emit(report, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
