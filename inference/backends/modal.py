"""The Modal backend: surveys in a CPU function, shards on GPU containers, all on the Volume.

    backend = ModalBackend(opts)                  # inside `modal run inference/modal_batch.py` or the orchestrator
    run_batch(opts, backend)                      # the weights cached by one container first, then the fan-out
    spawn_detached(argv)                          # --detach: the deployed app's orchestrator runs the whole thing

The app itself (the worker class, the functions, the Volume) is inference/modal_batch.py, imported here only
when this backend is built: importing this module does not import modal.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from inference.batch import BatchError, BatchOptions, ShardTask, StageJob, StageSurvey

MAX_MAP_INPUTS = 1000              # Modal's limit on inputs in flight per .map call


def gpu_count(gpu: str) -> int:
    """GPUs per container of a Modal GPU string: H100 -> 1, H100:2 -> 2."""
    _, _, n = gpu.partition(":")
    if n and not n.isdigit():
        raise BatchError(f"--gpu {gpu!r}: expected a type such as H100 or H100:2")
    return int(n) if n else 1


class ModalBackend:
    name = "modal"
    shows_progress = False
    pending_only = False   # the containers see the Volume's files: every shard skips what exists there

    def __init__(self, opts: BatchOptions):
        from inference import modal_batch as mb
        from inference.modal_common import gpu_for_model, variant_entry

        self.mb, self.opts = mb, opts
        model = variant_entry(opts.experiment, opts.model_variant or "")[1].get("model")
        self.gpu = opts.gpu or gpu_for_model(model, opts.quantization)   # the live chat's table
        self.workers = max(1, opts.gpus // gpu_count(self.gpu))          # containers
        self.dtype_bytes = 2                                              # bf16 on a GPU
        self.where = (f"Modal: {self.workers} containers of {self.gpu} ({self.workers * gpu_count(self.gpu)} GPUs), "
                      f"Volume {mb.DATA_VOLUME}")
        cls = mb.BatchWorker.with_options(gpu=self.gpu, max_containers=self.workers, timeout=opts.timeout)
        self.obj = cls(experiment=opts.experiment, model_variant=opts.model_variant or "",
                       quantization=opts.quantization)
        self.warmed = False

    def survey(self, job: StageJob, prompt_ids: Optional[list[str]], limit: Optional[int],
               prior: Optional[StageSurvey] = None) -> StageSurvey:
        return self.mb.survey_on_volume.remote(job, prompt_ids, limit, self.dtype_bytes, prior)

    def map(self, method: str, tasks: Sequence[ShardTask]) -> Iterator[Any]:
        if not self.warmed:   # one download into the model-cache Volume, not one per container at once
            self.mb.warm_model_cache.remote(self.opts.experiment, self.opts.model_variant or "")
            self.warmed = True
        fn = getattr(self.obj, method)
        for start in range(0, len(tasks), MAX_MAP_INPUTS):
            yield from fn.map(list(tasks[start:start + MAX_MAP_INPUTS]), order_outputs=False, return_exceptions=True)

    def finish_calibration(self, job: StageJob, parts: list) -> str:
        return self.mb.calibration_on_volume.remote(job, parts)

    def close(self) -> None:
        pass


def spawn_detached(argv: Sequence[str]) -> str:
    """Start the deployed app's orchestrator with these flags (`.spawn`) and return its call id at once."""
    import modal
    from modal.exception import NotFoundError

    from inference.modal_batch import APP_NAME

    try:
        fn = modal.Function.from_name(APP_NAME, "orchestrate")
        return fn.spawn([a for a in argv if a != "--detach"]).object_id
    except NotFoundError as e:
        raise BatchError(f"--detach: the app {APP_NAME} is not deployed; run `modal deploy inference/modal_batch.py` "
                         f"once, then this command again") from e
