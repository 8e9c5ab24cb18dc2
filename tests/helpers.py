"""Writers and oracles shared by several test files (import them from here, never from another test file).

    write_vector(exp, trait, variant, position, method, layer, vector, ...)   a layer{L}.pt and its metadata.json
                                                entry, as trait-interp's extraction writes them
    write_steering(exp, trait, variant, position, runs, ...)   a steering results.jsonl (header, baseline, runs)
    write_vectors(exp, variant="base", traits=TRAITS, ...)     random unit vectors for several traits and layers,
                                                with val_accuracy deciding each trait's best layer
    write_responses(exp, variant, prompt_set, model_dir, pairs=PAIRS, ...)   response JSONs as
                                                generate_responses.py writes them
    mlp_oracle(arch, block, h_mid)              the MLP half of a zoo block, recomputed from its own submodules
                                                (knowledge written from the HF modelling code, not core/hooks.py)
    PAIRS, TRAITS, POSITION                     the writers' default data
    batch_world(...), plain_batch_runs(), BATCH_PROMPTS, BATCH_IDS   a batch run's experiment and its one-process oracle
    tree(folder), assert_same(a, b, where), assert_same_trees(expected, got), stamps(folder)   file-for-file
                                                comparison of two output trees (floats within 1e-5 relative)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from utils import paths
from utils.model import decode_tokens, format_prompt, load_tokenizer, tokenize_continuation, tokenize_prompt
from utils.responses import build_response
from utils.storage import load_pt, write_json
from utils.vectors import sanitize_position

# val_accuracy per layer: the best layers (2 and 1) are not the last, whose HF hidden state is after the final norm
TRAITS = {"behavioral/refusal": {1: 0.80, 2: 0.95, 3: 0.60}, "cognitive/honesty": {1: 0.90, 2: 0.50, 3: 0.70}}
POSITION = "response[:5]"


PAIRS = [  # (user prompt, response); one empty response: a prompt-only record
    ("What is a model?", "I think the answer is good."),
    ("Tell me a story about honest code, please.", "yes"),
    ("hi", "the model will help you write code; it would be kind."),
    ("Why?", ""),
]


# ---- vectors and steering results ---------------------------------------------------------------------------------
def write_vector(exp: str, trait: str, variant: str, position: str, method: str, layer: int,
                 vector: torch.Tensor, component: str = "residual", **layer_meta) -> Path:
    """A layer{L}.pt as trait-interp writes it, and its entry in the method's metadata.json."""
    pos_dir = sanitize_position(position)
    path = paths.vector_file(exp, trait, variant, pos_dir, component, method, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vector, path)
    meta_path = paths.vector_metadata(exp, trait, variant, pos_dir, component, method)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
        "model": "m", "trait": trait, "method": method, "component": component, "position": position, "layers": {}}
    meta["layers"][str(layer)] = {"norm": float(vector.float().norm()), **layer_meta}
    meta_path.write_text(json.dumps(meta))
    return path


def write_steering(exp: str, trait: str, variant: str, position: str, runs: list[tuple], direction: str = "positive",
                   baseline: float = 50.0, naturalness: dict | None = None, extra_lines: list[str] = ()) -> Path:
    """results.jsonl with a header, a baseline line and runs (layer, method, trait_mean, coherence[, weight])."""
    path = paths.steering_results(exp, trait, variant, sanitize_position(position))
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"type": "header", "trait": trait, "direction": direction}),
             json.dumps({"type": "baseline", "result": {"trait_mean": baseline}})]
    for run in runs:
        layer, method, trait_mean, coherence, *weight = run
        lines.append(json.dumps({
            "result": {"trait_mean": trait_mean, "coherence_mean": coherence},
            "config": {"vectors": [{"layer": layer, "method": method, "component": "residual",
                                    "position": position, "weight": weight[0] if weight else 4.0}]}}))
    lines += list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    if naturalness is not None:
        (path.parent / "naturalness.json").write_text(json.dumps({"scores": {
            f"{l}_{m}": {"layer": l, "method": m, "component": "residual", "mean": s}
            for (l, m), s in naturalness.items()}}))
    return path


def write_vectors(exp: str, variant: str = "base", traits: dict = TRAITS, seed: int = 0, hidden: int = 64,
                  method: str = "probe") -> dict[str, dict[int, torch.Tensor]]:
    """Random unit vectors + metadata.json (val_accuracy decides the best layer) in the layout of docs/formats.md."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[int, torch.Tensor]] = {}
    pos_dir = sanitize_position(POSITION)
    for trait, accs in traits.items():
        meta = {"model": "zoo", "trait": trait, "method": method, "component": "residual", "position": POSITION,
                "layers": {}}
        for layer, acc in accs.items():
            v = torch.randn(hidden, generator=g)
            v = v / v.norm()
            path = paths.vector_file(exp, trait, variant, pos_dir, "residual", method, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(v, path)
            meta["layers"][str(layer)] = {"norm": 1.0, "baseline": 0.0, "val_accuracy": acc, "val_separation": 1.0}
            out.setdefault(trait, {})[layer] = v
        write_json(paths.vector_metadata(exp, trait, variant, pos_dir, "residual", method), meta)
    return out


# ---- response JSONs -----------------------------------------------------------------------------------------------
def write_responses(exp: str, variant: str, prompt_set: str, model_dir: str, pairs=PAIRS, ids=None,
                    multi_turn: int | None = None) -> dict[str, dict]:
    """Response JSONs as generate_responses.py writes them: chat-formatted prompt ids + continuation ids.

    multi_turn=k: record k follows the rollout convention (response == "", full token_ids, prompt_end inside).
    """
    tok = load_tokenizer(model_dir)
    ids = ids or [str(i + 1) for i in range(len(pairs))]
    out = {}
    for k, (pid, (prompt, response)) in enumerate(zip(ids, pairs)):
        text, note = format_prompt(tok, prompt)
        p_ids = tokenize_prompt(tok, text)
        r_ids = tokenize_continuation(tok, response)
        if k == multi_turn:
            p_ids, r_ids, response = p_ids + r_ids[:2], r_ids[2:], ""
        all_ids = p_ids + r_ids
        rec = build_response(text, response, all_ids, len(p_ids), decode_tokens(tok, all_ids), model_dir,
                             prompt_note=note)
        write_json(paths.response_file(exp, variant, prompt_set, pid), rec)
        out[pid] = rec
    return out


# ---- oracles ------------------------------------------------------------------------------------------------------
def mlp_oracle(arch: str, block: nn.Module, h_mid: torch.Tensor) -> torch.Tensor:
    """The MLP half of the block recomputed by calling its submodules by hand on residual + attention."""
    if arch == "gemma2":
        out = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h_mid)))
    elif arch == "olmo2":
        out = block.post_feedforward_layernorm(block.mlp(h_mid))
    elif arch == "gpt2":
        out = block.mlp(block.ln_2(h_mid))
    else:  # llama, mistral, qwen2, phi3, mixtral (the whole sparse expert block)
        out = block.mlp(block.post_attention_layernorm(h_mid))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(h_mid.shape)


# ---- subprocess checks --------------------------------------------------------------------------------------------
# Python source to put first in a `python -c` script: every socket call fails, so an import that reaches for the
# network (Modal's client, a hub lookup) fails loudly instead of hanging.
BLOCK_NETWORK = """import socket
def _blocked(*a, **k):
    raise OSError("network blocked by the test")
socket.socket.connect = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
"""


# ---- batch runs (tests/test_batch.py, test_modal_batch.py, test_ray_batch.py) --------------------------------------
BATCH_PROMPTS = {"prompts": [
    {"id": 1, "text": "hello"},
    {"id": 2, "text": "the model will refuse to help the user because it is rude and harmful, a long prompt"},
    {"id": 3, "text": "why?"},
    {"id": 10, "text": "write a poem about café 日本 🙂 please, a long one with many words in it"},
    {"id": "b", "text": "what is 42"},
    {"id": 7, "text": "tell me a story about honest code"},
    {"id": 11, "text": "yes or no"},
]}
BATCH_IDS = ["1", "2", "3", "7", "10", "11", "b"]
VOLATILE = {"capture_date", "projection_date", "date", "computed_by"}   # differ between two runs by design


def tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same(a, b, where: str) -> None:
    """Equal apart from VOLATILE keys; floats and tensors within 1e-5 relative (of the larger magnitude)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-30)
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * scale, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            if k not in VOLATILE:
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        floats = [x for x in a if isinstance(x, float)]
        scale = max((abs(x) for x in floats), default=0.0)
        for i, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, float) and isinstance(y, (int, float)):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5 * scale), f"{where}[{i}]: {x} vs {y}"
            else:
                assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_trees(expected: Path, got: Path) -> int:
    want, have = tree(expected), tree(got)
    assert set(want) == set(have), f"files only in one tree: {sorted(set(want) ^ set(have))}"
    for rel, path in want.items():
        if path.suffix == ".pt":
            assert_same(load_pt(path, mmap=False), load_pt(have[rel], mmap=False), rel)
        else:
            assert_same(json.loads(path.read_text(encoding="utf-8")),
                        json.loads(have[rel].read_text(encoding="utf-8")), rel)
    return len(want)


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file: an atomic rewrite gives a new inode, so an untouched file keeps both."""
    return {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in tree(folder).items()}




def batch_world(tmp_path: Path, monkeypatch, experiments, zoo) -> Path:
    """Experiment `e` (tiny llama, variant base), prompt set `tiny` (BATCH_PROMPTS, 7 prompts), two traits' vectors."""
    root = tmp_path / "datasets"
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(root))
    (root / "inference").mkdir(parents=True)
    (root / "inference" / "tiny.json").write_text(json.dumps(BATCH_PROMPTS, ensure_ascii=False), encoding="utf-8")
    experiments("e", {"base": {"model": zoo("llama")}})
    write_vectors("e", hidden=64)
    return paths.experiment_dir("e")


def plain_batch_runs(stages=("generate", "capture", "project")) -> None:
    """The single-process oracle of a batch run on batch_world: each stage function once over the whole set."""
    from inference.capture_raw_activations import capture_raw_activations
    from inference.generate_responses import generate_responses
    from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits

    if "generate" in stages:
        generate_responses("e", "tiny", max_new_tokens=6, no_server=True, progress=False)
    if "capture" in stages:
        capture_raw_activations("e", "tiny", progress=False)
    if "project" in stages:
        project_raw_activations_onto_traits("e", prompt_set="tiny", fused=True, progress=False)
