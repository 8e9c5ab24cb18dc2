"""core/interventions.py on a zoo model: capping, stop-when, steer-when and relative steering, through batched
generation (core.generation) and the token stream (core.streaming). Oracles: HF output_hidden_states of the same
forward, the uncapped forward, plain HF greedy decoding without a KV cache under a test-written hook (the slow
path), and SteeringHook with the absolute coefficient."""
from __future__ import annotations

import pytest
import torch

from core.generation import generate_batch
from core.hooks import SteeringHook, component_module
from core.interventions import (Amount, InterventionError, Interventions, parse_intervention)
from core.streaming import stream_with_scores
from utils.model import format_prompt, load_model, tokenize_prompt

LAYER = 1
N_NEW = 10


@pytest.fixture(scope="module")
def lm(zoo):
    return load_model(zoo("llama"))


@pytest.fixture(scope="module")
def vec(lm):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(lm.model.config.hidden_size, generator=g)
    return v / v.norm()


def prompt(lm, text: str) -> list[int]:
    return tokenize_prompt(lm.tokenizer, format_prompt(lm.tokenizer, text)[0])


def hidden(lm, ids: list[int], layer: int = LAYER, iv: Interventions | None = None) -> torch.Tensor:
    """HF's hidden state after block `layer` for one uncached forward over ids (with the interventions hooked)."""
    with torch.no_grad():
        if iv is None:
            out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        else:
            iv.start(torch.tensor([ids]))
            with iv.active():
                out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].float()


def greedy_uncached(lm, ids: list[int], n: int, edit=None) -> list[int]:
    """The slow path: argmax over a full forward per step; `edit(h, n_prompt)` may change block LAYER's output."""
    seq = list(ids)
    for _ in range(n):
        handle = None
        if edit is not None:
            def hook(_m, _i, out):
                h = out[0] if isinstance(out, tuple) else out
                h = edit(h, len(ids))
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            handle = component_module(lm.model, LAYER, "residual").register_forward_hook(hook, prepend=True)
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        seq.append(int(logits.argmax()))
    return seq[len(ids):]


def crossing(scores: list[float]) -> tuple[int, float] | None:
    """A token index t >= 1 whose score clears every earlier one by a margin, and a threshold between them."""
    for t in range(1, len(scores)):
        before = max(scores[:t])
        if scores[t] > before + 1e-2:
            return t, (before + scores[t]) / 2
    return None


def test_cap_bounds_the_projection_and_keeps_the_orthogonal_part(lm, vec):
    ids = prompt(lm, "Tell me about the weather in the mountains")
    free = hidden(lm, ids)
    proj = free @ vec
    hi, lo = float(proj.quantile(0.6)), float(proj.quantile(0.3))
    for spec, low, high in ((f"t:{LAYER}:{hi}", None, hi), (f"t:{LAYER}:{lo}:{hi}", lo, hi), (f"t:{LAYER}:{lo}:", lo, None)):
        iv = Interventions(lm.model, [parse_intervention("cap", spec).with_vector(vec * 3.0)])  # any length
        capped = hidden(lm, ids, iv=iv)
        p = capped @ vec
        if high is not None:
            assert float(p.max()) <= high + 1e-5 and bool((proj > high).any())
        if low is not None:
            assert float(p.min()) >= low - 1e-5 and bool((proj < low).any())
        want = proj.clamp(min=low, max=high)
        torch.testing.assert_close(p, want, atol=1e-5, rtol=0)
        orth_free = free - proj[:, None] * vec
        orth_capped = capped - p[:, None] * vec
        torch.testing.assert_close(orth_capped, orth_free, atol=1e-5, rtol=1e-5)
    # a relative cap is the absolute cap at C x the prompt norm (stated in the record)
    iv = Interventions(lm.model, [parse_intervention("cap", f"t:{LAYER}:0.05x").with_vector(vec)])
    rel = hidden(lm, ids, iv=iv)
    rec = iv.record(0)[0]
    norm = float(free.norm(dim=-1).mean())   # the zoo prompt has no special token but its own: see skip_ids below
    assert rec["norm"] == pytest.approx(norm, rel=1e-5) and rec["high"] == pytest.approx(0.05 * rec["norm"], rel=1e-6)
    iv_abs = Interventions(lm.model, [parse_intervention("cap", f"t:{LAYER}:{rec['high']!r}").with_vector(vec)])
    torch.testing.assert_close(hidden(lm, ids, iv=iv_abs), rel, atol=0, rtol=0)


def test_stop_when_ends_at_the_first_offline_crossing(lm, vec):
    prompts = [prompt(lm, "hello there"), prompt(lm, "Why is the sky blue on a clear day?")]
    pad = lm.tokenizer.pad_token_id
    plain = generate_batch(lm.model, prompts, pad, N_NEW, stop_ids=[-1])
    ids0 = prompts[0] + plain[0].ids
    scores = (hidden(lm, ids0)[len(prompts[0]):] @ vec).tolist()      # offline: the response tokens' scores
    assert crossing(scores), scores
    t, thr = crossing(scores)
    item = parse_intervention("stop_when", f"t:{LAYER}:{thr!r}").with_vector(vec)
    got = generate_batch(lm.model, prompts, pad, N_NEW, stop_ids=[-1], interventions=[item])
    assert got[0].stop_reason == "monitor" and got[0].ids == plain[0].ids[:t + 1]
    assert got[0].monitor["token_index"] == t and got[0].monitor["score"] == pytest.approx(scores[t], abs=1e-4)
    # the other row runs on to its own first crossing (or to the end), unaffected by its neighbour
    ids1 = prompts[1] + plain[1].ids
    s1 = (hidden(lm, ids1)[len(prompts[1]):] @ vec).tolist()
    first = next((k for k, s in enumerate(s1) if s > thr), None)
    assert got[1].ids == (plain[1].ids if first is None else plain[1].ids[:first + 1])
    assert got[1].stop_reason == ("length" if first is None else "monitor")
    # the stream stops at the same token, after yielding it
    msgs = list(stream_with_scores(lm.model, prompts[0], {"t": {LAYER: vec}}, N_NEW, stop_ids=[-1],
                                   interventions=[item]))
    tokens = [m for m in msgs if m["type"] == "token"]
    assert [m["token_id"] for m in tokens] == plain[0].ids[:t + 1]
    assert msgs[-1]["stop_reason"] == "monitor" and msgs[-1]["monitor"]["token_index"] == t
    assert tokens[-1]["scores"]["t"][LAYER] == pytest.approx(scores[t], abs=1e-4)
    assert all(m["scores"]["t"][LAYER] <= thr for m in tokens[:-1])


def test_steer_when_equals_plain_steering_from_the_crossing_token(lm, vec):
    ids = prompt(lm, "Tell me a story about a robot")
    pad = lm.tokenizer.pad_token_id
    plain = generate_batch(lm.model, [ids], pad, N_NEW, stop_ids=[-1])[0].ids
    scores = (hidden(lm, ids + plain)[len(ids):] @ vec).tolist()
    assert crossing(scores), scores
    t, thr = crossing(scores)
    coef = 6.0

    def from_t(h, n_prompt):   # plain steering on every position from generated token t on
        pos = torch.arange(h.shape[1])
        return h + coef * (pos >= n_prompt + t).to(h.dtype)[None, :, None] * vec

    want = greedy_uncached(lm, ids, N_NEW, from_t)
    assert want != plain          # the steering changes the response
    assert want[:t + 1] == plain[:t + 1]
    item = parse_intervention("steer_when", f"t:{LAYER}:{thr!r}:{coef}").with_vector(vec)
    assert generate_batch(lm.model, [ids], pad, N_NEW, stop_ids=[-1], interventions=[item])[0].ids == want
    streamed = [m["token_id"] for m in stream_with_scores(lm.model, ids, {}, N_NEW, stop_ids=[-1], interventions=[item])
                if m["type"] == "token"]
    assert streamed == want

    def each(h, n_prompt):     # only where the token's own (pre-edit) score is over the threshold
        pos = torch.arange(h.shape[1])
        on = ((h.float() @ vec) > thr) & (pos >= n_prompt)[None, :]
        return h + coef * on.to(h.dtype)[..., None] * vec

    item = parse_intervention("steer_when", f"t:{LAYER}:{thr!r}:{coef}:each").with_vector(vec)
    assert generate_batch(lm.model, [ids], pad, N_NEW, stop_ids=[-1], interventions=[item])[0].ids == \
        greedy_uncached(lm, ids, N_NEW, each)


def test_relative_steering_equals_absolute_with_the_printed_norm(lm, vec):
    prompts = [prompt(lm, "hi"), prompt(lm, "Write a poem about the sea and the wind")]
    pad = lm.tokenizer.pad_token_id
    special = lm.tokenizer.all_special_ids
    item = parse_intervention("steer", f"t:{LAYER}:0.5x").with_vector(vec)
    got = generate_batch(lm.model, prompts, pad, N_NEW, stop_ids=[-1], interventions=[item], skip_ids=special)
    for ids, res in zip(prompts, got):
        rec = res.interventions[0]
        h = hidden(lm, ids)
        keep = torch.tensor([i not in special for i in ids])
        assert rec["norm"] == pytest.approx(float(h[keep].norm(dim=-1).mean()), rel=1e-5)   # the norm, recomputed
        assert rec["coefficient"] == pytest.approx(0.5 * rec["norm"], rel=1e-6) and rec["coefficient_relative"] == 0.5
        # absolute steering with C x the printed norm, through SteeringHook and plain HF generate
        with SteeringHook(lm.model, vec, LAYER, 0.5 * rec["norm"]):
            want = generate_batch(lm.model, [ids], pad, N_NEW, stop_ids=[-1])[0].ids
        assert res.ids == want
        unsteered = generate_batch(lm.model, [ids], pad, N_NEW, stop_ids=[-1])[0].ids
        assert res.ids != unsteered
    # only on generated tokens: SteeringHook(positions="response") with the absolute coefficient
    resp = parse_intervention("steer", f"t:{LAYER}:2x:response").with_vector(vec)
    got_r = generate_batch(lm.model, prompts[1:], pad, N_NEW, stop_ids=[-1], interventions=[resp], skip_ids=special)[0]
    with SteeringHook(lm.model, vec, LAYER, got_r.interventions[0]["coefficient"], positions="response"):
        assert generate_batch(lm.model, prompts[1:], pad, N_NEW, stop_ids=[-1])[0].ids == got_r.ids
    assert got_r.ids != unsteered and got_r.ids[0] == unsteered[0]     # the first token comes from the prompt forward
    msgs = list(stream_with_scores(lm.model, prompts[1], {}, N_NEW, stop_ids=[-1], interventions=[item],
                                   skip_ids=special))
    assert msgs[0]["interventions"][0]["norm"] == pytest.approx(got[1].interventions[0]["norm"], rel=1e-6)
    assert [m["token_id"] for m in msgs if m["type"] == "token"] == got[1].ids


@pytest.mark.parametrize("kind, spec, match", [
    ("steer", "t:1", "expected TRAIT:LAYER:COEF"), ("steer", "t:a:1", "LAYER must be an integer"),
    ("steer", "t:1:2y", "not a number"), ("steer", "t:1:2:sideways", "positions"),
    ("cap", "t:1:3:1", "above maximum"), ("cap", "t:1::", "maximum, a minimum"),
    ("steer_when", "t:1:2", "THRESHOLD:COEF"), ("steer_when", "t:1:2:3:every", "THRESHOLD:COEF"),
    ("stop_when", "t:1:nan", "finite"), ("stop_when", "t:1:x", "must be a number")])
def test_bad_specs_name_the_flag(kind, spec, match):
    with pytest.raises(InterventionError, match=match):
        parse_intervention(kind, spec)


def test_bad_vectors_and_layers(lm, vec):
    with pytest.raises(InterventionError, match="out of range"):
        Interventions(lm.model, [parse_intervention("cap", "t:9:1").with_vector(vec)])
    with pytest.raises(InterventionError, match="hidden size"):
        Interventions(lm.model, [parse_intervention("cap", "t:1:1").with_vector(torch.ones(3))])
    with pytest.raises(InterventionError, match="no vector"):
        Interventions(lm.model, [parse_intervention("cap", "t:1:1")])
    assert str(Amount(0.5, True)) == "0.5x" and parse_intervention("cap", "a/b:2:-1:").spec() == "a/b:2:-1:"


# ---- through generate_responses.py (flags, files, summary) -------------------------------------------------------
@pytest.fixture
def gen_exp(experiments, zoo, tmp_path, monkeypatch):
    import json as _json

    from tests.helpers import write_vectors

    experiments("iv", {"base": {"model": zoo("llama")}})
    vectors = write_vectors("iv")
    data = tmp_path / "datasets"
    (data / "inference").mkdir(parents=True)
    (data / "inference" / "p.json").write_text(_json.dumps({"prompts": [
        {"id": 1, "text": "hi"}, {"id": 2, "text": "Tell me about honest code and kind words"}]}))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(data))
    return vectors


def _files(suffix: str) -> dict:
    import json as _json

    from utils import paths

    return {p.stem: _json.loads(p.read_text()) for p in sorted(paths.responses_dir("iv", "base", "p", suffix).glob("*.json"))}


def test_generate_relative_steering_equals_absolute_with_the_printed_norm(gen_exp, capsys):
    from inference.generate_responses import format_summary, generate_responses, main

    trait = "behavioral/refusal"
    s = generate_responses("iv", "p", max_new_tokens=8, no_server=True, output_suffix="rel", progress=False,
                           steer=[f"{trait}:1:0.5x"])
    line = format_summary(s)
    assert s["backend"] == "local"
    rel = _files("rel")
    plain = generate_responses("iv", "p", max_new_tokens=8, no_server=True, output_suffix="plain", progress=False)
    for pid, rec in rel.items():
        iv = rec["generation"]["interventions"][0]
        assert iv["kind"] == "steer" and iv["spec"] == f"{trait}:1:0.5x" and iv["coefficient_relative"] == 0.5
        norm = iv["norm"]
        assert f"{norm:.6g}" in line or f"{norm!r}" in line            # the summary prints the norm
        # absolute steering with 0.5 x the recorded norm, one prompt at a time: the same ids
        assert main(["--experiment", "iv", "--prompt-set", "p", "--prompt-ids", pid, "--max-new-tokens", "8",
                     "--no-server", "--no-progress", "--output-suffix", f"abs{pid}",
                     "--steer", f"{trait}:1:{0.5 * norm!r}"]) == 0
        absolute = _files(f"abs{pid}")[pid]
        assert absolute["token_ids"] == rec["token_ids"]
        assert absolute["generation"]["interventions"][0]["coefficient"] == iv["coefficient"]
        assert rec["token_ids"] != _files("plain")[pid]["token_ids"]
    assert plain["written"] == 2


def test_generate_stop_when_and_bad_flags(gen_exp, capsys):
    from inference.generate_responses import generate_responses, main

    from utils.config import resolve_variant

    generate_responses("iv", "p", max_new_tokens=10, no_server=True, output_suffix="free", progress=False)
    free = _files("free")
    lm = load_model(resolve_variant("iv", "base").model_path("iv"))
    found = None   # a (prompt, trait) whose offline scores cross a threshold mid-response
    for pid, trait, layer in ((p, t, layer) for p in ("2", "1") for t in ("cognitive/honesty", "behavioral/refusal")
                              for layer in (1, 2)):
        rec = free[pid]
        scores = (hidden(lm, rec["token_ids"], layer)[rec["prompt_end"]:] @ gen_exp[trait][layer]).tolist()
        if crossing(scores):
            found = (pid, trait, layer, rec, *crossing(scores))
            break
    assert found, {p: free[p]["token_ids"][free[p]["prompt_end"]:] for p in free}
    pid, trait, layer, rec, t, thr = found
    s = generate_responses("iv", "p", max_new_tokens=10, no_server=True, output_suffix="mon", progress=False,
                           stop_when=[f"{trait}:{layer}:{thr!r}"])
    got = _files("mon")[pid]
    assert got["token_ids"] == rec["token_ids"][:rec["prompt_end"] + t + 1]
    g = got["generation"]
    assert g["stop_reason"] == "monitor" and g["monitor"]["token_index"] == t and g["monitor"]["trait"] == trait
    assert s["stop_reasons"]["monitor"] >= 1
    capsys.readouterr()
    for flags, msg in ((["--cap", f"{trait}:1"], "--cap"), (["--stop-when", "no/such:1:3"], "no/such"),
                       (["--steer", f"{trait}:9:1x"], "out of range"), (["--steer-when", f"{trait}:1:x:1"], "THRESHOLD")):
        rc = main(["--experiment", "iv", "--prompt-set", "p", "--no-server", "--no-progress",
                   "--output-suffix", "bad", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert not _files("bad")


# ---- the chat page: the relative steering slider, the norm shown, the interventions and a monitor stop ---------
def test_chat_page_relative_slider_norm_and_monitor(experiments, zoo):
    import json as _json
    import socket
    import threading
    import time
    import urllib.request
    from urllib.parse import urlencode

    import uvicorn

    from inference.chat_session import ChatSession
    from inference.chat_web import create_web_app
    from tests.browser import Browser, require_chromium
    from tests.helpers import write_vectors

    require_chromium()
    experiments("pg", {"base": {"model": zoo("llama")}})
    write_vectors("pg")
    session = ChatSession("pg", "base")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_web_app(session), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        query = [("prompt", "Tell me a story"), ("max_new_tokens", 6), ("traits", "behavioral/refusal"),
                 ("steer", "behavioral/refusal:1:0.5x"), ("stop-when", "cognitive/honesty:1:-1e9")]
        with Browser() as b:
            page = b.new_page()
            page.goto(f"{url}/?{urlencode(query)}")
            page.wait_for("document.querySelector('.turn[data-state=done]') !== null", timeout=120)
            row = page.eval("""(function () { var r = document.querySelector('.steer');
              return {units: r.querySelector('.steer-units').value, slider: r.querySelector('.steer-slider').value,
                      hidden: r.querySelector('.steer-slider').hidden, norm: r.querySelector('.steer-norm').getAttribute('data-norm'),
                      shown: r.querySelector('.steer-norm').textContent,
                      interventions: document.querySelector('.turn .interventions').textContent,
                      meta: document.querySelector('.turn .meta').textContent}; })()""")
        # the oracle: the same request on the SSE endpoint
        sse_q = [("prompt", "Tell me a story"), ("max_new_tokens", 6), ("traits", "behavioral/refusal"),
                 ("steer", "behavioral/refusal:1:0.5x"), ("stop_when", "cognitive/honesty:1:-1e9")]
        with urllib.request.urlopen(f"{url}/stream?{urlencode(sse_q)}", timeout=120) as resp:
            msgs = [_json.loads(b[6:]) for b in resp.read().decode().split("\n\n") if b.startswith("data: ")]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    steer_rec = [r for r in msgs[0]["interventions"] if r["kind"] == "steer"][0]
    assert row["units"] == "norm" and float(row["slider"]) == 0.5 and not row["hidden"]
    assert float(row["norm"]) == steer_rec["norm"] and f"{steer_rec['norm']:.5g}"[:5] in row["shown"]
    assert "steer behavioral/refusal:1:0.5x" in row["interventions"] and "stop-when" in row["interventions"]
    assert msgs[-1]["stop_reason"] == "monitor" and msgs[-1]["monitor"]["token_index"] == 0
    assert "stop monitor" in row["meta"] and "at response token 0" in row["meta"]
