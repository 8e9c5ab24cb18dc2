"""Where a batch run's shards execute: one module per backend, each implementing inference.batch.Backend.

    local.py   LocalBackend: this process, one shard after another, one model load
    ray.py     RayBackend: a Ray cluster, one actor per worker holding the model, shards as tasks
    modal.py   ModalBackend: Modal GPU containers over the Volume (inside `modal run inference/modal_batch.py`)

Only the chosen backend's library is imported (ray by ray.py, modal by the Modal app it drives).
"""
