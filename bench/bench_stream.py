#!/usr/bin/env python
"""Live-chat streaming speed: stream_with_scores (scores for every trait at every layer) vs HF greedy `generate`.

Both sides do what a chat server does per token: HF `generate` with a streamer that copies each new
token to the host and decodes it (one sync per step, as TextIteratorStreamer does), and
core.streaming.stream_with_scores with TRAITS unit vectors at EVERY layer (the token, its scores and the
decoded text per step). Greedy, the same prompt, the same stop ids; the generated ids are checked equal.
Pairs run back to back, alternating which goes first; the figure is the median of the per-pair time
ratios (stream / HF), with the spread.

Example:
    python bench/bench_stream.py                              # the zoo llama (4 x 64) on CPU
    python bench/bench_stream.py --arch gemma2 --num-layers 12 --max-new-tokens 128 --pairs 9
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from core.streaming import stream_with_scores
from utils.cli import Parser
from utils.model import format_prompt, load_model, stop_token_ids, tokenize_prompt
from utils.zoo import ARCHS, build_model


class SyncStreamer:
    """An HF streamer that copies each step's new token to the host and decodes it (what a chat server does)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.texts, self.first = tokenizer, [], [], True

    def put(self, value: torch.Tensor) -> None:
        if self.first:   # generate() puts the prompt first
            self.first = False
            return
        token = value.reshape(-1).tolist()    # the per-step device -> host copy (a sync on CUDA)
        self.ids += token
        self.texts.append(self.tokenizer.decode(token))

    def end(self) -> None:
        pass


def build_parser() -> Parser:
    p = Parser(prog="bench_stream.py", description=__doc__.split("\n\n")[0],
               epilog="example:\n  python bench/bench_stream.py --pairs 7 --max-new-tokens 64")
    p.add_argument("--arch", default="llama", choices=ARCHS, help="zoo architecture (utils/zoo.py)")
    p.add_argument("--num-layers", type=int, default=None, help="decoder layers of the zoo model (default: its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--traits", type=int, default=4, help="traits, each with a vector at every layer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(str(build_model(a.arch, f"{tmp}/{a.arch}", num_hidden_layers=a.num_layers)), device_map=a.device)
    model, tok = lm.model, lm.tokenizer
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    vectors = {f"t/{k}": {layer: torch.randn(hidden, generator=g) for layer in range(n_layers)}
               for k in range(a.traits)}
    ids = tokenize_prompt(tok, format_prompt(tok, "hello world, tell me about the model")[0])
    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device

    def hf() -> list[int]:
        streamer = SyncStreamer(tok)
        with torch.no_grad():
            model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                           device=device), max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=stops,
                           pad_token_id=stops[0], streamer=streamer)
        return [t for t in streamer.ids if t not in stops]

    def stream() -> list[int]:
        *_, done = stream_with_scores(model, ids, vectors, a.max_new_tokens, stop_ids=stops, tokenizer=tok)
        return done["token_ids"]

    def timed(fn) -> tuple[float, list[int]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    ref = stream()
    if hf() != ref:
        raise SystemExit("error: streamed ids differ from HF greedy generate")
    ratios, t_stream, t_hf = [], [], []
    for i in range(a.pairs):
        order = (("s", stream), ("h", hf)) if i % 2 == 0 else (("h", hf), ("s", stream))
        got = {k: timed(fn) for k, fn in order}
        assert got["s"][1] == got["h"][1] == ref
        t_stream.append(got["s"][0])
        t_hf.append(got["h"][0])
        ratios.append(got["s"][0] / got["h"][0])
    n = len(ref)
    print(f"bench_stream: zoo {a.arch}, {n_layers} layers x {hidden}, {a.device}, {a.threads} thread(s); "
          f"{len(ids)} prompt tokens, {n} generated (greedy, ids equal); {a.traits} traits x {n_layers} layers = "
          f"{a.traits * n_layers} scores per token")
    print(f"stream with scores: median {statistics.median(t_stream) * 1e3:.1f} ms "
          f"({n / statistics.median(t_stream):.0f} tok/s); HF generate + syncing streamer: median "
          f"{statistics.median(t_hf) * 1e3:.1f} ms ({n / statistics.median(t_hf):.0f} tok/s)")
    print(f"stream / HF generate: {statistics.median(ratios):.3f} median of {a.pairs} interleaved pairs "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
