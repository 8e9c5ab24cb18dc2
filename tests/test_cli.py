"""utils/cli.py as users meet it: real scripts run as subprocesses, the way the README runs them.

    a bug (RuntimeError, a plain ValueError) inside a stage keeps its traceback and exits non-zero
    a TraitError inside a stage, or a bad flag, is exactly one `error:` line and exit status 2
    every console script and every `python <script>.py` answers --help with exit status 0
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONSOLE_SCRIPTS = ["trait-generate", "trait-capture", "trait-project", "trait-viz", "trait-compare",
                   "trait-per-token-diff", "trait-extract", "trait-chat", "trait-server", "trait-report", "trait-batch",
                   "trait-index", "trait-spans", "trait-card", "trait-steer-eval"]
SCRIPTS = ["inference/generate_responses.py", "inference/capture_raw_activations.py",
           "inference/project_raw_activations_onto_traits.py", "inference/extract_viz.py",
           "inference/model_server.py", "inference/modal_inference.py",
           "analysis/model_diff/compare_variants.py", "analysis/model_diff/per_token_diff.py",
           "extraction/extract_vectors.py", "inference/modal_batch.py", "inference/batch.py", "analysis/report.py",
           "analysis/scores.py", "analysis/spans.py", "extraction/vector_card.py", "steering/run_steering_eval.py"]


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


@pytest.fixture
def world(tmp_path, zoo):
    """An experiment with the zoo llama and a two-prompt set, in scratch folders (passed by environment)."""
    exps, data = tmp_path / "experiments", tmp_path / "datasets"
    (exps / "e").mkdir(parents=True)
    (exps / "e" / "config.json").write_text(json.dumps({"model_variants": {"base": {"model": zoo("llama")}}}))
    (data / "inference").mkdir(parents=True)
    (data / "inference" / "two.json").write_text(json.dumps({"prompts": [{"id": 1, "text": "hello"},
                                                                         {"id": 2, "text": "why?"}]}))
    return {"TRAIT_EXPERIMENTS_DIR": str(exps), "TRAIT_DATASETS_DIR": str(data), "out": exps / "e" / "inference"}


def _generate_with(tmp_path: Path, world: dict, patch: str) -> subprocess.CompletedProcess:
    """`python inference/generate_responses.py ...` with `patch` applied at interpreter start (sitecustomize)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(textwrap.dedent(patch))
    env = _env(PYTHONPATH=str(hook), TRAIT_EXPERIMENTS_DIR=world["TRAIT_EXPERIMENTS_DIR"],
               TRAIT_DATASETS_DIR=world["TRAIT_DATASETS_DIR"])
    return subprocess.run([sys.executable, "inference/generate_responses.py", "--experiment", "e", "--prompt-set",
                           "two", "--max-new-tokens", "3", "--no-server", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_bug_inside_the_stage_keeps_its_traceback(tmp_path, world):
    # generation itself breaks (as a CUDA device-side assert would): not the user's input, so not one line
    r = _generate_with(tmp_path, world, """
        import core.generation as g

        def broken(*args, **kwargs):
            raise RuntimeError("device-side assert triggered (a bug, not bad input)")
        g.generate_in_batches = broken  # before the script runs, so its `from core.generation import` gets this
    """)
    assert r.returncode not in (0, 2), r.stderr
    assert "Traceback (most recent call last)" in r.stderr
    assert "RuntimeError: device-side assert triggered (a bug, not bad input)" in r.stderr
    assert "error: device-side" not in r.stderr
    assert not list(world["out"].rglob("*.json"))  # it failed before any file was written

    # a plain ValueError from a library is a bug too: only the project's TraitError becomes a line
    r = _generate_with(tmp_path, world, """
        import utils.prompts as p

        def broken(name):
            raise ValueError("a library's ValueError")
        p.load_prompt_set = broken
    """)
    assert r.returncode not in (0, 2) and "Traceback" in r.stderr and "ValueError: a library's ValueError" in r.stderr


def test_a_trait_error_inside_the_stage_is_one_line_and_exit_2(tmp_path, world):
    r = _generate_with(tmp_path, world, """
        import utils.prompts as p

        def refused(name):
            raise p.PromptSetError("prompt set 'two' refused deep inside the stage")
        p.load_prompt_set = refused
    """)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: prompt set 'two' refused deep inside the stage\n"
    assert r.stdout == ""
    # and a bad flag value checked by the stage: the same shape, nothing written
    r = _generate_with(tmp_path, world, "")
    assert r.returncode == 0, r.stderr  # (the unpatched run works, so the cases above prove something)
    assert sorted(p.name for p in world["out"].rglob("*.json")) == ["1.json", "2.json"]
    bad = subprocess.run([sys.executable, "inference/generate_responses.py", "--experiment", "e", "--prompt-set",
                          "two", "--limit", "-1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(TRAIT_EXPERIMENTS_DIR=world["TRAIT_EXPERIMENTS_DIR"],
                                  TRAIT_DATASETS_DIR=world["TRAIT_DATASETS_DIR"]))
    assert bad.returncode == 2 and bad.stderr == "error: --limit must be >= 0, got -1\n"
    usage = subprocess.run([sys.executable, "inference/generate_responses.py", "--experiment", "e"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, env=_env())
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--prompt-set" in usage.stderr


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_console_script_help(name):
    exe = BIN / name
    assert exe.exists(), f"{exe} missing: is the package installed (pip install -e .)?"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300, env=_env(), cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "example" in r.stdout.lower(), r.stdout[:300]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300, env=_env(),
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "example" in r.stdout.lower(), r.stdout[:300]


def test_every_script_is_in_the_help_list():
    """A new script with a __main__ guard under inference/, analysis/, analysis/model_diff/ or extraction/ gets checked too."""
    found = {str(p.relative_to(REPO)) for d in ("inference", "analysis", "analysis/model_diff", "extraction", "steering")
             for p in (REPO / d).glob("*.py") if '__name__ == "__main__"' in p.read_text(encoding="utf-8")}
    assert found <= set(SCRIPTS), sorted(found - set(SCRIPTS))
