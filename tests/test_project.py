"""inference/project_raw_activations_onto_traits.py against HF's own numbers on a tiny Llama.

The .pt files are written here straight from HF (output_hidden_states for the residual, hooks placed by
this test on self_attn / mlp for the contributions), so every score is checked against h . v/|v|
computed from HF tensors for the same ids, never against our own .pt reader. One end-to-end test runs
capture_raw_activations.py first.

    scores, token_norms, activation_norms, provenance (path, sha256, selection_source); residual and contributions
    --centered, --multi-vector (no --position), --all-prompt-sets with nested sets, --skip-existing (no .pt opened)
    calibration: variant file, experiment-wide fallback, computed when absent, --no-calibration
    one steering variant for two model variants
    bad input: wrong hidden size, malformed results.jsonl, unknown trait, uncaptured layer / component; CLI
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import inference.project_raw_activations_onto_traits as proj_mod
from inference.project_raw_activations_onto_traits import main, project_raw_activations_onto_traits as project
from tests.helpers import write_steering, write_vector
from utils import paths
from utils.config import ConfigError
from utils.storage import write_pt

PROMPTS = [("hello what is this?", "it is a good story, I think"), ("why refuse", "I cannot help, sorry."),
           ("tell me a poem about the world", "hello world 42")]
CAPTURED = (0, 1, 2)        # layer 3's hidden_states entry is after the final norm, so the oracle stops at 2
CONTRIB = ("attn_contribution", "mlp_contribution")


@pytest.fixture(scope="module")
def hf(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo("llama")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_acts(model, ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """HF hidden states (block L's output is hidden_states[L+1]) and self-hooked attention / MLP outputs."""
    grabbed, hooks = {}, []
    for layer, block in enumerate(model.model.layers):
        hooks.append(block.self_attn.register_forward_hook(
            lambda m, i, o, L=layer: grabbed.__setitem__((L, "attn_contribution"), o[0][0].detach().clone())))
        hooks.append(block.mlp.register_forward_hook(
            lambda m, i, o, L=layer: grabbed.__setitem__((L, "mlp_contribution"), o[0].detach().clone())))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return {L: {"residual": out.hidden_states[L + 1][0].clone(), **{c: grabbed[(L, c)] for c in CONTRIB}}
            for L in CAPTURED}


def write_raw(hf, exp, variant, prompt_set, pid, prompt, response, components=("residual",), layers=CAPTURED):
    """A raw .pt in the format of docs/formats.md from HF's tensors; returns (HF activations, number of prompt tokens)."""
    _, tok, model = hf
    p_ids = tok(prompt)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    acts = hf_acts(model, p_ids + r_ids)
    n = len(p_ids)

    def side(lo, hi):
        return {L: {c: acts[L][c][lo:hi].clone() for c in components} for L in layers}

    write_pt(paths.raw_file(exp, variant, prompt_set, pid), {
        "prompt": {"text": prompt, "tokens": [tok.decode([i]) for i in p_ids], "token_ids": p_ids,
                   "activations": side(0, n)},
        "response": {"text": response, "tokens": [tok.decode([i]) for i in r_ids], "token_ids": r_ids,
                     "activations": side(n, n + len(r_ids))},
        "metadata": {"model": "zoo-llama", "variant": variant, "layers": list(layers), "components": list(components)},
    })
    return acts, n


def unit(path) -> torch.Tensor:
    v = torch.load(path, weights_only=True).float()
    return v / v.norm()


def load_out(exp, variant, trait, prompt_set, pid) -> dict:
    return json.loads(paths.projection_file(exp, variant, trait, prompt_set, pid).read_text())


@pytest.fixture
def exp(experiments, hf):
    """Experiment 'p': variants base (extraction), instruct (application), rm_lora; traits cat/a and cat/b with
    non-unit probe / mean_diff vectors at layers 0-3; steering evidence under instruct (a: layer 1 probe, b: 2 mean_diff).
    """
    experiments("p", {"base": {"model": hf[0]}, "instruct": {"model": hf[0]}, "rm_lora": {"model": hf[0]}},
                defaults={"extraction": "base", "application": "instruct"})
    g = torch.Generator().manual_seed(0)
    for trait in ("cat/a", "cat/b"):
        for layer in range(4):
            for method in ("probe", "mean_diff"):
                for comp in ("residual",) + CONTRIB:
                    write_vector("p", trait, "base", "response[:5]", method, layer, 3.0 * torch.randn(64, generator=g),
                                 component=comp, baseline=0.25 * layer + (0.1 if method == "probe" else -0.1))
    write_steering("p", "cat/a", "instruct", "response[:5]", [(1, "probe", 80.0, 90.0), (2, "probe", 60.0, 90.0)])
    write_steering("p", "cat/b", "instruct", "response[:5]", [(2, "mean_diff", 70.0, 85.0), (0, "probe", 55.0, 80.0)])
    return "p"


def check_scores(out: dict, acts: dict, n_prompt: int, component: str = "residual", centered: bool = False):
    """Every entry: scores == h . v/|v| (HF tensors), token_norms == |residual|, activation_norms per layer."""
    root = paths.experiment_dir("p")
    assert out["metadata"]["n_vectors"] == len(out["projections"]) == len(out["metadata"]["vectors"])
    for entry, vec in zip(out["projections"], out["metadata"]["vectors"]):
        vpath = root / vec["path"]
        assert vec["sha256"] == hashlib.sha256(vpath.read_bytes()).hexdigest()
        assert (vec["layer"], vec["method"], vec["component"]) == (entry["layer"], entry["method"], component)
        h = acts[entry["layer"]][component]
        expected = h @ unit(vpath) - (entry["baseline"] if centered else 0.0)
        assert len(entry["prompt"]) == n_prompt and len(entry["response"]) == h.shape[0] - n_prompt
        torch.testing.assert_close(torch.tensor(entry["prompt"] + entry["response"]), expected, rtol=1e-5, atol=1e-5)
        norms = acts[entry["layer"]]["residual"].norm(dim=-1)
        torch.testing.assert_close(torch.tensor(entry["token_norms"]["prompt"] + entry["token_norms"]["response"]),
                                   norms, rtol=1e-5, atol=1e-5)
    an = out["activation_norms"]
    assert an["layers"] == sorted({e["layer"] for e in out["projections"]})
    for k, layer in enumerate(an["layers"]):
        norms = acts[layer]["residual"].norm(dim=-1)
        assert an["prompt"][k] == pytest.approx(float(norms[:n_prompt].mean()), rel=1e-5)
        assert an["response"][k] == pytest.approx(float(norms[n_prompt:].mean()), rel=1e-5)


def test_residual_scores_equal_hf(exp, hf):
    acts = [write_raw(hf, "p", "instruct", "s", i, *pr) for i, pr in enumerate(PROMPTS)]
    s = project("p", prompt_set="s", layers="best,best-1", no_calibration=True, progress=False)
    assert (s["written"], s["prompts"], s["skipped"]) == (6, 3, 0)
    for i, (a, n) in enumerate(acts):
        out = load_out("p", "instruct", "cat/a", "s", i)
        md = out["metadata"]
        assert (md["prompt_id"], md["prompt_set"], md["n_prompt_tokens"], md["n_response_tokens"]) == (
            str(i), "s", n, a[0]["residual"].shape[0] - n)
        assert md["multi_vector"] is True and md["centered"] is False and md["component"] == "residual"
        assert [(e["layer"], e["method"], e["selection_source"]) for e in out["projections"]] == [
            (1, "probe", "steering"), (0, "probe", "layers_arg")]
        assert "massive_dim_data" not in out
        check_scores(out, a, n)
        out_b = load_out("p", "instruct", "cat/b", "s", i)
        assert [(e["layer"], e["method"]) for e in out_b["projections"]] == [(2, "mean_diff"), (1, "probe")]
        check_scores(out_b, a, n)


@pytest.mark.parametrize("component", CONTRIB)
def test_contribution_scores_equal_hooked_modules(exp, hf, component):
    a, n = write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0], components=("residual",) + CONTRIB)
    project("p", prompt_set="s", component=component, layers="1,2", traits="cat/b", no_calibration=True, progress=False)
    out = load_out("p", "instruct", "cat/b", "s", 0)
    assert out["metadata"]["component"] == component and out["metadata"]["token_norms_component"] == "residual"
    assert [(e["layer"], e["selection_source"]) for e in out["projections"]] == [(1, "layers_arg"), (2, "layers_arg")]
    check_scores(out, a, n, component=component)


def test_centered_subtracts_baseline(exp, hf):
    a, n = write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[2])
    assert n > 1
    project("p", prompt_set="s", layers="best,best+1", traits="cat/a", centered=True, no_calibration=True,
            progress=False)
    out = load_out("p", "instruct", "cat/a", "s", 0)
    assert out["metadata"]["centered"] is True
    assert [e["baseline"] for e in out["projections"]] == pytest.approx([0.35, 0.6])
    check_scores(out, a, n, centered=True)


def test_multi_vector_without_position(exp, hf):
    for layer in range(4):
        write_vector("p", "cat/a", "base", "prompt[-1]", "probe", layer, torch.randn(64))
    write_steering("p", "cat/a", "instruct", "prompt[-1]", [(0, "probe", 75.0, 95.0)])
    a, n = write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    project("p", prompt_set="s", traits=["cat/a"], multi_vector=3, no_calibration=True, progress=False)
    out = load_out("p", "instruct", "cat/a", "s", 0)
    assert [(e["layer"], e["method"], e["position"], e["selection_source"]) for e in out["projections"]] == [
        (1, "probe", "response[:5]", "steering"), (0, "probe", "prompt[-1]", "steering"),
        (2, "probe", "response[:5]", "steering")]
    assert out["metadata"]["multi_vector_n"] == 3 and out["metadata"]["layers_spec"] is None
    check_scores(out, a, n)


def test_all_prompt_sets_finds_nested(exp, hf):
    write_raw(hf, "p", "instruct", "grp/inner", 0, *PROMPTS[0])
    write_raw(hf, "p", "instruct", "grp/inner", 7, *PROMPTS[1])
    a, n = write_raw(hf, "p", "instruct", "top", "x1", *PROMPTS[2])
    s = project("p", all_prompt_sets=True, traits="cat/a", no_calibration=True, progress=False)
    assert s["prompt_sets"] == ["grp/inner", "top"] and s["written"] == 3
    for pset, pid in (("grp/inner", 0), ("grp/inner", 7), ("top", "x1")):
        assert load_out("p", "instruct", "cat/a", pset, pid)["metadata"]["prompt_set"] == pset
    check_scores(load_out("p", "instruct", "cat/a", "top", "x1"), a, n)


def test_skip_existing_opens_no_pt(exp, hf, monkeypatch):
    for i, pr in enumerate(PROMPTS):
        write_raw(hf, "p", "instruct", "s", i, *pr)
    project("p", prompt_set="s", progress=False)               # computes the calibration too
    first = {f: f.stat().st_mtime_ns for f in paths.inference_dir("p", "instruct").rglob("projections/**/*.json")}
    assert len(first) == 6

    def refuse(path, *a, **k):
        raise AssertionError(f"--skip-existing opened {path}")
    monkeypatch.setattr(proj_mod, "read_raw", refuse)
    s = project("p", prompt_set="s", skip_existing=True, progress=False)
    assert (s["written"], s["skipped"], s["prompts"]) == (0, 6, 0)
    assert {f: f.stat().st_mtime_ns for f in first} == first

    # one output missing: only that prompt's .pt is read, only that trait written
    paths.projection_file("p", "instruct", "cat/b", "s", 1).unlink()
    opened = []
    from utils.raw import read_raw as real_read
    monkeypatch.setattr(proj_mod, "read_raw", lambda path, *a, **k: (opened.append(path.name), real_read(path, *a, **k))[1])
    s = project("p", prompt_set="s", skip_existing=True, progress=False)
    assert (s["written"], s["skipped"]) == (1, 5) and set(opened) == {"1.pt"}
    assert s["files"] == [str(paths.projection_file("p", "instruct", "cat/b", "s", 1))]


def _calibration(path, top):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"aggregate": {"top_dims_by_layer": top}}))


def test_calibration_variant_then_experiment_wide(exp, hf):
    a, n = write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    _calibration(paths.calibration_file("p"), {"0": [3, 9], "1": [9, 40]})
    project("p", prompt_set="s", traits="cat/a", progress=False)
    mdd = load_out("p", "instruct", "cat/a", "s", 0)["massive_dim_data"]
    assert mdd["dims"] == [3, 9, 40] and mdd["top_dims_by_layer"] == {"0": [3, 9], "1": [9, 40]}
    assert not paths.calibration_file("p", "instruct").exists()   # the shared file was read, nothing computed

    _calibration(paths.calibration_file("p", "instruct"), {"1": [5, 7]})
    s = project("p", prompt_set="s", traits="cat/a", overwrite=True, progress=False)
    assert s["calibration"]["source"] == "variant"
    out = load_out("p", "instruct", "cat/a", "s", 0)
    mdd = out["massive_dim_data"]
    assert mdd["dims"] == [5, 7] and mdd["layer"] == 1
    v = unit(paths.experiment_dir("p") / out["metadata"]["vectors"][0]["path"])
    assert mdd["vec_norm"] == pytest.approx(1.0)
    assert mdd["vec_components"] == {"5": pytest.approx(float(v[5])), "7": pytest.approx(float(v[7]))}
    h = a[1]["residual"]
    for d in (5, 7):
        assert mdd["activation_values"]["prompt"][str(d)] == pytest.approx(h[:n, d].tolist(), abs=1e-6)
        assert mdd["activation_values"]["response"][str(d)] == pytest.approx(h[n:, d].tolist(), abs=1e-6)


def test_calibration_computed_when_absent(exp, hf, capsys):
    acts = [write_raw(hf, "p", "instruct", "s", i, *pr) for i, pr in enumerate(PROMPTS)]
    s = project("p", prompt_set="s", traits="cat/a", progress=False)
    assert s["calibration"]["source"] == "computed"
    assert "computed from 3 captured prompts" in capsys.readouterr().err
    cal = json.loads(paths.calibration_file("p", "instruct").read_text())["aggregate"]
    assert cal["n_prompts"] == 3
    for layer in CAPTURED:   # independent: mean of HF's residual over every response token of every prompt
        resp = torch.cat([a[layer]["residual"][n:] for a, n in acts]).double()
        mean = resp.mean(0)
        assert cal["top_dims_by_layer"][str(layer)] == torch.topk(mean.abs(), 5).indices.tolist()
        assert cal["layer_norms"][str(layer)] == pytest.approx(float(resp.norm(dim=-1).mean()), rel=1e-6)
        d0 = cal["top_dims_by_layer"][str(layer)][0]
        # {dim: [ratio per layer]}, layers in cal["layers"] order (the shape trait-interp's viewer plots)
        assert cal["dim_magnitude_by_layer"][str(d0)][cal["layers"].index(layer)] == pytest.approx(
            float(mean.abs()[d0] / mean.abs().mean()), rel=1e-6)
    mdd = load_out("p", "instruct", "cat/a", "s", 0)["massive_dim_data"]
    assert mdd["dims"] == sorted({d for v in cal["top_dims_by_layer"].values() for d in v})


def test_calibration_as_model_analysis_js_reads_it(exp, hf):
    """trait-interp's visualization/views/model-analysis.js: `data.model`; `aggregate.layer_norms[l]`;
    `aggregate.mean_alignment_by_layer[l]` (a fraction, plotted x100); `aggregate.dim_magnitude_by_layer[dim]`,
    an array plotted against x = 0 .. len(Object.keys(top_dims_by_layer)) - 1, for the dims its criteria pick
    from `top_dims_by_layer` (e.g. top-5 at 3+ layers)."""
    acts = [write_raw(hf, "p", "instruct", "s", i, *pr, layers=(0, 1, 2)) for i, pr in enumerate(PROMPTS)]
    project("p", prompt_set="s", traits="cat/a", progress=False)
    data = json.loads(paths.calibration_file("p", "instruct").read_text())
    assert data["model"] == hf[0]                         # the variant's model, as config.json names it
    agg = data["aggregate"]
    n_layers = len(agg["top_dims_by_layer"])
    layers = sorted(int(k) for k in agg["layer_norms"])   # Object.keys(...).map(Number).sort()
    assert layers == list(range(n_layers)) == sorted(int(k) for k in agg["mean_alignment_by_layer"])
    for layer in layers:
        resp = torch.cat([a[layer]["residual"][n:] for a, n in acts]).double()
        mean = resp.mean(0).abs()
        for dim in {d for ds in agg["top_dims_by_layer"].values() for d in ds}:   # every dim a criterion can pick
            curve = agg["dim_magnitude_by_layer"][str(dim)]                      # JS: dimMagnitude[dim] || []
            assert len(curve) == n_layers
            assert curve[layer] == pytest.approx(float(mean[dim] / mean.mean()), rel=1e-6)
        # independent oracle: per prompt, mean cosine of each response token with that prompt's mean direction
        per_prompt = []
        for a, n in acts:
            h = a[layer]["residual"][n:].double()
            per_prompt.append(float(torch.nn.functional.cosine_similarity(h, h.mean(0)[None], dim=-1).mean()))
        alignment = agg["mean_alignment_by_layer"][str(layer)]
        assert alignment == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-6)
        assert 0 < alignment * 100 <= 100


def test_no_calibration_reads_and_writes_none(exp, hf):
    write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    _calibration(paths.calibration_file("p"), {"0": [1]})
    s = project("p", prompt_set="s", traits="cat/a", no_calibration=True, progress=False)
    assert s["calibration"] is None
    assert "massive_dim_data" not in load_out("p", "instruct", "cat/a", "s", 0)
    assert not paths.calibration_file("p", "instruct").exists()


def test_one_steering_variant_for_both_sides(exp, hf):
    write_steering("p", "cat/a", "rm_lora", "response[:5]", [(2, "mean_diff", 99.0, 99.0)])
    for variant in ("instruct", "rm_lora"):
        write_raw(hf, "p", variant, "s", 0, *PROMPTS[0])
    picked = {}
    for variant in ("instruct", "rm_lora"):
        project("p", prompt_set="s", model_variant=variant, traits="cat/a", no_calibration=True, progress=False)
        md = load_out("p", variant, "cat/a", "s", 0)["metadata"]
        picked[variant] = (md["steering_variant"], md["vectors"][0]["layer"], md["vectors"][0]["sha256"])
    assert picked["instruct"] == picked["rm_lora"] and picked["instruct"][:2] == ("instruct", 1)
    for variant in ("instruct", "rm_lora"):
        project("p", prompt_set="s", model_variant=variant, traits="cat/a", steering_variant="rm_lora",
                no_calibration=True, overwrite=True, progress=False)
        md = load_out("p", variant, "cat/a", "s", 0)["metadata"]
        assert (md["steering_variant"], md["vectors"][0]["layer"], md["vectors"][0]["method"]) == ("rm_lora", 2, "mean_diff")
    with pytest.raises(ConfigError, match="--steering-variant 'nope'.*base, instruct, rm_lora"):
        project("p", prompt_set="s", steering_variant="nope", progress=False)


def _nothing_written():
    return not (paths.inference_dir("p", "instruct") / "projections").exists()


@pytest.mark.parametrize("case,kwargs,message", [
    ("hidden", {}, r"layer1\.pt: vector has 32 dims but the activations have hidden size 64"),
    ("malformed", {}, r"results\.jsonl:5: malformed JSON line"),
    ("trait", {"traits": "cat/a,cat/zzz"}, r"unknown trait 'cat/zzz'.*cat/a, cat/b"),
    ("layer", {"layers": 3}, r"layer 3 is not among the available layers: 0-2"),
    ("best", {"layers": "best+2", "traits": "cat/a"}, r"layer 3 \(best\+2, best layer 1\) is not among the available"),
    ("component", {"component": "attn_contribution"}, r"0\.pt: component 'attn_contribution' was not captured \(captured: residual\)"),
    ("set", {"prompt_set": "missing"}, r"--prompt-set 'missing': no \.pt files.*capture_raw_activations\.py"),
    ("noevidence", {"traits": "cat/a", "steering_variant": "rm_lora"}, r"cannot pick a best vector.*--layer N"),
    ("position", {"position": "response"}, r"--position 'response'"),
])
def test_bad_input_errors_and_writes_nothing(exp, hf, case, kwargs, message):
    write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    write_raw(hf, "p", "instruct", "s", 1, *PROMPTS[1])
    if case == "hidden":
        write_vector("p", "cat/b", "base", "response[:5]", "probe", 1, torch.randn(32))
        kwargs = {"layers": "best,best-1"}
    if case == "malformed":
        path = paths.steering_results("p", "cat/b", "instruct", "response__5")
        path.write_text(path.read_text() + "{not json\n")
    kwargs = {"prompt_set": "s", **kwargs}
    with pytest.raises(ValueError, match=message):
        project("p", **kwargs, progress=False)
    assert _nothing_written()
    assert not paths.calibration_file("p", "instruct").exists()


def test_later_file_missing_a_layer_is_named(exp, hf):
    write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    write_raw(hf, "p", "instruct", "s", 1, *PROMPTS[1], layers=(0, 1))
    with pytest.raises(ValueError, match=r"1\.pt: layer 2 was not captured \(captured layers: 0, 1\)"):
        project("p", prompt_set="s", layers="2", traits="cat/a", no_calibration=True, progress=False)


def test_cli(exp, hf, capsys):
    a, n = write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    assert main(["--experiment", "p", "--prompt-set", "s", "--layer", "2", "--traits", "cat/a", "--quiet",
                 "--no-calibration"]) == 0
    assert "projected 1 prompts of s onto 1 traits: 1 files written" in capsys.readouterr().out
    out = load_out("p", "instruct", "cat/a", "s", 0)
    assert [(e["layer"], e["selection_source"]) for e in out["projections"]] == [(2, "layers_arg")]
    check_scores(out, a, n)

    assert main(["--experiment", "p", "--prompt-set", "s", "--layer", "3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "available layers: 0-2" in err[0]
    assert main(["--experiment", "p", "--prompt-set", "s", "--multi-vector", "2", "--layers", "best"]) == 2
    # usage errors: utils.cli.run returns argparse's exit status instead of raising SystemExit
    assert main(["--experiment", "p", "--prompt-set", "s", "--layer", "1", "--layers", "best"]) == 2
    assert main(["--experiment", "p", "--prompt-set", "s", "--all-prompt-sets"]) == 2


def test_cli_subprocess_help_and_run(exp, hf, capsys):
    assert main(["--help"]) == 0 and "examples:" in capsys.readouterr().out
    write_raw(hf, "p", "instruct", "s", 0, *PROMPTS[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIT_EXPERIMENTS_DIR": str(paths.experiments_root())}
    script = str(paths.REPO_ROOT / "inference" / "project_raw_activations_onto_traits.py")
    r = subprocess.run([sys.executable, script, "--experiment", "p", "--prompt-set", "s", "--traits", "cat/q"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown trait 'cat/q'")
    assert len(r.stderr.strip().splitlines()) == 1 and _nothing_written()


def test_end_to_end_with_capture(exp, hf):
    """capture_raw_activations.py writes the .pt; projections still equal HF's own tensors for the same ids."""
    from inference.capture_raw_activations import capture_raw_activations
    from utils.model import load_variant
    from utils.responses import build_response
    from utils.storage import write_json

    _, tok, model = hf
    lm = load_variant("p", "instruct")
    ids_by_pid = {}
    for i, (prompt, response) in enumerate(PROMPTS):
        p_ids = tok(prompt)["input_ids"]
        ids = p_ids + tok(response, add_special_tokens=False)["input_ids"]
        ids_by_pid[i] = (ids, len(p_ids))
        write_json(paths.response_file("p", "instruct", "e2e/set", i),
                   build_response(prompt, response, ids, len(p_ids), [tok.decode([t]) for t in ids], "zoo"))
    capture_raw_activations("p", "e2e/set", components=["residual", *CONTRIB], layers="0-2", loaded=lm, progress=False)
    capture_raw_activations("p", "e2e/set", components=["residual"], layers="0-2", response_only=True, loaded=lm,
                            output_suffix="ro", progress=False)
    for component in ("residual", *CONTRIB):
        # the steering evidence is for residual vectors; contribution vectors are picked by explicit layers
        layers = "best,best+1" if component == "residual" else "0,2"
        project("p", prompt_set="e2e/set", component=component, layers=layers, traits="cat/a", overwrite=True,
                progress=False)
        for i, (ids, n) in ids_by_pid.items():
            check_scores(load_out("p", "instruct", "cat/a", "e2e/set", i), hf_acts(model, ids), n, component=component)
    project("p", prompt_set="e2e/set_ro", layers="best", traits="cat/a", no_calibration=True, progress=False)
    out = load_out("p", "instruct", "cat/a", "e2e/set_ro", 0)
    ids, n = ids_by_pid[0]
    assert out["metadata"]["n_prompt_tokens"] == n and out["projections"][0]["prompt"] == []
    assert out["activation_norms"]["prompt"] == []
    v = unit(paths.experiment_dir("p") / out["metadata"]["vectors"][0]["path"])
    torch.testing.assert_close(torch.tensor(out["projections"][0]["response"]),
                               hf_acts(model, ids)[1]["residual"][n:] @ v, rtol=1e-5, atol=1e-5)
