#!/usr/bin/env python3
"""The batch engine: generate, capture and fused projection over shards of a prompt set, on any backend.

    trait-batch --backend local|ray|modal --experiment E --prompt-set S [--stages generate,capture,project] ...
    python inference/batch.py ...                     the same CLI (`--local` is `--backend local`)

    plan_shards(ids, tokens_by_id, n_shards) -> [[id]]   deterministic shards balanced by tokens (longest first)
    BatchOptions(experiment, prompt_set, ...)  every flag of a run, frozen; .from_args(namespace)
    stage_job(opts, stage) -> StageJob         one stage's options as plain keywords (what a worker is sent)
    survey(job, ...) -> StageSurvey            the stage's own plan_* over every selected id: ids, what is left,
                                               tokens, bytes it will write; nothing loaded but tokenizer/config
    ShardWorker(experiment, variant, quant)    plain Python: .load() once, then .run(task) / .calibrate(task) per shard
    finish_calibration(job, parts) -> path     the shards' massive-dims statistics merged into one calibration.json
    Backend                                    the Protocol a backend implements: survey, map, finish_calibration
    BACKENDS                                   name -> "module:Class" (inference/backends/{local,ray,modal}.py)
    run_batch(opts, backend) -> dict           print the plan; then per stage: shards -> map -> failures reported
    input_files(...)                           what a worker without this filesystem needs (Modal push, --ray-collect)
    main(argv=None) -> int                     trait-batch --help

Every stage runs its existing function (generate_responses.generate, capture_raw_activations.capture,
project_raw_activations_onto_traits.project with fused=True) on the shard's prompt ids with skip-existing, and
the model the worker loaded once. Each id is in exactly one shard, so each file has one writer; a rerun cuts
the same shards and writes only what is missing. Importing this module needs neither torch, ray nor modal: each
backend imports its own library when it is chosen.
"""
from __future__ import annotations

import argparse
import dataclasses
import heapq
import importlib
import os
import secrets
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

if __package__ in (None, ""):   # `python inference/batch.py` without `pip install -e .`: the repo root first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import TraitError
from utils import cli, paths
from utils.flags import add_capture_flags, add_generate_flags, add_projection_flags

STAGES = ("generate", "capture", "project")
SHARDS_PER_WORKER = 4              # default shards: a few per worker (finer resume, balanced tails)
DEFAULT_TIMEOUT = 4 * 3600         # seconds one shard may run (Modal)
BACKENDS = {"local": "inference.backends.local:LocalBackend", "ray": "inference.backends.ray:RayBackend",
            "modal": "inference.backends.modal:ModalBackend"}


class BatchError(TraitError):
    """A bad flag or a missing input of a batch run; the message names it."""


class ShardFailed(TraitError):
    """One shard's stage function raised: the shard, its ids, the error and its traceback (picklable)."""

    exit_code = 1

    def __init__(self, stage: str, shard: int, ids: Sequence[str], error: str, details: str = ""):
        super().__init__(f"{stage} shard {shard} ({ids_text(ids)}): {error}")
        self.stage, self.shard, self.ids, self.error, self.details = stage, shard, tuple(ids), error, details

    def __reduce__(self):
        return type(self), (self.stage, self.shard, self.ids, self.error, self.details)


def ids_text(ids: Sequence[str], n: int = 12) -> str:
    ids = list(ids)
    return "ids " + ", ".join(ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


# ---------------------------------------------------------------------------------------------------
# Shards

def plan_shards(ids: Iterable[Any], tokens_by_id: Mapping[str, int], n_shards: int) -> list[list[str]]:
    """Cut `ids` into min(n_shards, len(ids)) non-empty shards of about equal tokens; same input, same shards.

    Greedy longest-first: each id, heaviest first (ties in natural id order), joins the lightest shard (ties: the
    lowest index). An id without a count weighs the mean of the known ones (1 when none is known). Each shard
    lists its ids in natural order.
    """
    if not isinstance(n_shards, int) or n_shards < 1:
        raise BatchError(f"--shards must be a positive integer, got {n_shards!r}")
    order = sorted(dict.fromkeys(str(i) for i in ids), key=lambda i: (paths.natural_key(i), i))
    known = [int(tokens_by_id[i]) for i in order if i in tokens_by_id]
    default = max(1, round(sum(known) / len(known))) if known else 1
    weight = {i: int(tokens_by_id.get(i, default)) for i in order}
    n = min(n_shards, len(order))
    shards: list[list[str]] = [[] for _ in range(n)]
    heap = [(0, k) for k in range(n)]
    for i in sorted(order, key=lambda i: (-weight[i], paths.natural_key(i), i)):
        load, k = heapq.heappop(heap)
        shards[k].append(i)
        heapq.heappush(heap, (load + weight[i], k))
    return [sorted(s, key=lambda i: (paths.natural_key(i), i)) for s in shards]


def parse_stages(text: str | Sequence[str]) -> tuple[str, ...]:
    """--stages generate,project -> the stages in their fixed order (generate, capture, project)."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise BatchError(f"--stages {text!r}: choose from {', '.join(STAGES)} (comma list; run in that order)")
    return tuple(s for s in STAGES if s in names)



# ---------------------------------------------------------------------------------------------------
# Options

@dataclass(frozen=True)
class BatchOptions:
    """Every flag of a batch run (see build_parser); the stage flags are passed to the stage functions."""

    experiment: str
    prompt_set: str
    stages: tuple[str, ...] = ("generate", "project")
    model_variant: Optional[str] = None
    prompt_ids: Optional[str] = None
    limit: Optional[int] = None
    backend: str = "local"
    shards: Optional[int] = None
    dry_run: bool = False
    # modal
    gpus: int = 1
    gpu: Optional[str] = None
    timeout: int = DEFAULT_TIMEOUT
    detach: bool = False
    # ray
    workers: int = 1
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: float = 1.0
    ray_address: Optional[str] = None
    ray_collect: bool = False
    progress: bool = True
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    # generate
    max_new_tokens: int = 50
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    prefill: Optional[str] = None
    # capture
    components: Optional[str] = None
    capture_mlp: bool = False
    capture_layers: str = "all"
    response_only: bool = False
    # project (fused)
    traits: Optional[str] = None
    layers: str = "best"
    method: Optional[str] = None
    component: str = "residual"
    position: Optional[str] = None
    extraction_variant: Optional[str] = None
    vectors_experiment: Optional[str] = None
    steering_variant: Optional[str] = None
    multi_vector: Optional[int] = None
    centered: bool = False
    save_means: bool = False
    no_calibration: bool = False
    # more than one stage
    responses_from: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Optional[int] = None
    max_batch_tokens: Optional[int] = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "BatchOptions":
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
        values["stages"] = parse_stages(ns.stages)
        values["backend"] = ns.backend or "local"
        return cls(**values, progress=not ns.quiet).check()

    @property
    def quantization(self) -> str:
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else ""

    def check(self) -> "BatchOptions":
        """What the stage functions do not check themselves: the batch's own flags."""
        if self.backend not in BACKENDS:
            raise BatchError(f"--backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        for flag, value in (("--gpus", self.gpus), ("--shards", self.shards), ("--timeout", self.timeout),
                            ("--workers", self.workers)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise BatchError(f"{flag} must be a positive integer, got {value!r}")
        for flag, value in (("--gpus-per-worker", self.gpus_per_worker), ("--cpus-per-worker", self.cpus_per_worker)):
            if value is not None and not value >= 0:
                raise BatchError(f"{flag} must be >= 0, got {value!r}")
        ray_only = [flag for flag, on in (("--ray-address", self.ray_address), ("--ray-collect", self.ray_collect),
                                          ("--workers", self.workers != 1),
                                          ("--gpus-per-worker", self.gpus_per_worker is not None)) if on]
        if ray_only and self.backend != "ray":
            raise BatchError(f"{ray_only[0]} is a flag of --backend ray (this run: --backend {self.backend})")
        if self.detach and self.backend != "modal":
            raise BatchError(f"--detach is a flag of --backend modal (this run: --backend {self.backend})")
        if self.limit is not None and self.limit < 0:
            raise BatchError(f"--limit must be >= 0, got {self.limit}")
        if self.load_in_8bit and self.load_in_4bit:
            raise BatchError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")
        if "generate" in self.stages and self.responses_from:
            raise BatchError(f"--responses-from {self.responses_from}: generate writes --model-variant's own "
                             f"responses; run generate for {self.responses_from} first, then capture/project here")
        return self


# Each stage's option names -> the BatchOptions field that fills them.
STAGE_FIELDS: dict[str, dict[str, str]] = {
    "generate": {k: k for k in ("max_new_tokens", "temperature", "top_p", "seed", "prefill", "batch_size",
                                "load_in_8bit", "load_in_4bit")},
    "capture": {"components": "components", "capture_mlp": "capture_mlp", "layers": "capture_layers",
                **{k: k for k in ("response_only", "responses_from", "dtype", "batch_size", "max_batch_tokens",
                                  "load_in_8bit", "load_in_4bit")}},
    "project": {k: k for k in ("traits", "layers", "method", "component", "position", "extraction_variant",
                               "vectors_experiment", "steering_variant", "multi_vector", "centered", "save_means",
                               "no_calibration", "responses_from", "dtype", "batch_size", "max_batch_tokens",
                               "load_in_8bit", "load_in_4bit")},
}


@dataclass(frozen=True)
class StageJob:
    """One stage of a run as plain keywords of its options class; `options(ids)` builds them for a shard."""

    stage: str
    kwargs: dict = field(hash=False)
    progress: bool = False

    def options(self, prompt_ids: Optional[Sequence[str]] = None):
        """The stage's frozen options for these ids, with skip-existing (and --fused for project)."""
        ids = list(prompt_ids) if prompt_ids is not None else None
        if self.stage == "generate":
            from inference.generate_responses import GenerateOptions

            return GenerateOptions(**self.kwargs, prompt_ids=ids, skip_existing=True, no_server=True,
                                   progress=self.progress)
        if self.stage == "capture":
            from inference.capture_raw_activations import CaptureOptions

            return CaptureOptions(**self.kwargs, prompt_ids=ids, skip_existing=True, progress=self.progress)
        from inference.project_raw_activations_onto_traits import ProjectOptions

        return ProjectOptions(**self.kwargs, prompt_ids=ids, skip_existing=True, fused=True, progress=self.progress)

    @property
    def experiment(self) -> str:
        return self.kwargs["experiment"]


def stage_job(opts: BatchOptions, stage: str, progress: bool = False) -> StageJob:
    kwargs = {"experiment": opts.experiment, "prompt_set": opts.prompt_set, "model_variant": opts.model_variant}
    kwargs.update({name: getattr(opts, src) for name, src in STAGE_FIELDS[stage].items()})
    return StageJob(stage, kwargs, progress)


@dataclass(frozen=True)
class ShardTask:
    """One call of a worker: a stage, the shard's index and its prompt ids."""

    job: StageJob
    shard: int
    ids: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------
# Surveys: what a stage has to do, from its own plan_* function (everything checked, nothing written)

@dataclass(frozen=True)
class StageSurvey:
    stage: str
    ids: tuple[str, ...]                 # every selected prompt: what the shards are cut from
    pending: tuple[str, ...]             # those with an output still missing
    tokens: dict = field(hash=False)     # id -> tokens (generate: prompt tokens + --max-new-tokens, an upper bound)
    bytes_per_token: float = 0.0         # what the stage writes (an estimate; exact for raw activations)
    bytes_per_prompt: float = 0.0
    raw_bytes_per_token: int = 0         # a raw capture of every layer's residual, for comparison
    detail: str = ""                     # how bytes_per_token is made up
    needs_calibration: bool = False      # project: no calibration file yet; computed first over every id
    estimated: bool = False              # its inputs come from an earlier stage of this run: generate's numbers

    @property
    def pending_tokens(self) -> int:
        return sum(int(self.tokens.get(i, 0)) for i in self.pending)

    @property
    def total_tokens(self) -> int:
        return sum(int(self.tokens.get(i, 0)) for i in self.ids)

    @property
    def bytes(self) -> int:
        return int(len(self.pending) * self.bytes_per_prompt + self.pending_tokens * self.bytes_per_token)


def _response_ids(job: StageJob, prompt_ids: Optional[list[str]], limit: Optional[int]) -> list[str]:
    """The ids capture / project work on: --prompt-ids, else every response JSON of the replayed variant."""
    if prompt_ids:
        return list(prompt_ids)
    from utils.config import resolve_variant
    from utils.responses import list_response_files

    kw = job.kwargs
    source = kw.get("responses_from") or resolve_variant(job.experiment, kw.get("model_variant")).name
    ids = [p.stem for p in list_response_files(job.experiment, source, kw["prompt_set"])]
    ids = ids[:limit] if limit is not None else ids
    if not ids:
        raise BatchError(f"{job.stage}: no response JSONs in "
                         f"{paths.responses_dir(job.experiment, source, kw['prompt_set'])}; run the generate stage")
    return ids


def _survey_generate(job: StageJob, prompt_ids, limit) -> tuple[list, list, dict, bool]:
    from inference.generate_responses import format_and_tokenize, plan_generate
    from utils.model import load_tokenizer

    plan = plan_generate(dataclasses.replace(job.options(prompt_ids), limit=limit))
    prompts = plan.pset.select(prompt_ids) if prompt_ids else list(plan.pset.prompts)
    prompts = prompts[:limit] if limit is not None else prompts
    tok = load_tokenizer(plan.variant.model_path(job.experiment))
    new = plan.opts.max_new_tokens
    tokens = {p.id: len(format_and_tokenize(tok, p, plan.pset.system_prompt, plan.template, plan.opts.prefill)[1])
              + new for p in prompts}
    return [p.id for p in prompts], [p.id for p in plan.todo], tokens, False


def _survey_capture(job: StageJob, prompt_ids, limit) -> tuple[list, list, dict, bool]:
    from inference.capture_raw_activations import plan_capture

    plan = plan_capture(job.options(_response_ids(job, prompt_ids, limit)))
    return ([pid for pid, _ in plan.items], [pid for pid, _ in plan.todo],
            {pid: len(d["token_ids"]) for pid, d in plan.items}, False)


def _survey_project(job: StageJob, prompt_ids, limit) -> tuple[list, list, dict, bool]:
    from inference.project_raw_activations_onto_traits import plan_fused

    plan = plan_fused(job.options(_response_ids(job, prompt_ids, limit)))
    set_plan = plan.sets[0]
    return (list(set_plan.responses), [pid for pid, _ in set_plan.todo],
            {pid: len(d["token_ids"]) for pid, d in set_plan.responses.items()}, plan.wants_calibration)


SURVEYS = {"generate": _survey_generate, "capture": _survey_capture, "project": _survey_project}


def _sizes(job: StageJob, dtype_bytes: int) -> tuple[float, float, int, str, bool]:
    """(bytes per token, bytes per prompt, raw residual bytes per token, how, calibration missing) of a stage."""
    from utils.config import resolve_variant
    from utils.model import DTYPES, load_model_config

    kw, exp = job.kwargs, job.experiment
    variant = resolve_variant(exp, kw.get("model_variant"))
    cfg = load_model_config(variant.model_path(exp))
    n_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    store = DTYPES[kw["dtype"]].itemsize if kw.get("dtype") in DTYPES else dtype_bytes  # the stage names a bad one
    raw = n_layers * hidden * store
    if job.stage == "generate":
        return 24.0, 1000.0, raw, "response JSONs, ~24 bytes per token", False
    if job.stage == "capture":
        from inference.capture_raw_activations import parse_components
        from utils.layers import parse_layers

        layers = parse_layers(str(kw.get("layers") or "all"), n_layers)
        comps = parse_components(kw.get("components"), bool(kw.get("capture_mlp")))
        return (float(len(layers) * hidden * len(comps) * store), 2000.0, raw,
                f"raw: {len(layers)} layers x {hidden} hidden x {len(comps)} components x {store} bytes per token",
                False)
    return _project_sizes(job, variant.name, n_layers, hidden, raw)


def _project_sizes(job: StageJob, variant: str, n_layers: int, hidden: int, raw: int):
    from utils.calibration import load_calibration
    from utils.vectors import resolve_vector_source

    kw = job.kwargs
    source = resolve_vector_source(job.experiment, kw.get("vectors_experiment"), kw.get("extraction_variant"),
                                   kw.get("steering_variant"), kw.get("traits"))
    n_traits = len(source.traits)
    n_vec = kw.get("multi_vector") or len(str(kw.get("layers") or "best").split(","))
    comps = len({"residual", kw.get("component") or "residual"})
    means = 2 * n_layers * hidden * 4 * comps if kw.get("save_means") else 0     # fp32, both sides, every layer
    missing = not kw.get("no_calibration") and load_calibration(job.experiment, variant) is None
    dims = 0 if kw.get("no_calibration") else 200        # massive_dim_data: ~10 calibrated dims x 20 bytes a value
    return (float(n_traits * (40 * n_vec + 20 + dims)), float(n_traits * 1500 + means), raw,
            f"fused: {n_traits} traits x {n_vec} vectors of JSON scores" + (", means files" if means else ""), missing)


def survey(job: StageJob, prompt_ids: Optional[list[str]] = None, limit: Optional[int] = None,
           dtype_bytes: int = 2, prior: Optional[StageSurvey] = None) -> StageSurvey:
    """What `job` has to do. With `prior` (generate's survey, still pending) its inputs do not exist yet: the
    numbers are generate's (every id, generate's token bound); the exact survey runs when the stage starts."""
    per_token, per_prompt, raw, detail, missing = _sizes(job, dtype_bytes)
    if prior is not None and prior.pending:
        return StageSurvey(job.stage, prior.ids, prior.ids, dict(prior.tokens), per_token, per_prompt, raw, detail,
                           needs_calibration=missing, estimated=True)
    ids, pending, tokens, calibrate = SURVEYS[job.stage](job, prompt_ids, limit)
    return StageSurvey(job.stage, tuple(ids), tuple(pending), tokens, per_token, per_prompt, raw, detail,
                       needs_calibration=calibrate)


# ---------------------------------------------------------------------------------------------------
# The worker: plain Python; each backend holds one per worker process (Modal: per container, Ray: per actor)

def _run_generate(opts, loaded) -> dict:
    from inference.generate_responses import generate

    return generate(opts, loaded)


def _run_capture(opts, loaded) -> dict:
    from inference.capture_raw_activations import capture

    return capture(opts, loaded)


def _run_project(opts, loaded) -> dict:
    from inference.project_raw_activations_onto_traits import project

    return project(opts, loaded)


STAGE_RUNS = {"generate": _run_generate, "capture": _run_capture, "project": _run_project}
DONE_KEY = {"generate": "written", "capture": "captured", "project": "prompts"}   # prompts a summary counts


class ShardWorker:
    """One model load, then any number of shards (what BatchWorker runs in each container).

        w = ShardWorker("demo", "instruct")
        w.run(ShardTask(stage_job(opts, "generate"), 0, ("1", "2")))   # the stage on ids 1, 2; existing skipped
        w.loads                                                        # 1, however many shards ran
    """

    def __init__(self, experiment: str, model_variant: Optional[str] = None, quantization: str = ""):
        self.experiment, self.model_variant, self.quantization = experiment, model_variant, quantization
        self.loaded = None
        self.loads = 0

    def load(self):
        if self.loaded is None:
            from utils.model import load_variant

            self.loaded = load_variant(self.experiment, self.model_variant, load_in_8bit=self.quantization == "8bit",
                                       load_in_4bit=self.quantization == "4bit")
            self.loads += 1
        return self.loaded

    def run(self, task: ShardTask) -> dict:
        """The stage function on the shard's ids (skip-existing) with the loaded model; a failure names the shard."""
        t0 = time.perf_counter()
        stage = task.job.stage
        summary = _guarded(task, lambda: STAGE_RUNS[stage](task.job.options(task.ids), self.load()))
        return {"stage": stage, "shard": task.shard, "ids": list(task.ids), "done": int(summary[DONE_KEY[stage]]),
                "bytes": int(summary.get("bytes") or 0), "seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def calibrate(self, task: ShardTask) -> dict:
        """Massive-dims statistics of the shard's prompts (project --fused's calibration, split by shard)."""
        return _guarded(task, lambda: _calibration_part(task, self.load()))


def _guarded(task: ShardTask, fn):
    try:
        return fn()
    except Exception as e:   # any failure of the stage: reported with the shard's ids, the other shards go on
        raise ShardFailed(task.job.stage, task.shard, task.ids, f"{type(e).__name__}: {e}",
                          traceback.format_exc()) from e


def _calibration_part(task: ShardTask, loaded) -> dict:
    from core.fused import calibrate_sequences
    from core.projection import MassiveDimStats
    from inference.project_raw_activations_onto_traits import plan_fused
    from utils.calibration import CALIBRATION_TOP_K

    opts = dataclasses.replace(task.job.options(task.ids), skip_existing=False, no_calibration=True)
    plan = plan_fused(opts)
    items = [d for s in plan.sets for d in s.responses.values()]
    pad = loaded.tokenizer.pad_token_id
    pad = 0 if pad is None else pad          # 0 is a valid pad id: B24 (docs/original-bugs.md)
    stats = MassiveDimStats(CALIBRATION_TOP_K)
    n = calibrate_sequences(loaded.model, [d["token_ids"] for d in items], [d["prompt_end"] for d in items], stats,
                            list(range(plan.fused.n_layers)), pad, plan.fused.store_dtype, opts.max_batch_tokens,
                            opts.batch_size)
    return {"stage": "calibration", "shard": task.shard, "ids": list(task.ids), "n_prompts": n,
            "stats": stats.to("cpu")}


def finish_calibration(job: StageJob, parts: Sequence[dict]) -> str:
    """Merge the shards' statistics (in shard order) and write the variant's calibration.json; its path."""
    from core.projection import MassiveDimStats
    from utils.calibration import CALIBRATION_TOP_K, write_calibration
    from utils.config import resolve_variant

    stats, n = MassiveDimStats(CALIBRATION_TOP_K), 0
    for part in sorted(parts, key=lambda p: p["shard"]):
        stats.merge(part["stats"])
        n += part["n_prompts"]
    variant = resolve_variant(job.experiment, job.kwargs.get("model_variant")).name
    cal = write_calibration(job.experiment, variant, stats, n, [job.kwargs["prompt_set"].strip("/")],
                            f"trait-batch: project --fused calibration, merged from {len(parts)} shards")
    return str(cal.path)



# ---------------------------------------------------------------------------------------------------
# Backends: where surveys and shards run

class Backend(Protocol):
    """Where a run's surveys and shards execute (inference/backends/: local, ray, modal).

        backend = RayBackend(opts)                      # or LocalBackend(opts), ModalBackend(opts)
        for out in backend.map("run_shard", tasks): ... # a result dict, a ShardFailed, or another exception each
        backend.close()
    """

    name: str              # local | ray | modal
    where: str             # the plan's "where" clause ("Ray: 2 workers of 1 CPU ...")
    workers: int           # how many shards run at once (the default shard count is a few per worker)
    shows_progress: bool   # whether the stage functions' progress bars reach this terminal
    pending_only: bool     # its workers cannot see the outputs here: send each shard only its missing ids
    dtype_bytes: int       # bytes per stored value when --dtype is not given (the plan's raw-size estimate)

    def survey(self, job: StageJob, prompt_ids: Optional[list[str]], limit: Optional[int],
               prior: Optional[StageSurvey] = None) -> StageSurvey: ...

    def map(self, method: str, tasks: Sequence[ShardTask]) -> Iterator[Any]:
        """`method` ("run_shard" or "calibrate_shard") over the tasks, in any order; a failure is yielded, not
        raised (a ShardFailed names its shard; any other exception is charged to the shards that returned
        nothing)."""
        ...

    def finish_calibration(self, job: StageJob, parts: list) -> str: ...

    def close(self) -> None: ...


def make_backend(opts: BatchOptions) -> Backend:
    """The backend `opts.backend` names, imported only now (ray and modal are imported by their own modules)."""
    module, _, cls = BACKENDS[opts.backend].partition(":")
    try:
        backend_module = importlib.import_module(module)
    except ImportError as e:   # ray and modal are pinned in requirements.txt, but a lean install may lack one
        raise BatchError(f"--backend {opts.backend} needs the {e.name or opts.backend} package: pip install -r "
                         f"requirements.txt (or pip install {'ray==2.60.0' if opts.backend == 'ray' else 'modal'})"
                         ) from e
    return getattr(backend_module, cls)(opts)


# ---------------------------------------------------------------------------------------------------
# The run

def _collect(outputs: Iterable[Any], tasks: Sequence[ShardTask], log: bool,
             on_result: Optional[Callable[[list, list], None]] = None) -> tuple[list[dict], list[dict]]:
    """(results, failures) of one map: a ShardFailed names its shard; any other error (a container that died, a
    failed model load) is charged to every shard that returned nothing. `on_result(results, failures)` after each."""
    results, failed, other = [], [], []
    for out in outputs:
        if isinstance(out, ShardFailed):
            failed.append({"stage": out.stage, "shard": out.shard, "ids": list(out.ids), "error": out.error,
                           "details": out.details})
        elif isinstance(out, BaseException):
            other.append(f"{type(out).__name__}: {out}")
        else:
            results.append(out)
            if log and "done" in out:
                print(f"{out['stage']}: shard {out['shard']} done, {out['done']} of {len(out['ids'])} prompts "
                      f"written in {out['seconds']:.1f} s", file=sys.stderr, flush=True)
        if on_result is not None:
            on_result(results, failed)
    seen = {r["shard"] for r in results} | {f["shard"] for f in failed}
    for task in tasks:
        if task.shard not in seen:
            failed.append({"stage": task.job.stage, "shard": task.shard, "ids": list(task.ids),
                           "error": "; ".join(other) or "no result came back", "details": ""})
    return results, sorted(failed, key=lambda f: f["shard"])


def run_stage(job: StageJob, s: StageSurvey, backend: Backend, n_shards: int,
              progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Cut the shards, compute a missing calibration (project), then run every shard with something left.
    `progress(event)` hears each finished shard: {stage, shards, run, finished, prompts, failed}."""
    shards = plan_shards(s.ids, s.tokens, n_shards)
    pending = set(s.pending)
    # a backend whose workers cannot see the outputs here (pending_only) is sent only the ids still missing
    only = getattr(backend, "pending_only", False)
    tasks = [ShardTask(job, k, tuple(i for i in ids if i in pending) if only else tuple(ids))
             for k, ids in enumerate(shards) if pending.intersection(ids)]
    out = {"stage": job.stage, "shards": len(shards), "run": len(tasks), "prompts": 0, "bytes": 0, "failed": [],
           "calibration": None, "pending": len(s.pending)}

    def report(results: list, failed: list) -> None:
        if progress is not None:
            progress({"stage": job.stage, "shards": len(shards), "run": len(tasks),
                      "finished": len(results) + len(failed), "prompts": sum(r["done"] for r in results),
                      "failed": [{"shard": f["shard"], "ids": f["ids"], "error": f["error"]} for f in failed]})
    if tasks and s.needs_calibration:
        every = [ShardTask(job, k, tuple(ids)) for k, ids in enumerate(shards)]
        parts, out["failed"] = _collect(backend.map("calibrate_shard", every), every, log=False)
        if out["failed"]:
            report([], out["failed"])
            return out
        out["calibration"] = backend.finish_calibration(job, parts)
        print(f"project: calibration over {len(s.ids)} prompts in {len(every)} shards -> {out['calibration']}",
              file=sys.stderr)
    report([], [])
    results, out["failed"] = _collect(backend.map("run_shard", tasks), tasks, log=True, on_result=report)
    report(results, out["failed"])
    out["prompts"] = sum(r["done"] for r in results)
    out["bytes"] = sum(r["bytes"] for r in results)
    out["workers"] = sorted({r["pid"] for r in results if "pid" in r})   # the processes that ran its shards
    return out


def _fixed_seed(opts: BatchOptions) -> BatchOptions:
    """Sampling without --seed: one seed for every shard (drawn here, printed), so shards sample alike."""
    if "generate" in opts.stages and opts.temperature > 0 and opts.seed is None:
        return dataclasses.replace(opts, seed=secrets.randbelow(2**31))
    return opts


def survey_all(opts: BatchOptions, backend: Backend, jobs: Sequence[StageJob]) -> list[StageSurvey]:
    ids = _prompt_ids(opts.prompt_ids)
    out: list[StageSurvey] = []
    for job in jobs:
        prior = out[0] if out and out[0].stage == "generate" else None
        out.append(backend.survey(job, ids, opts.limit, prior))
    return out


def _prompt_ids(text: Optional[str]) -> Optional[list[str]]:
    from utils.prompts import parse_prompt_ids

    return parse_prompt_ids(text)


def run_batch(opts: BatchOptions, backend: Backend, progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Print the plan, then run each stage in order; a stage with a failed shard stops the later stages.
    `progress` hears every finished shard (run_stage); the Modal orchestrator writes it to the Volume."""
    opts = _fixed_seed(opts)
    jobs = [stage_job(opts, s, progress=opts.progress and backend.shows_progress) for s in opts.stages]
    n_shards = opts.shards or SHARDS_PER_WORKER * backend.workers
    surveys = survey_all(opts, backend, jobs)
    print(format_plan(opts, backend, surveys, n_shards), flush=True)
    summary = {"dry_run": opts.dry_run, "backend": backend.name, "stages": [], "failed": [], "not_run": []}
    if opts.dry_run:
        return summary
    for i, job in enumerate(jobs):
        s = surveys[i] if i == 0 else backend.survey(job, _prompt_ids(opts.prompt_ids), opts.limit)
        stage = run_stage(job, s, backend, n_shards, progress)
        summary["stages"].append(stage)
        if stage["failed"]:
            summary["failed"] = stage["failed"]
            summary["not_run"] = [j.stage for j in jobs[i + 1:]]
            for f in stage["failed"]:
                print(f"FAILED {f['stage']} shard {f['shard']} ({ids_text(f['ids'])}): {f['error']}\n{f['details']}",
                      file=sys.stderr)
            break
    return summary


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def format_plan(opts: BatchOptions, backend: "Backend", surveys: Sequence[StageSurvey], n_shards: int) -> str:
    from inference.modal_common import variant_entry

    name, entry = variant_entry(opts.experiment, opts.model_variant or "")
    lines = [f"plan: experiment {opts.experiment}, variant {name} ({entry.get('model')}), prompt set "
             f"{opts.prompt_set}; {backend.where}; up to {n_shards} shards balanced by tokens"]
    if opts.seed is not None and opts.temperature > 0 and "generate" in opts.stages:
        lines.append(f"  sampling seed {opts.seed} (pass --seed {opts.seed} on a rerun to resume with the same "
                     f"samples)")
    for s in surveys:
        bound = " (prompt + --max-new-tokens: an upper bound)" if s.stage == "generate" or s.estimated else ""
        line = (f"  {s.stage:<9} {len(s.ids):,} prompts, {len(s.pending):,} to do, {s.pending_tokens:,} tokens{bound}; "
                f"writes ~{human_bytes(s.bytes)} ({s.detail})")
        if s.stage == "project":
            line += (f"; a raw capture of the same tokens: {human_bytes(s.pending_tokens * s.raw_bytes_per_token)} "
                     f"(all layers' residual)")
            line += "; calibration computed first over every prompt (none found)" if s.needs_calibration else ""
        line += "; exact numbers when the stage starts (generate writes its inputs)" if s.estimated else ""
        lines.append(line)
    if opts.dry_run:
        lines.append("dry run: nothing launched")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    if s["dry_run"]:
        return ""
    if s.get("detached"):
        return (f"started on Modal (function call {s['detached']}): the run goes on without this machine; follow it "
                f"with `python inference/modal_batch.py status --experiment {s['experiment']}`, then `pull`")
    parts = [f"{st['stage']}: {st['prompts']:,} prompts written by {st['run'] - len(st['failed'])} of {st['run']} "
             f"shards run ({st['shards']} in all" + (f"; {human_bytes(st['bytes'])})" if st["bytes"] else ")")
             + (f" in {len(st['workers'])} worker processes" if len(st.get("workers") or ()) > 1 else "")
             for st in s["stages"]]
    text = "; ".join(parts) or "nothing to do"
    if s["failed"]:
        ids = sum(len(f["ids"]) for f in s["failed"])
        which = "; ".join(ids_text(f["ids"]) for f in s["failed"])
        text += (f"; FAILED: {len(s['failed'])} shards ({ids} prompts: {which})"
                 f"{'; not run: ' + ', '.join(s['not_run']) if s['not_run'] else ''}; rerun the same command to finish "
                 f"the missing ids only")
    return text



# ---------------------------------------------------------------------------------------------------
# push / pull: the experiment tree between here and the Volume

def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def input_files(experiment: str, prompt_sets: Sequence[str] = (), model_variant: Optional[str] = None,
                with_responses: bool = False, response_ids: Optional[Iterable[str]] = None
                ) -> tuple[list[tuple[Path, str]], list[str]]:
    """(local file, path under the data root) for config.json, vectors (+ metadata), steering evidence, calibration
    files, the prompt sets (and their response JSONs with `with_responses`; only `response_ids` when given); plus
    notes on the variant's local model folders that cannot travel. What `push` sends to the Modal Volume and what a
    `--ray-collect` worker gets. Data-root paths are `experiments/{exp}/...` and `datasets/inference/{set}.json`."""
    from inference.modal_common import REMOTE_ROOT, image_mounts

    config = paths.config_path(experiment)
    if not config.is_file():
        raise BatchError(f"push: {config} not found (--experiment {experiment!r})")
    exp_dir, vol_exp, remote_exp = paths.experiment_dir(experiment), f"experiments/{experiment}", \
        f"{REMOTE_ROOT}/experiments/{experiment}"
    out = [(config, f"{vol_exp}/config.json")]
    for local, remote, ignore in image_mounts(experiment, model_variant or ""):   # the live chat's selection
        if remote.startswith(remote_exp + "/"):
            out += [(f, f"{vol_exp}/{remote[len(remote_exp) + 1:]}/{f.relative_to(local).as_posix()}")
                    for f in _files(local) if not ignore(f.relative_to(local))]
    for f in sorted(exp_dir.glob("inference/**/massive_activations/calibration.json")):
        out.append((f, f"{vol_exp}/{f.relative_to(exp_dir).as_posix()}"))
    for name in prompt_sets:
        f = paths.prompt_set_file(name)
        if not f.is_file():
            raise BatchError(f"push: --prompt-set {name!r}: {f} not found")
        out.append((f, f"datasets/inference/{name.strip('/')}.json"))
        if with_responses:
            for d in sorted(exp_dir.glob(f"inference/*/responses/{name.strip('/')}")):
                keep = None if response_ids is None else {f"{i}.json" for i in response_ids}
                out += [(f, f"{vol_exp}/{f.relative_to(exp_dir).as_posix()}") for f in _files(d)
                        if f.suffix == ".json" and (keep is None or f.name in keep)]
    return out, _unpushable_models(experiment, model_variant)


def _unpushable_models(experiment: str, model_variant: Optional[str]) -> list[str]:
    """Local model / LoRA folders of the variant that push does not send (only folders inside the experiment)."""
    from inference.modal_common import variant_entry

    name, entry = variant_entry(experiment, model_variant or "")
    exp_dir = Path(os.path.abspath(paths.experiment_dir(experiment)))   # a symlinked model folder inside it counts
    notes = []
    for key in ("model", "lora"):
        ref = entry.get(key)
        if not isinstance(ref, str) or not ref:
            continue
        folder = Path(ref) if Path(ref).is_absolute() else exp_dir / ref
        if not folder.exists():
            folder = paths.REPO_ROOT / ref
        inside = Path(os.path.normpath(os.path.abspath(folder))).is_relative_to(exp_dir)
        if folder.is_dir() and (Path(ref).is_absolute() or not inside):
            notes.append(f"variant {name}: {key} {ref} is a local folder outside the experiment, which the workers "
                         f"cannot see: use a hub id, or a folder under experiments/{experiment}/ named by a relative "
                         f"path, and push again")
    return notes



# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  trait-batch --backend local --shards 3 --experiment demo --prompt-set harmful --stages generate,capture,project
  trait-batch --backend ray --workers 2 --shards 6 --experiment demo --prompt-set harmful --stages generate,project
  trait-batch --backend ray --ray-address auto --workers 8 --gpus-per-worker 1 --experiment my_exp \\
      --prompt-set big_set --stages generate,project --max-new-tokens 400
  trait-batch --backend modal --gpus 8 --experiment my_exp --prompt-set big_set --detach
  trait-batch push --experiment my_exp --prompt-set big_set     (Modal: inputs to the Volume)
  trait-batch status --experiment my_exp                        (Modal: a --detach run's progress)
  trait-batch pull --experiment my_exp --skip-raw               (Modal: outputs back)

Backends: local runs the shards here, one after another (one model load). ray runs them on a Ray cluster
(--ray-address, else one started on this machine), one actor per --workers holding the model; outputs go
straight into the experiment folder (a filesystem every node shares) or, with --ray-collect, back to this
machine, which writes them. modal runs them on Modal GPUs against the Volume (push first; see
inference/modal_batch.py --help). Stages run in the order generate, capture, project; project is the fused
path (no raw files). Shards are cut from the prompt ids, balanced by tokens, the same on every rerun of the
same command; each shard skips files that exist, so a rerun finishes only what is missing.
Exit status: 0 done, 1 a shard failed (the others finished; rerun to resume), 2 bad input (nothing launched)."""


def build_parser(prog: str = "trait-batch", epilog: str = EPILOG) -> argparse.ArgumentParser:
    p = cli.Parser(prog=prog, epilog=epilog,
                   description="Run generate, capture and fused projection over shards of a prompt set, here "
                               "(--backend local), on a Ray cluster (ray) or on Modal GPUs (modal), into the "
                               "experiment layout. Also: push / pull / status for Modal (see below).")
    a = p.add_argument
    a("--experiment", required=True, help="experiment folder (on the Volume after `push`, for modal)")
    a("--prompt-set", required=True, help="prompt set (may be nested: a/b)")
    a("--stages", default="generate,project", help="comma list of generate, capture, project (default "
                                                   "generate,project)")
    a("--model-variant", help="variant every stage runs (default: defaults.application)")
    a("--prompt-ids", metavar="A,B", help="only these prompt ids (comma list)")
    a("--limit", type=int, help="only the first N prompts (natural id order)")
    run = p.add_argument_group("where")
    run.add_argument("--backend", choices=tuple(BACKENDS), help="local (default), ray or modal")
    run.add_argument("--local", dest="backend", action="store_const", const="local", help="= --backend local")
    run.add_argument("--shards", type=int, help=f"shards (default {SHARDS_PER_WORKER} per worker or container)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.add_argument("--quiet", action="store_true", help="no progress bars (local)")
    run.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights")
    run.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4) weights")
    r = p.add_argument_group("ray (--backend ray)")
    r.add_argument("--workers", type=int, default=1, help="actors, each holding one loaded model (default 1)")
    r.add_argument("--gpus-per-worker", type=float,
                   help="GPUs each actor reserves (default 1 when the cluster has GPUs, else 0)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    r.add_argument("--ray-address", metavar="ADDR", help="a running cluster (auto, ray://host:10001, host:6379); "
                                                         "default: start one on this machine")
    r.add_argument("--ray-collect", action="store_true",
                   help="workers do not share this filesystem: send each shard its inputs and write its outputs "
                        "here")
    m = p.add_argument_group("modal (--backend modal, inside `modal run inference/modal_batch.py`)")
    m.add_argument("--gpus", type=int, default=1, help="GPUs in all (containers = GPUS / GPUs per container)")
    m.add_argument("--gpu", help="GPU per container, e.g. H100 or H100:2 (default: by model size, as the live chat)")
    m.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="seconds one shard may run")
    m.add_argument("--detach", action="store_true", help="run the orchestrator on Modal (.spawn) and return: a closed "
                                                         "laptop does not stop the run; `trait-batch status` follows it")
    add_generate_flags(p.add_argument_group("generate (generate_responses.py)"))
    add_capture_flags(p.add_argument_group("capture (capture_raw_activations.py)"), layers_flag="--capture-layers")
    j = p.add_argument_group("project (project_raw_activations_onto_traits.py --fused)")
    add_projection_flags(j, layer_alias=False)   # the stage's own declaration (utils/flags.py): same names and help
    j.add_argument("--save-means", action="store_true", help="also write raw/means/{set}/{id}.pt (compare_variants)")
    s = p.add_argument_group("capture and project")
    s.add_argument("--responses-from", metavar="VARIANT", help="replay this variant's responses (model diff)")
    s.add_argument("--dtype", help="storage dtype: float16, bfloat16, float32 (default: the model's)")
    s.add_argument("--batch-size", type=int, help="prompts per forward / generate batch (default: automatic)")
    s.add_argument("--max-batch-tokens", type=int, help="padded tokens per forward (default: automatic)")
    return p


def run_cli(ns: argparse.Namespace, on_modal: bool = False, argv: Sequence[str] = ()) -> dict:
    """The run a parsed command line asks for, on its backend; the backend is closed afterwards."""
    opts = BatchOptions.from_args(ns)
    if opts.backend == "modal" and opts.detach:   # the deployed app's orchestrator: nothing waits here
        from inference.backends.modal import spawn_detached

        return {"dry_run": False, "detached": spawn_detached(argv), "experiment": opts.experiment, "stages": [],
                "failed": [], "not_run": []}
    if opts.backend == "modal" and not on_modal:
        raise BatchError("--backend modal runs inside Modal's CLI: `modal run inference/modal_batch.py --experiment "
                         "... --prompt-set ...` (after `python inference/modal_batch.py push ...`), or on the deployed "
                         "app with --detach; or --local (--backend local) / --backend ray to run here")
    backend = make_backend(opts)
    try:
        return run_batch(opts, backend)
    finally:
        backend.close()


MODAL_COMMANDS = ("push", "pull", "status")


def main(argv: Optional[list[str]] = None, on_modal: bool = False,
         parser: Optional[argparse.ArgumentParser] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODAL_COMMANDS:    # the Volume's commands: only they import modal
        from inference import modal_batch

        return modal_batch.main(argv)
    return cli.run(parser or build_parser(), lambda ns: run_cli(ns, on_modal, argv), format_summary, argv,
                   status=lambda s: 1 if s["failed"] else 0)


if __name__ == "__main__":
    sys.exit(main())
