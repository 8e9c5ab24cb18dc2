"""--fused projection (inference/project_raw_activations_onto_traits.py, core/fused.py) against the two-stage path.

Oracle: the two-stage path on the same vectors: capture_raw_activations.py writes the raw .pt, the projection
script projects it (tests/test_project.py checks those numbers against HF's own hidden states). The fused JSONs,
calibration.json and means files must equal what that path gives, within 1e-5 relative in fp32:

    every zoo architecture; residual and the contributions; LoRA replaying another variant's responses; one
    8-bit load; the real SmolLM2 (marker `real`)
    means files -> compare_variants.py results equal to those from raw files; means equal utils.means.means_from_raw
    no raw/residual file, bytes per prompt in the summary line; the forward stops after the deepest needed block
    SIGKILL mid-run, then --skip-existing: the files of an uninterrupted run; out-of-memory halving loses nothing
    bad input refused before the model loads (no responses, a vector layer beyond the model read from its config,
    a --responses-from tokenizer that differs, fused flags without --fused), one line, nothing written
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import inference.project_raw_activations_onto_traits as proj_mod
from core import fused as core_fused
from inference.capture_raw_activations import capture_raw_activations
from inference.project_raw_activations_onto_traits import main, project_raw_activations_onto_traits as project
from tests.helpers import PAIRS, write_responses as _write_responses, write_steering, write_vector
from utils import paths
from utils.model import load_model
from utils.storage import load_pt
from utils.zoo import ARCHS

TRAITS = ("cat/a", "cat/b")
CONTRIB = ("attn_contribution", "mlp_contribution")
# PAIRS (tests/helpers.py) has an empty response: calibration falls back to that prompt's tokens.
# Keys whose values differ between two runs by design: dates, and the variant a file belongs to.
VOLATILE = {"projection_date", "date", "capture_date", "computed_by", "model_variant", "calibration", "variant"}


def write_responses(exp: str, variant: str, prompt_set: str, model_dir: str, pairs=PAIRS) -> dict[str, dict]:
    """tests/helpers.write_responses with ids 0, 1, ..."""
    return _write_responses(exp, variant, prompt_set, model_dir, pairs=pairs, ids=[str(i) for i in range(len(pairs))])


def make_world(experiments, model_dir: str, hidden: int, n_layers: int, lora: str | None = None,
               exp: str = "f", layers=None) -> str:
    """Experiment `exp`: variants base (own responses for set s), two (two-stage) and one (fused) on base's model
    (with `lora` when given); traits cat/a, cat/b with probe / mean_diff vectors for every component at `layers`,
    steering evidence under base (a: layer 1 probe, b: layer 2 mean_diff)."""
    v = {"model": model_dir, **({"lora": lora} if lora else {})}
    experiments(exp, {"base": {"model": model_dir}, "two": v, "one": v},
                defaults={"extraction": "base", "application": "base"})
    g = torch.Generator().manual_seed(0)
    for trait in TRAITS:
        for layer in layers if layers is not None else range(n_layers):
            for method in ("probe", "mean_diff"):
                for comp in ("residual",) + CONTRIB:
                    write_vector(exp, trait, "base", "response[:5]", method, layer,
                                 3.0 * torch.randn(hidden, generator=g), component=comp,
                                 baseline=0.25 * layer + (0.1 if method == "probe" else -0.1))
    write_steering(exp, "cat/a", "base", "response[:5]", [(1, "probe", 80.0, 90.0)])
    write_steering(exp, "cat/b", "base", "response[:5]", [(2, "mean_diff", 70.0, 85.0)])
    write_responses(exp, "base", "s", model_dir)
    return exp


def close(a, b, where: str = "") -> None:
    """Same JSON: same keys and non-float values; float lists within 1e-5 relative of their scale."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            if k not in VOLATILE:
                close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list) and a and all(isinstance(x, float) for x in a):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths"
        ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5 * float(ta.abs().max()) + 1e-12, msg=where)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def projections(exp: str, variant: str) -> dict[str, dict]:
    root = paths.inference_dir(exp, variant) / "projections"
    return {f.relative_to(root).as_posix(): json.loads(f.read_text()) for f in sorted(root.rglob("*.json"))
            if not f.name.startswith(".")}


def assert_same_outputs(exp: str, n_files: int, calibration: bool = True) -> None:
    two, one = projections(exp, "two"), projections(exp, "one")
    assert sorted(two) == sorted(one) and len(two) == n_files
    for name in two:
        close(two[name], one[name], name)
        assert two[name]["metadata"]["model_variant"] == "two" and one[name]["metadata"]["model_variant"] == "one"
    if calibration:
        close(json.loads(paths.calibration_file(exp, "two").read_text()),
              json.loads(paths.calibration_file(exp, "one").read_text()), "calibration.json")
    assert not (paths.inference_dir(exp, "one") / "raw" / "residual").exists()


def two_stage(exp: str, components=("residual",), responses_from="base", **kwargs) -> dict:
    capture_raw_activations(exp, "s", model_variant="two", responses_from=responses_from, components=list(components),
                            progress=False, **{k: v for k, v in kwargs.items() if k in ("load_in_8bit", "dtype")})
    return project(exp, prompt_set="s", model_variant="two", progress=False,
                   **{k: v for k, v in kwargs.items() if k not in ("load_in_8bit", "dtype")})


def fused(exp: str, responses_from="base", **kwargs) -> dict:
    return project(exp, prompt_set="s", model_variant="one", fused=True, responses_from=responses_from,
                   progress=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The same numbers as the two-stage path

@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_two_stage_on_every_architecture(arch, zoo, experiments):
    exp = make_world(experiments, zoo(arch), 64, 4)
    two = two_stage(exp, layers="best,best+1")
    one = fused(exp, layers="best,best+1")
    assert (two["written"], one["written"], one["prompts"]) == (8, 8, 4)
    assert one["calibration"]["source"] == "computed"          # computed on the device, as two-stage computed it
    assert_same_outputs(exp, 8)
    assert one["vectors"] == two["vectors"]                    # the same selection, vector files and hashes


@pytest.mark.parametrize("component", CONTRIB)
def test_fused_contributions_equal_two_stage(component, zoo, experiments):
    exp = make_world(experiments, zoo("qwen2"), 64, 4)
    two_stage(exp, components=("residual",) + CONTRIB, component=component, layers="0,3")
    fused(exp, component=component, layers="0,3")
    assert_same_outputs(exp, 8)
    out = projections(exp, "one")["cat/a/s/0.json"]
    assert out["metadata"]["component"] == component and out["metadata"]["token_norms_component"] == "residual"


def test_lora_replaying_base_responses_equals_two_stage(zoo, zoo_lora, experiments):
    exp = make_world(experiments, zoo("llama"), 64, 4, lora=zoo_lora("llama"))
    two_stage(exp, layers="best", centered=True)
    one = fused(exp, layers="best", centered=True)
    assert_same_outputs(exp, 8)
    assert one["responses_written"] == 4       # the replaying variant's own response JSONs (issue 16 item 1)
    # the adapter matters: base's own scores differ
    project(exp, prompt_set="s", model_variant="base", fused=True, layers="best", centered=True, progress=False)
    a, b = projections(exp, "base")["cat/a/s/0.json"], projections(exp, "one")["cat/a/s/0.json"]
    assert max(abs(x - y) for x, y in zip(a["projections"][0]["response"], b["projections"][0]["response"])) > 1e-3


def test_trait_dynamics_js_finds_token_data_for_a_fused_responses_from_variant(zoo, experiments):
    """The viewer's Trait Dynamics page (visualization/views/trait-dynamics.js) fetches
    inference/{variant}/responses/{set}/{id}.json of the variant shown and slices its `tokens` at `prompt_end`;
    without the file it says "Missing token data". The fused path writes it for a --responses-from variant,
    as capture does (same fields: `inference_model` = the model that scored, `responses_from` = the replayed one)."""
    exp = make_world(experiments, zoo("qwen2"), 64, 4)
    fused(exp, layers="1", traits="cat/a", no_calibration=True)
    capture_raw_activations(exp, "s", model_variant="two", responses_from="base", layers="0", progress=False)
    base = {f.stem: json.loads(f.read_text()) for f in paths.responses_dir(exp, "base", "s").glob("*.json")}
    for pid, rec in base.items():
        response_data = json.loads(paths.response_file(exp, "one", "s", pid).read_text())   # responseData(...)
        end = response_data["prompt_end"]
        out = projections(exp, "one")[f"cat/a/s/{pid}.json"]
        assert len(response_data["tokens"][:end]) == out["metadata"]["n_prompt_tokens"] == len(out["projections"][0]["prompt"])
        assert len(response_data["tokens"][end:]) == len(out["projections"][0]["response"])
        assert response_data["token_ids"] == rec["token_ids"] and response_data["responses_from"] == "base"
        assert response_data["inference_model"] == zoo("qwen2")
        captured = json.loads(paths.response_file(exp, "two", "s", pid).read_text())
        assert {k: v for k, v in response_data.items() if k != "capture_date"} == \
            {k: v for k, v in captured.items() if k != "capture_date"}
    before = {f: f.stat().st_mtime_ns for f in paths.responses_dir(exp, "one", "s").glob("*.json")}
    fused(exp, layers="1", traits="cat/a", no_calibration=True, skip_existing=True)   # existing files are kept
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_8bit_load_equals_two_stage(zoo, experiments):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    two_stage(exp, layers="best", load_in_8bit=True, dtype="float32")
    one = fused(exp, layers="best", load_in_8bit=True, dtype="float32")
    assert_same_outputs(exp, 8)
    means_free = projections(exp, "one")["cat/b/s/1.json"]
    assert means_free["metadata"]["model"] == zoo("llama") and one["fused"] is True


@pytest.mark.real
def test_real_smollm2_fused_equals_two_stage(real_model_dir, experiments):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(real_model_dir)
    exp = make_world(experiments, str(real_model_dir), cfg.hidden_size, cfg.num_hidden_layers, layers=(1, 2, 12, 20))
    two_stage(exp, layers="best,12,20")
    fused(exp, layers="best,12,20")
    assert_same_outputs(exp, 8)
    top = json.loads(paths.calibration_file(exp, "one").read_text())["aggregate"]["top_dims_by_layer"]
    assert len(top) == cfg.num_hidden_layers


def test_all_prompt_sets_are_the_response_sets_nested_ones_included(zoo, experiments):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    write_responses(exp, "base", "grp/inner", zoo("llama"), pairs=PAIRS[:2])
    two = project(exp, all_prompt_sets=True, model_variant="base", fused=True, layers="1", traits="cat/a",
                  no_calibration=True, progress=False)
    assert two["prompt_sets"] == ["grp/inner", "s"] and (two["prompts"], two["written"]) == (6, 6)
    assert sorted(projections(exp, "base")) == ["cat/a/grp/inner/0.json", "cat/a/grp/inner/1.json"] + [
        f"cat/a/s/{i}.json" for i in range(4)]


# ---------------------------------------------------------------------------------------------------------
# Means for the model diff

def test_means_files_give_compare_variants_the_results_of_raw_files(zoo, zoo_lora, experiments):
    from analysis.model_diff.compare_variants import compare_variants
    from utils.means import load_means, means_from_raw

    model_dir = zoo("llama")
    exp = make_world(experiments, model_dir, 64, 4)
    lora = {"model": model_dir, "lora": zoo_lora("llama")}
    cfg_path = paths.config_path(exp)
    cfg = json.loads(cfg_path.read_text())
    cfg["model_variants"].update({"a_raw": {"model": model_dir}, "b_raw": lora, "a_fused": {"model": model_dir},
                                  "b_fused": lora})
    cfg_path.write_text(json.dumps(cfg))
    for v in ("a_raw", "b_raw"):
        capture_raw_activations(exp, "s", model_variant=v, responses_from="base", progress=False)
    for v in ("a_fused", "b_fused"):
        s = project(exp, prompt_set="s", model_variant=v, fused=True, responses_from="base", save_means=True,
                    layers="best", progress=False)
        assert s["means_written"] == 4
    for v in ("a", "b"):   # the means files hold exactly the raw files' means
        for pid in map(str, range(len(PAIRS))):
            got = load_means(paths.means_file(exp, f"{v}_fused", "s", pid))
            want = means_from_raw(load_pt(paths.raw_file(exp, f"{v}_raw", "s", pid)), prompt_id=pid, prompt_set="s")
            assert got["metadata"]["layers"] == list(range(4)) and got["metadata"]["source"] == "fused"
            assert (got["token_ids"], got["prompt_end"]) == (want["token_ids"], want["prompt_end"])
            for side in ("prompt", "response"):
                assert got[side]["n_tokens"] == want[side]["n_tokens"]
                assert sorted(got[side]["mean"]) == sorted(want[side]["mean"])
                for layer, comps in want[side]["mean"].items():
                    torch.testing.assert_close(got[side]["mean"][layer]["residual"], comps["residual"],
                                               rtol=1e-5, atol=1e-6)
    kw = dict(traits=["cat/a", "cat/b"], use_best_vector=True, progress=False)
    raw = compare_variants(exp, "a_raw", "b_raw", "s", **kw)
    means = compare_variants(exp, "a_fused", "b_fused", "s", **kw)
    assert sorted(raw["traits"]) == sorted(means["traits"]) == ["cat/a", "cat/b"]
    res = {k: json.loads((paths.model_diff_dir(exp, f"a_{k}", f"b_{k}") / "s" / "results.json").read_text())
           for k in ("raw", "fused")}
    for side in ("a", "b"):   # the empty response is excluded from the diff: 3 of 4 prompts
        assert (res["fused"]["inputs"][side]["means_files"], res["fused"]["inputs"][side]["raw_files"]) == (3, 0)
        assert (res["raw"]["inputs"][side]["means_files"], res["raw"]["inputs"][side]["raw_files"]) == (0, 3)
    close(res["raw"]["traits"], res["fused"]["traits"], "results.json traits")
    dv = {k: torch.load(paths.model_diff_dir(exp, f"a_{k}", f"b_{k}") / "s" / "diff_vectors.pt", weights_only=True)
          for k in ("raw", "fused")}
    torch.testing.assert_close(dv["fused"], dv["raw"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# What runs and what is written

def test_no_raw_file_and_bytes_per_prompt_in_the_summary(zoo, experiments, capsys):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    assert main(["--experiment", exp, "--prompt-set", "s", "--model-variant", "one", "--responses-from", "base",
                 "--fused", "--layers", "best", "--save-means", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    written = [f for f in paths.inference_dir(exp, "one").rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in written)
    assert f"{total:,} bytes written ({total / 4:,.0f} per prompt; activations fused forward" in line
    assert "8 files written, 4 means files, 4 replayed response JSONs" in line
    kinds = {f.relative_to(paths.inference_dir(exp, "one")).parts[0] + "/" +
             f.relative_to(paths.inference_dir(exp, "one")).parts[1] for f in written}
    assert kinds == {"projections/cat", "raw/means", "responses/s", "massive_activations/calibration.json"}


def _count_calls(model) -> tuple[list[int], list[int], list]:
    from core.hooks import decoder_layers

    blocks, head = [0] * len(decoder_layers(model)), [0]
    handles = [b.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(k, blocks[k] + 1))
               for k, b in enumerate(decoder_layers(model))]
    handles.append(model.get_output_embeddings().register_forward_hook(lambda m, i, o: head.__setitem__(0, 1)))
    return blocks, head, handles


def test_forward_stops_after_the_deepest_needed_block(zoo, experiments):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    from core.hooks import block_sites

    lm = load_model(zoo("llama"))
    block_sites(lm.model)   # the architecture's identity check (one forward of every block) is done once, here
    blocks, head, handles = _count_calls(lm.model)
    try:
        s = project(exp, prompt_set="s", model_variant="base", fused=True, layers="1", no_calibration=True,
                    loaded=lm, progress=False)
        assert s["prompts"] == 4 and blocks == [1, 1, 0, 0] and head == [0]   # one batch; blocks 2, 3 never ran
        blocks[:] = [0] * 4
        project(exp, prompt_set="s", model_variant="base", fused=True, layers="1", no_calibration=True,
                save_means=True, overwrite=True, loaded=lm, progress=False)
        assert blocks == [1, 1, 1, 1] and head == [0]                       # means of every layer: to the last block
        blocks[:] = [0] * 4
        project(exp, prompt_set="s", model_variant="base", fused=True, layers="2", component="mlp_contribution",
                traits="cat/a", overwrite=True, loaded=lm, progress=False)
        assert blocks == [2, 2, 2, 1] and head == [0]       # the calibration pass (every block), then blocks 0-2
    finally:
        for h in handles:
            h.remove()


def test_out_of_memory_halves_and_loses_nothing(zoo, experiments, monkeypatch):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    fused(exp, layers="best,best+1", save_means=True)
    clean = projections(exp, "one")
    clean_cal = json.loads(paths.calibration_file(exp, "one").read_text())
    shutil.rmtree(paths.inference_dir(exp, "one"))
    real_forward, sizes = core_fused.run_forward, []

    def small_memory(model, **inputs):
        sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, **inputs)

    monkeypatch.setattr(core_fused, "run_forward", small_memory)
    s = fused(exp, layers="best,best+1", save_means=True)
    assert s["out_of_memory_retries"] >= 2 and sizes[:3] == [4, 2, 1]   # calibration pass first, halved twice
    close(clean, projections(exp, "one"), "after out-of-memory retries")
    close(clean_cal, json.loads(paths.calibration_file(exp, "one").read_text()), "calibration")  # nothing added twice


_SLOW_RUN = """
import sys, time
import utils.storage as st
real = st.write_json
def slow(path, obj, indent=None):
    n = real(path, obj, indent)
    time.sleep(0.3)
    return n
st.write_json = slow
from inference.project_raw_activations_onto_traits import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_skip_existing_gives_the_uninterrupted_files(zoo, experiments, tmp_path):
    exp = make_world(experiments, zoo("llama"), 64, 4)
    write_responses(exp, "base", "s", zoo("llama"), pairs=PAIRS * 3)   # 12 prompts
    args = ["--experiment", exp, "--prompt-set", "s", "--model-variant", "one", "--responses-from", "base",
            "--fused", "--layers", "best,best+1", "--save-means", "--batch-size", "2", "--quiet"]
    assert main(args) == 0
    root = paths.inference_dir(exp, "one")
    whole = {f.relative_to(root): f for f in root.rglob("*") if f.is_file()}
    keep = tmp_path / "uninterrupted"
    shutil.copytree(root, keep)
    shutil.rmtree(root / "projections")
    shutil.rmtree(root / "raw")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIT_EXPERIMENTS_DIR": str(paths.experiments_root()),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *args], env=env, cwd=str(paths.REPO_ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((root / "projections").rglob("*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [f for f in (root / "projections").rglob("*.json") if not f.name.startswith(".")]
    assert 3 <= len(done) < 24, "the run was not killed mid-way"
    for f in done:
        json.loads(f.read_text())                       # every visible file is complete (atomic writes)

    assert main(args + ["--skip-existing"]) == 0
    resumed = {f.relative_to(root): f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")}
    assert sorted(resumed) == sorted(whole)
    for rel in whole:
        if rel.suffix == ".json":
            close(json.loads((keep / rel).read_text()), json.loads(resumed[rel].read_text()), str(rel))
        else:
            a, b = torch.load(keep / rel, weights_only=True), torch.load(resumed[rel], weights_only=True)
            assert (a["token_ids"], a["prompt_end"]) == (b["token_ids"], b["prompt_end"])
            for side in ("prompt", "response"):
                for layer, comps in a[side]["mean"].items():
                    torch.testing.assert_close(b[side]["mean"][layer]["residual"], comps["residual"])


# ---------------------------------------------------------------------------------------------------------
# Bad input: refused before the model loads, one line, nothing written

@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(proj_mod, "load_variant", refuse)


def _nothing_written(exp: str) -> bool:
    return not any(paths.inference_dir(exp, v).exists() for v in ("one", "two"))


def test_bad_input_one_line_before_the_model_loads(zoo, experiments, tmp_path, capsys, no_model_load):
    from utils.zoo import build_tokenizer

    weightless = tmp_path / "config_only"          # config and tokenizer, no weights: layers come from the config
    shutil.copytree(zoo("llama"), weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    other_tok = tmp_path / "other_tokenizer"
    shutil.copytree(zoo("llama"), other_tok)
    build_tokenizer(vocab_size=300).save_pretrained(other_tok)
    exp = make_world(experiments, str(weightless), 64, 4)
    cfg = json.loads(paths.config_path(exp).read_text())
    cfg["model_variants"]["other"] = {"model": str(other_tok)}
    paths.config_path(exp).write_text(json.dumps(cfg))
    (paths.responses_dir(exp, "base", "empty")).mkdir(parents=True)
    write_vector(exp, "cat/c", "base", "response[:5]", "probe", 9, torch.randn(64))
    write_steering(exp, "cat/c", "base", "response[:5]", [(9, "probe", 90.0, 90.0)])

    base = ["--experiment", exp, "--model-variant", "one", "--quiet"]
    cases = [
        (["--prompt-set", "nope", "--fused", "--responses-from", "base"],
         r"no responses for variant 'base', prompt set 'nope'.*generate_responses\.py"),
        (["--prompt-set", "empty", "--fused", "--responses-from", "base"], r"--fused: no response JSONs in .*empty"),
        (["--prompt-set", "s", "--fused", "--responses-from", "base", "--layer", "7"],
         r"--layers '7': layer 7 is out of range for a model with 4 layers"),
        (["--prompt-set", "s", "--fused", "--responses-from", "base", "--traits", "cat/c"],
         r"trait 'cat/c'.*9.*the model .* has 4 layers, read from its config"),
        (["--prompt-set", "s", "--fused", "--model-variant", "other", "--responses-from", "base"],
         r"--responses-from base: its tokenizer .* differs from other's"),
        (["--prompt-set", "s", "--save-means"], r"--save-means needs --fused"),
        (["--prompt-set", "s", "--fused", "--load-in-8bit", "--load-in-4bit"], r"mutually exclusive"),
        (["--prompt-set", "s", "--fused", "--batch-size", "0"], r"--batch-size must be >= 1"),
        (["--prompt-set", "s", "--fused", "--dtype", "int3"], r"--dtype 'int3'"),
    ]
    import re
    for args, message in cases:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), (args, err)
        assert _nothing_written(exp) and not paths.inference_dir(exp, "other").exists(), args
