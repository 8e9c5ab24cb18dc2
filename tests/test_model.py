"""utils/model.py on the zoo: BOS handling, chat formatting, dtype, quantization flags, pad and stop tokens, LoRA."""
from __future__ import annotations

import pytest
import torch

from utils import model as model_utils
from utils.model import (
    ModelLoadError,
    check_single_bos,
    decode_tokens,
    format_prompt,
    load_model,
    load_model_config,
    load_tokenizer,
    load_variant,
    resolve_dtype,
    stop_token_ids,
    tokenize_continuation,
    tokenize_prompt,
)
from utils.zoo import build_tokenizer


@pytest.fixture(scope="module")
def llama(zoo):
    return load_model(zoo("llama"))


# ---------------------------------------------------------------------------------------------------------
# BOS
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_template_prompt_has_exactly_one_bos(zoo, arch):
    tok = load_tokenizer(zoo(arch))
    text, _ = format_prompt(tok, "hello world", system_prompt=None)
    assert text.startswith(tok.bos_token)  # the template emits BOS itself
    ids = tokenize_prompt(tok, text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # the tokenizer alone would add a second one: that is what tokenize_prompt must avoid
    if arch != "gpt2":
        naive = tok(text)["input_ids"]
        assert naive[:2] == [tok.bos_token_id, tok.bos_token_id]
    # the ids decode back to the formatted text
    assert tok.decode(ids) == text


def test_plain_text_gets_the_tokenizers_bos(llama):
    tok = llama.tokenizer
    ids = tokenize_prompt(tok, "hello world")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == "hello world"


def test_double_bos_raises(llama):
    tok = llama.tokenizer
    bos = tok.bos_token_id
    with pytest.raises(ModelLoadError, match="double BOS"):
        tokenize_prompt(tok, tok.bos_token + tok.bos_token + "hello")
    with pytest.raises(ModelLoadError, match="double BOS"):
        check_single_bos(tok, [bos, bos, 7])
    check_single_bos(tok, [bos, 7, bos])  # a BOS later in the text is not a double BOS at the start


def test_continuation_and_decoding(llama):
    tok = llama.tokenizer
    assert tokenize_continuation(tok, "") == []
    ids = tokenize_continuation(tok, "yes, café 🙂")
    assert tok.bos_token_id not in ids
    pieces = decode_tokens(tok, ids)
    assert len(pieces) == len(ids) and tok.decode(ids) == "yes, café 🙂"
    assert decode_tokens(tok, [tok.convert_tokens_to_ids("<|im_end|>")]) == ["<|im_end|>"]  # specials kept


# ---------------------------------------------------------------------------------------------------------
# Chat formatting
# ---------------------------------------------------------------------------------------------------------

def test_system_prompt_gets_its_own_turn_when_the_template_allows(llama):
    text, note = format_prompt(llama.tokenizer, "hi", "be kind")
    assert note is None
    assert text == "<bos><|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gemma2_folds_the_system_prompt_and_says_so(zoo):
    tok = load_tokenizer(zoo("gemma2"))
    with pytest.raises(Exception, match="System role not supported"):  # the template really rejects it
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                tokenize=False)
    text, note = format_prompt(tok, "hi", "be kind")
    assert text == "<bos><|im_start|>user\nbe kind\n\nhi<|im_end|>\n<|im_start|>model\n"
    assert note and "folded into the user turn" in note
    assert format_prompt(tok, "hi") == ("<bos><|im_start|>user\nhi<|im_end|>\n<|im_start|>model\n", None)


def test_format_without_template(llama):
    tok = llama.tokenizer
    assert format_prompt(tok, "hi", use_chat_template=False) == ("hi", None)
    text, note = format_prompt(tok, "hi", "be kind", use_chat_template=False)
    assert text == "be kind\n\nhi" and "prepended" in note
    bare = build_tokenizer()
    bare.chat_template = None
    assert format_prompt(bare, "hi") == ("hi", None)  # auto: no template, plain text
    with pytest.raises(ModelLoadError, match="no chat template"):
        format_prompt(bare, "hi", use_chat_template=True)


# ---------------------------------------------------------------------------------------------------------
# Loading: dtype, quantization flags, errors, LoRA
# ---------------------------------------------------------------------------------------------------------

def test_dtype_auto(monkeypatch, llama):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") is torch.float32 and resolve_dtype(None) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    # the session's real load (no GPU here): fp32 weights, and the info says so
    assert llama.info["dtype"] == "float32" and llama.info["device"] == "cpu"
    assert {p.dtype for p in llama.model.parameters()} == {torch.float32}
    assert llama.info["quantization"] is None and llama.info["lora"] is None


def test_explicit_dtype(zoo):
    lm = load_model(zoo("qwen2"), dtype="bf16")
    assert lm.info["dtype"] == "bfloat16"
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_both_quantization_flags_raise(zoo):
    with pytest.raises(ModelLoadError, match="mutually exclusive"):
        load_model(zoo("llama"), load_in_8bit=True, load_in_4bit=True)


def test_load_errors_name_the_thing(tmp_path, zoo):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "no_such_model"))
    with pytest.raises(ModelLoadError, match="cannot load LoRA adapter"):
        load_model(zoo("llama"), lora=str(tmp_path / "no_such_adapter"))


def test_load_model_config(tmp_path, zoo):
    assert load_model_config(zoo("gpt2")).n_layer == 4
    assert load_model_config(zoo("gemma2")).num_hidden_layers == 4
    with pytest.raises(ModelLoadError, match="cannot load config"):
        load_model_config(str(tmp_path / "nothing"))


def test_pad_token(tmp_path, llama):
    # the zoo pad token has id 0: it must be kept, not mistaken for "missing" (B24, docs/original-bugs.md)
    assert llama.tokenizer.pad_token == "<pad>" and llama.tokenizer.pad_token_id == 0
    assert llama.tokenizer.padding_side == "left"
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path), padding_side="right")
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.padding_side == "right"


def test_stop_token_ids(tmp_path, llama):
    tok = llama.tokenizer
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok, llama.model) == sorted({eos, im_end})
    assert stop_token_ids(tok) == sorted({eos, im_end})  # <|im_end|> is special: found without the model
    # a tokenizer where end-of-turn-looking strings are ORDINARY tokens: never a stop token (B11, docs/original-bugs.md)
    plain = build_tokenizer()
    plain.add_tokens(["</s>", "<|end|>"], special_tokens=False)
    plain.save_pretrained(tmp_path)
    plain = load_tokenizer(str(tmp_path))
    ordinary = {plain.convert_tokens_to_ids(t) for t in ("</s>", "<|end|>", "<")}
    ids = stop_token_ids(plain)
    assert not ordinary & set(ids)
    assert set(plain.convert_ids_to_tokens(ids)) <= set(plain.all_special_tokens)
    assert set(ids) == {plain.eos_token_id, plain.convert_tokens_to_ids("<|im_end|>")}


def test_one_place_reads_generation_config_eos_ids(llama):
    """core.generation.config_stop_ids reads the config; utils.model.stop_token_ids adds the tokenizer's ids."""
    from transformers import GenerationConfig

    from core.generation import config_stop_ids

    tok = llama.tokenizer
    eos, im_end = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    own = llama.model.generation_config.eos_token_id
    assert config_stop_ids(llama.model) == [int(e) for e in (own if isinstance(own, list) else [own])]
    gen = GenerationConfig(eos_token_id=[5, 7])
    assert config_stop_ids(generation_config=gen) == [5, 7]
    assert config_stop_ids(llama.model, generation_config=gen) == [5, 7]  # an explicit config wins
    assert config_stop_ids(generation_config=GenerationConfig(eos_token_id=9)) == [9]
    assert config_stop_ids(None) == [] and config_stop_ids(torch.nn.Linear(2, 2)) == []
    assert stop_token_ids(tok, generation_config=gen) == sorted({5, 7, eos, im_end})
    assert stop_token_ids(tok, llama.model, generation_config=gen) == sorted({5, 7, eos, im_end})


def test_check_sampling_raises_the_callers_error():
    from core.errors import TraitError
    from core.generation import GenerationError, check_sampling

    class Mine(TraitError):
        pass
    check_sampling(1, 0.0, 1.0)
    for args, match in (((0, 0.0, 1.0), "max_new_tokens"), ((True, 0.0, 1.0), "max_new_tokens"),
                        ((5, -0.1, 1.0), "temperature"), ((5, float("inf"), 1.0), "temperature"),
                        ((5, float("nan"), 1.0), "temperature"), ((5, 0.5, 0.0), "top_p"),
                        ((5, 0.5, 1.5), "top_p")):
        with pytest.raises(GenerationError, match=match):
            check_sampling(*args)
        with pytest.raises(Mine, match=match):
            check_sampling(*args, error=Mine)


def test_lora_merge_matches_unmerged(zoo, zoo_lora):
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    peft = load_model(zoo("llama"), lora=zoo_lora("llama"))
    merged = load_model(zoo("llama"), lora=zoo_lora("llama"), merge_lora=True)
    assert merged.info["lora_merged"] and not peft.info["lora_merged"]
    assert not type(merged.model).__name__.startswith("Peft")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, peft.model(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelLoadError, match="merging a LoRA into an 8/4-bit"):
        load_model(zoo("llama"), lora=zoo_lora("llama"), merge_lora=True, load_in_8bit=True)


def test_load_variant(experiments, zoo, zoo_lora):
    experiments("exp", {"base": {"model": zoo("llama")}, "tuned": {"model": zoo("llama"), "lora": zoo_lora("llama")}},
                defaults={"application": "tuned", "extraction": "base"})
    lm = load_variant("exp")
    assert lm.info["variant"] == "tuned" and lm.info["lora"] == zoo_lora("llama")
    assert type(lm.model).__name__.startswith("Peft")
    base = load_variant("exp", role="extraction")
    assert base.info["variant"] == "base" and base.info["lora"] is None
    assert isinstance(model_utils.input_device(base.model), torch.device)
