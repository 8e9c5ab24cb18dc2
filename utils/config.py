"""Experiment config.json and model-variant resolution.

    load_config(exp)                  -> dict     experiments/{exp}/config.json, validated (validate_config: every
                                                 key's type); errors list known experiments
    resolve_variant(exp, name, role)  -> Variant  name, or defaults.{role}, or the first variant
    Variant                           dataclass: name, model, lora, raw (the config entry)
    ConfigError                       unknown experiment / variant, malformed config
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from utils import paths
from utils.storage import StorageError, read_json
from core.errors import TraitError


class ConfigError(TraitError):
    """A user-facing configuration error; the message says what exists."""


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    lora: str | None = None
    raw: dict = field(default_factory=dict, compare=False)

    def model_path(self, exp: str | None = None) -> str:
        """`model` as given (hub id), or resolved against the repo/experiment when it is a relative local folder."""
        return _local_or_id(self.model, exp)

    def lora_path(self, exp: str | None = None) -> str | None:
        return _local_or_id(self.lora, exp) if self.lora else None


def _local_or_id(ref: str, exp: str | None) -> str:
    p = Path(ref)
    if p.is_absolute():
        return ref
    for base in ([paths.experiment_dir(exp)] if exp else []) + [paths.REPO_ROOT]:
        if (base / p).exists():
            return str(base / p)
    return ref


def list_experiments() -> list[str]:
    root = paths.experiments_root()
    return sorted(p.parent.name for p in root.glob("*/config.json")) if root.exists() else []


def load_config(exp: str) -> dict:
    path = paths.config_path(exp)
    if not path.exists():
        known = ", ".join(list_experiments()) or "none"
        raise ConfigError(f"unknown experiment {exp!r}: {path} not found (experiments: {known})")
    try:
        cfg = read_json(path)
    except StorageError as e:
        raise ConfigError(str(e)) from e
    return validate_config(cfg, path)


def validate_config(cfg, path: str | Path) -> dict:
    """`cfg` when every key has the documented type (docs/formats.md), else ConfigError naming the key."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_variants"), dict) or not cfg["model_variants"]:
        raise ConfigError(f"{path}: needs a non-empty 'model_variants' object")
    defaults = cfg.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be an object like {{\"application\": \"variant\"}}")
    for role, name in defaults.items():
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{path}: defaults.{role} must be a variant name (a string), got {type(name).__name__}")
    for name, entry in cfg["model_variants"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ConfigError(f"{path}: variant {name!r} needs a 'model' string (hub id or folder)")
        if entry.get("lora") is not None and (not isinstance(entry["lora"], str) or not entry["lora"]):
            raise ConfigError(f"{path}: variant {name!r}: 'lora' must be a string (hub id or folder) or null")
    if cfg.get("use_chat_template") not in (None, True, False):
        raise ConfigError(f"{path}: 'use_chat_template' must be true, false or null")
    return cfg


def resolve_variant(exp: str, name: str | None = None, role: str = "application") -> Variant:
    """The named variant, else `defaults.{role}` (application / extraction), else the first variant."""
    cfg = load_config(exp)
    variants = cfg["model_variants"]
    chosen = name or (cfg.get("defaults") or {}).get(role) or next(iter(variants))
    if chosen not in variants:
        raise ConfigError(
            f"unknown model variant {chosen!r} in experiment {exp!r} (variants: {', '.join(variants)})"
        )
    entry = variants[chosen]
    return Variant(name=chosen, model=entry["model"], lora=entry.get("lora"), raw=entry)


def use_chat_template(exp: str) -> bool | None:
    """config.use_chat_template: True / False, or None for auto (when the tokenizer has a template)."""
    return load_config(exp).get("use_chat_template")
