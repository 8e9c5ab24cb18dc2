"""Shared benchmark helpers: random-weight models of real shapes, workloads, interleaved timing with medians.

    SHAPES                             named model shapes (config kwargs): llama-8x1024 (default), gemma-2-2b, ...
    build_random_model(shape, device, dtype) -> model   random init directly on the device, no hub, no files
    workload(n, min_len, max_len, vocab, seed) -> [[int]]  deterministic random token sequences
    timeit_interleaved(fns, rounds, warmup) -> {name: [seconds]}  each round runs every fn once, in turn
    sync(device)                       wait for queued GPU work before reading the clock
    table(rows, floor)                 markdown table: median ms and ratio to the floor
    machine()                          one line describing where this ran
    add_model_args(parser) / model_dtype(args)   the --shape/--device/--dtype flags every bench shares
"""
from __future__ import annotations

import os
import platform
import random
import statistics
import time
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub when transformers is first imported

SHAPES: dict[str, dict] = {
    # The default: an 8-layer, 1024-wide Llama (about 0.1B parameters), fast enough for 2 CPU cores.
    "llama-8x1024": dict(arch="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "gemma-2-2b": dict(arch="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
    "llama-3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


def build_random_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       attn_implementation: str | None = None):
    import transformers as T

    if shape not in SHAPES:
        raise SystemExit(f"error: --shape {shape!r} unknown (choose from {', '.join(SHAPES)})")
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    cfg_cls = {"llama": T.LlamaConfig, "gemma2": T.Gemma2Config}[arch]
    cfg = cfg_cls(**spec, max_position_embeddings=8192, tie_word_embeddings=arch == "gemma2", pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model


def add_model_args(p) -> None:
    p.add_argument("--shape", default="llama-8x1024", help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default) or float16")


def model_dtype(a) -> torch.dtype:
    name = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def workload(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len) - 1)] for _ in range(n)]


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                       device: str = "cpu") -> dict[str, list[float]]:
    """Run every fn once per round, in turn (so drift on a shared machine hits all alike); return times per fn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]], floor: str, extra: dict[str, str] | None = None) -> str:
    base = statistics.median(times[floor])
    lines = ["| method | median ms | ratio to " + floor + " |", "|---|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        note = f" {extra[name]}" if extra and name in extra else ""
        lines.append(f"| {name}{note} | {med * 1e3:.1f} | {med / base:.3f} |")
    return "\n".join(lines)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def emit(report: str, out: str | None) -> None:
    """Print a bench's report and, with --out, append it to that file (its folder made when missing)."""
    print(report)
    if out:
        from pathlib import Path
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as fh:
            fh.write(report + "\n")
