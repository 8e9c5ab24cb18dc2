"""Tiny random-weight models of real architectures, built offline, for tests, the demo and benchmarks.

    build_model(arch, folder)      -> folder   save_pretrained() a tiny `arch` model + tokenizer into `folder`
    build_tokenizer(chat_style)    -> tokenizer  byte-level BPE trained in memory, bos/eos/pad, chat template
    build_lora_adapter(model_dir, folder, seed) -> folder   a random (non-zero) LoRA adapter for that model
    ARCHS                          the architectures: llama, mistral, qwen2, gemma2, olmo2, phi3, gpt2, mixtral

The folders load through `utils.model.load_model` exactly like a hub id. Everything is seeded, so the
same call gives the same weights. Norm weights and biases are perturbed away from their init values
so that every path of the forward matters to the tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "olmo2", "phi3", "gpt2", "mixtral")

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<unk>"]

# Each template emits BOS itself, as the Llama-3 and Gemma templates do.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma-2 style: no system role (the template raises), turns named user/model.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)

_WORDS = (
    "the a model token refuse help answer question honest deceive agree user assistant please sorry cannot "
    "will would should is are was were be it this that what why how when where who I you we they he she "
    "good bad safe harmful kind polite rude yes no maybe think know believe say tell write code function "
    "return value print hello world story poem about , . ; : ! ? - ( ) \" ' 3.5 42 100 2026 café naïve 日本 🙂"
).split()


def _corpus(n: int = 400) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        k = int(torch.randint(4, 16, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx))
    return lines


def build_tokenizer(chat_style: str = "chatml", add_bos: bool = True, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained in memory, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = GEMMA_TEMPLATE if chat_style == "gemma" else CHATML_TEMPLATE
    return fast


def _config(arch: str, vocab: int, tok):
    import transformers as T

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")], pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return T.LlamaConfig(**common, rms_norm_eps=1e-6)
    if arch == "mistral":
        return T.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return T.Qwen2Config(**common)
    if arch == "gemma2":
        # sliding_window smaller than test prompts, so the local layers really mask.
        return T.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=16, sliding_window=6,
                              query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "olmo2":
        return T.Olmo2Config(**common)
    if arch == "phi3":
        return T.Phi3Config(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if arch == "mixtral":
        return T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    raise ValueError(f"unknown zoo architecture {arch!r}; choose from {', '.join(ARCHS)}")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move norm weights and biases off their init (ones / zeros) so every path matters."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def build_model(arch: str, folder: str | Path, seed: int = 0, num_hidden_layers: int | None = None) -> Path:
    """Build a tiny `arch` model with its tokenizer and save both into `folder` (skips if already built)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    tok = build_tokenizer("gemma" if arch == "gemma2" else "chatml", add_bos=arch != "gpt2")
    config = _config(arch, len(tok), tok)
    if num_hidden_layers is not None:
        setattr(config, "n_layer" if arch == "gpt2" else "num_hidden_layers", num_hidden_layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "zoo.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return folder


def build_lora_adapter(model_dir: str | Path, folder: str | Path, seed: int = 1, r: int = 4) -> Path:
    """A random LoRA adapter (both A and B non-zero, so it changes activations) saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        return folder
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    arch = json.loads((Path(model_dir) / "zoo.json").read_text())["arch"] if (Path(model_dir) / "zoo.json").exists() else ""
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(folder)
    return folder
