#!/usr/bin/env python
"""What only a GPU can show, in one run (bench/gpu_check.sh calls this; < 8 minutes on one H100).

1. bf16 CUDA capture is exact: on zoo models (llama, gemma2, qwen2, olmo2, mixtral) in bf16 on the GPU,
   captured residuals vs HF output_hidden_states, the residual decomposition identity, batched vs one by one.
2. bitsandbytes 8-bit and 4-bit on CUDA: load + capture, relative error vs the fp32 model, metadata.
3. Speed on a full-size random model (default gemma-2-2b shape, bf16): bench_capture and bench_generate.
4. Streaming overhead: core.streaming's per-token trait scores vs plain HF greedy generate, same tokens.
Writes a markdown table to --out (bench/gpu_check.sh passes $OUT/gpu_check.md).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub when transformers is first imported

REPORT: list[str] = []
OUT_FILE: list[Path] = []  # written after every line, so a run cut short still leaves its table


def say(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)
    if OUT_FILE:
        OUT_FILE[0].write_text("\n".join(REPORT) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_bf16_capture(zoo: Path) -> None:
    from core.capture import capture_sequences
    from core.hooks import COMPONENTS
    from utils.model import load_model
    from utils.zoo import build_model

    say("## 1. bf16 CUDA capture vs HF (zoo models)")
    say("| arch | max rel err residual vs HF hidden states | max identity err | batched vs single (max abs) |")
    say("|---|---:|---:|---:|")
    seqs = [[1] + [(7 * i + 3 * k) % 300 + 6 for i in range(n)] for k, n in enumerate((23, 9, 16))]
    for arch in ("llama", "gemma2", "qwen2", "olmo2", "mixtral"):
        try:
            lm = load_model(str(build_model(arch, zoo / arch)), dtype="bfloat16")
            m = lm.model
            L = m.config.num_hidden_layers
            batched = dict(capture_sequences(m, seqs, list(range(L)), list(COMPONENTS), pad_id=0))
            single = {k: dict(capture_sequences(m, [s], list(range(L)), list(COMPONENTS), pad_id=0))[0]
                      for k, s in enumerate(seqs)}
            err_hs, err_id, err_b = 0.0, 0.0, 0.0
            for k, s in enumerate(seqs):
                with torch.no_grad():
                    hs = m(torch.tensor([s], device=lm.device), output_hidden_states=True).hidden_states
                acts = batched[k]
                for layer in range(L - 1):  # the last HF hidden state has the final norm applied
                    err_hs = max(err_hs, rel(acts[layer]["residual"], hs[layer + 1][0].cpu()))
                prev = hs[0][0].cpu().float()
                for layer in range(L):
                    a = acts[layer]
                    err_id = max(err_id, rel(a["residual"].float() - prev,
                                             a["attn_contribution"].float() + a["mlp_contribution"].float()))
                    prev = a["residual"].float()
                    err_b = max(err_b, float((a["residual"].float() - single[k][layer]["residual"].float()).abs().max()))
            say(f"| {arch} | {err_hs:.2e} | {err_id:.2e} | {err_b:.2e} |")
            del lm, m
            torch.cuda.empty_cache()
        except Exception as e:  # keep going: one architecture's failure is a finding, not the end of the check
            say(f"| {arch} | FAILED: {type(e).__name__}: {e} | | |")
            traceback.print_exc()
    say()


def check_bnb(zoo: Path) -> None:
    from core.capture import capture_sequences
    from utils.model import load_model
    from utils.zoo import build_model

    say("## 2. bitsandbytes on CUDA (zoo llama, 4 layers x 64)")
    say("| load | quantization (metadata) | compute dtype | rel err of residuals vs fp32 |")
    say("|---|---|---|---:|")
    path = str(build_model("llama", zoo / "llama"))
    seqs = [[1] + [(5 * i + 11 * k) % 300 + 6 for i in range(n)] for k, n in enumerate((20, 12))]
    ref_lm = load_model(path, dtype="float32")
    ref = dict(capture_sequences(ref_lm.model, seqs, [0, 1, 2, 3], ["residual"], pad_id=0))
    for flag in ("load_in_8bit", "load_in_4bit"):
        try:
            lm = load_model(path, dtype="float16", **{flag: True})
            got = dict(capture_sequences(lm.model, seqs, [0, 1, 2, 3], ["residual"], pad_id=0))
            err = max(rel(got[k][layer]["residual"], ref[k][layer]["residual"]) for k in got for layer in got[k])
            say(f"| {flag} | {lm.info['quantization']} | {lm.info['dtype']} | {err:.3f} |")
        except Exception as e:
            say(f"| {flag} | FAILED: {type(e).__name__}: {e} | | |")
            traceback.print_exc()
    say()


def run_bench(module: str, args: list[str]) -> None:
    import importlib

    say(f"## {module} {' '.join(args)}")
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            importlib.import_module(f"bench.{module}").main(args)
    except Exception as e:
        buf.write(f"FAILED: {type(e).__name__}: {e}\n")
        traceback.print_exc()
    for line in buf.getvalue().splitlines():
        say(line)
    say()


def check_stream(shape: str, new_tokens: int) -> None:
    say(f"## 4. Streaming overhead ({shape}, bf16, batch 1, {new_tokens} tokens, 3 traits x every layer)")
    try:
        from bench.common import build_random_model, workload
        from core import streaming

        model = build_random_model(shape, "cuda", torch.bfloat16)
        H, L = model.config.hidden_size, model.config.num_hidden_layers
        g = torch.Generator().manual_seed(0)
        vectors = {f"demo/t{k}": {layer: torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0)
                                  for layer in range(L)} for k in range(3)}
        prompt = workload(1, 64, 64, model.config.vocab_size, seed=3)[0]
        ids = torch.tensor([prompt], device="cuda")
        fn = getattr(streaming, "stream_with_scores")
        times: dict[str, list[float]] = {"HF generate": [], "stream with scores": []}
        for r in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            n = sum(1 for item in fn(model, prompt, vectors, max_new_tokens=new_tokens, stop_ids=[])
                    if item.get("type") == "token")
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if r:
                times["HF generate"].append(t1 - t0)
                times["stream with scores"].append(t2 - t1)
        hf, st = statistics.median(times["HF generate"]), statistics.median(times["stream with scores"])
        say(f"| method | median s | tokens/s |\n|---|---:|---:|\n| HF generate | {hf:.3f} | {new_tokens / hf:.1f} |\n"
            f"| stream with scores | {st:.3f} | {n / st:.1f} |")
        say(f"stream / HF generate time: {st / hf:.3f}")
    except Exception as e:
        say(f"FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()
    say()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu_check.md")
    p.add_argument("--shape", default="gemma-2-2b")
    p.add_argument("--skip", default="", help="comma list of parts to skip: bf16,bnb,capture,generate,stream")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.append(Path(a.out))
    if not torch.cuda.is_available():
        print("error: no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except Exception as e:
        bnb = f"not importable ({e})"
    say(f"# gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, bitsandbytes {bnb}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say()
    t0 = time.perf_counter()
    zoo = Path(tempfile.mkdtemp(prefix="zoo_"))
    if "capture" not in skip:
        run_bench("bench_capture", ["--shape", a.shape, "--device", "cuda", "--prompts", "16", "--min-len", "128",
                                    "--max-len", "384", "--max-batch-tokens", "8192", "--rounds", "3"])
    if "generate" not in skip:
        run_bench("bench_generate", ["--shape", a.shape, "--device", "cuda", "--batch", "8", "--prompt-len", "128",
                                     "--max-new-tokens", "64", "--rounds", "3"])
    if "stream" not in skip:
        check_stream(a.shape, 32)
    if "bf16" not in skip:
        check_bf16_capture(zoo)
    if "bnb" not in skip:
        check_bnb(zoo)
    say(f"total {time.perf_counter() - t0:.0f}s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(REPORT) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
