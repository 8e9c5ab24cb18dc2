"""Vector cards: the held-out evidence for every vector of a trait, one JSON next to its vectors (docs/formats.md).

    card_path(exp, trait, variant) -> Path          extraction/{trait}/{variant}/vectors/card.json
    auroc(pos, neg) -> float                        P(a positive scores above a negative), ties count 1/2
    recall_at_fpr(pos, neutral, fpr) -> (recall, threshold)   positives above the neutral corpus's top-fpr score
    random_directions(hidden, n, seed) -> Tensor[n, H]          seeded unit directions (the chance level)
    layer_card(vector, train_pos, train_neg, val_pos, val_neg, neutral, ...) -> dict   one layer's entry
    read_card(path) -> Card / write_card(path, card)            validating reader, atomic writer
    card_layer_entry(exp, trait, variant, pos_dir, component, method, layer) -> dict | None
    top_layers(card, pos_dir, component, method, k) -> [layer]  the layers a steering sweep starts from
    format_card_table(card, sets=None, max_rows=12) -> str      a readable terminal table
    CardError                                                   a TraitError naming the file

A card entry per (pos_dir, component, method) set and layer:
    auroc, accuracy        held-out: P(positive > negative); share on the right side of the baseline
    recall_at_fpr          held-out positives scoring above the threshold that lets `fpr` (1%) of the neutral
                           corpus (datasets/neutral/sentences.txt) through; neutral_threshold is that score
    random_auroc_mean/max  the same AUROC for `n_random` (32) seeded random unit directions, each signed so that
                           the training positives score higher (as a fitted vector is): the chance level
    sign_ok                the held-out positives score higher than the negatives on average
    baseline, pos_mean, neg_mean, pos_std, neg_std, spread     the reference points (utils.vectors.Reference)
    n_pos, n_neg, n_neutral
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.errors import TraitError
from utils import paths
from utils.storage import StorageError, read_json, write_json

__all__ = ["CardError", "Card", "card_path", "auroc", "recall_at_fpr", "random_directions", "layer_card",
           "read_card", "write_card", "card_layer_entry", "top_layers", "format_card_table", "set_key",
           "CARD_FORMAT", "DEFAULT_FPR", "DEFAULT_N_RANDOM", "neutral_corpus_path", "read_neutral_corpus"]

CARD_FORMAT = "trait-inference vector card v1"
DEFAULT_FPR = 0.01
DEFAULT_N_RANDOM = 32
LAYER_KEYS = ("auroc", "accuracy", "recall_at_fpr", "neutral_threshold", "random_auroc_mean", "random_auroc_max",
              "baseline", "pos_mean", "neg_mean", "pos_std", "neg_std", "spread")


class CardError(TraitError):
    """A card file is missing or malformed; the message names the file and what is wrong."""


def card_path(exp: str, trait: str, variant: str) -> Path:
    return paths.vectors_dir(exp, trait, variant) / "card.json"


def set_key(pos_dir: str, component: str, method: str) -> str:
    return f"{pos_dir}/{component}/{method}"


def neutral_corpus_path() -> Path:
    """datasets/neutral/sentences.txt ($TRAIT_DATASETS_DIR's when it has one, else the one this repo ships)."""
    own = paths.datasets_root() / "neutral" / "sentences.txt"
    return own if own.exists() else paths.REPO_ROOT / "datasets" / "neutral" / "sentences.txt"


def read_neutral_corpus(path: str | Path | None = None) -> list[str]:
    """Non-blank lines of the neutral corpus (ordinary sentences, no trait in particular)."""
    path = Path(path) if path is not None else neutral_corpus_path()
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{path}: cannot read the neutral corpus ({e})") from None
    lines = [l for l in lines if l]
    if len(lines) < 100:
        raise CardError(f"{path}: a neutral corpus needs at least 100 sentences for a 1% false-positive rate, "
                        f"has {len(lines)}")
    return lines


# ---------------------------------------------------------------------------------------------------------
# The statistics (fp64 on CPU)

def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Mann-Whitney AUROC: the chance that a random positive scores above a random negative (ties 1/2)."""
    p, n = pos.double().reshape(-1, 1), neg.double().reshape(1, -1)
    if p.numel() == 0 or n.numel() == 0:
        raise ValueError("auroc needs at least one score of each class")
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def recall_at_fpr(pos: torch.Tensor, neutral: torch.Tensor, fpr: float = DEFAULT_FPR) -> tuple[float, float]:
    """(recall, threshold): the share of positives strictly above the threshold that at most `fpr` of the
    neutral scores exceed (the (floor(fpr * n) + 1)-th largest neutral score)."""
    ordered = torch.sort(neutral.double(), descending=True).values
    k = min(int(math.floor(fpr * len(ordered))), len(ordered) - 1)
    threshold = float(ordered[k])
    return float((pos.double() > threshold).double().mean()), threshold


def random_directions(hidden: int, n: int = DEFAULT_N_RANDOM, seed: int = 0) -> torch.Tensor:
    """n seeded Gaussian directions scaled to unit length, fp64 [n, hidden]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _std(x: torch.Tensor) -> float:
    return float(x.std(unbiased=False)) if len(x) > 0 else 0.0


def layer_card(vector: torch.Tensor, train_pos: torch.Tensor, train_neg: torch.Tensor, val_pos: torch.Tensor,
               val_neg: torch.Tensor, neutral: torch.Tensor, baseline: float | None = None,
               fpr: float = DEFAULT_FPR, n_random: int = DEFAULT_N_RANDOM, seed: int = 0) -> dict:
    """One layer's card entry from feature matrices [n, H] (the held-out ones are what it reports on).

    `baseline` defaults to the midpoint of the training class means projected on the unit vector.
    """
    v = (vector.double() / vector.double().norm())
    proj = lambda x: x.double() @ v  # noqa: E731
    tp, tn, vp, vn, nu = proj(train_pos), proj(train_neg), proj(val_pos), proj(val_neg), proj(neutral)
    if baseline is None:
        baseline = float((tp.mean() + tn.mean()) / 2)
    rand = random_directions(v.numel(), n_random, seed)
    sign = torch.sign((train_pos.double().mean(0) - train_neg.double().mean(0)) @ rand.T)
    rand = rand * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(1)
    rand_auc = [auroc(val_pos.double() @ d, val_neg.double() @ d) for d in rand]
    recall, threshold = recall_at_fpr(vp, nu, fpr) if len(nu) else (None, None)
    pos_std, neg_std = _std(vp), _std(vn)
    pooled = math.sqrt((pos_std ** 2 + neg_std ** 2) / 2)
    return {
        "auroc": auroc(vp, vn),
        "accuracy": float(((vp > baseline).sum() + (vn <= baseline).sum()) / (len(vp) + len(vn))),
        "recall_at_fpr": recall, "neutral_threshold": threshold,
        "random_auroc_mean": sum(rand_auc) / len(rand_auc), "random_auroc_max": max(rand_auc),
        "sign_ok": bool(vp.mean() > vn.mean()),
        "baseline": float(baseline), "pos_mean": float(vp.mean()), "neg_mean": float(vn.mean()),
        "pos_std": pos_std, "neg_std": neg_std, "spread": pooled if pooled > 0 else None,
        "neutral_mean": float(nu.mean()) if len(nu) else None, "neutral_std": _std(nu) if len(nu) else None,
        "n_pos": len(vp), "n_neg": len(vn), "n_neutral": len(nu),
    }


# ---------------------------------------------------------------------------------------------------------
# The file

@dataclass
class Card:
    """A trait's card: its provenance and {set_key: {layer: entry}} (see the module docstring)."""

    path: Path
    trait: str
    model: str | None
    variant: str | None
    fpr: float
    n_random: int
    sets: dict[str, dict[int, dict]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)          # provenance keys (tool, neutral_corpus, held_out, ...)

    def entry(self, pos_dir: str, component: str, method: str, layer: int) -> dict | None:
        return self.sets.get(set_key(pos_dir, component, method), {}).get(layer)

    def to_json(self) -> dict:
        return {"format": CARD_FORMAT, "trait": self.trait, "model": self.model, "variant": self.variant,
                "fpr": self.fpr, "n_random": self.n_random, **self.extra,
                "sets": {k: {str(l): e for l, e in sorted(layers.items())} for k, layers in sorted(self.sets.items())}}


def _finite_or_none(value, where: str, key: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CardError(f"{where}: {key} must be a finite number, got {value!r}")


def read_card(path: str | Path) -> Card:
    """Read and check a card: every number finite, AUROCs and rates in [0, 1], layers non-negative integers."""
    path = Path(path)
    try:
        data = read_json(path)
    except StorageError as e:
        raise CardError(str(e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("sets"), dict):
        raise CardError(f"{path}: expected an object with a 'sets' object (a vector card)")
    if not isinstance(data.get("trait"), str):
        raise CardError(f"{path}: 'trait' must be a string")
    fpr, n_random = data.get("fpr", DEFAULT_FPR), data.get("n_random", DEFAULT_N_RANDOM)
    _finite_or_none(fpr, str(path), "fpr", False)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise CardError(f"{path}: n_random must be a non-negative integer, got {n_random!r}")
    sets: dict[str, dict[int, dict]] = {}
    for key, layers in data["sets"].items():
        if key.count("/") != 2 or not isinstance(layers, dict):
            raise CardError(f"{path}: sets.{key}: expected 'pos_dir/component/method' -> {{layer: entry}}")
        sets[key] = {}
        for layer, entry in layers.items():
            where = f"{path}: sets.{key}.{layer}"
            if not str(layer).isdigit():
                raise CardError(f"{where}: layer keys are non-negative integers")
            if not isinstance(entry, dict):
                raise CardError(f"{where}: expected an object")
            for k in LAYER_KEYS:
                _finite_or_none(entry.get(k), where, k, allow_none=k in ("spread", "recall_at_fpr",
                                                                         "neutral_threshold", "random_auroc_mean",
                                                                         "random_auroc_max"))
            for k in ("auroc", "accuracy", "recall_at_fpr", "random_auroc_mean", "random_auroc_max"):
                if entry.get(k) is not None and not 0.0 <= entry[k] <= 1.0:
                    raise CardError(f"{where}: {k} must lie in [0, 1], got {entry[k]!r}")
            if entry.get("pos_std", 0) < 0 or entry.get("neg_std", 0) < 0:
                raise CardError(f"{where}: pos_std / neg_std must not be negative")
            sets[key][int(layer)] = entry
    extra = {k: v for k, v in data.items() if k not in ("format", "trait", "model", "variant", "fpr", "n_random",
                                                        "sets")}
    return Card(path, data["trait"], data.get("model"), data.get("variant"), float(fpr), n_random, sets, extra)


def write_card(card: Card) -> Path:
    """Atomic; the caller merges with an earlier card (read_card) when only some sets were recomputed."""
    write_json(card.path, card.to_json(), indent=1)
    return card.path


def load_card(exp: str, trait: str, variant: str) -> Card | None:
    """The trait's card, or None when there is none."""
    path = card_path(exp, trait, variant)
    return read_card(path) if path.exists() else None


def card_layer_entry(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str,
                     layer: int) -> dict | None:
    card = load_card(exp, trait, variant)
    return card.entry(pos_dir, component, method, layer) if card else None


def _rank_key(layer: int, e: dict) -> tuple:
    margin = e["auroc"] - (e.get("random_auroc_max") or 0.0)
    sep = (e["pos_mean"] - e["neg_mean"]) / e["spread"] if e.get("spread") else 0.0
    return (-round(e["auroc"], 6), -(e.get("recall_at_fpr") or 0.0), -round(sep, 6), -round(margin, 6), layer)


def top_layers(card: Card, pos_dir: str, component: str, method: str, k: int = 3) -> list[int]:
    """The k best layers of a set with the right sign: held-out AUROC, then recall at the card's FPR, then the class
    gap in held-out spreads ((pos_mean - neg_mean) / spread: AUROC and recall saturate at 1 on easy traits), then
    the margin over the best random direction, then the lower layer."""
    layers = card.sets.get(set_key(pos_dir, component, method))
    if not layers:
        raise CardError(f"{card.path}: no card entries for {set_key(pos_dir, component, method)} "
                        f"(sets: {', '.join(sorted(card.sets)) or 'none'})")
    ranked = sorted(layers.items(), key=lambda kv: _rank_key(*kv))
    return [layer for layer, e in ranked if e.get("sign_ok", True)][:k]


def format_card_table(card: Card, sets: list[str] | None = None, max_rows: int = 12) -> str:
    """Per set, its best `max_rows` layers (by top_layers' order): AUROC against the random directions' mean/max,
    accuracy, recall at the FPR, sign, and the reference points."""
    lines = [f"vector card {card.trait} ({card.model or '?'}, variant {card.variant or '?'}): held-out AUROC vs "
             f"{card.n_random} random directions, recall at {card.fpr:.0%} false positives on the neutral corpus"]
    head = (f"  {'layer':>5} {'AUROC':>6} {'rand mean/max':>13} {'acc':>5} {'recall':>6} {'sign':>4} "
            f"{'baseline':>9} {'pos mean±sd':>15} {'neg mean±sd':>15}")
    for key in sets or sorted(card.sets):
        layers = card.sets.get(key, {})
        if not layers:
            continue
        ranked = sorted(layers.items(), key=lambda kv: _rank_key(*kv))
        lines.append(f" {key} ({len(layers)} layers; best {min(max_rows, len(ranked))} shown)")
        lines.append(head)
        for layer, e in ranked[:max_rows]:
            rnd = (f"{e['random_auroc_mean']:.2f}/{e['random_auroc_max']:.2f}"
                   if e.get("random_auroc_max") is not None else "-")
            rec = f"{e['recall_at_fpr']:.2f}" if e.get("recall_at_fpr") is not None else "-"
            pos = f"{e['pos_mean']:.3g}±{e['pos_std']:.2g}"
            neg = f"{e['neg_mean']:.3g}±{e['neg_std']:.2g}"
            sign = "ok" if e.get("sign_ok", True) else "FLIP"
            lines.append(f"  {layer:>5} {e['auroc']:>6.3f} {rnd:>13} {e['accuracy']:>5.2f} {rec:>6} {sign:>4} "
                         f"{e['baseline']:>9.3g} {pos:>15} {neg:>15}")
    return "\n".join(lines)
