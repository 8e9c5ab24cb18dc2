"""Ctrl-C and SIGTERM in a stage: exit status 130, one line saying how far it got and how to resume, no traceback;
every file on disk is whole, and --skip-existing completes the set to the files of an uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from inference.capture_raw_activations import main
from tests.helpers import write_responses
from utils import cli, paths
from utils.storage import load_pt


def _interrupted_capture(args: list[str], signum: int, after: int) -> subprocess.CompletedProcess:
    """The real main(), which sends itself `signum` once `after` files are written (from the writer thread,
    as a user's Ctrl-C arrives at any moment)."""
    code = ("import os, sys\n"
            "import inference.capture_raw_activations as c, utils.storage as st\n"
            "real, n = st.write_pt, [0]\n"
            "def write_pt(path, obj):\n"
            "    written = real(path, obj)\n"
            "    n[0] += 1\n"
            f"    if n[0] == {after}:\n"
            f"        os.kill(os.getpid(), {int(signum)})\n"
            "    return written\n"
            "st.write_pt = write_pt\n"
            f"sys.exit(c.main({args!r}))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=paths.REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_capture_exits_130_in_one_line_and_resumes(zoo, experiments, capsys, signum):
    model_dir = zoo("llama")
    experiments("e", {"base": {"model": model_dir}})
    pairs = [(f"prompt {i}: tell me about code", "a short answer " * (1 + i % 3)) for i in range(8)]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs)
    common = ["--experiment", "e", "--prompt-set", "s", "--batch-size", "1", "--layers", "1,3", "--no-server"]

    r = _interrupted_capture(common, signum, after=3)
    assert r.returncode == cli.INTERRUPTED == 130, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted after ") and lines[-1].endswith(
        f"of {len(recs)} prompts; files written so far are complete: rerun with --skip-existing"), lines
    said = int(lines[-1].split()[2])
    folder = paths.raw_dir("e", "base", "s")
    done = {p.stem for p in folder.glob("*.pt")}
    assert 3 <= len(done) < len(recs) and said <= len(done)   # the count never claims a file that is not there
    assert not [p for p in folder.iterdir() if p.suffix != ".pt"]  # no temporary file left behind
    for p in folder.glob("*.pt"):
        assert set(load_pt(p)) == {"prompt", "response", "metadata"}
    assert r.stdout == ""                                      # no summary line of a run that did not finish

    assert main(common + ["--skip-existing"]) == 0
    out, _ = capsys.readouterr()
    assert f"captured {len(recs) - len(done)} prompts, skipped {len(done)} existing" in out
    assert main(common + ["--output-suffix", "ref"]) == 0     # the uninterrupted run, the oracle
    for pid in recs:
        a, b = load_pt(paths.raw_file("e", "base", "s", pid)), load_pt(paths.raw_file("e", "base", "s", pid, "ref"))
        for side in ("prompt", "response"):
            assert a[side]["token_ids"] == b[side]["token_ids"]
            for L, comps in b[side]["activations"].items():
                assert torch.equal(a[side]["activations"][L]["residual"], comps["residual"]), (pid, side, L)


def test_progress_counts_when_disabled():
    bar = cli.progress(range(5), desc="x", disable=True)
    seen = [i for i in bar]
    assert seen == list(range(5)) and bar.count == 5
    bar = cli.progress(total=4, disable=True)
    bar.update(2)
    assert bar.count == 2 and cli._how_far() == " after 2 of 4 prompts"
