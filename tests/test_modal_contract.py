"""Contract tests of the two Modal apps against the real Modal SDK (1.6.4), with no network and no account.

What a first real run would have hit (issue 25), each shown failing before its fix:
    1. the Hugging Face secret is attached only when $TRAIT_HF_SECRET names one (a user without a secret deploys)
    2. the chat command after `modal deploy` talks to the deployed app (modal.Cls.from_name), not an ephemeral one
    3. `python inference/modal_batch.py push|pull` (and the other scripts) run without `pip install -e .`
    4. $TRAIT_SCALEDOWN_WINDOW outside Modal's 2-3600 is named by our check and never breaks an import
    5. the README's curl commands follow the 303 redirect Modal answers for a request waiting over 150 s (-L)
And the apps' objects: they build; the image holds the code (and the chat's experiment inputs); the Volume is
version 2; the chat class takes concurrent inputs on at most $TRAIT_MAX_CONTAINERS containers; every flag of
the entrypoints parses through Modal's own click command (CliRunner); `modal run ... --help` shows our help.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest

import inference.modal_common as mc
from tests.helpers import BLOCK_NETWORK

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def run_python(script: str, env: dict | None = None, cwd: Path = REPO, args=()) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRAIT_")}
    base.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", BLOCK_NETWORK + textwrap.dedent(script), *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=180)


# What the apps declare, recorded where Modal's decorators hand it to Modal's function builder (what `modal deploy`
# would send), and the Volumes' from_name arguments.
DECLARED = """
    import json, sys
    import modal, modal._functions as F
    seen, volumes = {}, {}
    real, real_volume = F._Function._from_local, modal.Volume.from_name
    def record(info, app, image, *a, **k):
        seen[info.function_name] = {"secrets": len(k.get("secrets") or []), "max_containers": k.get("max_containers"),
                                    "max_inputs": k.get("max_concurrent_inputs"), "scaledown": k.get("scaledown_window"),
                                    "volumes": sorted(map(str, k.get("volumes") or {})), "gpu": k.get("gpu"),
                                    "image": type(image).__name__}
        return real(info, app, image, *a, **k)
    def volume(name, **k):
        volumes[name] = k.get("version")
        return real_volume(name, **k)
    F._Function._from_local = staticmethod(record)
    modal.Volume.from_name = volume
    import inference.modal_inference as mi, inference.modal_batch as mb
    print(json.dumps({"functions": seen, "volumes": volumes, "torch": "torch" in sys.modules}))
"""


def declared(env: dict | None = None) -> dict:
    out = run_python(DECLARED, env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# 1. the secret

def test_the_hf_secret_is_attached_only_when_configured():
    plain = declared()["functions"]
    assert {name: f["secrets"] for name, f in plain.items()} == {
        "TraitChat.*": 0, "BatchWorker.*": 0, "warm_model_cache": 0, "survey_on_volume": 0,
        "calibration_on_volume": 0, "orchestrate": 0}
    named = declared({"TRAIT_HF_SECRET": "huggingface"})["functions"]
    assert {name: f["secrets"] for name, f in named.items()} == {
        "TraitChat.*": 1, "BatchWorker.*": 1, "warm_model_cache": 1, "survey_on_volume": 1,
        "calibration_on_volume": 0, "orchestrate": 1}       # the merge reads no model
    with pytest.raises(mc.SettingsError, match=r"\$TRAIT_HF_SECRET"):
        mc.ModalSettings.from_env({"TRAIT_HF_SECRET": "my secret!"}).check()


# ---------------------------------------------------------------------------------------------------
# 2. the chat command talks to the deployed app

class FakeMethod:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def remote_gen(self, **kwargs):
        self.calls.append((self.name, kwargs))
        yield {"type": "prompt", "tokens": ["<s>", "hi"], "token_ids": [1, 2], "scores": {}, "vectors": {},
               "model": "m", "variant": "instruct"}
        yield {"type": "token", "token": " there", "token_id": 3, "step": 0, "scores": {"t/x": {"2": 0.5}}}
        yield {"type": "done", "stop_reason": "eos", "n_tokens": 1, "response": " there", "seconds": 0.1,
               "token_ids": [3]}

    def remote(self, **kwargs):
        self.calls.append((self.name, kwargs))
        return {"model": "m", "variant": "instruct"}


def test_the_chat_command_talks_to_the_deployed_app(monkeypatch, capsys):
    import modal

    import inference.modal_inference as mi

    calls = []

    class FakeCls:
        def __call__(self, **params):
            calls.append(("params", params))
            obj = type("Obj", (), {})()
            obj.capture_activations_stream = FakeMethod(calls, "stream")
            obj.warmup = FakeMethod(calls, "warmup")
            return obj

    def from_name(app_name, name, **kw):
        calls.append(("from_name", app_name, name))
        return FakeCls()
    monkeypatch.setattr(modal.Cls, "from_name", from_name)
    assert mi.main(["--prompt", "hi", "--max-new-tokens", "5", "--traits", "t/x"]) == 0
    out = capsys.readouterr().out
    assert calls[0] == ("from_name", "trait-capture", "TraitChat") and calls[1] == ("params", {})
    assert calls[2] == ("stream", {"prompt": "hi", "max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0,
                                   "seed": None, "system_prompt": None, "steering": None, "traits": "t/x",
                                   "layers": None})
    assert "streamed 1 tokens" in out
    calls.clear()                                     # steering and interventions reach the deployed app as --local
    assert mi.main(["--prompt", "hi", "--steer", "t/x:2:4.0:prompt", "--stop-when", "t/x:2:9"]) == 0
    assert calls[2][1]["steering"] == [{"trait": "t/x", "layer": 2, "coefficient": 4.0, "positions": "prompt"}]
    assert calls[2][1]["stop_when"] == ["t/x:2:9"]
    capsys.readouterr()
    # the README's chat command after `modal deploy` is that client, not `modal run` (an ephemeral app)
    section = README[README.index("<!-- section: modal -->"):README.index("<!-- section: modal-batch -->")]
    deploy = section[section.index("modal deploy inference/modal_inference.py"):]
    first_chat = next(line for line in deploy.splitlines() if "--prompt" in line)
    assert first_chat.startswith("python inference/modal_inference.py --prompt"), first_chat


# ---------------------------------------------------------------------------------------------------
# 3. the scripts run without `pip install -e .`

NO_INSTALL = """
    import runpy, sys
    # no editable install: drop its import hook, as a fresh `pip install modal` environment would be
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") and
                        "editable" not in type(f).__module__ and "editable" not in getattr(f, "__name__", "")]
    script = sys.argv[1]
    sys.path[0] = str(__import__("pathlib").Path(script).parent)   # what `python inference/x.py` puts first
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script,args,expect", [
    ("inference/modal_batch.py", ["push", "--help"], "Send config.json"),
    ("inference/modal_batch.py", ["pull", "--help"], "--skip-raw"),
    ("inference/modal_batch.py", ["status", "--help"], "--detach run"),
    ("inference/batch.py", ["--help"], "--backend"),
    ("inference/modal_inference.py", ["--help"], "--local"),
])
def test_scripts_run_without_an_editable_install(tmp_path, script, args, expect):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAIT_") and k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_INSTALL), str(REPO / script), *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout


# ---------------------------------------------------------------------------------------------------
# 4. the scaledown window's range

def test_scaledown_window_outside_modal_range_is_ours_to_name():
    for value in ("0", "1", "3601", "86400"):
        with pytest.raises(mc.SettingsError, match=r"\$TRAIT_SCALEDOWN_WINDOW .*2 to 3600"):
            mc.ModalSettings.from_env({"TRAIT_SCALEDOWN_WINDOW": value}).check()
        assert mc.ModalSettings.from_env({"TRAIT_SCALEDOWN_WINDOW": value}).scaledown_seconds == 300
    for value in ("2", "3600"):
        assert mc.ModalSettings.from_env({"TRAIT_SCALEDOWN_WINDOW": value}).check().scaledown_seconds == int(value)
    # a plain import with an out-of-range window works (tests, CLIs); the modal CLI names the variable
    imported = run_python("import inference.modal_inference as mi, inference.modal_batch; "
                          "print(mi.SETTINGS.scaledown_seconds)", {"TRAIT_SCALEDOWN_WINDOW": "7200"})
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.split()[-1] == "300"
    built = run_python("import modal.cli.entry_point; import inference.modal_inference",
                       {"TRAIT_SCALEDOWN_WINDOW": "7200"})
    assert built.returncode != 0 and "SettingsError: $TRAIT_SCALEDOWN_WINDOW" in built.stderr
    assert "InvalidError" not in built.stderr


# ---------------------------------------------------------------------------------------------------
# 5. the 303 redirect

def test_readme_curl_commands_follow_redirects():
    """Modal answers a web request still waiting after 150 s (a cold container loading a model) with a 303 to a
    result URL; curl without -L prints nothing. Every curl of the README follows it."""
    curls = [line for line in README.splitlines() if re.match(r"\s*curl -", line)]
    assert len(curls) >= 3
    for line in curls:
        assert re.search(r"\s-[A-Za-z]*L", line), line
    section = README[README.index("<!-- section: modal -->"):README.index("<!-- section: modal-batch -->")]
    assert "303" in section and "--warmup" in section


# ---------------------------------------------------------------------------------------------------
# The apps' objects

def test_the_apps_build_with_their_code_and_inputs(experiments, zoo):
    """The image Modal would build: pinned requirements, the code, and for the chat the experiment's inputs; the
    objects each app declares, with the settings they get."""
    from tests.helpers import write_vectors

    exp = experiments("live", {"base": {"model": zoo("llama")}})
    write_vectors("live", hidden=64)
    image = mc.build_image("live", "base", mc.ModalSettings(experiment="live").image_env("A10G"))
    assert type(image).__name__ == "Image"
    mounts = {remote: local for local, remote, _ in mc.image_mounts("live", "base")}
    for sub in ("core", "utils", "inference"):
        assert mounts[f"/root/{sub}"] == REPO / sub
    assert mounts["/root/experiments/live/extraction"] == exp / "extraction"
    assert {remote for _, remote, _ in mc.image_mounts("")} == {"/root/core", "/root/utils", "/root/inference",
                                                                "/root/analysis/assets"}   # the batch image: code

    got = declared({"TRAIT_CHAT_CONCURRENCY": "4", "TRAIT_MAX_CONTAINERS": "2", "TRAIT_SCALEDOWN_WINDOW": "60"})
    fns = got["functions"]
    assert sorted(fns) == ["BatchWorker.*", "TraitChat.*", "calibration_on_volume", "orchestrate", "survey_on_volume",
                           "warm_model_cache"]
    chat = fns["TraitChat.*"]
    assert (chat["max_inputs"], chat["max_containers"], chat["scaledown"]) == (4, 2, 60)   # a second tab: same GPU
    assert chat["volumes"] == ["/models"] and all(f["image"] == "_Image" for f in fns.values())
    assert fns["BatchWorker.*"]["volumes"] == ["/data", "/models"]
    assert got["volumes"] == {"model-cache": None, "trait-experiments": 2}   # the batch Volume is version 2
    assert got["torch"] is False
    defaults = declared()["functions"]["TraitChat.*"]
    assert (defaults["max_inputs"], defaults["max_containers"]) == (8, 1)


def test_the_chat_entrypoint_parses_its_flags_through_modals_click_command(monkeypatch):
    from click.testing import CliRunner
    from modal.cli import run as modal_run

    import inference.modal_inference as mi

    calls = []
    monkeypatch.setattr(modal_run, "run_app", lambda *a, **k: nullcontext())
    monkeypatch.setattr(mi, "TraitChat", lambda **params: type("Obj", (), {
        "capture_activations_stream": FakeMethod(calls, "stream")})())
    command = modal_run._get_click_command_for_local_entrypoint(mi.app, mi.chat)
    obj = {"detach": False, "show_progress": False, "show_timestamps": False, "name": None, "env": None,
           "interactive": False, "result_path": None}
    result = CliRunner().invoke(command, ["--prompt", "hello there", "--max-new-tokens", "7", "--traits", "t/x",
                                          "--temperature", "0.5"], obj=obj, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls == [("stream", {"prompt": "hello there", "max_new_tokens": 7, "traits": "t/x", "temperature": 0.5})]
    assert '" there"' in result.output and "done: 1 tokens, stop eos" in result.output   # printed here
