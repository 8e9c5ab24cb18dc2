#!/usr/bin/env python3
"""Stage 1: write one response JSON per prompt: responses/{prompt_set}/{id}.json (DESIGN.md §4).

    generate_responses(experiment, prompt_set, ...) -> summary dict      the whole stage, importable
    main(argv) -> int                                                    the CLI (exit 2 on bad input)
    GenerateError                                                        bad arguments / input files

Mode A (generate): format each prompt (chat template, the set's system prompt, `--prefill` appended), tokenize
once (exactly one BOS), generate in batches (through a running model server when it serves the same model, else
a local model), and write each batch's files as soon as the batch is done. `token_ids` are the prompt ids plus
the ids the model generated (stop and pad removed), never a re-tokenization of the decoded text.

Mode B (import, `--from-responses FILE`): `{prompt_id: response_text}` from elsewhere; the tokenizer only, no
weights. ids = prompt ids + prefill ids + the response text tokenized without special tokens (a trailing eos /
end-of-turn string is stripped first). Ids missing from the file or unknown to the set are listed in the summary.
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from core.generation import GenerationResult, auto_batch_size, generate_in_batches  # noqa: E402
from inference.model_server import TOKEN_ENV, ServerClient, ServerError, default_url, probe_server  # noqa: E402
from utils import paths  # noqa: E402
from utils.config import resolve_variant, use_chat_template  # noqa: E402
from utils.model import (LoadedModel, decode_tokens, format_prompt, load_tokenizer, load_variant,  # noqa: E402
                         resolve_dtype, stop_token_ids, tokenize_continuation, tokenize_prompt)
from utils.prompts import Prompt, PromptSet, load_prompt_set  # noqa: E402
from utils.responses import build_response  # noqa: E402
from utils.storage import StorageError, read_json, write_json  # noqa: E402
from core.errors import TraitError

SERVER_BATCH_SIZE = 32  # prompts per request (and per write) when talking to a server without --batch-size


class GenerateError(TraitError):
    """Bad arguments or input files for generate_responses; the message names the flag or file."""


# ---- argument checks (before anything is loaded or written) ---------------------------------------------------
def _check_args(max_new_tokens, temperature, top_p, seed, batch_size, limit, output_suffix, load_in_8bit,
                load_in_4bit) -> None:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise GenerateError(f"--temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {top_p!r}")
    if seed is not None and not is_int(seed):
        raise GenerateError(f"--seed must be an integer, got {seed!r}")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise GenerateError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if limit is not None and (not is_int(limit) or limit < 0):
        raise GenerateError(f"--limit must be >= 0, got {limit!r}")
    if output_suffix is not None and (not output_suffix or "/" in output_suffix or "\\" in output_suffix
                                      or output_suffix in (".", "..")):
        raise GenerateError(f"--output-suffix {output_suffix!r}: must be a plain name (it becomes '{{set}}_SUFFIX')")
    if load_in_8bit and load_in_4bit:
        raise GenerateError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")


def _read_from_responses(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = read_json(path)
    except StorageError as e:
        raise GenerateError(f"--from-responses {e}") from None
    if not isinstance(data, dict):
        raise GenerateError(f"--from-responses {path}: expected a JSON object {{prompt_id: response_text}}, "
                            f"got a {type(data).__name__}")
    for key, text in data.items():
        if not isinstance(text, str):
            raise GenerateError(f"--from-responses {path}: the value for id {key!r} must be a string, "
                                f"got {type(text).__name__}")
    return data


# ---- prompt formatting -----------------------------------------------------------------------------------------
def format_and_tokenize(tokenizer, prompt: Prompt, system_prompt: str | None, use_template: bool | None,
                        prefill: str | None) -> tuple[str, list[int], str | None]:
    """(prompt text incl. template and prefill, its ids, formatting note). The prefill ids count as prompt."""
    text, note = format_prompt(tokenizer, prompt.text, system_prompt, use_template)
    ids = tokenize_prompt(tokenizer, text) + tokenize_continuation(tokenizer, prefill or "")
    return text + (prefill or ""), ids, note


def row_seed(seed: int, prompt_id: str) -> int:
    """Per-prompt sampling seed: the same prompt and --seed give the same sample in any batch, local or server."""
    return zlib.crc32(f"{seed}:{prompt_id}".encode("utf-8"))


def _stop_strings(tokenizer, model_path: str) -> list[str]:
    """Text forms of the eos / end-of-turn tokens (from the tokenizer and generation_config.json, no weights)."""
    gen = None
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path)
    except Exception:  # no generation_config.json (or offline hub id): the tokenizer's own tokens still count
        pass
    ids = stop_token_ids(tokenizer, generation_config=gen)
    strings = {tokenizer.convert_ids_to_tokens(i) for i in ids} | {tokenizer.eos_token}
    return sorted((s for s in strings if isinstance(s, str) and s), key=len, reverse=True)


def strip_stop_strings(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Remove trailing stop strings (and the whitespace after them); returns (text, what was removed)."""
    out = text
    while True:
        core = out.rstrip()
        hit = next((s for s in stops if core.endswith(s)), None)
        if hit is None:
            break
        out = core[: -len(hit)]
    return out, (text[len(out):] or None)


# ---- backends --------------------------------------------------------------------------------------------------
class _Local:
    name = "local"

    def __init__(self, loaded: LoadedModel, batch_size: int | None):
        self.loaded, self.requested = loaded, batch_size
        tok = loaded.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop_ids = stop_token_ids(tok, loaded.model)
        self.batch_size: int | None = batch_size
        self.model_info = {k: loaded.info.get(k) for k in ("dtype", "quantization")}

    def plan(self, longest: int) -> int:
        if self.batch_size is None:
            self.batch_size = auto_batch_size(self.loaded.model, longest)
        return self.batch_size

    def generate(self, ids, max_new_tokens, temperature, top_p, row_seeds) -> list[GenerationResult]:
        results, self.batch_size = generate_in_batches(
            self.loaded.model, ids, self.batch_size or len(ids), self.pad_id, max_new_tokens, temperature, top_p,
            None, self.stop_ids, row_seeds)
        return results


class _Server:
    name = "server"

    def __init__(self, client: ServerClient, health: dict, batch_size: int | None):
        self.client, self.requested = client, batch_size
        self.batch_size = batch_size or SERVER_BATCH_SIZE
        self.model_info = {k: health.get(k) for k in ("dtype", "quantization")}

    def plan(self, longest: int) -> int:
        return self.batch_size

    def generate(self, ids, max_new_tokens, temperature, top_p, row_seeds) -> list[GenerationResult]:
        out = self.client.generate(ids, max_new_tokens, temperature, top_p, None, row_seeds, None, self.requested)
        return [GenerationResult(list(i), r) for i, r in zip(out["ids"], out["stop_reasons"])]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ---- the stage -------------------------------------------------------------------------------------------------
def generate_responses(experiment: str, prompt_set: str, model_variant: str | None = None, max_new_tokens: int = 50,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       prefill: str | None = None, from_responses: str | Path | None = None,
                       batch_size: int | None = None, limit: int | None = None, skip_existing: bool = False,
                       output_suffix: str | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                       no_server: bool = False, server_url: str | None = None, loaded: LoadedModel | None = None,
                       progress: bool = True) -> dict:
    """Generate (Mode A) or import (Mode B, `from_responses`) the responses of a prompt set; returns a summary.

    Order: check every argument and input file, then load (the server, a local model, or the tokenizer only),
    then write files batch by batch. `loaded` reuses a model already in memory (never the server).
    """
    _check_args(max_new_tokens, temperature, top_p, seed, batch_size, limit, output_suffix, load_in_8bit,
                load_in_4bit)
    variant = resolve_variant(experiment, model_variant)
    pset = load_prompt_set(prompt_set)
    imported = _read_from_responses(from_responses) if from_responses is not None else None
    template = use_chat_template(experiment)
    prompts = pset.prompts[:limit] if limit is not None else list(pset.prompts)
    out_dir = paths.responses_dir(experiment, variant.name, pset.name, output_suffix)
    summary: dict = {
        "mode": "import" if imported is not None else "generate", "experiment": experiment,
        "variant": variant.name, "prompt_set": pset.name, "output_dir": str(out_dir), "total": len(prompts),
        "written": 0, "skipped_existing": 0,
    }
    if imported is not None:
        missing = [p.id for p in prompts if p.id not in imported]
        known = set(pset.ids)
        summary["missing_ids"] = missing
        summary["unknown_ids"] = [k for k in imported if k not in known]
        prompts = [p for p in prompts if p.id in imported]
    todo = prompts
    if skip_existing:
        todo = [p for p in prompts if not paths.response_file(experiment, variant.name, pset.name, p.id,
                                                              output_suffix).exists()]
        summary["skipped_existing"] = len(prompts) - len(todo)
    if imported is not None:
        return _import(experiment, variant, pset, todo, imported, from_responses, prefill, template, output_suffix,
                       loaded, summary, progress)
    if not todo:
        summary["backend"] = None
        return summary

    # ---- pick the backend: a caller's model, a matching server, or a local load --------------------------------
    if temperature > 0 and seed is None:
        seed = secrets.randbelow(2**31)  # recorded in every file, so the run can be repeated
    if loaded is not None:
        backend, why = _Local(loaded, batch_size), "model passed in by the caller"
    else:
        client, why = None, "--no-server"
        if not no_server:
            want = {"model_path": variant.model_path(experiment), "lora_path": variant.lora_path(experiment),
                    "quantization": "8bit" if load_in_8bit else "4bit" if load_in_4bit else None,
                    "dtype": str(resolve_dtype("auto")).replace("torch.", "")}
            client, why = probe_server(server_url or default_url(), want, os.environ.get(TOKEN_ENV) or None)
        if client is not None:
            _log(progress, f"generate: using the {why}")
            tokenizer = load_tokenizer(variant.model_path(experiment))
            backend = _Server(client, client.served, batch_size)
            loaded = LoadedModel(None, tokenizer, {"model": variant.model})
        else:
            _log(progress, f"generate: loading {variant.name} ({variant.model}) locally: {why}")
            loaded = load_variant(experiment, variant.name, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
            backend = _Local(loaded, batch_size)
    summary.update({"backend": backend.name, "backend_reason": why, "seed": seed})
    tok = loaded.tokenizer

    items = []
    for p in todo:
        text, ids, note = format_and_tokenize(tok, p, pset.system_prompt, template, prefill)
        if not ids:  # e.g. an empty prompt, no chat template and a tokenizer without BOS: nothing to continue
            raise GenerateError(f"{pset.path}: prompt {p.id!r} has no tokens to generate from")
        items.append((p, text, ids, note))
    # longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once
    items.sort(key=lambda it: -len(it[2]))
    size = backend.plan(len(items[0][2]) + max_new_tokens)
    stop_counts = {"eos": 0, "length": 0}
    bar = tqdm(total=len(items), unit="prompt", desc=f"generate {pset.name}", disable=not progress, file=sys.stderr)
    try:
        start = 0
        while start < len(items):
            batch = items[start:start + size]
            seeds = [row_seed(seed, p.id) for p, *_ in batch] if temperature > 0 else None
            results = backend.generate([ids for _, _, ids, _ in batch], max_new_tokens, float(temperature),
                                       float(top_p), seeds)
            for (p, text, ids, note), res in zip(batch, results):
                token_ids = ids + res.ids
                record = build_response(
                    prompt=text, response=tok.decode(res.ids, skip_special_tokens=True), token_ids=token_ids,
                    prompt_end=len(ids), tokens=decode_tokens(tok, token_ids), inference_model=variant.model,
                    system_prompt=pset.system_prompt, prompt_note=p.note,
                    generation={"max_new_tokens": max_new_tokens, "temperature": float(temperature),
                                "top_p": float(top_p), "seed": seed, "stop_reason": res.stop_reason,
                                "prefill": prefill or None, "format_note": note, "variant": variant.name,
                                "lora": variant.lora, **backend.model_info})
                write_json(paths.response_file(experiment, variant.name, pset.name, p.id, output_suffix), record)
                stop_counts[res.stop_reason] = stop_counts.get(res.stop_reason, 0) + 1
                summary["written"] += 1
            bar.update(len(batch))
            start += len(batch)
            size = backend.batch_size or size  # an out-of-memory may have lowered it
    finally:
        bar.close()
    summary.update({"batch_size": size, "stop_reasons": stop_counts})
    return summary


def _import(experiment, variant, pset: PromptSet, todo: list[Prompt], imported: dict[str, str], source, prefill,
            template, output_suffix, loaded, summary: dict, progress: bool) -> dict:
    """Mode B: tokenizer only; the response ids are the imported text tokenized without special tokens."""
    summary.update({"backend": "tokenizer", "backend_reason": "--from-responses: no model weights needed"})
    if not todo:
        return summary
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(variant.model_path(experiment))
    stops = _stop_strings(tok, variant.model_path(experiment))
    stripped = 0
    for p in tqdm(todo, unit="prompt", desc=f"import {pset.name}", disable=not progress, file=sys.stderr):
        text, ids, note = format_and_tokenize(tok, p, pset.system_prompt, template, prefill)
        response, removed = strip_stop_strings(imported[p.id], stops)
        stripped += removed is not None
        token_ids = ids + tokenize_continuation(tok, response)
        record = build_response(
            prompt=text, response=response, token_ids=token_ids, prompt_end=len(ids),
            tokens=decode_tokens(tok, token_ids), inference_model=variant.model, system_prompt=pset.system_prompt,
            prompt_note=p.note,
            imported={"from_responses": str(source), "stripped_suffix": removed, "prefill": prefill or None,
                      "format_note": note})
        write_json(paths.response_file(experiment, variant.name, pset.name, p.id, output_suffix), record)
        summary["written"] += 1
    summary["stripped_stop_strings"] = stripped
    return summary


# ---- CLI -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate (or import) one response JSON per prompt of a prompt set: text plus the exact token "
                    "ids, under experiments/E/inference/VARIANT/responses/SET/ID.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set single_trait\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set harmful \\\n"
               "      --model-variant instruct --temperature 0.7 --top-p 0.9 --seed 1 --output-suffix t07\n"
               "  python inference/generate_responses.py --experiment rm_syco --prompt-set rm_syco/train_100 \\\n"
               "      --model-variant rm_lora --from-responses texts.json      # Mode B: tokenizer only\n\n"
               "A model server (inference/model_server.py) at $TRAIT_SERVER_URL (default http://127.0.0.1:8765)\n"
               "is used when it serves the same model and LoRA; otherwise the model is loaded here.")
    p.add_argument("--experiment", required=True, help="experiments/E/config.json names the model variants")
    p.add_argument("--prompt-set", required=True, help="datasets/inference/SET.json (may be nested: a/b)")
    p.add_argument("--model-variant", help="variant to use (default: defaults.application of the config)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed: same seed, same sample per prompt (default: drawn and recorded)")
    p.add_argument("--prefill", default=None, help="text appended after the chat template (part of the prompt)")
    p.add_argument("--from-responses", metavar="FILE", help="Mode B: import {prompt_id: response_text}, no weights")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: automatic)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of the set")
    p.add_argument("--skip-existing", action="store_true", help="keep response files that already exist")
    p.add_argument("--output-suffix", default=None, help="write to responses/SET_SUFFIX instead")
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4) weights")
    p.add_argument("--no-server", action="store_true", help="never use the model server; load the model here")
    p.add_argument("--server-url", default=None, help="model server address (default: $TRAIT_SERVER_URL or "
                                                      "http://127.0.0.1:8765)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    return p


def _summary_line(s: dict) -> str:
    line = (f"{'imported' if s['mode'] == 'import' else 'generated'} {s['written']} of {s['total']} responses "
            f"-> {s['output_dir']} (skipped {s['skipped_existing']} existing")
    if s.get("backend"):
        line += f"; {s['backend']}"
    if s.get("stop_reasons"):
        line += "; stop: " + ", ".join(f"{k} {v}" for k, v in s["stop_reasons"].items())
    if s["mode"] == "import":
        for key, label in (("missing_ids", "missing from the file"), ("unknown_ids", "not in the set")):
            ids = s.get(key) or []
            if ids:
                line += f"; {len(ids)} {label}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}"
    return line + ")"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = generate_responses(
            args.experiment, args.prompt_set, args.model_variant, args.max_new_tokens, args.temperature,
            args.top_p, args.seed, args.prefill, args.from_responses, args.batch_size, args.limit,
            args.skip_existing, args.output_suffix, args.load_in_8bit, args.load_in_4bit, args.no_server,
            args.server_url, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"error: {e} (files written so far are complete; rerun with --skip-existing)", file=sys.stderr)
        return 1
    print(_summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
