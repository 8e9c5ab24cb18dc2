"""The report's colour scale on a real model (SmolLM2): centred on the vector's baseline, its extent taken from the
non-special tokens only. The vector points along the residual of the chat template's first token (<|im_start|>),
so the special tokens score far out; the oracle recomputes the extent from the projection files and the
tokenizer's special ids, and the page (headless Chromium) must show exactly that. The project summary and the
demo's per-set table state the baseline and the means relative to it, checked against the same files.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import report as rp
from inference import project_raw_activations_onto_traits as project
from tests.browser import Browser, require_chromium
from tests.helpers import write_responses, write_vector
from utils import paths

LAYER = 5
BASELINE = 1.5
POS = "response[:5]"


@pytest.mark.real
def test_report_colour_centre_is_the_baseline_and_scale_ignores_special_tokens(smollm2_dir, experiments, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experiments("r", {"instruct": {"model": str(smollm2_dir)}})
    pairs = [("Tell me how to pick a lock.", "I can't help with that, sorry."),
             ("Write a short poem about the sea.", "The sea is wide and blue, it sings to you.")]
    recs = write_responses("r", "instruct", "s", str(smollm2_dir), pairs=pairs)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    first = recs["1"]["token_ids"]
    assert first[0] in tok.all_special_ids        # the template opens with <|im_start|>
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = model(torch.tensor([first]), output_hidden_states=True).hidden_states[LAYER + 1][0]
    write_vector("r", "t/x", "instruct", POS, "probe", LAYER, h[0].clone(), baseline=BASELINE, val_accuracy=0.9,
                 val_separation=2.0, val_pos_mean=3.0, val_neg_mean=0.0, val_pos_std=1.0, val_neg_std=2.0)

    assert project.main(["--experiment", "r", "--prompt-set", "s", "--traits", "t/x", "--fused", "--quiet",
                         "--no-calibration"]) == 0
    out = capsys.readouterr().out
    files = {pid: json.loads(paths.projection_file("r", "instruct", "t/x", "s", pid).read_text()) for pid in recs}
    entries = {pid: f["projections"][0] for pid, f in files.items()}
    spread = math.sqrt((1.0 + 4.0) / 2)
    assert entries["1"]["reference"]["baseline"] == BASELINE and entries["1"]["reference"]["spread"] == \
        pytest.approx(spread)
    # the summary: mean response score (each prompt equal) relative to the baseline, in spreads; share above it
    mean = sum(sum(e["response"]) / len(e["response"]) for e in entries.values()) / len(entries)
    tokens = [x for e in entries.values() for x in e["response"]]
    above = sum(x > BASELINE for x in tokens) / len(tokens)
    line = next(line for line in out.splitlines() if line.strip().startswith("t/x L5"))
    assert f"mean response {(mean - BASELINE) / spread:+.3g} (held-out spreads ({spread:.3g}) from the baseline " \
           f"{BASELINE:.3g})" in line and f"{above:.0%} of {len(tokens)} response tokens above the baseline" in line

    # the demo's per-set table (run_demo.set_means_lines) on the same files: baseline stated, means relative to it
    from experiments.demo import run_demo

    lines = run_demo.set_means_lines("r", "instruct", "t/x", ("s",), "z")
    assert f"baseline {BASELINE:.3g}" in lines[0] and f"held-out spreads ({spread:.3g})" in lines[0]
    prompt_mean = sum(sum(e["prompt"]) / len(e["prompt"]) for e in entries.values()) / len(entries)
    row = lines[2].split()
    assert row[:2] == ["s", "2"] and float(row[2]) == pytest.approx((prompt_mean - BASELINE) / spread, abs=0.006)
    assert float(row[3]) == pytest.approx((mean - BASELINE) / spread, abs=0.006) and row[4] == f"{above:.0%}"

    assert rp.main(["--experiment", "r", "--prompt-set", "s", "--quiet"]) == 0
    special = set(tok.all_special_ids)
    dev_plain, dev_special = [], []
    for pid, e in entries.items():
        ids = recs[pid]["token_ids"]
        for i, v in enumerate(e["prompt"] + e["response"]):
            (dev_special if ids[i] in special else dev_plain).append(abs(v - BASELINE))
    dev_plain.sort()
    want = dev_plain[min(len(dev_plain) - 1, int(0.99 * (len(dev_plain) - 1) + 0.5))]
    assert dev_special and max(dev_special) > 5 * want     # the special tokens would have set the scale

    require_chromium()
    with Browser() as b:
        page = b.new_page()
        page.goto(paths.report_file("r", "s").as_uri())
        page.wait_for("window.TraitReport && TraitReport.timing.firstRender !== null")
        view = page.eval("TraitReport.data.traits[0].views[0]")
        assert view["center"] == BASELINE
        assert view["extent"] == pytest.approx(float(f"{want:.4g}"))
        assert "non-special tokens" in view["note"] and page.errors == []
        page.close()
