"""The Ray backend on a real local Ray cluster (ray 2.60.0): two worker processes, each holding the tiny model.

Oracle: the plain single-process stage runs (as tests/test_batch.py): `trait-batch --backend ray --workers 2
--shards 3` writes the same files, file for file (dates apart; floats within 1e-5 relative). A worker process
killed mid-shard (SIGKILL, as the OOM killer would) is reported with that shard's ids, the other shards finish on
the other worker, and a rerun writes exactly the missing files. `--ray-collect` (no shared filesystem) writes the
same files through the driver. One small cluster for the module: 2 CPUs, a 80 MB object store, no dashboard.
"""
from __future__ import annotations

import os
import shutil
import signal

import pytest

ray = pytest.importorskip("ray")

import inference.batch as eng  # noqa: E402
from inference.backends.ray import RayBackend  # noqa: E402
from tests.helpers import BATCH_IDS as IDS, assert_same_trees, batch_world, plain_batch_runs, stamps, tree  # noqa: E402
from utils import paths  # noqa: E402

FLAGS = ["--max-new-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture
def world(cluster, tmp_path, monkeypatch, experiments, zoo):
    return batch_world(tmp_path, monkeypatch, experiments, zoo)


def ray_batch(*args: str) -> int:
    return eng.main(["--backend", "ray", "--workers", "2", "--experiment", "e", "--prompt-set", "tiny", *FLAGS, *args])


def test_two_ray_workers_write_the_same_files_as_one_process(world, tmp_path, capsys):
    plain_batch_runs()
    plain = tmp_path / "plain_inference"
    shutil.move(str(world / "inference"), plain)

    assert ray_batch("--shards", "3", "--stages", "generate,capture,project") == 0
    out = capsys.readouterr().out
    assert "Ray (started here)" not in out and "Ray (" in out and "2 workers" in out   # the module's cluster
    for stage in ("generate", "capture", "project"):
        assert f"{stage}: 7 prompts written by 3 of 3 shards run" in out
    n = assert_same_trees(plain, world / "inference")
    assert n == 7 + 7 + 7 * 2 + 1          # responses, raw .pt, projections of two traits, calibration (merged)
    assert "shards run (3 in all) in 2 worker processes" in out   # neither of them this process (the local backend)


def test_a_killed_worker_is_reported_with_its_ids_and_the_rerun_writes_only_what_is_missing(world, capsys):
    class KilledOnPrompt10(eng.ShardWorker):
        """A worker whose process dies (SIGKILL) in the middle of generating the shard that holds prompt 10."""

        def run(self, task):
            import inference.generate_responses as generate_mod

            real = generate_mod.generated_record

            def record(plan, prompt, *a, **k):
                if prompt.id == "10":
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(plan, prompt, *a, **k)
            generate_mod.generated_record = record
            try:
                return super().run(task)
            finally:
                generate_mod.generated_record = real

    opts = eng.BatchOptions("e", "tiny", stages=("generate",), backend="ray", workers=2, shards=3,
                            max_new_tokens=6, progress=False)
    backend = RayBackend(opts, worker_cls=KilledOnPrompt10)
    try:
        summary = eng.run_batch(opts, backend)
    finally:
        backend.close()
    [failed] = summary["failed"]
    assert "10" in failed["ids"] and failed["stage"] == "generate" and "died" in failed["error"]
    assert f"({eng.ids_text(failed['ids'])})" in capsys.readouterr().err
    gen = summary["stages"][0]
    assert gen["run"] == 3 and gen["prompts"] == 7 - len(failed["ids"])   # the other shards finished on worker two
    written = {p.stem for p in paths.responses_dir("e", "base", "tiny").glob("*.json")}
    assert written == set(IDS) - set(failed["ids"])
    assert not list(paths.responses_dir("e", "base", "tiny").glob(".*"))   # no partial file from the killed write

    before = stamps(world / "inference")
    assert ray_batch("--shards", "3", "--stages", "generate") == 0
    out = capsys.readouterr().out
    assert f"generate: {len(failed['ids'])} prompts written by 1 of 1 shards run (3 in all" in out
    after = stamps(world / "inference")
    assert {k: v for k, v in after.items() if k in before} == before             # nothing rewritten
    new = {rel for rel in after if rel not in before and "/responses/" in rel}
    assert {rel.rsplit("/", 1)[1][:-5] for rel in new} == set(failed["ids"])     # exactly the missing files


def test_ray_collect_returns_the_files_to_the_driver(world, tmp_path, capsys):
    plain_batch_runs(("generate", "project"))
    plain = tmp_path / "plain_inference"
    shutil.move(str(world / "inference"), plain)
    assert ray_batch("--shards", "3", "--stages", "generate,project", "--ray-collect") == 0
    assert "outputs returned to this machine" in capsys.readouterr().out
    assert assert_same_trees(plain, world / "inference") == 7 + 7 * 2 + 1
    # a rerun: every file is here, no shard is sent anything
    before = stamps(world / "inference")
    assert ray_batch("--shards", "3", "--stages", "generate,project", "--ray-collect") == 0
    assert "0 of 0 shards run" in capsys.readouterr().out and stamps(world / "inference") == before
    assert len(tree(world / "inference")) == 7 + 7 * 2 + 1


def test_more_workers_than_the_cluster_holds_is_a_clear_error(world, capsys):
    assert ray_batch("--workers", "3", "--stages", "generate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workers 3" in err[0] and "the Ray cluster has 2" in err[0]
    assert not (world / "inference").exists()
