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
