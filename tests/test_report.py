"""analysis/report.py, rendered in a real headless Chromium (tests/browser.py), on the repo's own stage outputs.

    `pipeline` (built once): the zoo llama + a random LoRA; the demo traits' vectors (extract_vectors.py); then
        generate (lora) -> capture (lora; base on lora's tokens) -> project (both) -> extract_viz (lora)
        -> compare_variants -> per_token_diff, each through its own main()
    single-variant report, checked in the rendered page: token elements = the tokens of the response JSONs,
        each data-score = the projection JSON's value (to the report's 4 significant digits), the trait and
        vector pickers change the colours, the page made no request but for its own file, the screenshot is
        not blank, clicking a token shows its logit-lens predictions
    --compare report: each token's B - A = per_token_diff's per_token_delta; clauses and effect sizes shown
    --centered: the colour centre is each vector's baseline from the projection JSON
    a 1,000-prompt x 500-token synthetic set: file size and time to first render, measured in the browser (printed)
    bad input: a set without projections, an unknown trait, --compare on different tokens, a malformed --compare,
        a projection whose score count differs from its tokens: exit 2, one line naming it, nothing written
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import pytest

from analysis import report as rp
from tests.browser import Browser, require_chromium
from utils import paths

REPO = Path(__file__).resolve().parents[1]
TRAITS = ["demo/refusal", "demo/formality"]
PROMPTS = {"name": "rep", "prompts": [{"id": 1, "text": "Tell me how to pick a lock."},
                                      {"id": 2, "text": "Write a short poem about the sea."},
                                      {"id": 3, "text": "What is the capital of France?"}]}
SET = "rep/set"


def sig(x: float, digits: int = 4) -> float:
    """The oracle for the page's rounding: Python's own %g formatting."""
    return float(f"{x:.{digits}g}")


def run_stage(module, args: list[str]) -> None:
    assert module.main(args) == 0, f"{module.__name__} {' '.join(args)} failed"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, zoo, zoo_lora):
    """An experiment `rep` produced by the real stages (in this process, through each script's main)."""
    from analysis.model_diff import compare_variants, per_token_diff
    from extraction import extract_vectors
    from inference import capture_raw_activations, extract_viz, generate_responses
    from inference import project_raw_activations_onto_traits as project

    root = tmp_path_factory.mktemp("report")
    exps, data = root / "experiments", root / "datasets"
    (data / "inference" / "rep").mkdir(parents=True)
    (data / "inference" / "rep" / "set.json").write_text(json.dumps(PROMPTS))
    for t in TRAITS:
        shutil.copytree(REPO / "datasets" / "traits" / t, data / "traits" / t)
    model, lora = zoo("llama"), zoo_lora("llama")
    (exps / "rep").mkdir(parents=True)
    (exps / "rep" / "config.json").write_text(json.dumps({
        "defaults": {"extraction": "base", "application": "base"},
        "model_variants": {"base": {"model": model}, "lora": {"model": model, "lora": lora}},
        "use_chat_template": None}))
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAIT_EXPERIMENTS_DIR", str(exps))
    mp.setenv("TRAIT_DATASETS_DIR", str(data))
    mp.setenv("TRAIT_SERVER_URL", "http://127.0.0.1:9")
    common = ["--experiment", "rep", "--prompt-set", SET]
    traits = ",".join(TRAITS)
    try:
        run_stage(extract_vectors, ["--experiment", "rep", "--traits", traits, "--model-variant", "base", "--quiet"])
        run_stage(generate_responses, [*common, "--model-variant", "lora", "--max-new-tokens", "10", "--no-server"])
        run_stage(capture_raw_activations, [*common, "--model-variant", "lora"])
        run_stage(capture_raw_activations, [*common, "--model-variant", "base", "--responses-from", "lora"])
        for v in ("lora", "base"):
            run_stage(project, [*common, "--model-variant", v, "--traits", traits, "--layers", "1,2",
                                "--no-calibration"])
        run_stage(extract_viz, [*common, "--model-variant", "lora", "--attention", "--logit-lens", "--top-k", "5"])
        run_stage(compare_variants, ["--experiment", "rep", "--variant-a", "base", "--variant-b", "lora",
                                     "--prompt-set", SET, "--use-best-vector"])
        run_stage(per_token_diff, ["--experiment", "rep", "--variant-a", "base", "--variant-b", "lora",
                                   "--prompt-set", SET, "--trait", "all", "--layer", "2"])
        yield exps / "rep"
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def browser():
    require_chromium()
    with Browser() as b:
        yield b


@pytest.fixture
def env(pipeline, monkeypatch):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(pipeline.parent))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(pipeline.parent.parent / "datasets"))
    return pipeline


def make_report(args: list[str], capsys, write: str = "--overwrite") -> tuple[int, str, str]:
    """The tests share one pipeline, so a report path is written again: --overwrite unless `write` says otherwise."""
    code = rp.main([*args, "--quiet", *([write] if write else [])])
    out, err = capsys.readouterr()
    return code, out, err


def open_report(browser: Browser, path: Path):
    page = browser.new_page()
    page.goto(path.as_uri())
    page.wait_for("window.TraitReport && TraitReport.timing.firstRender !== null")
    return page


def rendered_prompt(page, pid: str) -> list[dict]:
    """Render the prompt's card (as a click on the plot does) and read every token element of it."""
    assert page.eval(f"TraitReport.show({json.dumps(pid)})")
    return page.eval(
        f"Array.from(document.getElementById({json.dumps('p-' + pid)}).querySelectorAll('.tt-tok')).map(function (e) {{"
        " return {score: e.getAttribute('data-score'), id: e.getAttribute('data-id'), side: e.getAttribute('data-side'),"
        " layer: e.getAttribute('data-layer'), trait: e.getAttribute('data-trait'), special: e.classList.contains('tt-special'),"
        " bg: e.style.backgroundColor}; })")


def responses(exp_dir: Path, variant: str) -> dict[str, dict]:
    folder = exp_dir / "inference" / variant / "responses" / SET
    return {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}


def projection(exp_dir: Path, variant: str, trait: str, pid: str) -> dict:
    return json.loads((exp_dir / "inference" / variant / "projections" / trait / SET / f"{pid}.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# The single-variant report

def test_report_tokens_scores_pickers_and_no_network(env, browser, capsys, tmp_path):
    code, out, err = make_report(["--experiment", "rep", "--prompt-set", SET, "--model-variant", "lora"], capsys)
    assert code == 0, err
    path = paths.report_file("rep", SET)
    assert out.strip().splitlines()[-1].endswith(str(path)) and path.is_file()
    page = open_report(browser, path)
    resp = responses(env, "lora")
    assert page.eval("TraitReport.data.prompts.length") == len(resp) == 3
    assert page.eval("Array.from(document.getElementById('trait-picker').options).map(o => o.text)") == sorted(TRAITS)

    first_trait = sorted(TRAITS)[0]
    for pid, r in resp.items():
        toks = rendered_prompt(page, pid)
        assert len(toks) == len(r["tokens"]) == len(r["token_ids"])
        assert [int(t["id"]) for t in toks] == r["token_ids"]
        assert [t["side"] for t in toks] == ["prompt"] * r["prompt_end"] + ["response"] * (len(r["tokens"]) - r["prompt_end"])
        proj = projection(env, "lora", first_trait, pid)["projections"][0]
        want = proj["prompt"] + proj["response"]
        assert len(want) == len(toks)
        assert [float(t["score"]) for t in toks] == [sig(x) for x in want]
        assert {t["layer"] for t in toks} == {str(proj["layer"])} and {t["trait"] for t in toks} == {first_trait}
        assert toks[0]["special"], "the BOS token is special and shown dimmed"
        assert page.eval(f"document.getElementById('p-{pid}').querySelectorAll('.tt-boundary').length") == 1

    # hovering a token shows its exact score, token id, layer and method
    tip = page.eval(f"(function () {{ var e = document.getElementById('p-{next(iter(resp))}').querySelectorAll('.tt-tok')[5];"
                    " e.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 20, clientY: 20}));"
                    " return document.querySelector('.tt-tip').textContent; })()")
    r0 = next(iter(resp.values()))
    p0 = projection(env, "lora", first_trait, next(iter(resp)))["projections"][0]
    for needle in (f"score {js_num((p0['prompt'] + p0['response'])[5])}", f"token id {r0['token_ids'][5]}",
                   f"layer {p0['layer']}", f"method {p0['method']}"):
        assert needle in tip, tip

    # the trait picker recolours every rendered token with the other trait's scores
    pid = next(iter(resp))
    before = rendered_prompt(page, pid)
    page.eval("(function () { var s = document.getElementById('trait-picker'); s.value = '1';"
              " s.dispatchEvent(new Event('change')); })()")
    after = rendered_prompt(page, pid)
    other = projection(env, "lora", sorted(TRAITS)[1], pid)["projections"][0]
    assert [float(t["score"]) for t in after] == [sig(x) for x in other["prompt"] + other["response"]]
    assert [t["bg"] for t in after] != [t["bg"] for t in before]
    assert {t["trait"] for t in after} == {sorted(TRAITS)[1]}
    # ... and the vector picker switches to the trait's other layer (layer 2)
    entries = projection(env, "lora", sorted(TRAITS)[1], pid)["projections"]
    assert len(entries) == 2 and entries[0]["layer"] != entries[1]["layer"]
    page.eval("(function () { var s = document.getElementById('view-picker'); s.value = '1';"
              " s.dispatchEvent(new Event('change')); })()")
    layer2 = rendered_prompt(page, pid)
    assert [float(t["score"]) for t in layer2] == [sig(x) for x in entries[1]["prompt"] + entries[1]["response"]]
    assert {t["layer"] for t in layer2} == {str(entries[1]["layer"])}

    # the plot: one point per prompt and trait, each linking to its prompt
    assert page.eval("document.querySelectorAll('#plot-box svg').length") == len(TRAITS)
    assert page.eval("Array.from(document.querySelectorAll('#plot-box a.pt')).map(a => a.getAttribute('href'))"
                     ".filter(h => h === '#p-1').length") == len(TRAITS)
    # the logit lens of extract_viz in the side panel for a clicked token
    page.eval(f"document.getElementById('p-{pid}').querySelectorAll('.tt-tok')[2].click()")
    panel = page.eval("document.getElementById('panel-body').innerText")
    assert "logit lens" in panel and "attention" in panel
    lens = json.loads((env / "analysis" / "per_token" / SET / f"{pid}_logit_lens.json").read_text())
    for entry in lens["predictions"][2]["by_layer"]:
        if entry["top_k"]:
            best = entry["top_k"][0]
            prob = js_num(float(f"{best['prob']:.3g}"))
            assert f"{json.dumps(best['token'], ensure_ascii=False)} {prob}" in panel, (entry["layer"], panel)

    assert page.requests == [path.as_uri()], f"the page requested {page.requests}"
    assert page.errors == []
    png = page.screenshot()
    stats = browser.image_stats(png)
    assert stats["width"] == 1280 and stats["colours"] > 50 and stats["non_white"] > 0.05 * 1280 * 900, stats
    (tmp_path / "report.png").write_bytes(png)
    page.close()


def test_request_log_sees_a_request(browser, tmp_path):
    """The negative control of the no-network checks: a page that fetches is seen fetching."""
    page_file = tmp_path / "fetching.html"
    page_file.write_text('<!doctype html><img src="http://127.0.0.1:9/pixel.png"><script>fetch("http://127.0.0.1:9/x")'
                         '.catch(function () {});</script>')
    page = browser.new_page()
    page.goto(page_file.as_uri())
    page.wait_for("document.readyState === 'complete'")
    time.sleep(0.3)
    assert "http://127.0.0.1:9/pixel.png" in page.requests and "http://127.0.0.1:9/x" in page.requests
    page.close()


def test_compare_report_shows_per_token_delta_clauses_and_effect_sizes(env, browser, capsys):
    code, out, err = make_report(["--experiment", "rep", "--prompt-set", SET, "--compare", "base,lora"], capsys)
    assert code == 0, err
    path = paths.report_file("rep", SET, ("base", "lora"))
    assert path.name == "set_base_vs_lora.html" and path.is_file()
    page = open_report(browser, path)
    resp = responses(env, "lora")
    trait = sorted(TRAITS)[0]
    diff_dir = env / "model_diff" / "base_vs_lora" / "per_token_diff" / trait / SET
    for pid, r in resp.items():
        rec = json.loads((diff_dir / f"{pid}.json").read_text())
        toks = rendered_prompt(page, pid)
        assert len(toks) == len(r["tokens"])
        resp_toks = toks[r["prompt_end"]:]
        assert [float(t["score"]) for t in resp_toks] == [sig(x) for x in rec["per_token_delta"]]
        assert all(t["score"] is None for t in toks[:r["prompt_end"]])   # the diff covers the response only
    body = page.eval("document.getElementById('compare-body').innerText")
    results = json.loads((env / "model_diff" / "base_vs_lora" / SET / "results.json").read_text())
    assert "Cohen's d" in body and js_num(results["traits"][trait]["peak_effect_size"]) in body
    agg = json.loads((diff_dir / "aggregate.json").read_text())
    clauses = agg["top_clauses_overall"] or agg["bottom_clauses_overall"]
    assert clauses[0]["text"].strip() in body
    assert page.requests == [path.as_uri()] and page.errors == []
    page.close()


def js_num(x: float) -> str:
    """How the page prints a number: 4 significant digits, JavaScript's String() (no trailing .0)."""
    text = repr(sig(x))
    return text[:-2] if text.endswith(".0") else text


def test_centered_colour_centre_is_the_baseline(env, browser, capsys, tmp_path):
    out_file = tmp_path / "centered.html"
    code, _, err = make_report(["--experiment", "rep", "--prompt-set", SET, "--model-variant", "lora",
                                "--centered", "--out", str(out_file)], capsys)
    assert code == 0, err
    page = open_report(browser, out_file)
    pid = next(iter(responses(env, "lora")))
    for t, trait in enumerate(sorted(TRAITS)):
        entry = projection(env, "lora", trait, pid)["projections"][0]
        assert page.eval(f"TraitReport.data.traits[{t}].views[0].center") == pytest.approx(entry["baseline"])
    page.close()


# ---------------------------------------------------------------------------------------------------------
# Bad input

def _nothing_written(exp_dir: Path) -> bool:
    folder = exp_dir / "analysis" / "report"
    return not folder.exists() or not any(p.name.startswith(".") for p in folder.rglob("*"))


@pytest.mark.parametrize("args, needle", [
    (["--prompt-set", "rep/none"], "no projections of variant 'base' for prompt set 'rep/none'"),
    (["--prompt-set", SET, "--model-variant", "lora", "--traits", "demo/nope"], "unknown trait 'demo/nope'"),
    (["--prompt-set", SET, "--compare", "lora"], "--compare 'lora'"),
    (["--prompt-set", SET, "--compare", "base,ghost"], "unknown model variant 'ghost'"),
    (["--prompt-set", SET, "--model-variant", "lora", "--precision", "1"], "--precision 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(env, capsys, args, needle):
    target = paths.report_file("rep", args[1])
    existed = target.exists()
    code, out, err = make_report(["--experiment", "rep", *args], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert target.exists() == existed and _nothing_written(env)


def test_a_rerun_without_flags_refuses_skip_existing_keeps_overwrite_replaces(env, capsys, tmp_path):
    out_file = tmp_path / "rerun.html"
    args = ["--experiment", "rep", "--prompt-set", SET, "--model-variant", "lora", "--out", str(out_file)]
    assert make_report(args, capsys, write="")[0] == 0
    before = (out_file.read_bytes(), out_file.stat().st_ino)
    code, out, err = make_report(args, capsys, write="")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {out_file} exists") and "--overwrite" in err
    assert (out_file.read_bytes(), out_file.stat().st_ino) == before and _nothing_written(env)
    code, out, _ = make_report(args, capsys, write="--skip-existing")
    assert code == 0 and "kept" in out and (out_file.read_bytes(), out_file.stat().st_ino) == before
    assert make_report(args + ["--precision", "3"], capsys)[0] == 0            # --overwrite: a new file
    assert out_file.stat().st_ino != before[1] and out_file.read_bytes() != before[0]
    assert make_report(args + ["--skip-existing"], capsys)[0] == 2            # with --overwrite: contradictory


def test_compare_on_different_tokens_is_refused(env, capsys, tmp_path, monkeypatch):
    """Variant base generating its own (shorter) responses: its scores are of other tokens than lora's."""
    from inference import capture_raw_activations, generate_responses
    from inference import project_raw_activations_onto_traits as project

    exps = tmp_path / "experiments"
    shutil.copytree(env, exps / "rep", ignore=shutil.ignore_patterns("analysis", "model_diff"))
    shutil.rmtree(exps / "rep" / "inference" / "base")
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(exps))
    common = ["--experiment", "rep", "--prompt-set", SET, "--model-variant", "base"]
    run_stage(generate_responses, [*common, "--max-new-tokens", "3", "--no-server"])
    run_stage(capture_raw_activations, common)
    run_stage(project, [*common, "--traits", ",".join(TRAITS), "--no-calibration"])
    capsys.readouterr()
    code, out, err = make_report(["--experiment", "rep", "--prompt-set", SET, "--compare", "base,lora"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "the variants scored different response tokens" in err and "--responses-from lora" in err
    assert not (exps / "rep" / "analysis" / "report").exists()


def test_projection_that_does_not_match_its_tokens_is_named(env, capsys, tmp_path, monkeypatch):
    exps = tmp_path / "experiments"
    shutil.copytree(env, exps / "rep", ignore=shutil.ignore_patterns("analysis", "raw"))
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(exps))
    f = exps / "rep" / "inference" / "lora" / "projections" / TRAITS[0] / SET / "2.json"
    d = json.loads(f.read_text())
    d["projections"][0]["response"].append(0.5)
    f.write_text(json.dumps(d))
    code, out, err = make_report(["--experiment", "rep", "--prompt-set", SET, "--model-variant", "lora"], capsys)
    assert code == 2 and str(f) in err and "response scores" in err, err
    assert not (exps / "rep" / "analysis" / "report").exists()


def test_help_has_an_example(capsys):
    assert rp.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--compare A,B" in out and "examples:" in out and "python analysis/report.py" in out


# ---------------------------------------------------------------------------------------------------------
# Scale: 1,000 prompts x 500 tokens

def write_synthetic(exp_dir: Path, n_prompts: int, n_tokens: int, prompt_tokens: int = 20) -> None:
    rng = random.Random(0)
    (exp_dir).mkdir(parents=True)
    (exp_dir / "config.json").write_text(json.dumps({"defaults": {"application": "syn"},
                                                     "model_variants": {"syn": {"model": "no/such-model"}}}))
    words = ["the", " cat", " sat", " on", " a", " mat", ",", " and", " then", ".", "\n", " it", " was", " good"]
    for i in range(n_prompts):
        toks = ["<s>"] + [rng.choice(words) for _ in range(n_tokens - 1)]
        ids = [1] + [rng.randrange(2, 30000) for _ in range(n_tokens - 1)]
        f = paths.response_file(exp_dir.name, "syn", "big", i)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"prompt": "", "response": "", "tokens": toks, "token_ids": ids,
                                 "prompt_end": prompt_tokens}))
        for t, trait in enumerate(("syn/alpha", "syn/beta")):
            scores = [rng.gauss(t, 1.5) for _ in range(n_tokens)]
            p = paths.projection_file(exp_dir.name, "syn", trait, "big", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({
                "metadata": {"prompt_id": str(i), "prompt_set": "big", "n_prompt_tokens": prompt_tokens,
                             "n_response_tokens": n_tokens - prompt_tokens, "multi_vector": True, "n_vectors": 1,
                             "component": "residual", "position": "response[:5]", "centered": False},
                "projections": [{"method": "probe", "layer": 6, "position": "response[:5]", "baseline": 0.25,
                                 "selection_source": "steering", "prompt": scores[:prompt_tokens],
                                 "response": scores[prompt_tokens:]}]}))


def test_thousand_prompt_report_size_and_time_to_first_render(tmp_path, monkeypatch, browser, capsys):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(tmp_path))
    write_synthetic(tmp_path / "syn", 1000, 500)
    t0 = time.perf_counter()
    code, out, err = make_report(["--experiment", "syn", "--prompt-set", "big"], capsys)
    build_s = time.perf_counter() - t0
    assert code == 0, err
    path = paths.report_file("syn", "big")
    size = path.stat().st_size
    page = browser.new_page()
    t1 = time.perf_counter()
    page.goto(path.as_uri(), timeout=120)
    timing = page.wait_for("TraitReport.timing.firstRender !== null && TraitReport.timing", timeout=120)
    wall = time.perf_counter() - t1
    n_rendered = page.eval("Object.keys(TraitReport.views).length")
    assert page.eval("TraitReport.data.prompts.length") == 1000
    assert 0 < n_rendered < 1000, "cards are rendered lazily"
    pid = "737"
    toks = rendered_prompt(page, pid)
    proj = json.loads(paths.projection_file("syn", "syn", "syn/alpha", "big", pid).read_text())["projections"][0]
    assert len(toks) == 500 and [float(t["score"]) for t in toks] == [sig(x) for x in proj["prompt"] + proj["response"]]
    assert page.requests == [path.as_uri()] and page.errors == []
    page.close()
    with capsys.disabled():  # the figures the README quotes; no timed assertion
        print(f"\n1,000 prompts x 500 tokens, 2 traits: {size / 1e6:.1f} MB, built in {build_s:.1f}s; in Chromium: "
              f"data parsed at {timing['parsed']:.0f} ms, first prompt rendered at {timing['firstRender']:.0f} ms "
              f"after navigation start ({wall:.1f}s from navigate to first render, {n_rendered} cards rendered)")
