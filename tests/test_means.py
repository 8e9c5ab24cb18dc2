"""utils/means.py: the per-prompt means file of the model diff.

    a means record round-trips through write_means / load_means (weights_only) unchanged
    the means of a raw file written by the capture stage (bf16 and fp32) equal an fp64 mean of the stored
        tensors, and exactly the fp32 mean compare_variants takes of the raw file
    build_means with a storage dtype equals means_from_raw of the raw file that stores the same tensors
    malformed files and records are refused with a MeansError naming the file; a refused write writes nothing
"""
from __future__ import annotations

import pytest
import torch

from inference.capture_raw_activations import capture_raw_activations
from utils import paths
from utils.means import (METADATA_KEYS, MeansError, build_means, build_means_from_sequence, fp32_mean, load_means,
                         means_from_raw, validate_means, write_means)
from utils.model import decode_tokens, format_prompt, load_tokenizer, tokenize_continuation, tokenize_prompt
from utils.responses import build_response
from utils.storage import load_pt, write_json

H = 8
META = {"model": "m", "variant": "v", "lora": None, "quantization": None, "compute_dtype": "float32",
        "responses_from": "v", "prompt_id": "1", "prompt_set": "s", "source": "fused"}


def _acts(n: int, layers=(0, 2), comps=("residual", "attn_contribution"), seed=0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    return {layer: {c: scale + torch.randn(n, H, generator=g) for c in comps} for layer in layers}


def test_round_trip(tmp_path):
    acts = _acts(7)
    rec = build_means_from_sequence(acts, 3, token_ids=list(range(100, 107)), metadata=META)
    path = paths.means_file("e", "v", "s/nested", "1")
    assert path == paths.experiment_dir("e") / "inference/v/raw/means/s/nested/1.pt"
    assert paths.means_dir("e", "v", "s", "x") == paths.experiment_dir("e") / "inference/v/raw/means/s_x"
    out = tmp_path / "1.pt"
    assert write_means(out, rec) == out.stat().st_size
    back = load_means(out)
    assert back["token_ids"] == list(range(100, 107)) and back["prompt_end"] == 3
    assert back["prompt"]["n_tokens"] == 3 and back["response"]["n_tokens"] == 4
    assert set(back["metadata"]) >= set(METADATA_KEYS) and back["metadata"]["layers"] == [0, 2]
    assert back["metadata"]["components"] == ["attn_contribution", "residual"]
    assert back["metadata"]["dtype"] == "float32"
    for layer in (0, 2):
        for c in ("residual", "attn_contribution"):
            assert back["response"]["mean"][layer][c].dtype == torch.float32
            want = acts[layer][c][3:].double().mean(0)
            assert torch.allclose(back["response"]["mean"][layer][c].double(), want, rtol=1e-6, atol=0)
            assert torch.allclose(back["prompt"]["mean"][layer][c].double(), acts[layer][c][:3].double().mean(0),
                                  rtol=1e-6, atol=0)
    # the file is plain tensors and builtins: torch.load(weights_only=True) itself reads it
    assert torch.load(out, weights_only=True)["response"]["mean"][2]["residual"].shape == (H,)


def test_empty_response_has_an_empty_mean():
    acts = _acts(3)
    rec = build_means_from_sequence(acts, 3, token_ids=[1, 2, 3], metadata=META)
    assert rec["response"] == {"n_tokens": 0, "mean": {}} and rec["prompt"]["n_tokens"] == 3


def test_storage_dtype_rounds_first_like_a_raw_file(tmp_path):
    """build_means(storage_dtype=bf16) == the fp32 mean of the bf16 tensors a raw file would hold."""
    acts = _acts(40, seed=1, scale=64.0)
    rec = build_means_from_sequence(acts, 10, token_ids=list(range(40)), metadata=META, storage_dtype=torch.bfloat16)
    assert rec["metadata"]["dtype"] == "bfloat16"
    raw = {"prompt": {"token_ids": list(range(10)),
                      "activations": {L: {c: t[:10].to(torch.bfloat16).clone() for c, t in cs.items()}
                                      for L, cs in acts.items()}},
           "response": {"token_ids": list(range(10, 40)),
                        "activations": {L: {c: t[10:].to(torch.bfloat16).clone() for c, t in cs.items()}
                                        for L, cs in acts.items()}},
           "metadata": {"model": "m", "variant": "v", "layers": [0, 2]}}
    torch.save(raw, tmp_path / "raw.pt")
    from_raw = means_from_raw(torch.load(tmp_path / "raw.pt", weights_only=True), prompt_id="1", prompt_set="s")
    assert from_raw["metadata"]["source"] == "capture" and from_raw["metadata"]["dtype"] == "bfloat16"
    for side in ("prompt", "response"):
        for L in (0, 2):
            for c in ("residual", "attn_contribution"):
                assert torch.equal(rec[side]["mean"][L][c], from_raw[side]["mean"][L][c])
    # and not the unrounded mean: bf16 at 64 has a step of 0.25, the rounding is visible in the mean
    assert not torch.equal(rec["response"]["mean"][0]["residual"], acts[0]["residual"][10:].mean(0))


def _write_responses(exp: str, variant: str, pset: str, model_dir: str, pairs) -> dict[str, dict]:
    tok = load_tokenizer(model_dir)
    out = {}
    for i, (prompt, response) in enumerate(pairs, start=1):
        text, note = format_prompt(tok, prompt)
        ids = tokenize_prompt(tok, text)
        end = len(ids)
        ids = ids + tokenize_continuation(tok, response)
        rec = build_response(text, response, ids, end, decode_tokens(tok, ids), model_dir, prompt_note=note)
        write_json(paths.response_file(exp, variant, pset, i), rec)
        out[str(i)] = rec
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_means_of_a_captured_raw_file_equal_the_stored_tensors_mean(dtype, zoo, experiments, tmp_path):
    model_dir = zoo("llama")
    experiments("e", {"base": {"model": model_dir}})
    recs = _write_responses("e", "base", "s", model_dir, [("What is a model?", "I think it is good."),
                                                          ("Why?", "")])
    capture_raw_activations("e", "s", components="residual,mlp_contribution", layers="1,3", dtype=dtype,
                            progress=False)
    for pid, rec in recs.items():
        raw = load_pt(paths.raw_file("e", "base", "s", pid))
        m = means_from_raw(raw, prompt_id=pid, prompt_set="s")
        write_means(paths.means_file("e", "base", "s", pid), m)
        m = load_means(paths.means_file("e", "base", "s", pid))
        assert m["token_ids"] == rec["token_ids"] and m["prompt_end"] == rec["prompt_end"]
        assert m["metadata"]["dtype"] == dtype and m["metadata"]["variant"] == "base"
        assert m["metadata"]["layers"] == [1, 3] and m["metadata"]["prompt_id"] == pid
        for side in ("prompt", "response"):
            acts = raw[side]["activations"]
            n = len(raw[side]["token_ids"])
            assert m[side]["n_tokens"] == n
            if n == 0:
                assert m[side]["mean"] == {}
                continue
            for L in (1, 3):
                for c in ("residual", "mlp_contribution"):
                    stored = acts[L][c]
                    assert str(stored.dtype) == f"torch.{dtype}"
                    got = m[side]["mean"][L][c]
                    assert torch.equal(got, fp32_mean(stored))       # what compare_variants takes of the raw file
                    oracle = stored.double().mean(0)                 # independent: fp64 over the stored values
                    assert torch.allclose(got.double(), oracle, rtol=1e-6, atol=1e-7)


def _good(tmp_path):
    return build_means_from_sequence(_acts(5), 2, token_ids=[1, 2, 3, 4, 5], metadata=META)


@pytest.mark.parametrize("breaks, needle", [
    (lambda r: r.pop("token_ids"), "missing token_ids"),
    (lambda r: r.__setitem__("prompt_end", 9), "prompt_end"),
    (lambda r: r["response"].__setitem__("n_tokens", 2), "response.n_tokens 2"),
    (lambda r: r["response"]["mean"][0].__setitem__("residual", torch.zeros(H, dtype=torch.bfloat16)), "float32"),
    (lambda r: r["response"]["mean"][2].__setitem__("residual", torch.zeros(H + 1)), "hidden size"),
    (lambda r: r["response"]["mean"][0].__setitem__("residual", torch.full((H,), float("nan"))), "non-finite"),
    (lambda r: r["response"]["mean"].pop(2), "metadata.layers"),
    (lambda r: r["prompt"]["mean"][0].pop("attn_contribution"), "components"),
    (lambda r: r["metadata"].pop("variant"), "lacks variant"),
    (lambda r: r["metadata"].__setitem__("source", "guess"), "source"),
    (lambda r: r["response"]["mean"].__setitem__("0", r["response"]["mean"][0]), "int layers"),
])
def test_bad_records_are_refused_and_nothing_is_written(tmp_path, breaks, needle):
    rec = _good(tmp_path)
    breaks(rec)
    path = tmp_path / "m" / "1.pt"
    with pytest.raises(MeansError, match=needle) as e:
        write_means(path, rec)
    assert str(path) in str(e.value)
    assert not path.exists() and not list(tmp_path.rglob("*.tmp"))
    torch.save(rec, tmp_path / "bad.pt")   # the same record written by someone else: refused on load
    with pytest.raises(MeansError, match=needle) as e:
        load_means(tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in str(e.value)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(MeansError, match="garbage.pt"):
        load_means(bad)
    with pytest.raises(MeansError, match="file not found"):
        load_means(tmp_path / "absent.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MeansError, match="list.pt: not a means file"):
        load_means(tmp_path / "list.pt")
    with pytest.raises(MeansError, match="token_ids has 3"):   # activations disagree with the ids
        build_means(_acts(2), _acts(4), token_ids=[1, 2, 3, 4, 5], prompt_end=2, metadata=META)
    assert validate_means(_good(tmp_path), "x")["prompt_end"] == 2
