"""inference/modal_batch.py (many GPUs on Modal), offline: no Modal account, the shards run here (--local).

Oracle: the plain single-process stage runs (generate_responses, capture_raw_activations, project --fused) on
the same experiment; `--local --shards 3` must write the same files (JSON equal apart from dates, tensors and
scores within 1e-5 relative: batch composition changes float summation order), calibration.json included (one
pass over every prompt there, merged shard statistics here).

    the app module imports with the network blocked; --help answers without importing torch
    shard plans: each id once, deterministic (any input order), balanced by tokens on skewed lengths
    a shard that raises is reported with its ids, the other shards' files are complete, the rerun writes only
    the missing files (no file written twice, the others untouched); the worker class loads the model once
    the plan (prompts, tokens, shards, bytes: raw vs fused) and --dry-run; push / pull against a fake Volume
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import inference.capture_raw_activations as capture_mod
import inference.generate_responses as generate_mod
import inference.modal_batch as mb
import inference.project_raw_activations_onto_traits as project_mod
from inference.capture_raw_activations import capture_raw_activations
from inference.generate_responses import generate_responses
from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits
from tests.helpers import BLOCK_NETWORK, write_vectors
from utils import paths
from utils.storage import load_pt

REPO = Path(__file__).resolve().parents[1]
PROMPTS = {"prompts": [
    {"id": 1, "text": "hello"},
    {"id": 2, "text": "the model will refuse to help the user because it is rude and harmful, a long prompt"},
    {"id": 3, "text": "why?"},
    {"id": 10, "text": "write a poem about café 日本 🙂 please, a long one with many words in it"},
    {"id": "b", "text": "what is 42"},
    {"id": 7, "text": "tell me a story about honest code"},
    {"id": 11, "text": "yes or no"},
]}
IDS = ["1", "2", "3", "7", "10", "11", "b"]
VOLATILE = {"capture_date", "projection_date", "date", "computed_by"}   # differ between two runs by design
FLAGS = ["--max-new-tokens", "6", "--quiet"]


@pytest.fixture
def world(tmp_path, monkeypatch, experiments, zoo):
    """Experiment `e` (tiny llama, variant base), prompt set `tiny` (7 prompts), two traits' vectors."""
    root = tmp_path / "datasets"
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(root))
    (root / "inference").mkdir(parents=True)
    (root / "inference" / "tiny.json").write_text(json.dumps(PROMPTS, ensure_ascii=False), encoding="utf-8")
    experiments("e", {"base": {"model": zoo("llama")}})
    write_vectors("e", hidden=64)
    return paths.experiment_dir("e")


def batch(*args: str) -> int:
    return mb.main(["--local", "--experiment", "e", "--prompt-set", "tiny", *FLAGS, *args])


def plain_runs(stages=("generate", "capture", "project")) -> None:
    """The single-process oracle: each stage function once over the whole set."""
    if "generate" in stages:
        generate_responses("e", "tiny", max_new_tokens=6, no_server=True, progress=False)
    if "capture" in stages:
        capture_raw_activations("e", "tiny", progress=False)
    if "project" in stages:
        project_raw_activations_onto_traits("e", prompt_set="tiny", fused=True, progress=False)


def tree(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same(a, b, where: str) -> None:
    """Equal apart from VOLATILE keys; floats and tensors within 1e-5 relative (of the larger magnitude)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        scale = max(float(a.abs().max()) if a.numel() else 0.0, 1e-30)
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * scale, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            if k not in VOLATILE:
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        floats = [x for x in a if isinstance(x, float)]
        scale = max((abs(x) for x in floats), default=0.0)
        for i, (x, y) in enumerate(zip(a, b)):
            if isinstance(x, float) and isinstance(y, (int, float)):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5 * scale), f"{where}[{i}]: {x} vs {y}"
            else:
                assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def assert_same_trees(expected: Path, got: Path) -> int:
    want, have = tree(expected), tree(got)
    assert set(want) == set(have), f"files only in one tree: {sorted(set(want) ^ set(have))}"
    for rel, path in want.items():
        if path.suffix == ".pt":
            assert_same(load_pt(path, mmap=False), load_pt(have[rel], mmap=False), rel)
        else:
            assert_same(json.loads(path.read_text(encoding="utf-8")),
                        json.loads(have[rel].read_text(encoding="utf-8")), rel)
    return len(want)


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file: an atomic rewrite gives a new inode, so an untouched file keeps both."""
    return {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in tree(folder).items()}


# ---------------------------------------------------------------------------------------------------
# The module: no network, no torch for --help

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
            "entrypoint": type(mb.batch).__name__, "volume": mb.DATA_VOLUME,
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
                   "functions": ["calibration_on_volume", "survey_on_volume"], "entrypoint": "LocalEntrypoint",
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


def test_without_local_or_modal_it_says_how_to_run(world, capsys):
    assert mb.main(["--experiment", "e", "--prompt-set", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modal run inference/modal_batch.py" in err[0] and "--local" in err[0]
    assert mb.main(["--local", "--experiment", "e", "--prompt-set", "tiny", "--stages", "generate,viz"]) == 2
    assert "--stages" in capsys.readouterr().err
    assert mb.main(["--local", "--experiment", "e", "--prompt-set", "tiny", "--responses-from", "x"]) == 2
    assert "--responses-from" in capsys.readouterr().err
    assert not (world / "inference").exists()


# ---------------------------------------------------------------------------------------------------
# Shard plans

def test_plan_shards_every_id_once_deterministic_natural_order():
    ids = [str(i) for i in range(1, 40)] + ["a", "b10", "b2"]
    tokens = {i: (len(i) * 37) % 11 + 1 for i in ids}
    shards = mb.plan_shards(ids, tokens, 5)
    flat = [i for s in shards for i in s]
    assert len(shards) == 5 and all(shards) and sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    for s in shards:
        assert s == sorted(s, key=paths.natural_key)
    assert mb.plan_shards(list(reversed(ids)), dict(reversed(list(tokens.items()))), 5) == shards
    assert mb.plan_shards([int(i) for i in ids[:39]] + ids[39:], tokens, 5) == shards   # int ids are their strings
    assert sorted(mb.plan_shards(ids[:3], tokens, 8)) == [["1"], ["2"], ["3"]]   # never an empty shard
    assert mb.plan_shards([], {}, 3) == []
    with pytest.raises(mb.BatchError, match="--shards"):
        mb.plan_shards(ids, tokens, 0)


def test_plan_shards_balances_skewed_lengths():
    """One very long prompt and a long tail: longest-first fills the others around it; round-robin would not."""
    g = torch.Generator().manual_seed(0)
    ids = [str(i) for i in range(200)]
    tokens = {i: int(x) for i, x in zip(ids, torch.randint(1, 60, (200,), generator=g))}
    tokens["0"], tokens["1"] = 2000, 900
    shards = mb.plan_shards(ids, tokens, 8)
    loads = [sum(tokens[i] for i in s) for s in shards]
    ideal = sum(tokens.values()) / 8
    assert max(loads) == 2000                                  # the longest prompt alone bounds the run
    rest = sorted(loads)[:-1]
    assert max(rest) - min(rest) <= 59                          # the others within one tail prompt of each other
    rest_ideal = (sum(tokens.values()) - 2000) / 7
    assert all(abs(load - rest_ideal) <= 60 for load in rest)
    robin = [sum(tokens[i] for i in ids[k::8]) for k in range(8)]
    assert max(robin) - min(robin) > max(rest) - min(rest) and ideal < 2000
    # unknown lengths weigh the mean of the known ones
    half = {i: 10 for i in ids[:100]}
    counts = [len(s) for s in mb.plan_shards(ids, half, 4)]
    assert counts == [50, 50, 50, 50]


# ---------------------------------------------------------------------------------------------------
# Sharded runs equal the single-process runs

def test_local_three_shards_write_the_same_files_as_plain_runs(world, tmp_path, capsys):
    plain_runs()
    plain = tmp_path / "plain_inference"
    shutil.move(str(world / "inference"), plain)
    assert (plain / "base" / "massive_activations" / "calibration.json").is_file()   # computed by the plain run

    assert batch("--shards", "3", "--stages", "generate,capture,project") == 0
    out = capsys.readouterr().out
    assert "generate: 7 prompts written by 3 of 3 shards run" in out
    assert "capture: 7 prompts written by 3 of 3 shards run" in out
    assert "project: 7 prompts written by 3 of 3 shards run" in out
    n = assert_same_trees(plain, world / "inference")
    assert n == 7 + 7 + 7 * 2 + 1          # responses, raw .pt, projections of two traits, calibration
    cal = json.loads((world / "inference/base/massive_activations/calibration.json").read_text())
    assert "merged from 3 shards" in cal["computed_by"] and cal["aggregate"]["n_prompts"] == 7

    before = stamps(world / "inference")     # a rerun of the same command: nothing left, nothing rewritten
    assert batch("--shards", "3", "--stages", "generate,capture,project") == 0
    assert "0 of 0 shards run" in capsys.readouterr().out
    assert stamps(world / "inference") == before


def test_fused_project_with_save_means_over_shards(world, tmp_path):
    """--save-means (the model diff's means files) and an existing calibration: the same files as one process."""
    generate_responses("e", "tiny", max_new_tokens=6, no_server=True, progress=False)
    project_raw_activations_onto_traits("e", prompt_set="tiny", fused=True, save_means=True, progress=False)
    plain = tmp_path / "plain"
    shutil.copytree(world / "inference", plain)
    for d in ("projections", "raw"):
        shutil.rmtree(world / "inference" / "base" / d)
    assert batch("--shards", "3", "--stages", "project", "--save-means") == 0
    assert_same_trees(plain, world / "inference")
    assert len(list((world / "inference/base/raw/means/tiny").glob("*.pt"))) == 7


def test_sampling_uses_one_seed_for_every_shard(world, capsys):
    assert batch("--shards", "3", "--stages", "generate", "--temperature", "0.9") == 0
    out = capsys.readouterr().out
    seed = int(out.split("sampling seed ")[1].split()[0])
    files = tree(paths.responses_dir("e", "base", "tiny"))
    got = {rel: json.loads(p.read_text()) for rel, p in files.items()}
    assert {r["generation"]["seed"] for r in got.values()} == {seed}
    shutil.rmtree(paths.responses_dir("e", "base", "tiny"))
    generate_responses("e", "tiny", max_new_tokens=6, temperature=0.9, seed=seed, no_server=True, progress=False)
    for rel, p in tree(paths.responses_dir("e", "base", "tiny")).items():
        assert json.loads(p.read_text())["token_ids"] == got[rel]["token_ids"], rel


# ---------------------------------------------------------------------------------------------------
# Failures and resume

@contextmanager
def failing_on(monkeypatch, prompt_id: str):
    real = generate_mod.generated_record

    def record(plan, prompt, *a, **k):
        if prompt.id == prompt_id:
            raise RuntimeError(f"injected failure on prompt {prompt_id}")
        return real(plan, prompt, *a, **k)
    monkeypatch.setattr(generate_mod, "generated_record", record)
    yield
    monkeypatch.setattr(generate_mod, "generated_record", real)


def test_a_failed_shard_is_reported_and_the_rerun_writes_only_what_is_missing(world, monkeypatch, capsys):
    opts = mb.BatchOptions("e", "tiny", stages=("generate", "project"), shards=3, max_new_tokens=6, progress=False)
    with failing_on(monkeypatch, "10"):
        summary = mb.run_batch(opts, mb.LocalBackend(opts))
    assert len(summary["failed"]) == 1 and summary["not_run"] == ["project"]
    failed = summary["failed"][0]
    assert "10" in failed["ids"] and "injected failure on prompt 10" in failed["error"]
    assert "RuntimeError" in failed["details"]                         # the traceback comes with it
    err = capsys.readouterr().err
    assert f"FAILED generate shard {failed['shard']} ({mb.ids_text(failed['ids'])})" in err
    assert "FAILED" in mb.format_summary(summary) and "ids " in mb.format_summary(summary)
    written = set(p.stem for p in paths.responses_dir("e", "base", "tiny").glob("*.json"))
    assert set(IDS) - set(failed["ids"]) <= written                    # every other shard is complete
    assert "10" not in written
    assert not (world / "inference" / "base" / "projections").exists()

    before = stamps(world / "inference")
    writes: list[str] = []
    real_write = generate_mod.write_json

    def counting(path, obj, *a, **k):
        writes.append(Path(path).stem)
        return real_write(path, obj, *a, **k)
    monkeypatch.setattr(generate_mod, "write_json", counting)
    summary = mb.run_batch(opts, mb.LocalBackend(opts))
    assert summary["failed"] == []
    gen, proj = summary["stages"]
    assert gen["run"] == 1 and gen["prompts"] == len(set(IDS) - written)          # only the failed shard ran
    assert sorted(writes) == sorted(set(IDS) - written)                            # each missing file once
    after = stamps(world / "inference")
    assert {k: v for k, v in after.items() if k in before} == before              # the others untouched
    assert proj["run"] == 3 and proj["prompts"] == 7
    assert len(list((world / "inference/base/projections").rglob("*.json"))) == 14


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
    opts = mb.BatchOptions("e", "tiny", max_new_tokens=6, no_calibration=True, progress=False)
    obj = mb.BatchWorker(experiment="e")
    shards = mb.plan_shards(IDS, {}, 3)
    for stage in ("generate", "capture", "project"):
        job = mb.stage_job(opts, stage)
        for k, ids in enumerate(shards):
            res = obj.run_shard.local(mb.ShardTask(job, k, tuple(ids)))
            assert res["shard"] == k and res["done"] == len(ids)
    assert len(loads) == 1 and obj.worker.loads == 1
    assert len(list((world / "inference/base/projections").rglob("*.json"))) == 14


# ---------------------------------------------------------------------------------------------------
# The plan

def test_dry_run_prints_the_plan_and_writes_nothing(world, capsys):
    assert batch("--shards", "3", "--stages", "generate,capture,project", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "up to 3 shards" in out and "dry run: nothing launched" in out
    gen = next(line for line in out.splitlines() if line.strip().startswith("generate"))
    assert "7 prompts, 7 to do" in gen and "upper bound" in gen
    cap = next(line for line in out.splitlines() if line.strip().startswith("capture"))
    assert "4 layers x 64 hidden x 1 components x 4 bytes per token" in cap and "generate writes its inputs" in cap
    proj = next(line for line in out.splitlines() if line.strip().startswith("project"))
    assert "fused: 2 traits x 1 vectors" in proj and "a raw capture of the same tokens" in proj
    assert "calibration computed first" in proj
    assert not (world / "inference").exists()


def test_plan_numbers_match_what_the_stages_write(world):
    """Tokens and raw bytes of the exact survey (responses exist) against the files capture then writes."""
    generate_responses("e", "tiny", max_new_tokens=6, no_server=True, progress=False)
    opts = mb.BatchOptions("e", "tiny", stages=("capture", "project"), progress=False)
    backend = mb.LocalBackend(opts)
    cap, proj = mb.survey_all(opts, backend, [mb.stage_job(opts, s) for s in opts.stages])
    assert not cap.estimated and cap.ids == tuple(IDS) and cap.pending == tuple(IDS)
    want_tokens = {p.stem: len(json.loads(p.read_text())["token_ids"])
                   for p in paths.responses_dir("e", "base", "tiny").glob("*.json")}
    assert cap.tokens == want_tokens and proj.tokens == want_tokens
    assert cap.bytes_per_token == 4 * 64 * 4 and cap.raw_bytes_per_token == 4 * 64 * 4
    summary = mb.run_batch(opts, backend)
    activations = sum(want_tokens.values()) * 4 * 64 * 4
    written = summary["stages"][0]["bytes"]
    assert activations <= written <= cap.bytes * 1.5        # the estimate holds the tensors plus small headers
    assert proj.needs_calibration and summary["stages"][1]["calibration"]
    assert 0.5 * proj.bytes <= summary["stages"][1]["bytes"] <= 2 * proj.bytes   # the fused estimate's order


# ---------------------------------------------------------------------------------------------------
# push / pull against a fake Volume (the calls Modal's Volume answers)

class FakeVolume:
    def __init__(self):
        self.files: dict[str, tuple[bytes, int]] = {}
        self.reads = 0

    @contextmanager
    def batch_upload(self, force=False):
        vol = self

        class Batch:
            def put_file(self, local, remote):
                assert force and remote.startswith("/")
                vol.files[remote[1:]] = (Path(local).read_bytes(), 2_000_000_000)
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
        self.reads += 1
        fh.write(self.files[path][0])
        return len(self.files[path][0])


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
    assert mb.push(vol, "e", ["tiny"])["files"] == len(vol.files)
    got = set(vol.files)
    assert "experiments/e/config.json" in got and "datasets/inference/tiny.json" in got
    assert "experiments/e/inference/base/massive_activations/calibration.json" in got
    assert "experiments/e/steering/behavioral/refusal/base/response__5/steering/results.jsonl" in got
    vectors = {p for p in got if "/vectors/" in p}
    assert len(vectors) == 2 * 3 + 2                    # two traits x three layers, and each metadata.json
    assert not any("/activations/" in p or p.endswith("responses.json") for p in got)
    files, notes = mb.push_files("e", ["tiny"])
    assert len(notes) == 1 and "outside the experiment" in notes[0]      # the zoo model is a local folder
    with pytest.raises(mb.BatchError, match="nope"):
        mb.push_files("e", ["nope"])


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
    got = mb.pull(vol, "e", skip_raw=True)
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
    with pytest.raises(mb.BatchError, match="nothing under"):
        mb.pull(vol, "other")


def test_modal_backend_uses_the_gpu_table_and_maps_at_most_1000_inputs(experiments, monkeypatch):
    """Offline: the GPU and containers from the live chat's table; .map in chunks, unordered, exceptions returned."""
    monkeypatch.delenv("TRAIT_GPU", raising=False)
    experiments("big", {"it": {"model": "meta-llama/Llama-3.3-70B-Instruct"}})
    backend = mb.ModalBackend(mb.BatchOptions("big", "s", gpus=8))
    assert (backend.gpu, backend.containers) == ("H100:2", 4)
    assert mb.ModalBackend(mb.BatchOptions("big", "s", gpus=8, gpu="H100")).containers == 8
    assert mb.ModalBackend(mb.BatchOptions("big", "s", gpus=1)).containers == 1
    calls = []

    class FakeMethod:
        def map(self, inputs, order_outputs=True, return_exceptions=False):
            calls.append((len(inputs), order_outputs, return_exceptions))
            return iter(inputs)

    backend.obj = type("Obj", (), {"run_shard": FakeMethod()})()
    assert len(list(backend.map("run_shard", list(range(2500))))) == 2500
    assert calls == [(1000, False, True), (1000, False, True), (500, False, True)]


def test_failures_without_a_shard_name_are_charged_to_the_shards_that_returned_nothing():
    job = mb.StageJob("capture", {"experiment": "e", "prompt_set": "s"})
    tasks = [mb.ShardTask(job, k, (str(k),)) for k in range(3)]
    outputs = [{"stage": "capture", "shard": 1, "ids": ["1"], "done": 1, "bytes": 0, "seconds": 0.1},
               mb.ShardFailed("capture", 2, ("2",), "ValueError: bad"), RuntimeError("container died")]
    import pickle

    again = pickle.loads(pickle.dumps(outputs[1]))           # what comes back from a Modal container
    assert (again.shard, again.ids, again.error) == (2, ("2",), "ValueError: bad")
    results, failed = mb._collect(outputs, tasks, log=False)
    assert [r["shard"] for r in results] == [1]
    assert [(f["shard"], f["ids"], f["error"]) for f in failed] == [
        (0, ["0"], "RuntimeError: container died"), (2, ["2"], "ValueError: bad")]


def test_two_stage_projection_takes_prompt_ids(world):
    """The --prompt-ids added to the projection script for the shards: raw path and fused path alike."""
    plain_runs(("generate", "capture"))
    full = project_raw_activations_onto_traits("e", prompt_set="tiny", progress=False, no_calibration=True)
    assert full["prompts"] == 7
    proj = world / "inference/base/projections"
    want = {rel: json.loads(p.read_text()) for rel, p in tree(proj).items()}
    shutil.rmtree(proj)
    part = project_raw_activations_onto_traits("e", prompt_set="tiny", prompt_ids="10,1", progress=False,
                                               no_calibration=True)
    assert part["prompts"] == 2
    got = tree(proj)
    assert sorted({Path(r).stem for r in got}) == ["1", "10"]
    for rel, p in got.items():
        assert_same(want[rel], json.loads(p.read_text()), rel)
    assert project_mod.main(["--experiment", "e", "--prompt-set", "tiny", "--prompt-ids", "1,99", "--quiet"]) == 2
    assert project_mod.main(["--experiment", "e", "--prompt-set", "tiny", "--prompt-ids", "99", "--fused",
                             "--quiet"]) == 2


def test_push_sends_a_model_folder_named_inside_the_experiment(world, experiments, zoo):
    exp = experiments("rel", {"base": {"model": "models/m"}})
    shutil.copytree(zoo("llama"), exp / "models" / "m")
    (exp / "models" / "m" / "__pycache__").mkdir()
    (exp / "models" / "m" / "__pycache__" / "x.pyc").write_bytes(b"")
    files, notes = mb.push_files("rel")
    sent = {remote for _, remote in files}
    assert notes == [] and "experiments/rel/models/m/config.json" in sent
    assert {r.rsplit("/", 1)[-1] for r in sent if "/models/m/" in r} == {p.name for p in (exp / "models/m").iterdir()
                                                                        if p.is_file()}


def test_cli_exit_status_1_names_the_failed_ids(world, monkeypatch, capsys):
    with failing_on(monkeypatch, "b"):
        assert batch("--shards", "2", "--stages", "generate,capture") == 1
    cap = capsys.readouterr()
    line = cap.out.strip().splitlines()[-1]
    assert "FAILED: 1 shards" in line and "b" in line.split("FAILED")[1] and "not run: capture" in line
    assert "Traceback" in cap.err and "injected failure on prompt b" in cap.err
    assert batch("--shards", "2", "--stages", "generate,capture") == 0
    assert len(list(paths.raw_dir("e", "base", "tiny").glob("*.pt"))) == 7
