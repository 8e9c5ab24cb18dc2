"""Trait vectors from contrastive texts, for users without trait-interp's extraction pipeline (and the demo).

    extract_vectors(experiment, traits=None, model_variant=None, position="all[:]", methods=("mean_diff", "probe"),
                    layers="all", ...) -> dict           the stage, importable
    dataset_traits() -> ["category/name"]                 traits with positive.txt and negative.txt
    read_texts(trait) -> (positive, negative)             non-blank lines, each with its line number
    split(n, val_fraction, seed) -> (train, val)          deterministic per-class train/validation indices
    mean_diff(pos, neg) / logistic_probe(pos, neg)        the two methods (torch only, no sklearn)
    evaluate(vector, train_pos, train_neg, val_pos, val_neg) -> metrics   baseline, accuracies, separation
    main(argv=None) -> int                                the CLI: python extraction/extract_vectors.py --help
    ExtractError                                          bad input; the message names the file or flag

Reads  datasets/traits/{category}/{trait}/positive.txt and negative.txt ($TRAIT_DATASETS_DIR overrides
       datasets/), one text per line, fed to the model as plain text (BOS + text, no chat template).
Writes experiments/{exp}/extraction/{category}/{trait}/{variant}/vectors/{pos_dir}/residual/{method}/layer{L}.pt
       (fp32 unit vectors) and .../{method}/metadata.json with, per layer: norm (before normalising),
       baseline (class-midpoint projection on the training lines), train_accuracy, and the held-out
       val_accuracy and val_separation that utils.vectors ranks vectors by when no steering results exist.

Position: `all[...]` over the text's own tokens (BOS excluded): all[:] (default) is the mean over every
token, all[-1] the last token, all[:5] / all[2:8] the mean over a slice. prompt/response frames need a
prompt/response split that these plain texts do not have, so they are refused.
Accuracy: a line counts as positive when its projection on the unit vector exceeds the baseline.
Separation: (mean positive - mean negative projection on held-out lines) / the pooled within-class
standard deviation of the training projections.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

from core.capture import capture_sequences  # noqa: E402
from core.hooks import num_layers  # noqa: E402
from utils import paths  # noqa: E402
from utils.config import resolve_variant  # noqa: E402
from utils.layers import parse_layers  # noqa: E402
from utils.model import LoadedModel, load_model_config, load_variant, tokenize_prompt  # noqa: E402
from utils.storage import StorageError, read_json, write_json, write_pt  # noqa: E402
from utils.vectors import VectorError, check_trait_name, parse_position, sanitize_position  # noqa: E402
from utils.cli import Parser as _Parser  # noqa: E402
from core.errors import TraitError

METHODS = ("mean_diff", "probe")
DEFAULT_POSITION = "all[:]"
COMPONENT = "residual"


class ExtractError(TraitError):
    """Bad input for extraction; the message names the file or flag."""


# ---------------------------------------------------------------------------------------------------
# Datasets

def dataset_traits() -> list[str]:
    root = paths.datasets_root() / "traits"
    if not root.is_dir():
        return []
    # a folder with only one of the two files is listed too, so that read_texts names the missing one
    return sorted(f"{d.parent.name}/{d.name}" for d in root.glob("*/*")
                  if (d / "positive.txt").is_file() or (d / "negative.txt").is_file())


def read_texts(trait: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line number, text) of every non-blank line of positive.txt and negative.txt; at least 2 of each."""
    folder = paths.traits_data_dir(trait)
    out = []
    for name in ("positive.txt", "negative.txt"):
        path = folder / name
        if not path.is_file():
            have = ", ".join(dataset_traits()) or "none"
            raise ExtractError(f"trait {trait!r}: {path} not found (traits with positive.txt and negative.txt: {have})")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ExtractError(f"{path}: cannot read ({e})") from None
        texts = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
        if len(texts) < 2:
            raise ExtractError(f"{path}: needs at least 2 non-blank lines (one to train on, one held out), "
                               f"has {len(texts)}")
        out.append(texts)
    return out[0], out[1]


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) indices for n >= 2 items: at least one of each, val ~ val_fraction."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---------------------------------------------------------------------------------------------------
# Methods and metrics (fp32 / fp64 math on [n, H] feature matrices)

def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg), not normalised."""
    return pos.double().mean(0) - neg.double().mean(0)


def logistic_probe(pos: torch.Tensor, neg: torch.Tensor, c: float = 1.0, max_iter: int = 100,
                   tol: float = 1e-10) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on row-normalised features; returns (w, b).

    Minimises c * sum(log-loss) + |w|^2 / 2 (sklearn's objective at C=c; the bias is not penalised) by
    Newton's method. The optimum lies in the span of the training rows, so with X^T = QR it is solved
    in min(n, H) coordinates (w = Q u, X w = R^T u): exact, and fast for a 70B model's hidden size.
    Rows are scaled to unit norm so the penalty means the same at every layer whatever its norm.
    """
    x = torch.cat([pos, neg]).double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    q, r = torch.linalg.qr(x.T)                                    # x = r.T q.T
    z = torch.cat([r.T, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    reg = torch.ones(z.shape[1], dtype=torch.float64)
    reg[-1] = 0.0                                                  # the bias is free

    def objective(th: torch.Tensor) -> float:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z @ th, y, reduction="sum")
        return float(c * bce + 0.5 * (reg * th * th).sum())

    theta = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(z @ theta)
        grad = c * z.T @ (p - y) + reg * theta
        if float(grad.norm()) < tol:
            break
        hess = c * (z.T * (p * (1 - p))) @ z + torch.diag(reg) + 1e-12 * torch.eye(z.shape[1], dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        t, f0 = 1.0, objective(theta)
        while objective(theta - t * step) > f0 - 1e-4 * t * float(grad @ step) and t > 1e-10:
            t /= 2                                                 # backtracking keeps every step a descent
        theta = theta - t * step
    return q @ theta[:-1], float(theta[-1])


def evaluate(vector: torch.Tensor, train_pos: torch.Tensor, train_neg: torch.Tensor, val_pos: torch.Tensor,
             val_neg: torch.Tensor) -> dict[str, float]:
    """Baseline (class midpoint on train), train / held-out accuracy at that threshold, held-out separation."""
    v = (vector / vector.norm()).double()
    proj = {k: t.double() @ v for k, t in
            (("tp", train_pos), ("tn", train_neg), ("vp", val_pos), ("vn", val_neg))}
    baseline = float((train_pos.double().mean(0) + train_neg.double().mean(0)) / 2 @ v)
    correct = lambda p, n: float(((p > baseline).sum() + (n <= baseline).sum()) / (len(p) + len(n)))  # noqa: E731
    within = torch.cat([proj["tp"] - proj["tp"].mean(), proj["tn"] - proj["tn"].mean()])
    spread = float(within.pow(2).mean().sqrt())
    gap = float(proj["vp"].mean() - proj["vn"].mean())
    return {"baseline": baseline, "train_accuracy": correct(proj["tp"], proj["tn"]),
            "val_accuracy": correct(proj["vp"], proj["vn"]),
            "val_separation": gap / max(spread, 1e-12)}   # finite even for a zero spread (JSON has no inf)


# ---------------------------------------------------------------------------------------------------
# Features

def _select(position: str) -> int | slice:
    try:
        frame, index = parse_position(position)
    except VectorError as e:
        raise ExtractError(str(e)) from None
    if frame != "all":
        raise ExtractError(f"--position {position!r}: extract_vectors.py reads plain texts with no prompt/response "
                           f"split; use an all[...] position (all[:], all[-1], all[:5])")
    return index


def text_features(loaded: LoadedModel, texts: Sequence[str], layers: Sequence[int], position: str,
                  where: Sequence[str] | None = None, max_batch_tokens: int | None = None) -> dict[int, torch.Tensor]:
    """fp32 [n_texts, H] per layer: the residual at `position` over each text's own tokens (BOS excluded)."""
    index = _select(position)
    tok = loaded.tokenizer
    sequences, starts = [], []
    for k, text in enumerate(texts):
        ids = tokenize_prompt(tok, text)
        start = 1 if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else 0
        n = len(ids) - start
        picked = range(n)[index] if isinstance(index, slice) else (index if -n <= index < n else None)
        if picked is None or (isinstance(picked, range) and len(picked) == 0):
            raise ExtractError(f"{where[k] if where else f'text {k}'}: position {position} selects no token "
                               f"(the text has {n} tokens)")
        sequences.append(ids)
        starts.append(start)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[int, list[torch.Tensor | None]] = {l: [None] * len(texts) for l in layers}
    for i, acts in capture_sequences(loaded.model, sequences, list(layers), [COMPONENT], pad,
                                     max_batch_tokens=max_batch_tokens, out_dtype=torch.float32):
        for layer in layers:
            h = acts[layer][COMPONENT][starts[i]:]
            sel = h[index]
            out[layer][i] = sel.float() if sel.ndim == 1 else sel.float().mean(0)
    return {l: torch.stack(rows) for l, rows in out.items()}


# ---------------------------------------------------------------------------------------------------
# The stage

def _methods(methods: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ExtractError(f"--methods {methods!r}: unknown method {bad[0] if bad else ''!r} "
                           f"(choose from {', '.join(METHODS)})")
    return list(dict.fromkeys(names))


def extract_vectors(experiment: str, traits: str | Sequence[str] | None = None, model_variant: str | None = None,
                    position: str = DEFAULT_POSITION, methods: str | Sequence[str] = METHODS,
                    layers: str = "all", val_fraction: float = 0.25, seed: int = 0,
                    max_batch_tokens: int | None = None, loaded: LoadedModel | None = None,
                    progress: bool = True) -> dict:
    """Extract mean_diff / probe vectors for each trait at every chosen layer; returns a summary dict.

    `loaded` reuses an already-loaded model of the variant (tests, demo). Everything (datasets, flags,
    layers) is checked before the model is loaded or anything written.
    Summary keys: experiment, model_variant, position, methods, layers, traits {trait: {method: {best_layer,
    val_accuracy, val_separation}}}, files, seconds.
    """
    t0 = time.perf_counter()
    if not 0 < val_fraction < 1:
        raise ExtractError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    _select(position)
    method_list = _methods(methods)
    if traits is None:
        trait_list = dataset_traits()
        if not trait_list:
            raise ExtractError(f"no traits in {paths.datasets_root() / 'traits'} (expected "
                               f"{{category}}/{{trait}}/positive.txt and negative.txt)")
    else:
        items = [t.strip() for t in traits.split(",")] if isinstance(traits, str) else list(traits)
        try:
            trait_list = list(dict.fromkeys(check_trait_name(t) for t in items))
        except VectorError as e:
            raise ExtractError(str(e)) from None
    texts = {t: read_texts(t) for t in trait_list}
    variant = resolve_variant(experiment, model_variant, "extraction")
    # the depth from the config, so a bad --layers fails before the weights load
    n_layers = (num_layers(loaded.model) if loaded is not None
                else int(load_model_config(variant.model_path(experiment)).num_hidden_layers))
    layer_list = parse_layers(layers, n_layers)
    lm = loaded or load_variant(experiment, variant.name)
    pos_dir = sanitize_position(position)

    from tqdm.auto import tqdm

    summary: dict[str, Any] = {"experiment": experiment, "model_variant": variant.name, "position": position,
                               "methods": method_list, "layers": layer_list, "traits": {}, "files": [], "seconds": 0.0}
    for trait in tqdm(trait_list, desc="extract", unit="trait", file=sys.stderr, disable=not progress):
        pos_lines, neg_lines = texts[trait]
        folder = paths.traits_data_dir(trait)
        where = [f"{folder / 'positive.txt'}:{n}" for n, _ in pos_lines] + \
                [f"{folder / 'negative.txt'}:{n}" for n, _ in neg_lines]
        feats = text_features(lm, [t for _, t in pos_lines] + [t for _, t in neg_lines], layer_list, position,
                              where, max_batch_tokens)
        n_pos = len(pos_lines)
        tr_p, va_p = split(n_pos, val_fraction, seed)
        tr_n, va_n = split(len(neg_lines), val_fraction, seed + 1)
        summary["traits"][trait] = {}
        for method in method_list:
            layer_meta: dict[str, dict] = {}
            for layer in layer_list:
                x = feats[layer]
                pos, neg = x[:n_pos], x[n_pos:]
                train_pos, train_neg, val_pos, val_neg = pos[tr_p], neg[tr_n], pos[va_p], neg[va_n]
                entry: dict[str, Any] = {}
                if method == "mean_diff":
                    raw = mean_diff(train_pos, train_neg)
                else:
                    raw, bias = logistic_probe(train_pos, train_neg)
                    entry["bias"] = bias
                norm = float(raw.norm())
                if norm == 0.0:
                    raise ExtractError(f"trait {trait!r}, layer {layer}, {method}: the classes have identical "
                                       f"features, no direction to extract")
                unit = (raw / norm).float()
                entry = {"norm": norm, **evaluate(unit, train_pos, train_neg, val_pos, val_neg), **entry}
                layer_meta[str(layer)] = entry
                out = paths.vector_file(experiment, trait, variant.name, pos_dir, COMPONENT, method, layer)
                write_pt(out, unit.clone())
                summary["files"].append(str(out))
            meta_path = paths.vector_metadata(experiment, trait, variant.name, pos_dir, COMPONENT, method)
            merged = _previous_layers(meta_path)
            merged.update(layer_meta)
            write_json(meta_path, {
                "model": variant.model, "trait": trait, "method": method, "component": COMPONENT,
                "position": position, "layers": dict(sorted(merged.items(), key=lambda kv: int(kv[0]))),
                "timestamp": _dt.datetime.now().isoformat(), "extraction_variant": variant.name, "lora": variant.lora,
                "tool": "trait-inference extraction/extract_vectors.py",
                "dataset": {"positive": str(folder / "positive.txt"), "negative": str(folder / "negative.txt")},
                "n_positive": n_pos, "n_negative": len(neg_lines), "val_fraction": val_fraction, "seed": seed,
                "val_lines": {"positive": [pos_lines[i][0] for i in va_p], "negative": [neg_lines[i][0] for i in va_n]},
                "accuracy_rule": "projection on the unit vector > baseline (midpoint of the training class means)",
            }, indent=1)
            summary["files"].append(str(meta_path))
            best_layer = max(layer_meta, key=lambda k: (layer_meta[k]["val_accuracy"], layer_meta[k]["val_separation"]))
            summary["traits"][trait][method] = {"best_layer": int(best_layer),
                                                "val_accuracy": layer_meta[best_layer]["val_accuracy"],
                                                "val_separation": layer_meta[best_layer]["val_separation"]}
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _previous_layers(meta_path: Path) -> dict:
    """Layer entries of an earlier run (layers not re-extracted now keep their metadata)."""
    if not meta_path.exists():
        return {}
    try:
        old = read_json(meta_path)
    except StorageError:
        return {}
    layers = old.get("layers") if isinstance(old, dict) else None
    return dict(layers) if isinstance(layers, dict) else {}


def format_summary(s: dict) -> str:
    best = "; ".join(
        f"{t} {m} layer {r['best_layer']} acc {r['val_accuracy']:.2f}"
        for t, by_method in s["traits"].items() for m, r in by_method.items())
    return (f"extracted {len(s['traits'])} traits x {len(s['methods'])} methods x {len(s['layers'])} layers "
            f"({len(s['files'])} files) for variant {s['model_variant']} at {s['position']} in {s['seconds']:.1f} s; "
            f"best held-out: {best}")


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  # every trait under datasets/traits/, every layer, mean over each text's tokens
  python extraction/extract_vectors.py --experiment my_exp

  # one trait, last token, probe only, a layer range
  python extraction/extract_vectors.py --experiment my_exp --traits behavioral/refusal \\
      --position 'all[-1]' --methods probe --layers 4-12
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="extract_vectors.py",
                description="Extract trait vectors (mean_diff, probe) from contrastive texts "
                            "datasets/traits/{category}/{trait}/positive.txt and negative.txt, with held-out "
                            "accuracy per layer.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    p.add_argument("--traits", help="comma list of category/name (default: every trait under datasets/traits/)")
    p.add_argument("--model-variant", help="model variant (default: defaults.extraction)")
    p.add_argument("--position", default=DEFAULT_POSITION,
                   help="all[:] (mean over the text's tokens, default), all[-1], all[:N], all[A:B]")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of mean_diff, probe (default: both)")
    p.add_argument("--layers", default="all", help="capture grammar: all, 16, 5-20, 10-45:3, 30%%-60%% (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each class held out (default: 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = extract_vectors(args.experiment, traits=args.traits, model_variant=args.model_variant,
                                  position=args.position, methods=args.methods, layers=args.layers,
                                  val_fraction=args.val_fraction, seed=args.seed, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
