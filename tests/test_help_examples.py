"""Every example line of every script's --help runs as printed after the demo, and exits 0.

The tiny demo (`run_demo.py --tiny --experiment demo`, a random-weight llama with the real demo's variants, sets
and traits) builds experiment `demo` in a scratch $TRAIT_EXPERIMENTS_DIR; then each `python ...` example line of
each script's --help runs there, in the order printed, as a shell would run it. Lines whose comment says they
need something the demo cannot give (`# needs a Modal account`, `# needs your ...`) or that serve until Ctrl-C
(`# serves until Ctrl-C`) are listed and not run; the test checks that no other line is left out.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from utils import paths

pytestmark = pytest.mark.slow  # the tiny demo plus every example as a subprocess: minutes on 2 cores

REPO = paths.REPO_ROOT
SCRIPTS = ["inference/generate_responses.py", "inference/capture_raw_activations.py",
           "inference/project_raw_activations_onto_traits.py", "inference/extract_viz.py",
           "inference/modal_inference.py", "inference/model_server.py", "extraction/extract_vectors.py",
           "analysis/model_diff/compare_variants.py", "analysis/model_diff/per_token_diff.py",
           "analysis/report.py", "inference/modal_batch.py"]
NOT_RUN = ("# needs ", "# serves until Ctrl-C")


def example_lines(script: str, env: dict) -> list[str]:
    """The `python ...` lines of the script's --help, continuation lines (ending in a backslash) joined."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines, cur = [], None
    for raw in out.stdout.splitlines():
        line = raw.strip()
        if cur is None and not line.startswith("python "):
            continue
        cur = line.rstrip("\\").strip() if cur is None else f"{cur} {line.rstrip(chr(92)).strip()}"
        if not line.endswith("\\"):
            lines.append(cur)
            cur = None
    return lines


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "TRAIT_EXPERIMENTS_DIR": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRAIT_SERVER_URL": "http://127.0.0.1:9", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "experiments/demo/run_demo.py", "--tiny", "--experiment", "demo"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env


def test_every_help_example_runs_after_the_demo(demo_env):
    ran, left = [], []
    for script in SCRIPTS:
        lines = example_lines(script, demo_env)
        assert lines, f"{script} --help has no example"
        for line in lines:
            if any(m in line for m in NOT_RUN):
                left.append(line)
                continue
            argv = shlex.split(line, comments=True)
            assert argv[0] == "python" and argv[1] == script, line
            r = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=demo_env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"{line}\nexit {r.returncode}\n{r.stderr[-2000:]}"
            ran.append(line)
    print(f"\n{len(ran)} example lines ran; not run ({len(left)}):\n  " + "\n  ".join(left))
    # what is left out is only what needs Modal or serves forever
    assert all("modal" in l or "server" in l or "--serve" in l or "# needs your" in l for l in left), left
