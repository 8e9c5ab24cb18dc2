/*
 * TraitTokens: text as tokens, each coloured by its trait score. One file, no dependencies, no network;
 * works from file://. The report (analysis/report.py) and the live-chat page both inline it with tokens.css.
 *
 *   var view = TraitTokens.render(container, tokens, scores, opts)
 *       tokens   array of strings, one decoded string per token id
 *       scores   array of numbers, one per token (null / undefined: that token has no score); may be null
 *       opts     (all optional)
 *         ids        array of token ids (shown on hover, written as data-id)
 *         promptEnd  index of the first response token: a boundary marker is drawn before it, and tokens get
 *                    data-side="prompt" / "response" (without it every token is "response")
 *         special    array of booleans, or a Set of token ids: those tokens are shown dimmed
 *         center     the score drawn white (default 0; the vector's baseline for uncentered scores)
 *         extent     |score - center| drawn at full colour (default TraitTokens.extent(scores, center))
 *         meta       {trait, layer, method, ...}: written on every token as data-* attributes, shown on hover
 *         onSelect   function(i, element): called when a token is clicked
 *         tooltip    function(i, element) -> extra text lines (array of strings) for the hover box
 *       returns a view:
 *         view.append(text, score, {id, special, side})   one more token at the end (streaming); its element
 *         view.setScore(i, score)                         one token's score (streaming scores after tokens)
 *         view.recolor(scores, {center, extent, meta})    new scores / scale / meta, the text is not rebuilt
 *         view.boundary(i)                                (re)place the prompt/response boundary before token i
 *         view.elements()                                 the token elements, in order
 *         view.length()                                   number of tokens
 *   TraitTokens.color(score, center, extent)   CSS colour: blue below center, white at it, red above
 *   TraitTokens.extent(scores, center)         99th percentile of |score - center| (1 when there is none)
 *   TraitTokens.legend(container, {center, extent, label})   a colour bar labelled in score units
 *   TraitTokens.format(x)                      x with 4 significant digits ("" for null)
 *   TraitTokens.visible(text)                  the token as displayed: newline as a return arrow, empty as a dot
 *
 * Every token is <span class="tt-tok" data-i data-score data-id data-side [data-trait data-layer data-method]>,
 * data-score being the score exactly as given (String(number)); special tokens also have class "tt-special",
 * tokens without a score "tt-noscore". The boundary is <span class="tt-boundary">, not a token.
 *
 *   var v = TraitTokens.render(el, ["Hi", " there"], [0.5, -1.2], {ids: [17, 42], promptEnd: 1,
 *                                                                  meta: {trait: "demo/refusal", layer: 3}});
 *   v.append("!", 2.0, {id: 7});
 */
(function (global) {
  "use strict";

  var POS = [214, 39, 40];   // red: score above the center
  var NEG = [31, 100, 200];  // blue: score below the center

  function format(x) {
    if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "";
    return String(Number(x.toPrecision(4)));
  }

  function color(score, center, extent) {
    if (score === null || score === undefined || !isFinite(score)) return "";
    var t = (score - (center || 0)) / (extent > 0 ? extent : 1);
    t = Math.max(-1, Math.min(1, t));
    var c = t >= 0 ? POS : NEG, a = Math.abs(t);
    return "rgb(" + Math.round(255 + (c[0] - 255) * a) + "," + Math.round(255 + (c[1] - 255) * a) + "," +
      Math.round(255 + (c[2] - 255) * a) + ")";
  }

  function extent(scores, center) {
    var d = [];
    for (var i = 0; scores && i < scores.length; i++) {
      var s = scores[i];
      if (s !== null && s !== undefined && isFinite(s)) d.push(Math.abs(s - (center || 0)));
    }
    if (!d.length) return 1;
    d.sort(function (a, b) { return a - b; });
    var e = d[Math.min(d.length - 1, Math.floor(0.99 * (d.length - 1) + 0.5))];
    return e > 0 ? e : (d[d.length - 1] || 1);
  }

  function visible(text) {
    if (text === "") return "\u00b7";
    return String(text).replace(/\n/g, "\u21b5\n");
  }

  var tip = null;
  function tipEl() {
    if (!tip) {
      tip = document.createElement("div");
      tip.className = "tt-tip";
      tip.style.display = "none";
      document.body.appendChild(tip);
    }
    return tip;
  }

  function legend(container, o) {
    o = o || {};
    var c = o.center || 0, e = o.extent > 0 ? o.extent : 1;
    container.innerHTML = "";
    container.classList.add("tt-legend");
    var lo = document.createElement("span"), bar = document.createElement("span"), hi = document.createElement("span");
    var stops = [];
    for (var k = 0; k <= 10; k++) stops.push(color(c - e + (2 * e * k) / 10, c, e));
    bar.className = "tt-legend-bar";
    bar.style.background = "linear-gradient(to right," + stops.join(",") + ")";
    var mid = document.createElement("span");
    mid.className = "tt-legend-mid";
    mid.textContent = format(c);
    bar.appendChild(mid);
    lo.textContent = "\u2264 " + format(c - e);
    hi.textContent = "\u2265 " + format(c + e);
    if (o.label) {
      var l = document.createElement("span");
      l.className = "tt-legend-label";
      l.textContent = o.label;
      container.appendChild(l);
    }
    container.appendChild(lo);
    container.appendChild(bar);
    container.appendChild(hi);
    return container;
  }

  function render(container, tokens, scores, opts) {
    opts = opts || {};
    var state = {
      center: opts.center || 0,
      extent: opts.extent > 0 ? opts.extent : extent(scores, opts.center || 0),
      meta: opts.meta || {},
      promptEnd: typeof opts.promptEnd === "number" ? opts.promptEnd : null,
      scores: [],
    };
    var els = [], marker = null;
    container.classList.add("tt-tokens");
    container.innerHTML = "";

    function isSpecial(i, id) {
      var s = opts.special;
      if (!s) return false;
      if (typeof s.has === "function") return id !== undefined && id !== null && s.has(id);
      return !!s[i];
    }

    function paint(el, score) {
      var bg = color(score, state.center, state.extent);
      el.style.backgroundColor = bg;
      if (bg) {
        el.classList.remove("tt-noscore");
        el.setAttribute("data-score", String(score));
        el.style.color = Math.abs((score - state.center) / state.extent) > 0.65 ? "#fff" : "";
      } else {
        el.classList.add("tt-noscore");
        el.removeAttribute("data-score");
        el.style.color = "";
      }
    }

    function writeMeta(el) {
      for (var k in state.meta) {
        if (Object.prototype.hasOwnProperty.call(state.meta, k) && state.meta[k] !== undefined &&
            state.meta[k] !== null) el.setAttribute("data-" + k, String(state.meta[k]));
      }
    }

    function placeBoundary() {
      if (marker && marker.parentNode) marker.parentNode.removeChild(marker);
      if (state.promptEnd === null) return;
      if (!marker) {
        marker = document.createElement("span");
        marker.className = "tt-boundary";
        marker.title = "the response starts here";
        marker.textContent = "response";
      }
      var before = els[state.promptEnd];
      if (before) container.insertBefore(marker, before);
      else container.appendChild(marker);
    }

    function make(i, text, score, id, special, side) {
      var el = document.createElement("span");
      el.className = "tt-tok" + (special ? " tt-special" : "");
      if (text === "") el.classList.add("tt-empty");
      el.textContent = visible(text);
      el.setAttribute("data-i", String(i));
      if (id !== undefined && id !== null) el.setAttribute("data-id", String(id));
      el.setAttribute("data-side", side);
      el.__ttText = text;
      writeMeta(el);
      paint(el, score);
      return el;
    }

    var frag = document.createDocumentFragment();
    for (var i = 0; i < tokens.length; i++) {
      var id = opts.ids ? opts.ids[i] : undefined;
      var score = scores ? scores[i] : null;
      var side = state.promptEnd !== null && i < state.promptEnd ? "prompt" : "response";
      var el = make(i, tokens[i], score, id, isSpecial(i, id), side);
      state.scores.push(score);
      els.push(el);
      frag.appendChild(el);
    }
    container.appendChild(frag);
    placeBoundary();

    function show(el, ev) {
      var t = tipEl(), i = +el.getAttribute("data-i");
      var lines = [JSON.stringify(el.__ttText)];
      var sc = el.getAttribute("data-score");
      lines.push("score " + (sc === null ? "none" : sc));
      if (el.hasAttribute("data-id")) lines.push("token id " + el.getAttribute("data-id"));
      for (var k in state.meta) {
        if (Object.prototype.hasOwnProperty.call(state.meta, k) && state.meta[k] !== undefined &&
            state.meta[k] !== null) lines.push(k + " " + state.meta[k]);
      }
      lines.push(el.getAttribute("data-side") + (el.classList.contains("tt-special") ? ", special" : ""));
      if (opts.tooltip) lines = lines.concat(opts.tooltip(i, el) || []);
      t.textContent = lines.join("\n");
      t.style.display = "block";
      var x = ev.clientX + 12, y = ev.clientY + 14;
      var w = t.offsetWidth, h = t.offsetHeight;
      if (x + w > window.innerWidth - 4) x = Math.max(4, window.innerWidth - w - 4);
      if (y + h > window.innerHeight - 4) y = Math.max(4, ev.clientY - h - 8);
      t.style.left = x + "px";
      t.style.top = y + "px";
    }

    container.addEventListener("mouseover", function (ev) {
      var el = ev.target.closest ? ev.target.closest(".tt-tok") : null;
      if (el && container.contains(el)) show(el, ev);
    });
    container.addEventListener("mouseout", function (ev) {
      var el = ev.target.closest ? ev.target.closest(".tt-tok") : null;
      if (el) tipEl().style.display = "none";
    });
    container.addEventListener("click", function (ev) {
      var el = ev.target.closest ? ev.target.closest(".tt-tok") : null;
      if (el && container.contains(el) && opts.onSelect) opts.onSelect(+el.getAttribute("data-i"), el);
    });

    return {
      append: function (text, score, o) {
        o = o || {};
        var i = els.length;
        var side = o.side || (state.promptEnd !== null && i < state.promptEnd ? "prompt" : "response");
        var special = o.special !== undefined ? !!o.special : isSpecial(i, o.id);
        var el = make(i, text, score, o.id, special, side);
        state.scores.push(score);
        els.push(el);
        container.appendChild(el);
        if (state.promptEnd === i) placeBoundary();
        return el;
      },
      setScore: function (i, score) {
        state.scores[i] = score;
        paint(els[i], score);
      },
      recolor: function (newScores, o) {
        o = o || {};
        if (o.center !== undefined) state.center = o.center || 0;
        if (newScores) state.scores = newScores.slice();
        if (o.extent > 0) state.extent = o.extent;
        else if (newScores || o.center !== undefined) state.extent = extent(state.scores, state.center);
        if (o.meta) {
          state.meta = o.meta;
          for (var j = 0; j < els.length; j++) writeMeta(els[j]);
        }
        for (var k = 0; k < els.length; k++) paint(els[k], state.scores[k]);
      },
      boundary: function (i) {
        state.promptEnd = i;
        for (var k = 0; k < els.length; k++) els[k].setAttribute("data-side", k < i ? "prompt" : "response");
        placeBoundary();
      },
      elements: function () { return els.slice(); },
      length: function () { return els.length; },
      state: state,
    };
  }

  global.TraitTokens = { render: render, color: color, extent: extent, legend: legend, format: format,
    visible: visible };
})(typeof window !== "undefined" ? window : this);
