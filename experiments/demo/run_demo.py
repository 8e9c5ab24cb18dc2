#!/usr/bin/env python
"""`make demo`: the whole pipeline on a tiny local model, offline, in a few minutes on 2 CPU cores.

1. builds a tiny Llama-architecture chat model (random weights, utils/zoo.py) and a random LoRA variant
   of it into experiments/demo/models/ (variants `base` and `lora` in experiments/demo/config.json);
2. extracts vectors for three demo traits from datasets/traits/demo/ (extraction/extract_vectors.py);
3. runs every stage exactly as a researcher would from the shell, printing each command:
   generate (lora) -> capture (lora) -> capture (base, --responses-from lora) -> project (both)
   -> extract_viz -> model diff (compare_variants, per_token_diff);
4. prints one prompt's response tokens with their per-token trait scores, and where every file went.

Rerunnable: every stage runs with --skip-existing, so a second run only prints the table.
The model has random weights, so its text is gibberish: the demo shows the mechanics, not a finding.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXP = "demo"
PROMPT_SET = "harmful"
TRAITS = ["demo/refusal", "demo/sycophancy", "demo/formality"]
MAX_NEW_TOKENS = 24


def run(args: list[str]) -> None:
    """Run one stage as its shell command (printed first), failing the demo when it fails."""
    print(f"\n$ python {shlex.join(args)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): python {shlex.join(args)}")


def build_models(exp_dir: Path) -> None:
    import transformers

    import utils.model  # noqa: F401  (its import quiets dependency messages users cannot act on)
    from utils.zoo import build_lora_adapter, build_model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base = exp_dir / "models" / "base"
    lora = exp_dir / "models" / "lora"
    fresh = not (base / "config.json").exists() or not (lora / "adapter_config.json").exists()
    build_model("llama", base, seed=0)
    build_lora_adapter(base, lora, seed=1)
    print(f"{'built' if fresh else 'found'} demo model {base.relative_to(ROOT)} and LoRA {lora.relative_to(ROOT)}")


def colour(score: float, scale: float) -> str:
    """An ANSI 256-colour background from blue (negative) through grey to red (positive)."""
    x = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    reds = [236, 52, 88, 124, 160, 196]
    blues = [236, 17, 18, 19, 20, 21]
    shade = (reds if x >= 0 else blues)[min(5, int(abs(x) * 5.999))]
    return f"\033[48;5;{shade}m\033[97m"


def show_table(max_rows: int = 24) -> None:
    from utils import paths
    from utils.responses import list_response_files, load_response
    from utils.storage import read_json

    files = list_response_files(EXP, "lora", PROMPT_SET)
    pid = files[0].stem
    resp = load_response(files[0])
    tokens = resp["tokens"][resp["prompt_end"]:]
    cols = []
    for trait in TRAITS:
        proj = read_json(paths.projection_file(EXP, "lora", trait, PROMPT_SET, pid))
        entry = proj["projections"][0]
        cols.append((trait.split("/")[-1], entry["layer"], entry["response"]))
    use_colour = sys.stdout.isatty() or os.environ.get("FORCE_COLOR")
    scale = max((abs(v) for _, _, vals in cols for v in vals), default=1.0) or 1.0
    print(f"\nPer-token trait scores, variant lora, prompt {PROMPT_SET}/{pid} "
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


def show_files() -> None:
    from utils import paths

    exp_dir = paths.experiment_dir(EXP)
    print("\nWhere everything went:")
    for label, path in [
        ("models", exp_dir / "models"),
        ("trait vectors", paths.extraction_dir(EXP)),
        ("responses", paths.responses_dir(EXP, "lora", PROMPT_SET)),
        ("raw activations (lora)", paths.raw_dir(EXP, "lora", PROMPT_SET)),
        ("raw activations (base, same tokens)", paths.raw_dir(EXP, "base", PROMPT_SET)),
        ("projections (lora)", paths.inference_dir(EXP, "lora") / "projections"),
        ("projections (base)", paths.inference_dir(EXP, "base") / "projections"),
        ("attention + logit lens", paths.per_token_dir(EXP, PROMPT_SET)),
        ("model diff", paths.model_diff_dir(EXP, "base", "lora")),
    ]:
        n = sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0
        print(f"  {label:<38} {path.relative_to(ROOT)}  ({n} files)")


def main() -> int:
    from utils import paths

    t0 = time.perf_counter()
    build_models(paths.experiment_dir(EXP))
    traits = ",".join(TRAITS)
    vectors_exist = all((paths.vectors_dir(EXP, t, "base")).exists() for t in TRAITS)
    if not vectors_exist:
        run(["extraction/extract_vectors.py", "--experiment", EXP, "--traits", traits, "--model-variant", "base"])
    else:
        print("\ntrait vectors already extracted (delete experiments/demo/extraction to redo)")
    common = ["--experiment", EXP, "--prompt-set", PROMPT_SET]
    run(["inference/generate_responses.py", *common, "--model-variant", "lora",
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--skip-existing", "--no-server"])
    run(["inference/capture_raw_activations.py", *common, "--model-variant", "lora", "--skip-existing"])
    run(["inference/capture_raw_activations.py", *common, "--model-variant", "base", "--responses-from", "lora",
         "--skip-existing"])
    for variant in ("lora", "base"):
        run(["inference/project_raw_activations_onto_traits.py", *common, "--model-variant", variant,
             "--traits", traits, "--skip-existing"])
    run(["inference/extract_viz.py", *common, "--model-variant", "lora", "--attention", "--logit-lens",
         "--top-k", "5", "--skip-existing"])
    run(["analysis/model_diff/compare_variants.py", "--experiment", EXP, "--variant-a", "base", "--variant-b", "lora",
         "--prompt-set", PROMPT_SET, "--use-best-vector"])
    run(["analysis/model_diff/per_token_diff.py", "--experiment", EXP, "--variant-a", "base", "--variant-b", "lora",
         "--prompt-set", PROMPT_SET, "--trait", "all", "--top-pct", "5"])
    show_table()
    show_files()
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; rerun `make demo` to see the table again "
          f"(every stage skips what exists), `make clean-demo` to start over.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
