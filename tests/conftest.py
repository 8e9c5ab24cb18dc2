"""Shared fixtures: the tiny-model zoo, built once per test session (seconds), and a scratch experiments root."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

from utils.zoo import ARCHS, build_lora_adapter, build_model  # noqa: E402


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo(zoo_dir):
    """zoo(arch) -> path of a saved tiny model of that architecture (built on first use)."""
    def get(arch: str) -> str:
        return str(build_model(arch, zoo_dir / arch))
    return get


@pytest.fixture(scope="session")
def zoo_lora(zoo, zoo_dir):
    """zoo_lora(arch) -> path of a random LoRA adapter for the zoo model of that architecture."""
    def get(arch: str, seed: int = 1) -> str:
        return str(build_lora_adapter(zoo(arch), zoo_dir / f"{arch}_lora{seed}", seed=seed))
    return get


@pytest.fixture
def experiments(tmp_path, monkeypatch):
    """A scratch experiments root (TRAIT_EXPERIMENTS_DIR); make_experiment(name, variants) writes config.json."""
    root = tmp_path / "experiments"
    root.mkdir()
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(root))

    def make(name: str, variants: dict, defaults: dict | None = None, use_chat_template=None) -> Path:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"defaults": defaults or {"extraction": next(iter(variants)), "application": next(iter(variants))},
               "model_variants": variants, "use_chat_template": use_chat_template}
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return d
    return make


ALL_ARCHS = ARCHS
