"""inference/batch.py (the batch engine) on the local backend: shard plans, sharded runs equal one process, resume.

Oracle: the plain single-process stage runs (generate_responses, capture_raw_activations, project --fused) on
the same experiment; `--backend local --shards 3` must write the same files (JSON equal apart from dates, tensors
and scores within 1e-5 relative: batch composition changes float summation order), calibration.json included
(one pass over every prompt there, merged shard statistics here).

    shard plans: each id once, deterministic (any input order), balanced by tokens on skewed lengths
    a shard that raises is reported with its ids, the other shards' files are complete, the rerun writes only
    the missing files (no file written twice, the others untouched)
    the plan (prompts, tokens, shards, bytes: raw vs fused) and --dry-run; bad flags are one line, exit 2
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import inference.batch as eng
import inference.generate_responses as generate_mod
import inference.project_raw_activations_onto_traits as project_mod
from inference.backends.local import LocalBackend
from inference.generate_responses import generate_responses
from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits
from tests.helpers import (BATCH_IDS as IDS, assert_same, assert_same_trees, batch_world, plain_batch_runs as plain_runs,
                           stamps, tree)
from utils import paths

FLAGS = ["--max-new-tokens", "6", "--quiet"]


@pytest.fixture
def world(tmp_path, monkeypatch, experiments, zoo):
    return batch_world(tmp_path, monkeypatch, experiments, zoo)


def batch(*args: str) -> int:
    return eng.main(["--backend", "local", "--experiment", "e", "--prompt-set", "tiny", *FLAGS, *args])


# ---------------------------------------------------------------------------------------------------
def test_bad_flags_are_one_line_and_nothing_is_written(world, capsys):
    base = ["--experiment", "e", "--prompt-set", "tiny"]
    assert eng.main(["--backend", "modal", *base]) == 2          # modal runs inside `modal run`
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modal run inference/modal_batch.py" in err[0] and "--local" in err[0]
    for args, flag in ((["--local", "--stages", "generate,viz"], "--stages"),
                       (["--local", "--responses-from", "x"], "--responses-from"),
                       (["--workers", "2"], "--workers"), (["--ray-collect"], "--ray-collect"),
                       (["--backend", "ray", "--workers", "0"], "--workers"),
                       (["--backend", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker"),
                       (["--detach"], "--detach"), (["--backend", "slurm"], "--backend")):
        assert eng.main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], (args, err)
    assert not (world / "inference").exists()


def test_help_imports_neither_torch_ray_nor_modal():
    import subprocess
    import sys

    script = ("import sys, inference.batch as b\n"
              "code = b.main(['--help'])\n"
              "print('IMPORTED', sorted(m for m in ('torch', 'ray', 'modal') if m in sys.modules), code)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED [] 0"
    assert "--backend {local,ray,modal}" in out.stdout and "--ray-collect" in out.stdout


def test_plan_shards_every_id_once_deterministic_natural_order():
    ids = [str(i) for i in range(1, 40)] + ["a", "b10", "b2"]
    tokens = {i: (len(i) * 37) % 11 + 1 for i in ids}
    shards = eng.plan_shards(ids, tokens, 5)
    flat = [i for s in shards for i in s]
    assert len(shards) == 5 and all(shards) and sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    for s in shards:
        assert s == sorted(s, key=paths.natural_key)
    assert eng.plan_shards(list(reversed(ids)), dict(reversed(list(tokens.items()))), 5) == shards
    assert eng.plan_shards([int(i) for i in ids[:39]] + ids[39:], tokens, 5) == shards   # int ids are their strings
    assert sorted(eng.plan_shards(ids[:3], tokens, 8)) == [["1"], ["2"], ["3"]]   # never an empty shard
    assert eng.plan_shards([], {}, 3) == []
    with pytest.raises(eng.BatchError, match="--shards"):
        eng.plan_shards(ids, tokens, 0)


def test_plan_shards_balances_skewed_lengths():
    """One very long prompt and a long tail: longest-first fills the others around it; round-robin would not."""
    g = torch.Generator().manual_seed(0)
    ids = [str(i) for i in range(200)]
    tokens = {i: int(x) for i, x in zip(ids, torch.randint(1, 60, (200,), generator=g))}
    tokens["0"], tokens["1"] = 2000, 900
    shards = eng.plan_shards(ids, tokens, 8)
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
    counts = [len(s) for s in eng.plan_shards(ids, half, 4)]
    assert counts == [50, 50, 50, 50]


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
    opts = eng.BatchOptions("e", "tiny", stages=("generate", "project"), shards=3, max_new_tokens=6, progress=False)
    with failing_on(monkeypatch, "10"):
        summary = eng.run_batch(opts, LocalBackend(opts))
    assert len(summary["failed"]) == 1 and summary["not_run"] == ["project"]
    failed = summary["failed"][0]
    assert "10" in failed["ids"] and "injected failure on prompt 10" in failed["error"]
    assert "RuntimeError" in failed["details"]                         # the traceback comes with it
    err = capsys.readouterr().err
    assert f"FAILED generate shard {failed['shard']} ({eng.ids_text(failed['ids'])})" in err
    assert "FAILED" in eng.format_summary(summary) and "ids " in eng.format_summary(summary)
    written = set(p.stem for p in paths.responses_dir("e", "base", "tiny").glob("*.json"))
    assert set(IDS) - set(failed["ids"]) <= written                    # every other shard is complete
    assert "10" not in written
    assert not (world / "inference" / "base" / "projections").exists()

    before = stamps(world / "inference")
    writes: list[str] = []
    real_write = generate_mod.write_response

    def counting(path, obj, *a, **k):
        writes.append(Path(path).stem)
        return real_write(path, obj, *a, **k)
    monkeypatch.setattr(generate_mod, "write_response", counting)
    summary = eng.run_batch(opts, LocalBackend(opts))
    assert summary["failed"] == []
    gen, proj = summary["stages"]
    assert gen["run"] == 1 and gen["prompts"] == len(set(IDS) - written)          # only the failed shard ran
    assert sorted(writes) == sorted(set(IDS) - written)                            # each missing file once
    after = stamps(world / "inference")
    assert {k: v for k, v in after.items() if k in before} == before              # the others untouched
    assert proj["run"] == 3 and proj["prompts"] == 7
    assert len(list((world / "inference/base/projections").rglob("*.json"))) == 14


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
    opts = eng.BatchOptions("e", "tiny", stages=("capture", "project"), progress=False)
    backend = LocalBackend(opts)
    cap, proj = eng.survey_all(opts, backend, [eng.stage_job(opts, s) for s in opts.stages])
    assert not cap.estimated and cap.ids == tuple(IDS) and cap.pending == tuple(IDS)
    want_tokens = {p.stem: len(json.loads(p.read_text())["token_ids"])
                   for p in paths.responses_dir("e", "base", "tiny").glob("*.json")}
    assert cap.tokens == want_tokens and proj.tokens == want_tokens
    assert cap.bytes_per_token == 4 * 64 * 4 and cap.raw_bytes_per_token == 4 * 64 * 4
    summary = eng.run_batch(opts, backend)
    activations = sum(want_tokens.values()) * 4 * 64 * 4
    written = summary["stages"][0]["bytes"]
    assert activations <= written <= cap.bytes * 1.5        # the estimate holds the tensors plus small headers
    assert proj.needs_calibration and summary["stages"][1]["calibration"]
    assert 0.5 * proj.bytes <= summary["stages"][1]["bytes"] <= 2 * proj.bytes   # the fused estimate's order


def test_failures_without_a_shard_name_are_charged_to_the_shards_that_returned_nothing():
    job = eng.StageJob("capture", {"experiment": "e", "prompt_set": "s"})
    tasks = [eng.ShardTask(job, k, (str(k),)) for k in range(3)]
    outputs = [{"stage": "capture", "shard": 1, "ids": ["1"], "done": 1, "bytes": 0, "seconds": 0.1},
               eng.ShardFailed("capture", 2, ("2",), "ValueError: bad"), RuntimeError("container died")]
    import pickle

    again = pickle.loads(pickle.dumps(outputs[1]))           # what comes back from a Modal container
    assert (again.shard, again.ids, again.error) == (2, ("2",), "ValueError: bad")
    results, failed = eng._collect(outputs, tasks, log=False)
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


def test_cli_exit_status_1_names_the_failed_ids(world, monkeypatch, capsys):
    with failing_on(monkeypatch, "b"):
        assert batch("--shards", "2", "--stages", "generate,capture") == 1
    cap = capsys.readouterr()
    line = cap.out.strip().splitlines()[-1]
    assert "FAILED: 1 shards" in line and "b" in line.split("FAILED")[1] and "not run: capture" in line
    assert "Traceback" in cap.err and "injected failure on prompt b" in cap.err
    assert batch("--shards", "2", "--stages", "generate,capture") == 0
    assert len(list(paths.raw_dir("e", "base", "tiny").glob("*.pt"))) == 7


def test_readme_batch_commands_parse():
    """Every trait-batch / modal_batch.py command of the README's batch section parses with today's flags."""
    import shlex

    from inference import modal_batch as mb

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("<!-- section: modal-batch -->"):readme.index("<!-- section: report -->")]
    blocks = section.split("```bash")[1:]
    lines = []
    for block in blocks:
        text = block.split("```")[0].replace("\\\n", " ")
        lines += [line.split("#")[0].strip() for line in text.splitlines() if line.strip()]
    checked = 0
    for line in lines:
        if "trait-batch" not in line and "inference/modal_batch.py" not in line:
            continue
        words = shlex.split(line)
        words = [w for w in words if "=" not in w or w.startswith("--")]   # VAR=value prefixes
        if not words:
            continue
        if words[0].endswith("trait-batch"):
            args, parser = words[1:], eng.build_parser()
        elif words[1:2] == ["inference/modal_batch.py"]:
            args = words[2:]
            parser = mb.build_transfer_parser(args[0]) if args[0] in eng.MODAL_COMMANDS else mb.build_modal_parser()
            args = args[1:] if args[0] in eng.MODAL_COMMANDS else mb.with_backend(args)
        elif words[:3] == [words[0], "run", "inference/modal_batch.py"] and words[0].endswith("modal"):
            args, parser = mb.with_backend(words[3:]), mb.build_modal_parser()
        else:
            continue
        ns = parser.parse_args(args)
        if hasattr(ns, "stages"):
            eng.BatchOptions.from_args(ns)
        checked += 1
    assert checked >= 8


def test_a_backend_whose_package_is_missing_is_one_line(world, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)                      # `import ray` now fails
    monkeypatch.delitem(sys.modules, "inference.backends.ray", raising=False)
    assert batch("--backend", "ray", "--stages", "generate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--backend ray needs the ray package" in err[0] and "ray==2.60.0" in err[0]
    assert not (world / "inference").exists()
