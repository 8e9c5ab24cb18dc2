"""utils/vectors.py: positions, discovery, safe loading, and best-vector selection on hand-written evidence.

    sanitize / desanitize round trips (the four documented examples and all[:])
    discovery of category/name traits; load_vector checks (hidden size, rank, zero) and unit-normalises in fp32
    selection: direction-aware best, coherence >= 77, naturalness < 50 drops, best+K grammar, steering
    variant chooses the evidence, extraction fallback, deterministic method / position order, top-N
    errors: malformed results.jsonl line named, missing baseline, unknown trait, no evidence says --layer

The writers write_vector / write_steering live in tests/helpers.py (shared with test_project.py, test_fused.py).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import write_steering, write_vector
from core.errors import TraitError
from utils import paths
from utils.layers import LayerSpecError
from utils.vectors import (ACCURACY_FLOOR_FRACTION, SELECTION_SOURCES, NoEvidenceError, VectorError, VectorRef,
                           best_vector, desanitize_position, discover_traits, list_vectors, load_vector,
                           parse_position, rank_by_extraction_metrics, rank_vectors, read_steering_results,
                           sanitize_position, select_vectors, viewer_selection_source)

H = 8


# ---------------------------------------------------------------------------------------------------
# helpers (the shared writers are in tests/helpers.py)

def rand(seed: int, n: int = H, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vec_exp(experiments):
    """Experiment 'v': trait cat/t with probe + mean_diff vectors at layers 0-5, position response[:5]."""
    experiments("v", {"base": {"model": "m"}, "instruct": {"model": "m"}, "lora": {"model": "m", "lora": "x"}},
                defaults={"extraction": "base", "application": "instruct"})
    for layer in range(6):
        for k, method in enumerate(("probe", "mean_diff")):
            write_vector("v", "cat/t", "base", "response[:5]", method, layer, rand(10 * layer + k),
                         baseline=float(layer + k / 10))
    return "v"


# ---------------------------------------------------------------------------------------------------
# positions, discovery, loading

@pytest.mark.parametrize("position,pos_dir", [
    ("response[:5]", "response__5"), ("response[:]", "response_all"), ("prompt[-1]", "prompt_-1"),
    ("response[-5:]", "response_-5_"), ("all[:]", "all_all"), ("response[2:7]", "response_2_7")])
def test_position_round_trip(position, pos_dir):
    assert sanitize_position(position) == pos_dir
    assert desanitize_position(pos_dir) == position


def test_position_errors_and_parse():
    assert parse_position("all[:]") == ("all", slice(None, None))
    assert parse_position("prompt[-1]") == ("prompt", -1)
    assert parse_position("response[2:5]") == ("response", slice(2, 5))
    for bad in ("response", "resp[:5]", "response[a]", "response[1:2:3]"):
        with pytest.raises(VectorError, match="--position"):
            parse_position(bad)
    for bad in ("foo_bar", "response", "response_x"):
        with pytest.raises(VectorError, match="sanitized position"):
            desanitize_position(bad)


def test_discover_traits(vec_exp):
    write_vector("v", "alpha/one", "other", "response[:]", "probe", 3, rand(1))
    (paths.extraction_dir("v") / "empty" / "trait" / "base" / "vectors").mkdir(parents=True)  # no layer files
    stray = paths.vectors_dir("v", "beta/two", "base") / "response__5" / "residual" / "probe" / "notes.pt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    assert discover_traits("v") == ["alpha/one", "cat/t"]
    assert discover_traits("v", "base") == ["cat/t"]
    assert discover_traits("nonexistent") == []


def test_load_vector_unit_fp32_and_checks(vec_exp):
    raw = rand(99).to(torch.bfloat16)
    path = write_vector("v", "cat/t", "base", "response[:5]", "gradient", 2, raw, baseline=0.5)
    v, meta = load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 2, hidden_size=H)
    assert v.dtype == torch.float32 and v.shape == (H,)
    assert torch.allclose(v, raw.float() / raw.float().norm(), atol=1e-6)
    assert abs(float(v.norm()) - 1.0) < 1e-6
    assert meta["layers"]["2"]["baseline"] == 0.5
    # pos_dir form is accepted too
    v2, _ = load_vector("v", "cat/t", "base", "response__5", "residual", "gradient", 2)
    assert torch.equal(v, v2)
    with pytest.raises(VectorError, match=rf"{path.name}.*8 dims but the activations have hidden size 16"):
        load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 2, hidden_size=16)
    torch.save(torch.zeros(2, H), path)
    with pytest.raises(VectorError, match="1-D float tensor"):
        load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 2)
    torch.save(torch.zeros(H), path)
    with pytest.raises(VectorError, match="zero or not finite"):
        load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 2)
    torch.save({"v": torch.ones(H)}, path)
    with pytest.raises(VectorError, match="expected a tensor"):
        load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 2)
    with pytest.raises(VectorError, match="not found"):
        load_vector("v", "cat/t", "base", "response[:5]", "residual", "gradient", 17)


def test_unknown_trait_and_bad_names(vec_exp):
    with pytest.raises(VectorError, match=r"unknown trait 'cat/nope'.*cat/t"):
        list_vectors("v", "cat/nope", "base")
    with pytest.raises(VectorError, match="no vectors for extraction variant 'instruct'.*base"):
        list_vectors("v", "cat/t", "instruct")
    with pytest.raises(VectorError, match="category/name"):
        list_vectors("v", "a/b/c", "base")


def test_list_vectors_deterministic_order(vec_exp):
    write_vector("v", "cat/t", "base", "prompt[-1]", "gradient", 1, rand(5))
    write_vector("v", "cat/t", "base", "all[:]", "zeta", 1, rand(6))
    refs = list_vectors("v", "cat/t", "base", layer=1)
    # response[:5] (the extraction default) first, then the rest sorted; probe, mean_diff, gradient, rest
    assert [(r.position, r.method) for r in refs] == [
        ("response[:5]", "probe"), ("response[:5]", "mean_diff"), ("all[:]", "zeta"), ("prompt[-1]", "gradient")]


# ---------------------------------------------------------------------------------------------------
# steering evidence

def test_best_is_direction_aware(vec_exp):
    runs = [(1, "probe", 60.0, 80.0), (2, "probe", 75.0, 90.0, 6.0), (3, "mean_diff", 20.0, 85.0),
            (4, "probe", 40.0, 88.0)]
    write_steering("v", "cat/t", "instruct", "response[:5]", runs, direction="positive")
    best = best_vector("v", "cat/t", "base", "instruct", hidden_size=H)
    assert (best.layer, best.method, best.selection_source) == (2, "probe", "steering")
    assert best.score == pytest.approx(25.0) and best.coefficient == 6.0 and best.direction == "positive"
    assert best.baseline == pytest.approx(2.0)
    assert best.sha256 == hashlib.sha256(best.path.read_bytes()).hexdigest()
    assert best.path == paths.vector_file("v", "cat/t", "base", "response__5", "residual", "probe", 2)

    write_steering("v", "cat/t", "instruct", "response[:5]", runs, direction="negative")
    best = best_vector("v", "cat/t", "base", "instruct")
    assert (best.layer, best.method, best.score) == (3, "mean_diff", pytest.approx(-30.0))


def test_coherence_and_naturalness_filters(vec_exp):
    runs = [(1, "probe", 95.0, 76.9), (2, "probe", 70.0, 77.0), (3, "probe", 65.0, 99.0), (3, "probe", 90.0, 10.0)]
    write_steering("v", "cat/t", "instruct", "response[:5]", runs)
    ranked = rank_vectors("v", "cat/t", "base", "instruct")
    # layer 1's run is below coherence 77 (76.9); 77 itself counts; layer 3 keeps its coherent run only
    assert [(r.ref.layer, r.score) for r in ranked] == [(2, 20.0), (3, 15.0)]
    write_steering("v", "cat/t", "instruct", "response[:5]", runs, naturalness={(2, "probe"): 49.0, (3, "probe"): 50.0})
    ranked = rank_vectors("v", "cat/t", "base", "instruct")
    assert [(r.ref.layer, r.naturalness) for r in ranked] == [(3, 50.0)]


def test_best_plus_k_grammar(vec_exp):
    write_steering("v", "cat/t", "instruct", "response[:5]", [(2, "mean_diff", 70.0, 90.0), (4, "probe", 60.0, 90.0)])
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best,best+2,best-1", available_layers=list(range(6)),
                         hidden_size=H)
    assert [(s.layer, s.method, s.selection_source) for s in sel] == [
        (2, "mean_diff", "steering"), (4, "probe", "layers_arg"), (1, "probe", "layers_arg")]
    assert all(s.position == "response[:5]" for s in sel)
    # --method is honoured at every layer, the best included
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best+1", method="mean_diff",
                         available_layers=list(range(6)))
    assert [(s.layer, s.method) for s in sel] == [(3, "mean_diff")]  # best mean_diff is layer 2
    with pytest.raises(LayerSpecError, match=r"layer 5 \(best\+3, best layer 2\).*available layers: 0-3"):
        select_vectors("v", "cat/t", "base", "instruct", layers="best+3", available_layers=[0, 1, 2, 3])


def test_one_steering_variant_decides(vec_exp):
    write_steering("v", "cat/t", "instruct", "response[:5]", [(1, "probe", 80.0, 90.0), (5, "probe", 60.0, 90.0)])
    write_steering("v", "cat/t", "lora", "response[:5]", [(5, "probe", 99.0, 90.0)])
    assert best_vector("v", "cat/t", "base", "instruct").layer == 1
    assert best_vector("v", "cat/t", "base", "lora").layer == 5


def test_extraction_fallback_and_no_evidence(vec_exp):
    with pytest.raises(NoEvidenceError, match="--layer N"):
        rank_vectors("v", "cat/t", "base", "instruct")
    with pytest.raises(NoEvidenceError, match="--layer N"):
        select_vectors("v", "cat/t", "base", "instruct", layers="best")
    # an explicit layer needs no evidence; the deterministic order picks probe at response[:5]
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="3", available_layers=list(range(6)))
    assert [(s.layer, s.method, s.selection_source) for s in sel] == [(3, "probe", "layers_arg")]
    for layer, (acc, sep) in {1: (0.8, 3.0), 4: (0.95, 1.0), 5: (0.95, 2.0)}.items():
        write_vector("v", "cat/t", "base", "response[:5]", "mean_diff", layer, rand(10 * layer + 1),
                     baseline=0.0, val_accuracy=acc, val_separation=sep)
    best = best_vector("v", "cat/t", "base", "instruct")
    # layer 1 has the largest separation but 0.8 < 0.9 x 0.95: the floor keeps it out; 5 beats 4 on separation
    assert (best.layer, best.method, best.selected_by, best.score) == (5, "mean_diff", "extraction", 2.0)
    assert best.selection_source == "layers_arg"   # trait-interp's word for "not chosen by steering"
    assert (best.accuracy, best.separation) == (0.95, 2.0)
    assert best.selection_reason == "held-out separation 2.00, accuracy 0.95 (accuracy floor 0.855), best of 3"
    assert best.describe()["selection_reason"] == best.selection_reason
    # steering evidence, when there is any, wins over extraction metrics
    write_steering("v", "cat/t", "instruct", "response[:5]", [(1, "probe", 51.0, 80.0)])
    assert best_vector("v", "cat/t", "base", "instruct").selection_source == "steering"


def test_position_order_prefers_best(vec_exp):
    for layer in range(6):
        write_vector("v", "cat/t", "base", "prompt[-1]", "probe", layer, rand(100 + layer))
    write_vector("v", "cat/t", "base", "all[:]", "probe", 3, rand(200))
    write_steering("v", "cat/t", "instruct", "prompt[-1]", [(2, "probe", 90.0, 90.0)])
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best,best+1", available_layers=list(range(6)))
    assert [(s.layer, s.position) for s in sel] == [(2, "prompt[-1]"), (3, "prompt[-1]")]
    # without evidence: response[:5] before the rest
    sel = select_vectors("v", "cat/t", "base", "lora", layers="3", available_layers=list(range(6)))
    assert sel[0].position == "response[:5]"


def test_multi_vector_top_n(vec_exp):
    write_steering("v", "cat/t", "instruct", "response[:5]",
                   [(0, "probe", 55.0, 90.0), (3, "mean_diff", 80.0, 90.0), (5, "probe", 70.0, 90.0)])
    sel = select_vectors("v", "cat/t", "base", "instruct", multi_vector=2, available_layers=list(range(6)))
    assert [(s.layer, s.method, s.selection_source) for s in sel] == [(3, "mean_diff", "steering"), (5, "probe", "steering")]
    with pytest.raises(LayerSpecError, match=r"layer\(s\) 5, which.*captured layers: 0-3\)"):
        select_vectors("v", "cat/t", "base", "instruct", multi_vector=2, available_layers=[0, 1, 2, 3])


def test_malformed_results_named(vec_exp):
    path = write_steering("v", "cat/t", "instruct", "response[:5]", [(1, "probe", 60.0, 80.0)],
                          extra_lines=['{"result": {"trait_mean": 1}, "config": {"vectors": [{"layer": 2}]}}',
                                       '{"result": '])
    with pytest.raises(VectorError, match=rf"{path}:5: malformed JSON line"):
        best_vector("v", "cat/t", "base", "instruct")
    path.write_text('{"type": "header", "direction": "sideways"}\n')
    with pytest.raises(VectorError, match=rf"{path}:1: direction"):
        read_steering_results(path)
    path.write_text('{"type": "baseline", "result": {"trait_mean": 1}}\n{"result": {"trait_mean": 2}, "config": {}}\n')
    with pytest.raises(VectorError, match=rf"{path}:2: a run line needs config.vectors"):
        read_steering_results(path)
    path.write_text('{"type": "baseline", "result": {"trait_mean": "high"}}\n')
    with pytest.raises(VectorError, match=rf"{path}:1: result.trait_mean must be a finite number"):
        read_steering_results(path)


def test_run_defaults_and_unscored_runs(vec_exp):
    """Runs without method/component/position default to probe / residual / the folder's position; null scores skip."""
    path = paths.steering_results("v", "cat/t", "instruct", "response__5")
    path.parent.mkdir(parents=True)
    path.write_text("\n".join([
        '{"type": "baseline", "result": {"trait_mean": 10}}',
        '{"result": {"trait_mean": 30, "coherence_mean": 80}, "config": {"vectors": [{"layer": 4}]}}',
        '{"result": {"trait_mean": null, "coherence_mean": 90}, "config": {"vectors": [{"layer": 5}]}}',
    ]))
    res = read_steering_results(path, default_position="response[:5]")
    assert res.direction == "positive" and res.baseline == 10.0
    assert [(r.layer, r.method, r.component, r.position) for r in res.runs] == [
        (4, "probe", "residual", "response[:5]"), (5, "probe", "residual", "response[:5]")]
    ranked = rank_vectors("v", "cat/t", "base", "instruct")
    assert [(r.ref.layer, r.ref.method, r.score) for r in ranked] == [(4, "probe", 20.0)]


# ---------------------------------------------------------------------------------------------------
# the fallback ranking on hand-made held-out metrics (no steering evidence)

def _ref(layer: int, method: str = "probe", position: str = "response[:5]") -> VectorRef:
    return VectorRef("cat/t", layer, method, "residual", sanitize_position(position), Path(f"layer{layer}.pt"))


def _order(metrics) -> list[tuple]:
    return [(r.ref.layer, r.ref.method, r.ref.position) for r in rank_by_extraction_metrics(metrics)]


def test_fallback_ties_at_full_accuracy_go_to_separation():
    """A trained model: every layer at accuracy 1.00; the lexical layer 1 must not win the tie."""
    seps = {0: 0.4, 1: 1.1, 2: 2.9, 3: 3.4, 4: 2.2, 5: 1.5}
    ranked = rank_by_extraction_metrics([(_ref(L), 1.0, sep) for L, sep in seps.items()])
    assert [r.ref.layer for r in ranked] == [3, 2, 4, 5, 1, 0]
    assert ranked[0].score == ranked[0].separation == 3.4 and ranked[0].accuracy == 1.0
    assert ranked[0].reason == "held-out separation 3.40, accuracy 1.00 (accuracy floor 0.9), best of 6"
    assert ranked[1].reason == "held-out separation 2.90, accuracy 1.00 (accuracy floor 0.9)"


def test_fallback_accuracy_floor():
    assert ACCURACY_FLOOR_FRACTION == 0.9
    # floor 0.9 x 0.95 = 0.855: layer 1 (0.85, separation 9) is below it and ranks after every eligible vector
    ranked = rank_by_extraction_metrics([(_ref(1), 0.85, 9.0), (_ref(2), 0.95, 1.0), (_ref(3), 0.90, 2.0)])
    assert [r.ref.layer for r in ranked] == [3, 2, 1]
    assert ranked[2].reason == "held-out separation 9.00, accuracy 0.85, below the accuracy floor 0.855"
    # exactly at the floor competes; a relative floor keeps a hard trait's best layers in play
    assert [r.ref.layer for r in rank_by_extraction_metrics([(_ref(1), 0.9, 5.0), (_ref(2), 1.0, 1.0)])] == [1, 2]
    assert [r.ref.layer for r in rank_by_extraction_metrics([(_ref(1), 0.64, 0.5), (_ref(2), 0.70, 0.3)])] == [1, 2]
    assert rank_by_extraction_metrics([(_ref(1), 0.8, 9.0), (_ref(2), 1.0, 1.0)], floor_fraction=0.5)[0].ref.layer == 1


def test_fallback_exact_ties_are_deterministic():
    """Equal separation: accuracy decides; then position, method, component, layer (lowest first)."""
    metrics = [(_ref(4, "mean_diff"), 1.0, 2.0), (_ref(2, "zeta"), 1.0, 2.0), (_ref(3, "probe", "all[:]"), 1.0, 2.0),
               (_ref(5, "probe"), 1.0, 2.0), (_ref(1, "probe"), 1.0, 2.0), (_ref(0, "probe", "response[:]"), 1.0, 2.0),
               (_ref(6, "probe", "prompt[-1]"), 1.0, 2.0), (_ref(7, "gradient"), 0.98, 2.0)]
    expected = [(1, "probe", "response[:5]"), (5, "probe", "response[:5]"), (4, "mean_diff", "response[:5]"),
                (2, "zeta", "response[:5]"), (0, "probe", "response[:]"), (3, "probe", "all[:]"),
                (6, "probe", "prompt[-1]"), (7, "gradient", "response[:5]")]
    assert _order(metrics) == expected
    assert _order(list(reversed(metrics))) == expected


def test_fallback_missing_metrics():
    metrics = [(_ref(0), None, None),        # no evidence: left out
               (_ref(1), 1.0, None),         # eligible, no separation: after those with one, by accuracy
               (_ref(2), 0.95, None),
               (_ref(3), None, 8.0),         # separation without accuracy: the floor cannot be checked
               (_ref(4), 0.91, 0.5),
               (_ref(5), 0.5, 4.0)]          # below the floor
    ranked = rank_by_extraction_metrics(metrics)
    assert [r.ref.layer for r in ranked] == [4, 1, 2, 3, 5]
    assert ranked[1].score is None and ranked[1].reason == "held-out accuracy 1.00 (accuracy floor 0.9)"
    assert ranked[3].reason == "held-out separation 8.00 (no accuracy recorded, floor not checked)"
    assert [r.ref.layer for r in rank_by_extraction_metrics([(_ref(3), None, 1.0), (_ref(2), None, 2.0)])] == [2, 3]
    assert rank_by_extraction_metrics([(_ref(0), None, None)]) == []


def test_fallback_reads_metadata_and_explains(vec_exp):
    """Through the files: metadata.json entries (val_accuracy / val_separation; val_effect_size as an alias)."""
    for layer, sep in enumerate((0.5, 1.0, 3.0, 2.5, 1.0, 0.1)):
        write_vector("v", "cat/t", "base", "response[:5]", "probe", layer, rand(10 * layer), baseline=0.0,
                     val_accuracy=1.0, val_separation=sep)
    write_vector("v", "cat/t", "base", "response[:]", "probe", 2, rand(77), val_accuracy=1.0, val_effect_size=3.5)
    write_vector("v", "cat/t", "base", "response[:5]", "mean_diff", 2, rand(78), val_accuracy=1.0,
                 val_separation=float("nan"))   # a non-finite metric counts as missing
    best = best_vector("v", "cat/t", "base", "instruct")
    assert (best.layer, best.position, best.separation) == (2, "response[:]", 3.5)
    ranked = rank_vectors("v", "cat/t", "base", "instruct", position="response[:5]")
    assert [(r.ref.layer, r.ref.method) for r in ranked][:3] == [(2, "probe"), (3, "probe"), (1, "probe")]
    assert ranked[-1].ref.method == "mean_diff" and ranked[-1].separation is None
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best,best+1", position="response[:5]")
    assert [(s.layer, s.selected_by, s.selection_source) for s in sel] == [
        (2, "extraction", "layers_arg"), (3, "layers_arg", "layers_arg")]
    assert sel[0].selection_reason.startswith("held-out separation 3.00, accuracy 1.00")
    assert sel[1].selection_reason == "layer 3 requested; probe at response[:5] first in the method/position order"


# ---------------------------------------------------------------------------------------------------
# trait-interp compatibility: its writers' files in, what its readers index out (docs/formats.md)

def ti_write_vectors(exp: str, trait: str, variant: str, position: str, method: str, layers: range,
                     seed: int = 0) -> None:
    """Vectors as trait-interp's extract_vectors writes them: bf16 layer{L}.pt, metadata.json (indent 2)
    with model/trait/method/component/position/layers/timestamp and per layer only norm, baseline, train_acc."""
    g = torch.Generator().manual_seed(seed)
    folder = paths.vectors_dir(exp, trait, variant) / sanitize_position(position) / "residual" / method
    folder.mkdir(parents=True, exist_ok=True)
    layer_info = {}
    for layer in layers:
        v = torch.randn(H, generator=g).to(torch.bfloat16)
        torch.save(v, folder / f"layer{layer}.pt")
        layer_info[str(layer)] = {"norm": float(v.float().norm()), "baseline": 0.1 * layer, "train_acc": 0.9}
    (folder / "metadata.json").write_text(json.dumps({
        "model": "m", "trait": trait, "method": method, "component": "residual", "position": position,
        "layers": layer_info, "timestamp": "2025-01-01T00:00:00"}, indent=2))


def ti_write_results(exp: str, trait: str, variant: str, position: str, runs: list[tuple], baseline: float | None,
                     direction: str = "positive") -> Path:
    """results.jsonl as trait-interp's init_results_file + append_baseline + append_run write it: one json.dumps
    per line; a run's config is {"vectors": [VectorSpec.to_dict()]} (layer, component, position, method, weight)."""
    path = paths.steering_results(exp, trait, variant, sanitize_position(position))
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"type": "header", "trait": trait, "direction": direction, "steering_model": "m",
              "steering_experiment": exp, "vector_source": {"model": "m", "experiment": exp, "trait": trait},
              "eval": {"model": "gpt-4.1-mini", "method": "logprob", "trait_judge": None},
              "prompts_file": f"datasets/traits/{trait}/steering.json"}]
    if baseline is not None:
        lines.append({"type": "baseline", "result": {"trait_mean": baseline, "trait_std": 3.0, "coherence_mean": 91.0,
                                                     "n": 5}, "eval": {"trait_judge": None},
                      "timestamp": "2025-01-01T00:00:01"})
    for layer, method, weight, trait_mean, coherence in runs:
        lines.append({"result": {"trait_mean": trait_mean, "trait_std": 4.0, "success_rate": 0.6, "min_score": 1.0,
                                 "max_score": 99.0, "coherence_mean": coherence, "n": 5},
                      "config": {"vectors": [{"layer": layer, "component": "residual", "position": position,
                                              "method": method, "weight": weight}]},
                      "eval": {"trait_judge": None}, "timestamp": "2025-01-01T00:00:02"})
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return path


def ti_remove_baseline(path: Path) -> None:
    """What trait-interp's remove_baseline() leaves: every non-blank line but the baseline, re-dumped."""
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept if e.get("type") != "baseline"))


def test_get_steering_result_without_baseline_line_takes_baseline_0(vec_exp, capsys):
    """trait-interp's _get_steering_result reads a results.jsonl whose baseline remove_baseline() dropped with
    baseline 0; so do we, with one warning line, instead of refusing the file."""
    ti_write_vectors("v", "cat/ti", "base", "response[:]", "probe", range(4))
    path = ti_write_results("v", "cat/ti", "instruct", "response[:]",
                            [(1, "probe", 4.0, 70.0, 85.0), (2, "probe", 6.0, 80.0, 60.0),
                             (3, "probe", 2.0, 65.0, 90.0)], baseline=40.0)
    with_baseline = rank_vectors("v", "cat/ti", "base", "instruct")
    assert [(r.ref.layer, r.score) for r in with_baseline] == [(1, 30.0), (3, 25.0)]   # layer 2: coherence 60
    ti_remove_baseline(path)
    assert [json.loads(line).get("type") for line in path.read_text().splitlines()] == ["header", None, None, None]
    capsys.readouterr()
    res = read_steering_results(path)
    assert (res.baseline, res.baseline_missing, len(res.runs)) == (0.0, True, 3)
    ranked = rank_vectors("v", "cat/ti", "base", "instruct")
    assert [(r.ref.layer, r.score, r.coefficient) for r in ranked] == [(1, 70.0, 4.0), (3, 65.0, 2.0)]
    assert ranked[0].reason == ("steering delta +70.0 at coefficient 4 (coherence 85, positive, variant instruct, "
                                "no baseline line: baseline 0)")
    best = best_vector("v", "cat/ti", "base", "instruct", hidden_size=H)
    assert (best.layer, best.position, best.selection_source, best.score) == (1, "response[:]", "steering", 70.0)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == [f"warning: {path}: no baseline line; taking baseline 0 as trait-interp does, so its steering "
                      f"deltas are raw trait means (re-run the baseline to restore it)"]   # once per file


def _viewer_layer(entries: list[dict], num_layers: int) -> int:
    """The entry trait-interp's Trait Dynamics view shows with layers mode off (views/trait-dynamics.js): the
    `selection_source === 'steering'` entry's layer + floor(0.1 n), else floor(0.6 n), snapped to the closest
    entry (the first one on a tie)."""
    steering = next((e for e in entries if e["selection_source"] == "steering"), None)
    target = steering["layer"] + num_layers // 10 if steering else (6 * num_layers) // 10
    best = entries[0]
    for e in entries[1:]:
        if abs(e["layer"] - target) < abs(best["layer"] - target):
            best = e
    return best["layer"]


def test_viewer_best_vector_reads_selection_source(vec_exp):
    """Every selection_source we write is one trait-interp writes and its viewer knows ("steering" marks the
    entry it aims at, anything else counts as not from steering); our detail is in selected_by / selection_reason."""
    for layer in range(6):
        write_vector("v", "cat/t", "base", "response[:5]", "probe", layer, rand(10 * layer), baseline=0.0,
                     val_accuracy=1.0, val_separation=[0.5, 1.0, 3.0, 2.0, 1.5, 0.2][layer])
    # no steering evidence: the extraction pick is "layers_arg" to the viewer (no entry claims steering)
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best,best+1,best+2",
                         available_layers=list(range(6)))
    entries = [{"layer": s.layer, "selection_source": s.selection_source} for s in sel]
    described = [s.describe() for s in sel]
    written = {e["selection_source"] for e in entries} | {d["selection_source"] for d in described}
    assert written <= set(SELECTION_SOURCES)
    assert [(d["layer"], d["selected_by"]) for d in described] == [
        (2, "extraction"), (3, "layers_arg"), (4, "layers_arg")]
    assert described[0]["selection_reason"].startswith("held-out separation 3.00")
    assert _viewer_layer(entries, 6) == 3          # the viewer's own fallback (60% depth), not a wrong "steering" aim
    # steering evidence: the viewer finds the steering entry at our best layer and aims from it
    write_steering("v", "cat/t", "instruct", "response[:5]", [(1, "probe", 80.0, 90.0)])
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="best,best+1,best+3",
                         available_layers=list(range(6)))
    entries = [{"layer": s.layer, "selection_source": s.selection_source} for s in sel]
    assert entries == [{"layer": 1, "selection_source": "steering"}, {"layer": 2, "selection_source": "layers_arg"},
                       {"layer": 4, "selection_source": "layers_arg"}]
    assert [s.describe()["selected_by"] for s in sel] == ["steering", "layers_arg", "layers_arg"]
    assert _viewer_layer(entries, 10) == 2         # best 1 + floor(0.1 x 10), as it does for its own files
    assert [viewer_selection_source(x) for x in ("steering", "extraction", "layers_arg", None)] == [
        "steering", "layers_arg", "layers_arg", "layers_arg"]


def test_positions_trait_interp_looks_for_are_found(vec_exp):
    """Vectors at response[:] / response[:5] (trait-interp's defaults) and all[:] (ours) are all discovered;
    without evidence the order is response[:5], response[:], all[:], then the rest."""
    for position in ("all[:]", "response[:]", "prompt[-1]"):
        ti_write_vectors("v", "cat/t", "base", position, "probe", range(2, 3), seed=len(position))
    refs = list_vectors("v", "cat/t", "base", method="probe", layer=2)
    assert [r.position for r in refs] == ["response[:5]", "response[:]", "all[:]", "prompt[-1]"]
    assert [r.pos_dir for r in refs] == ["response__5", "response_all", "all_all", "prompt_-1"]
    sel = select_vectors("v", "cat/t", "base", "instruct", layers="2", method="probe")
    assert (sel[0].position, sel[0].selected_by) == ("response[:5]", "layers_arg")
    # with only trait-interp's reader default and ours, response[:] comes first
    for position in ("response[:5]", "prompt[-1]"):
        shutil.rmtree(paths.vectors_dir("v", "cat/t", "base") / sanitize_position(position))
    assert [r.position for r in list_vectors("v", "cat/t", "base", layer=2)] == ["response[:]", "all[:]"]
    v, meta = load_vector("v", "cat/t", "base", "response[:]", "residual", "probe", 2, hidden_size=H)
    assert v.dtype == torch.float32 and meta["layers"]["2"] == pytest.approx(
        {"norm": meta["layers"]["2"]["norm"], "baseline": 0.2, "train_acc": 0.9})


def test_reference_points_from_metadata_card_or_baseline_only(vec_exp):
    """A trait-interp vector's metadata has only norm and baseline: its reference is the baseline alone (z units
    refused with a VectorError that says how to get them); a card.json next to the vectors (trait-card) supplies
    the held-out class statistics; a non-finite card number is refused naming the file."""
    ti_write_vectors("v", "cat/ref", "base", "response[:]", "probe", range(3))
    sel = select_vectors("v", "cat/ref", "base", "base", layers="2")[0]
    ref = sel.reference
    assert (ref.source, ref.baseline, ref.spread, ref.pos_mean) == ("baseline only", pytest.approx(0.2), None, None)
    assert ref.relative(1.2, "baseline") == pytest.approx(1.0)
    with pytest.raises(VectorError, match="--units z: this vector has no held-out spread.*trait-card"):
        ref.relative(1.2, "z")
    assert sel.explanation == "layer 2 as requested (--layers), not ranked"

    card = paths.vectors_dir("v", "cat/ref", "base") / "card.json"
    entry = {"auroc": 0.9, "accuracy": 0.8, "recall_at_fpr": 0.5, "neutral_threshold": 0.3, "random_auroc_mean": 0.5,
             "random_auroc_max": 0.7, "sign_ok": True, "baseline": 9.0, "pos_mean": 2.0, "neg_mean": -1.0,
             "pos_std": 3.0, "neg_std": 4.0, "spread": 3.5355}
    card.write_text(json.dumps({"trait": "cat/ref", "fpr": 0.01, "n_random": 32,
                                "sets": {"response_all/residual/probe": {"2": entry}}}))
    ref = select_vectors("v", "cat/ref", "base", "base", layers="2")[0].reference
    # the metadata's baseline wins over the card's; the class statistics come from the card
    assert (ref.source, ref.baseline, ref.pos_mean, ref.neg_mean) == ("card", pytest.approx(0.2), 2.0, -1.0)
    assert ref.spread == pytest.approx((12.5) ** 0.5)
    assert ref.relative(0.2 + 2 * ref.spread, "z") == pytest.approx(2.0)
    card.write_text(json.dumps({"trait": "cat/ref", "sets": {"response_all/residual/probe": {"2": {
        **entry, "auroc": 1.5}}}}))
    with pytest.raises(TraitError, match=r"card\.json: sets\.response_all/residual/probe\.2: auroc must lie in \[0, 1\]"):
        select_vectors("v", "cat/ref", "base", "base", layers="2")


def test_plain_words_for_a_steering_pick(vec_exp):
    """The explanation a person reads names the evidence: steering delta, coherence, layer, coefficient (in residual
    norms when the run recorded relative_weight); the files keep trait-interp's codes."""
    ti_write_vectors("v", "cat/pw", "base", "response[:]", "probe", range(3))
    path = ti_write_results("v", "cat/pw", "instruct", "response[:]",
                            [(1, "probe", 4.0, 70.0, 85.0), (2, "probe", 6.0, 60.0, 90.0)], baseline=40.0)
    best = best_vector("v", "cat/pw", "base", "instruct")
    assert best.explanation == "chosen by steering: +30 trait at coherence 85, layer 1, coefficient 4"
    assert best.selection_source == "steering" and best.describe()["explanation"] == best.explanation
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["config"]["vectors"][0]["relative_weight"] = 0.8
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_vector("v", "cat/pw", "base", "instruct").explanation == (
        "chosen by steering: +30 trait at coherence 85, layer 1, 0.8x")


def test_metadata_is_validated(vec_exp):
    """metadata.json: layer keys integers, entries objects, norm and baseline finite (NaN metrics count as missing)."""
    ti_write_vectors("v", "cat/mv", "base", "response[:]", "probe", range(2))
    path = paths.vector_metadata("v", "cat/mv", "base", "response_all", "residual", "probe")
    meta = json.loads(path.read_text())
    for layers, message in (({"x": {}}, r"layers\.x: layer keys are non-negative integers"),
                            ({"1": 3}, r"layers\.1: expected an object"),
                            ({"1": {"baseline": float("inf")}}, r"layers\.1\.baseline must be a finite number")):
        path.write_text(json.dumps({**meta, "layers": layers}))
        with pytest.raises(VectorError, match=rf"{path.name}: {message}"):
            select_vectors("v", "cat/mv", "base", "base", layers="1")
