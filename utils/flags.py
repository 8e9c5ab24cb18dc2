"""Flags several scripts share, declared once: the same name, the same meaning, the same help everywhere.

    add_traits_flag(parser, aliases=(), default=None, all_word=False)   --traits A,B (comma list of category/name);
                                        `aliases` keep a script's older spelling (per_token_diff's --trait)
    parse_traits(value) -> tuple[str, ...] | None     a comma list (or a list of comma lists) -> names; None: all
    add_vector_flags(parser, aliases=False)           which vectors: --vectors-experiment, --extraction-variant,
                                        --steering-variant, --method, --position (aliases: compare_variants'
                                        --vector-experiment spelling of trait-interp's README)

    add_projection_flags(parser)                      project's choice of vectors, layers and scoring (--traits,
                                        --layer / --layers, --component, the vector flags, --multi-vector,
                                        --centered, --no-calibration): the stage's parser and the batch runner's
    add_generate_flags(parser)                        generate's sampling: --max-new-tokens, --temperature, --top-p,
                                        --seed, --prefill (generate_responses.py and the batch runner)
    add_capture_flags(parser, layers_flag="--layers") capture's choice of what to store: --components, --capture-mlp,
                                        --layers (the batch runner's --capture-layers), --response-only

No torch here: the batch runner's --help answers without importing it.
"""
from __future__ import annotations

from typing import Sequence


def add_traits_flag(parser, aliases: Sequence[str] = (), default: str | None = None, all_word: bool = False,
                    help_default: str = "every trait with vectors") -> None:
    all_note = " or all" if all_word else ""
    parser.add_argument("--traits", *aliases, dest="traits", default=default, metavar="A,B",
                        help=f"comma list of category/name{all_note} (default: {help_default})")


def parse_traits(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'a/b,c/d' (or ['a/b', 'c/d,e/f']) -> ('a/b', 'c/d', ...); None, '' or 'all' -> None (every trait)."""
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(t.strip().strip("/") for p in parts for t in str(p).split(",") if t.strip()))
    return None if not names or names == ("all",) else names


def add_vector_flags(parser, aliases: bool = False) -> None:
    """--vectors-experiment, --extraction-variant, --steering-variant, --method, --position."""
    a = parser.add_argument
    a("--vectors-experiment", *(["--vector-experiment"] if aliases else []), dest="vectors_experiment",
      help="take vectors (and steering results) from another experiment (default: --experiment)")
    a("--extraction-variant", help="whose vectors (default: defaults.extraction of the vectors experiment)")
    a("--steering-variant", help="whose steering results pick the best vector (default: defaults.application of the "
                                 "vectors experiment)")
    a("--method", help="vector method (default: the best vector's)")
    a("--position", help="vector position, e.g. response[:5] (default: the best vector's)")


def add_projection_flags(p, layer_alias: bool = True) -> None:
    """Which vectors, at which layers, and how scores are taken (project_raw_activations_onto_traits.py);
    layer_alias: also --layer N (the script's; the batch runner takes --layers only)."""
    add_traits_flag(p)
    lay = p.add_mutually_exclusive_group() if layer_alias else p
    if layer_alias:
        lay.add_argument("--layer", dest="layers", metavar="N", help="one layer for every trait (same as --layers N)")
    lay.add_argument("--layers", help="projection grammar: best, best+K, best-K, N, comma-separated (default: best)")
    p.add_argument("--component", default="residual",
                   help="which captured activation to project: residual, attn_contribution or mlp_contribution "
                        "(default: residual)")
    add_vector_flags(p)
    p.add_argument("--multi-vector", type=int, metavar="N", help="the top N ranked vectors of each trait")
    p.add_argument("--centered", action="store_true", help="subtract each vector's baseline (class midpoint)")
    p.add_argument("--no-calibration", action="store_true",
                   help="neither read nor compute massive-dims calibration (no massive_dim_data)")


def add_generate_flags(p) -> None:
    """How responses are sampled (generate_responses.py; the batch runner's generate stage)."""
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed: same seed, same sample per prompt (default: drawn once and recorded)")
    p.add_argument("--prefill", default=None, help="text appended after the chat template (part of the prompt)")


def add_capture_flags(p, layers_flag: str = "--layers") -> None:
    """What capture stores (capture_raw_activations.py); layers_flag: the batch runner spells it --capture-layers
    (its --layers is project's), dest follows the flag name."""
    p.add_argument("--components", default=None,
                   help="comma list of residual, attn_contribution, mlp_contribution (default: residual)")
    p.add_argument("--capture-mlp", action="store_true", help="also capture attn_contribution and mlp_contribution")
    p.add_argument(layers_flag, default="all",
                   help="layers to capture: all, 16, 5,10,15, 5-20, 10-45:3, 30%%-60%%, -4--1 (default: all)")
    p.add_argument("--response-only", action="store_true",
                   help="store response activations only (prompt tokens/text kept)")
