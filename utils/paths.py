"""Every path of the experiment layout, in one place, independent of the current directory.

    REPO_ROOT                                   the checkout (parent of utils/)
    experiments_root() / experiment_dir(exp)    experiments/  (override: $TRAIT_EXPERIMENTS_DIR)
    datasets_root()                             datasets/     (override: $TRAIT_DATASETS_DIR)
    config_path(exp)                            experiments/{exp}/config.json
    prompt_set_file(name)                       datasets/inference/{name}.json
    set_dir(prompt_set, suffix)                 "{prompt_set}" or "{prompt_set}_{suffix}" (nested sets allowed)
    responses_dir / response_file               inference/{variant}/responses/{set}/{id}.json
    raw_dir / raw_file                          inference/{variant}/raw/residual/{set}/{id}.pt
    means_dir / means_file                      inference/{variant}/raw/means/{set}/{id}.pt (model-diff means)
    files_by_id(folder, ext) / raw_files / means_files   {id: path} of a folder's files, natural id order
    projection_dir / projection_file            inference/{variant}/projections/{category}/{trait}/{set}/{id}.json
    calibration_file(exp, variant=None)         inference/{variant}/massive_activations/calibration.json (None: shared)
    vectors_dir / vector_file / vector_metadata extraction/{trait}/{variant}/vectors/{pos_dir}/{component}/{method}/...
    steering_results(exp, trait, variant, pos_dir)   steering/{trait}/{variant}/{pos_dir}/steering/results.jsonl
    per_token_dir(exp, set)                     analysis/per_token/{set}/
    model_diff_dir(exp, a, b)                   model_diff/{a}_vs_{b}/
    report_file(exp, set, compare=None)         analysis/report/{set}.html | {set}_{a}_vs_{b}.html
    traits_data_dir(trait)                      datasets/traits/{category}/{trait}/
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def experiments_root() -> Path:
    return Path(os.environ.get("TRAIT_EXPERIMENTS_DIR") or REPO_ROOT / "experiments")


def datasets_root() -> Path:
    return Path(os.environ.get("TRAIT_DATASETS_DIR") or REPO_ROOT / "datasets")


def experiment_dir(exp: str) -> Path:
    return experiments_root() / exp


def config_path(exp: str) -> Path:
    return experiment_dir(exp) / "config.json"


def prompt_sets_dir() -> Path:
    return datasets_root() / "inference"


def prompt_set_file(name: str) -> Path:
    return prompt_sets_dir() / f"{name}.json"


def set_dir(prompt_set: str, suffix: str | None = None) -> str:
    """The folder name of a prompt set: nested names stay nested, --output-suffix S appends `_S`."""
    prompt_set = prompt_set.strip("/")
    return f"{prompt_set}_{suffix}" if suffix else prompt_set


def inference_dir(exp: str, variant: str) -> Path:
    return experiment_dir(exp) / "inference" / variant


def responses_dir(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> Path:
    return inference_dir(exp, variant) / "responses" / set_dir(prompt_set, suffix)


def response_file(exp: str, variant: str, prompt_set: str, prompt_id: str | int, suffix: str | None = None) -> Path:
    return responses_dir(exp, variant, prompt_set, suffix) / f"{prompt_id}.json"


def raw_dir(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> Path:
    return inference_dir(exp, variant) / "raw" / "residual" / set_dir(prompt_set, suffix)


def raw_file(exp: str, variant: str, prompt_set: str, prompt_id: str | int, suffix: str | None = None) -> Path:
    return raw_dir(exp, variant, prompt_set, suffix) / f"{prompt_id}.pt"


def projection_dir(exp: str, variant: str, trait: str, prompt_set: str) -> Path:
    return inference_dir(exp, variant) / "projections" / trait / prompt_set.strip("/")


def projection_file(exp: str, variant: str, trait: str, prompt_set: str, prompt_id: str | int) -> Path:
    return projection_dir(exp, variant, trait, prompt_set) / f"{prompt_id}.json"


def calibration_file(exp: str, variant: str | None = None) -> Path:
    """The variant's calibration; with variant=None the experiment-wide file trait-interp read."""
    base = inference_dir(exp, variant) if variant else experiment_dir(exp) / "inference"
    return base / "massive_activations" / "calibration.json"


def extraction_dir(exp: str) -> Path:
    return experiment_dir(exp) / "extraction"


def vectors_dir(exp: str, trait: str, variant: str) -> Path:
    return extraction_dir(exp) / trait / variant / "vectors"


def vector_method_dir(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str) -> Path:
    return vectors_dir(exp, trait, variant) / pos_dir / component / method


def vector_file(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str, layer: int) -> Path:
    return vector_method_dir(exp, trait, variant, pos_dir, component, method) / f"layer{layer}.pt"


def vector_metadata(exp: str, trait: str, variant: str, pos_dir: str, component: str, method: str) -> Path:
    return vector_method_dir(exp, trait, variant, pos_dir, component, method) / "metadata.json"


def steering_dir(exp: str, trait: str, variant: str, pos_dir: str) -> Path:
    return experiment_dir(exp) / "steering" / trait / variant / pos_dir / "steering"


def steering_results(exp: str, trait: str, variant: str, pos_dir: str) -> Path:
    return steering_dir(exp, trait, variant, pos_dir) / "results.jsonl"


def per_token_dir(exp: str, prompt_set: str) -> Path:
    return experiment_dir(exp) / "analysis" / "per_token" / prompt_set.strip("/")


def model_diff_dir(exp: str, variant_a: str, variant_b: str) -> Path:
    return experiment_dir(exp) / "model_diff" / f"{variant_a}_vs_{variant_b}"


def traits_data_dir(trait: str) -> Path:
    return datasets_root() / "traits" / trait


def natural_key(stem: str) -> tuple:
    """Sort ids naturally: 2 before 10, numbers before words."""
    import re

    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", stem) if p)


def means_dir(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> Path:
    """inference/{variant}/raw/means/{set}/: per-prompt mean activations for the model diff (utils/means.py)."""
    return inference_dir(exp, variant) / "raw" / "means" / set_dir(prompt_set, suffix)


def means_file(exp: str, variant: str, prompt_set: str, prompt_id: str | int, suffix: str | None = None) -> Path:
    return means_dir(exp, variant, prompt_set, suffix) / f"{prompt_id}.pt"


def report_file(exp: str, prompt_set: str, compare: tuple[str, str] | None = None) -> Path:
    """analysis/report/{set}.html, or {set}_{A}_vs_{B}.html for a model diff (analysis/report.py)."""
    name = prompt_set.strip("/") + (f"_{compare[0]}_vs_{compare[1]}" if compare else "")
    return experiment_dir(exp) / "analysis" / "report" / f"{name}.html"


def files_by_id(folder: Path, ext: str = ".pt") -> dict[str, Path]:
    """{id: path} of the `*{ext}` files directly in `folder`, in natural id order ({} when it does not exist).

    Hidden files (a write in progress is `.{name}.tmp`) are not results and are left out.
    """
    if not folder.is_dir():
        return {}
    found = [p for p in folder.glob(f"*{ext}") if not p.name.startswith(".")]
    return {p.stem: p for p in sorted(found, key=lambda p: natural_key(p.stem))}


def raw_files(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> dict[str, Path]:
    """{id: raw .pt} of a captured prompt set."""
    return files_by_id(raw_dir(exp, variant, prompt_set, suffix))


def means_files(exp: str, variant: str, prompt_set: str, suffix: str | None = None) -> dict[str, Path]:
    """{id: means .pt} of a prompt set (utils/means.py)."""
    return files_by_id(means_dir(exp, variant, prompt_set, suffix))
