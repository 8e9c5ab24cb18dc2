"""The OpenAI-compatible routes of inference/model_server.py, driven by the real `openai` client against the real
server (a subprocess, with a bearer token). Oracles: the files generate_responses.py writes for the same prompt
(token ids and text), HF output_hidden_states / logits of one forward over prompt + response (scores and
log-probabilities), and the requests the server must refuse."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
import torch

from inference.generate_responses import generate_responses
from tests.helpers import write_vectors
from utils import paths
from utils.model import load_model

REPO = Path(__file__).resolve().parents[1]
TOKEN = "oa-token"
PROMPTS = {"prompts": [{"id": "a", "text": "Tell me about honest code"}, {"id": "b", "text": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, zoo):
    """An experiment with trait vectors on the zoo llama, and the model server for it (token required)."""
    root = tmp_path_factory.mktemp("openai_world")
    exps, data = root / "experiments", root / "datasets"
    (exps / "oa").mkdir(parents=True)
    (exps / "oa" / "config.json").write_text(json.dumps({
        "defaults": {"application": "base", "extraction": "base"}, "use_chat_template": None,
        "model_variants": {"base": {"model": zoo("llama")}}}))
    (data / "inference").mkdir(parents=True)
    (data / "inference" / "two.json").write_text(json.dumps(PROMPTS))
    old = {k: os.environ.get(k) for k in ("TRAIT_EXPERIMENTS_DIR", "TRAIT_DATASETS_DIR")}
    os.environ.update(TRAIT_EXPERIMENTS_DIR=str(exps), TRAIT_DATASETS_DIR=str(data))
    vectors = write_vectors("oa")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIT_SERVER_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, str(REPO / "inference" / "model_server.py"), "--experiment", "oa",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if requests.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).ok:
                break
        except requests.RequestException:
            pass
        assert time.time() < deadline, "model server did not come up"
        time.sleep(0.2)
    yield {"url": url, "vectors": vectors, "model_dir": zoo("llama"),
           "client": openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)}
    proc.kill()
    proc.wait()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def model_id(served) -> str:
    return Path(served["model_dir"]).name


def written(prompt_id: str, suffix: str) -> dict:
    return json.loads(paths.response_file("oa", "base", "two", prompt_id, suffix).read_text())


def offline(model_dir: str, ids: list[int]):
    """(hidden states per layer, log-softmax logits) of one plain HF forward over `ids`."""
    lm = load_model(model_dir)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states, torch.log_softmax(out.logits[0].float(), dim=-1)


def test_chat_completion_equals_generate_responses_with_offline_scores(served):
    client, n_new = served["client"], 8
    generate_responses("oa", "two", max_new_tokens=n_new, no_server=True, output_suffix="oa_ref", progress=False)
    for pid, prompt in (("a", PROMPTS["prompts"][0]["text"]), ("b", PROMPTS["prompts"][1]["text"])):
        ref = written(pid, "oa_ref")
        p_end = ref["prompt_end"]
        ref_ids = ref["token_ids"][p_end:]
        msgs = [{"role": "user", "content": prompt}]
        # non-streamed
        r = client.chat.completions.create(model=model_id(served), messages=msgs, max_tokens=n_new, temperature=0,
                                           logprobs=True, top_logprobs=3)
        ext = r.choices[0].model_extra["trait_scores"]
        assert ext["prompt_token_ids"] == ref["token_ids"][:p_end]
        assert ext["token_ids"] == ref_ids and r.choices[0].message.content == ref["response"]
        assert r.choices[0].finish_reason == ("length" if len(ref_ids) == n_new else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (p_end, len(ref_ids))
        # streamed: the same ids, the same text, the same scores
        chunks = list(client.chat.completions.create(model=model_id(served), messages=msgs, max_tokens=n_new,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        per_token = [d.model_extra["trait_scores"] for d in deltas[1:] if "token_id" in d.model_extra["trait_scores"]]
        assert [t["token_id"] for t in per_token] == ref_ids
        assert "".join(d.content or "" for d in deltas) == ref["response"]
        assert chunks[-1].usage.completion_tokens == len(ref_ids)
        # scores: the offline projection of the written ids (HF hidden states, block L's output = index L + 1)
        hidden, logp = offline(served["model_dir"], ref["token_ids"])
        assert set(ext["scores"]) == set(served["vectors"])
        for trait, per_layer in ext["scores"].items():
            for layer, got in per_layer.items():
                v = served["vectors"][trait][int(layer)]
                want = hidden[int(layer) + 1][0, p_end:].float() @ v
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=1e-4)
                streamed = torch.tensor([t["scores"][trait][layer] for t in per_token])
                torch.testing.assert_close(streamed, want, atol=1e-4, rtol=1e-4)
        # log-probabilities: the HF logits at the position that produced each token
        content = r.choices[0].logprobs.content
        for k, (tid, entry) in enumerate(zip(ref_ids, content)):
            row = logp[p_end - 1 + k]
            assert abs(entry.logprob - float(row[tid])) < 1e-4
            assert len(entry.top_logprobs) == 3
            assert abs(entry.top_logprobs[0].logprob - float(row.max())) < 1e-4


def test_models_stop_strings_and_completions(served):
    client = served["client"]
    assert [m.id for m in client.models.list().data] == [model_id(served)]
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=model_id(served), messages=msgs, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.chat.completions.create(model=model_id(served), messages=msgs, max_tokens=12, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=model_id(served), messages=msgs, max_tokens=12, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]
    # raw completion: no chat template; the ids continue the raw prompt exactly as a plain HF greedy decode
    c = client.completions.create(model=model_id(served), prompt="The model", max_tokens=6, temperature=0,
                                  logprobs=2)
    ext = c.choices[0].model_extra["trait_scores"]
    lm = load_model(served["model_dir"])
    ids = ext["prompt_token_ids"]
    assert ids == lm.tokenizer("The model")["input_ids"]
    with torch.no_grad():
        greedy = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ext["token_ids"] == greedy[:len(ext["token_ids"])] and len(ext["token_ids"]) >= 1
    assert c.choices[0].text == lm.tokenizer.decode(ext["token_ids"], skip_special_tokens=True)
    assert len(c.choices[0].logprobs.token_logprobs) == len(ext["token_ids"])


def test_requests_refused(served):
    ok = dict(model=model_id(served), messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for key in ("wrong", TOKEN + "x"):   # the openai client always sends some key; none at all: requests below
        bad = openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(**ok)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for route in ("/v1/chat/completions", "/v1/completions"):
        r = requests.post(served["url"] + route, json={**ok, "prompt": "hi"}, timeout=30)
        assert r.status_code == 401
    assert requests.get(served["url"] + "/v1/models", timeout=30).status_code == 401
    client = served["client"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(**{**ok, "model": "gpt-4o"})
    for extra, field in ((dict(n=2), "n"), (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                         (dict(extra_body={"traits": ["no/such"]}), "unknown trait"),
                         (dict(frequency_penalty=0.5), "frequency_penalty"),
                         (dict(extra_body={"tools_x": 1}), "tools_x")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(**{**ok, **extra})


def test_interventions_from_extra_body(served):
    client, trait = served["client"], "behavioral/refusal"
    ok = dict(model=model_id(served), messages=[{"role": "user", "content": "Tell me about honest code"}],
              max_tokens=8, temperature=0)
    r = client.chat.completions.create(**ok, extra_body={"stop_when": f"{trait}:1:-1e9"})
    ext = r.choices[0].model_extra["trait_scores"]
    assert r.choices[0].finish_reason == "content_filter" and ext["stop_reason"] == "monitor"
    assert len(ext["token_ids"]) == 1 and ext["monitor"]["token_index"] == 0 and ext["monitor"]["trait"] == trait
    # relative steering: the record carries the norm; absolute steering with C x that norm gives the same tokens
    rel = client.chat.completions.create(**ok, extra_body={"steering": [f"{trait}:1:0.5x"]})
    rec = rel.choices[0].model_extra["trait_scores"]["interventions"][0]
    absolute = client.chat.completions.create(**ok, extra_body={"steering": [
        {"trait": trait, "layer": 1, "coefficient": 0.5 * rec["norm"]}]})
    plain = client.chat.completions.create(**ok)
    ids = lambda x: x.choices[0].model_extra["trait_scores"]["token_ids"]   # noqa: E731
    assert ids(rel) == ids(absolute) != ids(plain)
    # a cap streams too; the prompt chunk lists it with its numbers
    chunks = list(client.chat.completions.create(**ok, stream=True, extra_body={"cap": [f"{trait}:1:0.01x"]}))
    first = chunks[0].choices[0].delta.model_extra["trait_scores"]["interventions"][0]
    assert first["kind"] == "cap" and first["high"] == pytest.approx(0.01 * first["norm"], rel=1e-6)
    with pytest.raises(openai.BadRequestError, match="cap"):
        client.chat.completions.create(**ok, extra_body={"cap": f"{trait}:1"})


def test_chat_web_app_serves_the_same_routes(served):
    """The live chat's web app (what the Modal chat app deploys) mounts the same OpenAI routes over its session."""
    import threading

    import uvicorn

    from inference.chat_session import ChatSession
    from inference.chat_web import create_web_app

    session = ChatSession("oa", "base")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_web_app(session), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [model_id(served)]
        msgs = [{"role": "user", "content": "hi"}]
        r = client.chat.completions.create(model="base", messages=msgs, max_tokens=5, temperature=0)
        want = served["client"].chat.completions.create(model=model_id(served), messages=msgs, max_tokens=5,
                                                        temperature=0)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert r.choices[0].model_extra["trait_scores"]["token_ids"] == want.choices[0].model_extra["trait_scores"]["token_ids"]
    assert r.choices[0].model_extra["trait_scores"]["scores"] == want.choices[0].model_extra["trait_scores"]["scores"]


def test_generate_with_interventions_through_the_server_equals_local(served, monkeypatch):
    """generate_responses sends its interventions (with their vectors) to /generate: the files equal a local run's."""
    monkeypatch.setenv("TRAIT_SERVER_TOKEN", TOKEN)
    flags = dict(max_new_tokens=6, steer=["behavioral/refusal:1:0.5x"], stop_when=["cognitive/honesty:2:0.5"],
                 cap=["behavioral/refusal:2:-0.1:0.1"], progress=False)
    s = generate_responses("oa", "two", server_url=served["url"], output_suffix="iv_srv", **flags)
    assert s["backend"] == "server", s["backend_reason"]
    generate_responses("oa", "two", no_server=True, output_suffix="iv_loc", **flags)
    for pid in ("a", "b"):
        srv, loc = written(pid, "iv_srv"), written(pid, "iv_loc")
        for d in (srv, loc):
            d.pop("capture_date", None)
        assert srv == loc and len(srv["generation"]["interventions"]) == 3
