"""Capture raw activations: response JSONs in, one .pt of per-layer activations per prompt out (prefill, batched).

    capture_raw_activations(experiment, prompt_set, ...) -> dict    the stage, importable (tests, server, demo)
    plan_capture(...) -> CapturePlan        every input checked, nothing loaded or written (called first)
    build_record(...) -> dict               the .pt dict of DESIGN.md §4 for one prompt
    format_summary(summary) -> str          the one-line summary main() prints
    main(argv=None) -> int                  the CLI: python inference/capture_raw_activations.py --help
    CaptureError                            bad input or a capture that cannot go on; the message names it

Reads experiments/{exp}/inference/{responses_from or variant}/responses/{set}/*.json and writes
experiments/{exp}/inference/{variant}/raw/residual/{set}[_{suffix}]/{id}.pt. The stored `token_ids` are the
ids captured (never re-tokenized); the prompt / response split is the JSON's `prompt_end`. Each file is
written atomically as soon as its batch is done, so a killed run resumes with --skip-existing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core.capture import BatchReport, CaptureOOMError, capture_sequences  # noqa: E402
from core.hooks import COMPONENTS, HookError, hook_sites, num_layers  # noqa: E402
from utils import paths  # noqa: E402
from utils.config import Variant, resolve_variant  # noqa: E402
from utils.layers import parse_layers  # noqa: E402
from utils.model import (DTYPES, LoadedModel, decode_tokens, load_model_config, load_tokenizer,  # noqa: E402
                         load_variant)
from utils.responses import list_response_files, load_responses  # noqa: E402
from utils.storage import BackgroundWriter  # noqa: E402
from utils.cli import Parser as _Parser  # noqa: E402
from core.errors import TraitError


class CaptureError(TraitError):
    """A bad argument, or a capture that cannot go on (out of memory on one prompt); the message names it."""


@dataclass
class CapturePlan:
    experiment: str
    prompt_set: str
    variant: Variant                    # the model captured; output goes under its name
    source: Variant                     # whose responses are read (--responses-from, else `variant`)
    output_suffix: str | None
    layers: list[int]
    components: list[str]
    out_dtype: torch.dtype | None       # None: the model's activation dtype
    items: list[tuple[str, dict]]       # (prompt id, response JSON) selected by --prompt-ids / --limit
    todo: list[tuple[str, dict]]        # items minus those skipped by --skip-existing
    tokenizer: Any
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = paths.raw_dir(self.experiment, self.variant.name, self.prompt_set, self.output_suffix)

    def out_file(self, prompt_id: str) -> Path:
        return paths.raw_file(self.experiment, self.variant.name, self.prompt_set, prompt_id, self.output_suffix)


# ---------------------------------------------------------------------------------------------------
# Checking every input before anything is loaded or written

def parse_components(components: str | Sequence[str] | None, capture_mlp: bool = False) -> list[str]:
    """--components (comma list) plus --capture-mlp -> components in canonical order; unknown names are an error."""
    if components is None:
        names = ["residual"]
    elif isinstance(components, str):
        names = [c.strip() for c in components.split(",")]
    else:
        names = [str(c).strip() for c in components]
    if not names or any(not n for n in names):
        raise CaptureError(f"--components {components!r}: empty item (choose from {', '.join(COMPONENTS)})")
    bad = [n for n in names if n not in COMPONENTS]
    if bad:
        raise CaptureError(f"--components: unknown component {bad[0]!r} (choose from {', '.join(COMPONENTS)})")
    if capture_mlp:
        names += ["attn_contribution", "mlp_contribution"]
    return [c for c in COMPONENTS if c in names]


def parse_prompt_ids(prompt_ids: str | Sequence[str | int] | None) -> list[str] | None:
    if prompt_ids is None:
        return None
    items = prompt_ids.split(",") if isinstance(prompt_ids, str) else [str(i) for i in prompt_ids]
    items = [i.strip() for i in items]
    if not items or any(not i for i in items):
        raise CaptureError(f"--prompt-ids {prompt_ids!r}: expected a comma list of ids such as 1,2,10")
    return items


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype in (None, "auto") else dtype
    if dtype not in DTYPES:
        raise CaptureError(f"--dtype {dtype!r}: choose from auto (the model's dtype), {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise CaptureError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def _check_prompt_set(exp: str, source: Variant, prompt_set: str) -> None:
    """A missing responses folder: an unknown prompt set, or a known one that was not generated yet."""
    folder = paths.responses_dir(exp, source.name, prompt_set)
    if folder.is_dir():
        if not list_response_files(exp, source.name, prompt_set):
            raise CaptureError(f"{folder}: no response files (create them with: python inference/generate_responses.py "
                               f"--experiment {exp} --prompt-set {prompt_set} --model-variant {source.name})")
        return
    if not paths.prompt_set_file(prompt_set).exists():
        root = paths.inference_dir(exp, source.name) / "responses"
        known = sorted({str(p.parent.relative_to(root)) for p in root.rglob("*.json")}) if root.is_dir() else []
        raise CaptureError(
            f"unknown prompt set {prompt_set!r}: no {paths.prompt_set_file(prompt_set)} and no responses at {folder} "
            f"(prompt sets with responses for variant {source.name!r}: {', '.join(known) or 'none'})")
    list_response_files(exp, source.name, prompt_set)  # raises ResponseError naming the command that creates it


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def plan_capture(experiment: str, prompt_set: str, model_variant: str | None = None,
                 components: str | Sequence[str] | None = None, capture_mlp: bool = False,
                 layers: str | Sequence[int] | None = "all", responses_from: str | None = None,
                 prompt_ids: str | Sequence[str | int] | None = None, skip_existing: bool = False,
                 limit: int | None = None, output_suffix: str | None = None, load_in_8bit: bool = False,
                 load_in_4bit: bool = False, dtype: str | torch.dtype | None = None, batch_size: int | None = None,
                 max_batch_tokens: int | None = None, loaded: LoadedModel | None = None) -> CapturePlan:
    """Check every input (flags, experiment, variants, prompt set, each response file, layers); load only tokenizers."""
    if load_in_8bit and load_in_4bit:
        raise CaptureError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")
    comps = parse_components(components, capture_mlp)
    ids = parse_prompt_ids(prompt_ids)
    out_dtype = _storage_dtype(dtype)
    _positive("--limit", limit, allow_zero=True)
    _positive("--batch-size", batch_size)
    _positive("--max-batch-tokens", max_batch_tokens)
    if output_suffix is not None and (not output_suffix.strip() or "/" in output_suffix or "\\" in output_suffix):
        raise CaptureError(f"--output-suffix {output_suffix!r}: must be a non-empty name without slashes")
    prompt_set = prompt_set.strip("/")
    if not prompt_set or ".." in prompt_set.split("/"):
        raise CaptureError(f"--prompt-set {prompt_set!r}: expected a set name such as harmful or rm_syco/train_100")

    variant = resolve_variant(experiment, model_variant)
    source = resolve_variant(experiment, responses_from) if responses_from else variant
    _check_prompt_set(experiment, source, prompt_set)

    tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(variant.model_path(experiment))
    if source.model_path(experiment) != variant.model_path(experiment):
        source_tok = load_tokenizer(source.model_path(experiment))
        if not _same_vocab(tokenizer, source_tok):
            raise CaptureError(
                f"--responses-from {source.name}: its tokenizer ({source.model}) differs from {variant.name}'s "
                f"({variant.model}), so the stored token ids would mean other tokens; capture with a variant of the "
                f"same tokenizer")
    items = load_responses(experiment, source.name, prompt_set, prompt_ids=ids, limit=limit,
                           vocab_size=len(tokenizer))

    n_layers = num_layers(loaded.model) if loaded is not None else _config_layers(variant.model_path(experiment))
    if layers is None or isinstance(layers, str):
        chosen = parse_layers("all" if layers is None else layers, n_layers)
    else:
        chosen = parse_layers(",".join(str(int(l)) for l in layers), n_layers) if len(layers) else []
        if not chosen:
            raise CaptureError(f"--layers: no layers given (the model has {n_layers} layers, 0-{n_layers - 1})")

    plan = CapturePlan(experiment, prompt_set, variant, source, output_suffix, chosen, comps, out_dtype, items,
                       [], tokenizer)
    plan.todo = [(pid, d) for pid, d in items if not (skip_existing and plan.out_file(pid).exists())]
    return plan


def _config_layers(model_path: str) -> int:
    cfg = load_model_config(model_path)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise CaptureError(f"{model_path}: config has no num_hidden_layers, cannot resolve --layers")
    return n


# ---------------------------------------------------------------------------------------------------
# The .pt record

def build_record(data: dict, acts: dict[int, dict[str, torch.Tensor]], tokenizer, response_only: bool,
                 metadata: dict) -> dict:
    """Split one sequence's activations at prompt_end into the DESIGN.md §4 dict (every tensor owns its storage)."""
    ids: list[int] = data["token_ids"]
    end: int = data["prompt_end"]
    tokens = data.get("tokens")
    if not (isinstance(tokens, list) and len(tokens) == len(ids) and all(isinstance(t, str) for t in tokens)):
        tokens = decode_tokens(tokenizer, ids)

    def side(lo: int, hi: int, keep: bool) -> dict[int, dict[str, torch.Tensor]]:
        if not keep:
            return {}
        return {layer: {c: t[lo:hi].clone() for c, t in comps.items()} for layer, comps in acts.items()}

    return {
        "prompt": {"text": data.get("prompt") or "", "tokens": tokens[:end], "token_ids": ids[:end],
                   "activations": side(0, end, not response_only)},
        "response": {"text": data.get("response") or "", "tokens": tokens[end:], "token_ids": ids[end:],
                     "activations": side(end, len(ids), True)},
        "metadata": metadata,
    }


# ---------------------------------------------------------------------------------------------------
# The stage

def capture_raw_activations(experiment: str, prompt_set: str, model_variant: str | None = None,
                            components: str | Sequence[str] | None = None, capture_mlp: bool = False,
                            layers: str | Sequence[int] | None = "all", response_only: bool = False,
                            responses_from: str | None = None, prompt_ids: str | Sequence[str | int] | None = None,
                            skip_existing: bool = False, limit: int | None = None, output_suffix: str | None = None,
                            load_in_8bit: bool = False, load_in_4bit: bool = False,
                            dtype: str | torch.dtype | None = None, batch_size: int | None = None,
                            max_batch_tokens: int | None = None, loaded: LoadedModel | None = None,
                            progress: bool = True) -> dict:
    """Capture the selected prompts of a set and write one .pt each; returns a summary dict.

    `loaded` reuses an already-loaded utils.model.LoadedModel of `model_variant` (tests, server, demo).
    Summary keys: captured, skipped, tokens, seconds (total), capture_seconds (forwards and writes), bytes,
    out_of_memory_retries, output_dir, files, layers, components.
    """
    t0 = time.perf_counter()
    plan = plan_capture(experiment, prompt_set, model_variant, components, capture_mlp, layers, responses_from,
                        prompt_ids, skip_existing, limit, output_suffix, load_in_8bit, load_in_4bit, dtype,
                        batch_size, max_batch_tokens, loaded)
    summary: dict[str, Any] = {
        "captured": 0, "skipped": len(plan.items) - len(plan.todo), "tokens": 0, "seconds": 0.0,
        "capture_seconds": 0.0, "bytes": 0,
        "out_of_memory_retries": 0, "output_dir": str(plan.out_dir), "files": [],
        "layers": plan.layers, "components": plan.components,
    }
    if not plan.todo:  # decided before loading the model
        summary["seconds"] = time.perf_counter() - t0
        return summary

    lm = loaded or load_variant(experiment, plan.variant.name, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                tokenizer=plan.tokenizer)  # the tokenizer plan_capture checked the ids with
    if plan.layers[-1] >= num_layers(lm.model):  # only when `loaded` is not the variant's model
        raise CaptureError(f"--layers: layer {plan.layers[-1]} is out of range for the loaded model "
                           f"({num_layers(lm.model)} layers)")
    info = lm.info
    base_meta = {
        "model": info.get("model", plan.variant.model), "variant": plan.variant.name,
        "lora": info.get("lora", plan.variant.lora), "quantization": info.get("quantization"),
        "compute_dtype": info.get("dtype"), "layers": list(plan.layers), "components": list(plan.components),
        "hook_sites": _hook_sites(lm.model, plan.components),
        "responses_from": plan.source.name, "prompt_set": plan.prompt_set, "output_suffix": plan.output_suffix,
        "response_only": response_only, "capture_date": _dt.datetime.now().isoformat(),
        "tool": "trait-inference capture_raw_activations.py",
    }
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0  # 0 is a valid pad id (B24)

    bar = tqdm(total=len(plan.todo), unit="prompt", desc=f"capture {plan.prompt_set}", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)

    def on_batch(report: BatchReport) -> None:
        if not report.ok:
            summary["out_of_memory_retries"] += 1
            bar.write(f"out of memory on a batch of {len(report.indices)} prompts ({report.padded_tokens} padded "
                      f"tokens): retrying in halves", file=sys.stderr)

    sequences = [d["token_ids"] for _, d in plan.todo]
    started = time.perf_counter()
    writer = BackgroundWriter()  # files are written while the next batch runs; each one atomically
    try:
        with writer:
            for i, acts in capture_sequences(lm.model, sequences, plan.layers, plan.components, pad_id,
                                             max_batch_tokens=max_batch_tokens, batch_size=batch_size,
                                             out_dtype=plan.out_dtype, on_batch=on_batch):
                prompt_id, data = plan.todo[i]
                first = next(iter(next(iter(acts.values())).values()))
                meta = dict(base_meta, dtype=str(first.dtype).replace("torch.", ""), prompt_id=prompt_id,
                            n_prompt_tokens=data["prompt_end"], n_response_tokens=len(data["token_ids"]) - data["prompt_end"],
                            inference_model=data.get("inference_model"))
                writer.submit(plan.out_file(prompt_id), build_record(data, acts, lm.tokenizer, response_only, meta))
                summary["captured"] += 1
                summary["tokens"] += len(data["token_ids"])
                bar.update(1)
                bar.set_postfix_str(f"{summary['tokens'] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s",
                                    refresh=False)
        summary["bytes"], summary["files"] = writer.bytes, writer.files
    except CaptureOOMError as e:
        pid = plan.todo[e.index][0]
        raise CaptureError(f"prompt {pid} ({e.n_tokens} tokens): out of memory even at batch size 1; capture fewer "
                           f"--layers or components, or load with --load-in-8bit / --load-in-4bit") from None
    finally:
        bar.close()
        if loaded is None and torch.cuda.is_available():  # a model this call loaded leaves no cached GPU blocks
            del lm
            torch.cuda.empty_cache()
    summary["seconds"] = time.perf_counter() - t0
    summary["capture_seconds"] = time.perf_counter() - started
    return summary


def _hook_sites(model, components: list[str]) -> dict[str, str]:
    """Module paths per component for the metadata; residual-only capture works where contribution sites are unknown."""
    try:
        return hook_sites(model)
    except HookError:
        if set(components) - {"residual"}:
            raise
        return {"residual": "output of decoder block {L}"}


def format_summary(s: dict) -> str:
    busy = s.get("capture_seconds") or s["seconds"]  # the rate leaves out model loading
    rate = s["tokens"] / busy if busy > 0 else 0.0
    oom = f", {s['out_of_memory_retries']} out-of-memory retries" if s.get("out_of_memory_retries") else ""
    return (f"captured {s['captured']} prompts, skipped {s['skipped']} existing, {s['tokens']:,} tokens in "
            f"{s['seconds']:.1f} s ({rate:,.0f} tokens/s captured), {s['bytes'] / 1e6:,.1f} MB written to {s['output_dir']}{oom}")


# ---------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="capture_raw_activations.py",
        description="Run prefill forward passes over stored response token ids and save per-layer activations "
                    "(one .pt per prompt under inference/{variant}/raw/residual/{set}/).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  python inference/capture_raw_activations.py --experiment my_exp --prompt-set single_trait
  python inference/capture_raw_activations.py --experiment my_exp --prompt-set harmful --capture-mlp --layers 10-20
  # model-diff: the instruct model on rm_lora's tokens
  python inference/capture_raw_activations.py --experiment my_exp --prompt-set rm_syco/train_100 \\
      --model-variant instruct --responses-from rm_lora --skip-existing""")
    a = p.add_argument
    a("--experiment", required=True, help="experiment folder name under experiments/")
    a("--prompt-set", required=True, help="prompt set name (nested names like rm_syco/train_100 work)")
    a("--model-variant", help="variant to capture (default: defaults.application of config.json)")
    a("--components", default=None,
      help=f"comma list of {', '.join(COMPONENTS)} (default: residual)")
    a("--capture-mlp", action="store_true", help="also capture attn_contribution and mlp_contribution")
    a("--layers", default="all", help="layers to capture: all, 16, 5,10,15, 5-20, 10-45:3, 30%%-60%%, -4--1 (default: all)")
    a("--response-only", action="store_true", help="store response activations only (prompt tokens/text kept)")
    a("--responses-from", metavar="VARIANT", help="read this variant's responses, write under --model-variant")
    a("--prompt-ids", help="comma list of prompt ids to capture (default: all)")
    a("--skip-existing", action="store_true", help="skip prompts whose .pt already exists (resume a run)")
    a("--limit", type=int, help="capture at most N prompts (after --prompt-ids, before --skip-existing)")
    a("--output-suffix", help="write to raw/residual/{set}_{suffix}/ (responses are still read from {set})")
    a("--load-in-8bit", action="store_true", help="load the model in 8-bit (bitsandbytes)")
    a("--load-in-4bit", action="store_true", help="load the model in 4-bit NF4 (bitsandbytes)")
    a("--no-server", action="store_true", help="accepted for compatibility: capture always runs locally")
    a("--dtype", default=None, help="storage dtype: float16, bfloat16 or float32 (default: the model's dtype)")
    a("--batch-size", type=int, help="at most N prompts per forward (default: automatic)")
    a("--max-batch-tokens", type=int, help="at most N padded tokens per forward (default: automatic)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error already printed as one line
        return int(e.code or 0)
    if args.no_server:
        print("note: --no-server: capture always runs locally", file=sys.stderr)
    try:
        summary = capture_raw_activations(
            args.experiment, args.prompt_set, model_variant=args.model_variant, components=args.components,
            capture_mlp=args.capture_mlp, layers=args.layers, response_only=args.response_only,
            responses_from=args.responses_from, prompt_ids=args.prompt_ids, skip_existing=args.skip_existing,
            limit=args.limit, output_suffix=args.output_suffix, load_in_8bit=args.load_in_8bit,
            load_in_4bit=args.load_in_4bit, dtype=args.dtype, batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens)
    except ValueError as e:  # ConfigError, ResponseError, LayerSpecError, ModelLoadError, CaptureError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
