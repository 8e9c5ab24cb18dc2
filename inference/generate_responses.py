#!/usr/bin/env python3
"""Stage 1: write one response JSON per prompt: responses/{prompt_set}/{id}.json (docs/formats.md).

    GenerateOptions(experiment, prompt_set, ...)  every setting of a run (the CLI flags); .from_args(namespace)
    plan_generate(opts) -> GeneratePlan            every input checked (flags, experiment, prompt set, ids, the
                                                   imported file); nothing loaded, nothing written
    run_generate(plan, loaded=None) -> dict        load (server, local model or tokenizer), generate or import in
                                                   batches, write each batch's files; the summary
    generate(opts, loaded=None) -> dict            plan + run
    generate_responses(experiment, prompt_set, model_variant=None, loaded=None, **options) -> dict
                                                   the same for keyword callers (options: GenerateOptions' fields)
    format_summary(summary) -> str                 the one line main() prints
    main(argv=None) -> int                         the CLI: python inference/generate_responses.py --help
    GenerateError / GenerateServerError            bad arguments or input files (exit 2) / the server failed (exit 1)

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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from core.errors import TraitError
from core.generation import GenerationResult, auto_batch_size, generate_in_batches
from inference.model_server import TOKEN_ENV, ServerClient, ServerError, default_url, probe_server
from utils import cli, paths
from utils.config import Variant, load_config, resolve_variant, use_chat_template
from utils.model import (LoadedModel, decode_tokens, format_prompt, load_model_config, load_tokenizer, load_variant,
                         resolve_dtype, stop_token_ids, tokenize_continuation, tokenize_prompt)
from utils.prompts import Prompt, PromptSet, PromptSetError, load_prompt_set, parse_prompt_ids
from utils.responses import build_response, replay_note, write_response
from utils.flags import add_generate_flags
from utils.storage import StorageError, add_write_flags, guard_outputs, read_json

SERVER_BATCH_SIZE = 32  # prompts per request (and per write) when talking to a server without --batch-size


class GenerateError(TraitError):
    """Bad arguments or input files for generate_responses; the message names the flag or file."""


class GenerateServerError(GenerateError):
    """The model server failed mid-run; every file written before is complete (rerun with --skip-existing)."""

    exit_code = 1


@dataclass(frozen=True)
class GenerateOptions:
    """What one generate (or import) run is asked to do; the fields are the CLI flags (see build_parser)."""

    experiment: str
    prompt_set: str
    model_variant: str | None = None
    max_new_tokens: int = 50
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prefill: str | None = None
    from_responses: str | Path | None = None
    prompt_ids: str | Sequence[str | int] | None = None
    batch_size: int | None = None
    limit: int | None = None
    skip_existing: bool = False
    overwrite: bool = False
    output_suffix: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    no_server: bool = False
    server_url: str | None = None
    progress: bool = True
    steer: Sequence[str] | None = None        # interventions (core/interventions.py grammar), each repeatable
    cap: Sequence[str] | None = None
    steer_when: Sequence[str] | None = None
    stop_when: Sequence[str] | None = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "GenerateOptions":
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        return cls(**values, progress=not getattr(ns, "no_progress", False))


@dataclass(frozen=True)
class GeneratePlan:
    opts: GenerateOptions
    variant: Variant
    pset: PromptSet
    template: bool | None               # config use_chat_template (None: when the tokenizer has one)
    total: int                          # prompts selected by --prompt-ids / --limit
    todo: list[Prompt]                  # those to write: in the imported file (Mode B), not skipped as existing
    skipped_existing: int
    imported: dict[str, str] | None     # Mode B: {prompt_id: response_text}
    missing_ids: list[str]              # Mode B: selected ids the file lacks
    unknown_ids: list[str]              # Mode B: file ids the set lacks
    seed: int | None                    # --seed, or drawn (and recorded) when sampling without one
    interventions: tuple = ()           # parsed --steer/--cap/--steer-when/--stop-when (vectors resolved at load)

    @property
    def out_dir(self) -> Path:
        return paths.responses_dir(self.opts.experiment, self.variant.name, self.pset.name, self.opts.output_suffix)

    def out_file(self, prompt_id: str) -> Path:
        return paths.response_file(self.opts.experiment, self.variant.name, self.pset.name, prompt_id,
                                   self.opts.output_suffix)


# ---- checking every input before anything is loaded or written ------------------------------------------------
def _check_flags(o: GenerateOptions) -> None:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(o.max_new_tokens) or o.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be a positive integer, got {o.max_new_tokens!r}")
    if not isinstance(o.temperature, (int, float)) or not math.isfinite(o.temperature) or o.temperature < 0:
        raise GenerateError(f"--temperature must be >= 0 (0 = greedy), got {o.temperature!r}")
    if not isinstance(o.top_p, (int, float)) or not 0 < o.top_p <= 1:
        raise GenerateError(f"--top-p must be in (0, 1], got {o.top_p!r}")
    if o.seed is not None and not is_int(o.seed):
        raise GenerateError(f"--seed must be an integer, got {o.seed!r}")
    if o.batch_size is not None and (not is_int(o.batch_size) or o.batch_size < 1):
        raise GenerateError(f"--batch-size must be a positive integer, got {o.batch_size!r}")
    if o.limit is not None and (not is_int(o.limit) or o.limit < 0):
        raise GenerateError(f"--limit must be >= 0, got {o.limit!r}")
    suffix = o.output_suffix
    if suffix is not None and (not suffix or "/" in suffix or "\\" in suffix or suffix in (".", "..")):
        raise GenerateError(f"--output-suffix {suffix!r}: must be a plain name (it becomes '{{set}}_SUFFIX')")
    if o.load_in_8bit and o.load_in_4bit:
        raise GenerateError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")


def _read_from_responses(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = read_json(path)
    except StorageError as e:
        raise GenerateError(f"--from-responses {e}") from e
    if not isinstance(data, dict):
        raise GenerateError(f"--from-responses {path}: expected a JSON object {{prompt_id: response_text}}, "
                            f"got a {type(data).__name__}")
    for key, text in data.items():
        if not isinstance(text, str):
            raise GenerateError(f"--from-responses {path}: the value for id {key!r} must be a string, "
                                f"got {type(text).__name__}")
    return data


def _select(pset: PromptSet, prompt_ids, limit: int | None) -> list[Prompt]:
    """--prompt-ids (a subset, in natural id order), then --limit (the first N)."""
    try:
        prompts = pset.select(parse_prompt_ids(prompt_ids)) if prompt_ids is not None else list(pset.prompts)
    except PromptSetError as e:
        raise GenerateError(str(e)) from e
    return prompts[:limit] if limit is not None else prompts


def _parse_interventions(o: GenerateOptions) -> tuple:
    """--steer / --cap / --steer-when / --stop-when -> Interventions without vectors; the traits must have vectors."""
    from core.interventions import FLAGS, parse_intervention
    from utils.vectors import resolve_vector_source

    parsed = []
    for kind in ("steer", "cap", "steer_when", "stop_when"):
        specs = getattr(o, kind) or []
        if isinstance(specs, str):
            specs = [specs]
        parsed += [parse_intervention(kind, spec) for spec in specs]
    if not parsed:
        return ()
    if o.from_responses is not None:
        raise GenerateError(f"{FLAGS[parsed[0].kind]}: interventions act while generating; --from-responses "
                            f"imports text")
    known = set(resolve_vector_source(o.experiment, require_traits=False).traits)
    for it in parsed:
        if it.trait not in known:
            raise GenerateError(f"{FLAGS[it.kind]} {it.spec()}: no vectors for trait {it.trait!r} in experiment "
                                f"{o.experiment!r} (traits with vectors: {', '.join(sorted(known)) or 'none'})")
    return tuple(parsed)


def resolve_interventions(experiment: str, parsed: Sequence, model=None, config=None) -> list:
    """Each parsed intervention with its trait's unit vector at its layer (the vector choice of the live chat);
    the sizes come from the loaded `model`, or from its `config` when a server generates."""
    from core.hooks import num_layers
    from utils.vectors import resolve_vector_source

    if not parsed:
        return []
    source = resolve_vector_source(experiment, require_traits=False)
    if model is not None:
        hidden, n = int(model.get_input_embeddings().weight.shape[-1]), num_layers(model)
    else:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, n = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    out = []
    for it in parsed:
        if not 0 <= it.layer < n:
            from core.interventions import FLAGS
            raise GenerateError(f"{FLAGS[it.kind]} {it.spec()}: layer {it.layer} is out of range for a model with "
                                f"{n} layers (0-{n - 1})")
        vec = source.select(it.trait, layers=str(it.layer), hidden_size=hidden, n_layers=n)[0]
        out.append(it.with_vector(vec.vector))
    return out


def plan_generate(opts: GenerateOptions) -> GeneratePlan:
    """Check flags, experiment, variant, prompt set, --prompt-ids and the imported file; load and write nothing."""
    _check_flags(opts)
    interventions = _parse_interventions(opts)
    variant = resolve_variant(opts.experiment, opts.model_variant)
    pset = load_prompt_set(opts.prompt_set)
    imported = _read_from_responses(opts.from_responses) if opts.from_responses is not None else None
    template = use_chat_template(opts.experiment)
    selected = _select(pset, opts.prompt_ids, opts.limit)
    missing, unknown, prompts = [], [], selected
    if imported is not None:
        missing = [p.id for p in selected if p.id not in imported]
        known = set(pset.ids)
        unknown = [k for k in imported if k not in known]
        prompts = [p for p in selected if p.id in imported]
    exists = (lambda p: paths.response_file(opts.experiment, variant.name, pset.name, p.id,
                                            opts.output_suffix).exists())
    todo = [p for p in prompts if not (opts.skip_existing and exists(p))]
    out_set = paths.set_dir(pset.name, opts.output_suffix)
    guard_outputs([paths.response_file(opts.experiment, variant.name, pset.name, p.id, opts.output_suffix) for p in todo],
                  overwrite=opts.overwrite, skip_existing=opts.skip_existing,
                  why=lambda existing: replay_note(opts.experiment, variant.name, out_set, existing,
                                                   list(load_config(opts.experiment)["model_variants"])))
    seed = opts.seed
    if opts.temperature > 0 and seed is None and imported is None:
        seed = secrets.randbelow(2**31)  # recorded in every file, so the run can be repeated
    return GeneratePlan(opts, variant, pset, template, len(selected), todo, len(prompts) - len(todo), imported,
                        missing, unknown, seed, interventions)


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

    def __init__(self, loaded: LoadedModel, batch_size: int | None, interventions: Sequence = ()):
        self.loaded, self.requested = loaded, batch_size
        self.interventions = list(interventions)
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
            None, self.stop_ids, row_seeds, self.interventions, self.loaded.tokenizer.all_special_ids)
        return results


class _Server:
    name = "server"

    def __init__(self, client: ServerClient, health: dict, batch_size: int | None, interventions: Sequence = ()):
        self.client, self.requested = client, batch_size
        self.interventions = list(interventions)
        self.batch_size = batch_size or SERVER_BATCH_SIZE
        self.model_info = {k: health.get(k) for k in ("dtype", "quantization")}

    def plan(self, longest: int) -> int:
        return self.batch_size

    def generate(self, ids, max_new_tokens, temperature, top_p, row_seeds) -> list[GenerationResult]:
        try:
            out = self.client.generate(ids, max_new_tokens, temperature, top_p, None, row_seeds, None, self.requested,
                                       self.interventions)
        except ServerError as e:
            raise GenerateServerError(f"{e} (files written so far are complete; rerun with --skip-existing)") from e
        none = [None] * len(out["ids"])
        return [GenerationResult(list(i), r, m, iv) for i, r, m, iv in
                zip(out["ids"], out["stop_reasons"], out.get("monitors", none), out.get("interventions", none))]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _backend(plan: GeneratePlan, loaded: LoadedModel | None) -> tuple[_Local | _Server, str, object]:
    """(backend, why it was chosen, tokenizer): a caller's model, a server serving this variant, or a local load."""
    o, variant, exp = plan.opts, plan.variant, plan.opts.experiment

    def local(lm: LoadedModel) -> _Local:
        return _Local(lm, o.batch_size, resolve_interventions(exp, plan.interventions, lm.model))

    if loaded is not None:
        return local(loaded), "model passed in by the caller", loaded.tokenizer
    client, why = None, "--no-server"
    if not o.no_server:
        want = {"model_path": variant.model_path(exp), "lora_path": variant.lora_path(exp),
                "quantization": "8bit" if o.load_in_8bit else "4bit" if o.load_in_4bit else None,
                "dtype": str(resolve_dtype("auto")).replace("torch.", "")}
        client, why = probe_server(o.server_url or default_url(), want, os.environ.get(TOKEN_ENV) or None)
    if client is not None:
        _log(o.progress, f"generate: using the {why}")
        ivs = resolve_interventions(exp, plan.interventions, config=load_model_config(variant.model_path(exp)))
        return _Server(client, client.served, o.batch_size, ivs), why, load_tokenizer(variant.model_path(exp))
    _log(o.progress, f"generate: loading {variant.name} ({variant.model}) locally: {why}")
    loaded = load_variant(exp, variant.name, load_in_8bit=o.load_in_8bit, load_in_4bit=o.load_in_4bit)
    return local(loaded), why, loaded.tokenizer


# ---- the records written ---------------------------------------------------------------------------------------
def generated_record(plan: GeneratePlan, prompt: Prompt, text: str, ids: list[int], note: str | None,
                     result: GenerationResult, tokenizer, model_info: dict) -> dict:
    """One Mode A response JSON (docs/formats.md): the prompt ids plus the generated ids, and a `generation` block."""
    o = plan.opts
    token_ids = ids + result.ids
    return build_response(
        prompt=text, response=tokenizer.decode(result.ids, skip_special_tokens=True), token_ids=token_ids,
        prompt_end=len(ids), tokens=decode_tokens(tokenizer, token_ids), inference_model=plan.variant.model,
        system_prompt=plan.pset.system_prompt, prompt_note=prompt.note,
        generation={"max_new_tokens": o.max_new_tokens, "temperature": float(o.temperature), "top_p": float(o.top_p),
                    "seed": plan.seed, "stop_reason": result.stop_reason, "prefill": o.prefill or None,
                    "format_note": note, "variant": plan.variant.name, "lora": plan.variant.lora, **model_info,
                    **({"interventions": result.interventions} if result.interventions else {}),
                    **({"monitor": result.monitor} if result.monitor else {})})


def imported_record(plan: GeneratePlan, prompt: Prompt, tokenizer, stops: list[str]) -> dict:
    """One Mode B response JSON: the imported text (trailing stop strings removed) tokenized after the prompt."""
    o = plan.opts
    text, ids, note = format_and_tokenize(tokenizer, prompt, plan.pset.system_prompt, plan.template, o.prefill)
    response, removed = strip_stop_strings(plan.imported[prompt.id], stops)
    token_ids = ids + tokenize_continuation(tokenizer, response)
    return build_response(
        prompt=text, response=response, token_ids=token_ids, prompt_end=len(ids),
        tokens=decode_tokens(tokenizer, token_ids), inference_model=plan.variant.model,
        system_prompt=plan.pset.system_prompt, prompt_note=prompt.note,
        imported={"from_responses": str(o.from_responses), "stripped_suffix": removed, "prefill": o.prefill or None,
                  "format_note": note})


# ---- the stage -------------------------------------------------------------------------------------------------
def _new_summary(plan: GeneratePlan) -> dict:
    summary = {"mode": "import" if plan.imported is not None else "generate", "experiment": plan.opts.experiment,
               "variant": plan.variant.name, "prompt_set": plan.pset.name, "output_dir": str(plan.out_dir),
               "total": plan.total, "written": 0, "skipped_existing": plan.skipped_existing}
    if plan.imported is not None:
        summary.update({"missing_ids": plan.missing_ids, "unknown_ids": plan.unknown_ids})
    return summary


def run_generate(plan: GeneratePlan, loaded: LoadedModel | None = None) -> dict:
    """Mode A or B on plan.todo; `loaded` reuses a model (or, importing, its tokenizer) already in memory.

    Summary keys: mode, experiment, variant, prompt_set, output_dir, total, written, skipped_existing, backend,
    backend_reason; Mode A: seed, batch_size, stop_reasons; Mode B: missing_ids, unknown_ids, stripped_stop_strings.
    """
    summary = _new_summary(plan)
    if plan.imported is not None:
        return _run_import(plan, loaded, summary)
    if not plan.todo:
        summary["backend"] = None
        return summary
    backend, why, tok = _backend(plan, loaded)
    summary.update({"backend": backend.name, "backend_reason": why, "seed": plan.seed})
    items = []
    for p in plan.todo:
        text, ids, note = format_and_tokenize(tok, p, plan.pset.system_prompt, plan.template, plan.opts.prefill)
        if not ids:  # e.g. an empty prompt, no chat template and a tokenizer without BOS: nothing to continue
            raise GenerateError(f"{plan.pset.path}: prompt {p.id!r} has no tokens to generate from")
        items.append((p, text, ids, note))
    # longest first: similar lengths share a batch (less padding) and an out-of-memory shows up at once
    items.sort(key=lambda it: -len(it[2]))
    _generate_loop(plan, backend, tok, items, summary)
    return summary


def _generate_loop(plan: GeneratePlan, backend, tok, items: list, summary: dict) -> None:
    """Batches of prompts through the backend; each batch's files are written as soon as it is done."""
    o = plan.opts
    size = backend.plan(len(items[0][2]) + o.max_new_tokens)
    stop_counts = {"eos": 0, "length": 0}
    norms: dict[str, list[float]] = {}
    with cli.Progress(total=len(items), unit="prompt", desc=f"generate {plan.pset.name}", disable=not o.progress,
              file=sys.stderr) as bar:
        start = 0
        while start < len(items):
            batch = items[start:start + size]
            seeds = [row_seed(plan.seed, p.id) for p, *_ in batch] if o.temperature > 0 else None
            results = backend.generate([ids for _, _, ids, _ in batch], o.max_new_tokens, float(o.temperature),
                                       float(o.top_p), seeds)
            for (p, text, ids, note), res in zip(batch, results):
                write_response(plan.out_file(p.id), generated_record(plan, p, text, ids, note, res, tok,
                                                                 backend.model_info))
                stop_counts[res.stop_reason] = stop_counts.get(res.stop_reason, 0) + 1
                for rec in res.interventions or []:
                    if "norm" in rec:
                        norms.setdefault(f"{rec['kind'].replace('_', '-')} {rec['spec']}", []).append(rec["norm"])
                summary["written"] += 1
            bar.update(len(batch))
            start += len(batch)
            size = backend.batch_size or size  # an out-of-memory may have lowered it
    summary.update({"batch_size": size, "stop_reasons": stop_counts})
    if plan.interventions:
        summary["interventions"] = [f"{it.kind.replace('_', '-')} {it.spec()}" for it in plan.interventions]
        summary["relative_norms"] = norms   # per relative intervention: each prompt's norm, in the order written


def _run_import(plan: GeneratePlan, loaded: LoadedModel | None, summary: dict) -> dict:
    """Mode B: tokenizer only; the response ids are the imported text tokenized without special tokens."""
    summary.update({"backend": "tokenizer", "backend_reason": "--from-responses: no model weights needed"})
    if not plan.todo:
        return summary
    exp = plan.opts.experiment
    tok = loaded.tokenizer if loaded is not None else load_tokenizer(plan.variant.model_path(exp))
    stops = _stop_strings(tok, plan.variant.model_path(exp))
    stripped = 0
    for p in cli.Progress(plan.todo, unit="prompt", desc=f"import {plan.pset.name}", disable=not plan.opts.progress,
                  file=sys.stderr):
        record = imported_record(plan, p, tok, stops)
        stripped += record["imported"]["stripped_suffix"] is not None
        write_response(plan.out_file(p.id), record)
        summary["written"] += 1
    summary["stripped_stop_strings"] = stripped
    return summary


def generate(opts: GenerateOptions, loaded: LoadedModel | None = None) -> dict:
    """plan_generate then run_generate."""
    return run_generate(plan_generate(opts), loaded)


def generate_responses(experiment: str, prompt_set: str, model_variant: str | None = None,
                       loaded: LoadedModel | None = None, **options) -> dict:
    """Generate (Mode A) or import (Mode B, `from_responses=`) the responses of a prompt set; returns a summary.

    `options` are GenerateOptions' fields (max_new_tokens=, temperature=, prompt_ids=, no_server=, ...).
    Order: check every argument and input file, then load (the server, a local model, or the tokenizer only),
    then write files batch by batch. `loaded` reuses a model already in memory (never the server).
    """
    return generate(GenerateOptions(experiment, prompt_set, model_variant, **options), loaded)


# ---- CLI -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        description="Generate (or import) one response JSON per prompt of a prompt set: text plus the exact token "
                    "ids, under experiments/E/inference/VARIANT/responses/SET/ID.json.",
        epilog="examples:\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set benign --model-variant lora\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set harmful \\\n"
               "      --model-variant instruct --temperature 0.7 --top-p 0.9 --seed 1 --output-suffix t07\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set harmful --model-variant lora "
               "--prompt-ids 1,3\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set harmful --model-variant instruct \\\n"
               "      --steer demo/refusal:10:0.3x --stop-when demo/refusal:10:20 --output-suffix steered\n"
               "  python inference/generate_responses.py --experiment demo --prompt-set single_trait \\\n"
               "      --model-variant lora --from-responses texts.json --output-suffix imported   "
               "# needs your texts.json (Mode B: tokenizer only)\n\n"
               "A model server (inference/model_server.py) at $TRAIT_SERVER_URL (default http://127.0.0.1:8765)\n"
               "is used when it serves the same model and LoRA; otherwise the model is loaded here.\n"
               "Exit status: 0 done, 2 bad input (nothing written), 1 the server failed mid-run (files written\n"
               "so far are complete: rerun with --skip-existing).")
    p.add_argument("--experiment", required=True, help="experiments/E/config.json names the model variants")
    p.add_argument("--prompt-set", required=True,
                   help="datasets/inference/SET.json (may be nested: a/b), or the path of a .json file of your own "
                        "(the set is then named by its stem: later stages take --prompt-set STEM)")
    p.add_argument("--model-variant", help="variant to use (default: defaults.application of the config)")
    add_generate_flags(p)
    p.add_argument("--from-responses", metavar="FILE", help="Mode B: import {prompt_id: response_text}, no weights")
    p.add_argument("--prompt-ids", metavar="A,B", default=None,
                   help="only these prompt ids of the set (comma list; natural id order; unknown ids are an error)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: automatic)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (after --prompt-ids)")
    add_write_flags(p, "response files")
    p.add_argument("--output-suffix", default=None, help="write to responses/SET_SUFFIX instead")
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit (nf4) weights")
    p.add_argument("--no-server", action="store_true", help="never use the model server; load the model here")
    p.add_argument("--server-url", default=None, help="model server address (default: $TRAIT_SERVER_URL or "
                                                      "http://127.0.0.1:8765)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")
    g = p.add_argument_group("interventions (core/interventions.py; each repeatable; recorded in every file's "
                             "generation block; a model server applies them as a local model does)")
    g.add_argument("--steer", action="append", metavar="TRAIT:L:C[x][:POSITIONS]",
                   help="add C x the trait's unit vector at layer L; Cx = C x the mean residual norm at L over the "
                        "prompt (special tokens excluded; printed and recorded); positions all|prompt|response")
    g.add_argument("--cap", action="append", metavar="TRAIT:L:MAX[x] | TRAIT:L:MIN[x]:MAX[x]",
                   help="clamp the residual's projection on the trait's unit vector at L on every token (orthogonal "
                        "part unchanged); either bound may be empty")
    g.add_argument("--steer-when", dest="steer_when", action="append", metavar="TRAIT:L:THRESHOLD:C[x][:each]",
                   help="add C x the vector from the first generated token whose score at L exceeds THRESHOLD "
                        "(:each: only on such tokens)")
    g.add_argument("--stop-when", dest="stop_when", action="append", metavar="TRAIT:L:THRESHOLD",
                   help="end the response at the first generated token whose score at L exceeds THRESHOLD (kept; "
                        "stop_reason monitor, with trait, layer, token index and score)")
    return p


def format_summary(s: dict) -> str:
    line = (f"{'imported' if s['mode'] == 'import' else 'generated'} {s['written']} of {s['total']} responses "
            f"-> {s['output_dir']} (skipped {s['skipped_existing']} existing")
    if s.get("backend"):
        line += f"; {s['backend']}"
    if s.get("stop_reasons"):
        line += "; stop: " + ", ".join(f"{k} {v}" for k, v in s["stop_reasons"].items())
    for spec in s.get("interventions") or []:
        norms = (s.get("relative_norms") or {}).get(spec)
        if norms:   # a relative amount: C x the mean residual norm at the layer over each prompt
            span = f"{norms[0]!r}" if len(norms) == 1 else f"{min(norms):.6g}-{max(norms):.6g} over {len(norms)} prompts"
            line += f"; {spec} (mean residual norm at the layer over the prompt: {span}; each file's generation block has its own)"
        else:
            line += f"; {spec}"
    if s["mode"] == "import":
        for key, label in (("missing_ids", "missing from the file"), ("unknown_ids", "not in the set")):
            ids = s.get(key) or []
            if ids:
                line += f"; {len(ids)} {label}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}"
    return line + ")"


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), lambda args: generate(GenerateOptions.from_args(args)), format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
