"""The live chat in plain Python: a loaded model variant and its best trait vectors, streaming chat turns.

    s = ChatSession("demo", "lora")                   # the variant (with its LoRA) and the vectors, loaded once
    for msg in s.stream(prompt="Hello", traits=["behavioral/refusal"], max_new_tokens=32):
        print(format_message(msg))

    ChatSession(experiment, model_variant, quantization)
        .info() -> dict                    ready + what is loaded (model, variant, traits, loads in this process)
        .plan(**request) -> ChatPlan       every request field checked, vectors chosen, prompt tokenized
        .run(plan) -> Iterator[dict]       the stream of one planned turn
        .stream(**request)                 plan + run (bad input: ChatError on the first next())
    ChatError                              a request the chat cannot serve; the message names the field
    STREAM_ARGS, MAX_NEW_TOKENS            the request fields; the per-request token limit
    LOADS                                  one entry per model load in this process (a warm container never reloads)
    format_message(msg) -> str             one human-readable line per streamed dict

No Modal here: inference/modal_inference.py wraps a ChatSession in a Modal class, inference/chat_web.py
serves one over HTTP.

Streamed dicts (JSON-ready: layer keys are strings, as they are in JSON and SSE):
    {"type": "prompt", "text", "prompt_note", "tokens", "token_ids", "scores": {trait: {layer: [per token]}},
     "model", "variant", "vectors": {trait: [{layer, method, position, path, sha256, selection_source, ...}]},
     "steering": [...], "interventions": [{kind, spec, trait, layer, coefficient | low | high | threshold,
     norm (relative amounts: the prompt's mean residual norm at the layer), ...}]}
    {"type": "token", "token", "token_id", "step", "scores": {trait: {layer: float}}}     one per generated token
    {"type": "done", "stop_reason": "eos" | "length" | "monitor", "n_tokens", "n_prompt_tokens", "stop_token_id",
     "stop_token", "response", "token_ids", "seconds", "monitor"?: {trait, layer, token_index, score, threshold}}
Interventions (core/interventions.py) come as request fields: `steering` entries with a relative coefficient
("0.5x" or TRAIT:LAYER:0.5x), `cap`, `steer_when`, `stop_when` (spec strings).
A score is the fp32 scalar projection <residual at the token's own position, unit vector>, the number
the offline capture + projection scripts give for the same ids (core/streaming.py). A score that is not
finite is null (JSON has no NaN).
"""
# No `from __future__ import annotations`: Modal and FastAPI callers read this module's signatures at runtime.
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from core.errors import TraitError
from utils import paths

MAX_NEW_TOKENS = 4096                   # per request, so one web call cannot hold a GPU for hours
STREAM_ARGS = ("messages", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "system_prompt",
               "steering", "traits", "layers", "return_activations", "cap", "steer_when", "stop_when")
INTERVENTION_ARGS = ("cap", "steer_when", "stop_when")   # each: a spec string or a list (core/interventions.py)
STEERING_KEYS = ("trait", "vector", "layer", "coefficient", "positions", "component")

LOADS: list[dict] = []   # one entry per model load in this process: a warm container never adds a second


class ChatError(TraitError):
    """A request or a setting the chat cannot serve; the message names the field or flag."""


def split_list(value, what: str) -> Optional[list[str]]:
    """A comma-separated string or a list of strings -> stripped names; None / "" / [] -> None."""
    if value is None or value == "" or value == []:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ChatError(f"{what}: expected a comma-separated string or a list of strings, got {value!r}")
    return [i.strip().strip("/") for i in items if i.strip()]


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None   # JSON has no NaN: a diverged score is null


def _layer_keys(scores: dict, per_token: bool) -> dict:
    conv = (lambda v: [_finite(x) for x in v]) if per_token else _finite
    return {t: {str(layer): conv(v) for layer, v in per.items()} for t, per in scores.items()}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ChatPlan:
    """One checked request: the formatted prompt and its ids, the chosen vectors, the steering specs."""

    text: str
    prompt_note: Optional[str]
    ids: list
    selected: dict                   # {trait: [SelectedVector]} in the request's order
    steering: list                   # [core.hooks.SteeringSpec]
    steering_echo: list              # JSON-ready description of each steer (sent with the prompt message)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    return_activations: bool
    logprobs: Optional[int] = None   # top tokens per step with log-probabilities (None: no log-probabilities)
    interventions: tuple = ()        # [core.interventions.Intervention], vectors resolved (relative steering too)


class ChatSession:
    """An experiment's model variant (with its LoRA) and best trait vectors, loaded once; streams chats.

        s = ChatSession("demo", "lora")
        for msg in s.stream(prompt="Hello", traits=["behavioral/refusal"], max_new_tokens=32):
            print(msg)
    """

    def __init__(self, experiment: Optional[str], model_variant: Optional[str] = None, quantization: str = "",
                 loaded=None):
        """Load the experiment's variant, or use `loaded` (a utils.model.LoadedModel, e.g. the model server's).

        experiment None (only with `loaded`): a plain model, no trait vectors (scores need explicit vectors
        elsewhere); the chat template is used when the tokenizer has one."""
        from core.hooks import num_layers
        from utils.config import resolve_variant, use_chat_template
        from utils.model import load_variant, stop_token_ids

        if quantization not in ("", "8bit", "4bit"):
            raise ChatError(f"quantization {quantization!r}: choose 8bit, 4bit or nothing")
        if experiment is None and loaded is None:
            raise ChatError("a chat session needs an experiment or a loaded model")
        t0 = time.perf_counter()
        self.experiment = experiment
        if loaded is None:
            variant = resolve_variant(experiment, model_variant or None, "application")
            self.lm = load_variant(experiment, variant.name, load_in_8bit=quantization == "8bit",
                                   load_in_4bit=quantization == "4bit")
            self.variant = variant.name
        else:
            self.lm, self.variant = loaded, model_variant or loaded.info.get("variant")
        self.use_chat_template = use_chat_template(experiment) if experiment is not None else None
        self.stop_ids = stop_token_ids(self.lm.tokenizer, self.lm.model)
        self.n_layers = num_layers(self.lm.model)
        self.hidden_size = int(self.lm.model.get_input_embeddings().weight.shape[-1])
        self._load_vectors()
        self._selected: dict[tuple[str, str], list] = {}
        self._lock = threading.Lock()   # one stream at a time on this model
        self.load_seconds = time.perf_counter() - t0
        if loaded is None:
            LOADS.append({"experiment": experiment, "variant": self.variant, "model": self.lm.info.get("model"),
                          "seconds": self.load_seconds})

    def _load_vectors(self) -> None:
        """Each trait's best vector, from the same source the projection script uses by default
        (utils.vectors.resolve_vector_source); a trait without evidence stays usable with explicit layers."""
        from utils.vectors import NoEvidenceError, VectorError, resolve_vector_source

        self.best: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        self.source = resolve_vector_source(self.experiment, require_traits=False) if self.experiment else None
        if self.source is None:
            return
        for trait in self.source.traits:
            try:
                self.best[trait] = self.source.best(trait, hidden_size=self.hidden_size)
            except (NoEvidenceError, VectorError) as e:
                self.unavailable[trait] = str(e)

    # --- what is loaded --------------------------------------------------------------------------
    def _root(self):
        return paths.experiment_dir(self.experiment) if self.experiment else None

    def info(self) -> dict:
        root = self._root()
        return {"status": "ready", "experiment": self.experiment, "variant": self.variant,
                "model": self.lm.info.get("model"), "lora": self.lm.info.get("lora"),
                "dtype": self.lm.info.get("dtype"), "device": self.lm.info.get("device"),
                "quantization": self.lm.info.get("quantization"), "num_layers": self.n_layers,
                "load_time": round(self.load_seconds, 2), "loads_in_process": len(LOADS),
                "vector_source": self.source.describe() if self.source else None,
                "traits": {t: v.describe(root) for t, v in self.best.items()},
                "unavailable_traits": dict(self.unavailable), "stop_ids": list(self.stop_ids),
                "special_ids": sorted(int(i) for i in self.lm.tokenizer.all_special_ids)}

    # --- request checks --------------------------------------------------------------------------
    def _vectors_for(self, trait: str, layers: Optional[str]) -> list:
        if layers is None:
            if trait not in self.best:
                raise ChatError(f"traits: {trait!r} has no best vector ({self.unavailable[trait]}); "
                                f"ask for explicit layers")
            return [self.best[trait]]
        key = (trait, layers)
        if key not in self._selected:
            self._selected[key] = self.source.select(trait, layers=layers, hidden_size=self.hidden_size,
                                                     n_layers=self.n_layers)
        return self._selected[key]

    def _known(self, trait: str, what: str) -> str:
        known = sorted(set(self.best) | set(self.unavailable))
        if trait not in known:
            raise ChatError(f"{what}: unknown trait {trait!r} (traits with vectors in {self.experiment!r}: "
                            f"{', '.join(known) or 'none'})")
        return trait

    def _trait_vector(self, trait: str, layer, where: str):
        """(trait name, the trait's unit vector at `layer`) for a request field."""
        if not _is_int(layer) or not 0 <= layer < self.n_layers:
            raise ChatError(f"{where}.layer: an integer in 0-{self.n_layers - 1} is required, got {layer!r}")
        trait = self._known(str(trait).strip("/"), f"{where}.trait")
        return trait, self._vectors_for(trait, str(layer))[0].vector

    def _steer(self, c, where: str):
        """One steering config -> (SteeringSpec or a relative-steering Intervention, its JSON echo).

        A config is {trait | vector, layer, coefficient, positions, component} or the CLI's string
        TRAIT:LAYER:COEF[x][:POSITIONS]; a coefficient "Cx" (a string) is C x the prompt's mean residual norm at
        the layer (core/interventions.py), reported with the prompt message."""
        import torch

        from core.hooks import HookError, SteeringSpec
        from core.interventions import Amount, InterventionError, parse_intervention

        if isinstance(c, str):
            try:
                it = parse_intervention("steer", c, where)
            except InterventionError as e:
                raise ChatError(str(e)) from e
            c = {"trait": it.trait, "layer": it.layer, "coefficient": str(it.coefficient), "positions": it.positions}
        if not isinstance(c, dict):
            raise ChatError(f"{where}: expected an object or TRAIT:LAYER:COEF[x][:POSITIONS]")
        extra = set(c) - set(STEERING_KEYS)
        if extra:
            raise ChatError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        layer, coef = c.get("layer"), c.get("coefficient", 1.0)
        if not _is_int(layer) or not 0 <= layer < self.n_layers:
            raise ChatError(f"{where}.layer: an integer in 0-{self.n_layers - 1} is required, got {layer!r}")
        relative = isinstance(coef, str)
        if relative:
            try:
                amount = Amount.parse(coef, f"{where}.coefficient")
            except InterventionError as e:
                raise ChatError(str(e)) from e
            relative, coef = amount.relative, amount.value
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ChatError(f"{where}.coefficient: a finite number (or \"Cx\": C x the layer's norm) is required, "
                            f"got {coef!r}")
        positions, component = c.get("positions", "all"), c.get("component", "residual")
        if ("trait" in c) == ("vector" in c):
            raise ChatError(f"{where}: give exactly one of trait or vector")
        echo = {"layer": layer, "coefficient": f"{coef:g}x" if relative else float(coef), "positions": positions,
                "component": component}
        if "trait" in c:
            trait, vector = self._trait_vector(c["trait"], layer, where)
            echo = {"trait": trait, **echo}
        else:
            trait, v = None, c["vector"]
            if not isinstance(v, list) or len(v) != self.hidden_size or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise ChatError(f"{where}.vector: {self.hidden_size} finite numbers are required")
            vector = torch.tensor(v, dtype=torch.float32)   # used as given: coefficient x vector is added
            echo = {"vector_norm": float(vector.norm()), **echo}
        if relative:
            if component != "residual":
                raise ChatError(f"{where}: a relative coefficient steers the residual (component {component!r})")
            try:
                from core.interventions import Intervention

                it = Intervention("steer", layer, trait, coefficient=Amount(float(coef), True), positions=positions)
                return it.with_vector(vector), echo
            except InterventionError as e:
                raise ChatError(f"{where}: {e}") from e
        try:   # SteeringSpec checks positions and component
            spec = SteeringSpec(vector=vector, layer=layer, coefficient=float(coef), component=component,
                                positions=positions)
        except HookError as e:
            raise ChatError(f"{where}: {e}") from e
        return spec, echo

    def _steering(self, configs) -> tuple[list, list, list[dict]]:
        """(absolute SteeringSpecs, relative-steering Interventions, the echo of every config in order)."""
        from core.hooks import SteeringSpec

        if configs is None:
            return [], [], []
        if isinstance(configs, str):
            configs = [configs]
        if not isinstance(configs, list):
            raise ChatError("steering: expected a list of {trait | vector, layer, coefficient, positions} or "
                            "TRAIT:LAYER:COEF[x][:POSITIONS] strings")
        pairs = [self._steer(c, f"steering[{i}]") for i, c in enumerate(configs)]
        return ([s for s, _ in pairs if isinstance(s, SteeringSpec)],
                [s for s, _ in pairs if not isinstance(s, SteeringSpec)], [e for _, e in pairs])

    def _interventions(self, kind: str, specs) -> list:
        """A request's cap / steer_when / stop_when: spec strings (a list, or one string) -> Interventions."""
        from core.interventions import GRAMMAR, InterventionError, parse_intervention

        if specs is None or specs == [] or specs == "":
            return []
        items = [specs] if isinstance(specs, str) else specs
        if not isinstance(items, list):
            raise ChatError(f"{kind}: a spec string {GRAMMAR[kind]} or a list of them, got {specs!r}")
        out = []
        for i, spec in enumerate(items):
            where = f"{kind}[{i}]"
            try:
                it = parse_intervention(kind, spec, where)
            except InterventionError as e:
                raise ChatError(str(e)) from e
            _trait, vector = self._trait_vector(it.trait, it.layer, where)
            out.append(it.with_vector(vector))
        return out

    def _prompt_ids(self, messages, prompt, system_prompt, raw: bool = False) -> tuple[str, Optional[str], list[int]]:
        from utils.model import ModelLoadError, format_messages, format_prompt, tokenize_prompt

        if (messages is None) == (prompt is None):
            raise ChatError("give exactly one of messages or prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ChatError("prompt: a non-empty string is required")
            text, note = format_prompt(self.lm.tokenizer, prompt, system_prompt,
                                       False if raw else self.use_chat_template)
        elif raw:
            raise ChatError("a raw prompt is a string, not messages")
        else:
            try:
                text, note = format_messages(self.lm.tokenizer, messages, system_prompt, self.use_chat_template)
            except ModelLoadError as e:
                raise ChatError(f"messages: {e}") from e
        return text, note, tokenize_prompt(self.lm.tokenizer, text)   # exactly one BOS

    def _selection(self, traits, layers) -> dict:
        if _is_int(layers):
            layers = str(layers)
        elif isinstance(layers, list):
            layers = ",".join(str(x) for x in layers)
        elif layers is not None and not isinstance(layers, str):
            raise ChatError(f"layers: a spec such as 'best,best+2' or '6,12', or a list of layers, got {layers!r}")
        wanted = split_list(traits, "traits")
        if wanted is None:
            wanted = sorted(self.best) if layers is None else sorted(set(self.best) | set(self.unavailable))
        return {self._known(t, "traits"): self._vectors_for(t, layers) for t in wanted}

    def plan(self, messages: Optional[list] = None, prompt: Optional[str] = None, max_new_tokens: int = 200,
             temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
             system_prompt: Optional[str] = None, steering: Optional[list] = None, traits=None, layers=None,
             return_activations: bool = False, logprobs: Optional[int] = None, raw: bool = False, cap=None,
             steer_when=None, stop_when=None) -> ChatPlan:
        """Check every field of one request (ChatError naming the field); nothing is generated.

        raw: `prompt` is the model's input text as is (no chat template; a BOS is added when the tokenizer adds
        one), as /v1/completions wants. logprobs: k >= 0 top tokens per step (see core.streaming)."""
        if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ChatError(f"max_new_tokens: an integer in 1-{MAX_NEW_TOKENS} is required, got {max_new_tokens!r}")
        if seed is not None and not _is_int(seed):
            raise ChatError(f"seed: an integer is required, got {seed!r}")
        for name, x in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ChatError(f"{name}: a number is required, got {x!r}")
        selected = self._selection(traits, layers)
        specs, relative, echo = self._steering(steering)
        interventions = relative + [it for kind, given in (("cap", cap), ("steer_when", steer_when),
                                                           ("stop_when", stop_when))
                                    for it in self._interventions(kind, given)]
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
            raise ChatError(f"logprobs: an integer in 0-20 is required, got {logprobs!r}")
        text, note, ids = self._prompt_ids(messages, prompt, system_prompt, raw)
        return ChatPlan(text, note, ids, selected, specs, echo, max_new_tokens, float(temperature), float(top_p),
                        seed, bool(return_activations), logprobs, tuple(interventions))

    # --- streaming -------------------------------------------------------------------------------
    def stream(self, messages: Optional[list] = None, prompt: Optional[str] = None, max_new_tokens: int = 200,
               temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
               system_prompt: Optional[str] = None, steering: Optional[list] = None, traits=None, layers=None,
               return_activations: bool = False, cap=None, steer_when=None, stop_when=None) -> Iterator[dict]:
        """Stream one chat turn as JSON-ready dicts (see the module docstring). Bad input: ChatError at the start."""
        yield from self.run(self.plan(messages=messages, prompt=prompt, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, system_prompt=system_prompt,
                                      steering=steering, traits=traits, layers=layers,
                                      return_activations=return_activations, cap=cap, steer_when=steer_when,
                                      stop_when=stop_when))

    def run(self, plan: ChatPlan) -> Iterator[dict]:
        """The stream of one planned turn: the prompt message, one message per token, done."""
        from core.streaming import stream_with_scores

        vectors = {t: {v.layer: v.vector for v in vs} for t, vs in plan.selected.items()}
        with self._lock:
            for msg in stream_with_scores(self.lm.model, plan.ids, vectors, plan.max_new_tokens,
                                          temperature=plan.temperature, top_p=plan.top_p, seed=plan.seed,
                                          stop_ids=self.stop_ids, steering=plan.steering,
                                          return_activations=plan.return_activations, tokenizer=self.lm.tokenizer,
                                          logprobs=plan.logprobs, interventions=list(plan.interventions),
                                          skip_ids=self.lm.tokenizer.all_special_ids):
                out = self._done_message(msg) if msg["type"] == "done" else self._scored_message(msg, plan)
                if plan.return_activations and "activations" in msg:
                    out["activations"] = {str(layer): a.tolist() for layer, a in msg["activations"].items()}
                yield out

    def _scored_message(self, msg: dict, plan: ChatPlan) -> dict:
        ordered = {t: msg["scores"][t] for t in plan.selected if t in msg["scores"]}   # the request's order
        scores = _layer_keys(ordered, per_token=msg["type"] == "prompt")
        if msg["type"] == "token":
            out = {"type": "token", "token": msg["token"], "token_id": msg["token_id"], "step": msg["step"],
                   "scores": scores}
            if "logprob" in msg:
                out["logprob"], out["top_logprobs"] = msg["logprob"], [list(p) for p in msg["top_logprobs"]]
            return out
        root = self._root()
        return {"type": "prompt", "text": plan.text, "prompt_note": plan.prompt_note, "tokens": msg["tokens"],
                "token_ids": msg["token_ids"], "scores": scores, "model": self.lm.info.get("model"),
                "variant": self.variant, "steering": plan.steering_echo,
                "interventions": msg.get("interventions", []),
                "vectors": {t: [v.describe(root) for v in vs] for t, vs in plan.selected.items()}}

    def _done_message(self, msg: dict) -> dict:
        tok, stop = self.lm.tokenizer, msg["stop_token_id"]
        return {"type": "done", "stop_reason": msg["stop_reason"], "n_tokens": msg["n_tokens"],
                "n_prompt_tokens": msg["n_prompt_tokens"], "stop_token_id": stop,
                "stop_token": tok.decode([stop]) if stop is not None else None,
                "response": tok.decode(msg["token_ids"], skip_special_tokens=True),
                "token_ids": msg["token_ids"], "seconds": msg["seconds"],
                **({"monitor": msg["monitor"]} if "monitor" in msg else {})}


def describe_intervention(rec: dict) -> str:
    """One line for an intervention record (core.interventions.Interventions.record), relative numbers resolved."""
    name = rec["kind"].replace("_", "-")
    line = f"{name} {rec['spec']}"
    if "norm" in rec:
        used = ", ".join(f"{k} {rec[k]:.4g}" for k in ("coefficient", "low", "high") if f"{k}_relative" in rec)
        line += f": mean residual norm at L{rec['layer']} over the prompt {rec['norm']:.6g}, so {used}"
    return line


def format_message(msg: dict) -> str:
    """One human-readable line per streamed dict."""
    kind = msg.get("type")
    if kind == "prompt":
        vecs = ", ".join(f"{t}@L{v['layer']} ({v['method']}, {v.get('explanation') or v['selection_source']})"
                         for t, vs in msg["vectors"].items() for v in vs)
        line = (f"prompt: {len(msg['token_ids'])} tokens; {msg['model']} ({msg['variant']}); "
                f"vectors: {vecs or 'none'}")
        for rec in msg.get("interventions") or []:
            line += "\n  " + describe_intervention(rec)
        return line
    if kind == "token":
        scores = "  ".join(f"{t}@L{layer}={v:+.3f}" if v is not None else f"{t}@L{layer}=nan"
                           for t, per in msg["scores"].items() for layer, v in per.items())
        return f"{msg['step']:>4} {json.dumps(msg['token'], ensure_ascii=False):<16} {scores}"
    if kind == "done":
        mon = msg.get("monitor")
        why = (f" ({mon['trait']}@L{mon['layer']} scored {mon['score']:.3f} > {mon['threshold']:g} at response "
               f"token {mon['token_index']})" if mon else f" ({msg['stop_token']})" if msg.get("stop_token") else "")
        return f"done: {msg['n_tokens']} tokens, stop {msg['stop_reason']}{why}, {msg['seconds']:.2f} s"
    return json.dumps(msg, ensure_ascii=False)
