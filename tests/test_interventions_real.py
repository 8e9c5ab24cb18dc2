"""Interventions on SmolLM2-135M-Instruct with the demo's vectors and cheerful LoRA (marker `real`): a stop-when
monitor on the demo refusal vector, and a cap on the LoRA's sycophancy at the instruct model's level.

The vectors are extracted here as the demo extracts them (extract_vectors on datasets/traits/demo, the demo's
layers); the LoRA is the demo's (experiments/demo/cheerful_lora.py, trained once and cached). The threshold and
the cap come from the model's own numbers, not from these prompts' outcomes: the stop-when threshold is the
refusal vector's held-out positive-class mean (the score refusing text reads on average), the cap is the
instruct model's mean sycophancy score per response token on the same prompts. Numbers: README, "Acting on a
trait".
"""
from __future__ import annotations

import json
import os
import statistics

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

N_NEW = 32
CAP_PROMPTS = ("1", "2", "3")       # single_trait: a lock, a novel's opening line, a job form
STOP_PAIR = "2"                     # harmful/benign twins: reading texts in secret vs backing up one's own


@pytest.fixture(scope="module")
def demo(smollm2_dir, tmp_path_factory):
    from experiments.demo import run_demo
    from extraction.extract_vectors import extract_vectors

    root = tmp_path_factory.mktemp("iv_real")
    old = os.environ.get("TRAIT_EXPERIMENTS_DIR")
    os.environ["TRAIT_EXPERIMENTS_DIR"] = str(root)
    lora = run_demo._demo_module("cheerful_lora").ensure_lora(smollm2_dir)
    (root / "d").mkdir()
    (root / "d" / "config.json").write_text(json.dumps({
        "defaults": {"extraction": "instruct", "application": "instruct"}, "use_chat_template": None,
        "model_variants": {"instruct": {"model": str(smollm2_dir)},
                           "lora": {"model": str(smollm2_dir), "lora": str(lora)}}}))
    extract_vectors("d", traits="demo/refusal,demo/sycophancy", model_variant="instruct",
                    layers=run_demo.EXTRACT_LAYERS, progress=False)
    yield "d"
    if old is None:
        os.environ.pop("TRAIT_EXPERIMENTS_DIR", None)
    else:
        os.environ["TRAIT_EXPERIMENTS_DIR"] = old


def _run(session, text: str, trait: str, **kw) -> tuple[dict, list[float], list[int]]:
    """(done message, the trait's per-token scores at its best layer, the token ids) of one greedy turn."""
    layer = str(session.best[trait].layer)
    msgs = list(session.stream(prompt=text, traits=[trait], max_new_tokens=N_NEW, **kw))
    tokens = [m for m in msgs if m["type"] == "token"]
    return msgs[-1], [m["scores"][trait][layer] for m in tokens], [m["token_id"] for m in tokens]


def test_stop_when_refusal_stops_the_harmful_response_and_not_its_benign_twin(demo):
    from inference.chat_session import ChatSession
    from utils.prompts import load_prompt_set

    s = ChatSession(demo, "instruct")
    vec = s.best["demo/refusal"]
    threshold = vec.reference.pos_mean          # refusing text's held-out mean at the vector's layer
    spec = f"demo/refusal:{vec.layer}:{threshold!r}"
    harmful = {p.id: p.text for p in load_prompt_set("harmful").prompts}[STOP_PAIR]
    benign = {p.id: p.text for p in load_prompt_set("benign").prompts}[STOP_PAIR]
    free_h, scores_h, ids_h = _run(s, harmful, "demo/refusal")
    free_b, scores_b, ids_b = _run(s, benign, "demo/refusal")
    done_h, _, got_h = _run(s, harmful, "demo/refusal", stop_when=[spec])
    done_b, _, got_b = _run(s, benign, "demo/refusal", stop_when=[spec])
    first = next(k for k, x in enumerate(scores_h) if x > threshold)     # the unmonitored run's first crossing
    assert done_h["stop_reason"] == "monitor" and done_h["monitor"]["token_index"] == first
    assert got_h == ids_h[:first + 1] and len(got_h) < len(ids_h)        # stopped early, exactly there
    assert max(scores_b) <= threshold
    assert done_b["stop_reason"] == free_b["stop_reason"] and got_b == ids_b   # the benign twin is whole


def test_cap_at_the_instruct_level_brings_the_lora_within_the_instruct_spread(demo):
    from inference.chat_session import ChatSession
    from utils.prompts import load_prompt_set

    texts = {p.id: p.text for p in load_prompt_set("single_trait").prompts}
    trait = "demo/sycophancy"
    inst = ChatSession(demo, "instruct")
    layer = inst.best[trait].layer
    inst_means = [statistics.fmean(_run(inst, texts[i], trait)[1]) for i in CAP_PROMPTS]
    level = statistics.fmean(inst_means)                      # the instruct model's mean score per response token
    lora = ChatSession(demo, "lora")
    assert lora.best[trait].layer == layer                     # the same vector scores both variants
    free = [statistics.fmean(_run(lora, texts[i], trait)[1]) for i in CAP_PROMPTS]
    capped = [statistics.fmean(_run(lora, texts[i], trait, cap=[f"{trait}:{layer}:{level!r}"])[1])
              for i in CAP_PROMPTS]
    lo, hi = min(inst_means), max(inst_means)
    print(f"sycophancy L{layer}: instruct {inst_means} (level {level:.2f}); lora {free}; lora capped {capped}")
    assert statistics.fmean(free) > hi                        # the LoRA is more sycophantic than the instruct model
    assert lo <= statistics.fmean(capped) <= hi               # capped: within the instruct model's spread
