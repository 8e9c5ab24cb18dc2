"""Projection math: scores of activations on trait vectors, token norms, and massive-dims statistics.

    unit_vectors(vectors[K, H] | [H])       -> fp32 unit rows (a zero or non-finite vector is an error)
    project(acts[..., H], vectors[K, H])    -> fp32 [..., K] scalar projections <h, v/|v|>, one matmul for all K
    score(acts[..., H], units[K, H])        -> fp32 [..., K]: the one scoring expression, on rows already made unit
                                            (unit_vectors) and placed on acts' device; the two-stage, fused
                                            (core/fused.py) and streaming (core/streaming.py) paths all call it
    token_norms(acts[..., H])               -> fp32 [...] |h| per token
    MassiveDimStats(top_k=5)                running per-layer statistics of activations -> calibration aggregate
                                            (top dims by |mean|, dim magnitude ratios per layer, mean token
                                            norm, mean alignment); works on the device, batched by prompt
    ProjectionError                         hidden-size mismatch, zero vector, wrong rank

A score is the scalar projection in activation units (not a cosine): divide by token_norms for cos.
No files and no model here; utils/ and inference/ call these.
"""
from __future__ import annotations

import torch
from core.errors import TraitError

__all__ = ["ProjectionError", "unit_vectors", "project", "score", "token_norms", "MassiveDimStats"]


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
    return score(acts, v.to(acts.device))


def score(acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K] scores of activations [..., H] on unit rows [K, H] (from unit_vectors, on acts' device)."""
    return acts.to(torch.float32) @ units.T


def token_norms(acts: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each activation row, in fp32."""
    return acts.to(torch.float32).norm(dim=-1)


class MassiveDimStats:
    """Per-layer running statistics of activation rows, for massive-dims calibration (CPU or GPU tensors).

        stats = MassiveDimStats(top_k=5)
        stats.add(layer, acts[n_tokens, hidden])                 # one prompt's tokens
        stats.add(layer, acts, segments=seg, n_segments=B)       # B prompts at once: seg[i] = prompt of row i
        stats.merge(other_stats)                                  # e.g. a batch kept apart until it succeeded
        stats.aggregate()
        # {"layers": [L, ...], "top_dims_by_layer": {"L": [d, ...]}, "dim_magnitude_by_layer": {"d": [r per layer]},
        #  "layer_norms": {"L": mean |h|}, "mean_alignment_by_layer": {"L": a}, "n_tokens_by_layer": {"L": n}}

    `top_dims_by_layer[L]` are the top_k dims by |mean| (largest first). The magnitude ratio of a dim at a
    layer is |mean[d]| / mean_d(|mean|), how many times larger than a typical dim it is; it is listed for every
    dim that is a top dim at some layer, one value per layer in `layers` order (the shape trait-interp's viewer
    plots). Mean alignment: per prompt, the mean cosine of its tokens with their own mean direction, averaged
    over prompts (how much the tokens share one direction). Sums are in fp64 on the tensors' device, so that
    millions of tokens do not drift and `add` never waits for the device.
    """

    EPS = 1e-8

    def __init__(self, top_k: int = 5):
        if top_k < 1:
            raise ProjectionError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self._sum: dict[int, torch.Tensor] = {}
        self._norm_sum: dict[int, torch.Tensor] = {}
        self._align_sum: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}
        self._prompts: dict[int, int] = {}

    def add(self, layer: int, acts: torch.Tensor, segments: torch.Tensor | None = None, n_segments: int = 1) -> None:
        """Add rows [n, hidden]; `segments` (long [n], values 0..n_segments-1, each non-empty) groups them by prompt."""
        if acts.ndim != 2:
            raise ProjectionError(f"calibration activations must be [tokens, hidden], got {tuple(acts.shape)}")
        if acts.shape[0] == 0:
            return
        a = acts.to(torch.float64)
        if layer in self._sum and self._sum[layer].shape[0] != a.shape[1]:
            raise ProjectionError(f"layer {layer}: hidden size changed from {self._sum[layer].shape[0]} to {a.shape[1]}")
        if segments is None:
            segments, n_segments = torch.zeros(a.shape[0], dtype=torch.long, device=a.device), 1
        norms = a.norm(dim=-1)
        counts = torch.zeros(n_segments, dtype=torch.float64, device=a.device).index_add_(
            0, segments, torch.ones_like(norms))
        means = torch.zeros(n_segments, a.shape[1], dtype=torch.float64, device=a.device).index_add_(0, segments, a)
        means /= counts[:, None]
        direction = means / (means.norm(dim=-1, keepdim=True) + self.EPS)
        cosines = ((a / (norms[:, None] + self.EPS)) * direction.index_select(0, segments)).sum(dim=-1)
        alignment = torch.zeros_like(counts).index_add_(0, segments, cosines) / counts
        self._sum[layer] = self._sum.get(layer, 0) + a.sum(dim=0)
        self._norm_sum[layer] = self._norm_sum.get(layer, 0) + norms.sum()
        self._align_sum[layer] = self._align_sum.get(layer, 0) + alignment.sum()
        self._count[layer] = self._count.get(layer, 0) + int(a.shape[0])
        self._prompts[layer] = self._prompts.get(layer, 0) + int(n_segments)

    def merge(self, other: "MassiveDimStats") -> None:
        """Add everything `other` accumulated (e.g. one batch, kept apart until its forward succeeded)."""
        for layer in other.layers:
            if layer in self._sum and self._sum[layer].shape[0] != other._sum[layer].shape[0]:
                raise ProjectionError(f"layer {layer}: hidden size changed from {self._sum[layer].shape[0]} to "
                                      f"{other._sum[layer].shape[0]}")
            for mine, theirs in ((self._sum, other._sum), (self._norm_sum, other._norm_sum),
                                 (self._align_sum, other._align_sum), (self._count, other._count),
                                 (self._prompts, other._prompts)):
                mine[layer] = mine.get(layer, 0) + theirs[layer]

    def to(self, device: str | torch.device) -> "MassiveDimStats":
        """The sums moved to `device`, in place (e.g. "cpu" before the statistics leave a GPU worker)."""
        for sums in (self._sum, self._norm_sum, self._align_sum):
            for layer, t in sums.items():
                sums[layer] = t.to(device)
        return self

    @property
    def layers(self) -> list[int]:
        return sorted(self._sum)

    def mean(self, layer: int) -> torch.Tensor:
        return self._sum[layer].cpu() / self._count[layer]

    def aggregate(self) -> dict:
        layers = self.layers
        absmeans = {layer: self.mean(layer).abs() for layer in layers}
        typical = {layer: float(m.mean()) for layer, m in absmeans.items()}
        top = {str(layer): [int(d) for d in torch.topk(m, min(self.top_k, m.shape[0])).indices.tolist()]
               for layer, m in absmeans.items()}
        dims = sorted({d for ds in top.values() for d in ds})
        magnitude = {str(d): [float(absmeans[layer][d]) / typical[layer] if typical[layer] > 0 else 0.0
                              for layer in layers] for d in dims}
        return {
            "layers": layers, "top_dims_by_layer": top, "dim_magnitude_by_layer": magnitude,
            "layer_norms": {str(layer): float(self._norm_sum[layer]) / self._count[layer] for layer in layers},
            "mean_alignment_by_layer": {str(layer): float(self._align_sum[layer]) / self._prompts[layer]
                                        for layer in layers},
            "n_tokens_by_layer": {str(layer): self._count[layer] for layer in layers},
        }
