"""inference/modal_batch.py (the engine on Modal), offline: no Modal account; Modal's own objects and CLI, no network.

    the app imports with the network blocked (no torch); `modal run ... --help` answers with our flags; every flag
    parses through Modal's own click command for the entrypoint (CliRunner); the worker class loads the model once
    push / pull against a fake Volume (thread pools); the backend's GPU table and .map chunks; the orchestrator's
    progress on the Volume read by `status`; --detach spawns the deployed orchestrator with the run's flags
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

import inference.batch as eng
import inference.capture_raw_activations as capture_mod
import inference.generate_responses as generate_mod
import inference.modal_batch as mb
import inference.project_raw_activations_onto_traits as project_mod
from inference.backends.modal import ModalBackend
from tests.helpers import BATCH_IDS as IDS, BLOCK_NETWORK, batch_world
from utils import paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(tmp_path, monkeypatch, experiments, zoo):
    return batch_world(tmp_path, monkeypatch, experiments, zoo)


class FakeVolume:
    """The calls of modal.Volume that push / pull / status make, on a dict (thread-safe, as the real one is)."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, int]] = {}
        self.reads = 0
        self.batches = 0
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    @contextmanager
    def batch_upload(self, force=False):
        vol = self

        class Batch:
            def put_file(self, local, remote):
                assert force and remote.startswith("/")
                with vol.lock:
                    vol.files[remote[1:]] = (Path(local).read_bytes(), 2_000_000_000)
        with vol.lock:
            vol.batches += 1
        yield Batch()

    def listdir(self, path, recursive=False):
        from modal.exception import NotFoundError
        from modal.volume import FileEntry, FileEntryType

        hits = [FileEntry(p, FileEntryType.FILE, m, len(b)) for p, (b, m) in sorted(self.files.items())
                if p.startswith(path + "/")]
        if not hits:
            raise NotFoundError(path)
        return [FileEntry(path + "/responses", FileEntryType.DIRECTORY, 0, 0)] + hits

    def read_file_into_fileobj(self, path, fh):
        with self.lock:
            self.reads += 1
            self.threads.add(threading.get_ident())
        fh.write(self.files[path][0])
        return len(self.files[path][0])

    def read_file(self, path):
        from modal.exception import NotFoundError

        if path not in self.files:
            raise NotFoundError(path)
        yield self.files[path][0]


def test_app_imports_with_the_network_blocked_and_no_settings():
    script = BLOCK_NETWORK + textwrap.dedent("""
        import json, socket, sys
        import inference.modal_batch as mb
        from modal._partial_function import _PartialFunctionFlags as F, _find_partial_methods_for_user_cls as find
        user_cls = mb.BatchWorker._get_user_cls()
        print(json.dumps({
            "app": mb.app.name, "cls": type(mb.BatchWorker).__name__,
            "enter": sorted(find(user_cls, F.ENTER_POST_SNAPSHOT)),
            "methods": sorted(find(user_cls, F.CALLABLE_INTERFACE)),
            "functions": sorted(n for n in mb.app.registered_functions if "." not in n),
            "entrypoint": type(mb.batch_entrypoint).__name__, "volume": mb.DATA_VOLUME,
            "torch_imported": "torch" in sys.modules,
        }))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAIT_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"app": "trait-batch", "cls": "Cls", "enter": ["load"], "methods": ["calibrate_shard", "run_shard"],
                   "functions": ["calibration_on_volume", "orchestrate", "survey_on_volume", "warm_model_cache"],
                   "entrypoint": "LocalEntrypoint",
                   "volume": "trait-experiments", "torch_imported": False}


def test_help_answers_without_importing_torch():
    script = ("import sys, inference.modal_batch as mb\n"
              "code = mb.main(['--help'])\n"
              "print('TORCH', 'torch' in sys.modules, code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "TORCH False 0"
    assert "modal run inference/modal_batch.py" in out.stdout and "--shards" in out.stdout
    script_run = subprocess.run([sys.executable, str(REPO / "inference" / "modal_batch.py"), "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
    assert script_run.returncode == 0 and "modal volume get" in script_run.stdout


def test_the_worker_class_loads_the_model_once_for_several_shards(world, monkeypatch):
    import utils.model as um

    loads = []
    real = um.load_variant

    def counted(*a, **k):
        loads.append(a)
        return real(*a, **k)
    monkeypatch.setattr(um, "load_variant", counted)
    for mod in (generate_mod, capture_mod, project_mod):   # the stage functions must use the worker's model
        monkeypatch.setattr(mod, "load_variant", lambda *a, **k: pytest.fail("a stage function loaded the model"))
    opts = eng.BatchOptions("e", "tiny", max_new_tokens=6, no_calibration=True, progress=False)
    obj = mb.BatchWorker(experiment="e")
    shards = eng.plan_shards(IDS, {}, 3)
    for stage in ("generate", "capture", "project"):
        job = eng.stage_job(opts, stage)
        for k, ids in enumerate(shards):
            res = obj.run_shard.local(eng.ShardTask(job, k, tuple(ids)))
            assert res["shard"] == k and res["done"] == len(ids)
    assert len(loads) == 1 and obj.worker.loads == 1
    assert len(list((world / "inference/base/projections").rglob("*.json"))) == 14


def test_push_sends_config_vectors_evidence_calibration_and_the_prompt_set(world):
    from tests.helpers import write_steering

    write_steering("e", "behavioral/refusal", "base", "response[:5]", [(2, "probe", 70.0, 80.0)])
    junk = world / "extraction/behavioral/refusal/base/activations/train.pt"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"big")
    (world / "steering/behavioral/refusal/base/response__5/steering/responses.json").write_text("{}")
    cal = paths.calibration_file("e", "base")
    cal.parent.mkdir(parents=True)
    cal.write_text("{}")
    vol = FakeVolume()
    assert mb.push(vol, "e", ["tiny"], threads=4)["files"] == len(vol.files)
    assert vol.batches == 4                              # four batch uploads at once
    got = set(vol.files)
    assert "experiments/e/config.json" in got and "datasets/inference/tiny.json" in got
    assert "experiments/e/inference/base/massive_activations/calibration.json" in got
    assert "experiments/e/steering/behavioral/refusal/base/response__5/steering/results.jsonl" in got
    vectors = {p for p in got if "/vectors/" in p}
    assert len(vectors) == 2 * 3 + 2                    # two traits x three layers, and each metadata.json
    assert not any("/activations/" in p or p.endswith("responses.json") for p in got)
    files, notes = eng.input_files("e", ["tiny"])
    assert len(notes) == 1 and "outside the experiment" in notes[0]      # the zoo model is a local folder
    with pytest.raises(eng.BatchError, match="nope"):
        eng.input_files("e", ["nope"])


def test_pull_brings_outputs_back_and_keeps_newer_local_files(world):
    vol = FakeVolume()
    base = "experiments/e/inference/base"
    vol.files = {f"{base}/responses/tiny/1.json": (b'{"v": "volume"}', 1_000),
                 f"{base}/responses/tiny/2.json": (b'{"v": "volume"}', 3_000_000_000),
                 f"{base}/responses/tiny/3.json": (b'{"v": "volume"}', 1_500_000_000),
                 f"{base}/responses/tiny/.3.json.x.tmp": (b"partial", 1_500_000_000),
                 f"{base}/raw/residual/tiny/1.pt": (b"tensor", 1_500_000_000)}
    local = paths.responses_dir("e", "base", "tiny")
    local.mkdir(parents=True)
    (local / "1.json").write_text('{"v": "local, newer"}')
    (local / "2.json").write_text('{"v": "local, older"}')
    got = mb.pull(vol, "e", skip_raw=True, threads=8)
    assert (got["downloaded"], got["kept_newer"], got["skipped_raw"]) == (2, 1, 1)
    assert json.loads((local / "1.json").read_text())["v"] == "local, newer"
    assert json.loads((local / "2.json").read_text())["v"] == "volume"
    assert json.loads((local / "3.json").read_text())["v"] == "volume"
    assert (local / "3.json").stat().st_mtime == 1_500_000_000 and not list(local.glob(".*"))
    assert not (world / "inference/base/raw").exists()
    reads = vol.reads
    again = mb.pull(vol, "e")                       # a second pull: only what it skipped before
    assert (again["downloaded"], again["kept_newer"]) == (1, 3) and vol.reads == reads + 1
    assert (world / "inference/base/raw/residual/tiny/1.pt").read_bytes() == b"tensor"
    with pytest.raises(eng.BatchError, match="nothing under"):
        mb.pull(vol, "other")


def test_modal_backend_uses_the_gpu_table_and_maps_at_most_1000_inputs(experiments, monkeypatch):
    """Offline: the GPU and containers from the live chat's table; .map in chunks, unordered, exceptions returned."""
    monkeypatch.delenv("TRAIT_GPU", raising=False)
    experiments("big", {"it": {"model": "meta-llama/Llama-3.3-70B-Instruct"}})
    backend = ModalBackend(eng.BatchOptions("big", "s", backend="modal", gpus=8))
    assert (backend.gpu, backend.workers) == ("H100:2", 4)
    assert ModalBackend(eng.BatchOptions("big", "s", backend="modal", gpus=8, gpu="H100")).workers == 8
    assert ModalBackend(eng.BatchOptions("big", "s", backend="modal", gpus=1)).workers == 1
    calls = []

    class FakeMethod:
        def map(self, inputs, order_outputs=True, return_exceptions=False):
            calls.append((len(inputs), order_outputs, return_exceptions))
            return iter(inputs)

    warmed = []

    class FakeFunction:
        def remote(self, *args):
            warmed.append(args)
    backend.obj = type("Obj", (), {"run_shard": FakeMethod()})()
    monkeypatch.setattr(mb, "warm_model_cache", FakeFunction())
    assert len(list(backend.map("run_shard", list(range(2500))))) == 2500
    assert calls == [(1000, False, True), (1000, False, True), (500, False, True)]
    assert warmed == [("big", "")]                      # one container fills the model cache, before the fan-out
    list(backend.map("run_shard", [1]))
    assert len(warmed) == 1


def test_push_sends_a_model_folder_named_inside_the_experiment(world, experiments, zoo):
    exp = experiments("rel", {"base": {"model": "models/m"}})
    shutil.copytree(zoo("llama"), exp / "models" / "m")
    (exp / "models" / "m" / "__pycache__").mkdir()
    (exp / "models" / "m" / "__pycache__" / "x.pyc").write_bytes(b"")
    files, notes = eng.input_files("rel")
    sent = {remote for _, remote in files}
    assert notes == [] and "experiments/rel/models/m/config.json" in sent
    assert {r.rsplit("/", 1)[-1] for r in sent if "/models/m/" in r} == {p.name for p in (exp / "models/m").iterdir()
                                                                        if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Modal's CLI: --help and every flag

def test_modal_run_help_shows_our_flags():
    """`modal run inference/modal_batch.py --help` through Modal's own CLI (no network): our argparse help, not
    Modal's empty one for a *args entrypoint."""
    script = BLOCK_NETWORK + textwrap.dedent("""
        import sys
        sys.argv = ["modal", "run", "inference/modal_batch.py", "--help"]
        from modal.cli.entry_point import entrypoint_cli
        entrypoint_cli()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAIT_")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: modal_batch.py") and "--backend {local,ray,modal}" in out.stdout
    assert "--detach" in out.stdout and "modal volume get" in out.stdout


def sample_argv(parser) -> tuple[list[str], dict]:
    """A value for every flag of the parser (as a user would type it) and the BatchOptions field it must reach."""
    import argparse

    argv, want = [], {}
    for action in parser._actions:
        flag = max(action.option_strings, key=len) if action.option_strings else None
        if flag in (None, "--help", "--local", "--backend", "--quiet", "--detach", "--load-in-4bit"):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
            want[action.dest] = True
        elif action.type is int:
            argv += [flag, "3"]
            want[action.dest] = 3
        elif action.type is float:
            argv += [flag, "0.5"]
            want[action.dest] = 0.5
        else:
            value = {"--stages": "generate,capture,project", "--responses-from": None}.get(flag, f"v-{action.dest}")
            if value is None:
                continue
            argv += [flag, value]
            want[action.dest] = value
    return argv, want


def test_every_flag_parses_through_modals_click_command(monkeypatch):
    """Modal's click command for our entrypoint (built as `modal run` builds it) passes every flag to argparse."""
    from click.testing import CliRunner
    from modal.cli import run as modal_run

    seen = []

    def fake_run_cli(ns, on_modal=False, argv=()):
        seen.append((eng.BatchOptions.from_args(ns), on_modal, list(argv)))
        return {"dry_run": True, "stages": [], "failed": [], "not_run": []}
    monkeypatch.setattr(eng, "run_cli", fake_run_cli)
    monkeypatch.setattr(modal_run, "run_app", lambda *a, **k: nullcontext())
    command = modal_run._get_click_command_for_local_entrypoint(mb.app, mb.batch_entrypoint)
    obj = {"detach": False, "show_progress": False, "show_timestamps": False, "name": None, "env": None,
           "interactive": False, "result_path": None}
    argv, want = sample_argv(mb.build_modal_parser())
    # the ray flags belong to --backend ray; the modal ones to modal: check each backend's own
    ray_flags = {"workers", "gpus_per_worker", "cpus_per_worker", "ray_address", "ray_collect"}
    for backend, drop in (("modal", ray_flags), ("ray", {"gpus", "gpu", "timeout"})):
        args, expect = [], {k: v for k, v in want.items() if k not in drop}
        it = iter(argv)
        for a in it:
            dest = a[2:].replace("-", "_")
            dest = {"capture_layers": "capture_layers"}.get(dest, dest)
            takes_value = dest in want and want[dest] is not True
            value = next(it) if takes_value else None
            if dest not in drop:
                args += [a] + ([value] if value is not None else [])
        if backend == "ray":
            args = ["--backend", "ray", *args]
        result = CliRunner().invoke(command, args, obj=obj, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        opts, on_modal, passed = seen.pop()
        assert on_modal and passed[:2] == (["--backend", "modal"] if backend == "modal" else ["--backend", "ray"])
        assert opts.backend == backend
        for dest, value in expect.items():
            got = getattr(opts, dest)
            assert got == (tuple(value.split(",")) if dest == "stages" else value), (dest, got, value)


# ---------------------------------------------------------------------------------------------------
# The orchestrator, status and --detach

def test_the_orchestrator_writes_progress_that_status_reads(world, monkeypatch, tmp_path, capsys):
    """orchestrate(argv) as Modal runs it (.local(): the same function body), with the local backend standing in
    for the containers; its status file read back through the Volume's read_file, as `status` does."""
    from inference.backends.local import LocalBackend

    monkeypatch.setattr(mb, "DATA_DIR", str(tmp_path / "volume"))
    monkeypatch.setattr("inference.backends.modal.ModalBackend", LocalBackend)
    argv = ["--backend", "modal", "--experiment", "e", "--prompt-set", "tiny", "--stages", "generate", "--shards", "3",
            "--max-new-tokens", "2", "--limit", "3", "--quiet"]
    import warnings

    warnings.filterwarnings("ignore", message=".*executing locally.*")
    summary = mb.orchestrate.local(argv)
    assert summary["failed"] == [] and summary["stages"][0]["prompts"] == 3
    status_file = tmp_path / "volume" / mb.STATUS_DIR / "e.json"
    vol = FakeVolume()
    vol.files[f"{mb.STATUS_DIR}/e.json"] = (status_file.read_bytes(), 0)
    state = mb.read_status(vol, "e")
    assert state["state"] == "done" and state["argv"] == argv
    assert state["stages"] == [{"stage": "generate", "shards": 3, "run": 3, "finished": 3, "prompts": 3,
                                "failed": []}]
    text = mb.format_transfer(state)
    assert "e: done" in text and "generate: 3 of 3 shards finished (3 in all), 3 prompts written" in text
    assert "generate: 3 prompts written by 3 of 3 shards run" in text
    with pytest.raises(eng.BatchError, match="no run of --experiment other"):
        mb.read_status(vol, "other")


def test_detach_spawns_the_deployed_orchestrator_with_the_runs_flags(world, monkeypatch, capsys):
    import modal

    spawned = []

    class FakeFunction:
        def spawn(self, argv):
            spawned.append(argv)
            return type("Call", (), {"object_id": "fc-123"})()
    monkeypatch.setattr(modal.Function, "from_name", lambda app, name, **k: (
        spawned.append((app, name)) or FakeFunction()))
    assert mb.main(["--experiment", "e", "--prompt-set", "tiny", "--gpus", "4", "--detach"]) == 0
    out = capsys.readouterr().out
    assert spawned == [("trait-batch", "orchestrate"),
                       ["--backend", "modal", "--experiment", "e", "--prompt-set", "tiny", "--gpus", "4"]]
    assert "fc-123" in out and "modal_batch.py status --experiment e" in out
    assert not (world / "inference").exists()


def test_the_cache_warm_up_downloads_hub_weights_once_and_skips_local_folders(world, monkeypatch, tmp_path):
    import warnings

    import huggingface_hub

    warnings.filterwarnings("ignore", message=".*executing locally.*")
    got = mb.warm_model_cache.local("e")            # the zoo model is a local folder: nothing to download
    assert got["variant"] == "base" and got["fetched"] == []
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, **k: calls.append((ref, k)))
    lora = tmp_path / "lora"
    lora.mkdir()
    assert mb.download_weights(["meta-llama/Llama-3.3-70B-Instruct", str(lora), None]) == [
        "meta-llama/Llama-3.3-70B-Instruct"]
    assert len(calls) == 1 and "*.safetensors" in calls[0][1]["allow_patterns"]


def test_modal_batch_py_keeps_local_as_an_alias(world, capsys):
    """`python inference/modal_batch.py --local ...` (the old spelling) is trait-batch --backend local; without it
    the file's backend is modal, which runs inside `modal run` (or --detach on the deployed app)."""
    assert mb.main(["--local", "--experiment", "e", "--prompt-set", "tiny", "--shards", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "here, shards one after another; up to 3 shards" in out and "dry run: nothing launched" in out
    assert mb.main(["--experiment", "e", "--prompt-set", "tiny"]) == 2
    assert "modal run inference/modal_batch.py" in capsys.readouterr().err
    assert not (world / "inference").exists()
