"""extract_viz: attention equals HF's output_attentions (eager), the logit lens at the last layer equals the
model's own output distribution (Gemma-2 soft-capping included), LoRA changes both, schema and CLI errors.

Oracles are HF forwards on the same ids (unbatched; extract_viz runs batched with right padding).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from inference.extract_viz import extract_viz, main
from utils import paths
from utils.model import decode_tokens, format_prompt, load_model, load_tokenizer, tokenize_continuation, tokenize_prompt
from utils.responses import build_response
from utils.storage import write_json

ARCHS = ("llama", "gemma2", "gpt2")
SET = "viz_set"
# Different lengths (the batch pads), all longer than Gemma-2's sliding window of 6; one holds "," tokens.
PROMPTS = [("hello world , the model will answer", "yes , I will help"),
           ("why", "no"),
           ("tell me a story about the user and the assistant please", "the story , the poem")]


def write_responses(model_dir: str, exp: str, variant: str, prompts=PROMPTS) -> list[list[int]]:
    """Response JSONs as generate_responses.py writes them: exact prompt + response ids, prompt_end."""
    tok = load_tokenizer(model_dir)
    all_ids = []
    for i, (prompt, response) in enumerate(prompts, start=1):
        text, note = format_prompt(tok, prompt)
        p_ids = tokenize_prompt(tok, text)
        ids = p_ids + tokenize_continuation(tok, response)
        rec = build_response(text, response, ids, len(p_ids), decode_tokens(tok, ids), model_dir, prompt_note=note)
        write_json(paths.response_file(exp, variant, SET, i), rec)
        all_ids.append(ids)
    return all_ids


def read(exp: str, pid, kind: str, suffix: str | None = None) -> dict:
    path = paths.per_token_dir(exp, paths.set_dir(SET, suffix)) / f"{pid}_{kind}.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def eager_models():
    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = load_model(path, attn_implementation="eager")
        return cache[path]
    return get


def final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def model_probs(model, hidden: torch.Tensor, softcap: bool = True) -> torch.Tensor:
    """Independent oracle for an intermediate layer: the model's named final norm and lm_head, by hand."""
    logits = model.lm_head(final_norm(model)(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap and softcap:
        logits = torch.tanh(logits / cap) * cap
    return torch.softmax(logits.float(), dim=-1)


def as_matrix(rec: dict, layer_pos: int, head: int) -> torch.Tensor:
    """The JSON's rows for one layer and head as a lower-triangular [T, T] matrix."""
    t = len(rec["tokens"])
    m = torch.zeros(t, t, dtype=torch.float64)
    for row in rec["attention"]:
        vals = row["by_layer"][layer_pos][head]
        m[row["token_idx"], :len(vals)] = torch.tensor(vals, dtype=torch.float64)
    return m


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_equals_hf_output_attentions(arch, zoo, experiments, eager_models):
    experiments("viz", {"base": {"model": zoo(arch)}})
    all_ids = write_responses(zoo(arch), "viz", "base")
    lm = eager_models(zoo(arch))
    s = extract_viz("viz", SET, attention=True, heads="all", batch_size=2, loaded=lm, progress=False)
    assert s.written["attention"] == 3 and s.bytes["attention"] > 0
    s_mean = extract_viz("viz", SET, attention=True, heads="mean", layers="1,-1", batch_size=3, loaded=lm,
                         output_suffix="mean", progress=False)
    assert s_mean.layers == [1, 3]
    for pid, ids in enumerate(all_ids, start=1):
        with torch.no_grad():
            hf = lm.model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        rec = read("viz", pid, "attention")
        t = len(ids)
        assert (rec["n_layers"], rec["n_heads"], rec["heads"], rec["layers"]) == (4, 4, "all", [0, 1, 2, 3])
        assert [r["context_size"] for r in rec["attention"]] == list(range(1, t + 1))
        for li in range(4):
            for h in range(4):
                got, want = as_matrix(rec, li, h), hf[li][0, h].double()
                assert torch.allclose(got, want, atol=1e-6, rtol=0), (arch, pid, li, h)
                rows = got.sum(-1)
                assert torch.allclose(rows, torch.ones(t, dtype=torch.float64), atol=t * 1e-6)
        if arch == "gemma2":  # the sliding layers really mask: the last row is zero before the 6-token window
            sliding = [i for i, kind in enumerate(lm.model.config.layer_types) if kind == "sliding_attention"]
            assert sliding and t > 6
            assert all(v == 0 for v in rec["attention"][-1]["by_layer"][sliding[0]][0][:t - 6])
            assert any(v > 0 for v in rec["attention"][-1]["by_layer"][1][0][:t - 6])  # a global layer does not
        mean = read("viz", pid, "attention", suffix="mean")
        assert (mean["n_heads"], mean["heads"], mean["layers"]) == (4, "mean", [1, 3])
        for layer in [1, 3]:  # by_layer is indexed by model layer, as the viewer reads it
            assert len(mean["attention"][-1]["by_layer"][layer]) == 1
            got = as_matrix(mean, layer, 0)
            assert torch.allclose(got, hf[layer][0].mean(0).double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_last_layer_is_the_models_own_distribution(arch, zoo, experiments, eager_models):
    experiments("viz", {"base": {"model": zoo(arch)}})
    all_ids = write_responses(zoo(arch), "viz", "base")
    lm = eager_models(zoo(arch))
    if arch == "gemma2":  # random tiny logits never reach the cap (30): a fresh copy with a louder final norm does
        lm = load_model(zoo(arch), attn_implementation="eager")
        with torch.no_grad():
            lm.model.model.norm.weight.mul_(0).add_(60.0)
    vocab = lm.model.config.vocab_size
    s = extract_viz("viz", SET, logit_lens=True, layers="1,-1", top_k=vocab, batch_size=2, loaded=lm, progress=False)
    assert s.written["logit_lens"] == 3
    for pid, ids in enumerate(all_ids, start=1):
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            last = torch.softmax(out.logits[0].float(), dim=-1)           # the model's own logits
            if arch == "gemma2":
                assert out.logits.abs().max() > 20  # in the soft-capping's non-linear range
            mid = model_probs(lm.model, out.hidden_states[2][0])          # block 1's output, by hand
            nocap = model_probs(lm.model, out.hidden_states[2][0], softcap=False)
        rec = read("viz", pid, "logit_lens")
        assert rec["top_k"] == vocab and rec["layers"] == [1, 3] and len(rec["predictions"]) == len(ids) - 1
        for i, pred in enumerate(rec["predictions"]):
            nxt = ids[i + 1]
            assert pred["token_idx"] == i and pred["actual_next_token_id"] == nxt
            for entry, probs in zip((pred["by_layer"][1], pred["by_layer"][3]), (mid[i], last[i])):
                got = torch.tensor([e["prob"] for e in entry["top_k"]], dtype=torch.float64)
                want = probs.double().sort(descending=True).values
                assert torch.allclose(got, want, atol=1e-6, rtol=0), (arch, pid, i, entry["layer"])
                top2 = want[:2]
                if top2[0] - top2[1] > 1e-5:  # a unique argmax: its decoded string comes first
                    assert entry["top_k"][0]["token"] == lm.tokenizer.decode([int(probs.argmax())])
                assert entry["actual_rank"] == 1 + int((probs > probs[nxt]).sum())
                assert entry["actual_prob"] == pytest.approx(float(probs[nxt]), rel=1e-5, abs=1e-12)
        if arch == "gemma2":  # the test has teeth: without the final soft-capping the numbers differ
            assert (nocap - mid).abs().max() > 1e-2


def test_lora_variant_differs_from_base_and_matches_its_own_logits(zoo, zoo_lora, experiments):
    base, adapter = zoo("llama"), zoo_lora("llama")
    experiments("viz", {"base": {"model": base}, "lora": {"model": base, "lora": adapter}})
    all_ids = write_responses(base, "viz", "base")
    write_responses(base, "viz", "lora")
    for variant in ("base", "lora"):  # loaded through load_variant, LoRA adapter and eager attention included
        s = extract_viz("viz", SET, model_variant=variant, attention=True, logit_lens=True, top_k=5,
                        output_suffix=variant, progress=False)
        assert s.variant == variant and s.written == {"attention": 3, "logit_lens": 3}
    with torch.no_grad():
        peft = load_model(base, lora=adapter).model
        own = torch.softmax(peft(input_ids=torch.tensor([all_ids[0]])).logits[0].float(), dim=-1)
    a_base, a_lora = read("viz", 1, "attention", "base"), read("viz", 1, "attention", "lora")
    l_base, l_lora = read("viz", 1, "logit_lens", "base"), read("viz", 1, "logit_lens", "lora")
    assert (a_base["model_variant"], a_lora["model_variant"], l_lora["model_variant"]) == ("base", "lora", "lora")
    diff = max(abs(x - y) for rb, rl in zip(a_base["attention"], a_lora["attention"])
               for x, y in zip(rb["by_layer"][3][0], rl["by_layer"][3][0]))
    assert diff > 1e-3
    lens_diff = max(abs(pb["by_layer"][3]["actual_prob"] - pl["by_layer"][3]["actual_prob"])
                    for pb, pl in zip(l_base["predictions"], l_lora["predictions"]))
    assert lens_diff > 1e-3
    for i, pred in enumerate(l_lora["predictions"]):
        got = [e["prob"] for e in pred["by_layer"][3]["top_k"]]
        assert got == pytest.approx(own[i].sort(descending=True).values[:5].tolist(), abs=1e-6)


def test_schema_keys_and_the_comma_token(zoo, experiments, eager_models):
    experiments("viz", {"base": {"model": zoo("llama")}})
    all_ids = write_responses(zoo("llama"), "viz", "base", prompts=PROMPTS[:1])
    tok = load_tokenizer(zoo("llama"))
    comma = tok.convert_tokens_to_ids(",")
    assert comma in all_ids[0] and tok.decode([comma]) == ","
    extract_viz("viz", SET, attention=True, logit_lens=True, top_k=7, loaded=eager_models(zoo("llama")),
                progress=False)
    att, lens = read("viz", 1, "attention"), read("viz", 1, "logit_lens")
    header = {"prompt_id", "prompt_set", "n_layers", "tokens", "n_prompt_tokens", "n_response_tokens",
              "model_variant", "layers"}
    assert header | {"n_heads", "heads", "attention"} <= att.keys()
    assert header | {"top_k", "predictions"} <= lens.keys()
    ids = all_ids[0]
    n_prompt = len(tokenize_prompt(tok, format_prompt(tok, PROMPTS[0][0])[0]))
    assert (att["prompt_id"], att["prompt_set"], att["n_prompt_tokens"], att["n_response_tokens"]) == \
        ("1", SET, n_prompt, len(ids) - n_prompt)
    assert att["tokens"] == lens["tokens"] == decode_tokens(tok, ids) and "," in att["tokens"]
    assert {"token_idx", "context_size", "by_layer"} == att["attention"][0].keys()
    pred = lens["predictions"][0]
    assert {"token_idx", "actual_next_token", "by_layer"} <= pred.keys()
    assert {"layer", "top_k", "actual_rank", "actual_prob"} == pred["by_layer"][0].keys()
    assert len(pred["by_layer"][0]["top_k"]) == 7 and {"token", "prob"} == pred["by_layer"][0]["top_k"][0].keys()
    commas = [p for p in lens["predictions"] if ids[p["token_idx"] + 1] == comma]
    assert commas and all(p["actual_next_token"] == "," and p["actual_next_token_id"] == comma for p in commas)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_errors_write_nothing(zoo, experiments, capsys):
    exp_dir = experiments("viz", {"base": {"model": zoo("llama")}})
    per_token = exp_dir / "analysis"
    code, _, err = run_main(["--experiment", "viz", "--prompt-set", SET], capsys)  # neither kind asked
    assert code == 2 and "--attention" in err
    code, _, err = run_main(["--experiment", "viz", "--prompt-set", SET, "--logit-lens"], capsys)
    assert code == 2 and "generate_responses.py" in err and err.startswith("error:")
    write_responses(zoo("llama"), "viz", "base")
    code, _, err = run_main(["--experiment", "viz", "--prompt-set", SET, "--attention", "--max-tokens", "20"], capsys)
    assert code == 2 and "--max-tokens 20" in err and "tokens" in err and err.count("\n") == 1
    code, _, err = run_main(["--experiment", "viz", "--prompt-set", SET, "--logit-lens", "--layers", "9"], capsys)
    assert code == 2 and "--layers" in err and "4 layers" in err
    code, _, err = run_main(["--experiment", "viz", "--prompt-set", SET, "--logit-lens", "--model-variant", "nope"],
                            capsys)
    assert code == 2 and "nope" in err
    assert not per_token.exists()


def test_cli_skip_existing_and_summary(zoo, experiments, capsys):
    exp_dir = experiments("viz", {"base": {"model": zoo("gpt2")}})
    write_responses(zoo("gpt2"), "viz", "base")
    args = ["--experiment", "viz", "--prompt-set", SET, "--logit-lens", "--top-k", "3", "--limit", "2"]
    code, out, _ = run_main(args, capsys)
    assert code == 0 and "logit lens 2" in out and "skipped 0" in out
    out_dir = exp_dir / "analysis" / "per_token" / SET
    assert sorted(p.name for p in out_dir.iterdir()) == ["1_logit_lens.json", "2_logit_lens.json"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    code, out, _ = run_main(args + ["--attention", "--skip-existing"], capsys)
    assert code == 0 and "attention 2" in out and "logit lens" not in out.split("skipped")[0]
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*_logit_lens.json")} == stamps
    code, out, _ = run_main(args + ["--attention", "--skip-existing"], capsys)
    assert code == 0 and "skipped 2" in out and "wrote nothing" in out
    assert not any(p.name.startswith(".") for p in out_dir.iterdir())  # no temp files left behind


def test_script_runs_from_repo_root_with_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "inference/extract_viz.py", "--help"], cwd=paths.REPO_ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "example:" in r.stdout and "--logit-lens" in r.stdout


def test_lens_refuses_a_head_that_does_not_reproduce_the_logits(zoo):
    from core.logit_lens import LensError, find_lens_head

    lm = load_model(zoo("llama"))
    lm.model.config.final_logit_softcapping = 1.0  # Llama's forward ignores it: a lens applying it would be wrong
    with pytest.raises(LensError, match="does not reproduce the model's logits"):
        find_lens_head(lm.model)


def test_quantized_4bit_lens_matches_the_quantized_models_logits(zoo, experiments):
    experiments("viz", {"base": {"model": zoo("llama")}})
    all_ids = write_responses(zoo("llama"), "viz", "base", prompts=PROMPTS[1:2])
    s = extract_viz("viz", SET, logit_lens=True, layers="-1", top_k=4, load_in_4bit=True, progress=False)
    assert s.written["logit_lens"] == 1
    with torch.no_grad():
        q = load_model(zoo("llama"), load_in_4bit=True).model
        own = torch.softmax(q(input_ids=torch.tensor([all_ids[0]])).logits[0].float(), dim=-1)
    for i, pred in enumerate(read("viz", 1, "logit_lens")["predictions"]):
        got = [e["prob"] for e in pred["by_layer"][3]["top_k"]]
        assert got == pytest.approx(own[i].sort(descending=True).values[:4].tolist(), abs=1e-6)


def test_layer_deep_dive_js_reads_by_layer_by_model_layer(zoo, experiments, eager_models):
    """The viewer's layer deep dive (visualization/views/layer-deep-dive.js) indexes `by_layer` by model layer:
    renderLayersHeatmap draws one row "L{i}" per entry (head-averaged, `by_layer[i] || []`), renderHeadsHeatmap
    reads `by_layer[layer]` for the monitoring layer, renderLogitLensChart reads `prediction.by_layer[layer]`
    (top_k, actual_rank, actual_prob). With --layers a subset, each row must still be its own layer."""
    experiments("viz", {"base": {"model": zoo("llama")}})
    all_ids = write_responses(zoo("llama"), "viz", "base")
    lm = eager_models(zoo("llama"))
    extract_viz("viz", SET, attention=True, logit_lens=True, layers="1,3", top_k=5, loaded=lm, progress=False)
    for pid, ids in enumerate(all_ids, start=1):
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([ids]), output_attentions=True)
        att, lens = read("viz", pid, "attention"), read("viz", pid, "logit_lens")
        assert att["layers"] == lens["layers"] == [1, 3] and att["n_layers"] == 4
        for token_attn in att["attention"]:
            i, n_layers = token_attn["token_idx"], len(token_attn["by_layer"])
            assert n_layers == 4
            for layer in range(n_layers):  # renderLayersHeatmap, sink shown (startPos 0)
                layer_data = token_attn["by_layer"][layer] or []
                row = [sum(h[pos] for h in layer_data if pos < len(h)) / len(layer_data) if layer_data else 0.0
                       for pos in range(token_attn["context_size"])]
                want = out.attentions[layer][0, :, i, :i + 1].mean(0) if layer in (1, 3) else torch.zeros(i + 1)
                assert torch.allclose(torch.tensor(row, dtype=torch.float64), want.double(), atol=1e-6), (pid, i, layer)
            heads = token_attn["by_layer"][3]  # renderHeadsHeatmap at layer 3
            assert len(heads) == 4
            assert torch.allclose(torch.tensor(heads, dtype=torch.float64), out.attentions[3][0, :, i, :i + 1].double(),
                                  atol=1e-6)
        probs = torch.softmax(out.logits[0].float(), dim=-1)
        for prediction in lens["predictions"]:  # renderLogitLensChart
            i = prediction["token_idx"]
            assert [e["layer"] for e in prediction["by_layer"]] == [0, 1, 2, 3]
            last = prediction["by_layer"][3]
            assert last["top_k"][0]["prob"] == pytest.approx(float(probs[i].max()), abs=1e-6)
            assert last["actual_rank"] == 1 + int((probs[i] > probs[i, ids[i + 1]]).sum())
            for layer in (0, 2):  # not computed: no bars, no rank (the viewer shows just the actual token)
                assert prediction["by_layer"][layer] == {"layer": layer, "top_k": [], "actual_rank": None,
                                                         "actual_prob": None}


def test_token_strings_are_decoded_from_the_ids(zoo, experiments, eager_models):
    experiments("viz", {"base": {"model": zoo("llama")}})
    all_ids = write_responses(zoo("llama"), "viz", "base", prompts=PROMPTS[:1])
    tok = load_tokenizer(zoo("llama"))
    f = paths.response_file("viz", "base", SET, 1)
    rec = json.loads(f.read_text())
    rec["tokens"] = [", " if t == "," else t for t in rec["tokens"]]  # as trait-interp's compact writer stores them
    n_bad = rec["tokens"].count(", ")
    assert n_bad >= 2
    write_json(f, rec)
    s = extract_viz("viz", SET, attention=True, logit_lens=True, top_k=3, loaded=eager_models(zoo("llama")),
                    progress=False)
    assert s.tokens_corrected == n_bad and f"{n_bad} token strings decoded from the ids differed" in s.line()
    att, lens = read("viz", 1, "attention"), read("viz", 1, "logit_lens")
    assert att["tokens"] == lens["tokens"] == decode_tokens(tok, all_ids[0])
    assert all(p["actual_next_token"] == lens["tokens"][p["token_idx"] + 1] for p in lens["predictions"])
