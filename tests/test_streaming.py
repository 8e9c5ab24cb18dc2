"""core/streaming.py: streamed tokens and per-token trait scores against independent oracles.

Oracles: the offline pipeline on the streamed ids (capture_raw_activations + project_raw_activations_onto_traits),
HF greedy `generate` (with SteeringHook for steered runs), HF `output_hidden_states`, core.generation.generate_batch
for seeded sampling, and the linear identity of steering at its own layer.
"""
from __future__ import annotations

import pytest
import torch

from core.generation import generate_batch
from core.hooks import SteeringHook, SteeringSpec
from core.streaming import StreamError, stream_with_scores
from tests.helpers import TRAITS, write_vectors
from utils import paths
from utils.model import decode_tokens, format_prompt, load_model, stop_token_ids, tokenize_prompt
from utils.responses import build_response
from utils.storage import read_json, write_json

HIDDEN = 64
@pytest.fixture(scope="module")
def models(zoo):
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(zoo(arch))
        return cache[arch]
    return get


def prompt_ids(lm, text: str = "hello world, tell me about the model") -> list[int]:
    formatted, _ = format_prompt(lm.tokenizer, text)
    return tokenize_prompt(lm.tokenizer, formatted)


def hf_greedy(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    return new if cut is None else new[:cut]


def split(msgs: list[dict]) -> tuple[dict, list[dict], dict]:
    assert msgs[0]["type"] == "prompt" and msgs[-1]["type"] == "done"
    assert all(m["type"] == "token" for m in msgs[1:-1])
    return msgs[0], msgs[1:-1], msgs[-1]


def series(prompt: dict, tokens: list[dict], trait: str, layer: int) -> list[float]:
    return prompt["scores"][trait][layer] + [t["scores"][trait][layer] for t in tokens]


def close(a, b, rtol: float = 1e-4) -> None:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


# ---------------------------------------------------------------------------------------------------
# The offline convention: streamed scores == capture + projection of the same ids

@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_stream_equals_offline_capture_and_projection(arch, zoo, models, experiments):
    from inference.capture_raw_activations import capture_raw_activations
    from inference.project_raw_activations_onto_traits import project_raw_activations_onto_traits

    experiments("live", {"base": {"model": zoo(arch)}})
    vectors = write_vectors("live")
    lm = models(arch)
    text, _ = format_prompt(lm.tokenizer, "hello world, tell me about the model")
    ids = tokenize_prompt(lm.tokenizer, text)
    stops = stop_token_ids(lm.tokenizer, lm.model)
    msgs = list(stream_with_scores(lm.model, ids, vectors, 10, stop_ids=stops, tokenizer=lm.tokenizer))
    prompt, tokens, done = split(msgs)
    gen = [t["token_id"] for t in tokens]
    assert gen and done["token_ids"] == gen and done["n_tokens"] == len(gen)
    assert [t["step"] for t in tokens] == list(range(len(gen)))
    assert prompt["token_ids"] == ids and prompt["tokens"] == decode_tokens(lm.tokenizer, ids)
    assert [t["token"] for t in tokens] == decode_tokens(lm.tokenizer, gen)
    assert gen == hf_greedy(lm.model, ids, 10, stops)       # streamed ids == HF greedy generate

    # the response JSON built from the streamed ids, then the offline stages on it
    full = ids + gen
    record = build_response(prompt=text, response=lm.tokenizer.decode(gen, skip_special_tokens=True), token_ids=full,
                            prompt_end=len(ids), tokens=decode_tokens(lm.tokenizer, full), inference_model=zoo(arch))
    write_json(paths.response_file("live", "base", "chat", "0"), record)
    capture_raw_activations("live", "chat", layers="all", loaded=lm, progress=False)
    project_raw_activations_onto_traits("live", prompt_set="chat", layers="1,2,3", no_calibration=True, progress=False)
    compared = 0
    for trait in TRAITS:
        proj = read_json(paths.projection_file("live", "base", trait, "chat", "0"))
        for entry in proj["projections"]:
            layer = entry["layer"]
            assert len(entry["prompt"]) == len(ids) and len(entry["response"]) == len(gen)
            close(series(prompt, tokens, trait, layer), entry["prompt"] + entry["response"])
            compared += 1
    assert compared == 6


def test_scores_and_activations_equal_hf_hidden_states(models):
    lm = models("llama")
    g = torch.Generator().manual_seed(3)
    vectors = {"a/x": {0: torch.randn(HIDDEN, generator=g), 2: torch.randn(HIDDEN, generator=g)}}
    ids = prompt_ids(lm)
    msgs = list(stream_with_scores(lm.model, ids, vectors, 5, stop_ids=[], return_activations=True))
    prompt, tokens, done = split(msgs)
    assert done["stop_reason"] == "length" and len(tokens) == 5
    full = ids + done["token_ids"]
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([full]), output_hidden_states=True).hidden_states
    for layer, v in vectors["a/x"].items():
        ref = hs[layer + 1][0]                                          # output of block `layer`
        got = torch.cat([prompt["activations"][layer]] + [t["activations"][layer][None] for t in tokens])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        close(series(prompt, tokens, "a/x", layer), (ref @ (v / v.norm())).tolist())   # not normalised by caller


@pytest.mark.parametrize("prompt_len", [1, 12])
def test_one_matmul_scores_equal_each_vector_projected_alone(models, prompt_len):
    """Traits sharing layers, a trait at several layers in no order: every (trait, layer) pair, prompt (projected
    per layer as produced; a one-token prompt takes the stacked path) and tokens (stacked, one matmul), equals
    its own residual dotted with its own unit vector, in the order the caller gave."""
    lm = models("gemma2")
    g = torch.Generator().manual_seed(13)
    # layers 0-2 of 4: HF's last hidden state is after the final norm, not block 3's output
    vectors = {"c/z": {2: torch.randn(HIDDEN, generator=g), 0: torch.randn(HIDDEN, generator=g)},
               "a/x": {1: torch.randn(HIDDEN, generator=g), 0: torch.randn(HIDDEN, generator=g),
                       2: torch.randn(HIDDEN, generator=g)},
               "b/y": {2: 5.0 * torch.randn(HIDDEN, generator=g)}}
    ids = prompt_ids(lm)[:prompt_len]
    prompt, tokens, done = split(list(stream_with_scores(lm.model, ids, vectors, 5, stop_ids=[])))
    assert list(prompt["scores"]) == list(vectors) and all(list(t["scores"]) == list(vectors) for t in tokens)
    assert all(list(prompt["scores"][t]) == list(vectors[t]) for t in vectors)
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([ids + done["token_ids"]]), output_hidden_states=True).hidden_states
    for trait, per_layer in vectors.items():
        for layer, v in per_layer.items():
            ref = (hs[layer + 1][0].double() @ (v / v.norm()).double()).tolist()
            assert len(prompt["scores"][trait][layer]) == len(ids)
            close(series(prompt, tokens, trait, layer), ref)


# ---------------------------------------------------------------------------------------------------
# Stopping

def test_stops_at_end_of_turn_token(zoo, tmp_path):
    """A copy of the model whose <|im_end|> unembedding row is scaled up until greedy decoding ends a turn."""
    lm = load_model(zoo("llama"))
    tok = lm.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    stops = stop_token_ids(tok, lm.model)
    assert im_end in stops and tok.convert_tokens_to_ids("<") not in stops   # never an ordinary piece
    ids = prompt_ids(lm)
    row = lm.model.lm_head.weight[im_end].detach().clone()
    hf = None
    for scale in torch.arange(1.1, 4.0, 0.1).tolist():
        with torch.no_grad():
            lm.model.lm_head.weight[im_end] = scale * row
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        if im_end in out and out.index(im_end) >= 1:
            hf = out[:out.index(im_end)]
            break
    assert hf is not None, "no scale made <|im_end|> the greedy choice after a few tokens"
    prompt, tokens, done = split(list(stream_with_scores(lm.model, ids, {}, 12, stop_ids=stops, tokenizer=tok)))
    assert done["stop_reason"] == "eos" and done["stop_token_id"] == im_end
    assert [t["token_id"] for t in tokens] == hf and im_end not in done["token_ids"]
    assert prompt["scores"] == {} and all(t["scores"] == {} for t in tokens)
    # the same model without stop ids keeps going past <|im_end|> up to max_new_tokens
    *_, done2 = stream_with_scores(lm.model, ids, {}, 12, stop_ids=[])
    assert done2["stop_reason"] == "length" and done2["token_ids"][len(hf)] == im_end


# ---------------------------------------------------------------------------------------------------
# Steering

def test_zero_coefficient_steer_is_identical(models):
    lm = models("gemma2")
    g = torch.Generator().manual_seed(5)
    vectors = {"a/x": {1: torch.randn(HIDDEN, generator=g), 3: torch.randn(HIDDEN, generator=g)}}
    ids = prompt_ids(lm)
    plain = list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=[]))
    specs = [SteeringSpec(torch.randn(HIDDEN, generator=g), layer, 0.0, positions=pos)
             for layer, pos in ((0, "all"), (1, "prompt"), (2, "response"))]
    steered = list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=[], steering=specs))
    for a, b in zip(plain, steered):
        a.pop("seconds", None), b.pop("seconds", None)
    assert steered == plain


@pytest.mark.parametrize("positions", ["prompt", "all"])
def test_prompt_steer_changes_prompt_scores(models, positions):
    lm = models("llama")
    g = torch.Generator().manual_seed(7)
    u = torch.randn(HIDDEN, generator=g)
    vectors = {"a/x": {0: torch.randn(HIDDEN, generator=g), 1: u, 3: torch.randn(HIDDEN, generator=g)}}
    steer_v, coef = torch.randn(HIDDEN, generator=g), 4.0
    ids = prompt_ids(lm)
    stops = stop_token_ids(lm.tokenizer, lm.model)
    p0, t0, _ = split(list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=stops)))
    spec = SteeringSpec(steer_v, 1, coef, positions=positions)
    p1, t1, _ = split(list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=stops, steering=[spec])))
    # below the steered block nothing changes; at it, each prompt score moves by coef * <v, u/|u|> exactly
    assert p1["scores"]["a/x"][0] == p0["scores"]["a/x"][0]
    shift = coef * float(steer_v @ (u / u.norm()))
    close(p1["scores"]["a/x"][1], [s + shift for s in p0["scores"]["a/x"][1]])
    assert max(abs(a - b) for a, b in zip(p1["scores"]["a/x"][3], p0["scores"]["a/x"][3])) > 1e-3
    # generated ids equal HF generate under the same SteeringHook (the prompt forward steered too)
    with SteeringHook(lm.model, steer_v, 1, coef, positions=positions):
        assert [t["token_id"] for t in t1] == hf_greedy(lm.model, ids, 6, stops)


def test_response_steer_leaves_prompt_and_matches_hf(models):
    lm = models("gemma2")
    g = torch.Generator().manual_seed(9)
    vectors = {"a/x": {2: torch.randn(HIDDEN, generator=g)}}
    steer_v = torch.randn(HIDDEN, generator=g)
    ids = prompt_ids(lm)
    stops = stop_token_ids(lm.tokenizer, lm.model)
    p0, t0, _ = split(list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=stops)))
    spec = SteeringSpec(steer_v, 1, 8.0, positions="response")
    p1, t1, _ = split(list(stream_with_scores(lm.model, ids, vectors, 6, stop_ids=stops, steering=[spec])))
    assert p1["scores"] == p0["scores"] and t1[0]["token_id"] == t0[0]["token_id"]  # token 0 comes from the prompt
    assert t1[0]["scores"] != t0[0]["scores"]                                        # its own residual is steered
    with SteeringHook(lm.model, steer_v, 1, 8.0, positions="response"):
        assert [t["token_id"] for t in t1] == hf_greedy(lm.model, ids, 6, stops)


# ---------------------------------------------------------------------------------------------------
# Sampling, hook hygiene, bad input

def test_seeded_sampling_matches_generate_batch(models):
    lm = models("llama")
    ids = prompt_ids(lm)
    stops = stop_token_ids(lm.tokenizer, lm.model)
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    *_, done = stream_with_scores(lm.model, ids, {}, 10, stop_ids=stops, **kw)
    ref = generate_batch(lm.model, [ids], lm.tokenizer.pad_token_id, 10, stop_ids=stops, **kw)[0]
    assert done["token_ids"] == ref.ids and done["stop_reason"] == ref.stop_reason
    *_, again = stream_with_scores(lm.model, ids, {}, 10, stop_ids=stops, **kw)
    assert again["token_ids"] == done["token_ids"]


def test_nothing_stays_registered_between_tokens(models):
    lm = models("llama")
    model = lm.model
    g = torch.Generator().manual_seed(1)

    def n_hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    stream = stream_with_scores(model, prompt_ids(lm), {"a/x": {1: torch.randn(HIDDEN, generator=g)}}, 4,
                                stop_ids=[], steering=[SteeringSpec(torch.randn(HIDDEN, generator=g), 1, 2.0)])
    for msg in stream:
        assert n_hooks() == before and torch.is_grad_enabled()
        if msg["type"] == "token" and msg["step"] == 1:
            break   # an abandoned stream leaks nothing either
    stream.close()
    assert n_hooks() == before


def test_bad_input_is_a_stream_error(models):
    lm = models("llama")
    ids = prompt_ids(lm)
    ok = {"a/x": {1: torch.ones(HIDDEN)}}
    for kwargs in (dict(prompt_ids=[], vectors=ok, max_new_tokens=4),
                   dict(prompt_ids=ids, vectors=ok, max_new_tokens=0),
                   dict(prompt_ids=ids, vectors={"a/x": {1: torch.ones(HIDDEN + 1)}}, max_new_tokens=4),
                   dict(prompt_ids=ids, vectors={"a/x": {9: torch.ones(HIDDEN)}}, max_new_tokens=4),
                   dict(prompt_ids=ids, vectors=ok, max_new_tokens=4, temperature=-1.0),
                   dict(prompt_ids=ids, vectors=ok, max_new_tokens=4, top_p=0.0),
                   dict(prompt_ids=[10 ** 6], vectors=ok, max_new_tokens=4)):
        with pytest.raises(StreamError):
            next(stream_with_scores(lm.model, **kwargs))
