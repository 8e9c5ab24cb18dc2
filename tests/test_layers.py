"""The `--layers` grammars in utils/layers.py: every form, every error, and what the errors say."""
from __future__ import annotations

import dataclasses

import pytest

from utils.layers import (
    LayerSpecError,
    ProjectionLayer,
    format_layers,
    parse_layers,
    parse_projection_layers,
    resolve_projection_layers,
)

N = 26  # a model with 26 layers, 0-25


# ---------------------------------------------------------------------------------------------------------
# parse_layers: the forms
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(26))),
        ("ALL", list(range(26))),
        ("16", [16]),
        ("0", [0]),
        ("25", [25]),
        ("5-20", list(range(5, 21))),
        ("7-7", [7]),
        ("10-25:3", [10, 13, 16, 19, 22, 25]),  # end hit -> included
        ("10-24:3", [10, 13, 16, 19, 22]),  # end not hit -> stops before it
        ("0-25:5", [0, 5, 10, 15, 20, 25]),
        ("3-5:10", [3]),
        ("-1", [25]),
        ("-26", [0]),
        ("-4--1", [22, 23, 24, 25]),
        ("2--1", list(range(2, 26))),
        ("-6--1:2", [20, 22, 24]),
        ("0%", [0]),
        ("100%", [25]),
        ("30%-60%", list(range(8, 16))),  # 7.5 -> 8 (half to even), 15.0 -> 15
        ("40%", [10]),
        ("50%", [12]),  # 12.5 -> 12: Python round, half to even
        ("12.5%", [3]),  # 3.125 -> 3
        ("0%-100%:5", [0, 5, 10, 15, 20, 25]),
        ("20%-15", list(range(5, 16))),  # a percentage and an int may share a range
        (" 3 , 1 ", [1, 3]),
        ("16,3,16,5-6", [3, 5, 6, 16]),  # sorted, de-duplicated
        ("all,3", list(range(26))),
        ("-1,0,10-12,50%", [0, 10, 11, 12, 25]),
        ("4-8,6-10", [4, 5, 6, 7, 8, 9, 10]),
    ],
)
def test_parse_layers_forms(spec: str, expected: list[int]) -> None:
    assert parse_layers(spec, N) == expected


def test_parse_layers_percentages_scale_with_the_model() -> None:
    assert parse_layers("50%", 81) == [40]
    assert parse_layers("30%-60%", 81) == list(range(24, 49))
    assert parse_layers("100%", 1) == [0]
    assert parse_layers("all", 1) == [0]


def test_parse_layers_rounds_exactly() -> None:
    # 70/100 * 45 in floats is 31.499999..., which would round to 31; the exact 31.5 rounds (to even) to 32.
    assert parse_layers("70%", 46) == [32]
    # 14/100 * 75 in floats is 10.500000...2, which would round to 11; the exact 10.5 rounds to 10.
    assert parse_layers("14%", 76) == [10]
    assert parse_layers("30%", N) == [8]


# ---------------------------------------------------------------------------------------------------------
# parse_layers: the errors, each naming the spec and the layer count
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("40", r"'40'.*layer 40 is out of range for a model with 26 layers \(0-25\)"),
        ("26", r"layer 26 is out of range for a model with 26 layers \(0-25\)"),
        ("5-40", r"'5-40'.*layer 40 is out of range for a model with 26 layers \(0-25\)"),
        ("10-45:3", r"layer 45 is out of range for a model with 26 layers \(0-25\)"),
        ("-27", r"layer -27 is out of range for a model with 26 layers \(0-25, or -26 to -1 from the end\)"),
        ("-30--1", r"layer -30 is out of range for a model with 26 layers"),
        ("3,99", r"'3,99'.*layer 99 is out of range for a model with 26 layers"),
        ("150%", r"150% is out of range.*26 layers \(0-25\)"),
        ("50%-120%", r"120% is out of range.*26 layers"),
    ],
)
def test_parse_layers_out_of_range_is_an_error(spec: str, match: str) -> None:
    with pytest.raises(LayerSpecError, match=match):
        parse_layers(spec, N)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("5-3", r"'5-3'.*selects no layers.*26 layers \(0-25\)"),
        ("-1--4", r"selects no layers.*resolves to 25-22.*26 layers"),
        ("60%-30%", r"selects no layers.*26 layers"),
        ("5-10:0", r"'5-10:0'.*step must be positive.*26 layers \(0-25\)"),
        ("5-10:-2", r"step must be positive.*26 layers"),
    ],
)
def test_parse_layers_empty_selection_is_an_error(spec: str, match: str) -> None:
    with pytest.raises(LayerSpecError, match=match):
        parse_layers(spec, N)


@pytest.mark.parametrize(
    "spec",
    ["abc", "1-", ":3", "-", "--1", "1--", "5:3", "1-5:", "1-5:x", "1-5:3:2", "best", "1.5", "+3",
     "-5%", "1,,2", "3,", ",3", "1 2", "all:2", "%", "1-2-3"],
)
def test_parse_layers_malformed_is_an_error(spec: str) -> None:
    with pytest.raises(LayerSpecError, match=r"26 layers \(0-25\)") as info:
        parse_layers(spec, N)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize("spec", ["", "   "])
def test_parse_layers_empty_spec_is_an_error(spec: str) -> None:
    with pytest.raises(LayerSpecError, match=r"empty spec.*26 layers \(0-25\)"):
        parse_layers(spec, N)


def test_parse_layers_rejects_a_model_without_layers() -> None:
    with pytest.raises(LayerSpecError, match="at least 1 layer"):
        parse_layers("all", 0)


def test_layer_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_layers("abc", N)


# ---------------------------------------------------------------------------------------------------------
# parse_projection_layers
# ---------------------------------------------------------------------------------------------------------

B = ProjectionLayer("best", 0)


@pytest.mark.parametrize(
    ("spec", "n_layers", "expected"),
    [
        ("best", None, [B]),
        ("BEST", None, [B]),
        ("best+2", None, [ProjectionLayer("best", 2)]),
        ("best-3", None, [ProjectionLayer("best", -3)]),
        ("best+0", None, [B]),
        ("best + 1", None, [ProjectionLayer("best", 1)]),
        ("16", None, [ProjectionLayer("fixed", 16)]),
        ("0", None, [ProjectionLayer("fixed", 0)]),
        ("-1", 26, [ProjectionLayer("fixed", 25)]),
        ("-26", 26, [ProjectionLayer("fixed", 0)]),
        ("25", 26, [ProjectionLayer("fixed", 25)]),
        ("best,best+2,16", None, [B, ProjectionLayer("best", 2), ProjectionLayer("fixed", 16)]),
        (" 16 , best-1 ", None, [ProjectionLayer("fixed", 16), ProjectionLayer("best", -1)]),
        # de-duplicated, first-seen order kept (not sorted)
        ("16,best,16,best+0,-10", 26, [ProjectionLayer("fixed", 16), B]),
        ("best+2,best,3", None, [ProjectionLayer("best", 2), B, ProjectionLayer("fixed", 3)]),
    ],
)
def test_parse_projection_layers_forms(spec: str, n_layers: int | None, expected: list[ProjectionLayer]) -> None:
    assert parse_projection_layers(spec, n_layers) == expected


@pytest.mark.parametrize(
    ("spec", "n_layers", "match"),
    [
        ("-1", None, r"'-1'.*layer -1 counts from the end.*layer count"),
        ("26", 26, r"'26'.*layer 26 is out of range for a model with 26 layers \(0-25\)"),
        ("best,-27", 26, r"layer -27 is out of range for a model with 26 layers \(0-25, or -26 to -1 from the end\)"),
        ("", None, r"empty spec"),
        ("  ", 26, r"empty spec.*26 layers \(0-25\)"),
        ("abc", 26, r"'abc'.*malformed item 'abc'.*26 layers \(0-25\)"),
        ("best+", None, r"malformed item 'best\+'"),
        ("best-", None, r"malformed item 'best-'"),
        ("best+-1", None, r"malformed item 'best\+-1'"),
        ("best+1.5", None, r"malformed item"),
        ("bestx", None, r"malformed item 'bestx'"),
        ("+2", None, r"malformed item '\+2'"),
        ("best*2", None, r"malformed item"),
        ("5-10", None, r"malformed item '5-10'"),
        ("all", None, r"malformed item 'all'"),
        ("best,,16", None, r"malformed item ''"),
        ("16,", 26, r"malformed item ''.*26 layers"),
        ("best", 0, r"at least 1 layer"),
    ],
)
def test_parse_projection_layers_errors(spec: str, n_layers: int | None, match: str) -> None:
    with pytest.raises(LayerSpecError, match=match):
        parse_projection_layers(spec, n_layers)


def test_projection_layer_str_round_trips() -> None:
    for spec in ["best", "best+2", "best-3", "16", "0"]:
        (item,) = parse_projection_layers(spec)
        assert str(item) == spec
        assert parse_projection_layers(str(item)) == [item]


def test_projection_layer_is_frozen_and_validated() -> None:
    item = ProjectionLayer("fixed", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.value = 5  # type: ignore[misc]
    assert hash(item) == hash(ProjectionLayer("fixed", 4))
    with pytest.raises(LayerSpecError, match="non-negative"):
        ProjectionLayer("fixed", -1)
    with pytest.raises(LayerSpecError, match="'best' or 'fixed'"):
        ProjectionLayer("middle", 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# resolve_projection_layers
# ---------------------------------------------------------------------------------------------------------

ALL26 = list(range(26))


@pytest.mark.parametrize(
    ("spec", "best_layer", "available", "expected"),
    [
        ("best", 16, ALL26, [16]),
        ("best+2", 16, ALL26, [18]),
        ("best-3", 16, ALL26, [13]),
        ("best,best+2,16", 10, ALL26, [10, 12, 16]),
        ("best+2,best,best-2", 10, ALL26, [12, 10, 8]),  # first-seen order, not sorted
        ("16,best,best+0", 16, ALL26, [16]),  # de-duplicated after resolving
        ("best+2,12", 10, ALL26, [12]),
        ("4,8", None, [4, 8, 12], [4, 8]),  # fixed layers need no best layer
        ("best,best+4", 8, [4, 8, 12], [8, 12]),
    ],
)
def test_resolve_projection_layers(
    spec: str, best_layer: int | None, available: list[int], expected: list[int]
) -> None:
    assert resolve_projection_layers(parse_projection_layers(spec), best_layer, available) == expected


def test_resolve_accepts_any_iterables() -> None:
    items = (ProjectionLayer("best", 1), ProjectionLayer("fixed", 3))
    assert resolve_projection_layers(iter(items), 4, range(10)) == [5, 3]
    assert resolve_projection_layers([], None, []) == []


@pytest.mark.parametrize(
    ("spec", "best_layer", "available", "match"),
    [
        # not among the captured layers: no snapping to the nearest one
        ("best+1", 8, [4, 8, 12], r"layer 9 \(best\+1, best layer 8\) is not among the available layers: 4, 8, 12$"),
        ("best-1", 8, [4, 8, 12], r"layer 7 \(best-1, best layer 8\) is not among the available layers: 4, 8, 12$"),
        ("best", 9, [4, 8, 12], r"best layer 9 is not among the available layers: 4, 8, 12$"),
        ("10", None, [4, 8, 12], r"layer 10 is not among the available layers: 4, 8, 12$"),
        ("4,10", 8, [0, 1, 2, 3, 4, 5, 8], r"layer 10 is not among the available layers: 0-5, 8$"),
        ("best+30", 16, ALL26, r"layer 46 .*available layers: 0-25$"),
        ("best-20", 16, ALL26, r"layer -4 .*available layers: 0-25$"),
        ("3", None, [], r"layer 3 is not among the available layers: none"),
        # best-relative without a best layer
        ("best", None, ALL26, r"'best' needs the trait's best layer.*pass an explicit layer.*available layers: 0-25"),
        ("16,best+2", None, ALL26, r"'best\+2' needs the trait's best layer.*pass an explicit layer"),
    ],
)
def test_resolve_projection_layers_errors(
    spec: str, best_layer: int | None, available: list[int], match: str
) -> None:
    with pytest.raises(LayerSpecError, match=match):
        resolve_projection_layers(parse_projection_layers(spec), best_layer, available)


def test_capture_then_project_end_to_end() -> None:
    captured = parse_layers("10-45:3", 48)
    assert captured == list(range(10, 46, 3))
    items = parse_projection_layers("best,best+3,-2", 48)
    assert items == [B, ProjectionLayer("best", 3), ProjectionLayer("fixed", 46)]
    with pytest.raises(LayerSpecError, match=r"layer 46 is not among the available layers: 10, 13, 16"):
        resolve_projection_layers(items, 19, captured)
    assert resolve_projection_layers(items[:2], 19, captured) == [19, 22]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ([0, 1, 2, 5, 7, 8], "0-2, 5, 7-8"),
        ({8, 7, 2, 0, 1, 5}, "0-2, 5, 7-8"),  # any iterable, any order
        ([3, 3, 3], "3"),  # de-duplicated
        (range(0, 40, 3), "0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39"),
        (range(26), "0-25"),
        ([4, 5], "4-5"),
        ([], "none"),
    ],
)
def test_format_layers(layers, expected: str) -> None:
    assert format_layers(layers) == expected
