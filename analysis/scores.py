#!/usr/bin/env python
"""trait-index: every per-token score of an experiment into the score store (Parquet, utils/score_store.py).

    index_scores(experiment, variants=None, prompt_sets=None, traits=None, rebuild=False, progress=True) -> dict
    format_summary(summary) -> str
    main(argv=None) -> int        python analysis/scores.py --help

Reads  experiments/{exp}/inference/{variant}/projections/{trait}/{set}/{id}.json, the variant's response JSONs
       (tokens) and model_diff/{A}_vs_{variant}/per_token_diff/... (deltas, where they exist)
Writes experiments/{exp}/analysis/scores/ (tokens/*.parquet, prompts/*.parquet, manifest.json); a rerun indexes
       only what is new or changed, and equals a rebuild. Query it with analysis/spans.py (trait-spans).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from utils import cli
from utils.score_store import update_store


def index_scores(experiment: str, variants: Sequence[str] | None = None, prompt_sets: Sequence[str] | None = None,
                 traits: Sequence[str] | None = None, rebuild: bool = False, progress: bool = True) -> dict:
    """The stage: utils.score_store.update_store with the CLI's filters."""
    return update_store(experiment, variants, prompt_sets, traits, rebuild=rebuild, progress=progress)


def format_summary(s: dict) -> str:
    ratio = s["source_bytes"] / s["store_bytes"] if s["store_bytes"] else 0.0
    return (f"indexed {s['prompts_indexed']} new or changed (prompt, trait) files, removed {s['prompts_removed']} in "
            f"{s['seconds']:.1f} s; the store holds {s['rows']:,} token scores of {s['prompts']:,} files in "
            f"{s['groups']} (variant, set, trait) groups: {s['store_bytes']:,} bytes, the JSONs it was read from "
            f"{s['source_bytes']:,} bytes ({ratio:.1f}x larger) -> {s['path']}")


def _list(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


EPILOG = """\
examples:
  python analysis/scores.py --experiment demo
  python analysis/scores.py --experiment demo --traits demo/refusal --prompt-sets harmful
  python analysis/scores.py --experiment demo --rebuild

Then: python analysis/spans.py --experiment demo (top tokens, windows, clauses, prompt rankings).
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="scores.py", epilog=EPILOG,
                   description="Index every per-token trait score of an experiment (projection JSONs, all variants, "
                               "sets, traits and vectors, prompt and response tokens, per_token_diff deltas) into a "
                               "Parquet score store under experiments/{exp}/analysis/scores/. Incremental: only new or "
                               "changed files are read.")
    p.add_argument("--experiment", required=True)
    p.add_argument("--variants", help="comma list of model variants (default: every variant with projections)")
    p.add_argument("--prompt-sets", help="comma list of prompt sets, nested names allowed (default: every set)")
    p.add_argument("--traits", help="comma list of category/name (default: every projected trait)")
    p.add_argument("--rebuild", action="store_true", help="delete the store and index everything again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), lambda a: index_scores(a.experiment, _list(a.variants), _list(a.prompt_sets),
                                                          _list(a.traits), a.rebuild, not a.quiet),
                   format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
