"""The live chat over HTTP: a FastAPI app serving a ChatSession's stream as server-sent events.

    web = create_web_app(session)     any object with .info() -> dict and .stream(**request) -> Iterator[dict]
    GET  /info                        what is loaded (session.info())
    GET  /stream?prompt=..&traits=..&layers=..&max_new_tokens=..    for EventSource
    POST /stream                      a JSON body of the request fields (inference/chat_session.py STREAM_ARGS)
    sse(msg) -> str                   one `data: {json}` event

Each streamed dict is one `data: {json}` event. Bad input (a TraitError from the session) is HTTP 400
before the stream starts; a failure mid-stream is one {"type": "error"} event, and its traceback goes to
the server's stderr. Importing this module needs neither modal nor fastapi (create_web_app imports it).
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import json
import sys
import traceback
from typing import Optional

from core.errors import TraitError
from inference.chat_session import STREAM_ARGS


def sse(msg: dict) -> str:
    return f"data: {json.dumps(msg, ensure_ascii=False, allow_nan=False)}\n\n"


def create_web_app(session):
    """The FastAPI app serving `session` (a ChatSession or anything with its info() and stream())."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    web = FastAPI(title="trait-capture", description="tokens with per-token trait scores, as server-sent events")
    web.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])

    def respond(kwargs: dict):
        gen = session.stream(**kwargs)
        try:
            first = next(gen)   # argument errors surface here, before any byte is sent
        except TraitError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

        def events():
            yield sse(first)
            try:
                for msg in gen:
                    yield sse(msg)
            except Exception as e:  # the stream has started: report in-band, keep the traceback in the log
                traceback.print_exc(file=sys.stderr)
                yield sse({"type": "error", "message": f"{type(e).__name__}: {e}"})
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
        return await run_in_threadpool(respond, body)   # the prompt forward runs off the event loop

    return web
