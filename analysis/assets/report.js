/*
 * The report page (analysis/report.py inlines it after tokens.js): reads the JSON in #report-data and builds
 * the controls, the vector table, the per-set plot, the model-diff block and the prompt cards. Cards are filled
 * lazily (IntersectionObserver) so a 1,000-prompt report opens at once; switching trait or vector recolours
 * the rendered cards in place.
 *
 * window.TraitReport = {data, state: {trait, view: [per trait], sort}, views: {prompt index: TraitTokens view},
 *                       timing: {parsed, firstRender} (ms since navigation start), setTrait(i), setView(i),
 *                       show(promptId), select(promptIndex, tokenIndex), land(promptId, token, end)}
 * The address #p-{id} opens a prompt card; #p-{id}/t{k} also selects token k (index over prompt + response) and
 * #p-{id}/t{a}-{b} marks tokens a..b-1: the links of the "top spans" page (analysis/spans.py).
 */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var R = window.TraitReport = {
    data: D, views: {}, timing: {parsed: performance.now(), firstRender: null},
    state: {trait: 0, view: D.traits.map(function () { return 0; }), sort: "order"},
  };
  var app = document.getElementById("app");
  var byId = {};
  D.prompts.forEach(function (p, i) { byId[p.id] = i; });

  function h(tag, attrs, children) {
    var el = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") el.textContent = attrs[k];
      else if (k === "class") el.className = attrs[k];
      else el.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) el.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return el;
  }
  function svg(tag, attrs) {
    var el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs || {}) el.setAttribute(k, attrs[k]);
    return el;
  }
  var fmt = TraitTokens.format;
  function curView(t) { t = t === undefined ? R.state.trait : t; return D.traits[t].views[R.state.view[t]]; }

  // --- scores of one prompt for one trait and view, as one array over all its tokens ------------------
  function scoresOf(p, t, v) {
    var out = new Array(p.t.length);
    for (var i = 0; i < out.length; i++) out[i] = null;
    var sv = p.s[t] && p.s[t][v];
    if (!sv) return out;
    if (sv[0].length === p.e) for (var a = 0; a < sv[0].length; a++) out[a] = sv[0][a];
    for (var b = 0; b < sv[1].length; b++) out[p.e + b] = sv[1][b];
    return out;
  }
  function meanOf(p, t, v) { return p.m[t] ? p.m[t][v] : null; }
  // per-response aggregates (core/aggregates.py): p.g[t][v] = [max, ema_max, frac_above]
  var AGGS = [["mean", "mean"], ["max", "max"], ["ema_max", "EMA-max"], ["frac_above", "fraction above baseline"]];
  function aggOf(p, t, v, a) {
    if (a === "mean") return meanOf(p, t, v);
    var g = p.g && p.g[t] && p.g[t][v];
    return g ? g[["max", "ema_max", "frac_above"].indexOf(a)] : null;
  }
  function metaOf(t, v) {
    var w = D.traits[t].views[v];
    return {trait: D.traits[t].name, layer: w.layer, method: w.method, view: w.label};
  }

  // --- header and controls ------------------------------------------------------------------------------
  var traitSel = h("select", {id: "trait-picker", "aria-label": "trait"});
  D.traits.forEach(function (t, i) { traitSel.appendChild(h("option", {value: i, text: t.name})); });
  var viewSel = h("select", {id: "view-picker", "aria-label": "vector / layer"});
  var sortSel = h("select", {id: "sort-picker", "aria-label": "sort prompts"});
  var legendEl = h("span", {id: "legend"});
  var jump = h("input", {id: "jump", placeholder: "prompt id", size: 10});
  var nTok = D.prompts.reduce(function (s, p) { return s + p.t.length; }, 0);
  app.appendChild(h("header", {}, [
    h("h1", {text: D.title}),
    h("div", {class: "sub", text: D.prompts.length + " prompts, " + nTok + " tokens, " + D.traits.length +
      " trait(s); generated " + D.generated + "; scores to " + D.precision + " significant digits; " +
      D.special_note}),
    D.top_spans ? h("div", {class: "sub"}, [h("a", {href: D.top_spans, id: "top-spans-link",
      text: "top spans of every set and variant (analysis/spans.py)"})]) : null,
    h("div", {class: "controls"}, [
      h("label", {}, ["trait ", traitSel]), h("label", {}, ["vector ", viewSel]), legendEl,
      h("label", {}, ["sort ", sortSel]), h("label", {}, ["go to ", jump]),
    ]),
  ]));
  var main = h("main", {});
  var panel = h("aside", {id: "panel"}, [h("h3", {text: "token"}),
    h("div", {id: "panel-body", class: "muted", text: "Click a token for its scores on every trait" +
      " and, when extract_viz wrote them, its logit-lens predictions and attended tokens."})]);
  app.appendChild(h("div", {class: "layout"}, [main, panel]));

  function fillViews() {
    viewSel.innerHTML = "";
    D.traits[R.state.trait].views.forEach(function (v, i) { viewSel.appendChild(h("option", {value: i, text: v.label})); });
    viewSel.value = R.state.view[R.state.trait];
    var name = D.traits[R.state.trait].name;
    var keep = sortSel.value;
    sortSel.innerHTML = "";
    sortSel.appendChild(h("option", {value: "order", text: "prompt order"}));
    AGGS.forEach(function (a) {   // "desc" / "asc": the mean; "max:desc" ...: the response aggregates of p.g
      var key = a[0] === "mean" ? "" : a[0] + ":";
      sortSel.appendChild(h("option", {value: key + "desc", text: name + " " + a[1] + ", high first"}));
      sortSel.appendChild(h("option", {value: key + "asc", text: name + " " + a[1] + ", low first"}));
    });
    sortSel.value = keep || "order";
    var w = curView();
    TraitTokens.legend(legendEl, {center: w.center, extent: w.extent, label: w.kind === "delta" ? "B \u2212 A" : "score"});
  }

  // --- the vectors, stated once: one line per trait, the full table folded -----------------------------------
  var sel = h("section", {id: "selection"}, [h("h2", {text: "Vectors"})]);
  var lines = h("ul", {class: "sel-lines"});
  D.traits.forEach(function (t) {
    var v0 = t.views[0], layers = t.views.map(function (v) { return v.label; }).join(", ");
    lines.appendChild(h("li", {}, [h("b", {text: t.name}), ": " + layers + "; " + (v0.position || "") + " " +
      (v0.component || "") + ", " + (v0.explanation || "selected by " + (v0.selection_source || "?")) +
      (v0.vector_path ? "; " + v0.vector_path : "") +
      (v0.sha256 ? " (sha256 " + v0.sha256.slice(0, 12) + ")" : "") + "; " + v0.note +
      (v0.card ? "; card: held-out AUROC " + fmt(v0.card.auroc) + " (32 random directions: mean " +
        fmt(v0.card.random_auroc_mean) + ", max " + fmt(v0.card.random_auroc_max) + "), recall at 1% false positives " +
        fmt(v0.card.recall_at_fpr) + (v0.card.sign_ok === false ? ", SIGN FLIPPED" : "") : "")]));
  });
  sel.appendChild(lines);
  var tbl = h("table", {class: "vectors"});
  tbl.appendChild(h("tr", {}, ["trait", "view", "layer", "method", "position", "component", "why this vector",
    "baseline", "colour centre", "full colour at \u00b1", "vector file", "sha256", "from"].map(function (x) {
    return h("th", {text: x}); })));
  D.traits.forEach(function (t) {
    t.views.forEach(function (v) {
      tbl.appendChild(h("tr", {}, [t.name, v.label, v.layer, v.method, v.position, v.component,
        v.explanation || v.selection_source,
        fmt(v.baseline), fmt(v.center), fmt(v.extent), v.vector_path || "", v.sha256 || "", v.source].map(function (x) {
        return h("td", {text: x === null || x === undefined ? "" : String(x)}); })));
    });
  });
  sel.appendChild(h("details", {}, [h("summary", {text: "every vector in full"}), tbl]));
  var first = D.traits.length && D.traits[0].views[0];
  if (first) sel.appendChild(h("p", {class: "muted", text: "Extraction variant " + (first.extraction_variant || "?") +
    ", steering variant " + (first.steering_variant || "?") + ". A score is the scalar projection <h, v/|v|>. " +
    "Colours: blue below the centre, red above, full colour at the 99th percentile of |score \u2212 centre| over the set. " +
    "Hover a token for its exact score; click it for every trait."}));
  main.appendChild(sel);

  // --- model diff -------------------------------------------------------------------------------------------
  var cmp = null;
  if (D.compare) {
    cmp = h("section", {id: "compare"}, [h("h2", {text: "Model diff: " + D.compare.b + " \u2212 " + D.compare.a})]);
    cmp.appendChild(h("div", {id: "compare-body"}));
    main.appendChild(cmp);
  }
  function clauseList(title, list) {
    var ol = h("ol", {class: "clauses"});
    list.forEach(function (c) {
      var a = h("a", {href: "#p-" + c.id, text: "#" + c.id});
      a.addEventListener("click", function (ev) { ev.preventDefault(); R.show(c.id, c.range); });
      ol.appendChild(h("li", {}, [h("span", {class: "num", text: fmt(c.mean_delta)}), " ", a, " ",
        h("span", {class: "clause", text: c.text})]));
    });
    return h("div", {class: "clause-box"}, [h("h3", {text: title}), list.length ? ol : h("p", {class: "muted", text: "none"})]);
  }
  // d and d_z per layer as lines (any number of layers fits the card), the headline layer marked
  function effectPlot(e) {
    var W = 960, H = 220, L = 48, Rm = 12, T = 16, B = 34, n = e.layers.length;
    var series = [["Cohen's d", e.per_layer_effect_size, "d"], ["paired d_z", e.per_layer_paired_effect_size, "dz"]];
    var vals = [0];
    series.forEach(function (sr) { sr[1].forEach(function (x) { if (x !== null && x !== undefined) vals.push(x); }); });
    var lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    if (!(hi > lo)) { hi = lo + 1; }
    var pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
    var x = function (k) { return n > 1 ? L + (W - L - Rm) * k / (n - 1) : L + (W - L - Rm) / 2; };
    var y = function (v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); };
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "effects-plot", role: "img", "data-layers": n});
    s.appendChild(svg("line", {x1: L, x2: W - Rm, y1: y(0), y2: y(0), class: "zero"}));
    var hk = e.layers.indexOf(e.headline_layer);
    if (hk >= 0) {
      s.appendChild(svg("line", {x1: x(hk), x2: x(hk), y1: T, y2: H - B, class: "headline-mark"}));
      var ht = svg("text", {x: x(hk) + 4, y: T + 10, class: "tick headline-label"});
      ht.textContent = "headline L" + e.headline_layer; s.appendChild(ht);
    }
    series.forEach(function (sr) {
      var pts = [];
      sr[1].forEach(function (v, k) { if (v !== null && v !== undefined) pts.push(x(k).toFixed(1) + "," + y(v).toFixed(1)); });
      s.appendChild(svg("polyline", {points: pts.join(" "), class: "series " + sr[2], fill: "none"}));
      sr[1].forEach(function (v, k) {
        if (v === null || v === undefined) return;
        var c = svg("circle", {cx: x(k).toFixed(1), cy: y(v).toFixed(1), r: n > 40 ? 1.8 : 3, class: "series " + sr[2]});
        var tt = svg("title", {}); tt.textContent = "layer " + e.layers[k] + ": " + sr[0] + " = " + fmt(v);
        c.appendChild(tt); s.appendChild(c);
      });
    });
    var every = Math.max(1, Math.ceil(n / 16));
    e.layers.forEach(function (l, k) {
      if (k % every && k !== hk) return;
      var tk = svg("text", {x: x(k), y: H - B + 14, class: "tick xt"}); tk.textContent = String(l); s.appendChild(tk);
    });
    [hi - pad, 0, lo + pad].forEach(function (tv) {
      var tk = svg("text", {x: L - 4, y: y(tv) + 3, class: "tick"}); tk.textContent = fmt(tv); s.appendChild(tk);
    });
    var xl = svg("text", {x: (L + W - Rm) / 2, y: H - 4, class: "axis-label"}); xl.textContent = "layer"; s.appendChild(xl);
    var yl = svg("text", {x: 12, y: (T + H - B) / 2, class: "axis-label", transform: "rotate(-90 12 " + (T + H - B) / 2 + ")"});
    yl.textContent = "effect size (B \u2212 A)"; s.appendChild(yl);
    var key = h("p", {class: "muted effects-key", text: "lines: Cohen's d (solid) and paired d_z (dashed) per layer; the " +
      "vertical mark is the headline layer (the selected vector's); hover a point for its value."});
    return h("div", {class: "effects-box"}, [s, key]);
  }
  function fillCompare() {
    if (!cmp) return;
    var body = document.getElementById("compare-body");
    body.innerHTML = "";
    var name = D.traits[R.state.trait].name, e = D.compare.effects[name], c = D.compare.clauses[name];
    if (e) {
      var head = e.headline_layer === null || e.headline_layer === undefined ? "no selected vector, so no headline" :
        "headline at the selected vector's layer " + e.headline_layer + ": d = " + fmt(e.headline_effect_size) +
        ", d_z = " + fmt(e.headline_paired_effect_size) + (e.headline_mean_projection_diff_z === null ||
        e.headline_mean_projection_diff_z === undefined ? "" : ", mean difference " +
        fmt(e.headline_mean_projection_diff_z) + " held-out spreads");
      body.appendChild(h("p", {class: "headline", text: "Effect sizes of " + name + " (" + e.method + ", " + e.position +
        "), per-prompt mean response activations, " + D.compare.b + " over " + D.compare.a + "; " + head +
        ". Exploratory: the largest |d| over the " + e.layers_searched + " layers searched is at layer " +
        e.peak_layer + " (d = " + fmt(e.peak_effect_size) + "), a selection over layers."}));
      body.appendChild(effectPlot(e));
    } else {
      body.appendChild(h("p", {class: "muted", text: D.compare.results ? "results.json has no entry for " + name :
        "no results.json (run analysis/model_diff/compare_variants.py) : effect sizes not shown"}));
    }
    if (c) {
      body.appendChild(h("p", {text: "Per-token " + D.compare.b + " \u2212 " + D.compare.a + " at layer " + c.layer +
        " over " + c.n_prompts + " prompts: mean of per-prompt means " + fmt(c.mean) + " (std " + fmt(c.std) +
        "). Clauses: at most " + c.top_pct + "% of all clauses on each side, listed by the sign of their mean delta " +
        "(aggregate.json)."}));
      body.appendChild(h("div", {class: "clause-cols"}, [clauseList(D.compare.b + " > " + D.compare.a, c.top),
        clauseList(D.compare.b + " < " + D.compare.a, c.bottom)]));
    }
  }

  // --- the per-set plot -------------------------------------------------------------------------------------
  var plot = h("section", {id: "plot"}, [h("h2", {text: "Mean response score per prompt"})]);
  var plotBox = h("div", {id: "plot-box"});
  plot.appendChild(plotBox);
  main.appendChild(plot);
  var order = D.prompts.map(function (_, i) { return i; });

  function sortOrder() {
    var t = R.state.trait, v = R.state.view[t], s = sortSel.value || "order";
    order = D.prompts.map(function (_, i) { return i; });
    if (s !== "order") {
      var parts = s.split(":"), agg = parts.length > 1 ? parts[0] : "mean";
      var sign = parts[parts.length - 1] === "desc" ? -1 : 1;
      order.sort(function (a, b) {
        var x = aggOf(D.prompts[a], t, v, agg), y = aggOf(D.prompts[b], t, v, agg);
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return sign * (x - y) || a - b;
      });
    }
  }

  function drawPlot() {
    plotBox.innerHTML = "";
    var W = 960, H = 80, L = 190, Rm = 10, n = order.length;
    D.traits.forEach(function (tr, t) {
      var v = R.state.view[t], w = tr.views[v], vals = [];
      order.forEach(function (pi) { var m = meanOf(D.prompts[pi], t, v); if (m !== null && m !== undefined) vals.push(m); });
      var lo = Math.min.apply(null, vals.concat([w.center])), hi = Math.max.apply(null, vals.concat([w.center]));
      if (!(hi > lo)) { hi = lo + 1; }
      var pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
      var y = function (m) { return 6 + (H - 12) * (1 - (m - lo) / (hi - lo)); };
      var x = function (k) { return n > 1 ? L + (W - L - Rm) * k / (n - 1) : L + (W - L - Rm) / 2; };
      var s = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "strip" + (t === R.state.trait ? " current" : ""),
        "data-trait": tr.name, role: "img"});
      s.appendChild(svg("line", {x1: L, x2: W - Rm, y1: y(w.center), y2: y(w.center), class: "zero"}));
      var lab = svg("text", {x: 2, y: 30, class: "lab"}); lab.textContent = tr.name; s.appendChild(lab);
      var sub = svg("text", {x: 2, y: 44, class: "lab2"}); sub.textContent = w.label; s.appendChild(sub);
      [hi - pad, lo + pad].forEach(function (tv) {
        var tk = svg("text", {x: L - 4, y: y(tv) + 3, class: "tick"}); tk.textContent = fmt(tv); s.appendChild(tk);
      });
      var ax = svg("text", {x: 2, y: 58, class: "lab2 axis-label"});
      ax.textContent = "y: mean response score (line: " + (w.kind === "delta" ? "0" : "centre " + fmt(w.center)) + ")";
      s.appendChild(ax);
      var r = n > 300 ? 1.6 : 2.6;
      order.forEach(function (pi, k) {
        var p = D.prompts[pi], m = meanOf(p, t, v);
        if (m === null || m === undefined) return;
        var a = svg("a", {href: "#p-" + p.id, class: "pt"});
        var c = svg("circle", {cx: x(k).toFixed(1), cy: y(m).toFixed(1), r: r, fill: TraitTokens.color(m, w.center, w.extent)});
        var title = svg("title", {}); title.textContent = "prompt #" + p.id + ": mean " + fmt(m);
        c.appendChild(title); a.appendChild(c); s.appendChild(a);
      });
      s.addEventListener("click", function (ev) {
        var a = ev.target.closest("a");
        if (!a) return;
        ev.preventDefault();
        R.show(a.getAttribute("href").slice(3));
      });
      plotBox.appendChild(s);
    });
    plotBox.appendChild(h("p", {class: "muted", text: "One point per prompt (x: " + (sortSel.value === "order" ?
      "prompt order" : "sorted by the chosen trait") + "), its mean score over the response tokens; click a point to open the prompt."}));
  }

  // --- prompt cards, filled lazily --------------------------------------------------------------------------
  var list = h("section", {id: "prompts"}, [h("h2", {text: "Prompts"})]);
  main.appendChild(list);
  var cards = [];
  var charsPerLine = Math.max(40, Math.floor((Math.min(window.innerWidth, 1400) - 420) / 7.9));
  D.prompts.forEach(function (p, i) {
    var chars = 0, lines = 1;
    for (var k = 0; k < p.t.length; k++) { chars += p.t[k].length || 1; if (p.t[k].indexOf("\n") >= 0) lines++; }
    lines += Math.ceil(chars / charsPerLine);
    var head = h("div", {class: "card-head"});
    var body = h("div", {class: "card-body", style: "min-height:" + Math.min(4000, lines * 23) + "px"});
    var card = h("article", {class: "card", id: "p-" + p.id, "data-index": i}, [head, body]);
    cards.push(card);
    list.appendChild(card);
  });

  function fillHead(i) {
    var p = D.prompts[i], t = R.state.trait, v = R.state.view[t];
    cards[i].firstChild.textContent = "#" + p.id + "  \u00b7  " + (p.t.length - p.e) + " response tokens, " + p.e +
      " prompt tokens  \u00b7  mean " + D.traits[t].name + " = " + (meanOf(p, t, v) === null ? "\u2013" : fmt(meanOf(p, t, v)));
  }

  function otherTraits(pi, ti) {
    var lines = [], p = D.prompts[pi];
    D.traits.forEach(function (tr, t) {
      if (t === R.state.trait) return;
      var v = R.state.view[t], sc = scoresOf(p, t, v)[ti];
      lines.push(tr.name + " (" + tr.views[v].label + ") " + (sc === null ? "none" : String(sc)));
    });
    return lines;
  }

  function renderCard(i) {
    if (R.views[i]) return;
    var p = D.prompts[i], t = R.state.trait, v = R.state.view[t], w = D.traits[t].views[v];
    var sp = new Array(p.t.length);
    p.sp.forEach(function (k) { sp[k] = true; });
    var body = cards[i].lastChild;
    R.views[i] = TraitTokens.render(body, p.t, scoresOf(p, t, v), {
      ids: p.i, promptEnd: p.e, special: sp, center: w.center, extent: w.extent, meta: metaOf(t, v),
      onSelect: function (k) { R.select(i, k); },
      tooltip: function (k) { return otherTraits(i, k); },
    });
    body.style.minHeight = "";
    if (R.timing.firstRender === null) {
      requestAnimationFrame(function () { if (R.timing.firstRender === null) R.timing.firstRender = performance.now(); });
    }
  }

  var io = "IntersectionObserver" in window ? new IntersectionObserver(function (entries) {
    entries.forEach(function (en) {
      if (en.isIntersecting) { renderCard(+en.target.getAttribute("data-index")); io.unobserve(en.target); }
    });
  }, {rootMargin: "1200px 0px"}) : null;

  function recolorAll() {
    var t = R.state.trait, v = R.state.view[t], w = D.traits[t].views[v];
    for (var k in R.views) {
      R.views[k].recolor(scoresOf(D.prompts[k], t, v), {center: w.center, extent: w.extent, meta: metaOf(t, v)});
    }
    cards.forEach(function (_, i) { fillHead(i); });
  }

  function placeCards() {
    order.forEach(function (i) { list.appendChild(cards[i]); });
  }

  // --- the side panel -------------------------------------------------------------------------------------------
  var selected = null;
  R.select = function (pi, ti) {
    var p = D.prompts[pi], body = document.getElementById("panel-body");
    document.querySelectorAll(".tt-selected, .tt-attended").forEach(function (e) {
      e.classList.remove("tt-selected"); e.classList.remove("tt-attended"); });
    var els = R.views[pi] ? R.views[pi].elements() : [];
    if (els[ti]) els[ti].classList.add("tt-selected");
    selected = [pi, ti];
    body.className = "";
    body.innerHTML = "";
    body.appendChild(h("div", {class: "tokline"}, [h("code", {text: JSON.stringify(p.t[ti])}),
      " id " + p.i[ti] + ", position " + ti + " (" + (ti < p.e ? "prompt" : "response") + "), prompt #" + p.id]));
    var st = h("table", {class: "scores"});
    D.traits.forEach(function (tr, t) {
      tr.views.forEach(function (w, v) {
        var sc = scoresOf(p, t, v)[ti];
        st.appendChild(h("tr", {class: v === R.state.view[t] ? "cur" : ""}, [h("td", {text: tr.name}),
          h("td", {text: w.label}), h("td", {class: "num", text: sc === null ? "\u2013" : String(sc)})]));
      });
    });
    body.appendChild(st);
    if (p.lens && p.lens.rows[ti]) {
      body.appendChild(h("h4", {text: "logit lens: next-token predictions" + (ti + 1 < p.t.length ?
        " (actual " + JSON.stringify(p.t[ti + 1]) + ")" : "")}));
      var lt = h("table", {class: "viz"});
      p.lens.rows[ti].forEach(function (row, li) {
        lt.appendChild(h("tr", {}, [h("th", {text: "L" + p.lens.layers[li]}),
          h("td", {text: row[1].map(function (c) { return JSON.stringify(c[0]) + " " + c[1]; }).join("  ")}),
          h("td", {class: "num", text: "rank " + row[0]})]));
      });
      body.appendChild(lt);
    }
    if (p.attn && p.attn.rows[ti]) {
      body.appendChild(h("h4", {text: "attention: most attended tokens (" + (p.attn.heads === "mean" ? "mean" :
        "mean of " + p.attn.n_heads + " heads") + "); click a layer to mark them"}));
      var at = h("table", {class: "viz"});
      p.attn.rows[ti].forEach(function (row, li) {
        var tr = h("tr", {class: "clickable"}, [h("th", {text: "L" + p.attn.layers[li]}),
          h("td", {text: row.map(function (c) { return JSON.stringify(p.t[c[0]]) + "@" + c[0] + " " + c[1]; }).join("  ")})]);
        tr.addEventListener("click", function () {
          els.forEach(function (e) { e.classList.remove("tt-attended"); });
          row.forEach(function (c) { if (els[c[0]]) els[c[0]].classList.add("tt-attended"); });
        });
        at.appendChild(tr);
      });
      body.appendChild(at);
    }
  };

  R.show = function (id, range) {
    var i = byId[id];
    if (i === undefined) return false;
    renderCard(i);
    cards[i].scrollIntoView({block: "start"});
    cards[i].classList.add("flash");
    setTimeout(function () { cards[i].classList.remove("flash"); }, 1200);
    if (range) {
      var els = R.views[i].elements();
      for (var k = range[0]; k < range[1]; k++) { var el = els[p_e(i) + k]; if (el) el.classList.add("tt-attended"); }
    }
    if (location.hash !== "#p-" + id) history.replaceState(null, "", "#p-" + id);
    return true;
  };
  function p_e(i) { return D.prompts[i].e; }   // clause token ranges count from the first response token

  R.land = function (id, token, end) {   // open a card and select token `token` (marking token..end-1)
    if (!R.show(id)) return false;
    if (token === null || token === undefined) return true;
    var i = byId[id], els = R.views[i].elements();
    R.select(i, token);
    for (var k = token + 1; k < (end === null || end === undefined ? token + 1 : end); k++) {
      if (els[k]) els[k].classList.add("tt-attended");
    }
    if (els[token]) els[token].scrollIntoView({block: "center"});
    history.replaceState(null, "", "#p-" + id + "/t" + token + (end > token + 1 ? "-" + end : ""));
    return true;
  };
  function landOnHash() {   // #p-{id}, #p-{id}/t{k}, #p-{id}/t{a}-{b}
    var m = /^#p-(.+?)(?:\/t(\d+)(?:-(\d+))?)?$/.exec(location.hash);
    if (m) R.land(decodeURIComponent(m[1]), m[2] === undefined ? null : +m[2], m[3] === undefined ? null : +m[3]);
  }

  R.setTrait = function (t) {
    R.state.trait = +t;
    traitSel.value = R.state.trait;
    fillViews();
    recolorAll();
    fillCompare();
    if (sortSel.value !== "order") { sortOrder(); placeCards(); }
    drawPlot();
    if (selected) R.select(selected[0], selected[1]);
  };
  R.setView = function (v) {
    R.state.view[R.state.trait] = +v;
    viewSel.value = v;
    fillViews();
    recolorAll();
    if (sortSel.value !== "order") { sortOrder(); placeCards(); }
    drawPlot();
    if (selected) R.select(selected[0], selected[1]);
  };
  traitSel.addEventListener("change", function () { R.setTrait(traitSel.value); });
  viewSel.addEventListener("change", function () { R.setView(viewSel.value); });
  sortSel.addEventListener("change", function () { sortOrder(); placeCards(); drawPlot(); });
  jump.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") { if (!R.show(jump.value.trim())) jump.classList.add("bad"); else jump.classList.remove("bad"); }
  });
  window.addEventListener("hashchange", landOnHash);

  fillViews();
  fillCompare();
  drawPlot();
  cards.forEach(function (c, i) { fillHead(i); if (io) io.observe(c); else renderCard(i); });
  if (location.hash.indexOf("#p-") === 0) landOnHash();
  else if (cards.length) renderCard(0);
})();
