"""Loading models and tokenizers, chat formatting and tokenization: the only place that loads a model.

    load_model(model, lora=None, dtype="auto", load_in_8bit=False, ...) -> LoadedModel  (hub id or local folder)
    load_variant(exp, variant=None, role="application", ...)           -> LoadedModel  (from config.json)
    load_tokenizer(model)                                               -> tokenizer (pad token set, padding side explicit)
    load_model_config(model)                                            -> HF config without weights (text config if nested)
    format_prompt(tokenizer, prompt, system_prompt, use_chat_template) -> (text, note)  chat template with a system turn
    format_messages(tokenizer, messages, system_prompt, use_chat_template) -> (text, note)  a multi-turn chat
    tokenize_prompt(tokenizer, text)                                    -> list[int] with exactly one BOS
    check_single_bos(tokenizer, ids)                                    raise on a double BOS
    stop_token_ids(tokenizer, model=None, generation_config=None)       -> sorted eos / end-of-turn ids
    LoadedModel                                                         model, tokenizer, info (model, lora, quantization, dtype, device)
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from core.hooks import input_device  # noqa: F401  (re-exported: callers load and place inputs here)
from core.errors import TraitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(TraitError):
    """A model could not be loaded as asked; the message says why."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: dict = field(default_factory=dict)  # model, lora, quantization, dtype, device, variant

    @property
    def device(self) -> torch.device:
        return input_device(self.model)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'auto' (or None): bf16 on CUDA, fp32 on CPU; otherwise a name from DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_tokenizer(model: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load tokenizer for {model!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = padding_side
    return tok


def load_model_config(model: str, trust_remote_code: bool = False):
    """The model's HF config (no weights), e.g. to check --layers before a long load; the text config if nested."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load config for {model!r}: {e}") from e
    return getattr(cfg, "text_config", None) or cfg


def load_model(model: str, lora: str | None = None, dtype: str | torch.dtype | None = "auto",
               load_in_8bit: bool = False, load_in_4bit: bool = False, device_map: str | dict | None = "auto",
               merge_lora: bool = False, attn_implementation: str | None = None,
               trust_remote_code: bool = False, tokenizer=None) -> LoadedModel:
    """Load model + tokenizer like a hub id: dtype, device_map, LoRA (peft) and 8/4-bit (bitsandbytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_8bit and load_in_4bit:
        raise ModelLoadError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    quantization = None
    if load_in_8bit or load_in_4bit:
        quantization = "8bit" if load_in_8bit else "4bit"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
            bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4",
        )
    if torch.cuda.is_available() and device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {model!r}: {e}") from e
    if lora:
        from peft import PeftModel

        try:
            hf_model = PeftModel.from_pretrained(hf_model, lora)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load LoRA adapter {lora!r}: {e}") from e
        if merge_lora:
            if quantization:
                raise ModelLoadError("merging a LoRA into an 8/4-bit model is lossy: load without --merge-lora")
            hf_model = hf_model.merge_and_unload()
    hf_model.eval()
    tok = tokenizer if tokenizer is not None else load_tokenizer(model)  # a caller may have it already
    info = {
        "model": model, "lora": lora, "lora_merged": bool(lora and merge_lora), "quantization": quantization,
        "dtype": str(torch_dtype).replace("torch.", ""), "device": str(input_device(hf_model)),
        "attn_implementation": getattr(getattr(hf_model, "config", None), "_attn_implementation", None),
    }
    return LoadedModel(hf_model, tok, info)


def load_variant(exp: str, variant: str | None = None, role: str = "application", **kwargs) -> LoadedModel:
    """Load an experiment's model variant (config.json `model_variants`), with its LoRA if it has one."""
    from utils.config import resolve_variant

    v = resolve_variant(exp, variant, role)
    loaded = load_model(v.model_path(exp), lora=v.lora_path(exp), **kwargs)
    loaded.info.update({"variant": v.name, "model": v.model, "lora": v.lora})
    return loaded


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None,
                  use_chat_template: bool | None = None) -> tuple[str, str | None]:
    """The text the model sees. Returns (text, note); note says when the system prompt had to be folded or dropped.

    With a template: [system?, user] + generation prompt. A template that rejects the system role
    (Gemma-2) gets the system text folded into the user turn instead.
    """
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    if not use_chat_template:
        if system_prompt:
            return f"{system_prompt}\n\n{prompt}", "no chat template: system prompt prepended to the prompt text"
        return prompt, None
    if not has_chat_template(tokenizer):
        raise ModelLoadError("use_chat_template is true but this tokenizer has no chat template")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    kw = dict(tokenize=False, add_generation_prompt=True)
    try:
        return _apply(tokenizer, messages, kw), None
    except Exception as e:  # jinja TemplateError from raise_exception
        if not system_prompt or "system" not in str(e).lower():
            raise
    folded = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
    return _apply(tokenizer, folded, kw), "chat template rejects a system role: system prompt folded into the user turn"


def format_messages(tokenizer, messages: list[dict], system_prompt: str | None = None,
                    use_chat_template: bool | None = None) -> tuple[str, str | None]:
    """A multi-turn chat ([{role, content}], e.g. the live chat) as the text the model sees, generation prompt added.

    `system_prompt` is prepended as a system turn unless the messages start with one; a template that
    rejects the system role gets it folded into the first user turn (the note says so).
    """
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ModelLoadError("messages must be a non-empty list of {\"role\": str, \"content\": str}")
    if use_chat_template is False or not has_chat_template(tokenizer):
        raise ModelLoadError("messages need a chat template (this model has none or the experiment disables it): "
                             "send a single prompt instead")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    kw = dict(tokenize=False, add_generation_prompt=True)
    try:
        return _apply(tokenizer, msgs, kw), None
    except Exception as e:  # jinja TemplateError from raise_exception
        if msgs[0]["role"] != "system" or "system" not in str(e).lower():
            raise
    system, rest = msgs[0]["content"], msgs[1:]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        raise ModelLoadError("chat template rejects a system role and there is no user turn to fold it into")
    rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
    return _apply(tokenizer, rest, kw), "chat template rejects a system role: system prompt folded into the user turn"


def _apply(tokenizer, messages, kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, enable_thinking=False, **kw)
    except TypeError:
        return tokenizer.apply_chat_template(messages, **kw)


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Token ids with exactly one BOS: special tokens are added only when the text does not already start with BOS."""
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not starts_with_bos)["input_ids"]
    check_single_bos(tokenizer, ids)
    return list(ids)


def tokenize_continuation(tokenizer, text: str) -> list[int]:
    """Ids of text that follows a prompt (a response, a prefill): no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def check_single_bos(tokenizer, ids: list[int]) -> None:
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        raise ModelLoadError(
            "double BOS at the start of the prompt: the chat template emits BOS and the tokenizer added another"
        )


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """One decoded string per id (special tokens kept), as stored in response JSON `tokens`."""
    return [tokenizer.decode([i]) for i in ids]


def stop_token_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """EOS ids of the generation config (`generation_config`, else the model's) plus the tokenizer's eos and
    the end-of-turn tokens that exist as *special* tokens here; sorted, unique."""
    from core.generation import config_stop_ids

    ids = config_stop_ids(model, generation_config)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content if hasattr(t, "content") else str(t)
                for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                if getattr(t, "special", False)}
    for name in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>"):
        if name in special:
            tid = tokenizer.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.append(tid)
    return sorted(set(ids))


warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
# Dependency noise with nothing for a user to act on: peft calls a deprecated transformers helper, and
# bitsandbytes logs at import that an optional CPU kernel package is missing (the built-in kernel is used).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
