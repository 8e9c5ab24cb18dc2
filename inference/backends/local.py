"""The local backend: every shard in this process, one after another, with one loaded model.

    backend = LocalBackend(opts)
    run_batch(opts, backend)        # the same shards as on Ray or Modal; the model is loaded once

What the tests and a laptop use, and the oracle the other backends are compared with.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from inference.batch import BatchOptions, ShardTask, ShardWorker, StageJob, StageSurvey, finish_calibration, survey


class LocalBackend:
    name = "local"
    where = "here, shards one after another"
    workers = 1
    shows_progress = True
    pending_only = False

    def __init__(self, opts: BatchOptions):
        from utils.model import resolve_dtype

        self.worker = ShardWorker(opts.experiment, opts.model_variant, opts.quantization)
        self.dtype_bytes = resolve_dtype("auto").itemsize

    def survey(self, job: StageJob, prompt_ids: Optional[list[str]], limit: Optional[int],
               prior: Optional[StageSurvey] = None) -> StageSurvey:
        return survey(job, prompt_ids, limit, self.dtype_bytes, prior)

    def map(self, method: str, tasks: Sequence[ShardTask]) -> Iterator[Any]:
        fn = {"run_shard": self.worker.run, "calibrate_shard": self.worker.calibrate}[method]
        for task in tasks:
            try:
                yield fn(task)
            except Exception as e:   # what the other backends yield: a failure is a value, the next shard runs
                yield e

    def finish_calibration(self, job: StageJob, parts: list) -> str:
        return finish_calibration(job, parts)

    def close(self) -> None:
        pass
