#!/usr/bin/env python
"""Projection speed: project_raw_activations_onto_traits on many .pt files vs the time to read the bytes it needs.

Builds a scratch experiment (random activations in the capture .pt format, K traits with a vector at every
layer), then times, interleaved (warm-up, then medians):
    read needed bytes     load each .pt (mmap) and copy out the one layer each trait projects on
    read whole files      read every .pt file's bytes (what a loader without mmap would pay)
    project (the script)  project_raw_activations_onto_traits(..., layers=L): every trait, every file, JSON written
and prints files/s and the ratio of projection to reading the needed bytes.

Example (from the repo root; bench is a package, not installed):
    python -m bench.bench_project                          # 200 files, 26 layers x 2304, bf16, 8 traits
    python -m bench.bench_project --files 1000 --traits 32
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

from bench.common import emit, machine, timeit_interleaved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--hidden", type=int, default=2304)
    p.add_argument("--tokens", type=int, default=120, help="tokens per prompt (half prompt, half response)")
    p.add_argument("--traits", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_project_"))
    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root)
    from utils.raw import build_raw
    from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits
    from utils import paths
    from utils.storage import load_pt, write_json, write_pt

    exp, variant, pset, layer = "bench", "v", "set", a.layers // 2
    (root / exp).mkdir(parents=True)
    (root / exp / "config.json").write_text(json.dumps(
        {"defaults": {"extraction": variant, "application": variant}, "model_variants": {variant: {"model": "none"}}}))
    g = torch.Generator().manual_seed(0)
    for i in range(a.files):
        ids = list(range(a.tokens))
        acts = {L: {"residual": torch.randn(a.tokens, a.hidden, generator=g).to(torch.bfloat16)}
                for L in range(a.layers)}
        data = {"token_ids": ids, "prompt_end": a.tokens // 2, "tokens": [str(t) for t in ids], "prompt": "",
                "response": ""}
        write_pt(paths.raw_file(exp, variant, pset, i), build_raw(data, acts, data["tokens"], False, {"bench": True}))
    traits = [f"bench/t{k}" for k in range(a.traits)]
    for t in traits:
        for L in range(a.layers):
            v = torch.randn(a.hidden, generator=g)
            write_pt(paths.vector_file(exp, t, variant, "response__5", "residual", "probe", L), v / v.norm())
        write_json(paths.vector_metadata(exp, t, variant, "response__5", "residual", "probe"),
                   {"trait": t, "method": "probe", "component": "residual", "position": "response[:5]",
                    "layers": {str(L): {"norm": 1.0, "baseline": 0.0} for L in range(a.layers)}})
    files = sorted(paths.raw_dir(exp, variant, pset).glob("*.pt"))
    total_bytes = sum(f.stat().st_size for f in files)
    needed = a.files * a.tokens * a.hidden * 2

    def read_needed():
        for f in files:
            d = load_pt(f)
            for side in ("prompt", "response"):
                d[side]["activations"][layer]["residual"].clone()

    def read_whole():
        for f in files:
            f.read_bytes()

    def project():
        project_raw_activations_onto_traits(exp, pset, model_variant=variant, traits=traits, layers=str(layer),
                                            no_calibration=True, overwrite=True, progress=False)

    times = timeit_interleaved({"read needed bytes": read_needed, "read whole files": read_whole,
                                "project (the script)": project}, rounds=a.rounds, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"bench_project: {a.files} files of {a.tokens} tokens, {a.layers} layers x {a.hidden} bf16 "
             f"({total_bytes / 1e6:.0f} MB; {needed / 1e6:.1f} MB needed for one layer), {a.traits} traits at layer "
             f"{layer}; medians of {a.rounds} interleaved rounds (page cache warm)", f"machine: {machine()}", "",
             "| method | median s | files/s | ratio to read needed bytes |", "|---|---:|---:|---:|"]
    for k, s in med.items():
        lines.append(f"| {k} | {s:.3f} | {a.files / s:.0f} | {s / med['read needed bytes']:.2f} |")
    report = "\n".join(lines) + "\n"
    emit(report, a.out)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
