"""capture_raw_activations() and core.capture on the zoo, against HF's own hidden states.

Oracles: HF `output_hidden_states` of an unbatched forward (PeftModel for LoRA), the decomposition identity
residual[L] = residual[L-1] + attn[L] + mlp[L] (HF's embedding output for L = 0), the block's own MLP path
applied to residual[L-1] + attn[L], and one-by-one capture for batching / OOM retries.
"""
from __future__ import annotations

import json

import pytest
import torch

from core import capture as core_capture
from core.capture import BatchReport, CaptureOOMError, capture_sequences
from inference.capture_raw_activations import CaptureError, capture_raw_activations, format_summary
from tests.helpers import PAIRS, mlp_oracle, write_responses
from utils import paths
from utils.model import decode_tokens, load_model, load_tokenizer
from utils.storage import load_pt, write_json
from utils.zoo import ARCHS

def hf_hidden(model, ids: list[int]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states


def final_norm(model):
    base = model.base_model  # LlamaModel & co. (norm), GPT2Model (ln_f)
    return base.norm if hasattr(base, "norm") else base.ln_f


def blocks(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_residuals_equal_hf_hidden_states_and_decompose(arch, zoo, experiments):
    model_dir = zoo(arch)
    experiments("e", {"base": {"model": model_dir}})
    recs = write_responses("e", "base", "s", model_dir, multi_turn=3)
    summary = capture_raw_activations("e", "s", components="residual,attn_contribution,mlp_contribution",
                                      progress=False)
    assert summary["captured"] == len(recs) and summary["skipped"] == 0
    hf = load_model(model_dir).model
    norm = final_norm(hf)
    layers = list(range(4))
    for pid, rec in recs.items():
        d = load_pt(paths.raw_file("e", "base", "s", pid))
        ids, end = rec["token_ids"], rec["prompt_end"]
        assert d["prompt"]["token_ids"] + d["response"]["token_ids"] == ids
        assert d["prompt"]["tokens"] + d["response"]["tokens"] == rec["tokens"]
        assert (d["prompt"]["text"], d["response"]["text"]) == (rec["prompt"], rec["response"])
        assert sorted(d["prompt"]["activations"]) == layers
        md = d["metadata"]
        assert (md["variant"], md["layers"], md["responses_from"], md["dtype"]) == ("base", layers, "base", "float32")
        assert set(md["components"]) == {"residual", "attn_contribution", "mlp_contribution"}
        hs = hf_hidden(hf, ids)
        full = {L: {c: torch.cat([d["prompt"]["activations"][L][c], d["response"]["activations"][L][c]])
                    for c in md["components"]} for L in layers}
        for L in layers:
            assert d["prompt"]["activations"][L]["residual"].shape == (end, 64)
            assert d["response"]["activations"][L]["residual"].shape == (len(ids) - end, 64)
            # HF's last hidden state has the final norm applied; the capture is the block's raw output.
            want = hs[L + 1][0] if L < layers[-1] else None
            got = full[L]["residual"]
            if want is None:
                with torch.no_grad():
                    assert close(norm(got[None])[0], hs[-1][0]), f"{arch} layer {L} (final norm)"
            else:
                assert close(got, want), f"{arch} layer {L}"
            prev = hs[0][0] if L == 0 else full[L - 1]["residual"]
            attn, mlp = full[L]["attn_contribution"], full[L]["mlp_contribution"]
            assert close(got, prev + attn + mlp), f"{arch} identity at layer {L}"
            with torch.no_grad():
                assert close(mlp_oracle(arch, blocks(hf)[L], (prev + attn)[None])[0], mlp), f"{arch} attn split at {L}"
            assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3


def test_batched_equals_one_by_one_and_tensors_own_storage(zoo):
    model = load_model(zoo("qwen2")).model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 9, 1, 12, 17)]
    reports: list[BatchReport] = []
    batched = dict(capture_sequences(model, seqs, [1, 3], ["residual", "mlp_contribution"], pad_id=0,
                                     on_batch=reports.append))
    single = dict(capture_sequences(model, seqs, [1, 3], ["residual", "mlp_contribution"], pad_id=0, batch_size=1))
    assert len(reports) == 1 and reports[0].indices == [1, 5, 4, 2, 0, 3]  # longest first, one batch
    assert reports[0].padded_tokens == 6 * 17 and reports[0].tokens == sum(map(len, seqs))
    assert sorted(batched) == list(range(len(seqs)))
    for i, s in enumerate(seqs):
        assert sorted(batched[i]) == [1, 3]
        for L in (1, 3):
            for c in ("residual", "mlp_contribution"):
                t = batched[i][L][c]
                assert t.shape == (len(s), 64) and t.device.type == "cpu"
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
                assert close(t, single[i][L][c], 1e-5)
    # a budget of 20 padded tokens: 17, 17 and 12 go alone, then 9 + 5 (18 padded), then 1
    reports.clear()
    list(capture_sequences(model, seqs, [0], ["residual"], pad_id=0, max_batch_tokens=20, on_batch=reports.append))
    assert [r.indices for r in reports] == [[1], [5], [4], [2, 0], [3]]


def test_out_of_memory_halves_retries_and_loses_nothing(zoo, experiments, monkeypatch):
    model_dir = zoo("llama")
    experiments("e", {"base": {"model": model_dir}})
    pairs = [(f"prompt number {i} about code", "an answer " * (i % 3)) for i in range(7)]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs)
    loaded = load_model(model_dir)
    clean = capture_raw_activations("e", "s", loaded=loaded, output_suffix="clean", progress=False)

    real_forward = core_capture.run_forward
    sizes: list[int] = []

    def forward_with_small_memory(model, **inputs):
        sizes.append(inputs["input_ids"].shape[0])
        if inputs["input_ids"].shape[0] > 2:  # a batch of more than two prompts does not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(model, **inputs)

    monkeypatch.setattr(core_capture, "run_forward", forward_with_small_memory)
    summary = capture_raw_activations("e", "s", loaded=loaded, batch_size=4, progress=False)
    assert summary["captured"] == 7 and summary["out_of_memory_retries"] >= 1
    assert sizes[:3] == [4, 2, 2]  # halved, retried from the same prompt
    for pid in recs:
        a = load_pt(paths.raw_file("e", "base", "s", pid))
        b = load_pt(paths.raw_file("e", "base", "s", pid, "clean"))
        for side in ("prompt", "response"):
            for L, comps in b[side]["activations"].items():
                assert close(a[side]["activations"][L]["residual"], comps["residual"], 1e-5)
    assert clean["captured"] == 7

    # a RuntimeError saying "out of memory" counts too; at batch size 1 it names the prompt and writes nothing
    def always_oom(model, **inputs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(core_capture, "run_forward", always_oom)
    with pytest.raises(CaptureError, match=r"prompt \d+ \(\d+ tokens\): out of memory even at batch size 1"):
        capture_raw_activations("e", "s", loaded=loaded, output_suffix="never", progress=False)
    assert not paths.raw_dir("e", "base", "s", "never").exists()
    with pytest.raises(CaptureOOMError) as info:
        list(capture_sequences(loaded.model, [[1, 2, 3], [1, 2]], [0], ["residual"], pad_id=0))
    assert info.value.index == 0

    def broken(model, **inputs):  # anything else is not retried
        raise RuntimeError("device-side assert triggered")

    monkeypatch.setattr(core_capture, "run_forward", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        list(capture_sequences(loaded.model, [[1, 2, 3], [1, 2]], [0], ["residual"], pad_id=0))


def test_lora_variant_with_responses_from_base(zoo, zoo_lora, experiments):
    model_dir, adapter = zoo("llama"), zoo_lora("llama")
    experiments("e", {"base": {"model": model_dir}, "lora": {"model": model_dir, "lora": adapter}})
    recs = write_responses("e", "base", "s", model_dir)
    summary = capture_raw_activations("e", "s", model_variant="lora", responses_from="base", progress=False)
    assert summary["captured"] == len(recs)
    assert not paths.raw_dir("e", "base", "s").exists()
    peft = load_model(model_dir, lora=adapter).model
    base = load_model(model_dir).model
    for pid, rec in recs.items():
        d = load_pt(paths.raw_file("e", "lora", "s", pid))
        assert d["prompt"]["token_ids"] + d["response"]["token_ids"] == rec["token_ids"]
        assert (d["metadata"]["variant"], d["metadata"]["responses_from"]) == ("lora", "base")
        assert d["metadata"]["lora"] == adapter
        hs, hs_base = hf_hidden(peft, rec["token_ids"]), hf_hidden(base, rec["token_ids"])
        for L in range(3):  # last layer: see the final-norm comparison in the architecture test
            got = torch.cat([d["prompt"]["activations"][L]["residual"], d["response"]["activations"][L]["residual"]])
            assert close(got, hs[L + 1][0])
            assert not close(got, hs_base[L + 1][0])  # the adapter is really in the forward


def test_responses_from_needs_the_same_vocabulary(zoo, experiments, tmp_path):
    import shutil

    from utils.zoo import build_tokenizer

    other = tmp_path / "llama_other_tokenizer"
    shutil.copytree(zoo("llama"), other)
    build_tokenizer(vocab_size=300).save_pretrained(other)
    experiments("e", {"base": {"model": zoo("llama")}, "other": {"model": str(other)}, "g": {"model": zoo("gemma2")}})
    write_responses("e", "base", "s", zoo("llama"))
    with pytest.raises(CaptureError, match="--responses-from base: its tokenizer"):
        capture_raw_activations("e", "s", model_variant="other", responses_from="base", progress=False)
    assert not paths.raw_dir("e", "other", "s").exists()
    # another architecture with an identical vocabulary may read the ids
    summary = capture_raw_activations("e", "s", model_variant="g", responses_from="base", layers="0", progress=False)
    assert summary["captured"] == len(PAIRS)


def test_flags_change_exactly_what_they_say(zoo, experiments):
    model_dir = zoo("mistral")
    experiments("e", {"base": {"model": model_dir}})
    pairs = PAIRS + [("one more prompt", "and its answer"), ("the tenth", "ok")]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs, ids=["1", "2", "10", "3", "20", "4"])
    write_json(paths.responses_dir("e", "base", "s") / "2_annotations.json", {"spans": []})
    loaded = load_model(model_dir)
    full = capture_raw_activations("e", "s", loaded=loaded, progress=False)
    assert full["captured"] == 6  # the annotations file is no prompt
    ref = {pid: load_pt(paths.raw_file("e", "base", "s", pid)) for pid in recs}

    def run(suffix, **kw):
        s = capture_raw_activations("e", "s", loaded=loaded, output_suffix=suffix, progress=False, **kw)
        folder = paths.raw_dir("e", "base", "s", suffix)
        return s, {p.stem: load_pt(p) for p in folder.glob("*.pt")}

    def same(a, b, side, L, c="residual", tol=1e-5):
        return close(a[side]["activations"][L][c], b[side]["activations"][L][c], tol)

    s, got = run("layers", layers="1,-1")
    assert set(got) == set(recs) and s["layers"] == [1, 3]
    for pid, d in got.items():
        assert sorted(d["prompt"]["activations"]) == sorted(d["response"]["activations"]) == [1, 3]
        assert all(same(d, ref[pid], side, L) for side in ("prompt", "response") for L in (1, 3))

    s, got = run("resp", response_only=True)
    for pid, d in got.items():
        assert d["prompt"]["activations"] == {} and d["prompt"]["token_ids"] == ref[pid]["prompt"]["token_ids"]
        assert d["prompt"]["tokens"] == ref[pid]["prompt"]["tokens"] and d["metadata"]["response_only"] is True
        assert all(same(d, ref[pid], "response", L) for L in range(4))

    s, got = run("ids", prompt_ids="10,2")
    assert set(got) == {"2", "10"} and s["captured"] == 2

    s, got = run("limit", limit=3)  # natural order: 1, 2, 3 (not 1, 10, 2)
    assert set(got) == {"1", "2", "3"}

    s, got = run("half", dtype="float16")
    for pid, d in got.items():
        assert d["metadata"]["dtype"] == "float16" and d["metadata"]["compute_dtype"] == "float32"
        for side in ("prompt", "response"):
            for L in range(4):
                t = d[side]["activations"][L]["residual"]
                assert t.dtype == torch.float16
                assert torch.equal(t, ref[pid][side]["activations"][L]["residual"].half())

    s, got = run("mlp", capture_mlp=True, layers="2")
    for d in got.values():
        assert set(d["response"]["activations"][2]) == {"residual", "attn_contribution", "mlp_contribution"}
    # --output-suffix: the unsuffixed output is untouched, the suffixed folder sits beside it
    assert paths.raw_dir("e", "base", "s", "mlp").parent == paths.raw_dir("e", "base", "s").parent
    assert set(p.stem for p in paths.raw_dir("e", "base", "s").glob("*.pt")) == set(recs)


def test_skip_existing_decides_before_loading_and_file_sizes_match_tensor_bytes(zoo, experiments, monkeypatch):
    model_dir = zoo("gpt2")
    experiments("e", {"base": {"model": model_dir}})
    pairs = [(f"a longer prompt about the model and code number {i}", "an answer that is long enough " * 2)
             for i in range(8)]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs)
    summary = capture_raw_activations("e", "s", components="residual,attn_contribution", progress=False)
    total = 0
    for f in summary["files"]:
        d = load_pt(f, mmap=False)
        tensor_bytes = sum(t.numel() * t.element_size() for side in ("prompt", "response")
                           for comps in d[side]["activations"].values() for t in comps.values())
        size = (paths.raw_dir("e", "base", "s") / f.split("/")[-1]).stat().st_size
        # trait-interp saved views of the whole [B, S, H] batch: 8 prompts in a batch would be ~8x this
        assert tensor_bytes <= size <= 1.02 * tensor_bytes + 64 * 1024
        total += size
    assert summary["bytes"] == total

    import inference.capture_raw_activations as cra

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although every file exists")

    real_load = cra.load_variant
    monkeypatch.setattr(cra, "load_variant", no_load)
    again = capture_raw_activations("e", "s", skip_existing=True, progress=False)
    assert (again["captured"], again["skipped"]) == (0, len(recs))
    (paths.raw_file("e", "base", "s", "3")).unlink()
    monkeypatch.setattr(cra, "load_variant", real_load)
    again = capture_raw_activations("e", "s", skip_existing=True, progress=False)
    assert (again["captured"], again["skipped"]) == (1, len(recs) - 1)


# ---------------------------------------------------------------------------------------------------
# Files written the way trait-interp writes them, and what its readers need from ours

def trait_interp_compact_text(obj, indent: int = 0) -> str:
    """JSON text as trait-interp's compact response writer lays it out, its comma bug included (B2 in
    docs/original-bugs.md): objects indented by 2; an array of primitives on one line, made by cutting the
    indented array body at every comma (those inside strings too) and joining the stripped pieces with ", ".
    So the token "," is stored as ", " and "  x  ," as "  x, "."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {trait_interp_compact_text(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if not obj:
            return "[]"
        if any(isinstance(v, (dict, list)) for v in obj):
            return "[\n" + ",\n".join(inner + trait_interp_compact_text(v, indent + 2) for v in obj) + "\n" + pad + "]"
        body = ",\n".join(inner + json.dumps(v) for v in obj)
        if any(c in body for c in "[]{}"):  # its pattern only matches bodies free of brackets: left as indented
            return "[\n" + body + "\n" + pad + "]"
        return "[" + ", ".join(piece.strip() for piece in body.split(",")) + "]"
    return json.dumps(obj)


def test_the_compact_writer_fixture_has_trait_interps_comma_bug():
    text = trait_interp_compact_text({"tokens": ["a", ",", "  x  ,", "b"], "token_ids": [1, 2], "n": {"k": None},
                                      "brackets": ["[", ","]})
    back = json.loads(text)
    assert back["tokens"] == ["a", ", ", "  x, ", "b"] and back["token_ids"] == [1, 2] and back["n"] == {"k": None}
    assert back["brackets"] == ["[", ","]  # not collapsed, so not corrupted
    assert '"token_ids": [1, 2]' in text and text.startswith("{\n  \"tokens\"")


def test_token_strings_come_from_the_ids_not_a_compact_writers_json(zoo, experiments):
    model_dir = zoo("llama")
    experiments("e", {"base": {"model": model_dir}})
    pairs = [("hello , world , again", "yes , sure , fine"), ("no commas here", "none")]
    recs = write_responses("e", "base", "s", model_dir, pairs=pairs)
    tok = load_tokenizer(model_dir)
    comma = tok.convert_tokens_to_ids(",")
    n_commas = sum(rec["token_ids"].count(comma) for rec in recs.values())
    assert n_commas >= 4 and tok.decode([comma]) == ","
    for pid, rec in recs.items():  # rewritten as trait-interp's writer writes them
        paths.response_file("e", "base", "s", pid).write_text(trait_interp_compact_text(rec))
        stored = json.loads(paths.response_file("e", "base", "s", pid).read_text())["tokens"]
        assert stored.count(", ") == rec["token_ids"].count(comma)  # the fixture really is corrupted
    summary = capture_raw_activations("e", "s", progress=False)
    assert summary["tokens_corrected"] == n_commas
    assert f"{n_commas} token strings decoded from the ids differed" in format_summary(summary)
    for pid, rec in recs.items():
        d = load_pt(paths.raw_file("e", "base", "s", pid))
        assert d["prompt"]["tokens"] + d["response"]["tokens"] == decode_tokens(tok, rec["token_ids"])
        assert ", " not in d["prompt"]["tokens"] + d["response"]["tokens"]
    clean = capture_raw_activations("e", "s", output_suffix="again", progress=False, prompt_ids="2")
    assert clean["tokens_corrected"] == 0 and "differed" not in format_summary(clean)


def test_responses_from_writes_the_capturing_variants_missing_response_jsons(zoo, zoo_lora, experiments):
    model_dir, adapter = zoo("llama"), zoo_lora("llama")
    experiments("e", {"base": {"model": model_dir}, "lora": {"model": model_dir, "lora": adapter}})
    recs = write_responses("e", "base", "s", model_dir)
    own = dict(recs["2"], response="lora's own answer", inference_model="mine")  # an existing file is kept
    write_json(paths.response_file("e", "lora", "s", "2"), own)
    summary = capture_raw_activations("e", "s", model_variant="lora", responses_from="base", progress=False)
    assert (summary["responses_written"], summary["responses_from"]) == (len(recs) - 1, "base")
    assert f"wrote {len(recs) - 1} response JSONs replayed from base" in format_summary(summary)
    assert json.loads(paths.response_file("e", "lora", "s", "2").read_text()) == own
    tok = load_tokenizer(model_dir)
    for pid, rec in recs.items():
        if pid == "2":
            continue
        got = json.loads(paths.response_file("e", "lora", "s", pid).read_text())
        assert got["token_ids"] == rec["token_ids"] and got["prompt_end"] == rec["prompt_end"]
        assert got["tokens"] == decode_tokens(tok, rec["token_ids"])
        assert (got["inference_model"], got["responses_from"]) == (model_dir, "base")
        assert (got["prompt"], got["response"], got["prompt_note"]) == (rec["prompt"], rec["response"],
                                                                         rec["prompt_note"])
        assert list(got)[:10] == list(rec)[:10]  # trait-interp's keys, in its order, then ours
    # --skip-existing with every .pt present still writes a JSON that went missing, without loading the model
    paths.response_file("e", "lora", "s", "3").unlink()
    again = capture_raw_activations("e", "s", model_variant="lora", responses_from="base", skip_existing=True,
                                    progress=False)
    assert (again["captured"], again["responses_written"]) == (0, 1)
    assert paths.response_file("e", "lora", "s", "3").exists()
    # without --responses-from nothing is written into the responses folder
    before = sorted(p.name for p in paths.responses_dir("e", "base", "s").iterdir())
    capture_raw_activations("e", "s", output_suffix="plain", progress=False)
    assert sorted(p.name for p in paths.responses_dir("e", "base", "s").iterdir()) == before


def test_trait_dynamics_js_finds_token_data_for_a_responses_from_variant(zoo, experiments):
    """The viewer's Trait Dynamics page (visualization/views/trait-dynamics.js) fetches
    inference/{variant}/responses/{set}/{id}.json for the variant shown, takes `tokens` and `prompt_end`
    (the flat schema) and slices them into prompt and response tokens; without the file it says
    "Missing token data". Read our output exactly that way."""
    model_dir = zoo("qwen2")
    experiments("e", {"a": {"model": model_dir}, "b": {"model": model_dir}})
    write_responses("e", "a", "s", model_dir)
    capture_raw_activations("e", "s", model_variant="b", responses_from="a", progress=False)
    for f in sorted(paths.raw_dir("e", "b", "s").glob("*.pt")):
        response_data = json.loads(paths.response_file("e", "b", "s", f.stem).read_text())  # responseData(...)
        assert isinstance(response_data.get("tokens"), list) and response_data.get("prompt_end") is not None
        end = response_data["prompt_end"]
        prompt = {"text": response_data.get("prompt") or "", "tokens": response_data["tokens"][:end]}
        response = {"text": response_data.get("response") or "", "tokens": response_data["tokens"][end:]}
        d = load_pt(f)
        assert prompt["tokens"] == d["prompt"]["tokens"] and response["tokens"] == d["response"]["tokens"]
        assert prompt["text"] == d["prompt"]["text"] and response["text"] == d["response"]["text"]
