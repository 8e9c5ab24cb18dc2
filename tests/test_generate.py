"""inference/generate_responses.py and core/generation.py on tiny zoo models.

Oracles: HF `model.generate` one prompt at a time on the same ids; the tokenizer's own chat template
tokenization; HF/peft loading done here independently of utils/model.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import core.generation as generation
from core.generation import SeededSampler, generate_batch, generate_in_batches
from inference.generate_responses import generate_responses, main
from utils import paths
from utils.model import load_model

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer briefly."
TINY = {"system_prompt": SYSTEM, "prompts": [
    {"id": 1, "text": "hello", "note": "short"},
    {"id": "b", "prompt": "the model will refuse to help the user because it is rude and harmful"},
    {"id": 3, "text": "why?"},
    {"id": 10, "text": "write a poem about café 日本 🙂 please, a long one with many words in it"},
    {"id": 2, "text": "what is 42"},
]}


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(root))

    def write(name: str, obj) -> Path:
        f = root / "inference" / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        return f
    write("tiny", TINY)
    return write


def read(exp: str, variant: str, prompt_set: str, pid, suffix=None) -> dict:
    return json.loads(paths.response_file(exp, variant, prompt_set, pid, suffix).read_text(encoding="utf-8"))


def hf_greedy(model, ids: list[int], n: int, stop_ids: list[int], pad_id: int) -> list[int]:
    """Oracle: plain HF generate on one unpadded prompt, cut before the first stop id."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
    new = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop_ids), len(new))
    return new[:cut]


def hf_model(path: str, lora: str | None = None):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, lora)
    return model.eval()


def stops_of(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    return sorted(set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id})


# ---- Mode A against HF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_mode_a_greedy_equals_hf_generate_one_at_a_time(arch, zoo, experiments, datasets):
    experiments("e", {"base": {"model": zoo(arch)}})
    s = generate_responses("e", "tiny", max_new_tokens=8, batch_size=3, no_server=True, progress=False)
    assert s["written"] == 5 and s["backend"] == "local" and s["batch_size"] == 3

    tok = AutoTokenizer.from_pretrained(zoo(arch))
    model = hf_model(zoo(arch))
    stops = stops_of(model, tok)
    for item in TINY["prompts"]:
        r = read("e", "base", "tiny", item["id"])
        ids, end = r["token_ids"], r["prompt_end"]
        prompt_ids = ids[:end]
        # the stored prompt text, tokenized as-is (it carries its own <bos>), gives the stored prompt ids
        assert prompt_ids == tok(r["prompt"], add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
        if arch != "gemma2":  # gemma2's template rejects a system turn: folded into the user turn instead
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item.get("text", item.get("prompt"))}]
            assert prompt_ids == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
        else:
            assert SYSTEM in r["prompt"] and r["generation"]["format_note"]
        expected = hf_greedy(model, prompt_ids, 8, stops, tok.pad_token_id)
        assert ids[end:] == expected
        assert r["response"] == tok.decode(expected, skip_special_tokens=True)
        assert r["tokens"] == [tok.decode([i]) for i in ids]
        assert r["system_prompt"] == SYSTEM and r["inference_model"] == zoo(arch)
        assert r["prompt_note"] == item.get("note")
        assert r["generation"] == {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None,
                                   "stop_reason": "length" if len(expected) == 8 else "eos", "prefill": None,
                                   "format_note": r["generation"]["format_note"], "variant": "base", "lora": None,
                                   "dtype": "float32", "quantization": None}


def test_generate_batch_batched_equals_unbatched_and_stops(zoo):
    loaded = load_model(zoo("llama"))
    model, tok = loaded.model, loaded.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("hello", "a much longer prompt about the user and the model", "why")]
    free = [hf_greedy(model, p, 10, [tok.eos_token_id], tok.pad_token_id) for p in prompts]
    # stop on a token that row 0 really generates: it must end there, as in HF's own run with that stop id
    stop = free[0][3]
    batched = generate_batch(model, prompts, tok.pad_token_id, 10, stop_ids=[stop])
    single = [generate_batch(model, [p], tok.pad_token_id, 10, stop_ids=[stop])[0] for p in prompts]
    assert batched == single
    for p, res in zip(prompts, batched):
        expected = hf_greedy(model, p, 10, [stop], tok.pad_token_id)
        assert res.ids == expected and stop not in res.ids
        assert res.stop_reason == ("eos" if len(expected) < 10 else "length")
    assert batched[0].stop_reason == "eos" and len(batched[0].ids) <= 3
    assert generate_batch(model, [], tok.pad_token_id, 5) == []
    with pytest.raises(ValueError):
        generate_batch(model, prompts, tok.pad_token_id, 0)


def test_prefill_is_part_of_the_prompt(zoo, experiments, datasets):
    experiments("e", {"base": {"model": zoo("llama")}})
    prefill = "Sure, here is"
    generate_responses("e", "tiny", max_new_tokens=6, prefill=prefill, limit=2, no_server=True, progress=False)
    tok = AutoTokenizer.from_pretrained(zoo("llama"))
    model = hf_model(zoo("llama"))
    r = read("e", "base", "tiny", 1)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    templ = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    prefill_ids = tok(prefill, add_special_tokens=False)["input_ids"]
    assert r["prompt"].endswith("assistant\n" + prefill)
    assert r["token_ids"][:r["prompt_end"]] == templ + prefill_ids
    assert r["prompt_end"] == len(templ) + len(prefill_ids)
    assert r["token_ids"][r["prompt_end"]:] == hf_greedy(model, templ + prefill_ids, 6, stops_of(model, tok),
                                                         tok.pad_token_id)
    assert r["generation"]["prefill"] == prefill


def test_lora_variant_generates_with_the_adapter(zoo, zoo_lora, experiments, datasets):
    experiments("e", {"base": {"model": zoo("llama")}, "lora": {"model": zoo("llama"), "lora": zoo_lora("llama")}})
    generate_responses("e", "tiny", model_variant="lora", max_new_tokens=8, limit=2, no_server=True, progress=False)
    generate_responses("e", "tiny", model_variant="base", max_new_tokens=8, limit=2, no_server=True, progress=False)
    tok = AutoTokenizer.from_pretrained(zoo("llama"))
    peft_model = hf_model(zoo("llama"), zoo_lora("llama"))
    r, base = read("e", "lora", "tiny", "b"), read("e", "base", "tiny", "b")
    assert r["token_ids"][:r["prompt_end"]] == base["token_ids"][:base["prompt_end"]]
    assert r["token_ids"][r["prompt_end"]:] == hf_greedy(peft_model, r["token_ids"][:r["prompt_end"]], 8,
                                                         stops_of(peft_model, tok), tok.pad_token_id)
    assert r["token_ids"] != base["token_ids"]
    assert r["inference_model"] == zoo("llama")  # the base model id, as trait-interp writes it


def test_4bit_generation_matches_hf_on_the_same_quantized_model(zoo, experiments, datasets):
    from transformers import BitsAndBytesConfig

    experiments("e", {"base": {"model": zoo("llama")}})
    s = generate_responses("e", "tiny", max_new_tokens=5, limit=2, batch_size=1, load_in_4bit=True, no_server=True,
                           progress=False)
    assert s["written"] == 2
    tok = AutoTokenizer.from_pretrained(zoo("llama"))
    q = AutoModelForCausalLM.from_pretrained(zoo("llama"), dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")).eval()
    for pid in ("1", "b"):
        r = read("e", "base", "tiny", pid)
        assert r["generation"]["quantization"] == "4bit"
        assert r["token_ids"][r["prompt_end"]:] == hf_greedy(q, r["token_ids"][:r["prompt_end"]], 5,
                                                             stops_of(q, tok), tok.pad_token_id)


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_per_prompt_whatever_the_batching(zoo, experiments, datasets):
    experiments("e", {"base": {"model": zoo("qwen2")}})
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7, no_server=True, progress=False)
    generate_responses("e", "tiny", batch_size=5, output_suffix="b5", **kw)
    generate_responses("e", "tiny", batch_size=1, output_suffix="b1", **kw)
    generate_responses("e", "tiny", batch_size=2, output_suffix="s8", **{**kw, "seed": 8})
    differ_seed = 0
    for item in TINY["prompts"]:
        a, b = read("e", "base", "tiny", item["id"], "b5"), read("e", "base", "tiny", item["id"], "b1")
        assert a["token_ids"] == b["token_ids"] and a["generation"]["seed"] == 7
        differ_seed += a["token_ids"] != read("e", "base", "tiny", item["id"], "s8")["token_ids"]
    assert differ_seed >= 4
    # no --seed: one is drawn and recorded, and rerunning with it reproduces the files
    s = generate_responses("e", "tiny", limit=2, output_suffix="auto", **{**kw, "seed": None})
    again = generate_responses("e", "tiny", limit=2, output_suffix="again", **{**kw, "seed": s["seed"]})
    assert isinstance(s["seed"], int) and again["written"] == 2
    for pid in ("1", "b"):
        assert (read("e", "base", "tiny", pid, "auto")["token_ids"] == read("e", "base", "tiny", pid, "again")["token_ids"])


def test_seeded_sampler_draws_from_softmax_over_the_top_p_nucleus():
    """The Gumbel-max draw must follow softmax(logits / T); top-p must drop exactly the tail."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, temperature = 20000, 0.8
    seeds = torch.arange(n, dtype=torch.int64)
    ids = torch.zeros(n, 3, dtype=torch.long)
    for top_p in (1.0, 0.8):
        freq = torch.zeros(6)
        for step in range(2):  # two steps: the noise must also be fresh per step
            scores = SeededSampler(temperature, top_p, seeds, prompt_len=3 - step)(ids, logits.repeat(n, 1))
            freq += torch.bincount(scores.argmax(-1), minlength=6).float()
        freq /= 2 * n
        probs = torch.softmax(logits / temperature, -1)
        if top_p < 1:
            keep = (probs.cumsum(0) - probs) < top_p
            probs = torch.where(keep, probs, torch.zeros_like(probs))
            probs /= probs.sum()
            assert (freq[~keep] == 0).all()
        assert torch.allclose(freq, probs, atol=0.012), (freq, probs)
    a = SeededSampler(1.0, 1.0, torch.tensor([5, 6]), 3)(ids[:2], logits.repeat(2, 1))
    b = SeededSampler(1.0, 1.0, torch.tensor([5, 6]), 3)(ids[:2], logits.repeat(2, 1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


# ---- batching, out-of-memory, resuming ----------------------------------------------------------------------------
def test_out_of_memory_halves_the_batch(zoo, experiments, datasets, monkeypatch):
    loaded = load_model(zoo("llama"))
    real = generation.generate_batch
    sizes = []

    def fake(model, prompt_ids, *a, **k):
        sizes.append(len(prompt_ids))
        if len(prompt_ids) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, prompt_ids, *a, **k)

    prompts = [loaded.tokenizer(t)["input_ids"] for t in ("a", "bb cc", "the model", "why", "hello world")]
    direct = real(loaded.model, prompts, loaded.tokenizer.pad_token_id, 5)
    monkeypatch.setattr(generation, "generate_batch", fake)
    results, size = generate_in_batches(loaded.model, prompts, 4, loaded.tokenizer.pad_token_id, 5)
    assert results == direct and size == 2 and sizes[:2] == [4, 2]
    with pytest.raises(RuntimeError, match="device-side assert"):  # other errors are not retried
        monkeypatch.setattr(generation, "generate_batch",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device-side assert")))
        generate_in_batches(loaded.model, prompts, 4, loaded.tokenizer.pad_token_id, 5)
    monkeypatch.setattr(generation, "generate_batch", fake)
    experiments("e", {"base": {"model": zoo("llama")}})
    s = generate_responses("e", "tiny", max_new_tokens=4, batch_size=4, no_server=True, progress=False)
    assert s["written"] == 5 and s["batch_size"] == 2


def test_limit_suffix_and_skip_existing(zoo, experiments, datasets):
    experiments("e", {"base": {"model": zoo("llama")}})
    s = generate_responses("e", "tiny", max_new_tokens=3, limit=2, output_suffix="x", no_server=True, progress=False)
    out = paths.responses_dir("e", "base", "tiny", "x")
    assert s["written"] == 2 and sorted(p.name for p in out.iterdir()) == ["1.json", "b.json"]
    assert out.name == "tiny_x"
    (out / "b.json").write_text('{"sentinel": true}')
    s = generate_responses("e", "tiny", max_new_tokens=3, skip_existing=True, output_suffix="x", no_server=True,
                           progress=False)
    assert (s["written"], s["skipped_existing"], s["total"]) == (3, 2, 5)
    assert json.loads((out / "b.json").read_text()) == {"sentinel": True}
    # everything present: nothing to do, and no model is loaded for it
    s = generate_responses("e", "tiny", skip_existing=True, output_suffix="x", no_server=True, progress=False)
    assert s["written"] == 0 and s["backend"] is None


def strip_date(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "capture_date"}


def test_killed_mid_run_then_skip_existing_gives_the_uninterrupted_files(zoo, experiments, datasets, tmp_path):
    exp_dir = experiments("e", {"base": {"model": zoo("llama")}})
    prompts = [{"id": i, "text": "word " * (i % 4) + f"prompt number {i}"} for i in range(6)]
    datasets("eight", {"prompts": prompts})
    # a slow generate_batch so the kill lands between batches of one
    wrapper = tmp_path / "slow_generate.py"
    wrapper.write_text(
        "import sys, time\n"
        "import core.generation as g\n"
        "real = g.generate_batch\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return real(*a, **k)\n"
        "g.generate_batch = slow\n"
        "from inference.generate_responses import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "TRAIT_EXPERIMENTS_DIR": str(exp_dir.parent), "HF_HUB_OFFLINE": "1"}
    args = ["--experiment", "e", "--prompt-set", "eight", "--max-new-tokens", "6", "--batch-size", "1",
            "--no-server", "--no-progress"]
    out = paths.responses_dir("e", "base", "eight")
    proc = subprocess.Popen([sys.executable, str(wrapper), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.json"))) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    n_before = len(list(out.glob("*.json")))
    assert 2 <= n_before < 6, proc.stderr.read().decode()
    partial = {p.name: p.read_text() for p in out.glob("*.json")}

    assert main(args + ["--skip-existing"]) == 0
    assert main([*args, "--output-suffix", "full"]) == 0
    full = paths.responses_dir("e", "base", "eight", "full")
    names = sorted(p.name for p in full.glob("*.json"))
    assert names == sorted(p.name for p in out.glob("*.json")) and len(names) == 6
    for name in names:
        assert strip_date(json.loads((out / name).read_text())) == strip_date(json.loads((full / name).read_text()))
    for name, text in partial.items():  # files written before the kill were kept, not rewritten
        assert (out / name).read_text() == text


# ---- Mode B ------------------------------------------------------------------------------------------------------
def test_mode_b_imports_text_without_loading_weights(zoo, experiments, datasets, tmp_path, monkeypatch, capsys):
    experiments("e", {"base": {"model": zoo("llama")}})
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps({"1": "Hello there, friend.<|im_end|>\n", "b": "I cannot help with that.",
                                 "3": "ends with eos<eos>", "zzz": "not in the set"}))

    def refuse(*a, **k):
        raise AssertionError("Mode B must not load model weights")
    import inference.generate_responses as gr
    import utils.model as um
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(um, "load_model", refuse)
    monkeypatch.setattr(gr, "load_variant", refuse)

    rc = main(["--experiment", "e", "--prompt-set", "tiny", "--from-responses", str(texts), "--prefill", "Well,",
               "--no-progress"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "2 missing from the file: 10, 2" in line and "1 not in the set: zzz" in line

    tok = AutoTokenizer.from_pretrained(zoo("llama"))
    for pid, text, response, removed in (("1", "hello", "Hello there, friend.", "<|im_end|>\n"),
                                         ("b", TINY["prompts"][1]["prompt"], "I cannot help with that.", None),
                                         ("3", "why?", "ends with eos", "<eos>")):
        r = read("e", "base", "tiny", pid)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        prompt_ids = (tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
                      + tok("Well,", add_special_tokens=False)["input_ids"])
        assert r["token_ids"] == prompt_ids + tok(response, add_special_tokens=False)["input_ids"]
        assert r["prompt_end"] == len(prompt_ids) and r["prompt"].endswith("Well,")
        assert r["response"] == response and r["imported"]["stripped_suffix"] == removed
        assert r["tokens"] == [tok.decode([i]) for i in r["token_ids"]]
    assert not paths.response_file("e", "base", "tiny", "10").exists()
    s = generate_responses("e", "tiny", from_responses=texts, skip_existing=True, progress=False)
    assert (s["written"], s["skipped_existing"], s["missing_ids"], s["unknown_ids"]) == (0, 3, ["10", "2"], ["zzz"])


# ---- bad input ---------------------------------------------------------------------------------------------------
def bad_run(capsys, argv) -> str:
    rc = main(argv + ["--no-progress", "--no-server"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_exits_2_with_one_line_and_writes_nothing(zoo, experiments, datasets, tmp_path, capsys):
    exp_dir = experiments("e", {"base": {"model": zoo("llama")}})
    datasets("single_trait", {"prompts": [{"id": 1, "text": "a"}]})
    (tmp_path / "datasets" / "inference" / "broken.json").write_text('{"prompts": [{"id": 1, "text": "a"},')
    not_map = tmp_path / "list.json"
    not_map.write_text('["a", "b"]')
    bad_value = tmp_path / "bad_value.json"
    bad_value.write_text('{"1": 5}')
    base = ["--experiment", "e", "--prompt-set", "tiny"]

    err = bad_run(capsys, ["--experiment", "e", "--prompt-set", "single_trat"])
    assert "unknown prompt set 'single_trat'" in err and "single_trait" in err
    err = bad_run(capsys, ["--experiment", "e", "--prompt-set", "broken"])
    assert "broken.json" in err and "malformed JSON" in err
    err = bad_run(capsys, base + ["--model-variant", "nope"])
    assert "unknown model variant 'nope'" in err and "base" in err
    err = bad_run(capsys, base + ["--from-responses", str(not_map)])
    assert str(not_map) in err and "list" in err
    err = bad_run(capsys, base + ["--from-responses", str(bad_value)])
    assert "'1'" in err and "string" in err
    err = bad_run(capsys, base + ["--from-responses", str(tmp_path / "absent.json")])
    assert "absent.json" in err
    assert "--max-new-tokens" in bad_run(capsys, base + ["--max-new-tokens", "-5"])
    assert "--top-p" in bad_run(capsys, base + ["--top-p", "0"])
    assert "--temperature" in bad_run(capsys, base + ["--temperature", "-1"])
    assert "--batch-size" in bad_run(capsys, base + ["--batch-size", "0"])
    assert "--output-suffix" in bad_run(capsys, base + ["--output-suffix", "../x"])
    assert "mutually exclusive" in bad_run(capsys, base + ["--load-in-8bit", "--load-in-4bit"])
    assert "unknown experiment" in bad_run(capsys, ["--experiment", "nope", "--prompt-set", "tiny"])
    assert not (exp_dir / "inference").exists()


def test_cli_help_and_subprocess_error(zoo, experiments, datasets, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and "--from-responses" in out and "--top-p" in out and "--prompt-ids" in out
    exp_dir = experiments("e", {"base": {"model": zoo("llama")}})
    env = {**os.environ, "TRAIT_EXPERIMENTS_DIR": str(exp_dir.parent), "HF_HUB_OFFLINE": "1"}
    script = str(REPO / "inference" / "generate_responses.py")  # run from elsewhere: the editable install finds the repo
    r = subprocess.run([sys.executable, script, "--experiment", "e", "--prompt-set", "tiny", "--limit", "-1"],
                       capture_output=True, text=True, env=env, cwd="/")
    assert r.returncode == 2 and r.stderr.strip() == "error: --limit must be >= 0, got -1"


# ---- --prompt-ids, options, server failure ------------------------------------------------------------------------
def test_prompt_ids_select_a_subset_in_natural_order(zoo, experiments, datasets, capsys):
    experiments("e", {"base": {"model": zoo("llama")}})
    s = generate_responses("e", "tiny", max_new_tokens=4, prompt_ids="10,b,2", no_server=True, progress=False,
                           output_suffix="sub")
    out = paths.responses_dir("e", "base", "tiny", "sub")
    assert (s["written"], s["total"]) == (3, 3)
    assert sorted(p.stem for p in out.glob("*.json")) == ["10", "2", "b"]
    # the same bytes (but the date) as the whole set's files: a subset changes no file
    generate_responses("e", "tiny", max_new_tokens=4, no_server=True, progress=False, output_suffix="all")
    for pid in ("10", "b", "2"):
        assert strip_date(read("e", "base", "tiny", pid, "sub")) == strip_date(read("e", "base", "tiny", pid, "all"))
    # --limit applies after --prompt-ids, in natural id order (2 before 10 before b)
    s = generate_responses("e", "tiny", max_new_tokens=4, prompt_ids=["b", 10, 2], limit=2, no_server=True,
                           progress=False, output_suffix="lim")
    assert sorted(p.stem for p in paths.responses_dir("e", "base", "tiny", "lim").glob("*.json")) == ["10", "2"]
    # Mode B with --prompt-ids: missing ids counted among the selected only
    texts = paths.experiment_dir("e") / "texts.json"
    texts.write_text(json.dumps({"1": "one", "3": "three"}))
    s = generate_responses("e", "tiny", from_responses=texts, prompt_ids="1,2", output_suffix="imp", progress=False)
    assert (s["written"], s["total"], s["missing_ids"]) == (1, 2, ["2"])
    err = bad_run(capsys, ["--experiment", "e", "--prompt-set", "tiny", "--prompt-ids", "1,nope,zz"])
    assert "--prompt-ids" in err and "nope, zz" in err and "tiny" in err
    err = bad_run(capsys, ["--experiment", "e", "--prompt-set", "tiny", "--prompt-ids", "1,,2"])
    assert "--prompt-ids" in err and "comma list" in err


def test_options_from_args_cover_every_flag():
    from inference.generate_responses import GenerateOptions, build_parser

    ns = build_parser().parse_args(["--experiment", "e", "--prompt-set", "s", "--prompt-ids", "1,2", "--seed", "3",
                                    "--no-progress", "--no-server", "--limit", "4"])
    opts = GenerateOptions.from_args(ns)
    assert (opts.prompt_ids, opts.seed, opts.progress, opts.no_server, opts.limit) == ("1,2", 3, False, True, 4)
    flags = {a.dest for a in build_parser()._actions} - {"help", "no_progress"}
    assert flags <= {f for f in GenerateOptions.__dataclass_fields__}  # no flag is dropped on the way
    with pytest.raises(TypeError):
        generate_responses("e", "s", max_tokens=5)  # a misspelled option is not ignored


def test_server_failing_mid_run_exits_1_with_one_line(zoo, experiments, datasets, monkeypatch, capsys):
    import inference.generate_responses as gr
    from inference.model_server import ServerClient

    experiments("e", {"base": {"model": zoo("llama")}})
    with __import__("socket").socket() as sock:  # a port nobody listens on: the server "died" after /health
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = ServerClient(dead)
    client.served = {"dtype": "float32", "quantization": None}
    monkeypatch.setattr(gr, "probe_server", lambda *a, **k: (client, "fake server"))
    rc = main(["--experiment", "e", "--prompt-set", "tiny", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model server at " + dead) and "--skip-existing" in err
    assert "Traceback" not in err
