#!/usr/bin/env python3
"""Live chat on Modal (or locally): stream a model's tokens with per-token trait scores.

    modal deploy inference/modal_inference.py             the app "trait-capture": class TraitChat + web endpoint
    modal run inference/modal_inference.py --prompt "..."  one streamed chat on Modal, printed here (`chat`)
    python inference/modal_inference.py --local --experiment E --prompt "..." [--json]   the same class, here

    app = modal.App("trait-capture")
    TraitChat                     @app.cls: one model per container, loaded once (@modal.enter load)
        warmup() -> dict          ready + what is loaded (model, variant, traits, loads in this process)
        capture_activations_stream(messages=None, prompt=None, max_new_tokens, temperature, top_p, seed,
                                   system_prompt, steering, traits, layers, return_activations) -> Iterator[dict]
        web()                     ASGI app: GET /info, GET|POST /stream (server-sent events of the same dicts)
    ChatSession(experiment, model_variant, quantization)   the loaded model + best vectors; .stream(...), .info()
    create_web_app(session)       the FastAPI app that web() serves
    gpu_for_model(model, quantization) / GPU_BY_SIZE   the GPU per model size; $TRAIT_GPU overrides
    image_mounts(experiment, variant)                  what the image adds: core/, utils/, vectors, evidence, config
    LOADS                         one entry per model load in this process (a warm container never reloads)
    main(argv)                    the --local CLI

Deploy-time settings (environment variables read when the app is deployed; baked into the image):
TRAIT_EXPERIMENT (default demo), TRAIT_MODEL_VARIANT (default: the config's application variant),
TRAIT_QUANTIZATION (8bit / 4bit), TRAIT_GPU (e.g. A100-80GB, H100:2), TRAIT_SCALEDOWN_WINDOW (seconds,
default 300), TRAIT_WEB_AUTH (proxy (default): Modal proxy-auth tokens required; none: public endpoint).

Streamed dicts (JSON-ready: layer keys are strings, as they are in JSON and SSE):
    {"type": "prompt", "text", "prompt_note", "tokens", "token_ids", "scores": {trait: {layer: [per token]}},
     "model", "variant", "vectors": {trait: [{layer, method, position, path, sha256, selection_source, ...}]},
     "steering": [...]}
    {"type": "token", "token", "token_id", "step", "scores": {trait: {layer: float}}}     one per generated token
    {"type": "done", "stop_reason": "eos" | "length", "n_tokens", "n_prompt_tokens", "stop_token_id",
     "stop_token", "response", "token_ids", "seconds"}
A score is the fp32 scalar projection <residual at the token's own position, unit vector>, the number
the offline capture + projection scripts give for the same ids (core/streaming.py).
"""
# No `from __future__ import annotations`: FastAPI and Modal read the annotations at runtime.
import argparse
import json
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# the repo root: the checkout locally, /root in a Modal container (core/ and utils/ are mounted there)
_REPO = next((p for p in Path(__file__).resolve().parents if (p / "utils" / "paths.py").exists()),
             Path(__file__).resolve().parents[1])
sys.path.insert(0, str(_REPO))

import modal  # noqa: E402

from utils import paths  # noqa: E402  (no torch: importing this module stays light)
from utils.cli import Parser as _Parser  # noqa: E402
from core.errors import TraitError

# ---------------------------------------------------------------------------------------------------
# Deploy-time settings

APP_NAME = "trait-capture"
EXPERIMENT = os.environ.get("TRAIT_EXPERIMENT", "demo")
MODEL_VARIANT = os.environ.get("TRAIT_MODEL_VARIANT", "")
QUANTIZATION = os.environ.get("TRAIT_QUANTIZATION", "")
SCALEDOWN_WINDOW = os.environ.get("TRAIT_SCALEDOWN_WINDOW", "300")
WEB_AUTH = os.environ.get("TRAIT_WEB_AUTH", "proxy")
CACHE_DIR = "/models"                   # the Volume: HF downloads persist across containers
REMOTE_ROOT = "/root"                   # core/, utils/, experiments/ inside the container
MAX_NEW_TOKENS = 4096                   # per request, so one web call cannot hold a GPU for hours
STREAM_ARGS = ("messages", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "system_prompt",
               "steering", "traits", "layers", "return_activations")

# Smallest GPU whose memory holds the weights (bf16: 2 bytes per parameter; 8-bit 1, 4-bit 0.5) plus the
# KV cache of a chat: (up to this many billion bf16-equivalent parameters, GPU).
GPU_BY_SIZE: tuple[tuple[float, str], ...] = (
    (4.5, "A10G"),          # gemma-2-2b, Qwen3-1.7B, Llama-3.2-3B
    (15.0, "A100-40GB"),    # gemma-2-9b, Llama-3.1-8B, Qwen2.5-14B
    (35.0, "A100-80GB"),    # gemma-2-27b, Qwen2.5-32B
    (80.0, "H100:2"),       # Llama-3.3-70B, Qwen2.5-72B
    (float("inf"), "H100:8"),
)
DEFAULT_GPU = "A10G"        # a model id without a size in its name


class ChatError(TraitError):
    """A request or a deploy setting the chat cannot serve; the message names the field or flag."""


if not SCALEDOWN_WINDOW.isdigit():
    raise ChatError(f"$TRAIT_SCALEDOWN_WINDOW must be a whole number of seconds, got {SCALEDOWN_WINDOW!r}")
SCALEDOWN_WINDOW = int(SCALEDOWN_WINDOW)
if WEB_AUTH not in ("proxy", "none"):
    raise ChatError(f"$TRAIT_WEB_AUTH must be proxy or none, got {WEB_AUTH!r}")
if QUANTIZATION not in ("", "8bit", "4bit"):
    raise ChatError(f"$TRAIT_QUANTIZATION must be 8bit, 4bit or empty, got {QUANTIZATION!r}")


def model_size_billions(model: str) -> Optional[float]:
    """Parameters in billions read from a model id (`gemma-2-9b-it` -> 9, `Mixtral-8x7B` -> 56), or None."""
    import re

    name = model.lower().replace("_", "-")
    moe = re.search(r"(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", name)
    if moe:
        return int(moe.group(1)) * float(moe.group(2))
    sizes = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)b(?![a-z])", name)
    return float(sizes[-1]) if sizes else None


def gpu_for_model(model: Optional[str], quantization: str = "") -> str:
    """The GPU for a model id: $TRAIT_GPU if set, else the GPU_BY_SIZE row for its size (DEFAULT_GPU if unknown)."""
    override = os.environ.get("TRAIT_GPU")
    if override:
        return override
    size = model_size_billions(model) if model else None
    if size is None:
        return DEFAULT_GPU
    size *= {"8bit": 0.5, "4bit": 0.25}.get(quantization, 1.0)
    return next(gpu for limit, gpu in GPU_BY_SIZE if size <= limit)


def _variant_entry(experiment: str, variant: str) -> tuple[str, dict]:
    """(variant name, config entry) read with plain json at deploy time; ("", {}) when there is no config."""
    try:
        cfg = json.loads(paths.config_path(experiment).read_text(encoding="utf-8"))
        variants = cfg["model_variants"]
        name = variant or (cfg.get("defaults") or {}).get("application") or next(iter(variants))
        return name, dict(variants.get(name) or {})
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return "", {}


def _python_only(rel: Path) -> bool:      # ignore predicate: True drops the file
    return "__pycache__" in rel.parts or rel.suffix == ".pyc"


def _not_vector_file(rel: Path) -> bool:  # extraction/: only vectors and their metadata (not activations)
    return not ("vectors" in rel.parts and rel.suffix in (".pt", ".json"))


def _not_evidence_file(rel: Path) -> bool:  # steering/: only what best-vector selection reads
    return rel.name not in ("results.jsonl", "naturalness.json")


def image_mounts(experiment: str, variant: str = "") -> list[tuple[Path, str, Callable[[Path], bool]]]:
    """(local folder, container folder, ignore predicate) for each folder the image adds.

    core/ and utils/; the experiment's extraction/ (vectors and metadata only) and steering/ (results
    only, the best-vector evidence); and the variant's model / LoRA when they are local folders. Missing
    folders are left out.
    """
    exp_dir = paths.experiment_dir(experiment)
    remote_exp = f"{REMOTE_ROOT}/experiments/{experiment}"
    out = [(_REPO / "core", f"{REMOTE_ROOT}/core", _python_only), (_REPO / "utils", f"{REMOTE_ROOT}/utils", _python_only)]
    for sub, ignore in (("extraction", _not_vector_file), ("steering", _not_evidence_file)):
        if (exp_dir / sub).is_dir():
            out.append((exp_dir / sub, f"{remote_exp}/{sub}", ignore))
    _, entry = _variant_entry(experiment, variant)
    for ref in (entry.get("model"), entry.get("lora")):
        if not isinstance(ref, str) or not ref:
            continue
        p = Path(ref)
        if p.is_absolute():
            if p.is_dir():
                out.append((p, str(p), _python_only))
        elif (exp_dir / p).is_dir():  # utils.config resolves relative folders against the experiment first
            out.append((exp_dir / p, f"{remote_exp}/{p.as_posix()}", _python_only))
        elif (_REPO / p).is_dir():
            out.append((_REPO / p, f"{REMOTE_ROOT}/{p.as_posix()}", _python_only))
    return out


def build_image(experiment: str, variant: str = "", gpu: str = DEFAULT_GPU) -> modal.Image:
    """debian-slim + our pinned requirements.txt + the code, vectors and config (added at container start).

    The deploy-time settings go into the image's environment, so the container, which imports this
    module again, sees the same experiment, variant and GPU as the machine that deployed it.
    """
    image = (modal.Image.debian_slim(python_version="3.11")
             .pip_install_from_requirements(str(_REPO / "requirements.txt"))
             .env({"HF_HOME": f"{CACHE_DIR}/hf", "TRAIT_EXPERIMENTS_DIR": f"{REMOTE_ROOT}/experiments",
                   "TRAIT_EXPERIMENT": experiment, "TRAIT_MODEL_VARIANT": variant, "TRAIT_GPU": gpu,
                   "TRAIT_QUANTIZATION": QUANTIZATION, "TRAIT_SCALEDOWN_WINDOW": str(SCALEDOWN_WINDOW),
                   "TRAIT_WEB_AUTH": WEB_AUTH, "TOKENIZERS_PARALLELISM": "false"}))
    config = paths.config_path(experiment)
    if config.is_file():
        image = image.add_local_file(config, f"{REMOTE_ROOT}/experiments/{experiment}/config.json")
    for local, remote, ignore in image_mounts(experiment, variant):
        image = image.add_local_dir(local, remote, ignore=ignore)
    return image


# Secret.from_name / Volume.from_name are lazy handles: importing this module needs no network.
app = modal.App(APP_NAME)
cache_volume = modal.Volume.from_name("model-cache", create_if_missing=True)
hf_secret = modal.Secret.from_name("huggingface")     # HF_TOKEN, for gated models
GPU = gpu_for_model(_variant_entry(EXPERIMENT, MODEL_VARIANT)[1].get("model"), QUANTIZATION)
image = build_image(EXPERIMENT, MODEL_VARIANT, GPU)


# ---------------------------------------------------------------------------------------------------
# The session: a loaded model and its vectors (plain Python; TraitChat wraps it for Modal)

LOADS: list[dict] = []   # one entry per model load in this process: a warm container never adds a second


def _split(value, what: str) -> Optional[list[str]]:
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


class ChatSession:
    """An experiment's model variant (with its LoRA) and best trait vectors, loaded once; streams chats.

        s = ChatSession("demo", "lora")
        for msg in s.stream(prompt="Hello", traits=["behavioral/refusal"], max_new_tokens=32):
            print(msg)
    """

    def __init__(self, experiment: str, model_variant: Optional[str] = None, quantization: str = ""):
        from core.hooks import num_layers
        from utils.config import resolve_variant, use_chat_template
        from utils.model import load_variant, stop_token_ids
        from utils.vectors import NoEvidenceError, VectorError, best_vector, discover_traits

        if quantization not in ("", "8bit", "4bit"):
            raise ChatError(f"quantization {quantization!r}: choose 8bit, 4bit or nothing")
        t0 = time.perf_counter()
        self.experiment = experiment
        variant = resolve_variant(experiment, model_variant or None, "application")
        self.lm = load_variant(experiment, variant.name, load_in_8bit=quantization == "8bit",
                               load_in_4bit=quantization == "4bit")
        self.variant = variant.name
        self.use_chat_template = use_chat_template(experiment)
        self.stop_ids = stop_token_ids(self.lm.tokenizer, self.lm.model)
        self.n_layers = num_layers(self.lm.model)
        self.hidden_size = int(self.lm.model.get_input_embeddings().weight.shape[-1])
        # the projection script's defaults: vectors of the extraction variant, evidence of the application one
        self.extraction_variant = resolve_variant(experiment, None, "extraction").name
        self.steering_variant = resolve_variant(experiment, None, "application").name
        self.best: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        for trait in discover_traits(experiment, self.extraction_variant):
            try:
                self.best[trait] = best_vector(experiment, trait, self.extraction_variant, self.steering_variant,
                                               hidden_size=self.hidden_size)
            except (NoEvidenceError, VectorError) as e:   # still usable with explicit layers
                self.unavailable[trait] = str(e)
        self._selected: dict[tuple[str, str], list] = {}
        self._lock = threading.Lock()   # one stream at a time on this model
        self.load_seconds = time.perf_counter() - t0
        LOADS.append({"experiment": experiment, "variant": self.variant, "model": self.lm.info.get("model"),
                      "seconds": self.load_seconds})

    # --- what is loaded --------------------------------------------------------------------------
    def info(self) -> dict:
        root = paths.experiment_dir(self.experiment)
        return {"status": "ready", "experiment": self.experiment, "variant": self.variant,
                "model": self.lm.info.get("model"), "lora": self.lm.info.get("lora"),
                "dtype": self.lm.info.get("dtype"), "device": self.lm.info.get("device"),
                "quantization": self.lm.info.get("quantization"), "num_layers": self.n_layers,
                "load_time": round(self.load_seconds, 2), "loads_in_process": len(LOADS),
                "traits": {t: v.describe(root) for t, v in self.best.items()},
                "unavailable_traits": dict(self.unavailable), "stop_ids": list(self.stop_ids)}

    # --- request parsing -------------------------------------------------------------------------
    def _vectors_for(self, trait: str, layers: Optional[str]) -> list:
        from utils.vectors import select_vectors

        if layers is None:
            if trait not in self.best:
                raise ChatError(f"traits: {trait!r} has no best vector ({self.unavailable[trait]}); "
                                f"ask for explicit layers")
            return [self.best[trait]]
        key = (trait, layers)
        if key not in self._selected:
            self._selected[key] = select_vectors(
                self.experiment, trait, self.extraction_variant, self.steering_variant, layers=layers,
                hidden_size=self.hidden_size, n_layers=self.n_layers)
        return self._selected[key]

    def _known(self, trait: str, what: str) -> str:
        known = sorted(set(self.best) | set(self.unavailable))
        if trait not in known:
            raise ChatError(f"{what}: unknown trait {trait!r} (traits with vectors in {self.experiment!r}: "
                            f"{', '.join(known) or 'none'})")
        return trait

    def _steering(self, configs) -> tuple[list, list[dict]]:
        import torch

        from core.hooks import COMPONENTS, SteeringSpec

        if configs is None:
            return [], []
        if not isinstance(configs, list):
            raise ChatError("steering: expected a list of {trait | vector, layer, coefficient, positions}")
        specs, echo = [], []
        for i, c in enumerate(configs):
            where = f"steering[{i}]"
            if not isinstance(c, dict):
                raise ChatError(f"{where}: expected an object")
            extra = set(c) - {"trait", "vector", "layer", "coefficient", "positions", "component"}
            if extra:
                raise ChatError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
            layer, coef = c.get("layer"), c.get("coefficient", 1.0)
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
                raise ChatError(f"{where}.layer: an integer in 0-{self.n_layers - 1} is required, got {layer!r}")
            if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
                raise ChatError(f"{where}.coefficient: a finite number is required, got {coef!r}")
            positions = c.get("positions", "all")
            if positions not in ("all", "prompt", "response"):
                raise ChatError(f"{where}.positions: all, prompt or response, got {positions!r}")
            component = c.get("component", "residual")
            if component not in COMPONENTS:
                raise ChatError(f"{where}.component: choose from {', '.join(COMPONENTS)}, got {component!r}")
            if ("trait" in c) == ("vector" in c):
                raise ChatError(f"{where}: give exactly one of trait or vector")
            if "trait" in c:
                trait = self._known(str(c["trait"]).strip("/"), f"{where}.trait")
                vector = self._vectors_for(trait, str(layer))[0].vector
                echo.append({"trait": trait, "layer": layer, "coefficient": float(coef), "positions": positions,
                             "component": component})
            else:
                v = c["vector"]
                if not isinstance(v, list) or len(v) != self.hidden_size or not all(
                        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                    raise ChatError(f"{where}.vector: {self.hidden_size} finite numbers are required")
                vector = torch.tensor(v, dtype=torch.float32)   # used as given: coefficient x vector is added
                echo.append({"vector_norm": float(vector.norm()), "layer": layer, "coefficient": float(coef),
                             "positions": positions, "component": component})
            specs.append(SteeringSpec(vector=vector, layer=layer, coefficient=float(coef), component=component,
                                      positions=positions))
        return specs, echo

    def _prompt_ids(self, messages, prompt, system_prompt) -> tuple[str, Optional[str], list[int]]:
        from utils.model import format_messages, format_prompt, tokenize_prompt

        if (messages is None) == (prompt is None):
            raise ChatError("give exactly one of messages or prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt:
                raise ChatError("prompt: a non-empty string is required")
            text, note = format_prompt(self.lm.tokenizer, prompt, system_prompt, self.use_chat_template)
        else:
            text, note = format_messages(self.lm.tokenizer, messages, system_prompt, self.use_chat_template)
        return text, note, tokenize_prompt(self.lm.tokenizer, text)   # exactly one BOS

    # --- streaming -------------------------------------------------------------------------------
    def stream(self, messages: Optional[list] = None, prompt: Optional[str] = None, max_new_tokens: int = 200,
               temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
               system_prompt: Optional[str] = None, steering: Optional[list] = None, traits=None, layers=None,
               return_activations: bool = False) -> Iterator[dict]:
        """Stream one chat turn as JSON-ready dicts (see the module docstring). Bad input: ChatError at the start."""
        from core.streaming import stream_with_scores

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ChatError(f"max_new_tokens: an integer in 1-{MAX_NEW_TOKENS} is required, got {max_new_tokens!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ChatError(f"seed: an integer is required, got {seed!r}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = str(layers)
        elif isinstance(layers, list):
            layers = ",".join(str(x) for x in layers)
        elif layers is not None and not isinstance(layers, str):
            raise ChatError(f"layers: a spec such as 'best,best+2' or '6,12', or a list of layers, got {layers!r}")
        wanted = _split(traits, "traits")
        if wanted is None:
            wanted = sorted(self.best) if layers is None else sorted(set(self.best) | set(self.unavailable))
        selected = {self._known(t, "traits"): self._vectors_for(t, layers) for t in wanted}
        specs, steer_echo = self._steering(steering)
        text, note, ids = self._prompt_ids(messages, prompt, system_prompt)
        vectors = {t: {v.layer: v.vector for v in vs} for t, vs in selected.items()}
        root = paths.experiment_dir(self.experiment)
        tok = self.lm.tokenizer
        with self._lock:
            for msg in stream_with_scores(self.lm.model, ids, vectors, max_new_tokens, temperature=float(temperature),
                                          top_p=float(top_p), seed=seed, stop_ids=self.stop_ids, steering=specs,
                                          return_activations=bool(return_activations), tokenizer=tok):
                kind = msg["type"]
                if kind == "done":
                    stop = msg["stop_token_id"]
                    yield {"type": "done", "stop_reason": msg["stop_reason"], "n_tokens": msg["n_tokens"],
                           "n_prompt_tokens": msg["n_prompt_tokens"], "stop_token_id": stop,
                           "stop_token": tok.decode([stop]) if stop is not None else None,
                           "response": tok.decode(msg["token_ids"], skip_special_tokens=True),
                           "token_ids": msg["token_ids"], "seconds": msg["seconds"]}
                    continue
                ordered = {t: msg["scores"][t] for t in selected if t in msg["scores"]}   # the request's order
                scores = _layer_keys(ordered, per_token=kind == "prompt")
                if kind == "prompt":
                    out = {"type": "prompt", "text": text, "prompt_note": note, "tokens": msg["tokens"],
                           "token_ids": msg["token_ids"], "scores": scores, "model": self.lm.info.get("model"),
                           "variant": self.variant, "steering": steer_echo,
                           "vectors": {t: [v.describe(root) for v in vs] for t, vs in selected.items()}}
                else:
                    out = {"type": "token", "token": msg["token"], "token_id": msg["token_id"], "step": msg["step"],
                           "scores": scores}
                if return_activations:
                    out["activations"] = {str(layer): a.tolist() for layer, a in msg["activations"].items()}
                yield out


# ---------------------------------------------------------------------------------------------------
# Web: server-sent events

def _sse(msg: dict) -> str:
    return f"data: {json.dumps(msg, ensure_ascii=False, allow_nan=False)}\n\n"


def create_web_app(session: ChatSession):
    """FastAPI app: GET /info; GET /stream?prompt=..&traits=..&max_new_tokens=.. (for EventSource) and
    POST /stream with a JSON body of capture_activations_stream's arguments. Each streamed dict is one
    `data: {json}` event; bad input is HTTP 400 before the stream starts, a failure mid-stream one
    {"type": "error"} event."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import StreamingResponse

    web = FastAPI(title="trait-capture", description="tokens with per-token trait scores, as server-sent events")
    web.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])

    def respond(kwargs: dict):
        gen = session.stream(**kwargs)
        try:
            first = next(gen)   # argument errors surface here, before any byte is sent
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

        def events():
            yield _sse(first)
            try:
                for msg in gen:
                    yield _sse(msg)
            except Exception as e:  # the stream has started: report in-band, then end it
                yield _sse({"type": "error", "message": f"{type(e).__name__}: {e}"})
            finally:
                gen.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @web.get("/info")
    def info():
        return session.info()

    @web.get("/stream")
    def stream_get(prompt: str, traits: Optional[str] = None, layers: Optional[str] = None,
                   max_new_tokens: int = 200, temperature: float = 0.0, top_p: float = 1.0,
                   seed: Optional[int] = None, system_prompt: Optional[str] = None):
        return respond(dict(prompt=prompt, traits=traits, layers=layers, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, system_prompt=system_prompt))

    @web.post("/stream")
    async def stream_post(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise HTTPException(status_code=400, detail="the body must be a JSON object")
        extra = sorted(set(body) - set(STREAM_ARGS))
        if extra:
            raise HTTPException(status_code=400, detail=f"unknown field(s) {', '.join(extra)} "
                                                        f"(fields: {', '.join(STREAM_ARGS)})")
        return respond(body)

    return web


# ---------------------------------------------------------------------------------------------------
# The Modal class

@app.cls(image=image, gpu=GPU, volumes={CACHE_DIR: cache_volume}, secrets=[hf_secret],
         scaledown_window=SCALEDOWN_WINDOW, timeout=900)
class TraitChat:
    """The live chat, one loaded model per container.

        chat = TraitChat()                                   # or TraitChat(experiment=..., model_variant=...)
        for msg in chat.capture_activations_stream.remote_gen(prompt="Hi", max_new_tokens=32): ...
        for msg in chat.capture_activations_stream.local(prompt="Hi"): ...   # here, no Modal account needed
    """

    experiment: str = modal.parameter(default=EXPERIMENT)
    model_variant: str = modal.parameter(default=MODEL_VARIANT)

    @modal.enter()
    def load(self) -> None:
        self.session = ChatSession(self.experiment, self.model_variant or None, QUANTIZATION)
        if not modal.is_local():
            cache_volume.commit()   # keep what the first load downloaded into HF_HOME on the Volume

    @modal.method()
    def warmup(self) -> dict:
        return self.session.info()

    @modal.method()
    def capture_activations_stream(self, messages: Optional[list] = None, prompt: Optional[str] = None,
                                   max_new_tokens: int = 200, temperature: float = 0.0, top_p: float = 1.0,
                                   seed: Optional[int] = None, system_prompt: Optional[str] = None,
                                   steering: Optional[list] = None, traits: Any = None, layers: Any = None,
                                   return_activations: bool = False):
        yield from self.session.stream(messages=messages, prompt=prompt, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, seed=seed, system_prompt=system_prompt,
                                       steering=steering, traits=traits, layers=layers,
                                       return_activations=return_activations)

    @modal.asgi_app(requires_proxy_auth=WEB_AUTH != "none")
    def web(self):
        return create_web_app(self.session)


# ---------------------------------------------------------------------------------------------------
# Printing a stream (modal run and --local)

def format_message(msg: dict) -> str:
    """One human-readable line per streamed dict."""
    kind = msg.get("type")
    if kind == "prompt":
        vecs = ", ".join(f"{t}@L{v['layer']} ({v['method']}, {v['selection_source']})"
                         for t, vs in msg["vectors"].items() for v in vs)
        return (f"prompt: {len(msg['token_ids'])} tokens; {msg['model']} ({msg['variant']}); "
                f"vectors: {vecs or 'none'}")
    if kind == "token":
        scores = "  ".join(f"{t}@L{layer}={v:+.3f}" if v is not None else f"{t}@L{layer}=nan"
                           for t, per in msg["scores"].items() for layer, v in per.items())
        return f"{msg['step']:>4} {json.dumps(msg['token'], ensure_ascii=False):<16} {scores}"
    if kind == "done":
        return (f"done: {msg['n_tokens']} tokens, stop {msg['stop_reason']}"
                f"{' (' + msg['stop_token'] + ')' if msg.get('stop_token') else ''}, {msg['seconds']:.2f} s")
    return json.dumps(msg, ensure_ascii=False)


@app.local_entrypoint()
def chat(prompt: str = "What is artificial intelligence?", max_new_tokens: int = 50, traits: str = "",
         temperature: float = 0.0):
    """`modal run inference/modal_inference.py --prompt ...`: one streamed chat on Modal, printed here."""
    remote = TraitChat()
    for msg in remote.capture_activations_stream.remote_gen(prompt=prompt, max_new_tokens=max_new_tokens,
                                                            traits=traits or None, temperature=temperature):
        print(format_message(msg), flush=True)


# ---------------------------------------------------------------------------------------------------
# Local CLI

def parse_steer(spec: str) -> dict:
    """--steer TRAIT:LAYER:COEFFICIENT[:POSITIONS] -> a steering config."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ChatError(f"--steer {spec!r}: expected TRAIT:LAYER:COEFFICIENT[:all|prompt|response]")
    try:
        cfg = {"trait": parts[0], "layer": int(parts[1]), "coefficient": float(parts[2])}
    except ValueError:
        raise ChatError(f"--steer {spec!r}: LAYER must be an integer and COEFFICIENT a number") from None
    if len(parts) == 4:
        cfg["positions"] = parts[3]
    return cfg


def run_local(experiment: str, prompt: str, model_variant: Optional[str] = None, **kwargs) -> Iterator[dict]:
    """The stream of TraitChat, run in this process through Modal's .local() (enter, then the method)."""
    obj = TraitChat(experiment=experiment, model_variant=model_variant or "")
    return obj.capture_activations_stream.local(prompt=prompt, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="modal_inference.py",
        description="Live chat with per-token trait scores. On Modal: modal deploy / modal run this file. "
                    "Here (no Modal account): --local runs the same class in this process.",
        epilog="example:\n  python inference/modal_inference.py --local --experiment demo --prompt \"Tell me a story\" "
               "--traits behavioral/refusal --max-new-tokens 32 --json\n"
               "  python inference/modal_inference.py --local --experiment demo --prompt Hi "
               "--steer behavioral/refusal:2:4.0:prompt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", action="store_true", help="run here instead of on Modal (required for this entry point)")
    p.add_argument("--experiment", default=EXPERIMENT, help=f"experiment folder (default {EXPERIMENT})")
    p.add_argument("--model-variant", help="model variant of config.json (default: the application variant)")
    p.add_argument("--prompt", required=True, help="the user message (formatted with the chat template)")
    p.add_argument("--system-prompt", help="a system turn (folded into the user turn where the template has none)")
    p.add_argument("--traits", help="comma-separated category/name traits (default: every trait with a best vector)")
    p.add_argument("--layers", help="projection layers, e.g. best,best+2 or 6,12 (default: each trait's best)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    p.add_argument("--steer", action="append", metavar="TRAIT:LAYER:COEF[:POSITIONS]",
                   help="add COEF x the trait's unit vector at LAYER; positions all (default), prompt or response; "
                        "repeatable")
    p.add_argument("--json", action="store_true", help="one JSON object per line (prompt, each token, done)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.local:
        print("error: without --local this file is a Modal app: run `modal run inference/modal_inference.py "
              "--prompt ...` or `modal deploy inference/modal_inference.py`; add --local to run it here",
              file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*executing locally and will not have access.*")
    try:
        from utils.config import resolve_variant
        from utils.vectors import check_trait_name, discover_traits

        resolve_variant(args.experiment, args.model_variant, "application")   # before the model loads
        for t in _split(args.traits, "--traits") or []:
            if check_trait_name(t) not in discover_traits(args.experiment):
                raise ChatError(f"--traits: unknown trait {t!r} (traits with vectors in {args.experiment!r}: "
                                f"{', '.join(discover_traits(args.experiment)) or 'none'})")
        steering = [parse_steer(s) for s in args.steer] if args.steer else None
        n, done = 0, None
        for msg in run_local(args.experiment, args.prompt, args.model_variant, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             system_prompt=args.system_prompt, steering=steering, traits=args.traits,
                             layers=args.layers):
            print(json.dumps(msg, ensure_ascii=False, allow_nan=False) if args.json else format_message(msg),
                  flush=True)
            n += msg["type"] == "token"
            done = msg if msg["type"] == "done" else done
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = f"streamed {n} tokens (stop: {done['stop_reason']}) in {done['seconds']:.2f} s"
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
