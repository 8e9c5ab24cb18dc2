#!/usr/bin/env python
"""The one check to run on a lent device (bench/gpu_check.sh calls this; < 8 minutes on one H100/H200).

1. Throughput and its bound, on a random model of a real shape (default gemma-2-2b on CUDA, bf16):
   the bare decoder forward (tokens/s), the device-to-host copy into pinned memory (GB/s; a host memcpy
   on CPU), the disk's sustained fsync'd write rate in the experiment folder (GB/s), capture in memory
   (core.capture) and capture to disk (the script's own stage, .pt files and all), each as a ratio to the
   bare forward, and the bound  min(forward rate, copy rate / bytes per token, disk rate / bytes per token)
   with capture-to-disk throughput as a fraction of it.
2. Fused projection (bench/bench_fused.py) and live chat vs HF generate (bench/bench_stream.py), when present.
3. Generate vs HF generate (bench/bench_generate.py).
4. bf16 capture is exact: zoo models in bf16 on the device vs HF output_hidden_states, the decomposition
   identity, batched vs one by one.
5. bitsandbytes 8-bit and 4-bit: load + capture, relative error vs the fp32 model, metadata.

`--device cpu` runs the same on the CPU with a quick shape, so the script is checked where no GPU is lent.
Writes a markdown report to --out as it goes (a run cut short still leaves its table).

Example (from the repo root):
    bash bench/gpu_check.sh                                   # on the lent GPU; $OUT/gpu_check.md
    python -m bench.gpu_check --device cpu --out /tmp/gpu_check_cpu.md
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import os
import shutil
import signal
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

# Workloads per device: the CUDA one is the (gemma-2-2b shape, bf16, 16 prompts, one batch); the CPU
# one is small enough for two shared cores and still several batches.
PRESETS = {
    "cuda": dict(shape="gemma-2-2b", dtype="bfloat16", prompts=16, min_len=128, max_len=384, budget=8192,
                 disk_mb=2048, copy_mb=1024, rounds=3),
    "cpu": dict(shape="llama-8x1024", dtype="float32", prompts=6, min_len=64, max_len=160, budget=512,
                disk_mb=256, copy_mb=256, rounds=2),
}


def say(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)
    if OUT_FILE:
        OUT_FILE[0].write_text("\n".join(REPORT) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# 1. Throughput and the bound

def copy_rate(device: str, megabytes: int, dtype: torch.dtype) -> float:
    """GB/s of one device buffer copied into pinned host memory (CUDA), or a host memcpy (CPU)."""
    n = megabytes * (1 << 20) * 8 // torch.finfo(dtype).bits  # elements
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty(n, dtype=dtype, pin_memory=device.startswith("cuda"))
    times = []
    for r in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return n * src.element_size() / statistics.median(times) / 1e9


def disk_rate(folder: Path, megabytes: int, passes: int = 2) -> float:
    """GB/s of a sustained write of `megabytes` in 16 MiB chunks to `folder`, fsync'd (median of `passes`)."""
    chunk = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = chunk.numpy().tobytes()  # random bytes: a compressing file system cannot shortcut them
    path = folder / f".gpu_check_disk_{os.getpid()}.tmp"
    rates = []
    try:
        for _ in range(passes):
            t0 = time.perf_counter()
            with open(path, "wb") as fh:
                for _ in range(max(1, megabytes // 16)):
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            rates.append(max(1, megabytes // 16) * len(data) / (time.perf_counter() - t0) / 1e9)
            path.unlink()
    finally:
        if path.exists():
            path.unlink()
    return statistics.median(rates)


def _experiment(root: Path, seqs: list[list[int]], tok) -> None:
    """A scratch experiment in `root` whose variant `v` has one response JSON per sequence."""
    from utils import paths
    from utils.responses import build_response
    from utils.storage import write_json

    (root / "bench").mkdir(parents=True)
    (root / "bench" / "config.json").write_text(json.dumps(
        {"defaults": {"extraction": "v", "application": "v"}, "model_variants": {"v": {"model": "random"}}}))
    for i, ids in enumerate(seqs, start=1):
        rec = build_response("", "", ids, len(ids) // 3, [tok.decode([t]) for t in ids], "random")
        write_json(paths.response_file("bench", "v", "set", i), rec)


def check_throughput(device: str, preset: dict, folder: Path) -> None:
    from bench.bench_capture import batches, padded
    from bench.common import build_random_model, timeit_interleaved, workload
    from core.capture import capture_sequences
    from inference.capture_raw_activations import capture_raw_activations
    from utils.model import DTYPES, LoadedModel
    from utils.zoo import build_tokenizer

    dtype = DTYPES[preset["dtype"]]
    model = build_random_model(preset["shape"], device, dtype)
    cfg = model.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    per_token = n_layers * hidden * torch.finfo(dtype).bits // 8  # residual at every layer, as stored
    tok = build_tokenizer()
    seqs = workload(preset["prompts"], preset["min_len"], preset["max_len"], len(tok))
    n_tokens = sum(map(len, seqs))
    groups = batches(seqs, preset["budget"])
    decoder = model.get_decoder()
    root = Path(tempfile.mkdtemp(prefix="gpu_check_exp_", dir=folder))
    old_root = os.environ.get("TRAIT_EXPERIMENTS_DIR")
    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root)
    try:
        _experiment(root, seqs, tok)
        loaded = LoadedModel(model, tok, {"model": f"random {preset['shape']}", "dtype": preset["dtype"]})
        say(f"## 1. Throughput: {preset['shape']} ({n_layers} layers x {hidden}), {preset['dtype']}, {device}; "
            f"{len(seqs)} prompts, {n_tokens:,} tokens, {len(groups)} batches (<= {preset['budget']} padded tokens); "
            f"residual at every layer = {per_token:,} bytes per token")
        copy_gbps = copy_rate(device, preset["copy_mb"], dtype)
        disk_gbps = disk_rate(root, preset["disk_mb"])

        def bare():
            with torch.no_grad():
                for idx in groups:
                    ids, mask = padded(seqs, idx, device)
                    decoder(input_ids=ids, attention_mask=mask, use_cache=False)

        def in_memory():
            for _ in capture_sequences(model, seqs, list(range(n_layers)), ["residual"], pad_id=0,
                                       max_batch_tokens=preset["budget"]):
                pass

        def to_disk():  # the script's stage: plan (JSONs read and checked), capture, .pt files written atomically
            capture_raw_activations("bench", "set", loaded=loaded, max_batch_tokens=preset["budget"], overwrite=True,
                                    progress=False)

        times = timeit_interleaved({"bare forward": bare, "capture in memory": in_memory,
                                    "capture to disk": to_disk}, rounds=preset["rounds"], warmup=1, device=device)
    finally:
        if old_root is None:
            os.environ.pop("TRAIT_EXPERIMENTS_DIR", None)
        else:
            os.environ["TRAIT_EXPERIMENTS_DIR"] = old_root
        shutil.rmtree(root, ignore_errors=True)
    _throughput_table(times, n_tokens, per_token, copy_gbps, disk_gbps, device, folder)


def _throughput_table(times: dict[str, list[float]], n_tokens: int, per_token: int, copy_gbps: float,
                      disk_gbps: float, device: str, folder: Path) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_tokens / v for k, v in med.items()}
    limits = {"forward": rate["bare forward"], "copy": copy_gbps * 1e9 / per_token,
              "disk": disk_gbps * 1e9 / per_token}
    bound_by = min(limits, key=limits.get)
    bound = limits[bound_by]
    copy_name = "pinned device-to-host copy" if device.startswith("cuda") else "host memcpy (no device copy on CPU)"
    say("| measure | value | tokens/s | ratio to bare forward (time) |")
    say("|---|---:|---:|---:|")
    say(f"| bare forward | {med['bare forward'] * 1e3:,.1f} ms | {rate['bare forward']:,.0f} | 1.000 |")
    say(f"| {copy_name} | {copy_gbps:,.2f} GB/s | {limits['copy']:,.0f} | |")
    say(f"| disk write, fsync'd, in {folder} | {disk_gbps:,.2f} GB/s | {limits['disk']:,.0f} | |")
    for k in ("capture in memory", "capture to disk"):
        say(f"| {k} | {med[k] * 1e3:,.1f} ms | {rate[k]:,.0f} | {med[k] / med['bare forward']:.3f} |")
    say()
    say(f"bound = min(forward {limits['forward']:,.0f}, copy {limits['copy']:,.0f}, disk {limits['disk']:,.0f}) = "
        f"**{bound:,.0f} tokens/s** ({bound_by}); capture to disk = **{rate['capture to disk'] / bound:.2f}** of the "
        f"bound (target >= 0.8); capture in memory / bare forward = **{med['capture in memory'] / med['bare forward']:.3f}** "
        f"(target <= 1.3)")
    say()


# ---------------------------------------------------------------------------------------------------
# 2-3. The other benchmarks, when their scripts exist

def run_bench(title: str, module: str, args: list[str]) -> None:
    say(f"## {title}: python -m bench.{module} {' '.join(args)}")
    if importlib.util.find_spec(f"bench.{module}") is None:
        say(f"not measured: bench/{module}.py is not in this tree")
        say()
        return
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            importlib.import_module(f"bench.{module}").main(args)
    except (Exception, SystemExit) as e:
        buf.write(f"FAILED: {type(e).__name__}: {e}\n")
        traceback.print_exc()
    for line in buf.getvalue().splitlines():
        say(line)
    say()


# ---------------------------------------------------------------------------------------------------
# 4-5. Exactness on zoo models

def check_bf16_capture(zoo: Path, device: str) -> None:
    from core.capture import capture_sequences
    from core.hooks import COMPONENTS
    from utils.model import load_model
    from utils.zoo import build_model

    say(f"## 4. bf16 capture vs HF (zoo models, {device})")
    say("| arch | max rel err residual vs HF hidden states | max identity err | batched vs single (max abs) |")
    say("|---|---:|---:|---:|")
    seqs = [[1] + [(7 * i + 3 * k) % 300 + 6 for i in range(n)] for k, n in enumerate((23, 9, 16))]
    for arch in ("llama", "gemma2", "qwen2", "olmo2", "mixtral"):
        try:
            lm = load_model(str(build_model(arch, zoo / arch)), dtype="bfloat16", device_map=device)
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
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception as e:  # keep going: one architecture's failure is a finding, not the end of the check
            say(f"| {arch} | FAILED: {type(e).__name__}: {e} | | |")
            traceback.print_exc()
    say()


def check_bnb(zoo: Path, device: str) -> None:
    from core.capture import capture_sequences
    from utils.model import load_model
    from utils.zoo import build_model

    say(f"## 5. bitsandbytes ({device}; zoo llama, 4 layers x 64)")
    say("| load | quantization (metadata) | compute dtype | rel err of residuals vs fp32 |")
    say("|---|---|---|---:|")
    path = str(build_model("llama", zoo / "llama"))
    seqs = [[1] + [(5 * i + 11 * k) % 300 + 6 for i in range(n)] for k, n in enumerate((20, 12))]
    ref_lm = load_model(path, dtype="float32")
    ref = dict(capture_sequences(ref_lm.model, seqs, [0, 1, 2, 3], ["residual"], pad_id=0))
    for flag in ("load_in_8bit", "load_in_4bit"):
        try:
            lm = load_model(path, dtype="float16" if device.startswith("cuda") else "float32", **{flag: True})
            got = dict(capture_sequences(lm.model, seqs, [0, 1, 2, 3], ["residual"], pad_id=0))
            err = max(rel(got[k][layer]["residual"], ref[k][layer]["residual"]) for k in got for layer in got[k])
            say(f"| {flag} | {lm.info['quantization']} | {lm.info['dtype']} | {err:.3f} |")
        except Exception as e:
            say(f"| {flag} | FAILED: {type(e).__name__}: {e} | | |")
            traceback.print_exc()
    say()


# ---------------------------------------------------------------------------------------------------

def _versions() -> str:
    import transformers

    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except Exception as e:
        bnb = f"not importable ({type(e).__name__})"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when present) or cpu (a quick shape, to check the script itself)")
    p.add_argument("--out", default="bench/results/gpu_check.md")
    p.add_argument("--dir", default=None, help="folder whose disk is measured and written to "
                                               "(default: the experiments folder, utils.paths.experiments_root())")
    p.add_argument("--shape", default=None, help="model shape for part 1 (default: gemma-2-2b on CUDA, "
                                                 "llama-8x1024 on CPU)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: throughput,fused,stream,generate,bf16,bnb")
    a = p.parse_args(argv)
    # gpu_check.sh's timeout sends SIGTERM: exit through the finally blocks, so no scratch folder is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (use --device cpu to check the script)")
        return 2
    preset = dict(PRESETS[kind], **({"shape": a.shape} if a.shape else {}))
    skip = set(filter(None, a.skip.split(",")))
    from utils import paths

    folder = Path(a.dir) if a.dir else paths.experiments_root()
    folder.mkdir(parents=True, exist_ok=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.append(Path(a.out))
    name = torch.cuda.get_device_name(0) if kind == "cuda" else f"CPU ({os.cpu_count()} cores)"
    say(f"# gpu_check: {name}, {_versions()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say()
    t0 = time.perf_counter()
    zoo = Path(tempfile.mkdtemp(prefix="zoo_"))
    quick = kind == "cpu"
    if "throughput" not in skip:
        check_throughput(a.device, preset, folder)
        if kind == "cuda":  # the random model is gone with the call: hand its blocks back
            torch.cuda.empty_cache()
    if "fused" not in skip:
        run_bench("2a. Fused projection", "bench_fused",
                  ["--device", a.device, "--prompts", "6", "--min-len", "64", "--max-len", "160", "--traits", "4",
                   "--rounds", "1"] if quick else ["--device", a.device])
    if "stream" not in skip:
        run_bench("2b. Live chat vs HF generate", "bench_stream",
                  ["--device", a.device, "--pairs", "3", "--max-new-tokens", "16"] if quick else
                  ["--device", a.device, "--arch", "gemma2", "--num-layers", "26", "--pairs", "7",
                   "--max-new-tokens", "64"])
    if "generate" not in skip:
        run_bench("3. Generate vs HF generate", "bench_generate",
                  ["--device", a.device, "--batch", "4", "--prompt-len", "32", "--max-new-tokens", "8",
                   "--rounds", "1"] if quick else
                  ["--shape", preset["shape"], "--device", a.device, "--batch", "8", "--prompt-len", "128",
                   "--max-new-tokens", "64", "--rounds", "3"])
    if "bf16" not in skip:
        check_bf16_capture(zoo, a.device)
    if "bnb" not in skip:
        check_bnb(zoo, a.device)
    shutil.rmtree(zoo, ignore_errors=True)
    say(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
