"""Capture raw activations: response JSONs in, one .pt of per-layer activations per prompt out (prefill, batched).

    CaptureOptions(experiment, prompt_set, ...)   every setting of a run (the CLI flags); .from_args(namespace)
    plan_capture(opts, loaded=None) -> CapturePlan every input checked; reads only JSONs and the tokenizer(s)
    run_capture(plan, loaded=None) -> dict         load the model, capture in batches, write files; the summary
    capture_raw_activations(experiment, prompt_set, loaded=None, **options) -> dict
                                                   plan + run, for keyword callers (tests, server, demo)
    format_summary(summary) -> str                 the one line main() prints
    main(argv=None) -> int                         the CLI: python inference/capture_raw_activations.py --help
    CaptureError                                   bad input or a capture that cannot go on; the message names it

Reads experiments/{exp}/inference/{responses_from or variant}/responses/{set}/*.json and writes
experiments/{exp}/inference/{variant}/raw/residual/{set}[_{suffix}]/{id}.pt. The stored `token_ids` are the
ids captured (never re-tokenized); the prompt / response split is the JSON's `prompt_end`; the token strings
are decoded again from the ids (a JSON written by trait-interp's compact writer stores "," as ", ", B2 in
docs/original-bugs.md). With --responses-from, the capturing variant gets the response JSONs it lacks (the
same ids, its own `inference_model`, `responses_from` naming the replayed variant), as the viewer needs them.
Each file is written atomically as soon as its batch is done, so a killed run resumes with --skip-existing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from core.capture import BatchReport, CaptureOOMError, capture_sequences
from core.errors import TraitError
from core.hooks import COMPONENTS, HookError, hook_sites, num_layers
from utils import cli, paths
from utils.config import Variant, resolve_variant
from utils.layers import parse_layers
from utils.model import DTYPES, LoadedModel, load_model_config, load_tokenizer, load_variant
from utils.prompts import parse_prompt_ids
from utils.raw import build_raw
from utils.responses import TokenStrings, list_response_files, load_responses, replayed_response
from utils.flags import add_capture_flags
from utils.storage import BackgroundWriter, add_write_flags, guard_outputs


class CaptureError(TraitError):
    """A bad argument, or a capture that cannot go on (out of memory on one prompt); the message names it."""


@dataclass(frozen=True)
class CaptureOptions:
    """What one capture run is asked to do; the fields are the CLI flags (see build_parser)."""

    experiment: str
    prompt_set: str
    model_variant: str | None = None
    components: str | Sequence[str] | None = None     # None: residual
    capture_mlp: bool = False
    layers: str | Sequence[int] | None = "all"
    response_only: bool = False
    responses_from: str | None = None
    prompt_ids: str | Sequence[str | int] | None = None
    skip_existing: bool = False
    overwrite: bool = False
    limit: int | None = None
    output_suffix: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    dtype: str | torch.dtype | None = None            # storage dtype; None / "auto": the model's
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "CaptureOptions":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


@dataclass(frozen=True)
class CapturePlan:
    opts: CaptureOptions
    prompt_set: str                     # normalised (no leading/trailing slash)
    variant: Variant                    # the model captured; output goes under its name
    source: Variant                     # whose responses are read (--responses-from, else `variant`)
    layers: list[int]
    components: list[str]
    out_dtype: torch.dtype | None       # None: the model's activation dtype
    items: list[tuple[str, dict]]       # (prompt id, response JSON) selected by --prompt-ids / --limit
    todo: list[tuple[str, dict]]        # items minus those skipped by --skip-existing
    replay: list[str]                   # prompt ids whose response JSON the capturing variant lacks
    tokenizer: Any

    @property
    def out_dir(self) -> Path:
        return paths.raw_dir(self.opts.experiment, self.variant.name, self.prompt_set, self.opts.output_suffix)

    def out_file(self, prompt_id: str) -> Path:
        return paths.raw_file(self.opts.experiment, self.variant.name, self.prompt_set, prompt_id,
                              self.opts.output_suffix)

    def response_file(self, prompt_id: str) -> Path:
        """The capturing variant's own response JSON (written for --responses-from when missing)."""
        return paths.response_file(self.opts.experiment, self.variant.name, self.prompt_set, prompt_id)


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


def _storage_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype in (None, "auto") else dtype
    if dtype not in DTYPES:
        raise CaptureError(f"--dtype {dtype!r}: choose from auto (the model's dtype), {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise CaptureError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def _check_flags(opts: CaptureOptions) -> str:
    """The checks that need no file; returns the normalised prompt set name."""
    if opts.load_in_8bit and opts.load_in_4bit:
        raise CaptureError("--load-in-8bit and --load-in-4bit are mutually exclusive: choose one")
    _positive("--limit", opts.limit, allow_zero=True)
    _positive("--batch-size", opts.batch_size)
    _positive("--max-batch-tokens", opts.max_batch_tokens)
    suffix = opts.output_suffix
    if suffix is not None and (not suffix.strip() or "/" in suffix or "\\" in suffix):
        raise CaptureError(f"--output-suffix {suffix!r}: must be a non-empty name without slashes")
    prompt_set = opts.prompt_set.strip("/")
    if not prompt_set or ".." in prompt_set.split("/"):
        raise CaptureError(f"--prompt-set {opts.prompt_set!r}: expected a set name such as harmful or "
                           f"rm_syco/train_100")
    return prompt_set


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


def _tokenizers(opts: CaptureOptions, variant: Variant, source: Variant, loaded: LoadedModel | None):
    """The capturing variant's tokenizer (loaded once, reused by the model load); the source's must match it."""
    exp = opts.experiment
    tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(variant.model_path(exp))
    if source.model_path(exp) != variant.model_path(exp):
        if load_tokenizer(source.model_path(exp)).get_vocab() != tokenizer.get_vocab():
            raise CaptureError(
                f"--responses-from {source.name}: its tokenizer ({source.model}) differs from {variant.name}'s "
                f"({variant.model}), so the stored token ids would mean other tokens; capture with a variant of the "
                f"same tokenizer")
    return tokenizer


def _choose_layers(layers: str | Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None or isinstance(layers, str):
        return parse_layers("all" if layers is None else layers, n_layers)
    chosen = parse_layers(",".join(str(int(l)) for l in layers), n_layers) if len(layers) else []
    if not chosen:
        raise CaptureError(f"--layers: no layers given (the model has {n_layers} layers, 0-{n_layers - 1})")
    return chosen


def _config_layers(model_path: str) -> int:
    cfg = load_model_config(model_path)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise CaptureError(f"{model_path}: config has no num_hidden_layers, cannot resolve --layers")
    return n


def plan_capture(opts: CaptureOptions, loaded: LoadedModel | None = None) -> CapturePlan:
    """Check every input (flags, experiment, variants, prompt set, each response file, layers); write nothing.

    Only the tokenizer(s) and the model's config are read besides the JSONs: the ids are checked against the
    vocabulary and --layers against the layer count before a long model load.
    """
    prompt_set = _check_flags(opts)
    comps = parse_components(opts.components, opts.capture_mlp)
    ids = parse_prompt_ids(opts.prompt_ids)
    out_dtype = _storage_dtype(opts.dtype)
    exp = opts.experiment
    variant = resolve_variant(exp, opts.model_variant)
    source = resolve_variant(exp, opts.responses_from) if opts.responses_from else variant
    _check_prompt_set(exp, source, prompt_set)
    tokenizer = _tokenizers(opts, variant, source, loaded)
    items = load_responses(exp, source.name, prompt_set, prompt_ids=ids, limit=opts.limit, vocab_size=len(tokenizer))
    n_layers = num_layers(loaded.model) if loaded is not None else _config_layers(variant.model_path(exp))
    chosen = _choose_layers(opts.layers, n_layers)

    def out_file(pid: str) -> Path:
        return paths.raw_file(exp, variant.name, prompt_set, pid, opts.output_suffix)

    todo = [(pid, d) for pid, d in items if not (opts.skip_existing and out_file(pid).exists())]
    guard_outputs([out_file(pid) for pid, _ in todo], overwrite=opts.overwrite, skip_existing=opts.skip_existing)
    replay = [] if source.name == variant.name else \
        [pid for pid, _ in items if not paths.response_file(exp, variant.name, prompt_set, pid).exists()]
    return CapturePlan(opts, prompt_set, variant, source, chosen, comps, out_dtype, items, todo, replay, tokenizer)


# ---------------------------------------------------------------------------------------------------
# Token strings and the records written

def _base_metadata(plan: CapturePlan, lm: LoadedModel) -> dict:
    info = lm.info
    return {
        "model": info.get("model", plan.variant.model), "variant": plan.variant.name,
        "lora": info.get("lora", plan.variant.lora), "quantization": info.get("quantization"),
        "compute_dtype": info.get("dtype"), "layers": list(plan.layers), "components": list(plan.components),
        "hook_sites": _hook_sites(lm.model, plan.components),  # the identity check's one short forward
        "responses_from": plan.source.name, "prompt_set": plan.prompt_set, "output_suffix": plan.opts.output_suffix,
        "response_only": plan.opts.response_only, "capture_date": _dt.datetime.now().isoformat(),
        "tool": "trait-inference capture_raw_activations.py",
    }


def _hook_sites(model, components: list[str]) -> dict[str, str]:
    """Module paths per component for the metadata; residual-only capture works where contribution sites are unknown."""
    try:
        return hook_sites(model)
    except HookError:
        if set(components) - {"residual"}:
            raise
        return {"residual": "output of decoder block {L}"}


def _replayed(plan: CapturePlan, data: dict, tokens: list[str]) -> dict:
    return replayed_response(data, tokens, plan.variant.model, plan.source.name)


def _write_skipped_replays(plan: CapturePlan, strings: TokenStrings, writer: BackgroundWriter) -> int:
    """Response JSONs for prompts whose .pt exists (--skip-existing) but whose JSON the capturing variant lacks."""
    todo = {pid for pid, _ in plan.todo}
    missing = set(plan.replay) - todo
    for pid, data in plan.items:
        if pid in missing:
            writer.submit_json(plan.response_file(pid), _replayed(plan, data, strings.of(data)))
    return len(missing)


# ---------------------------------------------------------------------------------------------------
# The stage

def _new_summary(plan: CapturePlan) -> dict[str, Any]:
    return {
        "captured": 0, "skipped": len(plan.items) - len(plan.todo), "tokens": 0, "seconds": 0.0,
        "capture_seconds": 0.0, "bytes": 0, "out_of_memory_retries": 0, "output_dir": str(plan.out_dir),
        "files": [], "layers": plan.layers, "components": plan.components, "tokens_corrected": 0,
        "responses_written": 0, "responses_from": plan.source.name if plan.source != plan.variant else None,
        "phases": {},
    }


def _load(plan: CapturePlan, loaded: LoadedModel | None) -> LoadedModel:
    if loaded is None:  # the tokenizer plan_capture checked the ids with: loaded once
        loaded = load_variant(plan.opts.experiment, plan.variant.name, load_in_8bit=plan.opts.load_in_8bit,
                              load_in_4bit=plan.opts.load_in_4bit, tokenizer=plan.tokenizer)
    if plan.layers[-1] >= num_layers(loaded.model):  # only when `loaded` is not the variant's model
        raise CaptureError(f"--layers: layer {plan.layers[-1]} is out of range for the loaded model "
                           f"({num_layers(loaded.model)} layers)")
    return loaded


def run_capture(plan: CapturePlan, loaded: LoadedModel | None = None, started: float | None = None) -> dict:
    """Load the model (unless `loaded`), capture plan.todo in batches, write each .pt as its batch finishes.

    Summary keys: captured, skipped, tokens, seconds (total), capture_seconds (forwards and writes), bytes,
    out_of_memory_retries, output_dir, files (.pt), layers, components, tokens_corrected (token strings decoded
    from the ids that differed from the JSONs' `tokens`), responses_written and responses_from (the response
    JSONs written for --responses-from), phases (seconds of load, identity_check, capture).
    """
    t0 = started if started is not None else time.perf_counter()
    summary = _new_summary(plan)
    phases = summary["phases"]
    strings = TokenStrings(plan.tokenizer)
    lm = None
    try:
        with BackgroundWriter() as writer:
            summary["responses_written"] += _write_skipped_replays(plan, strings, writer)
            if plan.todo:  # decided before loading the model
                mark = time.perf_counter()
                lm = _load(plan, loaded)
                phases["load"] = time.perf_counter() - mark
                mark = time.perf_counter()
                base_meta = _base_metadata(plan, lm)  # runs the identity check's one short forward
                phases["identity_check"] = time.perf_counter() - mark
                capture_start = time.perf_counter()
                _capture_loop(plan, lm, base_meta, strings, writer, summary)
        summary["bytes"], summary["files"] = writer.bytes, [f for f in writer.files if f.endswith(".pt")]
        if plan.todo:  # the writer has finished every file here
            phases["capture"] = summary["capture_seconds"] = time.perf_counter() - capture_start
    finally:
        if lm is not None and loaded is None and torch.cuda.is_available():  # no cached GPU blocks stay behind
            del lm
            torch.cuda.empty_cache()
    summary["tokens_corrected"] = strings.corrected
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _capture_loop(plan: CapturePlan, lm: LoadedModel, base_meta: dict, strings: TokenStrings,
                  writer: BackgroundWriter, summary: dict) -> None:
    """The batches: each prompt's .pt (and replayed response JSON) is queued on `writer` as soon as it is done."""
    started = time.perf_counter()
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0  # 0 is a valid pad id (B24)
    replay = set(plan.replay)
    bar = cli.Progress(total=len(plan.todo), unit="prompt", desc=f"capture {plan.prompt_set}", file=sys.stderr,
               disable=not plan.opts.progress, dynamic_ncols=True)

    def on_batch(report: BatchReport) -> None:
        if not report.ok:
            summary["out_of_memory_retries"] += 1
            bar.write(f"out of memory on a batch of {len(report.indices)} prompts ({report.padded_tokens} padded "
                      f"tokens): retrying in halves", file=sys.stderr)

    try:
        for i, acts in capture_sequences(lm.model, [d["token_ids"] for _, d in plan.todo], plan.layers,
                                         plan.components, pad_id, max_batch_tokens=plan.opts.max_batch_tokens,
                                         batch_size=plan.opts.batch_size, out_dtype=plan.out_dtype,
                                         on_batch=on_batch):
            prompt_id, data = plan.todo[i]
            tokens = strings.of(data)
            first = next(iter(next(iter(acts.values())).values()))
            meta = dict(base_meta, dtype=str(first.dtype).replace("torch.", ""), prompt_id=prompt_id,
                        n_prompt_tokens=data["prompt_end"], n_response_tokens=len(tokens) - data["prompt_end"],
                        inference_model=data.get("inference_model"))
            writer.submit(plan.out_file(prompt_id), build_raw(data, acts, tokens, plan.opts.response_only, meta))
            if prompt_id in replay:
                writer.submit_json(plan.response_file(prompt_id), _replayed(plan, data, tokens))
                summary["responses_written"] += 1
            summary["captured"] += 1
            summary["tokens"] += len(tokens)
            bar.update(1)
            bar.set_postfix_str(f"{summary['tokens'] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s",
                                refresh=False)
    except CaptureOOMError as e:
        pid = plan.todo[e.index][0]
        raise CaptureError(f"prompt {pid} ({e.n_tokens} tokens): out of memory even at batch size 1; capture fewer "
                           f"--layers or components, or load with --load-in-8bit / --load-in-4bit") from e
    finally:
        bar.close()


def capture(opts: CaptureOptions, loaded: LoadedModel | None = None) -> dict:
    """plan_capture then run_capture; `loaded` reuses an already-loaded LoadedModel of the variant."""
    t0 = time.perf_counter()
    plan = plan_capture(opts, loaded)
    plan_seconds = time.perf_counter() - t0
    summary = run_capture(plan, loaded, started=t0)
    summary["phases"] = {"plan": plan_seconds, **summary["phases"]}
    return summary


def capture_raw_activations(experiment: str, prompt_set: str, loaded: LoadedModel | None = None,
                            **options) -> dict:
    """Capture the selected prompts of a set and write one .pt each; returns run_capture's summary.

    `options` are CaptureOptions' fields (model_variant=, components=, layers=, responses_from=, ...);
    `loaded` reuses an already-loaded utils.model.LoadedModel of `model_variant` (tests, server, demo).
    """
    return capture(CaptureOptions(experiment, prompt_set, **options), loaded)


def format_summary(s: dict) -> str:
    busy = s.get("capture_seconds") or s["seconds"]  # the rate leaves out model loading
    rate = s["tokens"] / busy if busy > 0 else 0.0
    oom = f", {s['out_of_memory_retries']} out-of-memory retries" if s.get("out_of_memory_retries") else ""
    fixed = (f"; {s['tokens_corrected']:,} token strings decoded from the ids differed from the response JSONs "
             f"(corrected)") if s.get("tokens_corrected") else ""
    replay = (f"; wrote {s['responses_written']} response JSONs replayed from {s['responses_from']}"
              if s.get("responses_written") else "")
    return (f"captured {s['captured']} prompts, skipped {s['skipped']} existing, {s['tokens']:,} tokens in "
            f"{s['seconds']:.1f} s ({rate:,.0f} tokens/s captured), {s['bytes'] / 1e6:,.1f} MB written to "
            f"{s['output_dir']}{oom}{fixed}{replay}")


# ---------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="capture_raw_activations.py",
        description="Run prefill forward passes over stored response token ids and save per-layer activations "
                    "(one .pt per prompt under inference/{variant}/raw/residual/{set}/). Token strings are decoded "
                    "again from the ids. With --responses-from, the capturing variant also gets the response JSONs "
                    "it lacks (same ids, its own inference_model, responses_from naming the replayed variant).",
        epilog="""examples:
  python inference/capture_raw_activations.py --experiment demo --prompt-set benign
  python inference/capture_raw_activations.py --experiment demo --prompt-set harmful --capture-mlp --output-suffix mlp
  # model-diff: the instruct model on the LoRA's tokens
  python inference/capture_raw_activations.py --experiment demo --prompt-set single_trait \\
      --model-variant instruct --responses-from lora --skip-existing""")
    a = p.add_argument
    a("--experiment", required=True, help="experiment folder name under experiments/")
    a("--prompt-set", required=True, help="prompt set name (nested names like rm_syco/train_100 work)")
    a("--model-variant", help="variant to capture (default: defaults.application of config.json)")
    add_capture_flags(p)
    a("--responses-from", metavar="VARIANT",
      help="read this variant's responses, write under --model-variant (and its missing response JSONs)")
    a("--prompt-ids", help="comma list of prompt ids to capture (default: all)")
    add_write_flags(p, ".pt files (--skip-existing resumes a run)")
    a("--limit", type=int, help="capture at most N prompts (after --prompt-ids, before --skip-existing)")
    a("--output-suffix", help="write to raw/residual/{set}_{suffix}/ (responses are still read from {set})")
    a("--load-in-8bit", action="store_true", help="load the model in 8-bit (bitsandbytes)")
    a("--load-in-4bit", action="store_true", help="load the model in 4-bit NF4 (bitsandbytes)")
    a("--no-server", action="store_true", help="accepted for compatibility: capture always runs locally")
    a("--dtype", default=None, help="storage dtype: float16, bfloat16 or float32 (default: the model's dtype)")
    a("--batch-size", type=int, help="at most N prompts per forward (default: automatic)")
    a("--max-batch-tokens", type=int, help="at most N padded tokens per forward (default: automatic)")
    a("--timings", action="store_true", help="also print the seconds of each phase (plan, load, identity check, "
                                             "capture) to stderr")
    return p


def _stage(args: argparse.Namespace) -> dict:
    if args.no_server:
        print("note: --no-server: capture always runs locally", file=sys.stderr)
    summary = capture(CaptureOptions.from_args(args))
    if args.timings:
        print("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in summary["phases"].items()), file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli.run(build_parser(), _stage, format_summary, argv)


if __name__ == "__main__":
    sys.exit(main())
