"""The Ray backend: the shards on a Ray cluster, one actor per worker holding the loaded model.

    backend = RayBackend(opts)          # ray.init(address=opts.ray_address), or a cluster started here
    run_batch(opts, backend)            # shards as actor tasks: each idle actor takes the next shard
    backend.close()                     # actors gone; a cluster this backend started is shut down

    ShardActor          the Ray actor around one ShardWorker: load() once, run_shard / calibrate_shard per shard
    RayBackend          Backend (inference/batch.py): survey here, shards on the actors, failures as values

Outputs: with a filesystem every node shares (the default), each actor writes straight into the experiment
folder, through the stage functions' own atomic writes; the actors see the driver's $TRAIT_EXPERIMENTS_DIR and
$TRAIT_DATASETS_DIR (the same mount path on every node). With `--ray-collect` (no shared filesystem) each actor
works in a scratch folder: it gets the experiment's inputs once (config, vectors, evidence, prompt set; what
`push` sends to Modal) and each shard's response JSONs and calibration, and returns the files it wrote, which the
driver writes here atomically (an existing file is never replaced). A shard whose actor dies (killed, out of
memory) is reported with its ids; the other actors take the remaining shards; a rerun does only what is missing.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import ray

from inference.batch import (BatchError, BatchOptions, ShardFailed, ShardTask, ShardWorker, StageJob, StageSurvey,
                             finish_calibration, input_files, survey)
from utils import paths


class ShardActor:
    """One worker process: one loaded model, then shards. Wrapped with ray.remote by RayBackend.

        actor = ray.remote(ShardActor).remote("demo", "instruct", "", env)
        ray.get(actor.load.remote())             # pid; the model is loaded once
        ray.get(actor.run_shard.remote(task))    # a result dict, or the ShardFailed as a value
    """

    def __init__(self, experiment: str, model_variant: Optional[str], quantization: str, env: dict,
                 worker_cls: type = ShardWorker, inputs: Optional[dict] = None):
        os.environ.update(env)     # before anything reads a path: the driver's experiment and dataset roots
        self.scratch, self.sent = None, set()   # --ray-collect: the private data root, the inputs written there
        if inputs is not None:     # --ray-collect: a private data root holding the experiment's inputs
            self.scratch = Path(tempfile.mkdtemp(prefix="trait-batch-"))
            os.environ["TRAIT_EXPERIMENTS_DIR"] = str(self.scratch / "experiments")
            os.environ["TRAIT_DATASETS_DIR"] = str(self.scratch / "datasets")
            self._write(inputs)
        self.worker = worker_cls(experiment, model_variant, quantization)

    def _write(self, files: dict) -> None:
        self.sent.update(files)
        for rel, data in files.items():
            target = self.scratch / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def load(self) -> int:
        self.worker.load()
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def run_shard(self, task: ShardTask, inputs: Optional[dict] = None):
        return self._call(self.worker.run, task, inputs)

    def calibrate_shard(self, task: ShardTask, inputs: Optional[dict] = None):
        return self._call(self.worker.calibrate, task, inputs)

    def _call(self, fn, task: ShardTask, inputs: Optional[dict]):
        if self.scratch is not None:
            self._write(inputs or {})
        try:
            out = fn(task)
        except ShardFailed as e:   # a value, not a RayTaskError: the driver reports it with the shard's ids
            return e
        if self.scratch is not None and "done" in out:
            out["files"] = self._take_outputs(task.job.experiment)
        return out

    def _take_outputs(self, experiment: str) -> dict:
        """The files this shard wrote (under the scratch experiment's inference/), removed from the scratch."""
        root = self.scratch / "experiments" / experiment / "inference"
        files = {}
        for p in sorted(root.rglob("*")) if root.is_dir() else ():
            rel = p.relative_to(self.scratch).as_posix()
            if p.is_file() and rel not in self.sent and not p.name.startswith("."):
                files[rel] = p.read_bytes()
                p.unlink()
        return files

    def __del__(self):
        if getattr(self, "scratch", None) is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _env_for_workers() -> dict:
    """What the actors must see as the driver sees it: the data roots (absolute) and offline / cache settings."""
    env = {"TRAIT_EXPERIMENTS_DIR": str(paths.experiments_root().resolve()),
           "TRAIT_DATASETS_DIR": str(paths.datasets_root().resolve()), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "TRAIT_CACHE_DIR", "TRANSFORMERS_VERBOSITY"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


class RayBackend:
    name = "ray"
    shows_progress = False   # the actors' bars would interleave in the driver's log

    def __init__(self, opts: BatchOptions, worker_cls: type = ShardWorker):
        from utils.model import resolve_dtype

        self.opts, self.worker_cls = opts, worker_cls
        self.actors: list = []
        self.dead: list[str] = []
        self.base_inputs = None
        self.started_cluster = not ray.is_initialized()
        if self.started_cluster:
            try:
                ray.init(address=opts.ray_address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise BatchError(f"--ray-address {opts.ray_address}: cannot connect to the Ray cluster ({e})") from e
        resources = ray.cluster_resources()
        self.gpus_per_worker = (opts.gpus_per_worker if opts.gpus_per_worker is not None
                                else 1.0 if resources.get("GPU", 0) >= 1 else 0.0)
        self.workers = opts.workers
        for flag, per, have in (("--cpus-per-worker", opts.cpus_per_worker, resources.get("CPU", 0)),
                                ("--gpus-per-worker", self.gpus_per_worker, resources.get("GPU", 0))):
            if per * self.workers > have:
                self.close()
                raise BatchError(f"--workers {self.workers} x {flag} {per:g} needs {per * self.workers:g} "
                                 f"{flag.split('-')[2].upper()}s; the Ray cluster has {have:g}")
        self.dtype_bytes = 2 if self.gpus_per_worker else resolve_dtype("auto").itemsize
        cluster = (f"cluster {opts.ray_address}" if opts.ray_address else "a cluster started here"
                   if self.started_cluster else "the cluster this process is connected to")
        self.where = (f"Ray ({cluster}): "
                      f"{self.workers} workers of {opts.cpus_per_worker:g} CPU and {self.gpus_per_worker:g} GPU, "
                      + ("outputs returned to this machine (--ray-collect)" if opts.ray_collect
                         else f"writing into {paths.experiments_root()}"))
        self.pending_only = opts.ray_collect   # the files here are the truth: a shard gets only its missing ids

    # -- Backend ------------------------------------------------------------------------------------------------
    def survey(self, job: StageJob, prompt_ids: Optional[list[str]], limit: Optional[int],
               prior: Optional[StageSurvey] = None) -> StageSurvey:
        return survey(job, prompt_ids, limit, self.dtype_bytes, prior)

    def map(self, method: str, tasks: Sequence[ShardTask]) -> Iterator[Any]:
        """Each idle actor takes the next shard; a dead actor's shard is a ShardFailed naming its ids."""
        if not tasks:
            return
        self._start(len(tasks))
        queue, idle, running = deque(tasks), list(self.actors), {}
        while queue or running:
            while queue and idle:
                actor, task = idle.pop(0), queue.popleft()
                task, inputs = self._prepare(method, task)
                running[getattr(actor, method).remote(task, inputs)] = (task, actor)
            if not running:       # every actor has died
                for task in queue:
                    yield ShardFailed(task.job.stage, task.shard, task.ids, "no Ray worker left: every actor died "
                                      f"({'; '.join(self.dead)})")
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            task, actor = running.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.actors.remove(actor)
                why = _first_line(e)
                self.dead.append(why)
                yield ShardFailed(task.job.stage, task.shard, task.ids, f"the Ray worker running it died: {why}")
                continue
            except ray.exceptions.RayError as e:
                idle.append(actor)
                yield ShardFailed(task.job.stage, task.shard, task.ids, f"Ray: {_first_line(e)}")
                continue
            idle.append(actor)
            yield self._receive(out) if isinstance(out, dict) else out

    def finish_calibration(self, job: StageJob, parts: list) -> str:
        return finish_calibration(job, parts)   # on the driver: the merged file lands in its experiment folder

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_cluster and ray.is_initialized():
            ray.shutdown()

    # -- internals ---------------------------------------------------------------------------------------------
    def _start(self, n_tasks: int) -> None:
        """Actors up to min(--workers, shards), each with the model loaded once (kept for the later stages; a failed
        load is bad input, not a shard)."""
        opts = self.opts
        want = min(self.workers, n_tasks) - len(self.actors)
        if want <= 0:
            return
        if opts.ray_collect and self.base_inputs is None:
            files, notes = input_files(opts.experiment, [opts.prompt_set], opts.model_variant)
            for note in notes:
                print(f"note: {note} (the workers load it by that path)", file=sys.stderr)
            self.base_inputs = ray.put({rel: local.read_bytes() for local, rel in files})   # once, for every actor
        cls = ray.remote(ShardActor).options(num_cpus=opts.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                             max_restarts=0, max_task_retries=0)
        env = _env_for_workers()
        new = [cls.remote(opts.experiment, opts.model_variant, opts.quantization, env, self.worker_cls,
                          self.base_inputs) for _ in range(want)]
        try:
            ray.get([a.load.remote() for a in new])
        except ray.exceptions.RayError as e:
            for actor in new:
                ray.kill(actor)
            raise BatchError(f"the Ray workers could not load the model of {opts.experiment} "
                             f"({opts.model_variant or 'application variant'}): {_first_line(e)}") from e
        self.actors += new

    def _prepare(self, method: str, task: ShardTask) -> tuple[ShardTask, Optional[dict]]:
        """--ray-collect: the response JSONs and calibration files the shard reads (run_stage sends only the ids
        whose outputs are missing here: `pending_only`)."""
        if not self.opts.ray_collect:
            return task, None
        job = task.job
        files, _ = input_files(job.experiment, [job.kwargs["prompt_set"]], job.kwargs.get("model_variant"),
                               with_responses=job.stage != "generate", response_ids=task.ids)
        keep = [(local, rel) for local, rel in files if "/responses/" in rel or rel.endswith("calibration.json")]
        return task, {rel: local.read_bytes() for local, rel in keep}

    def _receive(self, out: dict) -> dict:
        """Write a --ray-collect shard's files here (atomically; an existing file is kept)."""
        from utils.storage import atomic_write

        files = out.pop("files", None) or {}
        for rel, data in files.items():
            target = paths.experiments_root() / rel.split("/", 1)[1]
            if target.exists():
                continue
            with atomic_write(target) as tmp:
                Path(tmp).write_bytes(data)
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
