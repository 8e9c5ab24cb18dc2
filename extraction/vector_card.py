"""trait-card: the vector card (utils/cards.py) of vectors this project did not extract (trait-interp's, a paper's).

    vector_card(experiment, traits=None, extraction_variant=None, model_variant=None, ...) -> dict   the stage
    main(argv=None) -> int                  the CLI: python extraction/vector_card.py --help

For each trait, every residual vector set under extraction/{trait}/{variant}/vectors/ is read against the
trait's contrastive lines (datasets/traits/{category}/{trait}/positive.txt, negative.txt) and the neutral corpus,
through the model of `--model-variant` (default: the extraction variant, the model the vectors came from).
Held-out lines: the set's metadata.json `val_lines` when our extractor wrote it (the card then equals the one the
extractor wrote); otherwise every line, because which lines trained the vectors is unknown (the card says so in
`held_out`): AUROC and accuracy are then not held out, the random directions are signed on the same lines.
The card is written next to the vectors (card.json); an existing card is replaced only with --overwrite.
Its class statistics are the reference points selection gives vectors whose metadata lacks them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from core.hooks import num_layers
from extraction.extract_vectors import ExtractError, read_texts, text_features
from utils import cards, cli, paths
from utils.config import resolve_variant
from utils.model import LoadedModel, load_variant
from utils.vectors import (desanitize_position, list_vectors, load_vector, load_vector_metadata,
                           resolve_vector_source)

COMPONENT = "residual"


class CardInputError(ExtractError):
    """Bad input for trait-card; the message names the file or flag."""


def _split(meta: dict, lines: list[tuple[int, str]], key: str) -> tuple[list[int], list[int]] | None:
    """(train, val) indices from the metadata's val_lines (line numbers), or None when it has none that fit."""
    val_lines = (meta.get("val_lines") or {}).get(key)
    if not isinstance(val_lines, list) or not val_lines:
        return None
    numbers = [n for n, _ in lines]
    if not set(val_lines) <= set(numbers) or len(val_lines) >= len(numbers):
        return None                   # the dataset changed since extraction: no trustworthy split
    val = [numbers.index(n) for n in val_lines]
    return [i for i in range(len(numbers)) if i not in set(val)], sorted(val)


def vector_card(experiment: str, traits: str | Sequence[str] | None = None, extraction_variant: str | None = None,
                model_variant: str | None = None, neutral_corpus: str | None = None, overwrite: bool = False,
                seed: int = 0, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """Write each trait's card.json; returns {"traits": {trait: {"card", "sets", "held_out"}}, "seconds", ...}."""
    t0 = time.perf_counter()
    src = resolve_vector_source(experiment, extraction_variant=extraction_variant,
                                traits=traits if traits is None or isinstance(traits, str) else list(traits))
    ext = src.extraction_variant
    variant = resolve_variant(experiment, model_variant or ext, "extraction")
    neutral_path = Path(neutral_corpus) if neutral_corpus else cards.neutral_corpus_path()
    try:
        neutral_texts = cards.read_neutral_corpus(neutral_path)
    except cards.CardError as e:
        raise CardInputError(f"--neutral-corpus: {e}") from None
    plans = []
    for trait in src.traits:                                   # everything checked before the model loads
        out = cards.card_path(experiment, trait, ext)
        if out.exists() and not overwrite:
            raise CardInputError(f"{out} exists: pass --overwrite to replace it")
        refs = [r for r in list_vectors(experiment, trait, ext) if r.component == COMPONENT]
        if not refs:
            raise CardInputError(f"trait {trait!r}: no residual vectors under "
                                 f"{paths.vectors_dir(experiment, trait, ext)}")
        pos_lines, neg_lines = read_texts(trait)
        plans.append((trait, out, refs, pos_lines, neg_lines))
    lm = loaded or load_variant(experiment, variant.name, role="extraction")
    summary: dict[str, Any] = {"experiment": experiment, "extraction_variant": ext, "model_variant": variant.name,
                               "traits": {}, "seconds": 0.0}
    neutral_cache: dict[tuple[str, tuple[int, ...]], dict] = {}
    for trait, out, refs, pos_lines, neg_lines in cli.progress(plans, unit="trait", desc="trait-card",
                                                                disable=not progress):
        positions = sorted({desanitize_position(r.pos_dir) for r in refs})
        layers = sorted({r.layer for r in refs})
        if layers[-1] >= num_layers(lm.model):
            raise CardInputError(f"trait {trait!r}: vectors at layer {layers[-1]} but the model of variant "
                                 f"{variant.name!r} has {num_layers(lm.model)} layers")
        folder = paths.traits_data_dir(trait)
        where = [f"{folder / 'positive.txt'}:{n}" for n, _ in pos_lines] + \
                [f"{folder / 'negative.txt'}:{n}" for n, _ in neg_lines]
        feats = text_features(lm, [t for _, t in pos_lines] + [t for _, t in neg_lines], layers, positions, where)
        plain = [p for p in positions if not p.startswith("prompt")]
        key = (",".join(plain), tuple(layers))
        if plain and key not in neutral_cache:
            neutral_cache[key] = text_features(lm, neutral_texts, layers, plain,
                                               [f"{neutral_path}:{k + 1}" for k in range(len(neutral_texts))])
        neutral = neutral_cache.get(key, {})
        sets: dict[str, dict[int, dict]] = {}
        held_out = set()
        n_pos = len(pos_lines)
        for r in refs:
            meta = load_vector_metadata(experiment, trait, ext, r.pos_dir, r.component, r.method)
            sp, sn = _split(meta, pos_lines, "positive"), _split(meta, neg_lines, "negative")
            if sp is None or sn is None:
                every_p, every_n = list(range(n_pos)), list(range(len(neg_lines)))
                sp, sn = (every_p, every_p), (every_n, every_n)
                held_out.add("every line (which lines trained these vectors is unknown: not held out)")
            else:
                held_out.add("the val_lines of the set's metadata.json")
            vector, _ = load_vector(experiment, trait, ext, r.pos_dir, r.component, r.method, r.layer,
                                    hidden_size=feats[r.position][r.layer].shape[1])
            x = feats[r.position][r.layer]
            pos, neg = x[:n_pos], x[n_pos:]
            baseline = ((meta.get("layers") or {}).get(str(r.layer)) or {}).get("baseline")
            nu = neutral.get(r.position, {}).get(r.layer, x[:0])
            sets.setdefault(cards.set_key(r.pos_dir, r.component, r.method), {})[r.layer] = cards.layer_card(
                vector, pos[sp[0]], neg[sn[0]], pos[sp[1]], neg[sn[1]], nu,
                baseline=float(baseline) if isinstance(baseline, (int, float)) and not isinstance(baseline, bool)
                else None, seed=seed)
        card = cards.Card(out, trait, variant.model, ext, cards.DEFAULT_FPR, cards.DEFAULT_N_RANDOM, sets, {
            "tool": "trait-inference extraction/vector_card.py (trait-card)",
            "held_out": "; ".join(sorted(held_out)) + f" of {folder} ({n_pos} positive, {len(neg_lines)} negative)",
            "neutral_corpus": str(neutral_path), "n_neutral": len(neutral_texts), "activations_from": variant.name,
            "random_directions": f"{cards.DEFAULT_N_RANDOM} Gaussian unit directions (seed {seed}), each signed so "
                                 f"the training positives score higher",
        })
        cards.write_card(card)
        summary["traits"][trait] = {"card": str(out), "sets": len(sets), "held_out": card.extra["held_out"]}
    summary["seconds"] = time.perf_counter() - t0
    return summary


def format_summary(s: dict) -> str:
    lines = [f"wrote {len(s['traits'])} vector card(s) for extraction variant {s['extraction_variant']} "
             f"(activations of {s['model_variant']}) in {s['seconds']:.1f} s; AUROC is read against the random "
             f"directions' max, recall at 1% false positives on the neutral corpus"]
    for trait, t in s["traits"].items():
        card = cards.read_card(t["card"])
        best = min(((k, l, e) for k, layers in card.sets.items() for l, e in layers.items()),
                   key=lambda kle: cards._rank_key(kle[1], kle[2]))
        lines.append(cards.format_card_table(card, sets=[best[0]], max_rows=5))
        lines.append(f"  held out: {t['held_out']}\n  (all sets: {t['card']})")
    return "\n".join(lines)


EPILOG = """\
examples:
  # the card of the demo's refusal vectors, rewritten (vectors copied from trait-interp are read the same way)
  python extraction/vector_card.py --experiment demo --traits demo/refusal --overwrite

  # every trait's vectors, read through the instruct variant, with the shipped neutral corpus named
  python extraction/vector_card.py --experiment demo --model-variant instruct \\
      --neutral-corpus datasets/neutral/sentences.txt --overwrite

needs datasets/traits/{category}/{trait}/positive.txt and negative.txt for each trait (one text per line).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="vector_card.py", epilog=EPILOG,
                   description="Write the vector card (held-out AUROC and accuracy, recall at 1%% false positives "
                               "on a neutral corpus, 32 random directions, sign, class means and spreads) of vectors "
                               "extracted elsewhere, next to them as card.json.")
    p.add_argument("--experiment", required=True, help="experiment folder under experiments/")
    p.add_argument("--traits", help="comma list of category/name (default: every trait with vectors)")
    p.add_argument("--extraction-variant", help="variant folder holding the vectors (default: defaults.extraction)")
    p.add_argument("--model-variant", help="model that reads the texts (default: the extraction variant)")
    p.add_argument("--neutral-corpus", metavar="FILE", help="default: datasets/neutral/sentences.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing card.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: vector_card(a.experiment, a.traits, a.extraction_variant,
                                                         a.model_variant, a.neutral_corpus, a.overwrite, a.seed,
                                                         progress=not a.quiet), format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
