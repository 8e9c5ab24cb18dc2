#!/usr/bin/env python3
"""The batch engine on Modal: the app `trait-batch` (GPU workers, an orchestrator, the Volume) and its commands.

    python inference/modal_batch.py push --experiment E --prompt-set S    config, vectors, evidence, set -> Volume
    modal run inference/modal_batch.py --experiment E --prompt-set S --gpus 8 [...]   orchestrated from here
    modal deploy inference/modal_batch.py                                 the app, once (for --detach)
    python inference/modal_batch.py --experiment E --prompt-set S --gpus 8 --detach   the orchestrator runs on
                                                                          Modal (.spawn); a closed laptop is fine
    python inference/modal_batch.py status --experiment E                 a run's progress, read from the Volume
    python inference/modal_batch.py pull --experiment E [--skip-raw]      outputs back, many files at once
    python inference/modal_batch.py --local ...                           = trait-batch --backend local ...

    app, data_volume (version 2), cache_volume, image    the app's objects (built at import; no network)
    BatchWorker            @app.cls: one ShardWorker (inference/batch.py) per container, the Volume reloaded
                           before and committed after every shard
    warm_model_cache       one container downloads the weights into the model-cache Volume before the fan-out
    survey_on_volume, calibration_on_volume   the engine's survey and calibration merge, next to the Volume
    orchestrate(argv)      the whole run inside Modal (run_batch over ModalBackend), progress on the Volume
    push / pull / read_status   the Volume's side of the commands (thread pools: many files at once)
    main(argv)             the commands above; `modal run` passes its arguments through (`--help` works there)

The engine (shards, the worker, the run) is inference/batch.py and the backend inference/backends/modal.py; this
is the only batch module that imports modal when it is imported. Weights come from the live chat's HF-cache
Volume; gated models need a Modal secret named by $TRAIT_HF_SECRET (HF_TOKEN), attached only when it is set.
"""
# No `from __future__ import annotations`: Modal reads the class's annotations at runtime.
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):   # `python inference/modal_batch.py push` without `pip install -e .`: the repo first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modal

from inference.batch import (BatchError, ShardTask, ShardWorker, StageJob, StageSurvey, build_parser,
                             finish_calibration, format_summary, human_bytes, input_files, run_batch, survey)
from inference.modal_common import (CACHE_DIR, CACHE_VOLUME, DEFAULT_GPU, ModalSettings, build_image, building_app)
from utils import cli, paths

APP_NAME = "trait-batch"
DATA_DIR = "/data"                                                 # the Volume inside every container
DATA_VOLUME = os.environ.get("TRAIT_BATCH_VOLUME") or "trait-experiments"
STATUS_DIR = "batch_status"        # on the Volume: {exp}.json, the progress of the latest run of an experiment
TRANSFER_THREADS = 32              # files in flight at once in push / pull
DEFAULT_TIMEOUT = 4 * 3600         # seconds one shard may run
ORCHESTRATOR_TIMEOUT = 24 * 3600   # Modal's longest function timeout: the whole run

SETTINGS = ModalSettings.from_env()
if building_app():
    SETTINGS.check()

# Volume.from_name / Secret.from_name are lazy handles: importing needs no network. Version 2 Volumes take many
# concurrent writers and hundreds of thousands of files (10,000 prompts x 10 traits is 110k files).
app = modal.App(APP_NAME)
data_volume = modal.Volume.from_name(DATA_VOLUME, create_if_missing=True, version=2)
cache_volume = modal.Volume.from_name(CACHE_VOLUME, create_if_missing=True)
secrets = SETTINGS.secrets()
image = build_image("", env={"TRAIT_EXPERIMENTS_DIR": f"{DATA_DIR}/experiments",
                             "TRAIT_DATASETS_DIR": f"{DATA_DIR}/datasets", "TRAIT_HF_SECRET": SETTINGS.hf_secret,
                             "TRAIT_BATCH_VOLUME": DATA_VOLUME})
VOLUMES = {DATA_DIR: data_volume, CACHE_DIR: cache_volume}


@app.cls(image=image, gpu=DEFAULT_GPU, volumes=VOLUMES, secrets=secrets, timeout=DEFAULT_TIMEOUT,
         scaledown_window=300)
class BatchWorker:
    """One ShardWorker per container; every method works on the Volume's experiment tree.

        w = BatchWorker(experiment="demo", model_variant="instruct")
        list(w.run_shard.map(tasks, order_outputs=False, return_exceptions=True))   # on Modal
        w.run_shard.local(task)                                                     # here: loads once, then runs
    """

    experiment: str = modal.parameter()
    model_variant: str = modal.parameter(default="")
    quantization: str = modal.parameter(default="")

    @modal.enter()
    def load(self) -> None:
        self.worker = ShardWorker(self.experiment, self.model_variant or None, self.quantization)
        if not modal.is_local():
            data_volume.reload()      # the config and vectors pushed since the container started
        self.worker.load()

    @modal.method()
    def run_shard(self, task: ShardTask) -> dict:
        return self._on_volume(self.worker.run, task)

    @modal.method()
    def calibrate_shard(self, task: ShardTask) -> dict:
        return self._on_volume(self.worker.calibrate, task)

    def _on_volume(self, fn, task: ShardTask) -> dict:
        if modal.is_local():
            return fn(task)
        data_volume.reload()          # what other containers committed (an earlier stage's files)
        try:
            return fn(task)
        finally:
            data_volume.commit()      # the shard's files, complete ones even when it failed part-way


@app.function(image=image, volumes=VOLUMES, secrets=secrets, timeout=3 * 3600)
def warm_model_cache(experiment: str, model_variant: str = "") -> dict:
    """Download the variant's weights (and LoRA) into the model-cache Volume, once, before the workers start:
    otherwise every container of the fan-out downloads the same files at the same time."""
    from utils.config import resolve_variant
    from utils.model import load_model_config

    if not modal.is_local():
        data_volume.reload()
    variant = resolve_variant(experiment, model_variant or None)
    t0 = time.perf_counter()
    fetched = download_weights([variant.model_path(experiment), variant.lora_path(experiment)])
    load_model_config(variant.model_path(experiment))
    if not modal.is_local():
        cache_volume.commit()
    return {"variant": variant.name, "fetched": fetched, "seconds": time.perf_counter() - t0}


def download_weights(refs: Sequence[Optional[str]]) -> list[str]:
    """Each hub id among `refs` downloaded into HF_HOME (the model-cache Volume in a container); local folders
    (on the Volume already) and None are skipped. The hub ids fetched."""
    fetched = []
    for ref in refs:
        if isinstance(ref, str) and ref and not Path(ref).exists():
            from huggingface_hub import snapshot_download

            snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                   "*.tiktoken"])
            fetched.append(ref)
    return fetched


@app.function(image=image, volumes=VOLUMES, secrets=secrets, timeout=3600)
def survey_on_volume(job: StageJob, prompt_ids: Optional[list] = None, limit: Optional[int] = None,
                     dtype_bytes: int = 2, prior: Optional[StageSurvey] = None) -> StageSurvey:
    data_volume.reload()
    return survey(job, prompt_ids, limit, dtype_bytes, prior)


@app.function(image=image, volumes={DATA_DIR: data_volume}, timeout=900)
def calibration_on_volume(job: StageJob, parts: list) -> str:
    data_volume.reload()
    path = finish_calibration(job, parts)
    data_volume.commit()
    return path


@app.function(image=image, volumes=VOLUMES, secrets=secrets, timeout=ORCHESTRATOR_TIMEOUT)
def orchestrate(argv: list) -> dict:
    """The whole run inside Modal (what `--detach` spawns): surveys, shards, calibration, each stage in turn,
    its progress written to the Volume after every shard (`status`). Nothing depends on the caller staying."""
    from inference.backends.modal import ModalBackend
    from inference.batch import BatchOptions

    ns = build_parser().parse_args(argv)
    opts = BatchOptions.from_args(ns)
    status = StatusWriter(opts.experiment, argv, modal.current_function_call_id() or "")
    try:
        summary = run_batch(opts, ModalBackend(opts), progress=status.update)
    except BaseException as e:
        status.finish(None, f"{type(e).__name__}: {e}")
        raise
    status.finish(summary)
    return summary


class StatusWriter:
    """The progress of one orchestrated run, as JSON on the Volume (batch_status/{exp}.json), after every event."""

    def __init__(self, experiment: str, argv: Sequence[str], call_id: str):
        self.path = Path(DATA_DIR) / STATUS_DIR / f"{experiment}.json"
        self.state = {"experiment": experiment, "argv": list(argv), "call_id": call_id, "state": "running",
                      "started": time.time(), "updated": time.time(), "stages": [], "summary": None, "error": None}
        self._write()

    def update(self, event: dict) -> None:
        stages = [s for s in self.state["stages"] if s["stage"] != event["stage"]]
        self.state["stages"] = stages + [event]
        self._write()

    def finish(self, summary: Optional[dict], error: Optional[str] = None) -> None:
        self.state["state"] = "failed" if error or (summary and summary["failed"]) else "done"
        self.state["summary"] = format_summary(summary) if summary else None
        self.state["error"] = error
        self._write()

    def _write(self) -> None:
        from utils.storage import write_json

        self.state["updated"] = time.time()
        write_json(self.path, self.state)
        if not modal.is_local():
            data_volume.commit()


# ---------------------------------------------------------------------------------------------------
# push / pull / status: the experiment tree between here and the Volume, many files at once

def push(volume, experiment: str, prompt_sets: Sequence[str] = (), model_variant: Optional[str] = None,
         with_responses: bool = False, threads: int = TRANSFER_THREADS) -> dict:
    """Upload inputs_files(...) in `threads` batches at once (each a Volume batch_upload)."""
    files, notes = input_files(experiment, prompt_sets, model_variant, with_responses)
    chunks = [files[k::threads] for k in range(min(threads, len(files)))]

    def upload(chunk) -> None:
        with volume.batch_upload(force=True) as batch:
            for local, remote in chunk:
                batch.put_file(str(local), "/" + remote)
    with ThreadPoolExecutor(max(1, len(chunks))) as pool:
        list(pool.map(upload, chunks))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return {"command": "push", "files": len(files), "bytes": sum(f.stat().st_size for f, _ in files),
            "volume": DATA_VOLUME, "notes": notes}


def pull(volume, experiment: str, skip_raw: bool = False, threads: int = TRANSFER_THREADS) -> dict:
    """Download experiments/{exp}/inference/ from the Volume, `threads` files at once; a local file as new as the
    Volume's is kept. Each file is written atomically and gets the Volume's mtime, so a second pull fetches only
    what changed."""
    from modal.exception import NotFoundError
    from modal.volume import FileEntryType

    from utils.storage import atomic_write

    prefix = f"experiments/{experiment}/inference"
    try:
        entries = volume.listdir(prefix, recursive=True)
    except NotFoundError as e:
        raise BatchError(f"pull: nothing under {prefix} on the Volume {DATA_VOLUME}") from e
    got = {"command": "pull", "downloaded": 0, "kept_newer": 0, "skipped_raw": 0, "bytes": 0, "volume": DATA_VOLUME}
    todo = []
    for e in entries:
        name = e.path.rsplit("/", 1)[-1]
        if e.type != FileEntryType.FILE or name.startswith("."):   # folders; a killed writer's temporary file
            continue
        if skip_raw and "/raw/residual/" in e.path:
            got["skipped_raw"] += 1
            continue
        local = paths.experiments_root() / e.path.lstrip("/").split("/", 1)[1]
        if local.exists() and local.stat().st_mtime >= e.mtime:
            got["kept_newer"] += 1
            continue
        todo.append((e, local))

    def fetch(item) -> int:
        e, local = item
        with atomic_write(local) as tmp:
            with open(tmp, "wb") as fh:
                volume.read_file_into_fileobj(e.path, fh)
        os.utime(local, (e.mtime, e.mtime))
        return e.size
    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        sizes = list(pool.map(fetch, todo))
    got["downloaded"], got["bytes"] = len(sizes), sum(sizes)
    return got


def read_status(volume, experiment: str) -> dict:
    """The latest orchestrated run's progress (batch_status/{exp}.json on the Volume)."""
    import json

    from modal.exception import NotFoundError

    try:
        data = b"".join(volume.read_file(f"{STATUS_DIR}/{experiment}.json"))
    except NotFoundError as e:
        raise BatchError(f"status: no run of --experiment {experiment} on the Volume {DATA_VOLUME} "
                         f"(started with --detach)") from e
    return {"command": "status", **json.loads(data)}


def format_transfer(s: dict) -> str:
    if s["command"] == "push":
        return f"pushed {s['files']} files ({human_bytes(s['bytes'])}) to the Volume {s['volume']}"
    if s["command"] == "status":
        ago = time.time() - s["updated"]
        lines = [f"{s['experiment']}: {s['state']} (call {s['call_id'] or '?'}), updated {ago:,.0f} s ago, "
                 f"running for {s['updated'] - s['started']:,.0f} s"]
        for st in s["stages"]:
            lines.append(f"  {st['stage']}: {st['finished']} of {st['run']} shards finished ({st['shards']} in all), "
                         f"{st['prompts']:,} prompts written" + (f", {len(st['failed'])} failed" if st["failed"]
                                                                 else ""))
        if s["summary"] or s["error"]:
            lines.append(f"  {s['error'] or s['summary']}")
        return "\n".join(lines)
    return (f"pulled {s['downloaded']} files ({human_bytes(s['bytes'])}) from the Volume {s['volume']}; kept "
            f"{s['kept_newer']} local files as new or newer" + (f"; skipped {s['skipped_raw']} raw files"
                                                                  if s["skipped_raw"] else ""))


# ---------------------------------------------------------------------------------------------------
# CLI

TRANSFER_HELP = {"push": "Send config.json, vectors, steering evidence, calibration and prompt sets to the Volume.",
                 "pull": "Bring experiments/E/inference/ back from the Volume; local files as new or newer are kept.",
                 "status": "The progress of the latest --detach run of an experiment, read from the Volume."}


def build_transfer_parser(command: str):
    p = cli.Parser(prog=f"modal_batch.py {command}", description=TRANSFER_HELP[command],
                   epilog=f"example:\n  python inference/modal_batch.py {command} --experiment demo"
                          + (" --prompt-set harmful" if command == "push" else ""))
    p.add_argument("--experiment", required=True)
    if command == "push":
        p.add_argument("--prompt-set", action="append", default=[], help="a prompt set to send (repeatable)")
        p.add_argument("--model-variant", help="whose local model / LoRA folder inside the experiment to send")
        p.add_argument("--with-responses", action="store_true", help="also the sets' response JSONs")
    elif command == "pull":
        p.add_argument("--skip-raw", action="store_true", help="leave raw/residual/ activations on the Volume")
    return p


def _transfer(command: str, ns) -> dict:
    if command == "push":
        return push(data_volume, ns.experiment, ns.prompt_set, ns.model_variant, ns.with_responses)
    if command == "status":
        return read_status(data_volume, ns.experiment)
    return pull(data_volume, ns.experiment, ns.skip_raw)


MODAL_EPILOG = f"""\
examples:
  python inference/modal_batch.py push --experiment demo --prompt-set harmful   # needs a Modal account
  modal run inference/modal_batch.py --experiment demo --prompt-set harmful --stages generate,project --gpus 8
  modal run inference/modal_batch.py --experiment demo --prompt-set harmful --gpus 8 --dry-run
  modal deploy inference/modal_batch.py
  python inference/modal_batch.py --experiment demo --prompt-set harmful --gpus 8 --detach   # needs a Modal account
  python inference/modal_batch.py status --experiment demo   # needs a Modal account
  python inference/modal_batch.py pull --experiment demo --skip-raw   # needs a Modal account
  python inference/modal_batch.py --local --shards 3 --experiment demo --prompt-set harmful --dry-run

This file's backend is modal (--local / --backend ray run elsewhere, as trait-batch does). `modal run` orchestrates
from this machine; --detach starts the deployed app's orchestrator (.spawn) and returns: a closed laptop does not
stop the run, `status` reads its progress from the Volume. One container first downloads the weights into the
model-cache Volume; then the GPU containers start. The Volume is {DATA_VOLUME} ($TRAIT_BATCH_VOLUME, version 2);
the same transfers by hand:
  modal volume put {DATA_VOLUME} experiments/E/config.json experiments/E/config.json
  modal volume put {DATA_VOLUME} datasets/inference/S.json datasets/inference/S.json
  modal volume get {DATA_VOLUME} experiments/E/inference experiments/E   (refuses existing files; --force overwrites)
Gated models: `modal secret create huggingface HF_TOKEN=hf_...` and TRAIT_HF_SECRET=huggingface when deploying
or running (no secret is attached without it).
Exit status: 0 done, 1 a shard failed (the others finished; rerun to resume), 2 bad input (nothing launched)."""


def build_modal_parser():
    return build_parser(prog="modal_batch.py", epilog=MODAL_EPILOG)


def with_backend(argv: Sequence[str]) -> list[str]:
    """This file's default backend is modal; `--local` / `--backend X` choose another."""
    argv = list(argv)
    return argv if "--local" in argv or any(a == "--backend" or a.startswith("--backend=") for a in argv) \
        else ["--backend", "modal", *argv]


def main(argv: Optional[list] = None, on_modal: bool = False) -> int:
    from inference import batch

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in batch.MODAL_COMMANDS:
        return cli.run(build_transfer_parser(argv[0]), lambda ns: _transfer(argv[0], ns), format_transfer, argv[1:])
    return batch.main(with_backend(argv), on_modal=on_modal, parser=build_modal_parser())


@app.local_entrypoint()
def batch_entrypoint(*arglist):
    """`modal run inference/modal_batch.py --experiment E ...`: every flag of `modal_batch.py --help`."""
    code = main(list(arglist), on_modal=True)
    if code:
        sys.exit(code)


def modal_run_asks_for_help(argv: Sequence[str]) -> bool:
    """`modal run inference/modal_batch.py --help`: Modal's click command would answer with its own empty help for
    the entrypoint (it owns --help); the module is imported first, so it answers with ours."""
    argv = list(argv)
    at = next((k for k, a in enumerate(argv) if Path(a.split("::")[0]).name == "modal_batch.py"), None)
    return building_app() and "run" in argv[:at or 0] and at is not None and \
        any(a in ("--help", "-h") for a in argv[at + 1:])


if modal_run_asks_for_help(sys.argv):
    build_modal_parser().print_help()
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
