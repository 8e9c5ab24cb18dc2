"""The live chat page (inference/chat_web.py, GET /) in headless Chromium, served locally on a zoo model.

The oracle is the stream itself: the messages the session sent to the page (recorded in-process), or the
SSE endpoint of the same server (`--serve`). The checks read the rendered page (the token elements and
their data-* attributes), not the HTML string: the tokens and ids equal the stream's, each token's score
attribute equals the streamed score exactly, the trait picker recolours, the steering controls reach the
request, the response grows while it streams, and the page requests nothing but the app itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from inference.chat_session import ChatSession
from inference.chat_web import create_web_app
from tests.browser import Browser, require_chromium
from tests.helpers import write_vectors
from utils import paths

REPO = Path(__file__).resolve().parents[1]
TRAITS = {"behavioral/refusal": {1: 0.80, 2: 0.95}, "cognitive/honesty": {1: 0.90, 2: 0.50}}   # best: L2, L1

# every token element of a container: its text, data-* attributes and background colour
READ_TOKENS = """(function (sel) {
  return Array.prototype.map.call(document.querySelectorAll(sel + ' .tt-tok'), function (el) {
    return {text: el.textContent, score: el.getAttribute('data-score'), id: el.getAttribute('data-id'),
            trait: el.getAttribute('data-trait'), layer: el.getAttribute('data-layer'),
            side: el.getAttribute('data-side'), special: el.classList.contains('tt-special'),
            bg: el.style.backgroundColor};
  });
})"""

# installed before the page's own scripts: the response's token count at each DOM change, and the turn's state
WATCH_GROWTH = """window.__growth = [];
new MutationObserver(function () {
  var turn = document.querySelector('.turn');
  if (!turn) return;
  var n = turn.querySelectorAll('.response-tokens .tt-tok').length, state = turn.getAttribute('data-state');
  var g = window.__growth, last = g[g.length - 1];
  if (!last || last.n !== n || last.state !== state) g.push({n: n, state: state});
}).observe(document, {childList: true, subtree: true, attributes: true});"""


@pytest.fixture
def chat_exp(experiments, zoo):
    experiments("live", {"base": {"model": zoo("llama")}})
    write_vectors("live", traits=TRAITS)
    return "live"


class Recording:
    """A ChatSession seen through: every request and the messages it streamed; `pace` seconds between tokens,
    so the page receives them one at a time."""

    def __init__(self, session: ChatSession, pace: float = 0.03):
        self.session, self.pace, self.calls = session, pace, []

    def info(self) -> dict:
        return self.session.info()

    def stream(self, **request):
        call = {"request": request, "messages": []}
        self.calls.append(call)
        for msg in self.session.stream(**request):
            call["messages"].append(msg)
            if msg["type"] == "token":
                time.sleep(self.pace)
            yield msg


class Server:
    """uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def visible(text: str) -> str:
    """The token as tokens.js displays it (TraitTokens.visible)."""
    return "\u00b7" if text == "" else text.replace("\n", "\u21b5\n")


def sse(url: str) -> list[dict]:
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = resp.read().decode()
    return [json.loads(b[len("data: "):]) for b in body.split("\n\n") if b.startswith("data: ")]


def assert_rendered(dom: dict, msgs: list[dict], trait: str, layer: str) -> None:
    """The page's prompt and response tokens are the stream's, with the stream's scores for (trait, layer)."""
    prompt, tokens, done = msgs[0], msgs[1:-1], msgs[-1]
    assert prompt["type"] == "prompt" and done["type"] == "done" and all(m["type"] == "token" for m in tokens)
    assert len(tokens) == done["n_tokens"] >= 1
    for side, want_text, want_ids, want_scores in (
            ("prompt", prompt["tokens"], prompt["token_ids"], prompt["scores"][trait][layer]),
            ("response", [m["token"] for m in tokens], [m["token_id"] for m in tokens],
             [m["scores"][trait][layer] for m in tokens])):
        els = dom[side]
        assert [e["text"] for e in els] == [visible(t) for t in want_text]
        assert [int(e["id"]) for e in els] == want_ids
        assert [float(e["score"]) for e in els] == want_scores        # exactly the streamed number
        assert all(e["trait"] == trait and e["layer"] == layer and e["bg"] for e in els)


def read_dom(page) -> dict:
    return {"prompt": page.eval(READ_TOKENS + "('.turn .prompt-tokens')"),
            "response": page.eval(READ_TOKENS + "('.turn .response-tokens')")}


def test_chat_page_renders_the_stream_as_it_arrives(chat_exp):
    require_chromium()
    rec = Recording(ChatSession("live", "base"))
    special = set(rec.info()["special_ids"])
    query = {"prompt": "hello world", "max_new_tokens": 8, "steer": "behavioral/refusal:1:2.5:prompt"}
    with Server(create_web_app(rec)) as srv, Browser() as b:
        page = b.new_page()
        page.send("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_GROWTH})
        page.goto(f"{srv.url}/?{urlencode(query)}")
        page.wait_for("document.querySelector('.turn[data-state=done]') !== null", timeout=120)
        dom = read_dom(page)
        growth = page.eval("window.__growth")
        first = page.eval("document.getElementById('colour').value")
        options = page.eval("Array.prototype.map.call(document.getElementById('colour').options, "
                            "function (o) { return o.value; })")
        other = next(o for o in options if o != first)
        page.eval(f"(function () {{ var s = document.getElementById('colour'); s.value = {json.dumps(other)}; "
                  "s.dispatchEvent(new Event('change')); })()")
        recoloured = read_dom(page)
        requests, errors = list(page.requests), list(page.errors)

    assert len(rec.calls) == 1 and errors == []
    call = rec.calls[0]
    # the steering control, filled from the URL, reached the stream; the first turn sends the prompt itself
    assert call["request"] == {"prompt": "hello world", "max_new_tokens": 8, "temperature": 0,
                               "steering": [{"trait": "behavioral/refusal", "layer": 1, "coefficient": 2.5,
                                             "positions": "prompt"}]}
    msgs = call["messages"]
    assert msgs[0]["steering"][0]["coefficient"] == 2.5
    keys = [f"{t} @ L{layer}" for t, per in msgs[0]["scores"].items() for layer in per]
    assert options == keys and first == keys[0] == "behavioral/refusal @ L2"
    assert_rendered(dom, msgs, "behavioral/refusal", "2")
    assert [e["special"] for e in dom["prompt"]] == [i in special for i in msgs[0]["token_ids"]]
    assert {e["side"] for e in dom["prompt"]} == {"prompt"} and {e["side"] for e in dom["response"]} == {"response"}
    # the trait picker: the same tokens, now with the other trait's scores and colours
    assert other == "cognitive/honesty @ L1"
    assert_rendered(recoloured, msgs, "cognitive/honesty", "1")
    assert [e["bg"] for e in recoloured["response"]] != [e["bg"] for e in dom["response"]]
    # the response grew token by token while the turn was streaming, and ended complete
    n = len(msgs) - 2
    streaming = [g["n"] for g in growth if g["state"] == "streaming" and 0 < g["n"] < n]
    assert len(set(streaming)) >= n // 2 and streaming == sorted(streaming)
    assert growth[-1] == {"n": n, "state": "done"}
    # nothing but the app itself: the page, /info, /stream
    assert requests and all(u.startswith(srv.url + "/") for u in requests)
    assert {u.split("?")[0] for u in requests} == {srv.url + "/", srv.url + "/info", srv.url + "/stream"}


def test_chat_page_follow_up_turn_and_bad_request(chat_exp):
    """A second message sends the whole conversation; a request the session refuses shows its 400 detail."""
    require_chromium()
    rec = Recording(ChatSession("live", "base"), pace=0.0)
    with Server(create_web_app(rec)) as srv, Browser() as b:
        page = b.new_page()
        page.goto(f"{srv.url}/?{urlencode({'prompt': 'hi', 'max_new_tokens': 3, 'traits': 'cognitive/honesty'})}")
        page.wait_for("document.querySelector('.turn[data-state=done]') !== null", timeout=120)
        page.eval("(function () { document.getElementById('msg').value = 'and then?'; "
                  "document.getElementById('send').click(); })()")
        page.wait_for("document.querySelectorAll('.turn[data-state=done]').length === 2", timeout=120)
        second = page.eval(READ_TOKENS + "('.turn[data-turn=\"1\"] .response-tokens')")
        page.eval("(function () { document.getElementById('layers').value = '1,99'; "
                  "document.getElementById('msg').value = 'x'; document.getElementById('send').click(); })()")
        page.wait_for("document.querySelector('.turn[data-state=error]') !== null", timeout=60)
        error = page.eval("document.querySelector('.turn[data-state=error] .meta').textContent")
    first = rec.calls[0]["messages"]
    assert rec.calls[1]["request"]["messages"] == [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": first[-1]["response"]},
                                                   {"role": "user", "content": "and then?"}]
    assert rec.calls[1]["request"]["traits"] == ["cognitive/honesty"]
    msgs = rec.calls[1]["messages"]
    assert [e["text"] for e in second] == [visible(m["token"]) for m in msgs[1:-1]]
    assert [float(e["score"]) for e in second] == [m["scores"]["cognitive/honesty"]["1"] for m in msgs[1:-1]]
    assert error.startswith("error: ") and "99" in error and len(rec.calls) == 3


def test_serve_cli_page_equals_the_sse_endpoint(chat_exp):
    """`--local --serve --port 0`: the printed URL (127.0.0.1, ?prompt=...) opens a page that renders what
    GET /stream of the same server streams; Ctrl-C stops it with exit status 0."""
    require_chromium()
    env = dict(os.environ, TRAIT_EXPERIMENTS_DIR=str(paths.experiments_root()), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    args = ["--local", "--experiment", "live", "--model-variant", "base", "--serve", "--port", "0",
            "--prompt", "tell me a story", "--traits", "cognitive/honesty", "--max-new-tokens", "6"]
    proc = subprocess.Popen([sys.executable, "inference/modal_inference.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 180
        while url is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(line)
            if line.startswith("serving the live chat at "):
                url = line.split(" at ", 1)[1].split()[0]
        base, query = url.split("/?", 1)
        assert base.startswith("http://127.0.0.1:") and "prompt=tell+me+a+story" in query
        with Browser() as b:
            page = b.new_page()
            page.goto(url)
            page.wait_for("document.querySelector('.turn[data-state=done]') !== null", timeout=120)
            dom = read_dom(page)
            assert page.errors == [] and all(u.startswith(base + "/") for u in page.requests)
        msgs = sse(f"{base}/stream?{urlencode({'prompt': 'tell me a story', 'traits': 'cognitive/honesty', 'max_new_tokens': 6})}")
        assert_rendered(dom, msgs, "cognitive/honesty", "1")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"stopped serving {url}"


def test_serve_cli_bad_port(chat_exp):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env = dict(os.environ, TRAIT_EXPERIMENTS_DIR=str(paths.experiments_root()), HF_HUB_OFFLINE="1")
    try:
        for port in (str(busy.getsockname()[1]), "70000"):
            out = subprocess.run([sys.executable, "inference/modal_inference.py", "--local", "--experiment", "live",
                                  "--serve", "--port", port], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 2 and out.stdout == ""
            assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith(f"error: --port {port}")
    finally:
        busy.close()
