"""What every Modal app of this repo shares: the GPU per model size, the deploy settings, the image.

    GPU_BY_SIZE, DEFAULT_GPU             the smallest GPU whose memory holds a model of each size (the one table)
    model_size_billions(model)           parameters in billions read from a model id, or None
    gpu_for_model(model, quantization)   $TRAIT_GPU if set, else the GPU_BY_SIZE row for the model's size
    ModalSettings.from_env(environ)      the TRAIT_* deploy settings, read without raising;
        .check()                         SettingsError naming the variable when one is malformed or out of the
                                         range Modal accepts (before Modal sees it)
        .image_env()                     the settings baked into the image, so a container sees what was deployed
        .secrets()                       [the Hugging Face secret] when $TRAIT_HF_SECRET names one, else []
    building_app()                       True under the `modal` CLI (deploy / run / serve): when settings are checked
    variant_entry(experiment, variant)   (variant name, config entry), read by utils/config.py (no torch)
    image_mounts(experiment, variant)    (local folder, container folder, ignore) for each folder the image adds
    build_image(experiment, variant, env)  debian-slim + requirements.txt + those folders + env

Importing this module needs neither modal nor torch nor the network (build_image imports modal itself),
so the CLIs and the tests import it anywhere, and a malformed setting never breaks an import.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from core.errors import TraitError
from utils import paths

REPO = Path(__file__).resolve().parents[1]   # the checkout here; /root in a container (inference/ is mounted there)
REMOTE_ROOT = "/root"                        # core/, utils/, inference/, experiments/ inside the container
CACHE_DIR = "/models"                        # the Volume: HF downloads persist across containers
CACHE_VOLUME = "model-cache"                 # that Volume's name
QUANTIZATIONS = ("", "8bit", "4bit")
WEB_AUTHS = ("proxy", "none")
SCALEDOWN_RANGE = (2, 3600)                  # Modal's bounds on scaledown_window, in seconds (_functions.py)
SECRET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")   # what Modal accepts as an object name

# Smallest GPU whose memory holds the weights (bf16: 2 bytes per parameter; 8-bit 1, 4-bit 0.5) plus the
# KV cache of a chat or a batch: (up to this many billion bf16-equivalent parameters, GPU).
GPU_BY_SIZE: tuple[tuple[float, str], ...] = (
    (4.5, "A10G"),          # gemma-2-2b, Qwen3-1.7B, Llama-3.2-3B
    (15.0, "A100-40GB"),    # gemma-2-9b, Llama-3.1-8B, Qwen2.5-14B
    (35.0, "A100-80GB"),    # gemma-2-27b, Qwen2.5-32B
    (80.0, "H100:2"),       # Llama-3.3-70B, Qwen2.5-72B
    (float("inf"), "H100:8"),
)
DEFAULT_GPU = "A10G"        # a model id without a size in its name


class SettingsError(TraitError):
    """A deploy-time environment variable that cannot be used; the message names it."""


def model_size_billions(model: str) -> float | None:
    """Parameters in billions read from a model id (`gemma-2-9b-it` -> 9, `Mixtral-8x7B` -> 56), or None."""
    name = model.lower().replace("_", "-")
    moe = re.search(r"(\d+)x(\d+(?:\.\d+)?)b(?![a-z])", name)
    if moe:
        return int(moe.group(1)) * float(moe.group(2))
    sizes = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)b(?![a-z])", name)
    return float(sizes[-1]) if sizes else None


def gpu_for_model(model: str | None, quantization: str = "") -> str:
    """The GPU for a model id: $TRAIT_GPU if set, else the GPU_BY_SIZE row for its size (DEFAULT_GPU if unknown)."""
    override = os.environ.get("TRAIT_GPU")
    if override:
        return override
    size = model_size_billions(model) if model else None
    if size is None:
        return DEFAULT_GPU
    size *= {"8bit": 0.5, "4bit": 0.25}.get(quantization, 1.0)
    return next(gpu for limit, gpu in GPU_BY_SIZE if size <= limit)


def building_app() -> bool:
    """True when the `modal` CLI imported us (deploy, run, serve): the moment the app is built.

    The container and the local CLIs import the same modules without it, so settings are checked there at
    container start (the class's @modal.enter) or when a local run starts, never by a plain import.
    """
    return "modal.cli.entry_point" in sys.modules


@dataclass(frozen=True)
class ModalSettings:
    """The TRAIT_* environment variables a Modal app is deployed with (raw strings; check() validates)."""

    experiment: str = "demo"            # TRAIT_EXPERIMENT
    model_variant: str = ""             # TRAIT_MODEL_VARIANT (empty: the config's application variant)
    quantization: str = ""              # TRAIT_QUANTIZATION: 8bit, 4bit or empty
    gpu: str = ""                       # TRAIT_GPU (empty: chosen from the model's size)
    scaledown_window: str = "300"       # TRAIT_SCALEDOWN_WINDOW: idle seconds before a container stops (2-3600)
    web_auth: str = "proxy"             # TRAIT_WEB_AUTH: proxy (Modal proxy-auth tokens) or none (public)
    hf_secret: str = ""                 # TRAIT_HF_SECRET: a Modal secret holding HF_TOKEN (gated models); empty: none
    chat_concurrency: str = "8"         # TRAIT_CHAT_CONCURRENCY: chats one container accepts (they take turns)
    max_containers: str = "1"           # TRAIT_MAX_CONTAINERS: chat containers at most (GPUs the chat may hold)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ModalSettings":
        env = os.environ if environ is None else environ
        d = cls()
        return cls(experiment=env.get("TRAIT_EXPERIMENT") or d.experiment,
                   model_variant=env.get("TRAIT_MODEL_VARIANT", d.model_variant),
                   quantization=env.get("TRAIT_QUANTIZATION", d.quantization),
                   gpu=env.get("TRAIT_GPU", d.gpu),
                   scaledown_window=env.get("TRAIT_SCALEDOWN_WINDOW") or d.scaledown_window,
                   web_auth=env.get("TRAIT_WEB_AUTH") or d.web_auth,
                   hf_secret=env.get("TRAIT_HF_SECRET", d.hf_secret).strip(),
                   chat_concurrency=env.get("TRAIT_CHAT_CONCURRENCY") or d.chat_concurrency,
                   max_containers=env.get("TRAIT_MAX_CONTAINERS") or d.max_containers)

    def check(self) -> "ModalSettings":
        lo, hi = SCALEDOWN_RANGE
        if not self.scaledown_window.isdigit() or not lo <= int(self.scaledown_window) <= hi:
            raise SettingsError(f"$TRAIT_SCALEDOWN_WINDOW must be a whole number of seconds from {lo} to {hi} "
                                f"(Modal's range), got {self.scaledown_window!r}")
        if self.web_auth not in WEB_AUTHS:
            raise SettingsError(f"$TRAIT_WEB_AUTH must be proxy or none, got {self.web_auth!r}")
        if self.quantization not in QUANTIZATIONS:
            raise SettingsError(f"$TRAIT_QUANTIZATION must be 8bit, 4bit or empty, got {self.quantization!r}")
        if self.hf_secret and not SECRET_NAME.match(self.hf_secret):
            raise SettingsError(f"$TRAIT_HF_SECRET must name a Modal secret (letters, digits, . _ -), "
                                f"got {self.hf_secret!r}")
        for var, value in (("TRAIT_CHAT_CONCURRENCY", self.chat_concurrency),
                           ("TRAIT_MAX_CONTAINERS", self.max_containers)):
            if not value.isdigit() or int(value) < 1:
                raise SettingsError(f"${var} must be a positive whole number, got {value!r}")
        return self

    @property
    def scaledown_seconds(self) -> int:
        """The window in seconds (the default while a bad value waits for check() to name it: never what Modal
        rejects, so an import never fails on it)."""
        lo, hi = SCALEDOWN_RANGE
        ok = self.scaledown_window.isdigit() and lo <= int(self.scaledown_window) <= hi
        return int(self.scaledown_window) if ok else int(ModalSettings.scaledown_window)

    @property
    def chat_inputs(self) -> int:
        return int(self.chat_concurrency) if self.chat_concurrency.isdigit() and int(self.chat_concurrency) else 8

    @property
    def container_limit(self) -> int:
        return int(self.max_containers) if self.max_containers.isdigit() and int(self.max_containers) else 1

    def secrets(self) -> list:
        """The Hugging Face secret when one is configured ($TRAIT_HF_SECRET), else none: a user without a
        `modal secret create` deploys and runs public models."""
        import modal

        return [modal.Secret.from_name(self.hf_secret)] if self.hf_secret and SECRET_NAME.match(self.hf_secret) \
            else []

    def model(self) -> str | None:
        """The variant's model id from the experiment's config (None without a config)."""
        return variant_entry(self.experiment, self.model_variant)[1].get("model")

    def gpu_choice(self) -> str:
        return self.gpu or gpu_for_model(self.model(), self.quantization)

    def image_env(self, gpu: str) -> dict[str, str]:
        return {"TRAIT_EXPERIMENT": self.experiment, "TRAIT_MODEL_VARIANT": self.model_variant, "TRAIT_GPU": gpu,
                "TRAIT_QUANTIZATION": self.quantization, "TRAIT_SCALEDOWN_WINDOW": self.scaledown_window,
                "TRAIT_WEB_AUTH": self.web_auth, "TRAIT_HF_SECRET": self.hf_secret,
                "TRAIT_CHAT_CONCURRENCY": self.chat_concurrency, "TRAIT_MAX_CONTAINERS": self.max_containers}


def variant_entry(experiment: str, variant: str) -> tuple[str, dict]:
    """(variant name, config entry) at deploy time, read by utils/config.py (no torch); ("", {}) when there is no
    valid config (the container's own load names the problem)."""
    from utils.config import ConfigError, load_config

    try:
        cfg = load_config(experiment)
    except ConfigError:
        return "", {}
    variants = cfg["model_variants"]
    name = variant or (cfg.get("defaults") or {}).get("application") or next(iter(variants))
    return name, dict(variants.get(name) or {})


def _python_only(rel: Path) -> bool:      # ignore predicate: True drops the file
    return "__pycache__" in rel.parts or rel.suffix == ".pyc"


def _not_vector_file(rel: Path) -> bool:  # extraction/: only vectors and their metadata (not activations)
    return not ("vectors" in rel.parts and rel.suffix in (".pt", ".json"))


def _not_evidence_file(rel: Path) -> bool:  # steering/: only what best-vector selection reads
    return rel.name not in ("results.jsonl", "naturalness.json")


def image_mounts(experiment: str, variant: str = "") -> list[tuple[Path, str, Callable[[Path], bool]]]:
    """(local folder, container folder, ignore predicate) for each folder the image adds.

    core/, utils/ and inference/ (the code), analysis/assets/ (the chat page's token renderer); the
    experiment's extraction/ (vectors and metadata only) and steering/ (results only, the best-vector
    evidence); and the variant's model / LoRA when they are local folders. Missing folders are left out.
    """
    exp_dir = paths.experiment_dir(experiment)
    remote_exp = f"{REMOTE_ROOT}/experiments/{experiment}"
    out = [(REPO / sub, f"{REMOTE_ROOT}/{sub}", _python_only) for sub in ("core", "utils", "inference")]
    if (REPO / "analysis" / "assets").is_dir():
        out.append((REPO / "analysis" / "assets", f"{REMOTE_ROOT}/analysis/assets", _python_only))
    if not experiment:  # the code only: inference/modal_batch.py keeps the experiment on a Volume
        return out
    for sub, ignore in (("extraction", _not_vector_file), ("steering", _not_evidence_file)):
        if (exp_dir / sub).is_dir():
            out.append((exp_dir / sub, f"{remote_exp}/{sub}", ignore))
    _, entry = variant_entry(experiment, variant)
    for ref in (entry.get("model"), entry.get("lora")):
        if not isinstance(ref, str) or not ref:
            continue
        p = Path(ref)
        if p.is_absolute():
            if p.is_dir():
                out.append((p, str(p), _python_only))
        elif (exp_dir / p).is_dir():  # utils.config resolves relative folders against the experiment first
            out.append((exp_dir / p, f"{remote_exp}/{p.as_posix()}", _python_only))
        elif (REPO / p).is_dir():
            out.append((REPO / p, f"{REMOTE_ROOT}/{p.as_posix()}", _python_only))
    return out


def build_image(experiment: str, variant: str = "", env: Mapping[str, str] | None = None):
    """debian-slim + our pinned requirements.txt + the code, vectors and config (added at container start).

    `env` (e.g. ModalSettings.image_env(gpu)) goes into the image's environment, so the container, which
    imports the app's module again, sees the same experiment, variant and GPU as the machine that deployed it.
    Building the image description needs no network (Modal builds it on deploy).
    """
    import modal

    image = (modal.Image.debian_slim(python_version="3.11")
             .pip_install_from_requirements(str(REPO / "requirements.txt"))
             .env({"HF_HOME": f"{CACHE_DIR}/hf", "TRAIT_EXPERIMENTS_DIR": f"{REMOTE_ROOT}/experiments",
                   "TOKENIZERS_PARALLELISM": "false", **dict(env or {})}))
    config = paths.config_path(experiment) if experiment else None
    if config is not None and config.is_file():
        image = image.add_local_file(config, f"{REMOTE_ROOT}/experiments/{experiment}/config.json")
    for local, remote, ignore in image_mounts(experiment, variant):
        image = image.add_local_dir(local, remote, ignore=ignore)
    return image
