"""Token streaming with per-token trait scores, for one conversation (the live chat's engine).

    stream_with_scores(model, prompt_ids, vectors, max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
                       stop_ids=None, steering=None, return_activations=False, tokenizer=None)
        -> Iterator[dict]     {"type": "prompt", ...}, then {"type": "token", ...} per generated token,
                              then {"type": "done", ...}
    ScoreProjector(model, vectors)   stacked unit vectors per layer; projects residuals on the device
    StreamError                      bad arguments (empty prompt, vector of the wrong size, ...)

Scores follow the offline convention exactly: the score sent with token i is <residual at token i's own
position, unit vector>, i.e. what capture_raw_activations + project_raw_activations_onto_traits give
for the same ids. A token's residual exists only once the token has been fed back, so each token is
yielded one forward after it was sampled, and the last token gets one extra forward.

Everything happens on the device inside the forward: per layer, one matmul of the residual against the
stacked unit vectors of every trait at that layer; the next token is picked on the device too, and the
small score tensor crosses to the CPU together with it (one copy, one sync per forward). The KV cache is HF's own (`past_key_values` returned by the model).

Steering specs (core.hooks.SteeringSpec) act as SteeringHook does under HF generate: `positions="all"`
steers every forward, "prompt" only the prompt forward (every prompt token, so the prompt's scores and
its KV cache are steered), "response" only the generated tokens. Hooks and the no-grad mode live only
inside each forward: nothing stays registered on the model while the generator is suspended, so the
caller may use the model between two tokens, and abandoning the generator leaks nothing.

Sampling: temperature 0 is greedy (argmax, as HF greedy generate). Otherwise core.generation's
SeededSampler (temperature, top-p, a counter-based draw per (seed, step, token)) with the row seed
mix_seed(seed, 0), so a stream with seed S samples exactly what generate_batch(..., seed=S) samples
for the same single prompt.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from core.generation import SeededSampler, config_stop_ids, mix_seed
from core.hooks import ActivationCapture, SteeringHook, SteeringSpec, input_device, num_layers
from core.projection import unit_vectors
from core.errors import TraitError

__all__ = ["StreamError", "ScoreProjector", "stream_with_scores", "STOP_EOS", "STOP_LENGTH"]

STOP_EOS = "eos"        # a stop id was sampled (it is not streamed as a token)
STOP_LENGTH = "length"  # max_new_tokens reached


class StreamError(TraitError):
    """Arguments a stream cannot run with; the message says which."""


class ScoreProjector:
    """Unit trait vectors stacked per layer, projected against a forward's residuals on the device.

        proj = ScoreProjector(model, {"a/b": {3: v3, 5: v5}, "c/d": {5: w5}})
        with proj.capture():                 # one ActivationCapture, residual at layers 3 and 5
            model(input_ids=ids)
        proj.scores()                        # {"a/b": {3: [per position], 5: [...]}, "c/d": {5: [...]}}
    """

    def __init__(self, model: nn.Module, vectors: Mapping[str, Mapping[int, torch.Tensor]],
                 keep_activations: bool = False):
        self.model = model
        hidden = int(model.get_input_embeddings().weight.shape[-1])
        n = num_layers(model)
        by_layer: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for trait, per_layer in vectors.items():
            for layer, vec in per_layer.items():
                layer = int(layer)
                if not 0 <= layer < n:
                    raise StreamError(f"trait {trait!r}: layer {layer} is out of range for a model with {n} layers")
                if vec.ndim != 1 or vec.shape[0] != hidden:
                    raise StreamError(f"trait {trait!r} layer {layer}: vector of shape {tuple(vec.shape)} does not "
                                      f"match the model's hidden size {hidden}")
                by_layer.setdefault(layer, []).append((trait, vec))
        self.layers = sorted(by_layer)
        self.traits = {layer: [t for t, _ in by_layer[layer]] for layer in self.layers}
        # fp32 unit rows; moved to each layer's device once (device_map splits put layers on several GPUs)
        self.stacks = {layer: unit_vectors(torch.stack([v for _, v in by_layer[layer]])) for layer in self.layers}
        self.keep_activations = keep_activations
        self._scores: dict[int, torch.Tensor] = {}
        self._acts: dict[int, torch.Tensor] = {}
        self._capture = (ActivationCapture(model, self.layers, ["residual"], stop_after_last=False,
                                           on_capture=self._on_capture) if self.layers else None)

    def _on_capture(self, layer: int, _component: str, h: torch.Tensor) -> None:
        stack = self.stacks[layer]
        if stack.device != h.device:
            stack = self.stacks[layer] = stack.to(h.device)
        self._scores[layer] = h[0].to(torch.float32) @ stack.T          # [seq, K]: one matmul for all traits
        if self.keep_activations:
            self._acts[layer] = h[0].detach()
        return None  # nothing kept on the capture object

    def capture(self):
        """A context that records this forward's scores (a no-op context when there are no vectors)."""
        self._scores, self._acts = {}, {}
        if self._capture is None:
            return contextlib.nullcontext()
        return self._capture

    def scores(self) -> dict[str, dict[int, list[float]]]:
        """The last forward's scores per trait and layer, one float per position (one device-to-CPU copy)."""
        flat = self.flat()
        return self.unflatten(flat.cpu()) if flat is not None else {}

    def flat(self) -> torch.Tensor | None:
        """The last forward's scores as one device tensor [seq, sum K] (None without vectors)."""
        if not self.layers:
            return None
        missing = [layer for layer in self.layers if layer not in self._scores]
        if missing:
            raise StreamError(f"the forward did not reach layer(s) {missing}")
        dev = self._scores[self.layers[0]].device
        return torch.cat([self._scores[layer].to(dev) for layer in self.layers], dim=1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, dict[int, list[float]]]:
        """flat() rows, on the CPU, as {trait: {layer: [float per position]}}."""
        out: dict[str, dict[int, list[float]]] = {}
        col = 0
        for layer in self.layers:
            for trait in self.traits[layer]:
                out.setdefault(trait, {})[layer] = flat[:, col].tolist()
                col += 1
        return out

    def activations(self) -> dict[int, torch.Tensor]:
        """The last forward's residuals per layer, fp32 on the CPU, [seq, hidden] (only with keep_activations)."""
        return {layer: self._acts[layer].to(torch.float32).cpu() for layer in self.layers if layer in self._acts}


def _check(prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, top_p: float, vocab: int,
           steering: Sequence[SteeringSpec]) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise StreamError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0.0 or temperature == float("inf"):
        raise StreamError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise StreamError(f"top_p must be in (0, 1], got {top_p!r}")
    if not prompt_ids:
        raise StreamError("the prompt needs at least one token id")
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab]
    if bad:
        raise StreamError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {vocab})")
    for s in steering:
        if s.positions not in ("all", "prompt", "response"):
            raise StreamError(f"steering positions must be all, prompt or response, got {s.positions!r}")


def _cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier): the forward keyword of the KV cache."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel wraps the HF model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def stream_with_scores(model: nn.Module, prompt_ids: Sequence[int],
                       vectors: Mapping[str, Mapping[int, torch.Tensor]], max_new_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop_ids: Sequence[int] | None = None, steering: Sequence[SteeringSpec] | None = None,
                       return_activations: bool = False, tokenizer=None) -> Iterator[dict]:
    """Generate from `prompt_ids` (batch 1, KV cache) and yield the prompt, each token, and the end, with scores.

    Messages (layer keys are ints; `token` strings need `tokenizer`, else None):
        {"type": "prompt", "tokens", "token_ids", "scores": {trait: {layer: [float per prompt token]}}}
        {"type": "token", "token", "token_id", "step", "scores": {trait: {layer: float}}}
        {"type": "done", "stop_reason": "eos" | "length", "n_tokens", "n_prompt_tokens", "stop_token_id",
         "token_ids" (generated, stop id excluded), "seconds"}
    With return_activations, prompt and token messages also carry "activations": {layer: fp32 CPU Tensor}
    ([n_prompt, H] for the prompt, [H] per token) at the layers of the vectors.
    `stop_ids` default to the model's generation_config eos ids; the stop id is not streamed.
    """
    steering = list(steering or [])
    vocab = int(model.get_input_embeddings().weight.shape[0])
    prompt_ids = [int(i) for i in prompt_ids]
    _check(prompt_ids, max_new_tokens, temperature, top_p, vocab, steering)
    stops = set(int(s) for s in (stop_ids if stop_ids is not None else config_stop_ids(model)))
    projector = ScoreProjector(model, vectors, keep_activations=return_activations)
    # one hook object per spec; each forward enters the ones that act on its positions (see module docstring)
    prompt_hooks = [SteeringHook(model, s.vector, s.layer, s.coefficient, s.component, "all")
                    for s in steering if s.positions in ("all", "prompt")]
    response_hooks = [SteeringHook(model, s.vector, s.layer, s.coefficient, s.component, "all")
                      for s in steering if s.positions in ("all", "response")]
    device = input_device(model)
    sampler = None
    if temperature > 0:
        row_seed = mix_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()), 0)
        sampler = SeededSampler(temperature, top_p, torch.tensor([row_seed], dtype=torch.int64, device=device),
                                len(prompt_ids))
    cache_kw = _cache_kwarg(model)
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: None)
    t0 = time.perf_counter()

    def forward(ids: list[int], past, hooks: list[SteeringHook]):
        with contextlib.ExitStack() as stack, torch.no_grad():
            for h in hooks:
                stack.enter_context(h)
            stack.enter_context(projector.capture())
            out = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device), use_cache=True,
                        logits_to_keep=1, **{cache_kw: past})
        return out.logits[0, -1].to(torch.float32), _returned_cache(out)

    def pick(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """The next token, chosen on the device (greedy argmax, or the seeded sampler)."""
        if sampler is None:
            return torch.argmax(logits)
        ids_t = torch.tensor([ids], dtype=torch.long, device=logits.device)
        return torch.argmax(sampler(ids_t, logits[None]), dim=-1)[0]

    def to_host(choice: torch.Tensor) -> tuple[dict, int]:
        """This forward's scores and the next token id in ONE device-to-host copy (the id rides bit-cast as fp32)."""
        flat = projector.flat()
        if flat is None:
            return {}, int(choice.item())
        tail = choice.reshape(1).to(device=flat.device, dtype=torch.int32).view(torch.float32)
        host = torch.cat([flat.reshape(-1).to(torch.float32), tail]).cpu()
        return projector.unflatten(host[:-1].reshape(flat.shape)), int(host[-1:].view(torch.int32)[0])

    logits, past = forward(prompt_ids, None, prompt_hooks)
    all_ids = list(prompt_ids)
    scores, next_id = to_host(pick(logits, all_ids))
    msg = {"type": "prompt", "tokens": [decode(i) for i in prompt_ids], "token_ids": list(prompt_ids),
           "scores": scores}
    if return_activations:
        msg["activations"] = projector.activations()
    yield msg

    generated: list[int] = []
    stop_reason, stop_token_id = STOP_LENGTH, None
    for step in range(max_new_tokens):
        if next_id in stops:
            stop_reason, stop_token_id = STOP_EOS, next_id
            break
        token_id = next_id
        generated.append(token_id)
        all_ids.append(token_id)
        # feed the token back: this forward gives its own residual (its score) and the next token's logits
        logits, past = forward([token_id], past, response_hooks)
        scores, next_id = to_host(pick(logits, all_ids))
        msg = {"type": "token", "token": decode(token_id), "token_id": token_id, "step": step,
               "scores": {t: {layer: s[0] for layer, s in per.items()} for t, per in scores.items()}}
        if return_activations:
            msg["activations"] = {layer: a[0] for layer, a in projector.activations().items()}
        yield msg
    yield {"type": "done", "stop_reason": stop_reason, "n_tokens": len(generated), "n_prompt_tokens": len(prompt_ids),
           "stop_token_id": stop_token_id, "token_ids": generated, "seconds": time.perf_counter() - t0}
