"""inference/model_server.py: the real server as a subprocess (with and without a token), the client side of
generate_responses.py, and the app in-process. Oracle for the server path: the local path's files."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from core.generation import generate_batch
from inference.generate_responses import generate_responses
from inference.model_server import create_app, probe_server
from utils import paths
from utils.model import load_model

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
PROMPTS = {"system_prompt": "Be brief.", "prompts": [
    {"id": 1, "text": "hello"}, {"id": "two", "text": "why is the user rude to the model?"},
    {"id": 3, "text": "write code"}, {"id": 4, "text": "a longer prompt about honest answers and kind words"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, zoo, zoo_lora):
    """An experiment folder and prompt set, plus two real servers started at once (they take seconds to load):
    `open` (--experiment, no token) and `locked` (--model, token from $TRAIT_SERVER_TOKEN)."""
    root = tmp_path_factory.mktemp("server_world")
    exps, data = root / "experiments", root / "datasets"
    (exps / "e").mkdir(parents=True)
    (exps / "e" / "config.json").write_text(json.dumps({
        "defaults": {"application": "base"}, "use_chat_template": None,
        "model_variants": {"base": {"model": zoo("llama")},
                           "lora": {"model": zoo("llama"), "lora": zoo_lora("llama")}}}))
    (data / "inference").mkdir(parents=True)
    (data / "inference" / "four.json").write_text(json.dumps(PROMPTS))
    env = {**os.environ, "TRAIT_EXPERIMENTS_DIR": str(exps), "HF_HUB_OFFLINE": "1"}
    env.pop("TRAIT_SERVER_TOKEN", None)
    script = str(REPO / "inference" / "model_server.py")
    servers = {}
    for name, args, extra_env in (("open", ["--experiment", "e"], {}),
                                  ("locked", ["--model", zoo("llama")], {"TRAIT_SERVER_TOKEN": TOKEN})):
        port = free_port()
        proc = subprocess.Popen([sys.executable, script, *args, "--port", str(port)], env={**env, **extra_env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        servers[name] = {"proc": proc, "url": f"http://127.0.0.1:{port}"}
    yield {"exps": exps, "data": data, "servers": servers}
    for s in servers.values():
        if s["proc"].poll() is None:
            s["proc"].kill()
        s["proc"].wait()


def ready(server: dict, token: str | None = None) -> dict:
    """Wait for /health (model loading takes a few seconds); returns the server entry."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.time() + 120
    while time.time() < deadline:
        assert server["proc"].poll() is None, server["proc"].stderr.read()
        try:
            if requests.get(server["url"] + "/health", headers=headers, timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError("model server did not come up")


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(world["exps"]))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(world["data"]))
    monkeypatch.delenv("TRAIT_SERVER_TOKEN", raising=False)
    return world


def files(variant: str, suffix: str) -> dict:
    folder = paths.responses_dir("e", variant, "four", suffix)
    out = {}
    for p in sorted(folder.glob("*.json")):
        d = json.loads(p.read_text(encoding="utf-8"))
        d.pop("capture_date")
        out[p.name] = d
    return out


def test_server_and_local_write_identical_files(env, zoo):
    srv = ready(env["servers"]["open"])
    h = requests.get(srv["url"] + "/health", timeout=5).json()
    assert (h["model"], h["variant"], h["lora"], h["dtype"], h["device"]) == (zoo("llama"), "base", None, "float32", "cpu")
    for kw, tag in ((dict(), "greedy"), (dict(temperature=0.8, top_p=0.9, seed=3), "sampled")):
        s = generate_responses("e", "four", max_new_tokens=8, server_url=srv["url"], output_suffix=f"srv_{tag}",
                               progress=False, **kw)
        assert s["backend"] == "server", s["backend_reason"]
        s = generate_responses("e", "four", max_new_tokens=8, no_server=True, output_suffix=f"loc_{tag}",
                               progress=False, batch_size=3, **kw)
        assert s["backend"] == "local"
        served, local = files("base", f"srv_{tag}"), files("base", f"loc_{tag}")
        assert len(served) == 4 and served == local


def test_server_serving_another_model_or_lora_is_not_used(env):
    srv = ready(env["servers"]["open"])
    s = generate_responses("e", "four", model_variant="lora", max_new_tokens=3, limit=1, server_url=srv["url"],
                           progress=False)
    assert s["backend"] == "local" and "LoRA" in s["backend_reason"]
    s = generate_responses("e", "four", max_new_tokens=3, limit=1, server_url=srv["url"], load_in_8bit=False,
                           output_suffix="x", progress=False)
    assert s["backend"] == "server"
    client, why = probe_server(srv["url"], {"model_path": "/elsewhere/model", "lora_path": None,
                                            "quantization": None})
    assert client is None and "/elsewhere/model" in why
    client, why = probe_server(f"http://127.0.0.1:{free_port()}", {"model_path": "x"})
    assert client is None and "no model server" in why


def test_token_is_required_and_checked(env, monkeypatch):
    srv = ready(env["servers"]["locked"], TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert requests.get(srv["url"] + "/health", headers=headers, timeout=5).status_code == 401
        r = requests.post(srv["url"] + "/generate", json={"prompt_ids": [[1, 5]], "max_new_tokens": 2},
                          headers=headers, timeout=30)
        assert r.status_code == 401
    # without the token the client falls back to a local load and says why
    s = generate_responses("e", "four", max_new_tokens=6, server_url=srv["url"], output_suffix="tok_missing",
                           progress=False)
    assert s["backend"] == "local" and "TRAIT_SERVER_TOKEN" in s["backend_reason"]
    monkeypatch.setenv("TRAIT_SERVER_TOKEN", TOKEN)
    s = generate_responses("e", "four", max_new_tokens=6, server_url=srv["url"], output_suffix="tok_ok",
                           progress=False)
    assert s["backend"] == "server", s["backend_reason"]
    assert files("base", "tok_ok") == files("base", "tok_missing") and len(files("base", "tok_ok")) == 4


def test_app_in_process_validates_requests(zoo):
    import uvicorn

    loaded = load_model(zoo("llama"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, token=None), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        prompts = [[1, 70, 88], [1, 3, 90, 274, 87, 204]]
        r = requests.post(url + "/generate", json={"prompt_ids": prompts, "max_new_tokens": 5}, timeout=30)
        assert r.status_code == 200
        direct = generate_batch(loaded.model, prompts, loaded.tokenizer.pad_token_id, 5)
        body = r.json()
        assert body["ids"] == [d.ids for d in direct]
        assert body["stop_reasons"] == [d.stop_reason for d in direct]
        assert body["texts"] == [loaded.tokenizer.decode(d.ids, skip_special_tokens=True) for d in direct]
        for bad in ({"prompt_ids": []}, {"prompt_ids": [[]]}, {"prompt_ids": [[1, 99999]]},
                    {"prompt_ids": [[1, 2]], "max_new_tokens": -1}, {"prompt_ids": [[1.5, 2]]},
                    {"prompt_ids": [[1, 2]], "top_p": 0}, {"prompt_ids": [[1, 2]], "row_seeds": [1, 2]}):
            assert requests.post(url + "/generate", json=bad, timeout=30).status_code == 422, bad
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_server_stops_cleanly_on_sigterm_and_sigint(env):
    for name, sig, token in (("open", signal.SIGTERM, None), ("locked", signal.SIGINT, TOKEN)):
        srv = ready(env["servers"][name], token)
        srv["proc"].send_signal(sig)
        rc = srv["proc"].wait(timeout=30)
        err = srv["proc"].stderr.read()
        assert rc == 0, err
        assert f"model server stopped ({sig.name})" in err and "Traceback" not in err


def test_server_cli_bad_input(zoo, capsys):
    from inference.model_server import main

    assert main(["--model", zoo("llama"), "--experiment", "e"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--experiment" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--model", zoo("llama"), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot bind" in capsys.readouterr().err
