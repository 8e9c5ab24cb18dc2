#!/usr/bin/env python3
"""Live chat on Modal (or locally): stream a model's tokens with per-token trait scores.

    modal deploy inference/modal_inference.py             the app "trait-capture": class TraitChat + web endpoint
    python inference/modal_inference.py --prompt "..."     one streamed chat from the deployed app, printed here
    python inference/modal_inference.py --warmup           wait until the deployed app has its model loaded
    modal run inference/modal_inference.py --prompt "..."  the same in an ephemeral app (built now, gone after)
    python inference/modal_inference.py --local --experiment E --prompt "..." [--json]   the same class, here
    python inference/modal_inference.py --local --experiment E --serve [--port 8770]   its web app (and chat
                                                          page) on 127.0.0.1, for a local model

    app = modal.App("trait-capture")
    TraitChat                     @app.cls: one model per container, loaded once (@modal.enter load)
        warmup() -> dict          ready + what is loaded (model, variant, traits, loads in this process)
        capture_activations_stream(messages=None, prompt=None, max_new_tokens, temperature, top_p, seed,
                                   system_prompt, steering, traits, layers, return_activations) -> Iterator[dict]
        web()                     ASGI app: GET /info, GET|POST /stream (server-sent events of the same dicts)
    SETTINGS, GPU, image          the deploy settings, the GPU they give, the image (inference/modal_common.py)
    main(argv)                    the CLI (console script `trait-chat`): the deployed app (modal.Cls.from_name),
                                  or --local: one chat printed here, or --serve

The session itself (ChatSession, the streamed dicts) is inference/chat_session.py, the web app
inference/chat_web.py; neither needs Modal.

Deploy-time settings (environment variables, baked into the image): TRAIT_EXPERIMENT (default demo),
TRAIT_MODEL_VARIANT (default: the config's application variant), TRAIT_QUANTIZATION (8bit / 4bit),
TRAIT_GPU (e.g. A100-80GB, H100:2), TRAIT_SCALEDOWN_WINDOW (seconds, 2-3600, default 300), TRAIT_WEB_AUTH
(proxy (default): Modal proxy-auth tokens required; none: public endpoint), TRAIT_HF_SECRET (a Modal secret
with HF_TOKEN, for gated models; none by default), TRAIT_CHAT_CONCURRENCY (chats one container accepts, taking
turns on the GPU; default 8) and TRAIT_MAX_CONTAINERS (default 1). They are checked when the `modal` CLI builds
the app and when a container (or a --local run) starts; importing never raises.
"""
# No `from __future__ import annotations`: Modal reads the annotations at runtime.
import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

if __package__ in (None, ""):   # `python inference/modal_inference.py` without `pip install -e .`: the repo first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modal

from inference.chat_session import ChatError, ChatSession, format_message, split_list
from inference.modal_common import CACHE_DIR, ModalSettings, build_image, building_app
from utils import cli

APP_NAME = "trait-capture"
SETTINGS = ModalSettings.from_env()
if building_app():
    SETTINGS.check()
GPU = SETTINGS.gpu_choice()

# Secret.from_name / Volume.from_name are lazy handles: importing this module needs no network.
app = modal.App(APP_NAME)
cache_volume = modal.Volume.from_name("model-cache", create_if_missing=True)
secrets = SETTINGS.secrets()      # the HF_TOKEN secret only when $TRAIT_HF_SECRET names one (gated models)
image = build_image(SETTINGS.experiment, SETTINGS.model_variant, SETTINGS.image_env(GPU))


# Several chats share one container (ChatSession streams one at a time, the others wait their turn), so a second
# browser tab does not start a second GPU; max_containers caps the GPUs the chat can hold.
@app.cls(image=image, gpu=GPU, volumes={CACHE_DIR: cache_volume}, secrets=secrets,
         scaledown_window=SETTINGS.scaledown_seconds, timeout=900, max_containers=SETTINGS.container_limit)
@modal.concurrent(max_inputs=SETTINGS.chat_inputs)
class TraitChat:
    """The live chat, one loaded model per container.

        chat = TraitChat()                                   # or TraitChat(experiment=..., model_variant=...)
        for msg in chat.capture_activations_stream.remote_gen(prompt="Hi", max_new_tokens=32): ...
        for msg in chat.capture_activations_stream.local(prompt="Hi"): ...   # here, no Modal account needed
    """

    experiment: str = modal.parameter(default=SETTINGS.experiment)
    model_variant: str = modal.parameter(default=SETTINGS.model_variant)

    @modal.enter()
    def load(self) -> None:
        SETTINGS.check()
        self.session = ChatSession(self.experiment, self.model_variant or None, SETTINGS.quantization)
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
                                   return_activations: bool = False, cap: Any = None, steer_when: Any = None,
                                   stop_when: Any = None):
        yield from self.session.stream(messages=messages, prompt=prompt, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, seed=seed, system_prompt=system_prompt,
                                       steering=steering, traits=traits, layers=layers,
                                       return_activations=return_activations, cap=cap, steer_when=steer_when,
                                       stop_when=stop_when)

    @modal.asgi_app(requires_proxy_auth=SETTINGS.web_auth != "none")   # anything but "none" keeps auth on
    def web(self):
        from inference.chat_web import create_web_app

        return create_web_app(self.session)


@app.local_entrypoint()
def chat(prompt: str = "What is artificial intelligence?", max_new_tokens: int = 50, traits: str = "",
         temperature: float = 0.0):
    """`modal run inference/modal_inference.py --prompt ...`: one streamed chat in an ephemeral app (built for this
    run from the local settings, stopped after it); after `modal deploy`, `python inference/modal_inference.py
    --prompt ...` talks to the deployed app instead."""
    remote = TraitChat()
    for msg in remote.capture_activations_stream.remote_gen(prompt=prompt, max_new_tokens=max_new_tokens,
                                                            traits=traits or None, temperature=temperature):
        print(format_message(msg), flush=True)


# ---------------------------------------------------------------------------------------------------
# Local CLI

def parse_steer(spec: str) -> dict:
    """--steer TRAIT:LAYER:COEFFICIENT[x][:POSITIONS] -> a steering config ("Cx": C x the layer's prompt norm)."""
    from core.interventions import InterventionError, parse_intervention

    try:
        it = parse_intervention("steer", spec)
    except InterventionError as e:
        raise ChatError(str(e)) from e
    coef = it.coefficient
    cfg = {"trait": it.trait, "layer": it.layer, "coefficient": str(coef) if coef.relative else coef.value}
    if it.positions != "all":
        cfg["positions"] = it.positions
    return cfg


def check_interventions(args: argparse.Namespace) -> dict:
    """--cap / --steer-when / --stop-when -> the request fields (the grammar checked now, the traits at load)."""
    from core.interventions import InterventionError, parse_intervention

    out = {}
    for kind in ("cap", "steer_when", "stop_when"):
        specs = getattr(args, kind) or []
        try:
            for s in specs:
                parse_intervention(kind, s)
        except InterventionError as e:
            raise ChatError(str(e)) from e
        if specs:
            out[kind] = list(specs)
    return out


def run_local(experiment: str, prompt: str, model_variant: Optional[str] = None, **kwargs) -> Iterator[dict]:
    """The stream of TraitChat, run in this process through Modal's .local() (enter, then the method)."""
    obj = TraitChat(experiment=experiment, model_variant=model_variant or "")
    return obj.capture_activations_stream.local(prompt=prompt, **kwargs)


@dataclass(frozen=True)
class ChatRun:
    n_tokens: int
    stop_reason: str
    seconds: float
    json: bool


@dataclass(frozen=True)
class ServeRun:
    url: str


def check_local_args(args: argparse.Namespace) -> None:
    """What can be checked before the model loads: the mode, the variant, the traits, the port."""
    from utils.config import resolve_variant
    from utils.vectors import resolve_vector_source

    if not args.serve and not args.prompt:
        raise ChatError("--prompt is required (or --serve to chat in the browser)")
    if not 0 <= args.port <= 65535:
        raise ChatError(f"--port {args.port}: a port number in 0-65535 is required (0: any free port)")
    resolve_variant(args.experiment, args.model_variant, "application")
    resolve_vector_source(args.experiment, traits=split_list(args.traits, "--traits"), require_traits=False)


def chat_local(args: argparse.Namespace) -> ChatRun:
    """The --local run: stream one turn and print each message as it arrives."""
    check_local_args(args)
    steering = [parse_steer(s) for s in args.steer] if args.steer else None
    interventions = check_interventions(args)
    warnings.filterwarnings("ignore", message=".*executing locally and will not have access.*")
    n, done = 0, None
    for msg in run_local(args.experiment, args.prompt, args.model_variant, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         system_prompt=args.system_prompt, steering=steering, traits=args.traits, layers=args.layers,
                         **interventions):
        print(json.dumps(msg, ensure_ascii=False, allow_nan=False) if args.json else format_message(msg), flush=True)
        n += msg["type"] == "token"
        done = msg if msg["type"] == "done" else done
    return ChatRun(n, done["stop_reason"], done["seconds"], args.json)


def page_url(port: int, args: argparse.Namespace) -> str:
    """The chat page's address; the CLI's chat flags become its query (`?prompt=` starts a chat at load)."""
    from urllib.parse import urlencode

    query = [(k, v) for k, v in (("prompt", args.prompt), ("traits", args.traits), ("layers", args.layers),
                                 ("system_prompt", args.system_prompt)) if v]
    query += [("steer", s) for s in args.steer or []]
    query += [(kind.replace("_", "-"), s) for kind in ("cap", "steer_when", "stop_when") for s in getattr(args, kind) or []]
    query += [("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature)]
    query += [("seed", args.seed)] if args.seed is not None else []
    return f"http://127.0.0.1:{port}/?{urlencode(query)}"


def serve_local(args: argparse.Namespace) -> ServeRun:
    """--serve: TraitChat's web app (the one `modal deploy` serves, chat page included) on 127.0.0.1."""
    import socket

    import uvicorn

    check_local_args(args)
    for s in args.steer or []:
        parse_steer(s)
    check_interventions(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", args.port))   # before the model loads: a busy port fails fast
    except OSError as e:
        sock.close()
        raise ChatError(f"--port {args.port}: cannot listen on 127.0.0.1 ({e.strerror})") from e
    warnings.filterwarnings("ignore", message=".*executing locally and will not have access.*")
    web = TraitChat(experiment=args.experiment, model_variant=args.model_variant or "").web.local()
    url = page_url(sock.getsockname()[1], args)
    print(f"serving the live chat at {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(web, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:   # Ctrl-C is how a served chat ends (uvicorn re-raises it after shutting down)
        pass
    return ServeRun(url)


def deployed_chat(experiment: Optional[str] = None, model_variant: Optional[str] = None):
    """The deployed app's TraitChat (`modal deploy inference/modal_inference.py`), looked up by name: no image is
    built and nothing is redeployed. Parameters only when asked (each value set is its own container pool)."""
    params = {k: v for k, v in (("experiment", experiment), ("model_variant", model_variant)) if v}
    return modal.Cls.from_name(APP_NAME, "TraitChat")(**params)


def _modal_errors(fn):
    """Modal's lookup and auth failures as one line a user can act on."""
    from modal.exception import AuthError, NotFoundError

    try:
        return fn()
    except NotFoundError as e:
        raise ChatError(f"the app {APP_NAME} is not deployed in this Modal environment ({e}): run `modal deploy "
                        f"inference/modal_inference.py` first, or add --local to run here") from e
    except AuthError as e:
        raise ChatError(f"Modal refused the credentials ({e}): run `modal token new`") from e


@dataclass(frozen=True)
class WarmRun:
    info: dict
    seconds: float


def chat_remote(args: argparse.Namespace) -> Any:
    """Without --local: the deployed app. --warmup waits for a container with the model loaded (a .remote call has
    no 150 s web limit); otherwise one streamed chat, printed as it arrives."""
    import time

    if args.serve:
        raise ChatError("--serve runs the web app here: add --local (the deployed app serves it at its URL)")
    if not args.warmup and not args.prompt:
        raise ChatError("--prompt is required (or --warmup, or --local --serve)")
    steering = [parse_steer(s) for s in args.steer] if args.steer else None
    interventions = check_interventions(args)     # the same request fields as --local
    chat = deployed_chat(args.experiment, args.model_variant)
    if args.warmup:
        t0 = time.perf_counter()
        info = _modal_errors(lambda: chat.warmup.remote())
        return WarmRun(info, time.perf_counter() - t0)

    def stream() -> ChatRun:
        n, done = 0, None
        for msg in chat.capture_activations_stream.remote_gen(
                prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, system_prompt=args.system_prompt, steering=steering,
                traits=args.traits, layers=args.layers, **interventions):
            print(json.dumps(msg, ensure_ascii=False, allow_nan=False) if args.json else format_message(msg),
                  flush=True)
            n += msg["type"] == "token"
            done = msg if msg["type"] == "done" else done
        return ChatRun(n, done["stop_reason"], done["seconds"], args.json)
    return _modal_errors(stream)


def run_cli(args: argparse.Namespace):
    if not args.local:
        return chat_remote(args)
    args.experiment = args.experiment or SETTINGS.experiment
    return serve_local(args) if args.serve else chat_local(args)


def format_summary(run) -> str:
    if isinstance(run, WarmRun):
        return (f"the deployed {APP_NAME} is warm after {run.seconds:.1f} s: {run.info.get('model')} "
                f"(variant {run.info.get('variant')}); web requests now answer at once")
    if isinstance(run, ServeRun):
        return f"stopped serving {run.url}"
    text = f"streamed {run.n_tokens} tokens (stop: {run.stop_reason}) in {run.seconds:.2f} s"
    if run.json:   # stdout carries only the JSON lines
        print(text, file=sys.stderr)
        return ""
    return text


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="modal_inference.py",
        description="Live chat with per-token trait scores. On Modal: `modal deploy` this file, then this command "
                    "talks to the deployed app. Here (no Modal account): --local runs the same class in this process.",
        epilog="examples:\n"
               "  python inference/modal_inference.py --local --experiment demo --prompt \"Tell me a story\" "
               "--traits demo/refusal --max-new-tokens 32 --json\n"
               "  python inference/modal_inference.py --local --experiment demo --prompt Hi "
               "--steer demo/refusal:10:40:prompt\n"
               "  python inference/modal_inference.py --local --experiment demo --prompt Hi "
               "--steer demo/refusal:10:0.3x --stop-when demo/refusal:10:20\n"
               "  python inference/modal_inference.py --local --experiment demo --serve --port 8770 "
               "--prompt \"Tell me a story\"   # serves until Ctrl-C: open the printed URL\n"
               "  TRAIT_EXPERIMENT=demo modal deploy inference/modal_inference.py\n"
               "  python inference/modal_inference.py --warmup       # needs a Modal account: the deployed app, model "
               "loaded\n"
               "  python inference/modal_inference.py --prompt \"Tell me a story\"   # needs a Modal account: a chat "
               "with the deployed app")
    p.add_argument("--local", action="store_true", help="run here (no Modal account) instead of on the deployed app")
    p.add_argument("--warmup", action="store_true",
                   help="the deployed app: wait until a container has loaded the model (then web requests answer "
                        "at once, never with Modal's 303 for requests over 150 s)")
    p.add_argument("--experiment",
                   help=f"experiment folder (--local: default $TRAIT_EXPERIMENT or demo: {SETTINGS.experiment}; "
                        f"the deployed app: the one it was deployed with)")
    p.add_argument("--model-variant", help="model variant of config.json (default: the application variant)")
    p.add_argument("--prompt", help="the user message (formatted with the chat template); required unless --serve, "
                                    "where it starts the page's first chat")
    p.add_argument("--system-prompt", help="a system turn (folded into the user turn where the template has none)")
    p.add_argument("--traits", help="comma-separated category/name traits (default: every trait with a best vector)")
    p.add_argument("--layers", help="projection layers, e.g. best,best+2 or 6,12 (default: each trait's best)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (temperature > 0)")
    p.add_argument("--steer", action="append", metavar="TRAIT:LAYER:COEF[x][:POSITIONS]",
                   help="add COEF x the trait's unit vector at LAYER; COEFx = COEF x the mean residual norm at LAYER "
                        "over the prompt (printed with the prompt line); positions all (default), prompt or "
                        "response; repeatable")
    p.add_argument("--cap", action="append", metavar="TRAIT:LAYER:MAX[x] | TRAIT:LAYER:MIN[x]:MAX[x]",
                   help="clamp the residual's projection on the trait's unit vector at LAYER (every token), the "
                        "orthogonal part unchanged; x = times the layer's prompt norm; repeatable")
    p.add_argument("--steer-when", dest="steer_when", action="append", metavar="TRAIT:LAYER:THRESHOLD:COEF[x][:each]",
                   help="add COEF x the vector from the first generated token whose score at LAYER exceeds THRESHOLD "
                        "(with :each only on such tokens); repeatable")
    p.add_argument("--stop-when", dest="stop_when", action="append", metavar="TRAIT:LAYER:THRESHOLD",
                   help="end the response at the first generated token whose score at LAYER exceeds THRESHOLD "
                        "(stop reason monitor); repeatable")
    p.add_argument("--json", action="store_true", help="one JSON object per line (prompt, each token, done)")
    p.add_argument("--serve", action="store_true",
                   help="serve the web app on 127.0.0.1 instead: the chat page at / (tokens coloured by score as "
                        "they stream, trait picker, steering controls), /stream and /info; the chat flags above "
                        "fill the page's first chat")
    p.add_argument("--port", type=int, default=8770, help="port for --serve (default 8770; 0: any free port)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run(build_parser(), run_cli, format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
