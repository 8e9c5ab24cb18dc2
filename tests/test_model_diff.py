"""analysis/model_diff: compare_variants.py and per_token_diff.py against independent oracles.

    statistics: core.stats against Python's `statistics` module; N = 1 and zero variance give None + reason
    clause splitting on hand-made token lists (decimals, abbreviations, ellipses, quotes, em dash, newlines)
    compare_variants on hand-written raw .pt files: numbers against an fp64 oracle, a trait without overlapping
        layers skipped, N = 1 valid JSON with nulls, bf16 activations averaged in fp32, token mismatch and flag
        errors (exit 2, nothing written), --use-existing-diff without raw files, results merged trait by trait
    per_token_diff on hand-written projections: vector / token / layer mismatches named, N = 1 nulls
    the README's cross-variant workflow from the shell on the zoo (llama + a random LoRA): every number equal
        to one recomputed from HF output_hidden_states of the base model and the PeftModel on the same ids
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.model_diff import compare_variants as cv
from analysis.model_diff import per_token_diff as ptd
from analysis.model_diff.per_token_diff import clause_breaks, split_into_clauses
from core import stats
from utils import paths
from utils.storage import load_pt, write_pt

REPO = Path(__file__).resolve().parents[1]
H = 6
POS = "response[:5]"


def strict_json(path: Path):
    """json.load that refuses NaN / Infinity (what a browser's JSON.parse does)."""
    def bad(c):
        raise ValueError(f"{path}: invalid JSON constant {c}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


# ---------------------------------------------------------------------------------------------------------
# statistics

def _oracle_d(b, a):
    pooled = math.sqrt((statistics.stdev(a) ** 2 + statistics.stdev(b) ** 2) / 2)
    return (statistics.fmean(b) - statistics.fmean(a)) / pooled


def test_effect_sizes_match_statistics_module():
    a = [0.3, -1.2, 2.5, 0.9, 1.1]
    b = [0.8, -0.2, 2.9, 2.0, 1.0]
    assert stats.cohens_d(b, a).value == pytest.approx(_oracle_d(b, a), rel=1e-12)
    diffs = [y - x for x, y in zip(a, b)]
    assert stats.paired_d(b, a).value == pytest.approx(statistics.fmean(diffs) / statistics.stdev(diffs), rel=1e-12)
    assert stats.std(a).value == pytest.approx(statistics.stdev(a), rel=1e-12)
    # unequal group sizes: the classical pooled variance
    a2 = a + [4.0, -3.0]
    pooled = math.sqrt((6 * statistics.variance(a2) + 4 * statistics.variance(b)) / 10)
    assert stats.cohens_d(b, a2).value == pytest.approx((statistics.fmean(b) - statistics.fmean(a2)) / pooled)
    u, v = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0, 3.0])
    assert stats.cosine(u, v).value == pytest.approx(float(u @ v) / (u.norm() * v.norm()).item(), rel=1e-6)
    assert stats.peak_index([0.5, None, -2.0, 2.0]) == 2   # largest |d|, first wins ties
    assert stats.peak_index([None, None]) is None


def test_undefined_statistics_are_none_with_reason():
    for s in (stats.cohens_d([1.0], [2.0]), stats.paired_d([1.0], [2.0]), stats.std([1.0])):
        assert s.value is None and "n=1" in s.reason
    s = stats.cohens_d([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert s.value is None and "zero variance" in s.reason
    s = stats.paired_d([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])        # constant shift: d_z undefined, d defined
    assert s.value is None and "zero variance" in s.reason
    assert stats.cohens_d([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]).value == pytest.approx(1.0)
    assert stats.cosine(torch.zeros(3), torch.ones(3)).value is None
    with pytest.raises(ValueError):
        stats.mean([1.0, float("nan")])


# ---------------------------------------------------------------------------------------------------------
# clause splitting

def _clauses(tokens):
    out, cur = [], ""
    for tok, br in zip(tokens, clause_breaks(tokens)):
        cur += tok
        if br:
            out.append(cur)
            cur = ""
    return out


@pytest.mark.parametrize("tokens, expected", [
    (["Hello", ",", " world", ".", " How", " are", " you", "?"], ["Hello,", " world.", " How are you?"]),
    (["It", " costs", " 3", ".", "5", " dollars", ".", " OK"], ["It costs 3.5 dollars.", " OK"]),
    (["It", " costs", " 3.", "5", "."], ["It costs 3.5."]),
    (["See", " e", ".", "g", ".", " this", " and", " Dr", ".", " Smith", " now", "."],
     ["See e.g. this and Dr. Smith now."]),
    (["The", " U", ".", "S", ".", " is", " big", ";", " so", " is", " Canada"], ["The U.S. is big;", " so is Canada"]),
    (["Wait", "...", " what", "?!", " yes"], ["Wait...", " what?!", " yes"]),
    (["Wait", ".", ".", ".", " no"], ["Wait...", " no"]),
    (["He", " said", " \"", "no", ".\"", " Then", " left"], ["He said \"no.\"", " Then left"]),
    (["a", " \u2014", " b", "\n", "c", ":", " d"], ["a \u2014", " b\n", "c:", " d"]),
    (["1", ",", "000", " people", " at", " 10", ":", "30"], ["1,000 people at 10:30"]),
    (["see", " example", ".", "com", " now", "!"], ["see example.com now!"]),
    (["one"], ["one"]),
])
def test_clause_breaks_on_hand_made_tokens(tokens, expected):
    assert _clauses(tokens) == expected


def test_split_into_clauses_fields_and_whitespace_spans():
    tokens = ["Yes", ",", " sure", ".", "\n", "\n", "Bye"]
    deltas = [1.0, 3.0, -2.0, 0.5, 9.0, 9.0, -1.0]
    clauses = split_into_clauses(tokens, deltas)
    assert [c["text"] for c in clauses] == ["Yes,", " sure.", "Bye"]   # lone newlines are not clauses
    assert [c["token_range"] for c in clauses] == [[0, 2], [2, 4], [6, 7]]
    assert clauses[0]["mean_delta"] == 2.0 and clauses[0]["max_delta"] == 3.0 and clauses[0]["min_delta"] == 1.0
    assert clauses[1]["mean_delta"] == pytest.approx(-0.75) and clauses[1]["n_tokens"] == 2
    with pytest.raises(ValueError):
        split_into_clauses(["a"], [1.0, 2.0])


def test_user_prompt_text_strips_template():
    prefix, suffix = "<bos><|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    assert ptd.user_prompt_text(prefix + "Why?" + suffix, (prefix, suffix)) == ("Why?", "chat_template_stripped")
    assert ptd.user_prompt_text(prefix + "Why?" + suffix + "Sure", (prefix, suffix))[0] == "Why?"  # prefill
    assert ptd.user_prompt_text("plain", None) == ("plain", "formatted_prompt")


def test_prompt_text_without_the_prompt_set_strips_the_zoo_chat_template(experiments, zoo):
    from utils.model import format_prompt, load_tokenizer

    experiments("pz", {"v": {"model": zoo("llama")}})
    formatted, _ = format_prompt(load_tokenizer(zoo("llama")), "Is 3.5 > 2?", "Be brief.")
    texts = ptd._PromptTexts("pz", "no/such_set", "v")
    assert formatted != "Is 3.5 > 2?"
    assert texts.get("7", formatted, "Be brief.") == ("Is 3.5 > 2?", "chat_template_stripped")
    assert texts.get("7", formatted + "Sure,", "Be brief.")[0] == "Is 3.5 > 2?"     # a --prefill is dropped too


# ---------------------------------------------------------------------------------------------------------
# hand-written experiment files

def write_vector(exp: str, trait: str, variant: str, method: str, layer: int, vec: torch.Tensor,
                 position: str = POS, component: str = "residual") -> Path:
    pos_dir = sanitize(position)
    path = paths.vector_file(exp, trait, variant, pos_dir, component, method, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vec, path)
    mpath = paths.vector_metadata(exp, trait, variant, pos_dir, component, method)
    meta = json.loads(mpath.read_text()) if mpath.exists() else {
        "model": "zoo", "trait": trait, "method": method, "component": component, "position": position, "layers": {}}
    meta["layers"][str(layer)] = {"norm": float(vec.norm()), "baseline": 0.25}
    mpath.write_text(json.dumps(meta))
    return path


def sanitize(position: str) -> str:   # the pos_dir rule of docs/formats.md, written out here rather than imported
    return position.replace("[:]", "_all").replace("[", "_").replace("]", "").replace(":", "_")


def write_steering(exp: str, trait: str, variant: str, method: str, best_layer: int, other_layer: int) -> Path:
    path = paths.steering_results(exp, trait, variant, sanitize(POS))
    path.parent.mkdir(parents=True, exist_ok=True)
    run = lambda layer, mean: {"result": {"trait_mean": mean, "coherence_mean": 85.0},  # noqa: E731
                               "config": {"vectors": [{"layer": layer, "method": method, "component": "residual",
                                                       "position": POS, "weight": 4.0}]}}
    lines = [{"type": "header", "trait": trait, "direction": "positive"},
             {"type": "baseline", "result": {"trait_mean": 20.0}}, run(best_layer, 70.0), run(other_layer, 40.0)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def write_raw(exp: str, variant: str, pset: str, pid: str, resp_ids: list[int], acts: dict[int, torch.Tensor],
              prompt_ids: list[int] = (1, 2, 3)) -> None:
    rec = {"prompt": {"text": "p", "tokens": [f"t{i}" for i in prompt_ids], "token_ids": list(prompt_ids),
                      "activations": {}},
           "response": {"text": "r", "tokens": [f"t{i}" for i in resp_ids], "token_ids": list(resp_ids),
                        "activations": {layer: {"residual": t.clone()} for layer, t in acts.items()}},
           "metadata": {"variant": variant}}
    write_pt(paths.raw_file(exp, variant, pset, pid), rec)


def make_synthetic(experiments, n_prompts: int = 5, layers=(0, 1, 2), dtype=torch.float32, seed: int = 0,
                   shift: float = 0.7):
    """Variants A/B with random response activations (B = A + a shift along e0 + noise), two traits:
    `t/overlap` with vectors at layers 1, 2, 3 and `t/elsewhere` only at layer 5 (never captured)."""
    experiments("md", {"a": {"model": "none"}, "b": {"model": "none"}}, defaults={"extraction": "a", "application": "a"})
    g = torch.Generator().manual_seed(seed)
    acts = {"a": {}, "b": {}}
    for i in range(n_prompts):
        n_tok = 3 + i % 3
        ids = [10 + i + k for k in range(n_tok)]
        for v in ("a", "b"):
            per_layer = {}
            for layer in layers:
                base = torch.randn(n_tok, H, generator=g)
                if v == "b":
                    base = acts["a"][str(i)][layer].float() + shift * torch.eye(H)[0] + 0.3 * torch.randn(n_tok, H, generator=g)
                per_layer[layer] = base.to(dtype)
            acts[v][str(i)] = per_layer
            write_raw("md", v, "s/set", str(i), ids, per_layer)
    vecs = {}
    for layer in (1, 2, 3):
        vecs[("t/overlap", layer)] = torch.randn(H, generator=g) * 3.0   # not unit: the tool normalises
        write_vector("md", "t/overlap", "a", "probe", layer, vecs[("t/overlap", layer)])
    vecs[("t/elsewhere", 5)] = torch.randn(H, generator=g)
    write_vector("md", "t/elsewhere", "a", "probe", 5, vecs[("t/elsewhere", 5)])
    return acts, vecs


def _oracle(acts, vec: torch.Tensor, layer: int):
    """Per-prompt fp64 means over response tokens, projections on the unit vector, the diff."""
    u = vec.double() / vec.double().norm()
    ids = sorted(acts["a"], key=int)
    ma = [acts["a"][i][layer].double().mean(0) for i in ids]
    mb = [acts["b"][i][layer].double().mean(0) for i in ids]
    pa = [float(m @ u) for m in ma]
    pb = [float(m @ u) for m in mb]
    diff = torch.stack(mb).mean(0) - torch.stack(ma).mean(0)
    return pa, pb, diff


# ---------------------------------------------------------------------------------------------------------
# compare_variants on hand-written files

def test_compare_matches_oracle_and_skips_trait_without_overlap(experiments):
    acts, vecs = make_synthetic(experiments)
    s = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    res = strict_json(out / "results.json")
    assert res["n_prompts"] == 5 and res["component"] == "residual" and res["captured_layers"] == [0, 1, 2]
    assert "t/elsewhere" in res["skipped_traits"] and "no overlapping layers" in res["skipped_traits"]["t/elsewhere"]
    assert "t/elsewhere" in s["skipped"] and "t/elsewhere" not in res["traits"]
    t = res["traits"]["t/overlap"]
    assert t["layers"] == [1, 2] and t["vector_layers_not_captured"] == [3]
    assert t["method"] == "probe" and t["position"] == POS and t["vector_component"] == "residual"
    assert [f["layer"] for f in t["vector_files"]] == [1, 2] and all(len(f["sha256"]) == 64 for f in t["vector_files"])
    ds = []
    for k, layer in enumerate(t["layers"]):
        vec = vecs[("t/overlap", layer)]
        pa, pb, diff = _oracle(acts, vec, layer)
        d = _oracle_d(pb, pa)
        deltas = [y - x for x, y in zip(pa, pb)]
        assert t["per_layer_effect_size"][k] == pytest.approx(d, rel=1e-5)
        assert t["per_layer_paired_effect_size"][k] == pytest.approx(
            statistics.fmean(deltas) / statistics.stdev(deltas), rel=1e-5)
        assert t["per_layer_std_a"][k] == pytest.approx(statistics.stdev(pa), rel=1e-5)
        assert t["per_layer_std_b"][k] == pytest.approx(statistics.stdev(pb), rel=1e-5)
        cos = float(diff @ vec.double()) / float(diff.norm() * vec.double().norm())
        assert t["per_layer_cosine_sim"][k] == pytest.approx(cos, rel=1e-5)
        assert t["per_layer_projections_a"][k] == pytest.approx(pa, rel=1e-5, abs=1e-6)
        ds.append(d)
    peak = max(range(2), key=lambda k: abs(ds[k]))
    assert t["peak_layer"] == t["layers"][peak]
    assert t["peak_effect_size"] == t["per_layer_effect_size"][peak]
    assert t["peak_paired_effect_size"] == t["per_layer_paired_effect_size"][peak]
    # diff_vectors.pt: trait-interp's bare tensor, row L = layer L (the model config is unreadable here: the
    # deepest captured layer + 1 rows); what it holds is in the sidecar diff_vectors.json
    dv = torch.load(out / "diff_vectors.pt", weights_only=True)
    side = strict_json(out / "diff_vectors.json")
    assert side["layers"] == [0, 1, 2] and side["component"] == "residual" and side["n_prompts"] == 5
    assert (side["variant_a"], side["variant_b"]) == ("a", "b") and dv.dtype == torch.float32
    assert dv.shape == (3, H) and side["shape"] == [3, H]
    for layer in side["layers"]:
        assert torch.allclose(dv[layer].double(), _oracle(acts, torch.ones(H), layer)[2], atol=1e-5)


def test_compare_averages_bf16_activations_in_fp32(experiments):
    """A shift far below bf16 resolution of the activations: the fp32 mean keeps it (trait-interp lost it)."""
    experiments("md", {"a": {"model": "none"}, "b": {"model": "none"}}, defaults={"extraction": "a", "application": "a"})
    g = torch.Generator().manual_seed(3)
    acts = {"a": {}, "b": {}}
    for i in range(4):
        a = (64.0 + torch.randn(40, H, generator=g)).to(torch.bfloat16)
        a[:, 0] = 64.0
        b = a.clone()
        b[i, 0] = 64.5          # one bf16 ulp on one token of 40: the mean of dim 0 moves by 0.0125
        acts["a"][str(i)], acts["b"][str(i)] = {1: a}, {1: b}
        write_raw("md", "a", "s", str(i), list(range(40)), {1: a})
        write_raw("md", "b", "s", str(i), list(range(40)), {1: b})
    write_vector("md", "t/x", "a", "probe", 1, torch.eye(H)[0])
    cv.compare_variants("md", "a", "b", "s", method="probe", position=POS, progress=False)
    dv = load_pt(paths.model_diff_dir("md", "a", "b") / "s" / "diff_vectors.pt")   # row L = layer L
    assert float(dv[1, 0]) == pytest.approx(0.0125, rel=1e-3) and not dv[0].any()   # fp32 ulp at 64 is 7.6e-6
    # averaging in bf16 first (trait-interp) rounds 64.0125 back to 64.0: the shift vanishes
    assert all(float(acts["b"][k][1].mean(0)[0]) == 64.0 for k in acts["b"])
    res = strict_json(paths.model_diff_dir("md", "a", "b") / "s" / "results.json")
    # every prompt projects to the same value: no effect size, so the entry is under incomplete_traits
    assert res["incomplete_traits"]["t/x"]["per_layer_cosine_sim"][0] == pytest.approx(1.0, abs=1e-6)


def test_compare_single_prompt_gives_valid_json_with_nulls(experiments):
    make_synthetic(experiments, n_prompts=1)
    cv.compare_variants("md", "a", "b", "s/set", traits="t/overlap", method="probe", position=POS, progress=False)
    res = strict_json(paths.model_diff_dir("md", "a", "b") / "s/set" / "results.json")
    # no defined peak: kept out of the keys trait-interp's viewer draws (it calls .toFixed on the peak)
    assert "t/overlap" not in res["traits"]
    t = res["incomplete_traits"]["t/overlap"]
    assert "no defined effect size" in t["reason"] and "n=1" in t["reason"]
    assert res["n_prompts"] == 1
    assert t["per_layer_effect_size"] == [None, None] and t["per_layer_paired_effect_size"] == [None, None]
    assert t["per_layer_std_a"] == [None, None] and t["peak_layer"] is None and t["peak_effect_size"] is None
    assert all(isinstance(c, float) for c in t["per_layer_cosine_sim"])
    assert "n=1" in t["null_reasons"]["per_layer_effect_size"]["1"]
    assert t["null_reasons"]["peak_layer"]


def test_compare_token_mismatch_is_an_error_listing_ids(experiments, capsys):
    make_synthetic(experiments, n_prompts=4)
    for pid in ("1", "3"):   # B's responses differ from A's for two prompts
        write_raw("md", "b", "s/set", pid, [99, 98, 97], {0: torch.zeros(3, H), 1: torch.zeros(3, H),
                                                         2: torch.zeros(3, H)})
    rc = cv.main(["--experiment", "md", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "s/set",
                  "--method", "probe", "--position", POS, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "2 prompt(s)" in err and "1, 3" in err and "--responses-from b" in err
    assert not paths.model_diff_dir("md", "a", "b").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--use-best-vector", "--method", "probe", "--position", POS], "not both"),
    ([], "--use-best-vector, or --method"),
    (["--method", "probe"], "--position is missing"),
    (["--position", POS], "--method is missing"),
])
def test_compare_needs_exactly_one_vector_form(experiments, capsys, extra, needle):
    make_synthetic(experiments, n_prompts=2)
    rc = cv.main(["--experiment", "md", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "s/set", *extra])
    assert rc == 2 and needle in capsys.readouterr().err
    assert not paths.model_diff_dir("md", "a", "b").exists()


def test_compare_existing_diff_without_raw_files_and_merge(experiments):
    acts, _ = make_synthetic(experiments)
    write_vector("md", "t/second", "a", "mean_diff", 2, torch.arange(H, dtype=torch.float32) + 1)
    cv.compare_variants("md", "a", "b", "s/set", traits="t/overlap", method="probe", position=POS, progress=False)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    first = strict_json(out / "results.json")["traits"]["t/overlap"]
    # the raw files are gone: the saved per-prompt means carry the effect sizes of a new trait
    for v in ("a", "b"):
        for f in paths.raw_dir("md", v, "s/set").glob("*.pt"):
            f.unlink()
    cv.compare_variants("md", "a", "b", "s/set", traits="t/second", method="mean_diff", position=POS,
                        use_existing_diff=True, progress=False)
    res = strict_json(out / "results.json")
    assert set(res["traits"]) == {"t/overlap", "t/second"}           # merged, the first kept
    assert res["traits"]["t/overlap"] == first
    pa, pb, _ = _oracle(acts, torch.arange(H, dtype=torch.float32) + 1, 2)
    assert res["traits"]["t/second"]["per_layer_effect_size"] == pytest.approx([_oracle_d(pb, pa)], rel=1e-5)
    with pytest.raises(cv.CompareError, match="component"):
        cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, component="attn_contribution",
                            use_existing_diff=True, progress=False)


def test_compare_one_failing_trait_keeps_the_others(experiments, capsys):
    make_synthetic(experiments)
    write_vector("md", "t/bad", "a", "probe", 1, torch.ones(H + 1))    # a vector of another model's hidden size
    rc = cv.main(["--experiment", "md", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "s/set",
                  "--method", "probe", "--position", POS, "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and "t/bad failed" in captured.err and "t/overlap: no selected vector (no headline); exploratory peak L" in captured.out
    res = strict_json(paths.model_diff_dir("md", "a", "b") / "s/set" / "results.json")
    assert set(res["traits"]) == {"t/overlap"}
    assert "hidden size" in res["skipped_traits"]["t/bad"] and "no overlapping" in res["skipped_traits"]["t/elsewhere"]


@pytest.mark.parametrize("module", [cv, ptd])
def test_help_has_description_and_example(module, capsys):
    code = module.main(["--help"])      # utils.cli.run returns argparse's exit status instead of raising it
    out = capsys.readouterr().out
    assert code == 0 and "example" in out and "--variant-b" in out and "B - A" in out


# ---------------------------------------------------------------------------------------------------------
# per_token_diff on hand-written projections

SHA = "ab" * 32


def write_projection(exp, variant, trait, pset, pid, layer_scores: dict[int, list[float]], sha=SHA, best=None,
                     centered=False, method="probe"):
    entries = [{"method": method, "layer": layer, "position": POS, "component": "residual",
                "selection_source": "steering" if layer == best else "layers_arg", "baseline": 0.0,
                "prompt": [], "response": list(sc)} for layer, sc in layer_scores.items()]
    doc = {"metadata": {"prompt_id": pid, "prompt_set": pset, "component": "residual", "position": POS,
                        "centered": centered, "multi_vector": True, "n_vectors": len(entries),
                        "vectors": [{"layer": layer, "method": method, "component": "residual", "position": POS,
                                     "sha256": sha} for layer in layer_scores]},
           "projections": entries}
    path = paths.projection_file(exp, variant, trait, pset, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def write_response(exp, variant, pset, pid, prompt_tokens, resp_tokens, resp_ids):
    ids = list(range(len(prompt_tokens))) + list(resp_ids)
    doc = {"prompt": "".join(prompt_tokens), "response": "".join(resp_tokens), "system_prompt": None,
           "tokens": list(prompt_tokens) + list(resp_tokens), "token_ids": ids, "prompt_end": len(prompt_tokens)}
    path = paths.response_file(exp, variant, pset, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _per_token_setup(experiments, n=2):
    experiments("pt", {"a": {"model": "none"}, "b": {"model": "none"}}, defaults={"extraction": "a", "application": "a"})
    toks = ["Yes", ",", " fine", "."]
    for i in range(n):
        pid = str(i)
        for v in ("a", "b"):
            write_response("pt", v, "set", pid, ["<u>", "Q"], toks, [5, 6, 7, 8])
        write_projection("pt", "a", "c/t", "set", pid, {1: [0.0, 1.0, 2.0, 3.0], 2: [1.0] * 4}, best=1)
        write_projection("pt", "b", "c/t", "set", pid, {1: [1.0, 1.0 + i, 0.0, 3.5], 2: [0.0] * 4}, best=1)


def test_per_token_diff_numbers_and_single_prompt_nulls(experiments):
    _per_token_setup(experiments, n=1)
    out = paths.model_diff_dir("pt", "a", "b") / "per_token_diff" / "c/t" / "set"
    out.mkdir(parents=True)
    (out / "9.json").write_text("{}")      # a prompt of an earlier run, no longer in the set
    with pytest.raises(ptd.TraitError, match="9.json exists"):   # removing an earlier run's file replaces it
        ptd.per_token_diff("pt", "a", "b", "set", trait="c/t", progress=False)
    s = ptd.per_token_diff("pt", "a", "b", "set", trait="c/t", progress=False, overwrite=True)
    assert not (out / "9.json").exists() and any("earlier run" in w for w in s["warnings"])
    rec = strict_json(out / "0.json")
    assert rec["per_token_delta"] == [1.0, 0.0, -2.0, 0.5] and rec["layer"] == 1 and s["layers"]["c/t"] == 1
    assert rec["mean_delta"] == pytest.approx(-0.125) and rec["tokens"] == ["Yes", ",", " fine", "."]
    assert rec["std_delta"] == pytest.approx(statistics.stdev([1.0, 0.0, -2.0, 0.5]))
    assert rec["prompt_text"] == "<u>Q" and rec["prompt_text_source"] == "formatted_prompt"
    assert [c["text"] for c in rec["clauses"]] == ["Yes,", " fine."]          # sorted by mean delta, descending
    agg = strict_json(out / "aggregate.json")
    assert agg["n_prompts"] == 1 and agg["std_delta_across_prompts"] is None
    assert "n=1" in agg["null_reasons"]["std_delta_across_prompts"]
    assert agg["top_clauses_overall"][0]["text"] == "Yes," and agg["bottom_clauses_overall"][0]["text"] == " fine."
    assert agg["layer"] == 1 and agg["prompt_set"] == "set" and agg["top_pct"] == 5.0
    assert agg["per_position_count"] == [1, 1, 1, 1]


def _tree(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_ino) for p in sorted(root.rglob("*")) if p.is_file()}


def test_per_token_diff_rerun_refuses_skip_existing_keeps_overwrite_replaces(experiments, capsys):
    """The rule of utils/storage.py: a rerun without flags refuses (one line naming a file, exit 2, every file
    byte-identical); --skip-existing rewrites nothing; --overwrite replaces every file."""
    _per_token_setup(experiments)
    argv = ["--experiment", "pt", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "set", "--traits", "all",
            "--quiet"]
    root = paths.model_diff_dir("pt", "a", "b")
    assert ptd.main(argv) == 0
    capsys.readouterr()
    before = _tree(root)
    assert len(before) == 3                                       # 0.json, 1.json, aggregate.json
    assert ptd.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and ".json" in err[0] and "--overwrite" in err[0]
    assert _tree(root) == before
    assert ptd.main(argv + ["--skip-existing"]) == 0
    assert "kept 3 existing" in capsys.readouterr().out
    assert _tree(root) == before
    write_projection("pt", "b", "c/t", "set", "1", {1: [9.0, 9.0, 9.0, 9.0], 2: [0.0] * 4}, best=1)
    assert ptd.main(argv) == 2 and _tree(root) == before          # new inputs do not make a refusal write
    assert ptd.main(argv + ["--overwrite"]) == 0
    after = _tree(root)
    assert set(after) == set(before) and all(after[p][1] != before[p][1] for p in before)   # renamed over
    assert after[root / "per_token_diff/c/t/set/1.json"][0] != before[root / "per_token_diff/c/t/set/1.json"][0]
    assert strict_json(root / "per_token_diff/c/t/set/1.json")["per_token_delta"] == [9.0, 8.0, 7.0, 6.0]
    assert ptd.main(argv + ["--overwrite", "--skip-existing"]) == 2


@pytest.mark.parametrize("break_it, needle", [
    (lambda: write_projection("pt", "b", "c/t", "set", "1", {1: [0.0] * 4, 2: [0.0] * 4}, sha="cd" * 32, best=1),
     "different vectors (sha256 differ)"),
    (lambda: write_projection("pt", "b", "c/t", "set", "1", {1: [0.0] * 4}, best=1, method="mean_diff"),
     "method"),
    (lambda: write_projection("pt", "b", "c/t", "set", "1", {1: [0.0] * 4}, best=1, centered=True), "centered"),
    (lambda: write_response("pt", "b", "set", "1", ["<u>", "Q"], ["a", "b", "c", "d"], [5, 6, 7, 9]),
     "different response tokens"),
])
def test_per_token_diff_mismatches_name_the_prompt(experiments, capsys, break_it, needle):
    _per_token_setup(experiments)
    break_it()
    rc = ptd.main(["--experiment", "pt", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "set",
                   "--trait", "all", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "prompt 1" in err
    assert not paths.model_diff_dir("pt", "a", "b").exists()


def test_per_token_diff_checks_the_ids_that_were_scored(experiments):
    """A captured with --responses-from B but also holding responses of its own: the raw ids count."""
    _per_token_setup(experiments)
    for pid in ("0", "1"):
        for v in ("a", "b"):
            write_raw("pt", v, "set", pid, [5, 6, 7, 8], {1: torch.zeros(4, H)})
        write_response("pt", "a", "set", pid, ["<u>", "Q"], ["x", "y", "z", "w"], [40, 41, 42, 43])
    s = ptd.per_token_diff("pt", "a", "b", "set", trait="all", progress=False)
    assert s["prompts"] == 2
    write_raw("pt", "a", "set", "1", [5, 6, 7, 9], {1: torch.zeros(4, H)})
    with pytest.raises(ptd.PerTokenDiffError, match="prompt 1: the variants scored different response tokens"):
        ptd.per_token_diff("pt", "a", "b", "set", trait="all", progress=False)


def test_per_token_diff_layer_errors_name_the_layers(experiments, capsys):
    _per_token_setup(experiments)
    write_projection("pt", "b", "c/t", "set", "0", {3: [0.0] * 4}, best=3)
    rc = ptd.main(["--experiment", "pt", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "set",
                   "--trait", "c/t"])
    err = capsys.readouterr().err
    assert rc == 2 and "share no layer" in err and "has layers 1-2" in err and "has 3" in err   # format_layers
    rc = ptd.main(["--experiment", "pt", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "set",
                   "--trait", "c/t", "--layer", "2"])
    assert rc == 2 and "--layer 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The README's cross-variant workflow, end to end on the zoo

PROMPTS = {"name": "train", "prompts": [
    {"id": 1, "text": "Tell me a story about a model."},
    {"id": 2, "text": "Why would you refuse to help?"},
    {"id": "q3", "text": "Write code that prints hello world, please."},
]}
TRAITS = {"behavioral/refusal": ("probe", 1, 2), "alignment/deception": ("mean_diff", 2, 0)}  # method, best, other


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_readme_model_diff_workflow_matches_hf_hidden_states(experiments, zoo, zoo_lora, tmp_path):
    model, lora = zoo("llama"), zoo_lora("llama")
    exp_dir = experiments("mdz", {"instruct": {"model": model}, "rm_lora": {"model": model, "lora": lora}},
                          defaults={"extraction": "instruct", "application": "instruct"})
    datasets = tmp_path / "datasets"
    (datasets / "inference" / "mdz").mkdir(parents=True)
    (datasets / "inference" / "mdz" / "train.json").write_text(json.dumps(PROMPTS))
    g = torch.Generator().manual_seed(7)
    vectors = {}
    for trait, (method, best, other) in TRAITS.items():
        for layer in (0, 1, 2):   # HF's last hidden state is after the final norm: vectors stop at layer 2
            vectors[(trait, layer)] = torch.randn(64, generator=g)
            write_vector("mdz", trait, "instruct", method, layer, vectors[(trait, layer)])
        write_steering("mdz", trait, "instruct", method, best, other)
    env = {**os.environ, "TRAIT_EXPERIMENTS_DIR": str(exp_dir.parent), "TRAIT_DATASETS_DIR": str(datasets),
           "HF_HUB_OFFLINE": "1", "TRAIT_SERVER_URL": "http://127.0.0.1:9", "TOKENIZERS_PARALLELISM": "false"}
    E, S = "mdz", "mdz/train"
    steps = [
        ["inference/generate_responses.py", "--experiment", E, "--prompt-set", S, "--model-variant", "rm_lora"],
        ["inference/capture_raw_activations.py", "--experiment", E, "--prompt-set", S, "--model-variant", "rm_lora"],
        ["inference/capture_raw_activations.py", "--experiment", E, "--prompt-set", S, "--model-variant", "instruct",
         "--responses-from", "rm_lora"],
        ["inference/project_raw_activations_onto_traits.py", "--experiment", E, "--prompt-set", S,
         "--model-variant", "rm_lora", "--no-calibration"],
        ["inference/project_raw_activations_onto_traits.py", "--experiment", E, "--prompt-set", S,
         "--model-variant", "instruct", "--no-calibration"],
        ["analysis/model_diff/compare_variants.py", "--experiment", E, "--variant-a", "instruct",
         "--variant-b", "rm_lora", "--prompt-set", S, "--use-best-vector"],
        ["analysis/model_diff/per_token_diff.py", "--experiment", E, "--variant-a", "instruct",
         "--variant-b", "rm_lora", "--prompt-set", S, "--trait", "all", "--top-pct", "5"],
    ]
    for step in steps:
        _run(step, env)

    # --- the oracle: HF hidden states of the base model and of the PeftModel on rm_lora's ids ----------
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    responses = {}
    for f in sorted((exp_dir / "inference/rm_lora/responses" / S).glob("*.json")):
        responses[f.stem] = json.loads(f.read_text())
    ids_with_tokens = sorted((k for k, r in responses.items() if len(r["token_ids"]) > r["prompt_end"]),
                             key=paths.natural_key)
    assert len(ids_with_tokens) >= 2, "the zoo model must answer at least two prompts"

    def hidden(m):
        out = {}
        with torch.no_grad():
            for pid in ids_with_tokens:
                r = responses[pid]
                hs = m(torch.tensor([r["token_ids"]]), output_hidden_states=True).hidden_states
                out[pid] = [hs[layer + 1][0, r["prompt_end"]:].double() for layer in range(3)]
        return out

    h_a = hidden(base)
    h_b = hidden(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                           lora).eval())

    res = strict_json(exp_dir / "model_diff/instruct_vs_rm_lora" / S / "results.json")
    assert res["n_prompts"] == len(ids_with_tokens) and res["prompt_ids"] == ids_with_tokens
    dv = load_pt(exp_dir / "model_diff/instruct_vs_rm_lora" / S / "diff_vectors.pt")
    side = strict_json(exp_dir / "model_diff/instruct_vs_rm_lora" / S / "diff_vectors.json")
    assert side["layers"] == [0, 1, 2, 3] and dv.shape == (4, 64)    # the zoo llama has 4 layers
    assert side["n_layers_source"].startswith("num_hidden_layers")
    for layer in range(3):
        want = torch.stack([h_b[p][layer].mean(0) - h_a[p][layer].mean(0) for p in ids_with_tokens]).mean(0)
        assert torch.allclose(dv[layer].double(), want, atol=1e-4, rtol=1e-4)
    for trait, (method, best, _) in TRAITS.items():
        t = res["traits"][trait]
        assert t["method"] == method and t["position"] == POS and t["layers"] == [0, 1, 2]
        assert t["selection"]["best_layer"] == best
        for k, layer in enumerate(t["layers"]):
            u = vectors[(trait, layer)].double()
            u = u / u.norm()
            pa = [float(h_a[p][layer].mean(0) @ u) for p in ids_with_tokens]
            pb = [float(h_b[p][layer].mean(0) @ u) for p in ids_with_tokens]
            deltas = [y - x for x, y in zip(pa, pb)]
            want_diff = torch.stack([h_b[p][layer].mean(0) - h_a[p][layer].mean(0) for p in ids_with_tokens]).mean(0)
            assert t["per_layer_cosine_sim"][k] == pytest.approx(float(want_diff @ u) / float(want_diff.norm()),
                                                                 rel=1e-3, abs=1e-4)
            assert t["per_layer_effect_size"][k] == pytest.approx(_oracle_d(pb, pa), rel=1e-3, abs=1e-4)
            assert t["per_layer_paired_effect_size"][k] == pytest.approx(
                statistics.fmean(deltas) / statistics.stdev(deltas), rel=1e-3, abs=1e-4)
            assert t["per_layer_std_b"][k] == pytest.approx(statistics.stdev(pb), rel=1e-3, abs=1e-5)

        # per-token: the projection at the best layer, token by token, B - A
        out = exp_dir / "model_diff/instruct_vs_rm_lora/per_token_diff" / trait / S
        u = vectors[(trait, best)].double()
        u = u / u.norm()
        for pid in ids_with_tokens:
            rec = strict_json(out / f"{pid}.json")
            want = (h_b[pid][best] @ u - h_a[pid][best] @ u).tolist()
            assert rec["layer"] == best and rec["per_token_delta"] == pytest.approx(want, rel=1e-3, abs=1e-4)
            assert rec["prompt_text"] == next(p["text"] for p in PROMPTS["prompts"] if str(p["id"]) == pid)
            assert rec["tokens"] == responses[pid]["tokens"][responses[pid]["prompt_end"]:]
        agg = strict_json(out / "aggregate.json")
        assert agg["n_prompts"] == len(ids_with_tokens) and agg["layer"] == best
        # one layer rule: the headline of compare_variants is the layer per_token_diff used (the selected vector's)
        k = t["layers"].index(best)
        assert t["headline_layer"] == agg["layer"] == best and t["layers_searched"] == 3
        assert t["headline_effect_size"] == t["per_layer_effect_size"][k]
        assert t["headline_paired_effect_size"] == t["per_layer_paired_effect_size"][k]
        assert "exploratory" in t["peak_is_exploratory"] and "3 layers searched" in t["peak_is_exploratory"]
        # clauses by the sign of their delta: B above A in top, B below A in bottom, never the other way
        pooled = [c for pid in ids_with_tokens for c in strict_json(out / f"{pid}.json")["clauses"]]
        assert all(c["mean_delta"] > 0 for c in agg["top_clauses_overall"])
        assert all(c["mean_delta"] < 0 for c in agg["bottom_clauses_overall"])
        assert bool(agg["top_clauses_overall"]) == any(c["mean_delta"] > 0 for c in pooled)
        assert bool(agg["bottom_clauses_overall"]) == any(c["mean_delta"] < 0 for c in pooled)


# ---------------------------------------------------------------------------------------------------------
# compare_variants on per-prompt means files (utils/means.py) instead of raw files

def _means_from_raw_files(exp: str, variant: str, pset: str) -> int:
    """Means files built with utils.means from the raw files (as the fused path will write them); returns bytes."""
    from utils.means import means_from_raw, write_means

    total = 0
    for pid, path in paths.raw_files(exp, variant, pset).items():
        rec = means_from_raw(load_pt(path), prompt_id=pid, prompt_set=pset)
        total += write_means(paths.means_file(exp, variant, pset, pid), rec)
    return total


NUMBER_KEYS = ("per_layer_cosine_sim", "per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_std_a",
               "per_layer_std_b", "per_layer_mean_projection_diff", "peak_effect_size", "peak_paired_effect_size")


def _assert_same_results(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert set(got["traits"]) == set(want["traits"]) and got["traits"]
    assert got["n_prompts"] == want["n_prompts"] and got["prompt_ids"] == want["prompt_ids"]
    for t, w in want["traits"].items():
        g = got["traits"][t]
        assert g["layers"] == w["layers"] and g["peak_layer"] == w["peak_layer"]
        for k in NUMBER_KEYS:
            assert g[k] == pytest.approx(w[k], rel=rel, abs=1e-12), (t, k)


def test_compare_reads_means_files_and_prefers_them(experiments):
    make_synthetic(experiments, dtype=torch.bfloat16)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    s_raw = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    from_raw = strict_json(out / "results.json")
    diff_raw = load_pt(out / "diff_vectors.pt")
    _means_from_raw_files("md", "a", "s/set")
    _means_from_raw_files("md", "b", "s/set")
    # both present: the means files are read, not the raw ones (made unreadable to prove it)
    for v in ("a", "b"):
        for p in paths.raw_files("md", v, "s/set").values():
            p.write_bytes(b"not a torch file")
    s = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    assert s["inputs"]["a"] == {"means_files": 5, "raw_files": 0, "bytes": s["inputs"]["a"]["bytes"]}
    assert s_raw["inputs"]["b"]["raw_files"] == 5 and "5 means + 0 raw files" in cv.format_summary(s)
    from_means = strict_json(out / "results.json")
    _assert_same_results(from_means, from_raw)
    assert from_means["fingerprint"] == from_raw["fingerprint"]     # the same numbers, bit for bit
    assert torch.equal(load_pt(out / "diff_vectors.pt"), diff_raw)
    # raw files gone altogether: the same results
    for v in ("a", "b"):
        for p in paths.raw_dir("md", v, "s/set").glob("*.pt"):
            p.unlink()
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    _assert_same_results(strict_json(out / "results.json"), from_raw)


def test_compare_mixed_sources_and_token_check_with_means(experiments, capsys):
    make_synthetic(experiments, n_prompts=4)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    from_raw = strict_json(out / "results.json")
    _means_from_raw_files("md", "b", "s/set")             # B from means, A from raw
    s = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    assert (s["inputs"]["a"]["raw_files"], s["inputs"]["b"]["means_files"]) == (4, 4)
    _assert_same_results(strict_json(out / "results.json"), from_raw)
    # the means file carries token ids: a differing response is still refused, naming the prompt
    from utils.means import load_means, write_means

    m = load_means(paths.means_file("md", "b", "s/set", "2"))
    m["token_ids"][-1] += 1000
    write_means(paths.means_file("md", "b", "s/set", "2"), m)
    rc = cv.main(["--experiment", "md", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "s/set",
                  "--method", "probe", "--position", POS, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "1 prompt(s)" in err and ": 2." in err and "--responses-from b" in err
    # a malformed means file is one error line naming it
    paths.means_file("md", "b", "s/set", "3").write_bytes(b"garbage")
    rc = cv.main(["--experiment", "md", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "s/set",
                  "--method", "probe", "--position", POS, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(paths.means_file("md", "b", "s/set", "3")) in err


def _zoo_responses(exp: str, variant: str, pset: str, model_dir: str, pairs) -> None:
    from utils.model import decode_tokens, format_prompt, load_tokenizer, tokenize_continuation, tokenize_prompt
    from utils.responses import build_response
    from utils.storage import write_json

    tok = load_tokenizer(model_dir)
    for i, (prompt, response) in enumerate(pairs, start=1):
        text, note = format_prompt(tok, prompt)
        ids = tokenize_prompt(tok, text)
        end = len(ids)
        ids = ids + tokenize_continuation(tok, response)
        write_json(paths.response_file(exp, variant, pset, i),
                   build_response(text, response, ids, end, decode_tokens(tok, ids), model_dir, prompt_note=note))


def test_means_from_captured_bf16_raw_files_give_the_same_results(experiments, zoo, zoo_lora):
    """The capture stage writes bf16 raw files of a base model and its LoRA on the same tokens; means files
    built from them give compare_variants the results the raw files give (1e-6 relative)."""
    from inference.capture_raw_activations import capture_raw_activations

    model, lora = zoo("llama"), zoo_lora("llama")
    experiments("mz", {"base": {"model": model}, "ft": {"model": model, "lora": lora}},
                defaults={"extraction": "base", "application": "base"})
    _zoo_responses("mz", "ft", "s", model, [("Tell me a story.", "Once upon a time, a model wrote code."),
                                            ("Why?", "Because it is kind, and it helps."),
                                            ("hi", "hello there, friend.")])
    for variant in ("ft", "base"):
        capture_raw_activations("mz", "s", model_variant=variant, responses_from="ft", dtype="bfloat16",
                                components="residual,attn_contribution", progress=False)
    g = torch.Generator().manual_seed(11)
    for layer in range(4):
        write_vector("mz", "t/x", "base", "probe", layer, torch.randn(64, generator=g))
        write_vector("mz", "t/x", "base", "probe", layer, torch.randn(64, generator=g), component="attn_contribution")
    out = paths.model_diff_dir("mz", "base", "ft") / "s"
    results = {}
    for component in ("residual", "attn_contribution"):
        cv.compare_variants("mz", "base", "ft", "s", method="probe", position=POS, component=component,
                            progress=False)
        results[component] = strict_json(out / "results.json")
    assert load_pt(paths.raw_file("mz", "ft", "s", 1))["response"]["activations"][0]["residual"].dtype == torch.bfloat16
    for v in ("base", "ft"):
        _means_from_raw_files("mz", v, "s")
        for p in paths.raw_files("mz", v, "s").values():
            p.unlink()
    for component in ("residual", "attn_contribution"):
        s = cv.compare_variants("mz", "base", "ft", "s", method="probe", position=POS, component=component,
                                progress=False)
        assert s["inputs"]["a"]["means_files"] == 3 and s["inputs"]["b"]["raw_files"] == 0
        _assert_same_results(strict_json(out / "results.json"), results[component])


# ---------------------------------------------------------------------------------------------------------
# trait-interp's readers on our files, our scripts on trait-interp's files

def trait_interp_json(obj) -> str:
    """JSON as trait-interp's dump_compact lays it out: 2-space indent, arrays of scalars on one line (NaN bare)."""
    def dump(x, depth):
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(x, dict):
            if not x:
                return "{}"
            return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {dump(v, depth + 1)}" for k, v in x.items()) + \
                f"\n{pad}}}"
        if isinstance(x, list):
            if not x:
                return "[]"
            if all(not isinstance(v, (dict, list)) for v in x):
                return "[" + ", ".join(json.dumps(v) for v in x) + "]"
            return "[\n" + ",\n".join(inner + dump(v, depth + 1) for v in x) + f"\n{pad}]"
        return json.dumps(x)
    return dump(obj, 0)


def write_trait_interp_diff(out: Path, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """diff_vectors.pt as trait-interp saves it: fp32 [max layer + 1, hidden], zero rows, plain torch.save."""
    hidden = next(iter(rows.values())).shape[0]
    full = torch.zeros(max(rows) + 1, hidden)
    for layer, r in rows.items():
        full[layer] = r
    out.mkdir(parents=True, exist_ok=True)
    torch.save(full, out / "diff_vectors.pt")
    return full


def trait_interp_entry(layers, cos, d, d_paired, std_a=None, std_b=None, method="probe", position=POS) -> dict:
    """One results.json trait entry with trait-interp's keys, in its order (the std lists only in full mode)."""
    peak = max(range(len(d)), key=lambda i: abs(d[i])) if d else None
    entry = {"method": method, "position": position, "layers": list(layers), "per_layer_cosine_sim": cos,
             "per_layer_effect_size": d, "per_layer_paired_effect_size": d_paired,
             "peak_layer": None if peak is None else layers[peak],
             "peak_effect_size": None if peak is None else d[peak],
             "peak_paired_effect_size": None if peak is None else d_paired[peak]}
    if std_a is not None:
        entry.update(per_layer_std_a=std_a, per_layer_std_b=std_b)
    return entry


def write_trait_interp_results(out: Path, traits: dict, n_prompts=5, **top) -> None:
    doc = {"experiment": "md", "variant_a": "a", "variant_b": "b", "prompt_set": "s/set", "component": "residual",
           "n_prompts": n_prompts, **top, "traits": traits}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(trait_interp_json(doc))


def model_analysis_js(path: Path) -> dict[str, str]:
    """results.json read the way trait-interp's visualization/views/model-analysis.js reads it.

    JSON.parse (no NaN); per trait under `traits`: the summary table (peak_effect_size.toFixed, the std at
    layers.indexOf(peak_layer) when not null), the effect-size chart (when per_layer_effect_size is truthy:
    layers as x, peak_effect_size.toFixed in the legend) and the cosine chart (the |max| of
    per_layer_cosine_sim, .toFixed). Any TypeError the page would throw is raised. Returns trait -> table cell.
    """
    def to_fixed(x, what):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{what}.toFixed on {x!r}: the page replaces the model-diff panel with an error")
        return f"{x:.2f}"

    res = strict_json(path)
    cells = {}
    for trait, t in (res.get("traits") or {}).items():
        layers = t.get("layers")
        peak_idx = layers.index(t.get("peak_layer")) if isinstance(layers, list) and t.get("peak_layer") in layers \
            else -1
        std_a = (t.get("per_layer_std_a") or [None] * (peak_idx + 1))[peak_idx] if peak_idx >= 0 else None
        std_b = (t.get("per_layer_std_b") or [None] * (peak_idx + 1))[peak_idx] if peak_idx >= 0 else None
        cell = f"{to_fixed(t.get('peak_effect_size'), 'peak_effect_size')} @ L{t.get('peak_layer')}"
        if std_a is not None and std_b is not None:
            cell += f" ({to_fixed(std_a, 'std_a')} / {to_fixed(std_b, 'std_b')})"
        if t.get("per_layer_effect_size"):
            assert len(t["per_layer_effect_size"]) == len(layers)
            to_fixed(t["peak_effect_size"], "peak_effect_size")
        cos = t.get("per_layer_cosine_sim")
        if cos:
            idx = 0
            for i, c in enumerate(cos):   # Math.abs(null) is 0 in JS
                if abs(c or 0) > abs(cos[idx] or 0):
                    idx = i
            to_fixed(cos[idx], "peak cosine")
            assert layers[idx] is not None
        cells[trait] = cell
    return cells


def _config_dir(tmp_path: Path, n_layers: int = 8) -> str:
    """A model folder with only a config.json: enough for the layer count."""
    from transformers import LlamaConfig

    d = tmp_path / "cfg_model"
    LlamaConfig(num_hidden_layers=n_layers, hidden_size=H, intermediate_size=8, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=32).save_pretrained(d)
    return str(d)


def test_trait_interp_compare_and_specificity_test_read_diff_vectors_pt(experiments, tmp_path):
    """Item 2: trait-interp's compare_variants.py --use-existing-diff does `n_layers, hidden = D.shape` and
    cos(D[L], v) for every vector layer; its specificity_test.py takes a tensor's non-zero rows as layers."""
    acts, vecs = make_synthetic(experiments)
    model = _config_dir(tmp_path, n_layers=8)
    experiments("md", {"a": {"model": model}, "b": {"model": model}}, defaults={"extraction": "a", "application": "a"})
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    d = torch.load(out / "diff_vectors.pt", weights_only=True)
    assert isinstance(d, torch.Tensor) and not isinstance(d, dict)
    n_layers, hidden = d.shape
    assert (n_layers, hidden) == (8, H)                          # every model layer, not the captured ones
    assert [i for i in range(n_layers) if d[i].norm() > 0] == [0, 1, 2]
    side = strict_json(out / "diff_vectors.json")
    assert side["layers"] == [0, 1, 2] and side["n_layers"] == 8 and side["component"] == "residual"
    res = strict_json(out / "results.json")
    for k, layer in enumerate(res["traits"]["t/overlap"]["layers"]):
        v = vecs[("t/overlap", layer)]
        cos = float(d[layer] @ v) / float(d[layer].norm() * v.norm())     # as trait-interp computes it
        assert res["traits"]["t/overlap"]["per_layer_cosine_sim"][k] == pytest.approx(cos, rel=1e-5)
    # a vector layer beyond the captured ones indexes a zero row, as in trait-interp (no IndexError)
    assert float(d[5].abs().sum()) == 0.0
    # our own --use-existing-diff reads the tensor back through the sidecar: the same numbers
    first = res["traits"]["t/overlap"]
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, use_existing_diff=True, progress=False)
    again = strict_json(out / "results.json")["traits"]["t/overlap"]
    assert again["per_layer_cosine_sim"] == first["per_layer_cosine_sim"]
    assert again["per_layer_effect_size"] == first["per_layer_effect_size"]


def test_model_analysis_js_reads_results_json(experiments, tmp_path):
    """Item 3: every results.json we write can be drawn by trait-interp's model-analysis.js: a full run, one
    prompt (no effect size), cosines only (--use-existing-diff without means), and a merged trait-interp file."""
    make_synthetic(experiments)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    cells = model_analysis_js(out / "results.json")
    assert set(cells) == {"t/overlap"} and " @ L" in cells["t/overlap"] and "/" in cells["t/overlap"]
    # cosines only: the per-prompt means are gone and there is no earlier effect size for t/second
    write_vector("md", "t/second", "a", "probe", 2, torch.arange(H, dtype=torch.float32) + 1)
    (out / "prompt_means.pt").unlink()
    s = cv.compare_variants("md", "a", "b", "s/set", traits="t/second", method="probe", position=POS,
                            use_existing_diff=True, progress=False)
    res = strict_json(out / "results.json")
    assert set(model_analysis_js(out / "results.json")) == {"t/overlap"}
    inc = res["incomplete_traits"]["t/second"]
    assert "no defined effect size" in inc["reason"] and isinstance(inc["per_layer_cosine_sim"][0], float)
    assert inc["effect_sizes_not_kept"] == "no earlier entry of this trait" and "t/second" in s["incomplete"]
    # one prompt: no effect size anywhere, the viewer still draws the page (without that trait)
    experiments("one", {"a": {"model": "none"}, "b": {"model": "none"}}, defaults={"extraction": "a",
                                                                               "application": "a"})
    for v in ("a", "b"):
        write_raw("one", v, "s", "1", [5, 6], {1: torch.randn(2, H)})
    write_vector("one", "t/x", "a", "probe", 1, torch.ones(H))
    cv.compare_variants("one", "a", "b", "s", method="probe", position=POS, progress=False)
    one = paths.model_diff_dir("one", "a", "b") / "s" / "results.json"
    assert model_analysis_js(one) == {} and "t/x" in strict_json(one)["incomplete_traits"]


def test_existing_diff_keeps_trait_interp_effect_sizes(experiments):
    """Item 3: --use-existing-diff on trait-interp's diff_vectors.pt and results.json (no per-prompt means):
    cosines from the tensor, effect sizes kept from the earlier entry of the same vectors, as trait-interp does."""
    acts, vecs = make_synthetic(experiments)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    rows = {layer: _oracle(acts, torch.ones(H), layer)[2].float() for layer in (0, 1, 2)}
    write_trait_interp_diff(out, rows)
    old = trait_interp_entry([1, 2], [0.1, 0.2], [0.7, -1.3], [0.9, -1.5], [0.5, 0.4], [0.6, 0.3])
    stale = trait_interp_entry([1, 2, 3], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    write_trait_interp_results(out, {"t/overlap": old, "c/other": stale})
    s = cv.compare_variants("md", "a", "b", "s/set", traits="t/overlap", method="probe", position=POS,
                            use_existing_diff=True, progress=False)
    assert any("bare tensor" in w for w in s["warnings"])
    res = strict_json(out / "results.json")
    t = res["traits"]["t/overlap"]
    assert t["layers"] == [1, 2]
    for k in ("per_layer_effect_size", "per_layer_paired_effect_size", "peak_layer", "peak_effect_size",
              "peak_paired_effect_size", "per_layer_std_a", "per_layer_std_b"):
        assert t[k] == old[k], k
    for k, layer in enumerate((1, 2)):
        v = vecs[("t/overlap", layer)]
        assert t["per_layer_cosine_sim"][k] == pytest.approx(
            float(rows[layer] @ v) / float(rows[layer].norm() * v.norm()), rel=1e-5)
    assert "effect_sizes_from" in t and "unverified" in t and res["n_prompts"] == 5
    assert res["traits"]["c/other"]["unverified"] and res["traits"]["c/other"]["per_layer_effect_size"] == [1, 2, 3]
    assert set(model_analysis_js(out / "results.json")) == {"t/overlap", "c/other"}
    # another method than the earlier entry's: nothing to keep, the entry has cosines only
    write_vector("md", "t/overlap", "a", "mean_diff", 1, torch.ones(H))
    cv.compare_variants("md", "a", "b", "s/set", traits="t/overlap", method="mean_diff", position=POS,
                        use_existing_diff=True, progress=False)
    res = strict_json(out / "results.json")
    assert "other vectors" in res["incomplete_traits"]["t/overlap"]["effect_sizes_not_kept"]


def test_existing_diff_without_means_keeps_our_own_effect_sizes(experiments):
    make_synthetic(experiments)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    first = strict_json(out / "results.json")["traits"]["t/overlap"]
    (out / "prompt_means.pt").unlink()
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, use_existing_diff=True,
                        progress=False)
    t = strict_json(out / "results.json")["traits"]["t/overlap"]
    assert t["per_layer_cosine_sim"] == pytest.approx(first["per_layer_cosine_sim"], rel=1e-6)
    for k in ("per_layer_effect_size", "per_layer_paired_effect_size", "per_layer_std_a", "per_layer_std_b",
              "peak_layer", "peak_effect_size", "per_layer_projections_a"):
        assert t[k] == first[k]
    assert "unverified" not in t and "null_reasons" not in t
    # the vector files changed since: the earlier effect sizes belong to other vectors and are not kept
    write_vector("md", "t/overlap", "a", "probe", 1, torch.ones(H))
    cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, use_existing_diff=True,
                        progress=False)
    res = strict_json(out / "results.json")
    assert "vector files changed" in res["incomplete_traits"]["t/overlap"]["effect_sizes_not_kept"]
    # trait-interp rewrote diff_vectors.pt after us: our sidecar no longer describes it and is not trusted
    write_trait_interp_diff(out, {1: torch.ones(H), 2: torch.ones(H)})
    s = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, use_existing_diff=True,
                            progress=False)
    assert any("does not describe" in w for w in s["warnings"])


def test_merge_keeps_unverified_trait_interp_entries(experiments):
    """Item 12: merging into trait-interp's results.json (no fingerprint) keeps the traits it did not compute,
    marked unverified; its NaN (bare, from N=1) becomes null with a reason, and its null peaks move out of
    the viewer's keys."""
    make_synthetic(experiments)
    out = paths.model_diff_dir("md", "a", "b") / "s/set"
    nan_entry = trait_interp_entry([4], [0.3], [float("nan")], [0.0], [0.0], [0.0])
    null_peak = {"method": "probe", "position": POS, "layers": [4], "per_layer_cosine_sim": [0.2],
                 "per_layer_effect_size": None, "per_layer_paired_effect_size": None, "peak_layer": None,
                 "peak_effect_size": None, "peak_paired_effect_size": None}
    kept = trait_interp_entry([3, 4], [0.1, -0.4], [0.5, 2.5], [0.6, 2.0], [1.0, 1.1], [1.2, 1.3])
    write_trait_interp_results(out, {"c/kept": kept, "c/nan": nan_entry, "c/null_peak": null_peak})
    assert "NaN" in (out / "results.json").read_text()
    with pytest.raises(ValueError, match="NaN"):          # the viewer's JSON.parse refuses trait-interp's own file
        model_analysis_js(out / "results.json")
    write_trait_interp_results(out / "no_nan", {"c/null_peak": null_peak})
    with pytest.raises(TypeError, match="toFixed"):      # and a null peak throws inside the page
        model_analysis_js(out / "no_nan" / "results.json")
    shutil.rmtree(out / "no_nan")
    s = cv.compare_variants("md", "a", "b", "s/set", method="probe", position=POS, progress=False)
    assert any("marked unverified" in w for w in s["warnings"])
    res = strict_json(out / "results.json")
    assert set(res["traits"]) == {"t/overlap", "c/kept"}
    assert res["traits"]["c/kept"]["per_layer_effect_size"] == [0.5, 2.5] and res["traits"]["c/kept"]["unverified"]
    assert "unverified" not in res["traits"]["t/overlap"]
    assert res["incomplete_traits"]["c/nan"]["per_layer_effect_size"] == [None]
    assert "NaN" in res["incomplete_traits"]["c/nan"]["null_reasons"]["non_finite"]
    assert "no defined effect size" in res["incomplete_traits"]["c/null_peak"]["reason"]
    assert set(model_analysis_js(out / "results.json")) == {"t/overlap", "c/kept"}
    # a rerun on the same data keeps everything; on other data our own entries are dropped, unverified ones stay
    cv.compare_variants("md", "a", "b", "s/set", traits="t/overlap", method="probe", position=POS, progress=False)
    assert set(strict_json(out / "results.json")["traits"]) == {"t/overlap", "c/kept"}
    write_raw("md", "b", "s/set", "0", [10, 11, 12], {layer: torch.zeros(3, H) for layer in (0, 1, 2)})
    write_vector("md", "t/third", "a", "probe", 1, torch.ones(H))
    cv.compare_variants("md", "a", "b", "s/set", traits="t/third", method="probe", position=POS, progress=False)
    res = strict_json(out / "results.json")
    assert set(res["traits"]) == {"t/third", "c/kept"} and set(res["incomplete_traits"]) == {"c/nan", "c/null_peak"}


# per_token_diff on trait-interp's projection files

def write_trait_interp_projection(exp, variant, trait, pset, pid, layer_scores: dict[int, list[float]],
                                  steering_layer=None, method="probe"):
    """A projection JSON as trait-interp's projection script writes it: no per-entry position / component, no
    vector sha256; selection_source 'steering' only where its own steering results chose the layer."""
    entries = [{"method": method, "layer": layer,
                "selection_source": "steering" if layer == steering_layer else "layers_arg", "baseline": 0.0,
                "prompt": [], "response": list(sc), "token_norms": {"prompt": [], "response": [1.0] * len(sc)}}
               for layer, sc in layer_scores.items()]
    doc = {"metadata": {"prompt_id": pid, "prompt_set": pset, "n_prompt_tokens": 2, "n_response_tokens": 4,
                        "multi_vector": True, "n_vectors": len(entries), "component": "residual", "position": POS,
                        "centered": False, "projection_date": "2025-01-01T00:00:00"},
           "projections": entries, "activation_norms": {"prompt": [], "response": [1.0, 1.0]}}
    path = paths.projection_file(exp, variant, trait, pset, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(trait_interp_json(doc))


def test_per_token_diff_takes_the_layer_from_steering_results(experiments, capsys):
    """Item 11: B's projections mark no steering entry (trait-interp's B21: B's own steering results are
    missing); the layer comes from the experiment's steering results, as trait-interp's per_token_diff does."""
    experiments("pt", {"a": {"model": "none"}, "b": {"model": "none"}}, defaults={"extraction": "a", "application": "a"})
    toks = ["Yes", ",", " fine", "."]
    for i in range(2):
        for v in ("a", "b"):
            write_response("pt", v, "set", str(i), ["<u>", "Q"], toks, [5, 6, 7, 8])
        write_trait_interp_projection("pt", "a", "c/t", "set", str(i), {1: [0.0, 1.0, 2.0, 3.0], 2: [1.0] * 4},
                                      steering_layer=2)
        write_trait_interp_projection("pt", "b", "c/t", "set", str(i), {1: [1.0, 1.0, 0.0, 3.5], 2: [0.0] * 4})
    argv = ["--experiment", "pt", "--variant-a", "a", "--variant-b", "b", "--prompt-set", "set", "--trait", "c/t",
            "--quiet"]
    rc = ptd.main(argv)           # no evidence at all: a clear error, nothing written
    err = capsys.readouterr().err
    assert rc == 2 and "cannot pick a layer" in err and "no steering results" in err
    assert not paths.model_diff_dir("pt", "a", "b").exists()
    for layer in (1, 2):
        write_vector("pt", "c/t", "a", "probe", layer, torch.ones(H))
    write_steering("pt", "c/t", "a", "probe", best_layer=1, other_layer=2)
    assert ptd.main(argv) == 0
    out = paths.model_diff_dir("pt", "a", "b") / "per_token_diff" / "c/t" / "set"
    rec, agg = strict_json(out / "0.json"), strict_json(out / "aggregate.json")
    assert rec["layer"] == 1 and rec["per_token_delta"] == [1.0, 0.0, -2.0, 0.5]
    assert agg["layer"] == 1 and "steering evidence of variant 'a'" in agg["layer_source"]
    # steering picks a layer the files do not hold: the error says which, and how to fix it
    write_vector("pt", "c/t", "a", "probe", 3, torch.ones(H))
    write_steering("pt", "c/t", "a", "probe", best_layer=3, other_layer=1)
    rc = ptd.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "best layer by steering evidence" in err and "is 3" in err and "--layers 3" in err
