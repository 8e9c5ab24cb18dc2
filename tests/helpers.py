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
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from utils import paths
from utils.model import decode_tokens, format_prompt, load_tokenizer, tokenize_continuation, tokenize_prompt
from utils.responses import build_response
from utils.storage import write_json
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
