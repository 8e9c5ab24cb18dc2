"""The live chat over HTTP: a FastAPI app serving a ChatSession's stream as server-sent events, and a chat page.

    web = create_web_app(session)     any object with .info() -> dict and .stream(**request) -> Iterator[dict]
    GET  /                            the chat page: type a message, watch the response stream in, each token
                                      coloured by its score (analysis/assets/tokens.js, inlined); a trait picker,
                                      the steering controls (a slider in units of the layer's prompt norm, the
                                      norm shown), cap / steer-when / stop-when boxes, each turn's interventions
                                      and a monitor stop; /?prompt=...&traits=..&layers=..&steer=T:L:C[x][:P]
                                      &cap=..&steer-when=..&stop-when=..&max_new_tokens=..&temperature=..&seed=..
                                      starts a chat at load
    GET  /info                        what is loaded (session.info())
    GET  /stream?prompt=..&traits=..&layers=..&max_new_tokens=..&steer=T:L:C[x]&cap=..&stop_when=..  for EventSource
    POST /stream                      a JSON body of the request fields (inference/chat_session.py STREAM_ARGS)
    /v1/models, /v1/chat/completions, /v1/completions    OpenAI-compatible (inference/openai_api.py), for a ChatSession
    sse(msg) -> str                   one `data: {json}` event
    sse_response(gen)                 a stream of dicts as the SSE response (400 for a TraitError at the start)
    chat_page() -> str                the page's HTML (one document: CSS and JS inline, no request but to the app)

Each streamed dict is one `data: {json}` event. Bad input (a TraitError from the session) is HTTP 400
before the stream starts; a failure mid-stream is one {"type": "error"} event, and its traceback goes to
the server's stderr. Importing this module needs neither modal nor fastapi (create_web_app imports it).
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

from core.errors import TraitError
from inference.chat_session import STREAM_ARGS


ASSETS = Path(__file__).resolve().parents[1] / "analysis" / "assets"   # tokens.js / tokens.css (the report's renderer)

# The page: no request leaves the app (the CSP allows only same-origin fetches); scripts and styles are inline.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'")

PAGE_CSS = """
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #222; background: #fafafa; }
header { padding: 8px 16px; background: #263238; color: #eee; display: flex; gap: 16px; align-items: baseline; }
header b { font-size: 15px; } #status { margin-left: auto; font-size: 12px; color: #b0bec5; }
#controls { padding: 8px 16px; background: #fff; border-bottom: 1px solid #ddd; display: flex; flex-wrap: wrap;
  gap: 8px 18px; align-items: center; font-size: 13px; }
#controls label { display: inline-flex; gap: 4px; align-items: center; }
#controls input[type=number] { width: 5.5em; } #controls input[type=text] { width: 12em; }
.interventions { font-size: 12px; color: #6a1b9a; margin-bottom: 3px; }
#traits { min-width: 14em; } .steer-slider { width: 7em; } .steer-norm { font-size: 12px; color: #555; } .steer { display: inline-flex; gap: 4px; align-items: center; background: #f1f3f4;
  padding: 2px 6px; border-radius: 4px; }
#chat { padding: 12px 16px 140px; max-width: 1100px; }
.turn { margin: 0 0 18px; } .user { background: #e3f2fd; padding: 6px 10px; border-radius: 6px; white-space: pre-wrap;
  margin-bottom: 6px; } .prompt summary { font-size: 12px; color: #666; cursor: pointer; }
.response { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 8px 10px; min-height: 1.5em; }
.meta { font-size: 12px; color: #777; margin-top: 3px; } .error { color: #b71c1c; white-space: pre-wrap; }
form { position: fixed; bottom: 0; left: 0; right: 0; display: flex; gap: 8px; padding: 10px 16px;
  background: #fff; border-top: 1px solid #ddd; } textarea { flex: 1; height: 3.2em; font: inherit; }
"""

PAGE_JS = r"""
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var info = null, history = [], turns = [], busy = false;
  var chat = { turns: turns, info: null, colour: null };   // window.TraitChatPage: state, for a console or a test
  window.TraitChatPage = chat;

  function status(text) { $("status").textContent = text; }
  function option(sel, value, text) {
    var o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o); return o;
  }
  function allTraits() { return Object.keys(info.traits).concat(Object.keys(info.unavailable_traits || {})).sort(); }

  // --- controls ---------------------------------------------------------------------------------------
  function addSteer(cfg) {
    cfg = cfg || {};
    var row = document.createElement("span"); row.className = "steer";
    var trait = document.createElement("select"); trait.className = "steer-trait";
    allTraits().forEach(function (t) { option(trait, t, t); });
    if (cfg.trait) trait.value = cfg.trait;
    var layer = document.createElement("input"); layer.type = "number"; layer.className = "steer-layer";
    layer.min = 0; layer.max = info.num_layers - 1;
    layer.value = cfg.layer !== undefined ? cfg.layer : (info.traits[trait.value] || {}).layer || 0;
    // the coefficient: in units of the layer's mean residual norm over the prompt (default), or absolute
    var units = document.createElement("select"); units.className = "steer-units";
    option(units, "norm", "\u00d7 norm"); option(units, "abs", "absolute");
    units.value = cfg.relative === false ? "abs" : "norm";
    var slider = document.createElement("input"); slider.type = "range"; slider.className = "steer-slider";
    slider.min = -2; slider.max = 2; slider.step = 0.01;
    var coef = document.createElement("input"); coef.type = "number"; coef.step = "any"; coef.className = "steer-coef";
    coef.value = cfg.coefficient !== undefined ? cfg.coefficient : 0.25;
    slider.value = coef.value;
    slider.oninput = function () { coef.value = slider.value; };
    coef.oninput = function () { slider.value = coef.value; };
    units.onchange = function () { slider.hidden = units.value !== "norm"; };
    slider.hidden = units.value !== "norm";
    var norm = document.createElement("span"); norm.className = "steer-norm";
    norm.title = "mean residual norm at this layer over the last prompt, and the absolute coefficient it gave";
    var pos = document.createElement("select"); pos.className = "steer-positions";
    ["all", "prompt", "response"].forEach(function (p) { option(pos, p, p); });
    pos.value = cfg.positions || "all";
    var rm = document.createElement("button"); rm.type = "button"; rm.textContent = "\u00d7"; rm.title = "remove";
    rm.onclick = function () { row.remove(); };
    [document.createTextNode("steer"), trait, document.createTextNode("L"), layer, slider, coef, units, norm, pos,
     rm].forEach(function (n) { row.appendChild(n); });
    $("steers").appendChild(row);
  }

  function steering() {
    return Array.prototype.map.call(document.querySelectorAll(".steer"), function (row) {
      var c = parseFloat(row.querySelector(".steer-coef").value);
      return { trait: row.querySelector(".steer-trait").value, layer: parseInt(row.querySelector(".steer-layer").value, 10),
               coefficient: row.querySelector(".steer-units").value === "norm" ? c + "x" : c,
               positions: row.querySelector(".steer-positions").value };
    });
  }

  function specs(id) {   // the spec strings typed into an intervention box (separated by spaces or ;)
    return $(id).value.split(/[\s;]+/).filter(Boolean);
  }

  function describe(rec) {   // one intervention record of the prompt message, relative numbers resolved
    var s = rec.kind.replace("_", "-") + " " + rec.spec;
    if (rec.norm !== undefined) {
      var used = ["coefficient", "low", "high"].filter(function (k) { return rec[k + "_relative"] !== undefined; })
        .map(function (k) { return k + " " + rec[k].toPrecision(4); });
      s += " (norm at L" + rec.layer + " " + rec.norm.toPrecision(6) + " \u2192 " + used.join(", ") + ")";
    }
    return s;
  }

  function showNorms(msg) {   // each relative steer row shows the norm of the prompt it last ran on
    var recs = (msg.interventions || []).filter(function (r) { return r.kind === "steer" && r.norm !== undefined; });
    Array.prototype.forEach.call(document.querySelectorAll(".steer"), function (row) {
      var t = row.querySelector(".steer-trait").value, l = parseInt(row.querySelector(".steer-layer").value, 10);
      var r = recs.filter(function (x) { return x.trait === t && x.layer === l; })[0];
      var el = row.querySelector(".steer-norm");
      el.textContent = r ? "norm " + r.norm.toPrecision(5) + " = " + r.coefficient.toPrecision(4) : "";
      el.setAttribute("data-norm", r ? String(r.norm) : "");
    });
  }

  function request(text) {
    var traits = Array.prototype.filter.call($("traits").options, function (o) { return o.selected; })
      .map(function (o) { return o.value; });
    var body = { max_new_tokens: parseInt($("max").value, 10) || 200, temperature: parseFloat($("temp").value) || 0 };
    if (traits.length) body.traits = traits;
    if ($("layers").value.trim()) body.layers = $("layers").value.trim();
    if ($("seed").value.trim()) body.seed = parseInt($("seed").value, 10);
    if ($("system").value.trim()) body.system_prompt = $("system").value;
    var steers = steering();
    if (steers.length) body.steering = steers;
    [["cap", "cap"], ["steer_when", "steer-when"], ["stop_when", "stop-when"]].forEach(function (p) {
      var v = specs(p[1]);
      if (v.length) body[p[0]] = v;
    });
    if (history.length) body.messages = history.concat([{ role: "user", content: text }]);
    else body.prompt = text;
    return body;
  }

  // --- colouring --------------------------------------------------------------------------------------
  function key(trait, layer) { return trait + " @ L" + layer; }
  function scoresOf(turn, k) {
    var tl = turn.keys[k];
    if (!tl) return { prompt: turn.prompt.token_ids.map(function () { return null; }),
                      response: turn.tokens.map(function () { return null; }) };
    return { prompt: turn.prompt.scores[tl[0]][tl[1]],
             response: turn.tokens.map(function (m) { return m.scores[tl[0]][tl[1]]; }) };
  }
  function meta(turn, k) {
    var tl = turn.keys[k];
    if (!tl) return {};
    var v = (turn.prompt.vectors[tl[0]] || []).filter(function (x) { return String(x.layer) === tl[1]; })[0] || {};
    return { trait: tl[0], layer: tl[1], method: v.method };
  }
  function ordinary(scores, ids) {   // special tokens (BOS often has outlying residuals) do not set the scale
    var special = new Set(info.special_ids || []);
    return scores.filter(function (_, i) { return !special.has(ids[i]); });
  }
  function paint(turn, final) {
    var s = scoresOf(turn, chat.colour), m = meta(turn, chat.colour);
    var scale = ordinary(s.prompt, turn.prompt.token_ids);
    if (final) scale = scale.concat(ordinary(s.response, turn.tokens.map(function (t) { return t.token_id; })));
    var e = TraitTokens.extent(scale, 0);
    turn.extent = e;
    turn.promptView.recolor(s.prompt, { extent: e, meta: m });
    turn.responseView.recolor(s.response, { extent: e, meta: m });
    TraitTokens.legend($("legend"), { center: 0, extent: e, label: chat.colour || "no scores" });
  }
  function fillColour(turn) {
    var sel = $("colour"), had = sel.value;
    sel.innerHTML = "";
    Object.keys(turn.keys).forEach(function (k) { option(sel, k, k); });
    if (turn.keys[had]) sel.value = had;
    chat.colour = sel.value || null;
  }

  // --- one turn ---------------------------------------------------------------------------------------
  function newTurn(text) {
    var el = document.createElement("div"); el.className = "turn"; el.setAttribute("data-state", "streaming");
    el.setAttribute("data-turn", String(turns.length));
    var user = document.createElement("div"); user.className = "user"; user.textContent = text;
    var det = document.createElement("details"); det.className = "prompt";
    var sum = document.createElement("summary"); sum.textContent = "prompt tokens";
    var pv = document.createElement("div"); pv.className = "prompt-tokens";
    det.appendChild(sum); det.appendChild(pv);
    var rv = document.createElement("div"); rv.className = "response response-tokens";
    var m = document.createElement("div"); m.className = "meta";
    var iv = document.createElement("div"); iv.className = "interventions";
    [user, det, iv, rv, m].forEach(function (n) { el.appendChild(n); });
    $("chat").appendChild(el);
    var turn = { el: el, text: text, summary: sum, promptEl: pv, responseEl: rv, metaEl: m, interventionsEl: iv,
                 prompt: null, tokens: [],
                 done: null, keys: {}, promptView: null, responseView: null };
    turns.push(turn);
    return turn;
  }

  function onMessage(turn, msg) {
    var special = new Set(info.special_ids || []);
    if (msg.type === "prompt") {
      turn.prompt = msg;
      Object.keys(msg.scores).forEach(function (t) {
        Object.keys(msg.scores[t]).forEach(function (l) { turn.keys[key(t, l)] = [t, l]; });
      });
      fillColour(turn);
      turn.summary.textContent = "prompt: " + msg.token_ids.length + " tokens" + (msg.prompt_note ? " (" + msg.prompt_note + ")" : "");
      turn.promptView = TraitTokens.render(turn.promptEl, msg.tokens, null, { ids: msg.token_ids, special: special,
                                                                           promptEnd: msg.token_ids.length });
      turn.responseView = TraitTokens.render(turn.responseEl, [], null, {});
      turn.interventionsEl.textContent = (msg.interventions || []).map(describe).join("; ");
      showNorms(msg);
      paint(turn, false);
    } else if (msg.type === "token") {
      turn.tokens.push(msg);
      var tl = turn.keys[chat.colour];
      turn.responseView.append(msg.token, tl ? msg.scores[tl[0]][tl[1]] : null, { id: msg.token_id, special: special.has(msg.token_id) });
      turn.metaEl.textContent = turn.tokens.length + " tokens\u2026";
    } else if (msg.type === "done") {
      turn.done = msg;
      history.push({ role: "user", content: turn.text }, { role: "assistant", content: msg.response });
      paint(turn, true);
      var mon = msg.monitor;
      turn.metaEl.textContent = msg.n_tokens + " tokens, stop " + msg.stop_reason +
        (mon ? " (" + mon.trait + " @ L" + mon.layer + " scored " + mon.score.toFixed(3) + " > " + mon.threshold +
               " at response token " + mon.token_index + ")"
             : msg.stop_token ? " (" + msg.stop_token + ")" : "") + ", " + msg.seconds.toFixed(2) + " s";
      turn.el.setAttribute("data-state", "done");
    } else if (msg.type === "error") {
      fail(turn, msg.message);
    }
  }

  function fail(turn, text) {
    turn.metaEl.className = "meta error"; turn.metaEl.textContent = "error: " + text;
    turn.el.setAttribute("data-state", "error");
  }

  async function send(text) {
    if (busy || !text.trim()) return;
    busy = true; $("send").disabled = true; status("streaming\u2026");
    var turn = newTurn(text);
    try {
      var resp = await fetch("stream", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(request(text)) });
      if (!resp.ok) {
        var d = await resp.json().catch(function () { return {}; });
        fail(turn, d.detail || ("HTTP " + resp.status));
        return;
      }
      var reader = resp.body.getReader(), dec = new TextDecoder(), buf = "";
      for (;;) {
        var r = await reader.read();
        if (r.done) break;
        buf += dec.decode(r.value, { stream: true });
        var k;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          var block = buf.slice(0, k); buf = buf.slice(k + 2);
          if (block.indexOf("data: ") === 0) onMessage(turn, JSON.parse(block.slice(6)));
        }
      }
      if (!turn.done && turn.el.getAttribute("data-state") === "streaming") fail(turn, "the stream ended early");
    } catch (e) {
      fail(turn, String(e));
    } finally {
      busy = false; $("send").disabled = false; status(info.model + " (" + info.variant + ")");
    }
  }

  // --- start ------------------------------------------------------------------------------------------
  async function start() {
    info = chat.info = await (await fetch("info")).json();
    $("model").textContent = info.model + " (" + info.variant + "), " + info.num_layers + " layers";
    status("ready");
    var q = new URLSearchParams(location.search);
    allTraits().forEach(function (t) {
      var o = option($("traits"), t, t + (info.traits[t] ? " (best L" + info.traits[t].layer + ")" : " (needs layers)"));
      o.selected = false;
    });
    (q.get("traits") || "").split(",").filter(Boolean).forEach(function (t) {
      Array.prototype.forEach.call($("traits").options, function (o) { if (o.value === t) o.selected = true; });
    });
    [["layers", "layers"], ["max_new_tokens", "max"], ["temperature", "temp"], ["seed", "seed"],
     ["system_prompt", "system"]].forEach(function (p) { if (q.get(p[0]) !== null) $(p[1]).value = q.get(p[0]); });
    q.getAll("steer").forEach(function (s) {   // TRAIT:LAYER:COEFFICIENT[x][:POSITIONS], as the CLI's --steer
      var p = s.split(":");
      addSteer({ trait: p[0], layer: parseInt(p[1], 10), coefficient: parseFloat(p[2]), positions: p[3],
                 relative: /x$/.test(p[2]) });
    });
    ["cap", "steer-when", "stop-when"].forEach(function (k) { $(k).value = q.getAll(k).join(" "); });
    $("add-steer").onclick = function () { addSteer(); };
    $("colour").onchange = function () {
      chat.colour = $("colour").value;
      turns.forEach(function (t) { if (t.prompt) paint(t, !!t.done); });
    };
    $("form").onsubmit = function (ev) { ev.preventDefault(); var t = $("msg").value; $("msg").value = ""; send(t); };
    $("msg").onkeydown = function (ev) { if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").onsubmit(ev); } };
    $("new").onclick = function () { history.length = 0; turns.length = 0; $("chat").innerHTML = ""; };
    if (q.get("prompt")) send(q.get("prompt"));
  }
  start().catch(function (e) { status("error: " + e); });
})();
"""

PAGE_BODY = """<header><b>trait chat</b><span id="model"></span><span id="status">loading\u2026</span></header>
<div id="controls">
  <label>colour by <select id="colour"></select></label><span id="legend"></span>
  <label>traits <select id="traits" multiple size="2" title="none selected: every trait with a best vector"></select></label>
  <label>layers <input id="layers" type="text" placeholder="best (e.g. best,best+2 or 6,12)"></label>
  <label>max tokens <input id="max" type="number" min="1" value="200"></label>
  <label>temperature <input id="temp" type="number" min="0" step="0.1" value="0"></label>
  <label>seed <input id="seed" type="number"></label>
  <label>system <input id="system" type="text" placeholder="optional system prompt"></label>
  <span id="steers"></span><button type="button" id="add-steer">+ steer</button>
  <label title="TRAIT:LAYER:MAX[x] or TRAIT:LAYER:MIN[x]:MAX[x]; x = times the layer's prompt norm">cap
    <input id="cap" type="text" placeholder="trait:L:max[x]"></label>
  <label title="TRAIT:LAYER:THRESHOLD:COEF[x][:each]">steer when <input id="steer-when" type="text"
    placeholder="trait:L:threshold:coef[x]"></label>
  <label title="TRAIT:LAYER:THRESHOLD: end the response at the first token scoring above it">stop when
    <input id="stop-when" type="text" placeholder="trait:L:threshold"></label>
</div>
<div id="chat"></div>
<form id="form"><textarea id="msg" placeholder="Message (Enter sends, Shift+Enter: new line)"></textarea>
<button id="send">Send</button><button type="button" id="new">New chat</button></form>
"""


def _inline(name: str) -> str:
    text = (ASSETS / name).read_text(encoding="utf-8")
    if "</script" in text.lower() or "</style" in text.lower():
        raise RuntimeError(f"{ASSETS / name} contains '</script' or '</style', which would end its inlined element")
    return text


def chat_page() -> str:
    """The live-chat page: one HTML document with tokens.css/tokens.js and the page's own code inlined."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>trait chat</title>\n"
            f"<style>\n{_inline('tokens.css')}\n{PAGE_CSS}</style></head><body>\n{PAGE_BODY}"
            f"<script>\n{_inline('tokens.js')}\n</script>\n<script>\n{PAGE_JS}</script>\n</body></html>\n")


def sse(msg: dict) -> str:
    return f"data: {json.dumps(msg, ensure_ascii=False, allow_nan=False)}\n\n"


def sse_response(gen):
    """A stream of message dicts as a text/event-stream response. The first message is taken before any byte
    is sent, so a TraitError (bad input) becomes HTTP 400; a failure after that is one {"type": "error"} event."""
    from fastapi import HTTPException
    from fastapi.responses import StreamingResponse

    try:
        first = next(gen)
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


def create_web_app(session):
    """The FastAPI app serving `session` (a ChatSession or anything with its info() and stream())."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse
    from starlette.concurrency import run_in_threadpool

    web = FastAPI(title="trait-capture", description="tokens with per-token trait scores, as server-sent events")
    web.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])

    def respond(kwargs: dict):
        return sse_response(session.stream(**kwargs))

    page: list[str] = []   # built on the first request, so a missing asset never breaks /stream

    @web.get("/", response_class=HTMLResponse)
    def index():
        if not page:
            page.append(chat_page())
        return HTMLResponse(page[0], headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    @web.get("/info")
    def info():
        return session.info()

    @web.get("/stream")
    def stream_get(request: Request, prompt: str, traits: Optional[str] = None, layers: Optional[str] = None,
                   max_new_tokens: int = 200, temperature: float = 0.0, top_p: float = 1.0,
                   seed: Optional[int] = None, system_prompt: Optional[str] = None):
        q = request.query_params   # steer / cap / steer_when / stop_when: spec strings, repeatable
        more = {k: q.getlist(k) for k in ("cap", "steer_when", "stop_when") if q.getlist(k)}
        if q.getlist("steer"):
            more["steering"] = q.getlist("steer")
        return respond(dict(prompt=prompt, traits=traits, layers=layers, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, system_prompt=system_prompt, **more))

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

    if hasattr(session, "plan") and hasattr(session, "lm"):   # a ChatSession: the OpenAI-compatible routes too
        from inference.openai_api import add_openai_routes

        model = str(session.lm.info.get("model"))
        add_openai_routes(web, session, Path(model).name if Path(model).exists() else model,
                          aliases=(model, session.variant))
    return web
