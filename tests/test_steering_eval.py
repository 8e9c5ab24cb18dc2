"""steering/run_steering_eval.py: mechanics on the tiny zoo Llama, behaviour on SmolLM2 (marker real).

Oracles: HF's own forward (output_hidden_states, logits) for the trait and coherence scores and the residual norms;
HF generate with a hand-written forward hook for the steered answers; a reader written here from the description of
trait-interp's reader (docs/formats.md, its get_best_vector) for the file; an uninterrupted sweep for a sweep killed
with SIGKILL and resumed; the real openai client against the project's own model server for the LLM judge.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from extraction.extract_vectors import extract_vectors
from steering.run_steering_eval import main, parse_score, run_steering_eval
from utils import cards, paths
from utils.model import format_prompt, load_model, tokenize_prompt
from utils.vectors import best_vector, rank_vectors

REPO = Path(__file__).resolve().parents[1]
POS = "sorry cannot refuse never no decline unable won't".split()
NEG = "sure here is the recipe happy help yes of course".split()
QUESTIONS = ["how do I bake bread", "name a colour", "what is tea", "say hello"]


def words(vocab, seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(vocab[i] for i in torch.randint(0, len(vocab), (int(torch.randint(3, 7, (1,), generator=g)),),
                                                     generator=g).tolist()) for _ in range(n)]


def make_world(root: Path, model_dir: str) -> None:
    """experiments/st (zoo llama, variant base) and datasets/traits/t/ref with lines and steering.json."""
    (root / "experiments" / "st").mkdir(parents=True)
    (root / "experiments" / "st" / "config.json").write_text(json.dumps({
        "defaults": {"extraction": "base", "application": "base"}, "use_chat_template": None,
        "model_variants": {"base": {"model": model_dir}}}))
    folder = root / "datasets" / "traits" / "t" / "ref"
    folder.mkdir(parents=True)
    (folder / "positive.txt").write_text("\n".join(words(POS, 1)) + "\n")
    (folder / "negative.txt").write_text("\n".join(words(NEG, 2)) + "\n")
    (folder / "steering.json").write_text(json.dumps({"questions": QUESTIONS, "definition": "refuses"}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, zoo):
    """Vectors (layers 0-2, probe at response[:]) and their card, extracted once for the module."""
    root = tmp_path_factory.mktemp("steer_world")
    make_world(root, zoo("llama"))
    old = {k: os.environ.get(k) for k in ("TRAIT_EXPERIMENTS_DIR", "TRAIT_DATASETS_DIR")}
    os.environ.update(TRAIT_EXPERIMENTS_DIR=str(root / "experiments"), TRAIT_DATASETS_DIR=str(root / "datasets"))
    lm = load_model(zoo("llama"))
    extract_vectors("st", position="response[:]", methods="probe", layers="0-2", loaded=lm, progress=False)
    yield {"root": root, "loaded": lm, "model_dir": zoo("llama")}
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def results_path(exp: str = "st") -> Path:
    return paths.steering_results(exp, "t/ref", "base", "response_all")


def trait_interp_reader(path: Path, min_coherence: float) -> tuple[dict, float, list[dict]]:
    """What trait-interp's _get_steering_result / get_best_vector read (docs/formats.md, reference §3.2-3.3): the
    header's direction, the baseline line's result.trait_mean, run lines' result means and config.vectors[0];
    runs with coherence >= min_coherence count, delta = trait_mean - baseline."""
    header, baseline, runs = None, None, []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "header":
            header = rec
        elif rec.get("type") == "baseline":
            baseline = rec["result"]["trait_mean"]
        else:
            v = rec["config"]["vectors"][0]
            assert set(v) >= {"layer", "component", "position", "method", "weight"}
            if rec["result"]["coherence_mean"] >= min_coherence:
                runs.append({"layer": v["layer"], "method": v["method"], "weight": v["weight"],
                             "delta": rec["result"]["trait_mean"] - baseline})
    return header, baseline, runs


def hf_oracle(model_dir: str, ids: list[int], n_prompt: int, layer: int, v: torch.Tensor):
    """(mean response projection on v at `layer`, mean response NLL) from one plain HF forward."""
    lm = hf_oracle.cache.get(model_dir) or hf_oracle.cache.setdefault(model_dir, load_model(model_dir))
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    h = out.hidden_states[layer + 1][0, n_prompt:].double()
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)
    nll = -sum(float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids))) / (len(ids) - n_prompt)
    return float((h @ v.double()).mean()), nll


hf_oracle.cache = {}


def test_sweep_matches_hf_and_trait_interp_reader(world):
    lm, model_dir = world["loaded"], world["model_dir"]
    s = run_steering_eval("st", traits="t/ref", top_layers=2, coefficients=[0.5, 2.0], n_prompts=2,
                          max_new_tokens=5, loaded=lm, progress=False)
    card = cards.load_card("st", "t/ref", "base")
    t = s["traits"]["t/ref"]
    assert t["layers"] == cards.top_layers(card, "response_all", "residual", "probe", 2) and t["layers_from"] == "card"
    lines = [json.loads(l) for l in results_path().read_text().splitlines()]
    assert [l.get("type") for l in lines] == ["header", "baseline"] + [None] * 4
    judge_layer = t["judge_layer"]
    jf = paths.vector_file("st", "t/ref", "base", "response_all", "residual", "probe", judge_layer)
    jv = torch.load(jf, weights_only=True)
    ref = card.entry("response_all", "residual", "probe", judge_layer)
    tok = lm.tokenizer
    prompt_ids = [tokenize_prompt(tok, format_prompt(tok, q)[0]) for q in QUESTIONS[:2]]
    hf = load_model(model_dir)
    special = set(tok.all_special_ids)
    for rec in lines[1:]:
        vec = rec["config"]["vectors"][0] if "config" in rec else None
        if vec:   # relative weight x the layer's prompt norm over non-special tokens, from HF hidden states
            norms = []
            for ids in prompt_ids:
                with torch.no_grad():
                    hs = hf.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
                keep = [i for i, x in enumerate(ids) if x not in special]
                norms.append(float(hs[vec["layer"] + 1][0, keep].norm(dim=-1).mean()))
            assert vec["residual_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
            assert vec["weight"] == pytest.approx(vec["relative_weight"] * vec["residual_norm"], rel=1e-12)
        traits, cohs = [], []
        for ids, row in zip(prompt_ids, rec["responses"]):
            if vec:   # the steered answer: HF generate, greedy, with the vector added by a hook written here
                vf = paths.vector_file("st", "t/ref", "base", "response_all", "residual", "probe", vec["layer"])
                v = torch.load(vf, weights_only=True)
                def add(_m, _i, o):
                    return (o[0] + vec["weight"] * v,) + tuple(o[1:]) if isinstance(o, tuple) else o + vec["weight"] * v
                handle = hf.model.model.layers[vec["layer"]].register_forward_hook(add)
            try:
                with torch.no_grad():
                    gen = hf.model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                            pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            finally:
                if vec:
                    handle.remove()
            stops = {tok.eos_token_id}
            gen = gen[:next((i for i, x in enumerate(gen) if x in stops), len(gen))]
            assert row["token_ids"] == gen
            if not gen:
                continue
            proj, nll = hf_oracle(model_dir, ids + gen, len(ids), judge_layer, jv)
            want_trait = 100 * (proj - ref["neg_mean"]) / (ref["pos_mean"] - ref["neg_mean"])
            assert row["trait"] == pytest.approx(want_trait, abs=1e-3)
            assert row["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
            grams = [tuple(gen[i:i + 4]) for i in range(len(gen) - 3)]
            want_coh = 100 * min(1, max(0, (6 - nll) / 5)) * (len(set(grams)) / len(grams) if grams else 1)
            assert row["coherence"] == pytest.approx(want_coh, abs=1e-3)
            traits.append(row["trait"])
            cohs.append(row["coherence"])
        if traits:
            assert rec["result"]["trait_mean"] == pytest.approx(sum(traits) / len(traits))
        assert rec["result"]["coherence_mean"] == pytest.approx(sum(cohs) / len(cohs)) if cohs else True

    # trait-interp's reader reads the file; our selection ranks the same best run (no coherence floor: a random
    # model's answers are gibberish; the floor itself is exercised on SmolLM2 below)
    header, baseline, runs = trait_interp_reader(results_path(), 0.0)
    assert header["direction"] == "positive" and baseline == lines[1]["result"]["trait_mean"]
    top = max(runs, key=lambda r: r["delta"])
    ours = rank_vectors("st", "t/ref", "base", "base", min_coherence=0.0)[0]
    assert (ours.source, ours.ref.layer, ours.ref.method) == ("steering", top["layer"], top["method"])
    assert ours.score == pytest.approx(top["delta"]) and ours.coefficient == pytest.approx(top["weight"])
    chosen = best_vector("st", "t/ref", "base", "base", min_coherence=0.0)
    assert chosen.selection_source == "steering" and chosen.explanation.startswith("chosen by steering: ")
    assert chosen.explanation.endswith(f"layer {top['layer']}, {ours.relative_coefficient:g}x")

    # a rerun without --skip-existing refuses (file untouched); with it, nothing is added
    before = results_path().read_bytes()
    assert main(["--experiment", "st", "--traits", "t/ref", "--top-layers", "2", "--coefficients", "0.5,2",
                 "--n-prompts", "2", "--max-new-tokens", "5", "--quiet"]) == 2
    assert results_path().read_bytes() == before
    s2 = run_steering_eval("st", traits="t/ref", top_layers=2, coefficients=[0.5, 2.0], n_prompts=2,
                           max_new_tokens=5, loaded=lm, progress=False, skip_existing=True)
    assert (s2["written"], s2["skipped"]) == (0, 4) and results_path().read_bytes() == before


def test_bad_input(world, capsys):
    common = ["--experiment", "st", "--traits", "t/ref", "--quiet"]
    cases = [(["--coefficients", "a,b"], "--coefficients"), (["--n-prompts", "0"], "--n-prompts"),
             (["--judge-url", "http://127.0.0.1:9/v1"], "--judge-model"),
             (["--prompts", str(world["root"] / "nope.json")], "nope.json"),
             (["--layers", "7"], "--layers")]
    for extra, what in cases:
        assert main(common + extra) == 2, extra
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
    settings_file = results_path()
    if settings_file.exists():   # other settings than the file's: refused, file named
        assert main(common + ["--max-new-tokens", "3", "--layers", "1", "--coefficients", "9"]) == 2
        assert "written with other settings" in capsys.readouterr().err


def test_resume_after_sigkill_equals_uninterrupted(world, tmp_path):
    """SIGKILL the CLI mid-sweep, rerun with --skip-existing: byte-identical to an uninterrupted sweep."""
    clean = tmp_path / "clean"
    make_world(clean, world["model_dir"])
    shutil.copytree(world["root"] / "experiments" / "st" / "extraction", clean / "experiments" / "st" / "extraction")
    args = ["--experiment", "st", "--traits", "t/ref", "--layers", "0-2", "--coefficients", "0.5,1,2,4",
            "--n-prompts", "2", "--max-new-tokens", "6", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "TRAIT_EXPERIMENTS_DIR": str(clean / "experiments"), "TRAIT_DATASETS_DIR": str(clean / "datasets")}
    out = paths.steering_results("st", "t/ref", "base", "response_all")
    out = clean / "experiments" / out.relative_to(paths.experiments_root())
    proc = subprocess.Popen([sys.executable, str(REPO / "steering" / "run_steering_eval.py"), *args,
                             "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out.exists() and len(out.read_text().splitlines()) >= 4):   # header, baseline, two runs
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_killed = len(out.read_text().splitlines())
    assert 4 <= n_killed < 2 + 12, "the sweep finished before the kill"
    assert all(json.loads(l) for l in out.read_text().splitlines())   # whole lines only
    done = subprocess.run([sys.executable, str(REPO / "steering" / "run_steering_eval.py"), *args, "--skip-existing"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{12 - (n_killed - 2)} runs written, {n_killed - 2} already present" in done.stdout
    # the uninterrupted sweep, in the module's world (same vectors, same datasets, same relative paths)
    run_steering_eval("st", traits="t/ref", layers="0-2", coefficients=[0.5, 1, 2, 4], n_prompts=2,
                      max_new_tokens=6, loaded=world["loaded"], progress=False, overwrite=True)
    assert out.read_bytes() == results_path().read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llm_judge_through_the_model_server(world, monkeypatch):
    """--judge-url against inference/model_server.py (a subprocess speaking the OpenAI API): every stored judge
    reply equals what the real openai client gets for the same prompt, and the means come from those replies."""
    import openai
    import requests

    from steering.run_steering_eval import COHERENCE_PROMPT, TRAIT_PROMPT

    port, token = free_port(), "judge-token"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIT_SERVER_TOKEN": token, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "inference" / "model_server.py"), "--experiment", "st",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if requests.get(url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "model server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
        model = client.models.list().data[0].id
        monkeypatch.setenv("JUDGE_KEY", token)
        s = run_steering_eval("st", traits="t/ref", layers="1", coefficients=[1.0], n_prompts=2, max_new_tokens=4,
                              loaded=world["loaded"], progress=False, overwrite=True, judge_url=url + "/v1",
                              judge_model=model, judge_key_env="JUDGE_KEY")
        lines = [json.loads(l) for l in results_path().read_text().splitlines()]
        assert lines[0]["eval"]["method"] == "llm_judge" and lines[0]["settings"]["llm_judge"]["model"] == model
        for rec in lines[1:]:
            jt, jc = [], []
            for row in rec["responses"]:
                for kind, prompt in (("trait", TRAIT_PROMPT.format(definition="refuses", question=row["question"],
                                                                   answer=row["response"])),
                                     ("coherence", COHERENCE_PROMPT.format(question=row["question"],
                                                                           answer=row["response"]))):
                    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=8,
                                                           messages=[{"role": "user", "content": prompt}])
                    assert row["judge"][f"{kind}_reply"] == reply.choices[0].message.content
                    assert row["judge"][kind] == parse_score(reply.choices[0].message.content)
                jt.append(row["judge"]["trait"])
                jc.append(row["judge"]["coherence"])
            got = [x for x in jt if x is not None]
            assert rec["result"]["trait_mean"] == (sum(got) / len(got) if got else None)
            assert rec["result"]["probe_trait_mean"] is not None
            assert rec["result"]["judge_unparsed"] == sum(x is None for x in jt + jc)
        assert s["traits"]["t/ref"]["grid"][0]["layer"] == 1
    finally:
        proc.kill()
        proc.wait()


def test_parse_score():
    assert [parse_score(t) for t in ("85", "Score: 100.", "7/10", "none", "1000", "-5", "3.5")] == \
        [85.0, 100.0, 7.0, None, None, 5.0, None]


REFUSAL = ("sorry", "can't", "cannot", "unable", "don't have the ability", "not able", "won't")


@pytest.mark.real
def test_smollm2_refusal_card_steering_and_selection(smollm2_dir, experiments, monkeypatch):
    """SmolLM2-135M-Instruct and the demo refusal trait: the card's held-out AUROC beats the random directions' max;
    a small sweep over the card's top layer writes results.jsonl that trait-interp's reader reads; selection then
    picks the vector by steering (plain words), and the chosen coefficient makes the model refuse a benign request
    that it answers unsteered (the text)."""
    monkeypatch.delenv("TRAIT_DATASETS_DIR", raising=False)    # the shipped demo traits, not the module's `world`
    experiments("sm", {"instruct": {"model": str(smollm2_dir)}})
    lm = load_model(str(smollm2_dir))
    extract_vectors("sm", traits="demo/refusal", position="response[:]", methods="probe", layers="10", loaded=lm,
                    progress=False)
    card = cards.load_card("sm", "demo/refusal", "instruct")
    for layer, e in card.sets["response_all/residual/probe"].items():
        assert e["auroc"] > e["random_auroc_max"] and e["sign_ok"], (layer, e)
    s = run_steering_eval("sm", traits="demo/refusal", top_layers=1, coefficients=[0.2], n_prompts=3,
                          max_new_tokens=20, loaded=lm, progress=False)
    t = s["traits"]["demo/refusal"]
    path = paths.steering_results("sm", "demo/refusal", "instruct", "response_all")
    header, baseline, runs = trait_interp_reader(path, 77.0)
    assert header["direction"] == "positive" and runs, t
    best = max(runs, key=lambda r: r["delta"])
    assert best["delta"] > 20
    chosen = best_vector("sm", "demo/refusal", "instruct", "instruct")
    assert (chosen.selected_by, chosen.selection_source, chosen.layer) == ("steering", "steering", best["layer"])
    assert chosen.explanation == (f"chosen by steering: {best['delta']:+.0f} trait at coherence "
                                  f"{chosen.coherence:.0f}, layer {best['layer']}, 0.2x")
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    plain = {r["question"]: r["response"] for r in lines[1]["responses"]}
    steered = {r["question"]: r["response"] for r in lines[2]["responses"]}
    refused = [q for q in steered if any(w in steered[q].lower() for w in REFUSAL)
               and not any(w in plain[q].lower() for w in REFUSAL)]
    assert refused, steered          # e.g. "Give me a simple recipe for pancakes." -> "I'm sorry ..., but ..."


def test_report_view_carries_card_and_plain_words(world):
    """The report's vector line gets the card's row (AUROC vs random directions, recall at 1% FPR) and the plain-words
    explanation from the projection metadata's vector description."""
    from analysis.report import _card_entry

    chosen = best_vector("st", "t/ref", "base", "base", min_coherence=0.0)
    meta = {"vectors_experiment": "st", "trait": "t/ref", "extraction_variant": "base", "position": chosen.position,
            "component": "residual", "vectors": [chosen.describe()]}
    row = _card_entry(meta, {"layer": chosen.layer, "method": chosen.method})
    want = cards.load_card("st", "t/ref", "base").entry(chosen.pos_dir, "residual", chosen.method, chosen.layer)
    assert row == {k: want[k] for k in ("auroc", "accuracy", "recall_at_fpr", "random_auroc_mean",
                                        "random_auroc_max", "sign_ok")}
    assert meta["vectors"][0]["explanation"] == chosen.explanation
    assert _card_entry({"trait": "t/ref"}, {"layer": 1, "method": "probe"}) is None   # no vectors experiment named
