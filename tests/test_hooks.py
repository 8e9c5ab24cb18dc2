"""core/hooks.py on every zoo architecture, against oracles that do not go through core/hooks.py.

    capture == HF output_hidden_states; residual identity; components == hand-placed hooks / manual recompute
    stop_after_last: later layers, final norm and lm_head never run
    batched (right / left padding) == one by one at the real tokens
    LoRA (PeftModel) and 8/4-bit (bitsandbytes) loads
    steering: coefficient 0, cached == uncached, positions, first generated token, hook cleanup
    refusal of an architecture whose block does not satisfy the identity
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.hooks import (
    COMPONENTS,
    ActivationCapture,
    HookError,
    SteeringHook,
    SteeringSpec,
    block_sites,
    decoder_layers,
    num_layers,
    run_forward,
    steer,
)
from tests.helpers import mlp_oracle
from utils.model import load_model, tokenize_prompt
from utils.zoo import ARCHS

PROMPTS = ["the model will help you, please", "hi", "why is it good to be kind? I think so"]

# Independent knowledge of each architecture, written from the HF modelling code, not from core/hooks.py:
# the submodule whose output is exactly what the block adds for attention ...
ATTN_ORACLE = {"llama": "self_attn.o_proj", "mistral": "self_attn.o_proj", "qwen2": "self_attn.o_proj",
               "phi3": "self_attn.o_proj", "mixtral": "self_attn.o_proj", "gemma2": "post_attention_layernorm",
               "olmo2": "post_attention_layernorm", "gpt2": "attn.c_proj"}
# ... and the final norm, whose input is the last block's un-normed output.
FINAL_NORM = {arch: "model.norm" for arch in ARCHS} | {"gpt2": "transformer.ln_f"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="session")
def loaded(zoo):
    """loaded(arch) -> LoadedModel (fp32, CPU), loaded once per session. Tests must not modify it."""
    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_model(zoo(arch))
        return cache[arch]
    return get


def ids_of(lm, text: str = PROMPTS[0]) -> torch.Tensor:
    return torch.tensor([tokenize_prompt(lm.tokenizer, text)])


# ---------------------------------------------------------------------------------------------------------
# Capture == HF, identity, components
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_hf_and_components_match_oracles(loaded, arch):
    lm = loaded(arch)
    model = lm.model
    n = num_layers(model)
    layers = decoder_layers(model)
    ids = ids_of(lm)
    assert ids.shape[1] > 6  # longer than gemma2's sliding window, so the local layers really mask

    own: dict = {"attn": {}}
    handles = []
    for L, block in enumerate(layers):
        handles.append(block.get_submodule(ATTN_ORACLE[arch]).register_forward_hook(
            lambda _m, _i, out, L=L: own["attn"].__setitem__(L, out[0] if isinstance(out, tuple) else out)))
    handles.append(model.get_submodule(FINAL_NORM[arch]).register_forward_pre_hook(
        lambda _m, args: own.__setitem__("pre_norm", args[0])))
    try:
        with ActivationCapture(model, range(n), COMPONENTS, stop_after_last=False, capture_embedding=True) as cap:
            out = run_forward(model, input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    acts = cap.activations
    assert len(hs) == n + 1 and sorted(acts) == list(range(n))
    torch.testing.assert_close(cap.embedding, hs[0], rtol=0, atol=0)
    for L in range(n - 1):
        torch.testing.assert_close(acts[L]["residual"], hs[L + 1], rtol=1e-6, atol=1e-7)
    # HF's last hidden state has the final norm applied: compare our last residual with the norm's input,
    # and the norm applied to it with HF's last hidden state.
    last = acts[n - 1]["residual"]
    torch.testing.assert_close(last, own["pre_norm"], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model.get_submodule(FINAL_NORM[arch])(last), hs[n], rtol=1e-5, atol=1e-6)
    assert rel(last, hs[n]) > 0.1  # (the two really differ, so the check above is not vacuous)

    for L in range(n):
        prev = hs[0] if L == 0 else acts[L - 1]["residual"]
        attn, mlp = acts[L]["attn_contribution"], acts[L]["mlp_contribution"]
        assert rel(acts[L]["residual"] - prev, attn + mlp) < 1e-5, f"identity fails at layer {L}"
        torch.testing.assert_close(attn, own["attn"][L], rtol=0, atol=0)
        with torch.no_grad():
            expected_mlp = mlp_oracle(arch, layers[L], prev + attn)
        assert rel(mlp, expected_mlp) < 1e-5, f"mlp_contribution at layer {L}"
        assert attn.norm() > 0 and mlp.norm() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_models_pass_the_identity(zoo, arch):
    """What users run on GPUs: the sites are accepted and the identity holds to bf16 rounding."""
    lm = load_model(zoo(arch), dtype="bf16")
    model = lm.model
    block_sites(model)
    n = num_layers(model)
    with ActivationCapture(model, range(n), COMPONENTS, capture_embedding=True) as cap:
        run_forward(model, input_ids=ids_of(lm))
    for L in range(n):
        a = cap.activations[L]
        assert a["residual"].dtype is torch.bfloat16
        prev = cap.embedding if L == 0 else cap.activations[L - 1]["residual"]
        # measured 2.0e-3 to 2.7e-3: the block rounds its sum once or twice in bf16 (unit roundoff 2**-8 = 3.9e-3)
        assert rel(a["residual"] - prev.float(), a["attn_contribution"].float() + a["mlp_contribution"]) < 8e-3


def test_capture_stops_after_last_layer(loaded):
    lm = loaded("llama")
    model = lm.model
    assert num_layers(model) == 4
    calls = {name: 0 for name in ("layer0", "layer1", "layer2", "layer3", "norm", "lm_head")}
    modules = dict(zip(calls, list(decoder_layers(model)) + [model.model.norm, model.lm_head]))

    def counter(name):
        def fn(*_):
            calls[name] += 1
        return fn
    handles = [m.register_forward_pre_hook(counter(name)) for name, m in modules.items()]
    try:
        with ActivationCapture(model, [1], COMPONENTS) as cap:
            out = run_forward(model, input_ids=ids_of(lm))
    finally:
        for h in handles:
            h.remove()
    assert out is None
    assert calls == {"layer0": 1, "layer1": 1, "layer2": 0, "layer3": 0, "norm": 0, "lm_head": 0}
    with torch.no_grad():
        hs = model(ids_of(lm), output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.activations[1]["residual"], hs[2], rtol=1e-6, atol=1e-7)
    assert set(cap.activations) == {1} and set(cap.activations[1]) == set(COMPONENTS)


def test_plain_forward_inside_a_stopping_capture_returns_normally(loaded):
    """`with ActivationCapture(model, [1]): model(**inputs)` ends the block normally, like baukit's Trace."""
    lm = loaded("llama")
    model = lm.model
    ids = ids_of(lm)
    before = hook_count(model)
    ran = {"layer2": 0}
    h = decoder_layers(model)[2].register_forward_pre_hook(lambda *_: ran.__setitem__("layer2", ran["layer2"] + 1))
    reached = []
    try:
        with ActivationCapture(model, [1], COMPONENTS) as cap:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            reached.append("after the forward")  # not reached: the stop ends the forward and the block
        reached.append("after the block")
    finally:
        h.remove()
    assert reached == ["after the block"] and ran["layer2"] == 0
    assert hook_count(model) == before
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.activations[1]["residual"], hs[2], rtol=1e-6, atol=1e-7)
    a = cap.activations[1]
    assert rel(a["residual"] - hs[1], a["attn_contribution"] + a["mlp_contribution"]) < 1e-5
    # a capture swallows only its own stop: an outer capture's stop passes through an inner one
    with ActivationCapture(model, [1]) as outer:
        with ActivationCapture(model, [0], stop_after_last=False) as inner:
            model(input_ids=ids)
        reached.append("after the inner block")
    assert reached == ["after the block"]
    torch.testing.assert_close(inner.activations[0]["residual"], hs[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(outer.activations[1]["residual"], hs[2], rtol=1e-6, atol=1e-7)
    assert hook_count(model) == before
    # any other exception still propagates
    with pytest.raises(ZeroDivisionError):
        with ActivationCapture(model, [1]):
            1 / 0
    assert hook_count(model) == before


def test_capture_rejects_bad_requests(loaded):
    model = loaded("llama").model
    with pytest.raises(HookError, match="out of range.*4 layers"):
        ActivationCapture(model, [4])
    with pytest.raises(HookError, match="unknown component 'resid'"):
        ActivationCapture(model, [0], ["resid"])
    with pytest.raises(HookError, match="no layers"):
        ActivationCapture(model, [])


# ---------------------------------------------------------------------------------------------------------
# Batched == one by one
# ---------------------------------------------------------------------------------------------------------

def _capture(model, layers, **inputs) -> dict:
    with ActivationCapture(model, layers, COMPONENTS) as cap:
        run_forward(model, **inputs)
    return cap.activations


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_capture_equals_one_by_one(loaded, arch):
    lm = loaded(arch)
    model = lm.model
    pad = lm.tokenizer.pad_token_id
    seqs = [tokenize_prompt(lm.tokenizer, p) for p in PROMPTS]
    lens = [len(s) for s in seqs]
    S = max(lens)
    assert len(set(lens)) == len(lens)
    layers = [1, 3]
    single = [_capture(model, layers, input_ids=torch.tensor([s])) for s in seqs]

    right = torch.tensor([s + [pad] * (S - len(s)) for s in seqs])
    right_mask = (torch.arange(S)[None] < torch.tensor(lens)[:, None]).long()
    left = torch.tensor([[pad] * (S - len(s)) + s for s in seqs])
    left_mask = right_mask.flip(1)
    left_pos = (left_mask.cumsum(1) - 1).clamp(min=0)
    batched = {
        "right": _capture(model, layers, input_ids=right, attention_mask=right_mask),
        "left": _capture(model, layers, input_ids=left, attention_mask=left_mask, position_ids=left_pos),
    }
    for side, acts in batched.items():
        for i, n in enumerate(lens):
            real = slice(0, n) if side == "right" else slice(S - n, S)
            for L in layers:
                for comp in COMPONENTS:
                    got, want = acts[L][comp][i, real], single[i][L][comp][0]
                    assert torch.isfinite(got).all()
                    assert rel(got, want) < 1e-5, f"{side} padding, prompt {i}, layer {L}, {comp}: {rel(got, want)}"


# ---------------------------------------------------------------------------------------------------------
# LoRA and quantized loads
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_lora_capture_equals_peft_hidden_states(loaded, zoo, zoo_lora, arch):
    base = loaded(arch)
    lm = load_model(zoo(arch), lora=zoo_lora(arch))
    assert lm.info["lora"] == zoo_lora(arch)
    model = lm.model
    assert type(model).__name__.startswith("PeftModel")
    n = num_layers(model)
    ids = ids_of(lm)
    with ActivationCapture(model, range(n), COMPONENTS, stop_after_last=False) as cap:
        out = run_forward(model, input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    for L in range(n - 1):
        torch.testing.assert_close(cap.activations[L]["residual"], hs[L + 1], rtol=1e-6, atol=1e-7)
    final_norm = model.get_base_model().get_submodule(FINAL_NORM[arch])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(cap.activations[n - 1]["residual"]), hs[n], rtol=1e-5, atol=1e-6)
    for L in range(n):  # the contributions include the adapter
        prev = hs[0] if L == 0 else cap.activations[L - 1]["residual"]
        a = cap.activations[L]
        assert rel(a["residual"] - prev, a["attn_contribution"] + a["mlp_contribution"]) < 1e-5

    base_acts = _capture(base.model, range(n), input_ids=ids)
    for L in range(n):
        assert rel(cap.activations[L]["residual"], base_acts[L]["residual"]) > 1e-2, f"LoRA had no effect at {L}"


# Measured on the zoo llama (relative error norm of each component, layers 0-3, vs the fp32 model):
#   8-bit (LLM.int8, inputs cast to fp16): residual 0.007-0.015, contributions <= 0.03
#   4-bit (NF4; hidden size 64, so each block of 64 weights shares one scale): residual 0.06-0.19,
#   contributions <= 0.31 -- that much is the weights' rounding: against an fp32 model holding the
#   dequantized NF4 weights (below) the 4-bit capture is within 0.002-0.01.
# Tolerances: about 3x the 8-bit and 2x the 4-bit maxima, so bitsandbytes version noise passes, while a
# wrong tensor fails: for 8-bit, the neighbouring layer is >= 0.5 away; for 4-bit, the dequantized oracle.
QUANT_TOL = {"8bit": {"residual": 0.05, "attn_contribution": 0.08, "mlp_contribution": 0.08},
             "4bit": {"residual": 0.4, "attn_contribution": 0.6, "mlp_contribution": 0.6}}
DEQUANTIZED_TOL = 0.03


def _dequantized_copy(path: str, quantized: nn.Module) -> nn.Module:
    """An fp32 model whose Linear weights are the 4-bit model's weights, dequantized."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    model = load_model(path).model
    qmods = dict(quantized.named_modules())
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(qmods.get(name), bnb.nn.Linear4bit):
                w = qmods[name].weight
                mod.weight.copy_(bnbf.dequantize_4bit(w.data, w.quant_state).reshape(mod.weight.shape))
                n += 1
    assert n == 7 * num_layers(model)  # q k v o gate up down in every block
    return model


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_capture_close_to_fp32(loaded, zoo, quant):
    ref = loaded("llama")
    lm = load_model(zoo("llama"), **{f"load_in_{quant}": True})
    assert lm.info["quantization"] == quant
    model = lm.model
    linear = model.model.layers[0].self_attn.q_proj
    assert type(linear).__module__.startswith("bitsandbytes"), type(linear)
    n = num_layers(model)
    ids = ids_of(lm)
    # dequantize before the first forward: on CPU bitsandbytes may repack the 4-bit weights when first used
    deq = _capture(_dequantized_copy(zoo("llama"), model), range(n), input_ids=ids) if quant == "4bit" else None
    assert block_sites(model).attn == "self_attn"  # the identity check passes on the quantized blocks
    got = _capture(model, range(n), input_ids=ids)
    want = _capture(ref.model, range(n), input_ids=ids)
    for L in range(n):
        for comp in COMPONENTS:
            err = rel(got[L][comp], want[L][comp])
            assert err < QUANT_TOL[quant][comp], f"{quant} layer {L} {comp}: {err:.3f}"
            if deq is not None:
                assert rel(got[L][comp], deq[L][comp]) < DEQUANTIZED_TOL, f"layer {L} {comp} vs dequantized"
        if L and quant == "8bit":
            assert rel(got[L]["residual"], want[L - 1]["residual"]) > 2 * QUANT_TOL[quant]["residual"]
        if L:  # the identity holds on the quantized model's own numbers
            a = got[L]
            assert rel(a["residual"] - got[L - 1]["residual"], a["attn_contribution"] + a["mlp_contribution"]) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Steering
# ---------------------------------------------------------------------------------------------------------

STEER_LAYER = 1
COEF = 2.0  # residual norms of the zoo models are ~0.2-0.3, so this clearly moves the generation


def unit_vector(hidden: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _generate(model, ids, mask=None, use_cache=True, n_new=6):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, use_cache=use_cache, return_dict_in_generate=True,
                              output_logits=True)


@pytest.mark.parametrize("component", ["residual", "attn_contribution"])
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_zero_coefficient_is_bit_identical(loaded, component, positions):
    lm = loaded("gemma2")
    model = lm.model
    ids = ids_of(lm)
    v = unit_vector(model.config.hidden_size)
    with torch.no_grad():
        plain = model(ids).logits
        with SteeringHook(model, v, STEER_LAYER, 0.0, component=component, positions=positions, prompt_len=5):
            zero = model(ids).logits
        with SteeringHook(model, v, STEER_LAYER, COEF, component=component, positions=positions, prompt_len=5):
            steered = model(ids).logits
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, steered)  # positions "response" with prompt_len=5 steers the tail


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_cached_and_uncached_steered_generation_match(loaded, arch, positions):
    lm = loaded(arch)
    model = lm.model
    pad = lm.tokenizer.pad_token_id
    seqs = [tokenize_prompt(lm.tokenizer, p) for p in PROMPTS[:2]]
    S = max(map(len, seqs))
    ids = torch.tensor([[pad] * (S - len(s)) + s for s in seqs])  # left padding, as generation does
    mask = torch.tensor([[0] * (S - len(s)) + [1] * len(s) for s in seqs])
    spec = SteeringSpec(unit_vector(model.config.hidden_size), STEER_LAYER, COEF, positions=positions)
    plain = _generate(model, ids, mask).sequences
    before = hook_count(model)  # HF itself keeps output-recording hooks on the layers
    with steer(model, [spec]):
        cached = _generate(model, ids, mask, use_cache=True).sequences
    with steer(model, [spec]):
        uncached = _generate(model, ids, mask, use_cache=False).sequences
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "steering did not change the generation: the test would prove nothing"
    assert hook_count(model) == before


def _collect_residuals(model, layers, fn) -> tuple[dict, object]:
    """Run fn() while capturing `layers` on every forward (cached generation: one piece per step)."""
    pieces: dict[int, list] = {L: [] for L in layers}

    def keep(layer, _comp, t):
        pieces[layer].append(t.clone())
        return None
    with ActivationCapture(model, layers, ["residual"], stop_after_last=False, on_capture=keep):
        result = fn()
    return pieces, result


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_positions_steer_exactly_what_they_say(loaded, positions, use_cache):
    lm = loaded("llama")
    model = lm.model
    ids = ids_of(lm)
    P, n_new = ids.shape[1], 5
    v = unit_vector(model.config.hidden_size)
    layers = [STEER_LAYER, 3]
    with SteeringHook(model, v, STEER_LAYER, COEF, positions=positions):
        # entered after the steering hook, so the capture at STEER_LAYER sees the steered output
        pieces, out = _collect_residuals(model, layers, lambda: _generate(model, ids, use_cache=use_cache,
                                                                          n_new=n_new))
    seq = out.sequences  # [1, P + n_new]; the last token is never fed back
    if use_cache:
        assert [p.shape[1] for p in pieces[STEER_LAYER]] == [P] + [1] * (n_new - 1)
        steered = {L: torch.cat(pieces[L], dim=1) for L in layers}
    else:
        steered = {L: pieces[L][-1] for L in layers}
    assert steered[STEER_LAYER].shape[1] == P + n_new - 1
    plain = _capture(model, layers, input_ids=seq[:, :-1])  # unsteered forward on the same tokens

    is_prompt = torch.arange(P + n_new - 1) < P
    where = {"all": torch.ones_like(is_prompt), "prompt": is_prompt, "response": ~is_prompt}[positions]
    # At the steered layer the block's own output is unchanged (its input is upstream), so the
    # difference is exactly COEF * v where steered and exactly 0 elsewhere.
    diff = (steered[STEER_LAYER] - plain[STEER_LAYER]["residual"])[0]
    expected = where[:, None].float() * (COEF * v)
    torch.testing.assert_close(diff, expected, rtol=0, atol=1e-4)
    # Downstream, steering only the response leaves the prompt untouched (causal attention).
    down = (steered[3] - plain[3]["residual"])[0].norm(dim=-1)
    if positions == "response":
        assert down[is_prompt].max() < 1e-4
    assert down[where].min() > 0.1


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_first_generated_token_steering(loaded, positions):
    """The first token comes from the prompt forward: steered for all/prompt, not for response."""
    lm = loaded("llama")
    model = lm.model
    ids = ids_of(lm)
    v = unit_vector(model.config.hidden_size)
    plain = _generate(model, ids, n_new=2).logits[0]
    with SteeringHook(model, v, STEER_LAYER, COEF, positions=positions):
        steered = _generate(model, ids, n_new=2).logits[0]
    if positions == "response":
        torch.testing.assert_close(steered, plain, rtol=0, atol=0)
    else:
        assert (steered - plain).abs().max() > 1e-2


def test_observers_see_the_steered_output_whatever_the_order(loaded):
    """A capture entered before the steering hook, and HF's own hidden states, both see the steered residual."""
    lm = loaded("qwen2")
    model = lm.model
    ids = ids_of(lm)
    v = unit_vector(model.config.hidden_size)
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True).hidden_states
    with ActivationCapture(model, [STEER_LAYER], ["residual"], stop_after_last=False) as cap:
        with SteeringHook(model, v, STEER_LAYER, COEF):
            steered = run_forward(model, input_ids=ids, output_hidden_states=True).hidden_states
    expected = plain[STEER_LAYER + 1] + COEF * v
    torch.testing.assert_close(cap.activations[STEER_LAYER]["residual"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(steered[STEER_LAYER + 1], expected, rtol=0, atol=1e-5)


def test_response_steering_follows_each_prompt_in_one_context(loaded):
    """Two generations with different prompt lengths inside one context: each prompt stays unsteered."""
    lm = loaded("llama")
    model = lm.model
    short, long_ = ids_of(lm, PROMPTS[1]), ids_of(lm, PROMPTS[2])
    assert short.shape[1] < long_.shape[1]
    v = unit_vector(model.config.hidden_size)
    for use_cache in (True, False):
        plain = _generate(model, long_, n_new=2, use_cache=use_cache).logits[0]
        with SteeringHook(model, v, STEER_LAYER, COEF, positions="response"):
            _generate(model, short, n_new=3, use_cache=use_cache)
            steered = _generate(model, long_, n_new=2, use_cache=use_cache).logits[0]
        torch.testing.assert_close(steered, plain, rtol=0, atol=0)


def test_hooks_removed_after_exceptions(loaded):
    lm = loaded("llama")
    model = lm.model
    before = hook_count(model)
    v = unit_vector(model.config.hidden_size)
    specs = [SteeringSpec(v, 0, 1.0), SteeringSpec(v, 2, 1.0, component="mlp_contribution", positions="prompt")]
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, specs):
            assert hook_count(model) == before + 2
            raise RuntimeError("boom")
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with SteeringHook(model, v, 1, 1.0):
            raise RuntimeError("boom")
    assert hook_count(model) == before

    def explode(*_):
        raise RuntimeError("boom in a hook")
    with pytest.raises(RuntimeError, match="boom in a hook"):  # an exception from inside generate
        with steer(model, specs), ActivationCapture(model, [1, 3], COMPONENTS, on_capture=explode,
                                                    capture_embedding=True):
            _generate(model, ids_of(lm))
    assert hook_count(model) == before


def test_steering_rejects_bad_requests(loaded):
    model = loaded("llama").model
    with pytest.raises(HookError, match="1-D"):
        SteeringHook(model, torch.zeros(2, 64), 0)
    with pytest.raises(HookError, match="positions"):
        SteeringHook(model, torch.zeros(64), 0, positions="middle")
    with pytest.raises(HookError, match="out of range"):
        SteeringHook(model, torch.zeros(64), 9)
    # the spec checks itself when built: every caller (steer, streaming, the chat app) gets the same message
    with pytest.raises(HookError, match="positions must be all, prompt or response, got 'middle'"):
        SteeringSpec(torch.zeros(64), 0, positions="middle")
    with pytest.raises(HookError, match="1-D"):
        SteeringSpec(torch.zeros(2, 64), 0)
    with pytest.raises(HookError, match="1-D"):
        SteeringSpec([0.0] * 64, 0)
    with pytest.raises(HookError, match="unknown component 'resid'"):
        SteeringSpec(torch.zeros(64), 0, component="resid")
    assert SteeringSpec(torch.zeros(64), 0, positions="prompt").positions == "prompt"


# ---------------------------------------------------------------------------------------------------------
# Refusing architectures where the identity fails
# ---------------------------------------------------------------------------------------------------------

def test_patched_layer_breaking_the_identity_is_refused(zoo):
    model = load_model(zoo("llama")).model
    hooks_before = hook_count(model)
    block = decoder_layers(model)[2]  # not layer 0: every layer is checked
    original = block.forward

    def forward(hidden_states, *args, **kwargs):
        return original(hidden_states, *args, **kwargs) + 0.5 * hidden_states  # an extra, unhooked term
    block.forward = forward
    with pytest.raises(HookError) as err:
        block_sites(model)
    msg = str(err.value)
    assert "unsupported architecture LlamaDecoderLayer" in msg and "layer 2" in msg
    assert "residual update" in msg
    with pytest.raises(HookError, match="unsupported architecture"):
        ActivationCapture(model, [1], ["attn_contribution"])
    assert hook_count(model) == hooks_before  # the failed check left no hooks behind
    # the residual itself needs no sites and is still captured
    with ActivationCapture(model, [3], ["residual"]) as cap:
        run_forward(model, input_ids=torch.tensor([[1, 5, 9]]))
    assert cap.activations[3]["residual"].shape == (1, 3, 64)


class _Block(nn.Module):
    def __init__(self, extra: bool):
        super().__init__()
        self.self_attn, self.mlp, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.extra = extra

    def forward(self, hidden_states):
        h = hidden_states
        out = h + self.self_attn(self.norm(h)) + self.mlp(self.norm(h))
        return out + h.tanh() if self.extra else out


class _TinyLM(nn.Module):
    def __init__(self, extra: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_Block(extra) for _ in range(2))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


def test_custom_block_refused_unless_identity_holds():
    good = _TinyLM(extra=False)
    assert block_sites(good).attn == "self_attn" and block_sites(good).mlp == "mlp"
    with pytest.raises(HookError, match=r"unsupported architecture _Block.*layer 0.*residual update"):
        block_sites(_TinyLM(extra=True))


class _OtherBlock(nn.Module):
    """A pre-norm block whose children no built-in rule names (InternLM-like: attention / feed_forward)."""

    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(8), nn.LayerNorm(8)
        self.attention = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.feed_forward = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, hidden_states):
        h = hidden_states + self.attention(self.attention_norm(hidden_states))
        return h + self.feed_forward(self.ffn_norm(h))


class _OtherLM(nn.Module):
    """Returns every hidden state itself: the oracle for what a capture must see."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_OtherBlock() for _ in range(3))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        hs = [self.embed(input_ids)]
        for block in self.layers:
            hs.append(block(hs[-1]))
        return hs


def test_registered_site_rule_is_used_for_a_custom_block_and_still_checked(monkeypatch):
    import core.hooks as hooks

    monkeypatch.setattr(hooks, "_registered_rules", [])  # the registry is global: leave it as found
    ids = torch.tensor([[1, 4, 9, 2, 7]])
    with pytest.raises(HookError, match=r"unsupported architecture _OtherBlock.*register_site_rule"):
        block_sites(_OtherLM())
    with pytest.raises(HookError, match="unsupported architecture"):
        ActivationCapture(_OtherLM(), [1], COMPONENTS)

    # a rule naming the wrong modules (the norms, whose outputs are not what the block adds) is refused
    wrong = hooks.register_site_rule(hooks.SiteRule("norms, wrongly", attn="attention_norm", mlp="ffn_norm"))
    assert hooks.site_rules()[0] is wrong
    with pytest.raises(HookError, match=r"norms, wrongly: layer 0: .*residual update"):
        block_sites(_OtherLM())
    # a rule with a module that does not exist is skipped, not used
    hooks.register_site_rule(hooks.SiteRule("absent", attn="attention", mlp="mlp"))
    with pytest.raises(HookError, match="unsupported architecture"):
        block_sites(_OtherLM())

    rule = hooks.register_site_rule(hooks.SiteRule("InternLM-style", attn="attention", mlp="feed_forward"))
    model = _OtherLM()
    sites = block_sites(model)
    assert (sites.rule, sites.attn, sites.mlp) == ("InternLM-style", "attention", "feed_forward")
    assert hooks.hook_sites(model)["attn_contribution"] == "layers.{L}.attention"
    with torch.no_grad():
        hs = model(ids)
        with ActivationCapture(model, range(3), COMPONENTS) as cap:
            model(ids)
    for L, block in enumerate(model.layers):
        a = cap.activations[L]
        torch.testing.assert_close(a["residual"], hs[L + 1], rtol=0, atol=0)
        with torch.no_grad():
            attn = block.attention(block.attention_norm(hs[L]))
            mlp = block.feed_forward(block.ffn_norm(hs[L] + attn))
        torch.testing.assert_close(a["attn_contribution"], attn, rtol=0, atol=0)
        torch.testing.assert_close(a["mlp_contribution"], mlp, rtol=0, atol=0)
        assert rel(a["residual"] - hs[L], attn + mlp) < 1e-6
    # dotted paths reach deeper modules; the identity still decides (the inner Linear is not the whole add)
    hooks.register_site_rule(hooks.SiteRule("inner linear", attn="attention.0", mlp="feed_forward"))
    assert block_sites(_OtherLM()).rule == "InternLM-style"
    assert rule in hooks.site_rules() and hooks.site_rules()[-len(hooks.SITE_RULES):] == hooks.SITE_RULES
    with pytest.raises(HookError, match="SiteRule"):
        hooks.register_site_rule(("x", "attention", "feed_forward"))
    with pytest.raises(HookError, match="mlp must be a non-empty string"):
        hooks.register_site_rule(hooks.SiteRule("x", "attention", ""))


def test_registered_rule_overrides_a_builtin_one(loaded, zoo, monkeypatch):
    import core.hooks as hooks

    monkeypatch.setattr(hooks, "_registered_rules", [])
    hooks.register_site_rule(hooks.SiteRule("mine: o_proj", attn="self_attn.o_proj", mlp="mlp"))
    model = load_model(zoo("llama")).model  # a fresh model: block_sites caches per model
    assert block_sites(model).rule == "mine: o_proj"
    ids = ids_of(loaded("llama"))
    with ActivationCapture(model, [2], COMPONENTS) as cap:
        model(input_ids=ids)
    plain = _capture(loaded("llama").model, [2], input_ids=ids)  # the built-in rule on the same weights
    for comp in COMPONENTS:
        torch.testing.assert_close(cap.activations[2][comp], plain[2][comp], rtol=0, atol=0)


def test_cached_block_sites_adds_no_state(zoo, zoo_lora):
    for lora in (None, zoo_lora("gemma2")):
        model = load_model(zoo("gemma2"), lora=lora).model
        keys = list(model.state_dict())
        sites = block_sites(model)
        assert block_sites(model) is sites  # cached
        assert list(model.state_dict()) == keys
        assert sites.rule.startswith("post-norm")
