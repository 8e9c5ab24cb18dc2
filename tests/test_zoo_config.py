"""utils/paths.py, utils/config.py and utils/zoo.py: layout, cwd independence, variant resolution, the zoo itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils import paths
from utils.config import ConfigError, Variant, list_experiments, load_config, resolve_variant, use_chat_template
from utils.zoo import ARCHS, build_model, build_tokenizer


# ---------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------

def _all_paths() -> list[Path]:
    return [paths.experiments_root(), paths.datasets_root(), paths.config_path("e"), paths.prompt_set_file("a/b"),
            paths.response_file("e", "v", "s", 1), paths.raw_file("e", "v", "s", "x"),
            paths.projection_file("e", "v", "c/t", "s", 2), paths.calibration_file("e", "v"),
            paths.vector_file("e", "c/t", "v", "response__5", "residual", "probe", 3),
            paths.steering_results("e", "c/t", "v", "response__5"), paths.per_token_dir("e", "s"),
            paths.model_diff_dir("e", "a", "b"), paths.traits_data_dir("c/t")]


def test_paths_do_not_depend_on_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAIT_EXPERIMENTS_DIR", raising=False)
    monkeypatch.delenv("TRAIT_DATASETS_DIR", raising=False)
    here = _all_paths()
    monkeypatch.chdir(tmp_path)
    assert _all_paths() == here
    repo = Path(__file__).resolve().parents[1]
    assert paths.REPO_ROOT == repo
    assert all(p.is_absolute() for p in here)
    assert paths.experiments_root() == repo / "experiments" and paths.datasets_root() == repo / "datasets"


def test_root_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(tmp_path / "exps"))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(tmp_path / "data"))
    assert paths.config_path("e") == tmp_path / "exps" / "e" / "config.json"
    assert paths.prompt_set_file("rm_syco/train_100") == tmp_path / "data" / "inference" / "rm_syco" / "train_100.json"
    assert paths.traits_data_dir("alignment/deception") == tmp_path / "data" / "traits" / "alignment" / "deception"


def test_experiment_layout_and_nested_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(tmp_path))
    inf = tmp_path / "e" / "inference" / "v"
    assert paths.response_file("e", "v", "rm_syco/train_100", 3) == inf / "responses/rm_syco/train_100/3.json"
    assert paths.raw_file("e", "v", "rm_syco/train_100/", "a") == inf / "raw/residual/rm_syco/train_100/a.pt"
    assert (paths.projection_file("e", "v", "alignment/deception", "rm_syco/train_100", 7)
            == inf / "projections/alignment/deception/rm_syco/train_100/7.json")
    assert paths.per_token_dir("e", "rm_syco/train_100") == tmp_path / "e/analysis/per_token/rm_syco/train_100"
    # B3 (docs/original-bugs.md): the calibration lives under the variant; the experiment-wide file is still reachable
    assert paths.calibration_file("e", "v") == inf / "massive_activations/calibration.json"
    assert paths.calibration_file("e") == tmp_path / "e/inference/massive_activations/calibration.json"
    vec = tmp_path / "e/extraction/alignment/deception/base/vectors/response__5/residual/probe"
    assert paths.vector_file("e", "alignment/deception", "base", "response__5", "residual", "probe", 12) == vec / "layer12.pt"
    assert paths.vector_metadata("e", "alignment/deception", "base", "response__5", "residual", "probe") == vec / "metadata.json"
    assert (paths.steering_results("e", "alignment/deception", "base", "response__5")
            == tmp_path / "e/steering/alignment/deception/base/response__5/steering/results.jsonl")
    assert paths.model_diff_dir("e", "instruct", "rm_lora") == tmp_path / "e/model_diff/instruct_vs_rm_lora"


def test_output_suffix_naming(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIT_EXPERIMENTS_DIR", str(tmp_path))
    assert paths.set_dir("harmful") == "harmful"
    assert paths.set_dir("harmful", "v2") == "harmful_v2"
    assert paths.set_dir("rm_syco/train_100", "steered") == "rm_syco/train_100_steered"
    assert paths.set_dir("rm_syco/train_100", None) == paths.set_dir("rm_syco/train_100", "") == "rm_syco/train_100"
    inf = tmp_path / "e" / "inference" / "v"
    assert paths.responses_dir("e", "v", "rm_syco/train_100", "s") == inf / "responses/rm_syco/train_100_s"
    assert paths.raw_file("e", "v", "harmful", 1, suffix="s") == inf / "raw/residual/harmful_s/1.pt"
    assert paths.response_file("e", "v", "harmful", 1, suffix="s") == inf / "responses/harmful_s/1.json"


def test_natural_key():
    stems = ["10", "2", "b", "1", "a10", "a2", "a"]
    assert sorted(stems, key=paths.natural_key) == ["1", "2", "10", "a", "a2", "a10", "b"]


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------

VARIANTS = {"base": {"model": "org/base"}, "instruct": {"model": "org/instruct"},
            "rm_lora": {"model": "org/instruct", "lora": "org/adapter"}}


def test_resolve_variant_defaults_and_fallback(experiments):
    experiments("exp", VARIANTS, defaults={"application": "instruct", "extraction": "base"})
    assert resolve_variant("exp") == Variant("instruct", "org/instruct")
    assert resolve_variant("exp", role="application").name == "instruct"
    assert resolve_variant("exp", role="extraction") == Variant("base", "org/base")
    v = resolve_variant("exp", "rm_lora")
    assert (v.name, v.model, v.lora) == ("rm_lora", "org/instruct", "org/adapter")
    assert v.model_path("exp") == "org/instruct" and v.lora_path("exp") == "org/adapter"  # hub ids stay ids
    # no defaults at all: the first variant, for every role
    d = experiments("nodefaults", VARIANTS)
    (d / "config.json").write_text(json.dumps({"model_variants": VARIANTS}))
    assert resolve_variant("nodefaults").name == "base"
    assert resolve_variant("nodefaults", role="extraction").name == "base"
    # a default only for one role
    (d / "config.json").write_text(json.dumps({"defaults": {"extraction": "rm_lora"}, "model_variants": VARIANTS}))
    assert resolve_variant("nodefaults", role="extraction").name == "rm_lora"
    assert resolve_variant("nodefaults").name == "base"


def test_unknown_experiment_lists_experiments(experiments):
    experiments("alpha", VARIANTS)
    experiments("beta", VARIANTS)
    with pytest.raises(ConfigError, match=r"unknown experiment 'gamma'.*experiments: alpha, beta"):
        resolve_variant("gamma")
    assert list_experiments() == ["alpha", "beta"]


def test_unknown_experiment_in_empty_root(experiments):
    with pytest.raises(ConfigError, match=r"experiments: none"):
        load_config("nothing")


def test_unknown_variant_lists_variants(experiments):
    experiments("exp", VARIANTS)
    with pytest.raises(ConfigError, match=r"unknown model variant 'chat' in experiment 'exp' \(variants: base, instruct, rm_lora\)"):
        resolve_variant("exp", "chat")
    # a default that names a missing variant is reported the same way
    experiments("bad_default", VARIANTS, defaults={"application": "gone", "extraction": "base"})
    with pytest.raises(ConfigError, match="unknown model variant 'gone'.*variants: base, instruct, rm_lora"):
        resolve_variant("bad_default")


@pytest.mark.parametrize(("text", "message"), [
    ("{broken", "malformed JSON"),
    ('{"model_variants": {}}', "non-empty 'model_variants'"),
    ('[1, 2]', "non-empty 'model_variants'"),
    ('{"defaults": "base", "model_variants": {"base": {"model": "m"}}}', "'defaults' must be an object"),
])
def test_malformed_config(experiments, text, message):
    d = experiments("exp", VARIANTS)
    (d / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config("exp")
    assert "config.json" in str(err.value)


def test_variant_without_model(experiments):
    experiments("exp", {"base": {"lora": "x"}})
    with pytest.raises(ConfigError, match="variant 'base' needs a 'model' string"):
        resolve_variant("exp")


def test_relative_local_model_resolved_against_the_experiment(experiments, tmp_path, monkeypatch):
    d = experiments("exp", {"local": {"model": "models/tiny", "lora": "adapters/a"}}, use_chat_template=False)
    (d / "models" / "tiny").mkdir(parents=True)
    (d / "adapters" / "a").mkdir(parents=True)
    v = resolve_variant("exp")
    monkeypatch.chdir(tmp_path)
    assert v.model_path("exp") == str(d / "models" / "tiny")
    assert v.lora_path("exp") == str(d / "adapters" / "a")
    assert use_chat_template("exp") is False


# ---------------------------------------------------------------------------------------------------------
# zoo
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_zoo_models_load_like_hub_models(zoo, arch):
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(zoo(arch))
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == arch
    assert (cfg.n_layer if arch == "gpt2" else cfg.num_hidden_layers) == 4
    assert json.loads((folder / "zoo.json").read_text())["arch"] == arch
    tok = AutoTokenizer.from_pretrained(folder)
    assert {"<bos>", "<eos>", "<pad>", "<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    text = "hello world, café 日本 🙂"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<bos><|im_start|>user\nhi<|im_end|>\n")


def test_zoo_is_deterministic_and_unknown_arch_is_named(tmp_path, zoo):
    from safetensors.torch import load_file

    again = build_model("qwen2", tmp_path / "qwen2")
    a = load_file(Path(zoo("qwen2")) / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    norms = [k for k in a if k.endswith("norm.weight")]
    assert norms and all(not torch.equal(a[k], torch.ones_like(a[k])) for k in norms)  # perturbed off init
    with pytest.raises(ValueError, match="unknown zoo architecture 'bert'.*llama"):
        build_model("bert", tmp_path / "bert")


def test_tokenizer_bos_setting():
    assert build_tokenizer()("hi")["input_ids"][0] == build_tokenizer().bos_token_id
    no_bos = build_tokenizer(add_bos=False)
    assert no_bos.bos_token_id not in no_bos("hi")["input_ids"]
