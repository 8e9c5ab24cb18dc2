"""utils.vectors.resolve_vector_source: the one rule for where a run's vectors come from.

    defaults: the vectors experiment is the experiment; extraction / steering variants from config defaults
    (else the first variant); traits discovered in sorted order, or the given ones in the given order
    an explicit vectors experiment: its config decides the defaults, its extraction/ holds the traits
    errors: unknown trait, a trait with vectors only under another extraction variant, an unknown steering
    variant (VectorError and ConfigError), no vectors at all, an unknown experiment; require_traits=False
"""
from __future__ import annotations

import pytest
import torch

from core.errors import TraitError
from utils import paths
from utils.config import ConfigError
from utils.vectors import VectorConfigError, VectorError, VectorSource, resolve_vector_source

VARIANTS = {"base": {"model": "m"}, "instruct": {"model": "m"}, "lora": {"model": "m", "lora": "x"}}


def _vector(exp: str, trait: str, variant: str, layer: int = 1) -> None:
    path = paths.vector_file(exp, trait, variant, "response__5", "residual", "probe", layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.ones(4), path)
    (path.parent / "metadata.json").write_text('{"layers": {}}')   # a complete set (the extractor writes it last)


@pytest.fixture
def two_exps(experiments):
    """'app' (defaults base / instruct) with cat/b and cat/a under base, cat/c under lora; 'vec' (first variant)."""
    experiments("app", VARIANTS, defaults={"extraction": "base", "application": "instruct"})
    experiments("vec", {"lora": {"model": "m", "lora": "x"}, "base": {"model": "m"}}, defaults={})
    for trait in ("cat/b", "cat/a"):
        _vector("app", trait, "base")
    _vector("app", "cat/c", "lora")
    _vector("vec", "other/z", "lora")
    return "app"


def test_defaults_come_from_config(two_exps):
    src = resolve_vector_source("app")
    assert src == VectorSource("app", "app", "base", "instruct", ("cat/a", "cat/b"), True)
    assert src.describe() == {"vectors_experiment": "app", "extraction_variant": "base", "steering_variant": "instruct"}
    # explicit variants win over the defaults; given traits keep their order and lose duplicates
    src = resolve_vector_source("app", extraction_variant="base", steering_variant="lora", traits="cat/b, cat/a,cat/b")
    assert (src.extraction_variant, src.steering_variant, src.traits, src.discovered) == (
        "base", "lora", ("cat/b", "cat/a"), False)
    assert resolve_vector_source("app", traits=["cat/a"]).traits == ("cat/a",)
    # another extraction variant has its own traits
    assert resolve_vector_source("app", extraction_variant="lora").traits == ("cat/c",)


def test_explicit_vectors_experiment(two_exps):
    # 'vec' has empty defaults: both roles fall back to its first variant (lora); nothing of 'app' is used
    src = resolve_vector_source("app", vectors_experiment="vec")
    assert src == VectorSource("app", "vec", "lora", "lora", ("other/z",), True)
    with pytest.raises(VectorError, match=r"unknown trait 'cat/a'.*traits with vectors for extraction variant "
                                          r"'lora' of 'vec': other/z"):
        resolve_vector_source("app", vectors_experiment="vec", traits="cat/a")


def test_unknown_trait_and_variant_errors(two_exps):
    with pytest.raises(VectorError, match=r"^unknown trait 'cat/zzz': no vectors under .*cat/a, cat/b\)$"):
        resolve_vector_source("app", traits="cat/a,cat/zzz")
    with pytest.raises(VectorError, match=r"^unknown traits 'x/1', 'x/2'"):
        resolve_vector_source("app", traits="x/1,x/2")
    with pytest.raises(VectorError, match=r"trait 'cat/c' has no vectors for extraction variant 'base' of 'app' "
                                          r"\(variants with vectors: lora; pass --extraction-variant\)"):
        resolve_vector_source("app", traits="cat/c")
    with pytest.raises(VectorError, match=r"--traits 'cat/a,': empty item"):
        resolve_vector_source("app", traits="cat/a,")
    with pytest.raises(VectorError, match="category/name"):
        resolve_vector_source("app", traits="a/b/c")
    with pytest.raises(VectorConfigError, match=r"--steering-variant 'nope': not a model variant of experiment "
                                                r"'app' \(variants: base, instruct, lora\)") as err:
        resolve_vector_source("app", steering_variant="nope")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TraitError)
    # an extraction variant without any vectors names the ones that have some
    with pytest.raises(VectorError, match=r"no trait vectors for extraction variant 'instruct'.*"
                                          r"\(extraction variants with vectors: base, lora"):
        resolve_vector_source("app", extraction_variant="instruct")
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        resolve_vector_source("app", vectors_experiment="nope")


def test_no_vectors_at_all(experiments):
    experiments("empty", VARIANTS)
    with pytest.raises(VectorError, match=r"no trait vectors for extraction variant 'base'.*"
                                          r"python extraction/extract_vectors.py --experiment empty"):
        resolve_vector_source("empty")
    # the chat can start without traits (explicit layers still work)
    src = resolve_vector_source("empty", require_traits=False)
    assert (src.traits, src.extraction_variant, src.steering_variant) == ((), "base", "base")
