#!/usr/bin/env python3
"""A local model server: load a model once, generate from token ids over HTTP (FastAPI + uvicorn).

    python inference/model_server.py --experiment E [--model-variant V]     serve a config variant (with its LoRA)
    python inference/model_server.py --model ID_OR_FOLDER [--lora PATH]     serve a model directly

    create_app(loaded, token=None, experiment=None) -> FastAPI   GET /health, POST /generate, the OpenAI routes
                                                                 (also usable in-process)
    serve(loaded, host, port, token)               run uvicorn until SIGINT / SIGTERM, then return
    ServerClient(url, token)                       .health(timeout), .generate(prompt_ids, ...)
    probe_server(url, want, token)                 -> (ServerClient | None, reason): is it up and serving `want`?
    ServeOptions / run_server(opts)                the CLI's flags / check, load, serve (status lines on stderr)
    main(argv) -> int                              the CLI: python inference/model_server.py --help
    ServerError                                    the server failed while answering (a TraitError, exit status 1)

Endpoints:
    GET  /health   -> {status, model, variant, lora, model_path, lora_path, dtype, device, quantization, stop_ids}
    POST /generate {prompt_ids: [[int]], max_new_tokens, temperature, top_p, seed, row_seeds?, stop_ids?, batch_size?,
                    interventions?: [{kind, spec, vector}]}
                   -> {ids: [[int]], texts: [str], stop_reasons: [str]} (+ monitors, interventions: one per prompt)
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions   OpenAI-compatible (inference/openai_api.py):
                   the `openai` client works with base_url=http://127.0.0.1:8765/v1 and api_key=the token; each
                   choice carries `trait_scores` (per-token scores with the experiment's vectors, ids, provenance)
/generate is core.generation.generate_in_batches, the same code the local path of generate_responses.py
runs, so both write identical files. With --token (or $TRAIT_SERVER_TOKEN) every request needs
`Authorization: Bearer <token>` (401 otherwise). Binds 127.0.0.1 by default; no trust_remote_code unless asked.
"""
# No `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime.
import argparse
import hmac
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import requests

from core.errors import TraitError
from core.generation import auto_batch_size, generate_in_batches
from inference.chat_session import ChatSession
from inference.openai_api import add_openai_routes
from utils import cli

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
TOKEN_ENV = "TRAIT_SERVER_TOKEN"
URL_ENV = "TRAIT_SERVER_URL"
HEALTH_TIMEOUT_S = 1.0


class ServerError(TraitError):
    """The model server failed while answering (connection lost, HTTP error); the message says which.

    Not bad input, so its exit status is 1 (cli.run), not 2; a client run stopped by it can be resumed.
    """

    exit_code = 1


class ServeError(TraitError):
    """Bad flags for starting a server (--port, --host); the message names the flag."""


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


# ---- server ---------------------------------------------------------------------------------------------------
def health_info(loaded) -> dict:
    from utils.model import stop_token_ids

    info = loaded.info
    return {
        "status": "ok", "model": info.get("model"), "variant": info.get("variant"), "lora": info.get("lora"),
        "model_path": info.get("model_path", info.get("model")), "lora_path": info.get("lora_path", info.get("lora")),
        "dtype": info.get("dtype"), "device": info.get("device"), "quantization": info.get("quantization"),
        "stop_ids": stop_token_ids(loaded.tokenizer, loaded.model),
    }


def served_model_id(loaded) -> str:
    """The id /v1/models lists: the hub id, or a local folder's name."""
    model = str(loaded.info.get("model_path") or loaded.info.get("model"))
    return Path(model).name if Path(model).exists() else model


def create_app(loaded, token: str | None = None, experiment: str | None = None):
    """The FastAPI app around one loaded model (utils.model.LoadedModel). Requests are served one at a time.

    With `experiment` (the one the model was loaded for), the OpenAI routes score tokens with its trait vectors."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from pydantic import BaseModel, Field, StrictInt

    model, tok = loaded.model, loaded.tokenizer
    health = health_info(loaded)
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lock = threading.Lock()  # one generate at a time: the model and its KV cache are not shared safely
    expected = f"Bearer {token}".encode() if token else None

    def check_token(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    class GenerateRequest(BaseModel):
        prompt_ids: list[list[StrictInt]] = Field(min_length=1)
        max_new_tokens: StrictInt = Field(50, ge=1)
        temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: StrictInt | None = None
        row_seeds: list[StrictInt] | None = None
        stop_ids: list[StrictInt] | None = None
        batch_size: StrictInt | None = Field(None, ge=1)
        interventions: list[dict] | None = None   # [{kind, spec, vector}] (core/interventions.py grammar)

    app = FastAPI(title="trait-inference model server", dependencies=[Depends(check_token)])
    session = ChatSession(experiment, loaded.info.get("variant"), loaded=loaded)
    session._lock = lock   # /generate and the OpenAI routes share the model: one request at a time
    add_openai_routes(app, session, served_model_id(loaded),
                      aliases=(loaded.info.get("model"), loaded.info.get("model_path"), loaded.info.get("variant")))

    @app.get("/health")
    def get_health() -> dict:
        return health

    @app.post("/generate")
    def post_generate(req: GenerateRequest) -> dict:
        for n, ids in enumerate(req.prompt_ids):
            if not ids:
                raise HTTPException(status_code=422, detail=f"prompt_ids[{n}] is empty")
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise HTTPException(status_code=422,
                                    detail=f"prompt_ids[{n}] has id {bad[0]} outside the vocabulary (size {vocab_size})")
        if req.row_seeds is not None and len(req.row_seeds) != len(req.prompt_ids):
            raise HTTPException(status_code=422, detail="row_seeds must have one seed per prompt")
        items = _interventions(req.interventions)
        longest = max(len(p) for p in req.prompt_ids) + req.max_new_tokens
        with lock:
            results, _ = generate_in_batches(
                model, req.prompt_ids, req.batch_size or auto_batch_size(model, longest), pad_id,
                req.max_new_tokens, req.temperature, req.top_p, req.seed, req.stop_ids, req.row_seeds,
                items, tok.all_special_ids)
        out = {"ids": [r.ids for r in results],
               "texts": [tok.decode(r.ids, skip_special_tokens=True) for r in results],
               "stop_reasons": [r.stop_reason for r in results]}
        if items:
            out.update({"monitors": [r.monitor for r in results], "interventions": [r.interventions for r in results]})
        return out

    def _interventions(given: list[dict] | None) -> list:
        import torch

        from core.interventions import InterventionError, Interventions, parse_intervention

        items = []
        for n, d in enumerate(given or []):
            try:
                if set(d) != {"kind", "spec", "vector"} or not isinstance(d["vector"], list):
                    raise InterventionError("expected {kind, spec, vector: [floats]}")
                items.append(parse_intervention(d["kind"], d["spec"], f"interventions[{n}]").with_vector(
                    torch.tensor(d["vector"], dtype=torch.float32)))
            except (InterventionError, TypeError, ValueError) as e:
                raise HTTPException(status_code=422, detail=f"interventions[{n}]: {e}") from None
        try:
            Interventions(model, items)      # layer range and vector size, checked before generating
        except InterventionError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        return items

    return app


def serve(loaded, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          experiment: str | None = None) -> str | None:
    """Run the server in this (main) thread until SIGINT / SIGTERM; returns the name of the signal that stopped it."""
    import uvicorn

    stopped_by: list[str] = []

    # uvicorn shuts down gracefully on these signals, then re-raises them: this handler turns that into a clean return
    def note(sig, _frame):
        stopped_by.append(signal.Signals(sig).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = uvicorn.Config(create_app(loaded, token, experiment), host=host, port=port, log_level="warning",
                                access_log=False)
        uvicorn.Server(config).run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return stopped_by[0] if stopped_by else None


# ---- client ---------------------------------------------------------------------------------------------------
class ServerClient:
    """Talks to a running model server.

        client = ServerClient("http://127.0.0.1:8765", token=None)
        client.health()                      -> dict
        client.generate([[1, 5, 7]], 20)     -> {"ids": [[...]], "texts": [...], "stop_reasons": [...]}
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout_s: float | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s  # generation can take long: no read timeout by default
        self.served: dict = {}      # the last /health answer

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict:
        r = requests.get(f"{self.url}/health", headers=self._headers(), timeout=timeout_s)
        r.raise_for_status()
        self.served = r.json()
        return self.served

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, row_seeds: list[int] | None = None,
                 stop_ids: list[int] | None = None, batch_size: int | None = None,
                 interventions: list | None = None) -> dict:
        """`interventions`: core.interventions.Intervention objects with their vectors (sent as lists)."""
        body: dict[str, Any] = {"prompt_ids": prompt_ids, "max_new_tokens": max_new_tokens,
                                "temperature": temperature, "top_p": top_p, "seed": seed, "row_seeds": row_seeds,
                                "stop_ids": stop_ids, "batch_size": batch_size}
        if interventions:
            body["interventions"] = [{"kind": it.kind, "spec": it.spec(), "vector": it.vector.tolist()}
                                     for it in interventions]
        try:
            r = requests.post(f"{self.url}/generate", json=body, headers=self._headers(),
                              timeout=(5.0, self.timeout_s))
        except requests.RequestException as e:
            raise ServerError(f"model server at {self.url} failed: {e}") from e
        if r.status_code != 200:
            raise ServerError(f"model server at {self.url} answered HTTP {r.status_code}: {r.text[:300]}")
        out = r.json()
        if len(out.get("ids", [])) != len(prompt_ids):
            raise ServerError(f"model server at {self.url} returned {len(out.get('ids', []))} results "
                              f"for {len(prompt_ids)} prompts")
        return out


def _same_ref(a: str | None, b: str | None) -> bool:
    """Same model / adapter: equal hub ids, or the same local folder however it is spelled."""
    if a is None or b is None:
        return a is None and b is None
    norm = [str(Path(x).resolve()) if Path(x).exists() else x for x in (a, b)]
    return norm[0] == norm[1]


def probe_server(url: str, want: dict, token: str | None = None) -> tuple["ServerClient | None", str]:
    """Use the server only when /health answers within a second and serves exactly `want`.

    want: {model_path, lora_path, quantization, dtype}. Returns (client, why) or (None, why not).
    """
    client = ServerClient(url, token)
    try:
        h = client.health()
    except requests.ConnectionError:
        return None, f"no model server at {url}"
    except requests.Timeout:
        return None, f"model server at {url} did not answer /health within {HEALTH_TIMEOUT_S:g} s"
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        if code == 401:
            return None, f"model server at {url} needs a valid token (set {TOKEN_ENV})"
        return None, f"model server at {url} answered /health with HTTP {code}"
    except (requests.RequestException, ValueError) as e:
        return None, f"model server at {url} is unusable ({e})"
    served = h.get("model_path") or h.get("model")
    if not _same_ref(served, want.get("model_path")):
        return None, f"model server at {url} serves {served!r}, not {want.get('model_path')!r}"
    if not _same_ref(h.get("lora_path", h.get("lora")), want.get("lora_path")):
        return None, (f"model server at {url} serves LoRA {h.get('lora_path', h.get('lora'))!r}, "
                      f"not {want.get('lora_path')!r}")
    if h.get("quantization") != want.get("quantization"):
        return None, (f"model server at {url} runs quantization {h.get('quantization')!r}, "
                      f"not {want.get('quantization')!r}")
    if want.get("dtype") and h.get("dtype") != want["dtype"]:
        return None, f"model server at {url} runs dtype {h.get('dtype')!r}, a local load would use {want['dtype']!r}"
    return client, f"model server at {url} ({served}{' + LoRA ' + str(h.get('lora')) if h.get('lora') else ''})"


# ---- CLI ------------------------------------------------------------------------------------------------------
def load_for_serving(experiment: str | None = None, model_variant: str | None = None, model: str | None = None,
                     lora: str | None = None, dtype: str = "auto", load_in_8bit: bool = False,
                     load_in_4bit: bool = False, trust_remote_code: bool = False):
    """LoadedModel with `model_path` / `lora_path` in its info, which /health reports for exact matching."""
    from utils.config import ConfigError, resolve_variant
    from utils.model import load_model

    kw = dict(dtype=dtype, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    if (experiment is None) == (model is None):
        raise ConfigError("give either --experiment (with an optional --model-variant) or --model")
    if experiment is not None:
        if lora:
            raise ConfigError("--lora goes with --model; with --experiment the variant's config names the LoRA")
        v = resolve_variant(experiment, model_variant)
        loaded = load_model(v.model_path(experiment), lora=v.lora_path(experiment), **kw)
        loaded.info.update({"variant": v.name, "model": v.model, "lora": v.lora,
                            "model_path": v.model_path(experiment), "lora_path": v.lora_path(experiment)})
        return loaded
    if model_variant:
        raise ConfigError("--model-variant needs --experiment")
    loaded = load_model(model, lora=lora, **kw)
    loaded.info.update({"variant": None, "model_path": model, "lora_path": lora})
    return loaded


@dataclass(frozen=True)
class ServeOptions:
    """The server's CLI flags (see build_parser)."""

    experiment: str | None = None
    model_variant: str | None = None
    model: str | None = None
    lora: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None             # None: $TRAIT_SERVER_TOKEN, else no token
    dtype: str = "auto"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ServeOptions":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        description="Serve one model (and LoRA) over HTTP so generate_responses.py can skip loading it per run.",
        epilog="examples:\n  python inference/model_server.py --experiment demo --model-variant instruct   "
               "# serves until Ctrl-C\n"
               "  python inference/model_server.py --model google/gemma-2-2b-it --port 8766 --token s3cret   "
               "# serves until Ctrl-C\n\n"
               "generate_responses.py finds it at $TRAIT_SERVER_URL (default http://127.0.0.1:8765) and sends\n"
               "$TRAIT_SERVER_TOKEN. OpenAI-compatible clients: base_url http://127.0.0.1:8765/v1, api_key the\n"
               "token (any string without one), model as GET /v1/models lists it; per-token trait scores (with\n"
               "--experiment's vectors) come in each choice's `trait_scores`. Stop with Ctrl-C or SIGTERM.")
    p.add_argument("--experiment", help="experiment whose config.json names the model variant")
    p.add_argument("--model-variant", help="variant of --experiment (default: defaults.application)")
    p.add_argument("--model", help="hub id or local folder (instead of --experiment)")
    p.add_argument("--lora", help="LoRA adapter to apply on --model")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token", default=None, help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4) weights")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")
    return p


def _check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the port is taken."""
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: must be in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from e


def run_server(opts: ServeOptions) -> str | None:
    """Check the port, load the model, serve until a signal; returns the signal's name. Status lines go to stderr."""
    token = opts.token or os.environ.get(TOKEN_ENV) or None
    _check_port(opts.host, opts.port)
    loaded = load_for_serving(opts.experiment, opts.model_variant, opts.model, opts.lora, opts.dtype,
                              opts.load_in_8bit, opts.load_in_4bit, opts.trust_remote_code)
    if not token and opts.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {opts.host} without a token: anyone who can reach it can use the model",
              file=sys.stderr)
    info = loaded.info
    print(f"model server: {info.get('variant') or '-'} = {info.get('model')}"
          f"{' + LoRA ' + str(info.get('lora')) if info.get('lora') else ''} ({info.get('dtype')}, {info.get('device')})"
          f" on http://{opts.host}:{opts.port} ({'token required' if token else 'no token'})",
          file=sys.stderr, flush=True)
    stopped_by = serve(loaded, opts.host, opts.port, token, opts.experiment)
    print(f"model server stopped{' (' + stopped_by + ')' if stopped_by else ''}", file=sys.stderr)
    return stopped_by


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda args: run_server(ServeOptions.from_args(args)), lambda _stopped: "", argv)


if __name__ == "__main__":
    sys.exit(main())
