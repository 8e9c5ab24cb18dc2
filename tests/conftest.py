"""Shared fixtures: the tiny-model zoo, built once per test session (seconds), a scratch experiments root, and
the two real trained models (marker `real`: SmolLM2-135M-Instruct and Gemma-3-270m, fetched once per machine by
utils/real_models.py and skipped with the reason only when they cannot be fetched)."""
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


def pytest_configure(config):
    config.addinivalue_line("markers", "real: uses a real trained model (utils/real_models.py; fetched once, then offline)")
    config.addinivalue_line("markers", "slow: minutes on 2 cores; left out of `make test`, run by `make test-slow` and CI")


def _real_model(name: str) -> Path:
    from utils.real_models import RealModelError, ensure_model

    try:
        return ensure_model(name)
    except RealModelError as e:
        pytest.skip(f"real model {name} unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The HF folder of SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template)."""
    return _real_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The HF folder of Gemma-3-270m base (Gemma-3 architecture with post-norms, 18 layers)."""
    return _real_model("gemma3")


@pytest.fixture(scope="session")
def real_model_dir(smollm2_dir) -> Path:
    """The default real model (SmolLM2-135M-Instruct)."""
    return smollm2_dir


ALL_ARCHS = ARCHS
