"""Token streaming with per-token trait scores, for one conversation (the live chat's engine).

    stream_with_scores(model, prompt_ids, vectors, max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
                       stop_ids=None, steering=None, return_activations=False, tokenizer=None)
        -> Iterator[dict]     {"type": "prompt", ...}, then {"type": "token", ...} per generated token,
                              then {"type": "done", ...}
    ScoreProjector(model, vectors)   all unit vectors as one matrix; one matmul per forward on the device
    StreamError                      bad arguments (empty prompt, vector of the wrong size, ...)

Scores follow the offline convention exactly: the score sent with token i is <residual at token i's own
position, unit vector>, i.e. what capture_raw_activations + project_raw_activations_onto_traits give
for the same ids. A token's residual exists only once the token has been fed back, so each token is
yielded one forward after it was sampled, and the last token gets one extra forward.

Per forward, everything happens on the device: the hooks keep a reference to each needed block's
output, the residuals are stacked [layers, seq, hidden] and every trait's score at every layer comes
from one matmul against the stacked unit vectors [V, hidden] (each vector then gathered at its own
layer); the next token is picked on the device and fed back as a device tensor; the scores and the
token id cross to the CPU together (one copy, one sync per forward), and the only other host work per
token is building its message. The KV cache is HF's own (`past_key_values` returned by the model).

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

from core.generation import SeededSampler, check_sampling, config_stop_ids, mix_seed
from core.hooks import SteeringHook, SteeringSpec, component_module, input_device, num_layers
from core.interventions import STOP_MONITOR, Intervention, Interventions
from core.projection import score, unit_vectors
from core.errors import TraitError

__all__ = ["StreamError", "ScoreProjector", "stream_with_scores", "STOP_EOS", "STOP_LENGTH"]

STOP_EOS = "eos"        # a stop id was sampled (it is not streamed as a token)
STOP_LENGTH = "length"  # max_new_tokens reached


class StreamError(TraitError):
    """Arguments a stream cannot run with; the message says which."""


class ScoreProjector:
    """Every trait's unit vectors as one matrix, projected against a forward's stacked residuals on the device.

        proj = ScoreProjector(model, {"a/b": {3: v3, 5: v5}, "c/d": {5: w5}})
        with proj.capture():                 # one forward hook per layer that has a vector (3 and 5)
            model(input_ids=ids)
        proj.scores()                        # {"a/b": {3: [per position], 5: [...]}, "c/d": {5: [...]}}

    A one-token forward (each generated token): the hooks only keep a reference to each block's output;
    flat() stacks them [U layers, 1, hidden] and computes every score with one matmul against the
    [V vectors, hidden] unit matrix, gathering each vector at its own layer: no per-layer or per-trait
    work on the host. A longer forward (the prompt): each layer's residual is projected on all V vectors
    as the block produces it, so a long prompt never holds every layer's residual at once.
    """

    def __init__(self, model: nn.Module, vectors: Mapping[str, Mapping[int, torch.Tensor]],
                 keep_activations: bool = False):
        hidden = int(model.get_input_embeddings().weight.shape[-1])
        n = num_layers(model)
        self.columns: list[tuple[str, int]] = []       # (trait, layer) of each score column, in the given order
        rows: list[torch.Tensor] = []
        for trait, per_layer in vectors.items():
            for layer, vec in per_layer.items():
                layer = int(layer)
                if not 0 <= layer < n:
                    raise StreamError(f"trait {trait!r}: layer {layer} is out of range for a model with {n} layers")
                if vec.ndim != 1 or vec.shape[0] != hidden:
                    raise StreamError(f"trait {trait!r} layer {layer}: vector of shape {tuple(vec.shape)} does not "
                                      f"match the model's hidden size {hidden}")
                self.columns.append((trait, layer))
                rows.append(vec)
        self.layers = sorted({layer for _, layer in self.columns})
        slot = {layer: i for i, layer in enumerate(self.layers)}
        self._by_trait: dict[str, list[tuple[int, int]]] = {}     # trait -> [(layer, column)]
        for col, (trait, layer) in enumerate(self.columns):
            self._by_trait.setdefault(trait, []).append((layer, col))
        # fp32 unit rows [V, hidden] and, per column, the slot of its layer in the stacked residuals
        self.weight = unit_vectors(torch.stack(rows)) if rows else None
        self._slot = torch.tensor([slot[layer] for _, layer in self.columns], dtype=torch.long)
        self._col = torch.arange(len(self.columns))
        self._placed: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._modules = [component_module(model, layer, "residual") for layer in self.layers]
        devices = {p.device for m in self._modules for p in m.parameters()}
        self._one_device = len(devices) <= 1          # device_map splits put layers on several GPUs
        self._hooks = [self._grab(i) for i in range(len(self.layers))]
        self._res: list[torch.Tensor | None] = [None] * len(self.layers)   # per slot: this forward's output
        self._acts: list[torch.Tensor | None] = [None] * len(self.layers)
        self._projected = False
        self.keep_activations = keep_activations

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight, slot, column) on `device`, copied there once (device_map splits use several devices)."""
        got = self._placed.get(device)
        if got is None:
            got = self._placed[device] = tuple(t.to(device) for t in (self.weight, self._slot, self._col))
        return got

    def _grab(self, i: int):
        def fn(_module, _inputs, out):
            h = out[0] if isinstance(out, (tuple, list)) else out           # [1, seq, hidden]
            if self.keep_activations:
                self._acts[i] = h[0]
            if h.shape[1] > 1:      # the prompt: project now, [seq, V]
                self._res[i] = score(h[0], self._on(h.device)[0])
                self._projected = True
            else:                   # one token: a reference (no copy, no sync), stacked in flat()
                self._res[i] = h
        return fn

    @contextlib.contextmanager
    def capture(self):
        """A context that records this forward's residuals at the vectors' layers (hooks removed on exit)."""
        self._res = [None] * len(self.layers)
        self._acts = [None] * len(self.layers)
        self._projected = False
        handles = [m.register_forward_hook(fn) for m, fn in zip(self._modules, self._hooks)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def flat(self) -> torch.Tensor | None:
        """The last forward's scores as one device tensor [seq, V] (columns: self.columns); None without vectors."""
        if self.weight is None:
            return None
        missing = [layer for layer, r in zip(self.layers, self._res) if r is None]
        if missing:
            raise StreamError(f"the forward did not reach layer(s) {missing}")
        res = self._res if self._one_device else [r.to(self._res[0].device) for r in self._res]
        weight, slot, col = self._on(res[0].device)
        if self._projected:
            full = torch.stack(res)                                              # [U, seq, V]
        else:
            full = score(torch.stack(res)[:, 0], weight)                         # [U, 1, V]: one matmul
        return full[slot, :, col].T                                              # [seq, V]: each vector's own layer

    def scores(self) -> dict[str, dict[int, list[float]]]:
        """The last forward's scores per trait and layer, one float per position (one device-to-CPU copy)."""
        flat = self.flat()
        return self.unflatten(flat.cpu()) if flat is not None else {}

    def unflatten(self, flat: torch.Tensor) -> dict[str, dict[int, list[float]]]:
        """flat() rows, on the CPU, as {trait: {layer: [float per position]}}."""
        cols = flat.T.tolist()
        return {t: {layer: cols[c] for layer, c in lc} for t, lc in self._by_trait.items()}

    def row(self, values: Sequence[float]) -> dict[str, dict[int, float]]:
        """One position's scores (a flat() row as floats) as {trait: {layer: float}}."""
        return {t: {layer: values[c] for layer, c in lc} for t, lc in self._by_trait.items()}

    def activations(self) -> dict[int, torch.Tensor]:
        """The last forward's residuals per layer, fp32 on the CPU, [seq, hidden] (only with keep_activations)."""
        return {layer: a.to(torch.float32).cpu() for layer, a in zip(self.layers, self._acts) if a is not None}


def _check(prompt_ids: Sequence[int], max_new_tokens: int, temperature: float, top_p: float, vocab: int) -> None:
    check_sampling(max_new_tokens, temperature, top_p, StreamError)
    if not prompt_ids:
        raise StreamError("the prompt needs at least one token id")
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab]
    if bad:
        raise StreamError(f"prompt token id {bad[0]} is outside the model's vocabulary (size {vocab})")


def _module_device(model: nn.Module, layer: int, component: str) -> torch.device:
    param = next(component_module(model, layer, component).parameters(), None)
    return param.device if param is not None else input_device(model)


def _cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier): the forward keyword of the KV cache."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel wraps the HF model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


class _Decoder:
    """One stream's model calls: the steered, scored forward, the next token picked on the device, and the
    single device-to-host copy per forward."""

    def __init__(self, model: nn.Module, projector: ScoreProjector, steering: Sequence[SteeringSpec],
                 prompt_ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                 interventions: Interventions | None = None):
        self.model, self.projector = model, projector
        self.interventions = interventions
        self.device = input_device(model)
        self.cache_kw = _cache_kwarg(model)
        # one hook object per spec; each forward enters the ones that act on its positions (see module
        # docstring). Vectors go to their layer's device once, so no step copies one from the host.
        def hook(s: SteeringSpec) -> SteeringHook:
            return SteeringHook(model, s.vector.to(_module_device(model, s.layer, s.component)), s.layer,
                                s.coefficient, s.component, "all")

        self.prompt_hooks = [hook(s) for s in steering if s.positions in ("all", "prompt")]
        self.response_hooks = [hook(s) for s in steering if s.positions in ("all", "response")]
        self.sampler, self.history = None, None
        if temperature > 0:
            n = len(prompt_ids)
            row_seed = mix_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()), 0)
            self.sampler = SeededSampler(temperature, top_p,
                                         torch.tensor([row_seed], dtype=torch.int64, device=self.device), n)
            # the ids so far, on the device, for the logits processor (written there: no host copy per step)
            self.history = torch.zeros((1, n + max_new_tokens), dtype=torch.long, device=self.device)
            self.history[0, :n] = torch.tensor(prompt_ids, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor, past, hooks: list[SteeringHook]):
        with contextlib.ExitStack() as stack, torch.no_grad():
            for h in hooks:
                stack.enter_context(h)
            if self.interventions:
                stack.enter_context(self.interventions.active())
            stack.enter_context(self.projector.capture())
            out = self.model(input_ids=input_ids.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self.cache_kw: past})
        return out.logits[0, -1].to(torch.float32), _returned_cache(out)

    def pick(self, logits: torch.Tensor, n_ids: int) -> torch.Tensor:
        """The next token, chosen on the device (greedy argmax, or the seeded sampler)."""
        if self.sampler is None:
            return torch.argmax(logits)
        return torch.argmax(self.sampler(self.history[:, :n_ids], logits[None]), dim=-1)[0]

    def remember(self, position: int, choice: torch.Tensor) -> None:
        if self.history is not None:
            self.history[0, position] = choice            # a device-to-device write

    def to_host(self, choice: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """This forward's scores [seq, V] and the next token id in ONE device-to-host copy (the id rides
        bit-cast as fp32); no scores without vectors."""
        flat = self.projector.flat()
        if flat is None:
            return None, int(choice.item())
        tail = choice.reshape(1).to(device=flat.device, dtype=torch.int32).view(torch.float32)
        host = torch.cat([flat.reshape(-1), tail]).cpu()
        return host[:-1].reshape(flat.shape), int(host[-1:].view(torch.int32)[0])


def _logprobs(logits: torch.Tensor, choice: torch.Tensor, k: int | None):
    """(log-probability of `choice`, [(id, logprob)] of the k most likely tokens) under log_softmax(logits)."""
    if k is None:
        return None
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    top = torch.topk(logp, k) if k > 0 else None
    chosen = float(logp[choice].item())
    return chosen, ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


def stream_with_scores(model: nn.Module, prompt_ids: Sequence[int],
                       vectors: Mapping[str, Mapping[int, torch.Tensor]], max_new_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop_ids: Sequence[int] | None = None, steering: Sequence[SteeringSpec] | None = None,
                       return_activations: bool = False, tokenizer=None, logprobs: int | None = None,
                       interventions: Sequence[Intervention] | None = None, skip_ids: Sequence[int] = ()
                       ) -> Iterator[dict]:
    """Generate from `prompt_ids` (batch 1, KV cache) and yield the prompt, each token, and the end, with scores.

    Messages (layer keys are ints; `token` strings need `tokenizer`, else None):
        {"type": "prompt", "tokens", "token_ids", "scores": {trait: {layer: [float per prompt token]}}}
        {"type": "token", "token", "token_id", "step", "scores": {trait: {layer: float}}}
        {"type": "done", "stop_reason": "eos" | "length", "n_tokens", "n_prompt_tokens", "stop_token_id",
         "token_ids" (generated, stop id excluded), "seconds"}
    With return_activations, prompt and token messages also carry "activations": {layer: fp32 CPU Tensor}
    ([n_prompt, H] for the prompt, [H] per token) at the layers of the vectors.
    `interventions` (core.interventions, vectors resolved) act on every forward; the prompt message carries
    "interventions" (each one's record: relative amounts with the prompt norm, special ids `skip_ids` excluded
    from it); a stop-when hit ends the stream after the token that crossed (stop_reason "monitor", the done
    message carries "monitor": {trait, layer, token_index, score, threshold}).
    `stop_ids` default to the model's generation_config eos ids; the stop id is not streamed.
    With `logprobs` = k (0 or more), each token message also carries "logprob" (the token's log-probability under
    the model's distribution, log_softmax of the raw logits, before temperature / top-p) and "top_logprobs"
    ([(id, logprob)] of the k most likely tokens); this costs one more device-to-host copy per token.
    """
    steering = list(steering or [])
    vocab = int(model.get_input_embeddings().weight.shape[0])
    prompt_ids = [int(i) for i in prompt_ids]
    _check(prompt_ids, max_new_tokens, temperature, top_p, vocab)   # SteeringSpec checked its positions
    stops = set(int(s) for s in (stop_ids if stop_ids is not None else config_stop_ids(model)))
    projector = ScoreProjector(model, vectors, keep_activations=return_activations)
    iv = Interventions(model, interventions or [])
    if iv:
        iv.start(torch.tensor([prompt_ids], dtype=torch.long, device=input_device(model)), skip_ids=skip_ids)
    dec = _Decoder(model, projector, steering, prompt_ids, max_new_tokens, temperature, top_p, seed, iv)
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: None)
    n_prompt, t0 = len(prompt_ids), time.perf_counter()

    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise StreamError(f"logprobs must be a non-negative integer (the number of top tokens), got {logprobs!r}")
    logits, past = dec.forward(torch.tensor([prompt_ids], dtype=torch.long), None, dec.prompt_hooks)
    choice = dec.pick(logits, n_prompt)
    lp = _logprobs(logits, choice, logprobs)
    host, next_id = dec.to_host(choice)
    msg = {"type": "prompt", "tokens": [decode(i) for i in prompt_ids], "token_ids": list(prompt_ids),
           "scores": projector.unflatten(host) if host is not None else {}}
    if iv:
        msg["interventions"] = iv.record(0)
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
        dec.remember(n_prompt + step, choice)
        # feed the token back (the device tensor: no host-to-device copy): this forward gives its own
        # residual (its score) and the next token's logits
        logits, past = dec.forward(choice.reshape(1, 1), past, dec.response_hooks)
        choice = dec.pick(logits, n_prompt + step + 1)
        host, next_id = dec.to_host(choice)
        msg = {"type": "token", "token": decode(token_id), "token_id": token_id, "step": step,
               "scores": projector.row(host[0].tolist()) if host is not None else {}}
        if lp is not None:
            msg["logprob"], msg["top_logprobs"] = lp
        lp = _logprobs(logits, choice, logprobs)
        if return_activations:
            msg["activations"] = {layer: a[0] for layer, a in projector.activations().items()}
        yield msg
        if iv and iv.hits[0] is not None:      # the monitor fired on this token: it is the last one
            stop_reason = STOP_MONITOR
            break
    done = {"type": "done", "stop_reason": stop_reason, "n_tokens": len(generated), "n_prompt_tokens": n_prompt,
            "stop_token_id": stop_token_id, "token_ids": generated, "seconds": time.perf_counter() - t0}
    if stop_reason == STOP_MONITOR:
        done["monitor"] = iv.hits[0]
    yield done
