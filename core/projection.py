"""Projection math: scores of activations on trait vectors, token norms, and massive-dims statistics.

    unit_vectors(vectors[K, H] | [H])       -> fp32 unit rows (a zero or non-finite vector is an error)
    project(acts[..., H], vectors[K, H])    -> fp32 [..., K] scalar projections <h, v/|v|>, one matmul for all K
    token_norms(acts[..., H])               -> fp32 [...] |h| per token
    MassiveDimStats(top_k=5)                running per-layer mean of activations -> calibration aggregate
                                            (top dims by |mean|, dim magnitude ratios, mean token norm)
    ProjectionError                         hidden-size mismatch, zero vector, wrong rank

A score is the scalar projection in activation units (not a cosine): divide by token_norms for cos.
No files and no model here; utils/ and inference/ call these.
"""
from __future__ import annotations

import torch
from core.errors import TraitError

__all__ = ["ProjectionError", "unit_vectors", "project", "token_norms", "MassiveDimStats"]


class ProjectionError(TraitError):
    """Activations and vectors that cannot be projected (shape, zero vector); the message says which."""


def unit_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in fp32; a 1-D vector becomes one row."""
    v = vectors.detach().to(torch.float32)
    if v.ndim == 1:
        v = v.unsqueeze(0)
    if v.ndim != 2:
        raise ProjectionError(f"vectors must be [K, hidden] or [hidden], got shape {tuple(vectors.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ProjectionError("a vector contains NaN or inf")
    norms = v.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ProjectionError("a vector has zero norm: it has no direction to project onto")
    return v / norms


def project(acts: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Scalar projections of every activation row onto every vector: fp32 [..., K] (K=1 kept for a 1-D vector)."""
    v = unit_vectors(vectors)
    if acts.shape[-1] != v.shape[-1]:
        raise ProjectionError(
            f"hidden size mismatch: activations have {acts.shape[-1]} dims, vectors have {v.shape[-1]}"
        )
    return acts.to(torch.float32) @ v.to(acts.device).T


def token_norms(acts: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each activation row, in fp32."""
    return acts.to(torch.float32).norm(dim=-1)


class MassiveDimStats:
    """Per-layer running mean of activation rows, for massive-dims calibration.

        stats = MassiveDimStats(top_k=5)
        stats.add(layer, acts[n_tokens, hidden])     # any number of prompts, any number of layers
        stats.aggregate()   # {"top_dims_by_layer": {"L": [d, ...]}, "dim_magnitude_by_layer": {"L": {"d": r}},
                            #  "layer_norms": {"L": mean |h|}, "n_tokens_by_layer": {"L": n}}

    `top_dims_by_layer[L]` are the top_k dims by |mean| (largest first); the magnitude ratio of a dim is
    |mean[d]| / mean_d(|mean|), i.e. how many times larger than a typical dim it is. Sums are in fp64
    so that millions of tokens do not drift.
    """

    def __init__(self, top_k: int = 5):
        if top_k < 1:
            raise ProjectionError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self._sum: dict[int, torch.Tensor] = {}
        self._norm_sum: dict[int, float] = {}
        self._count: dict[int, int] = {}

    def add(self, layer: int, acts: torch.Tensor) -> None:
        if acts.ndim != 2:
            raise ProjectionError(f"calibration activations must be [tokens, hidden], got {tuple(acts.shape)}")
        if acts.shape[0] == 0:
            return
        a = acts.to(torch.float64)
        if layer in self._sum and self._sum[layer].shape[0] != a.shape[1]:
            raise ProjectionError(f"layer {layer}: hidden size changed from {self._sum[layer].shape[0]} to {a.shape[1]}")
        self._sum[layer] = self._sum.get(layer, 0) + a.sum(dim=0)
        self._norm_sum[layer] = self._norm_sum.get(layer, 0.0) + float(a.norm(dim=-1).sum())
        self._count[layer] = self._count.get(layer, 0) + int(a.shape[0])

    @property
    def layers(self) -> list[int]:
        return sorted(self._sum)

    def mean(self, layer: int) -> torch.Tensor:
        return self._sum[layer] / self._count[layer]

    def aggregate(self) -> dict:
        top: dict[str, list[int]] = {}
        magnitude: dict[str, dict[str, float]] = {}
        norms: dict[str, float] = {}
        counts: dict[str, int] = {}
        for layer in self.layers:
            absmean = self.mean(layer).abs()
            typical = float(absmean.mean())
            k = min(self.top_k, absmean.shape[0])
            dims = torch.topk(absmean, k).indices.tolist()
            key = str(layer)
            top[key] = [int(d) for d in dims]
            magnitude[key] = {str(d): (float(absmean[d]) / typical if typical > 0 else 0.0) for d in dims}
            norms[key] = self._norm_sum[layer] / self._count[layer]
            counts[key] = self._count[layer]
        return {"top_dims_by_layer": top, "dim_magnitude_by_layer": magnitude, "layer_norms": norms,
                "n_tokens_by_layer": counts}
