"""OpenAI-compatible routes over a ChatSession, so OpenAI-style clients (the `openai` package, Inspect, lm-eval,
agent harnesses) can use a monitored or steered model, with the trait scores of every token alongside.

    add_openai_routes(app, session, model_id, aliases=())   mount the routes on a FastAPI app
    GET  /v1/models                  -> {"object": "list", "data": [{"id": model_id, "object": "model", ...}]}
    POST /v1/chat/completions        messages -> a chat.completion (or, with "stream": true, SSE chunks)
    POST /v1/completions             prompt (raw text, no chat template) -> a text_completion (or SSE chunks)
    OpenAIError                      a request the routes refuse; HTTP 400 (404 for an unknown model) with
                                     OpenAI's error body {"error": {"message", "type", "param", "code"}}

Request fields follow OpenAI's schema: model, messages | prompt, max_tokens (max_completion_tokens),
temperature (default 1), top_p, seed, stop (a string or up to 4), stream, stream_options.include_usage,
logprobs (+ top_logprobs for chat; an integer for completions), n (1 only). Fields that would change the
output and are not supported (tools, response_format, logit_bias, penalties, n > 1, echo) are refused, never
ignored. Extension fields (the openai client's `extra_body`):
    traits, layers       which trait vectors score the tokens (as the live chat: default every best vector)
    steering             [{trait | vector, layer, coefficient, positions}] as the live chat takes them, or
                         "TRAIT:LAYER:COEF[x][:POSITIONS]" strings (Cx: C x the layer's mean norm over the prompt)
    cap, steer_when, stop_when   spec strings (or lists of them) of core/interventions.py's grammar
    system_prompt        a system turn when the messages have none

Every choice carries `trait_scores` (an extension field): {"token_ids", "tokens", "scores": {trait: {layer:
[score per generated token]}}, "vectors": {trait: [provenance]}, "prompt_token_ids", "stop_reason",
"interventions" (each with its resolved numbers), "monitor" (a stop-when hit)}; a
streamed chunk's delta carries `trait_scores` {"token_id", "token", "scores": {trait: {layer: score}}} for its
token (the first chunk: the prompt's ids, scores and the vectors). Scores are the live chat's (core/streaming.py):
<residual at the token's own position, unit vector>, what capture + project give offline for the same ids.

Generation is the live chat's stream (greedy at temperature 0, the seeded sampler otherwise), the same tokens
generate_responses.py writes for the same prompt. `finish_reason`: "stop" (an end-of-turn id or a stop
string), "length", "content_filter" (a stop-when monitor ended it: trait_scores.stop_reason "monitor").
Stop strings end the text before the string; the streamed text holds back what could be the start of one.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import json
import math
import time
import uuid
from typing import Any, Iterator, Optional

from core.errors import TraitError

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
# fields of OpenAI's schema that change nothing here (bookkeeping), accepted and ignored
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "suffix",
           "best_of")
EXTENSIONS = ("traits", "layers", "steering", "system_prompt", "cap", "steer_when", "stop_when")
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "stream", "logprobs", "top_logprobs", "n", "frequency_penalty",
               "presence_penalty") + IGNORED + EXTENSIONS
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "logprobs",
                     "n", "echo", "frequency_penalty", "presence_penalty") + IGNORED + EXTENSIONS


class OpenAIError(TraitError):
    """A request the OpenAI routes refuse: HTTP `status` with OpenAI's error body; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    x = body.get(key)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not lo <= x <= hi:
        raise OpenAIError(f"{key}: a number in [{lo:g}, {hi:g}] is required, got {x!r}", key)
    return float(x)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise OpenAIError(f"stop: a non-empty string or a list of up to {MAX_STOP_STRINGS} of them, got {stop!r}",
                          "stop")
    return stops


def _chat_messages(messages) -> list[dict]:
    """OpenAI messages -> [{role, content: str}]: text content parts joined, 'developer' read as 'system'."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages: a non-empty list of {role, content} is required", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}]: an object with a role is required", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content: a string or a list of text parts is required", "messages")
        if m.get("tool_calls") or m["role"] == "tool":
            raise OpenAIError(f"messages[{i}]: tool calls are not supported", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _common(body: dict, fields: tuple) -> dict:
    """The checks both routes share -> keyword arguments of session.plan (and our own settings)."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise OpenAIError(f"unsupported field(s) {', '.join(unknown)} (supported: {', '.join(fields)})", unknown[0])
    n = body.get("n")
    if n is not None and n != 1:
        raise OpenAIError(f"n: only 1 choice per request is supported, got {n!r}", "n")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise OpenAIError(f"{key}: penalties are not supported (only 0)", key)
    if body.get("best_of") not in (None, 1):
        raise OpenAIError("best_of: only 1 is supported", "best_of")
    if body.get("suffix") is not None:
        raise OpenAIError("suffix: not supported", "suffix")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens) or max_tokens < 1:
        raise OpenAIError(f"max_tokens: a positive integer is required, got {max_tokens!r}", "max_tokens")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise OpenAIError(f"seed: an integer is required, got {seed!r}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError("stream: true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise OpenAIError("stream_options: an object is required", "stream_options")
    return {"plan": {"max_new_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
                     "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9, "seed": seed,
                     **{k: body.get(k) for k in EXTENSIONS}},
            "stop": _stop_strings(body), "stream": stream, "include_usage": bool(opts.get("include_usage"))}


# ---- incremental text ------------------------------------------------------------------------------------------
class _Text:
    """The response text as tokens arrive: deltas safe to send (no half character, no possible stop-string
    start), and the end at the first stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0               # characters of the text already handed out
        self.text = ""
        self.stopped = False        # a stop string was found: the text ends before it

    def add(self, token_id: int) -> str:
        """Append a token; returns the text that may be sent now."""
        self.ids.append(token_id)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [full.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            self.text, self.stopped = full[:min(hits)], True
            return self._flush()
        self.text = full
        safe = len(full)
        if full.endswith("\ufffd"):        # an incomplete UTF-8 sequence: wait for the next token
            safe = len(full.rstrip("\ufffd"))
        for s in self.stops:               # the longest suffix that could grow into a stop string
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    safe = min(safe, len(full) - k)
                    break
        out, self.sent = full[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return out

    def _flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def finish(self) -> str:
        return self._flush()


# ---- the routes ------------------------------------------------------------------------------------------------
def _finish_reason(stop_reason: str, text: _Text) -> str:
    if text.stopped or stop_reason == "eos":
        return "stop"
    if stop_reason == "monitor":     # a stop-when monitor cut the response: the closest of OpenAI's reasons
        return "content_filter"
    return "length"


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))


def add_openai_routes(app, session, model_id: str, aliases=()) -> None:
    """Mount /v1/models, /v1/chat/completions and /v1/completions on `app` for `session` (a ChatSession).

    `model_id` is what /v1/models lists; requests may name it or one of `aliases` (any other: 404)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    names = {model_id, *(a for a in aliases if a)}
    created = int(time.time())
    tok = session.lm.tokenizer

    def error(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise OpenAIError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise OpenAIError("the body must be a JSON object")
        if body.get("model") not in names:
            raise OpenAIError(f"model {body.get('model')!r} is not served here (served: {model_id})", "model",
                              404, "model_not_found")
        return body

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "trait-inference"}]}

    def planned(kwargs: dict, settings: dict):
        try:
            return session.plan(**kwargs, **settings["plan"])
        except OpenAIError:
            raise
        except TraitError as e:
            raise OpenAIError(str(e)) from e

    def run(plan, stops: list[str]) -> Iterator[tuple[str, dict, Optional[str]]]:
        """(kind, message, text delta) for the prompt, each token (until a stop string) and the end."""
        text = _Text(tok, stops)
        gen = session.run(plan)
        try:
            for msg in gen:
                if msg["type"] == "prompt":
                    yield "prompt", msg, None
                elif msg["type"] == "token":
                    delta = text.add(msg["token_id"])
                    yield "token", msg, delta
                    if text.stopped:
                        break
                elif msg["type"] == "done":
                    yield "done", {**msg, "finish_reason": _finish_reason(msg["stop_reason"], text)}, text.finish()
                    return
        finally:
            gen.close()   # a stop string ends the stream early: release the model
        yield "done", {"stop_reason": "stop_string", "finish_reason": "stop"}, text.finish()

    def prompt_ext(msg: dict) -> dict:
        return {"prompt_token_ids": msg["token_ids"], "prompt_scores": msg["scores"], "vectors": msg["vectors"],
                "steering": msg["steering"], "interventions": msg["interventions"]}

    def end_ext(done: dict) -> dict:
        return {"stop_reason": done["stop_reason"], **({"monitor": done["monitor"]} if "monitor" in done else {})}

    def collect(plan, stops: list[str]) -> dict:
        """Run to the end: the text, ids, per-token scores and log-probabilities."""
        out: dict[str, Any] = {"ids": [], "tokens": [], "scores": {}, "logprobs": [], "text": ""}
        for kind, msg, delta in run(plan, stops):
            if kind == "prompt":
                out["prompt"] = msg
            elif kind == "token":
                out["ids"].append(msg["token_id"])
                out["tokens"].append(msg["token"])
                for trait, per in msg["scores"].items():
                    for layer, v in per.items():
                        out["scores"].setdefault(trait, {}).setdefault(layer, []).append(v)
                if "logprob" in msg:
                    out["logprobs"].append(msg)
                out["text"] += delta
            else:
                out["text"] += delta
                out["done"] = msg
        return out

    def usage(n_prompt: int, n_out: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def trait_ext(out: dict) -> dict:
        return {"token_ids": out["ids"], "tokens": out["tokens"], "scores": out["scores"], **end_ext(out["done"]),
                **prompt_ext(out["prompt"])}

    def chat_logprobs(msgs: list[dict]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            s = tok.decode([tid])
            return {"token": s, "logprob": lp, "bytes": _bytes(s)}

        return {"content": [{**entry(m["token_id"], m["logprob"]),
                             "top_logprobs": [entry(t, v) for t, v in m["top_logprobs"]]} for m in msgs]}

    def completion_logprobs(msgs: list[dict], start: int = 0) -> dict:
        tokens = [tok.decode([m["token_id"]]) for m in msgs]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [m["logprob"] for m in msgs],
                "top_logprobs": [{tok.decode([t]): v for t, v in m["top_logprobs"]} for m in msgs],
                "text_offset": offsets}

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"

    def streamed(chunks: Iterator[dict]):
        def events():
            for c in chunks:
                yield sse(c)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- chat ---------------------------------------------------------------------------------------------------
    def chat_settings(body: dict):
        settings = _common(body, CHAT_FIELDS)
        want_lp = body.get("logprobs") or False
        if not isinstance(want_lp, bool):
            raise OpenAIError("logprobs: true or false", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= 20):
            raise OpenAIError(f"top_logprobs: an integer in 0-20 is required, got {top!r}", "top_logprobs")
        if top is not None and not want_lp:
            raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
        plan = planned({"messages": _chat_messages(body.get("messages")),
                        "logprobs": (top or 0) if want_lp else None}, settings)
        return settings, plan

    def chat_once(settings: dict, plan) -> dict:
        out = collect(plan, settings["stop"])
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                  "logprobs": chat_logprobs(out["logprobs"]) if plan.logprobs is not None else None,
                  "finish_reason": out["done"]["finish_reason"], "trait_scores": trait_ext(out)}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": usage(len(plan.ids), len(out["ids"]))}

    def chat_chunks(settings: dict, plan) -> Iterator[dict]:
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, logprobs=None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        n = 0
        for kind, msg, delta in run(plan, settings["stop"]):
            if kind == "prompt":
                yield chunk({"role": "assistant", "content": "", "trait_scores": prompt_ext(msg)})
            elif kind == "token":
                n += 1
                lp = chat_logprobs([msg]) if plan.logprobs is not None else None
                yield chunk({"content": delta, "trait_scores": {"token_id": msg["token_id"], "token": msg["token"],
                                                                "scores": msg["scores"]}}, logprobs=lp)
            else:
                yield chunk({"content": delta, "trait_scores": end_ext(msg)}, msg["finish_reason"])
        if settings["include_usage"]:
            yield {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id, "choices": [],
                   "usage": usage(len(plan.ids), n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await body_of(request)
            settings, plan = await run_in_threadpool(chat_settings, body)
        except OpenAIError as e:
            return error(e)
        if settings["stream"]:
            return streamed(chat_chunks(settings, plan))
        return await run_in_threadpool(chat_once, settings, plan)

    # --- completions --------------------------------------------------------------------------------------------
    def completion_settings(body: dict):
        settings = _common(body, COMPLETION_FIELDS)
        if body.get("echo"):
            raise OpenAIError("echo: not supported", "echo")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise OpenAIError("prompt: one non-empty string is required", "prompt")
        lp = body.get("logprobs")
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= 5):
            raise OpenAIError(f"logprobs: an integer in 0-5 is required, got {lp!r}", "logprobs")
        return settings, planned({"prompt": prompt, "raw": True, "logprobs": lp}, settings)

    def completion_once(settings: dict, plan) -> dict:
        out = collect(plan, settings["stop"])
        choice = {"index": 0, "text": out["text"],
                  "logprobs": completion_logprobs(out["logprobs"]) if plan.logprobs is not None else None,
                  "finish_reason": out["done"]["finish_reason"], "trait_scores": trait_ext(out)}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": [choice], "usage": usage(len(plan.ids), len(out["ids"]))}

    def completion_chunks(settings: dict, plan) -> Iterator[dict]:
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, ext: dict, finish=None, logprobs=None) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
                                 "trait_scores": ext}]}

        n, at = 0, 0
        for kind, msg, delta in run(plan, settings["stop"]):
            if kind == "prompt":
                yield chunk("", prompt_ext(msg))
            elif kind == "token":
                n += 1
                lp = completion_logprobs([msg], at) if plan.logprobs is not None else None
                at += len(delta)
                yield chunk(delta, {"token_id": msg["token_id"], "token": msg["token"], "scores": msg["scores"]},
                            logprobs=lp)
            else:
                yield chunk(delta, end_ext(msg), msg["finish_reason"])
        if settings["include_usage"]:
            yield {"id": cid, "object": "text_completion", "created": now, "model": model_id, "choices": [],
                   "usage": usage(len(plan.ids), n)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await body_of(request)
            settings, plan = await run_in_threadpool(completion_settings, body)
        except OpenAIError as e:
            return error(e)
        if settings["stream"]:
            return streamed(completion_chunks(settings, plan))
        return await run_in_threadpool(completion_once, settings, plan)
