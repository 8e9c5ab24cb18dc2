"""inference/modal_inference.py (the Modal app), modal_common.py (GPU table, settings, image), chat_session.py and
chat_web.py: the app's declarations (no network), its class run through Modal's `.local()` (enter once, then the
methods), the SSE web app, and the `--local --json` CLI.

Score oracles are HF's `output_hidden_states` projected on the unit vectors; generated ids are checked
against HF greedy `generate`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import inference.chat_session as cs
import inference.modal_common as mc
import inference.modal_inference as mi
from tests.helpers import BLOCK_NETWORK, TRAITS, write_vectors
from utils import paths
from utils.config import resolve_variant
from utils.model import format_messages, format_prompt, load_model, stop_token_ids, tokenize_prompt
from utils.vectors import resolve_vector_source

REPO = Path(__file__).resolve().parents[1]
BEST = {t: max(accs, key=accs.get) for t, accs in TRAITS.items()}   # best layer by val_accuracy


@pytest.fixture
def chat_exp(experiments, zoo, zoo_lora):
    """Experiment `live`: llama base + a LoRA variant, two traits with vectors at layers 1 and 3."""
    experiments("live", {"base": {"model": zoo("llama")}, "lora": {"model": zoo("llama"), "lora": zoo_lora("llama")}})
    return write_vectors("live")


def hf_scores(model, ids: list[int], vectors: dict, layers: dict[str, int]) -> dict[str, list[float]]:
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return {t: (hs[layers[t] + 1][0] @ vectors[t][layers[t]]).tolist() for t in layers}


def close(a, b) -> None:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def flatten(msgs: list[dict], trait: str, layer: int) -> list[float]:
    return msgs[0]["scores"][trait][str(layer)] + [m["scores"][trait][str(layer)] for m in msgs[1:-1]]


# ---------------------------------------------------------------------------------------------------
# Declarations

def test_app_imports_and_declares_without_network():
    """A fresh interpreter with every socket call failing imports the app and finds class, methods, endpoint."""
    script = BLOCK_NETWORK + textwrap.dedent("""
        import inspect, json, socket
        import modal
        import inference.modal_inference as mi
        from modal._partial_function import _PartialFunctionFlags as F, _find_partial_methods_for_user_cls as find
        user_cls = mi.TraitChat._get_user_cls()
        raw = user_cls.__dict__["capture_activations_stream"]._get_raw_f()
        print(json.dumps({
            "app": mi.app.name, "cls": type(mi.TraitChat).__name__, "gpu": mi.GPU,
            "enter": sorted(find(user_cls, F.ENTER_POST_SNAPSHOT)),
            "methods": sorted(find(user_cls, F.CALLABLE_INTERFACE)),
            "web": sorted(find(user_cls, F.WEB_INTERFACE)),
            "web_is_endpoint": user_cls.__dict__["web"]._is_web_endpoint(),
            "stream_is_generator": inspect.isgeneratorfunction(inspect.unwrap(raw)),
            "entrypoint": type(mi.chat).__name__,
            "torch_imported": __import__("sys").modules.get("torch") is not None,
        }))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), TRAIT_EXPERIMENT="no_such_experiment", HF_HUB_OFFLINE="1")
    env.pop("TRAIT_GPU", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"app": "trait-capture", "cls": "Cls", "gpu": mc.DEFAULT_GPU, "enter": ["load"],
                   "methods": ["capture_activations_stream", "warmup"], "web": ["web"], "web_is_endpoint": True,
                   "stream_is_generator": True, "entrypoint": "LocalEntrypoint", "torch_imported": False}


def test_gpu_table(monkeypatch):
    monkeypatch.delenv("TRAIT_GPU", raising=False)
    assert mc.gpu_for_model("google/gemma-2-2b-it") == "A10G"
    assert mc.gpu_for_model("google/gemma-2-9b-it") == "A100-40GB"
    assert mc.gpu_for_model("meta-llama/Llama-3.1-8B-Instruct") == "A100-40GB"
    assert mc.gpu_for_model("google/gemma-2-27b-it") == "A100-80GB"
    assert mc.gpu_for_model("meta-llama/Llama-3.3-70B-Instruct") == "H100:2"
    assert mc.gpu_for_model("meta-llama/Llama-3.3-70B-Instruct", "4bit") == "A100-80GB"
    assert mc.model_size_billions("mistralai/Mixtral-8x7B-Instruct-v0.1") == 56.0
    assert mc.model_size_billions("Qwen/Qwen3-1.7B") == 1.7
    assert mc.gpu_for_model("models/base") == mc.DEFAULT_GPU and mc.gpu_for_model(None) == mc.DEFAULT_GPU
    monkeypatch.setenv("TRAIT_GPU", "L40S")
    assert mc.gpu_for_model("meta-llama/Llama-3.3-70B-Instruct") == "L40S"


def test_settings_are_checked_when_the_app_is_built_not_at_import(monkeypatch):
    """Malformed TRAIT_* values: a plain import works (CLIs, tests, other stages); the modal CLI refuses them."""
    bad = dict(os.environ, PYTHONPATH=str(REPO), TRAIT_SCALEDOWN_WINDOW="5min", TRAIT_WEB_AUTH="public",
               TRAIT_QUANTIZATION="3bit", HF_HUB_OFFLINE="1")
    plain = subprocess.run([sys.executable, "-c", "import inference.modal_inference as mi; "
                            "print(mi.SETTINGS.scaledown_seconds, mi.SETTINGS.web_auth)"],
                           cwd=REPO, env=bad, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["300", "public"]     # the default window until check() names the variable
    built = subprocess.run([sys.executable, "-c", "import modal.cli.entry_point; import inference.modal_inference"],
                           cwd=REPO, env=bad, capture_output=True, text=True, timeout=120)
    assert built.returncode != 0 and "SettingsError: $TRAIT_SCALEDOWN_WINDOW" in built.stderr

    ok = mc.ModalSettings.from_env({})
    assert ok == mc.ModalSettings() and ok.check() is ok and ok.scaledown_seconds == 300
    for var, value in (("TRAIT_SCALEDOWN_WINDOW", "-1"), ("TRAIT_WEB_AUTH", "public"), ("TRAIT_QUANTIZATION", "3bit")):
        with pytest.raises(mc.SettingsError, match=r"\$" + var):
            mc.ModalSettings.from_env({var: value}).check()
    custom = mc.ModalSettings.from_env({"TRAIT_EXPERIMENT": "e", "TRAIT_MODEL_VARIANT": "v", "TRAIT_QUANTIZATION": "4bit",
                                        "TRAIT_SCALEDOWN_WINDOW": "60", "TRAIT_WEB_AUTH": "none"})
    assert mc.ModalSettings.from_env(custom.image_env("L4")) == mc.ModalSettings("e", "v", "4bit", "L4", "60", "none")
    assert custom.check().scaledown_seconds == 60

    # a container (or a --local run) starting with a malformed setting stops before loading anything
    monkeypatch.setattr(mi, "SETTINGS", mc.ModalSettings(quantization="3bit"))
    n0 = len(cs.LOADS)
    with pytest.raises(mc.SettingsError, match="TRAIT_QUANTIZATION"):
        mi.TraitChat(experiment="nowhere").warmup.local()
    assert len(cs.LOADS) == n0


def test_session_and_web_modules_import_without_modal():
    script = textwrap.dedent("""
        import sys
        sys.modules["modal"] = None          # any `import modal` now fails
        import inference.chat_session, inference.chat_web, inference.modal_common
        print("torch" in sys.modules, "fastapi" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


class FakeSession:
    """A ChatSession-like object: what create_web_app needs, with scripted streams."""

    def __init__(self):
        self.calls: list[dict] = []

    def info(self) -> dict:
        return {"status": "ready", "variant": "fake"}

    def stream(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get("prompt") == "bad":
            raise cs.ChatError("prompt: bad")
        if kwargs.get("prompt") == "bug":
            raise RuntimeError("a bug, not bad input")
        yield {"type": "prompt", "token_ids": [1, 2], "scores": {"a/b": {"3": [0.5, None]}}}
        yield {"type": "token", "token": " x", "token_id": 7, "step": 0, "scores": {"a/b": {"3": -1.25}}}
        if kwargs.get("prompt") == "dies":
            raise RuntimeError("the GPU fell over")
        yield {"type": "done", "stop_reason": "length", "n_tokens": 1}


def sse_events(resp) -> list[dict]:
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    return [json.loads(b[len("data: "):]) for b in blocks]


def test_web_app_from_any_session_object():
    from fastapi.testclient import TestClient

    from inference.chat_web import create_web_app

    session = FakeSession()
    client = TestClient(create_web_app(session), raise_server_exceptions=False)
    assert client.get("/info").json() == {"status": "ready", "variant": "fake"}
    got = sse_events(client.get("/stream", params={"prompt": "hi", "traits": "a/b", "max_new_tokens": 3}))
    assert got == list(FakeSession().stream(prompt="hi"))
    assert session.calls[-1] == {"prompt": "hi", "traits": "a/b", "layers": None, "max_new_tokens": 3,
                                 "temperature": 0.0, "top_p": 1.0, "seed": None, "system_prompt": None}
    assert sse_events(client.post("/stream", json={"prompt": "hi", "steering": []})) == got
    assert session.calls[-1] == {"prompt": "hi", "steering": []}
    resp = client.post("/stream", json={"prompt": "bad"})
    assert resp.status_code == 400 and resp.json()["detail"] == "prompt: bad"
    assert client.post("/stream", json=["prompt"]).status_code == 400
    assert client.get("/stream", params={"prompt": "bug"}).status_code == 500     # a bug is not a 400
    died = sse_events(client.get("/stream", params={"prompt": "dies"}))
    assert [m["type"] for m in died] == ["prompt", "token", "error"] and "GPU fell over" in died[-1]["message"]


def test_image_adds_code_vectors_evidence_and_local_models(experiments, tmp_path):
    exp = experiments("dep", {"base": {"model": "models/base"}, "hub": {"model": "org/model-7b"}})
    write_vectors("dep")
    extra = paths.extraction_dir("dep") / "behavioral/refusal/base/activations/train.pt"   # large, not needed
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"x")
    results = paths.steering_results("dep", "behavioral/refusal", "base", "response__5")
    results.parent.mkdir(parents=True)
    results.write_text("{}\n")
    (results.parent / "responses.json").write_text("[]")
    (exp / "models/base").mkdir(parents=True)
    (exp / "inference").mkdir()
    mounts = {remote: (local, ignore) for local, remote, ignore in mc.image_mounts("dep", "base")}
    assets = {"/root/analysis/assets"} if (REPO / "analysis/assets").is_dir() else set()
    assert set(mounts) == {"/root/core", "/root/utils", "/root/inference", "/root/experiments/dep/extraction",
                           "/root/experiments/dep/steering", "/root/experiments/dep/models/base"} | assets
    assert mounts["/root/core"][0] == REPO / "core" and mounts["/root/inference"][0] == REPO / "inference"

    def kept(remote: str) -> set[str]:
        local, ignore = mounts[remote]
        return {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and not ignore(p.relative_to(local))}

    ext = kept("/root/experiments/dep/extraction")
    assert ext and all("/vectors/" in p and p.endswith((".pt", ".json")) for p in ext)
    assert len([p for p in ext if p.endswith(".pt")]) == 6
    assert kept("/root/experiments/dep/steering") == {str(results.relative_to(paths.experiment_dir("dep") / "steering"))}
    assert not any(r.startswith("/root/experiments/dep/inference") for r in mounts)   # outputs never go into the image
    assert "/root/experiments/dep/models/base" not in {r for _, r, _ in mc.image_mounts("dep", "hub")}


# ---------------------------------------------------------------------------------------------------
# The class through Modal's .local(): enter once, then the methods

def test_class_local_streams_best_vectors_and_never_reloads(chat_exp):
    n0 = len(cs.LOADS)
    chat = mi.TraitChat(experiment="live", model_variant="lora")
    info = chat.warmup.local()
    assert info["status"] == "ready" and info["variant"] == "lora" and info["lora"]
    assert info["vector_source"] == resolve_vector_source("live").describe()   # the projection script's default
    assert {t: v["layer"] for t, v in info["traits"].items()} == BEST
    assert all(v["selected_by"] == "extraction" and len(v["sha256"]) == 64 for v in info["traits"].values())
    msgs = list(chat.capture_activations_stream.local(prompt="hello world", max_new_tokens=6))
    again = list(chat.capture_activations_stream.local(prompt="hello world", max_new_tokens=6))
    assert chat.warmup.local()["loads_in_process"] == len(cs.LOADS) == n0 + 1    # a warm container never reloads

    prompt, tokens, done = msgs[0], msgs[1:-1], msgs[-1]
    assert [m["token_id"] for m in again[1:-1]] == [m["token_id"] for m in tokens]
    assert json.loads(json.dumps(msgs)) == msgs                                    # JSON-ready as streamed
    assert set(prompt["vectors"]) == set(TRAITS) and prompt["variant"] == "lora"
    assert {t: [v["layer"] for v in vs] for t, vs in prompt["vectors"].items()} == {t: [l] for t, l in BEST.items()}
    # the oracle: the LoRA model loaded independently, HF hidden states on the streamed ids
    v = resolve_variant("live", "lora")
    lm = load_model(v.model_path("live"), lora=v.lora_path("live"))
    text, _ = format_prompt(lm.tokenizer, "hello world")
    ids = tokenize_prompt(lm.tokenizer, text)
    assert prompt["token_ids"] == ids and prompt["text"] == text
    assert ids[0] == lm.tokenizer.bos_token_id and ids[1] != lm.tokenizer.bos_token_id   # exactly one BOS
    stops = stop_token_ids(lm.tokenizer, lm.model)
    gen = [m["token_id"] for m in tokens]
    with torch.no_grad():
        hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=stops,
                               pad_token_id=lm.tokenizer.pad_token_id)[0, len(ids):].tolist()
    assert gen == [t for t in hf[:len(gen)]] and (done["stop_reason"] == "length" or hf[len(gen)] in stops)
    ref = hf_scores(lm.model, ids + gen, chat_exp, BEST)
    for trait, layer in BEST.items():
        close(flatten(msgs, trait, layer), ref[trait])

    other = mi.TraitChat(experiment="live", model_variant="base")     # another container: its own load
    other.warmup.local()
    assert len(cs.LOADS) == n0 + 2


def test_class_local_traits_layers_messages_steering(chat_exp):
    chat = mi.TraitChat(experiment="live", model_variant="base")
    msgs = list(chat.capture_activations_stream.local(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "tell me a story"}],
        system_prompt="be brief", traits="cognitive/honesty", layers="1,2", max_new_tokens=4))
    prompt = msgs[0]
    session = chat.session   # the entered instance's state, reachable as an attribute through Modal
    tok = session.lm.tokenizer
    text, note = format_messages(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                       {"role": "user", "content": "tell me a story"}], "be brief")
    assert prompt["text"] == text and note is None and text.count("<|im_start|>system\nbe brief") == 1
    assert set(prompt["scores"]) == {"cognitive/honesty"} and set(prompt["scores"]["cognitive/honesty"]) == {"1", "2"}
    assert [v["selected_by"] for v in prompt["vectors"]["cognitive/honesty"]] == ["extraction", "layers_arg"]
    ids = prompt["token_ids"] + msgs[-1]["token_ids"]
    for layer in (1, 2):
        close(flatten(msgs, "cognitive/honesty", layer),
              hf_scores(session.lm.model, ids, chat_exp, {"cognitive/honesty": layer})["cognitive/honesty"])

    # a prompt steer with a trait's own (unit) vector at its best layer moves that layer's prompt scores by coef
    base = list(chat.capture_activations_stream.local(prompt="hello", traits=["behavioral/refusal"], max_new_tokens=2))
    steered = list(chat.capture_activations_stream.local(
        prompt="hello", traits=["behavioral/refusal"], max_new_tokens=2,
        steering=[{"trait": "behavioral/refusal", "layer": 2, "coefficient": 2.5, "positions": "prompt"}]))
    assert steered[0]["steering"] == [{"trait": "behavioral/refusal", "layer": 2, "coefficient": 2.5,
                                       "positions": "prompt", "component": "residual"}]
    close(steered[0]["scores"]["behavioral/refusal"]["2"], [s + 2.5 for s in base[0]["scores"]["behavioral/refusal"]["2"]])
    zero = list(chat.capture_activations_stream.local(
        prompt="hello", traits=["behavioral/refusal"], max_new_tokens=2,
        steering=[{"vector": [1.0] * 64, "layer": 1, "coefficient": 0.0}]))
    assert [m.get("scores") for m in zero] == [m.get("scores") for m in base]

    bad = [dict(prompt="x", traits="nope/none"), dict(prompt="x", messages=[{"role": "user", "content": "y"}]),
           dict(prompt="x", max_new_tokens=0), dict(prompt="x", steering=[{"trait": "behavioral/refusal", "layer": 99}]),
           dict(prompt="x", steering=[{"vector": [1.0, 2.0], "layer": 1}]),
           dict(prompt="x", steering=[{"trait": "behavioral/refusal", "layer": 1, "colour": 1}]),
           dict(prompt="x", steering=[{"trait": "behavioral/refusal", "layer": 1, "positions": "middle"}]),
           dict(prompt="x", steering=[{"trait": "behavioral/refusal", "layer": 1, "component": "mlp"}]),
           dict(prompt="x", layers="1,7")]
    for kwargs in bad:
        with pytest.raises(ValueError):
            next(iter(chat.capture_activations_stream.local(**kwargs)))
    with pytest.raises(cs.ChatError, match=r"^steering\[0\]: positions must be all, prompt or response"):
        next(iter(chat.capture_activations_stream.local(prompt="x", steering=[
            {"trait": "behavioral/refusal", "layer": 1, "positions": "middle"}])))


def test_web_app_streams_the_same_items_as_sse(chat_exp):
    from fastapi.testclient import TestClient

    chat = mi.TraitChat(experiment="live", model_variant="base")
    client = TestClient(chat.web.local())
    assert client.get("/info").json()["variant"] == "base"
    direct = list(chat.capture_activations_stream.local(prompt="hello world", max_new_tokens=5))

    def events(resp) -> list[dict]:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in resp.text.split("\n\n") if b.strip()]
        assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
        return [json.loads(b[len("data: "):]) for b in blocks]

    def same(a: list[dict], b: list[dict]) -> None:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            x, y = dict(x), dict(y)
            x.pop("seconds", None), y.pop("seconds", None)
            assert x == y

    same(events(client.get("/stream", params={"prompt": "hello world", "max_new_tokens": 5})), direct)
    same(events(client.post("/stream", json={"prompt": "hello world", "max_new_tokens": 5})), direct)
    assert client.post("/stream", json={"prompt": "x", "colour": 1}).status_code == 400
    resp = client.get("/stream", params={"prompt": "x", "traits": "nope/none"})
    assert resp.status_code == 400 and "nope/none" in resp.json()["detail"]


def test_format_messages_folds_system_where_the_template_rejects_it(zoo):
    from utils.model import ModelLoadError, load_tokenizer

    tok = load_tokenizer(zoo("gemma2"))   # its template raises on a system turn, as Gemma-2's does
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "more"}]
    text, note = format_messages(tok, turns, "be brief")
    assert note and "folded" in note
    assert text == tok.apply_chat_template([{"role": "user", "content": "be brief\n\nhi"}] + turns[1:],
                                           tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos>") and text.count("<bos>") == 1 and text.endswith("<|im_start|>model\n")
    for bad in ([], [{"role": "user"}], "hi"):
        with pytest.raises(ModelLoadError):
            format_messages(tok, bad)
    with pytest.raises(ModelLoadError):
        format_messages(tok, turns, use_chat_template=False)


# ---------------------------------------------------------------------------------------------------
# The --local CLI

def run_cli(args: list[str], env_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRAIT_EXPERIMENTS_DIR=str(env_root), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "inference/modal_inference.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_local_json_end_to_end(chat_exp, zoo):
    root = paths.experiments_root()
    out = run_cli(["--local", "--experiment", "live", "--model-variant", "base", "--prompt", "hello world",
                   "--traits", "behavioral/refusal", "--max-new-tokens", "5", "--json"], root)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [m["type"] for m in lines] == ["prompt"] + ["token"] * lines[-1]["n_tokens"] + ["done"]
    assert out.stderr.strip().splitlines()[-1].startswith(f"streamed {lines[-1]['n_tokens']} tokens")
    lm = load_model(zoo("llama"))
    ids = lines[0]["token_ids"] + lines[-1]["token_ids"]
    layer = BEST["behavioral/refusal"]
    close(flatten(lines, "behavioral/refusal", layer),
          hf_scores(lm.model, ids, chat_exp, {"behavioral/refusal": layer})["behavioral/refusal"])


def test_cli_text_output_and_bad_input(chat_exp, capsys):
    """The same main(argv), in-process: the human-readable lines, and one `error:` line + exit 2 for bad input."""
    assert mi.main(["--local", "--experiment", "live", "--prompt", "hi", "--max-new-tokens", "2",
                    "--steer", "behavioral/refusal:3:2.0:prompt"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prompt: ") and "behavioral/refusal@L2" in out
    assert out.strip().splitlines()[-1].startswith("streamed ")
    for args in (["--local", "--experiment", "live", "--prompt", "x", "--traits", "nope/none"],
                 ["--local", "--experiment", "missing", "--prompt", "x"],
                 ["--local", "--experiment", "live", "--prompt", "x", "--steer", "behavioral/refusal:x:1"],
                 ["--local", "--experiment", "live", "--prompt", "x", "--steer", "behavioral/refusal:9:1"],
                 ["--local", "--experiment", "live"],                      # no --prompt and no --serve
                 ["--experiment", "live", "--serve"],          # the deployed app serves its page at its URL
                 ["--experiment", "live"]):                    # the deployed app: no --prompt and no --warmup
        assert mi.main(args) == 2, args
        cap = capsys.readouterr()
        assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and cap.err.startswith("error: ")
