"""The capture CLI: every bad input (one stderr line naming it, exit 2, nothing written), the real script in a
subprocess, and a run killed with SIGKILL that resumes with --skip-existing to the files of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inference.capture_raw_activations import main
from tests.helpers import write_responses
from utils import paths
from utils.storage import load_pt, write_json

SCRIPT = paths.REPO_ROOT / "inference" / "capture_raw_activations.py"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def exp(zoo, experiments, tmp_path, monkeypatch):
    """Experiment `e`: variant base (llama) with 4 responses in set `s`; prompt set `known` exists, no responses."""
    experiments("e", {"base": {"model": zoo("llama")}, "other": {"model": zoo("llama")}})
    write_responses("e", "base", "s", zoo("llama"))
    datasets = tmp_path / "datasets"
    (datasets / "inference").mkdir(parents=True)
    (datasets / "inference" / "known.json").write_text(json.dumps({"prompts": [{"id": 1, "text": "hi"}]}))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(datasets))
    return Path(os.environ["TRAIT_EXPERIMENTS_DIR"])


def _edit_response(pid: str, **changes) -> None:
    f = paths.response_file("e", "base", "s", pid)
    rec = json.loads(f.read_text())
    rec.update(changes)
    write_json(f, rec)


def _truncate(pid: str) -> None:
    f = paths.response_file("e", "base", "s", pid)
    f.write_text(f.read_text()[: len(f.read_text()) // 2])


BAD_INPUTS = {
    "unknown experiment": (["--experiment", "nope"], None, "unknown experiment 'nope'"),
    "unknown variant": (["--model-variant", "ghost"], None, "unknown model variant 'ghost'"),
    "unknown --responses-from": (["--responses-from", "ghost"], None, "unknown model variant 'ghost'"),
    "unknown prompt set": (["--prompt-set", "nope"], None, "unknown prompt set 'nope'"),
    "missing responses folder": (["--prompt-set", "known"], None, "generate_responses.py"),
    "malformed json": ([], lambda: paths.response_file("e", "base", "s", "2").write_text("{not json"), "2.json"),
    "truncated json": ([], lambda: _truncate("3"), "3.json"),
    "prompt_end out of range": ([], lambda: _edit_response("2", prompt_end=999), "'prompt_end' = 999"),
    "token id outside vocab": ([], lambda: _edit_response("4", token_ids=[1, 2, 5000], prompt_end=1), "token id 5000"),
    "bad --layers": (["--layers", "2-9"], None, "--layers '2-9'"),
    "empty --layers": (["--layers", ""], None, "--layers ''"),
    "unknown component": (["--components", "residual,attn"], None, "unknown component 'attn'"),
    "both quantization flags": (["--load-in-8bit", "--load-in-4bit"], None, "--load-in-8bit and --load-in-4bit"),
    "bad --dtype": (["--dtype", "int8"], None, "--dtype 'int8'"),
    "bad --limit": (["--limit", "x"], None, "--limit"),
    "missing --prompt-ids": (["--prompt-ids", "1,77"], None, "--prompt-ids: no response for id(s) 77"),
    "bad --batch-size": (["--batch-size", "0"], None, "--batch-size must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_nothing_written(case, exp, capsys):
    extra, setup, expected = BAD_INPUTS[case]
    if setup:
        setup()
    before = tree(exp)
    argv = ["--experiment", "e", "--prompt-set", "s"] + extra
    # later flags win in argparse, so the case's --experiment / --prompt-set replace the defaults
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert expected in err, err
    if case == "token id outside vocab":
        assert "4.json" in err
    assert tree(exp) == before  # nothing written: no raw folder, no temporary file


def run_cli(args: list[str], slow_write: float = 0.0) -> subprocess.Popen:
    # the same thread count as this process, so that its sums run in the same order as an in-process run
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    if not slow_write:
        cmd = [sys.executable, str(SCRIPT)] + args
    else:  # the real main(), with a pause before each file write so the run can be killed mid-way
        code = ("import sys, time\n"
                "import inference.capture_raw_activations as c, utils.storage as st\n"
                "real = st.write_pt\n"
                f"st.write_pt = lambda path, obj: (time.sleep({slow_write}), real(path, obj))[1]\n"
                f"sys.exit(c.main({args!r}))\n")
        cmd = [sys.executable, "-c", code]
    return subprocess.Popen(cmd, cwd=paths.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_help_has_description_and_example():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=paths.REPO_ROOT, capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0
    assert "prefill" in out.stdout and "examples:" in out.stdout and "--responses-from" in out.stdout
    for flag in ("--capture-mlp", "--no-server", "--output-suffix", "--max-batch-tokens", "--load-in-4bit"):
        assert flag in out.stdout


def test_killed_run_resumes_to_the_files_of_an_uninterrupted_run(zoo, experiments, capsys):
    model_dir = zoo("qwen2")
    experiments("e", {"base": {"model": model_dir}})
    pairs = [(f"prompt {i}: tell me about code", "a short answer " * (1 + i % 3)) for i in range(12)]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs)
    common = ["--experiment", "e", "--prompt-set", "s", "--batch-size", "1", "--capture-mlp", "--layers", "1,3"]

    assert main(common + ["--output-suffix", "ref", "--no-server"]) == 0  # the uninterrupted run
    out, err = capsys.readouterr()
    assert out.startswith(f"captured {len(recs)} prompts, skipped 0 existing") and len(out.splitlines()) == 1
    assert err.count("--no-server") == 1

    folder = paths.raw_dir("e", "base", "s")
    victim = run_cli(common, slow_write=0.3)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("*.pt"))) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    done = {p.stem for p in folder.glob("*.pt")}
    assert 3 <= len(done) < len(recs)
    for p in folder.glob("*.pt"):  # whatever a kill leaves is a complete file
        assert set(load_pt(p)) == {"prompt", "response", "metadata"}

    assert main(common + ["--skip-existing"]) == 0
    out, _ = capsys.readouterr()
    assert f"captured {len(recs) - len(done)} prompts, skipped {len(done)} existing" in out
    for pid in recs:
        a = load_pt(paths.raw_file("e", "base", "s", pid))
        b = load_pt(paths.raw_file("e", "base", "s", pid, "ref"))
        for side in ("prompt", "response"):
            assert a[side]["token_ids"] == b[side]["token_ids"] and a[side]["text"] == b[side]["text"]
            assert sorted(a[side]["activations"]) == sorted(b[side]["activations"]) == [1, 3]
            for L, comps in b[side]["activations"].items():
                assert set(a[side]["activations"][L]) == set(comps) == {"residual", "attn_contribution",
                                                                       "mlp_contribution"}
                for c, t in comps.items():
                    assert torch.equal(a[side]["activations"][L][c], t), (pid, side, L, c)


def test_a_run_imports_peft_only_for_a_lora_variant_and_no_other_backend(zoo, zoo_lora, experiments):
    """Nothing a run does not need is imported: peft only for a LoRA variant, bitsandbytes only for
    --load-in-8bit/4bit or through peft (`import peft` imports it itself), never modal / fastapi / uvicorn."""
    experiments("e", {"base": {"model": zoo("llama")}, "lora": {"model": zoo("llama"), "lora": zoo_lora("llama")}})
    write_responses("e", "base", "s", zoo("llama"), pairs=[("hi", "yes")])
    optional = ("bitsandbytes", "peft", "modal", "fastapi", "uvicorn")

    def imported(args: list[str]) -> list[str]:
        code = ("import json, sys\nimport inference.capture_raw_activations as c\n"
                f"rc = c.main({args!r})\n"
                f"print(json.dumps([rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({optional!r}))]))\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), timeout=300)
        rc, mods = json.loads(out.stdout.strip().splitlines()[-1])
        assert rc == 0, out.stderr
        return mods

    common = ["--experiment", "e", "--prompt-set", "s", "--layers", "0"]
    assert imported(common + ["--model-variant", "base"]) == []
    assert imported(common + ["--model-variant", "lora", "--responses-from", "base"]) in (["peft"],
                                                                                          ["bitsandbytes", "peft"])
