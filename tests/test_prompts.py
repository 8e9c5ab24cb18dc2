"""utils/prompts.py: both prompt-set shapes, id/key variants, nested names, errors that name file and item,
and the shipped datasets/inference sets."""
from __future__ import annotations

import json

import pytest

from utils import paths
from utils.prompts import PromptSetError, list_prompt_sets, load_prompt_set, parse_prompt_ids


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """write(name, obj) puts a prompt set under a scratch TRAIT_DATASETS_DIR."""
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(tmp_path / "datasets"))

    def write(name: str, obj, raw: str | None = None):
        f = tmp_path / "datasets" / "inference" / f"{name}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(raw if raw is not None else json.dumps(obj), encoding="utf-8")
        return f
    return write


def test_object_shape_with_system_prompt_and_mixed_keys(datasets):
    datasets("s", {"name": "s", "description": "d", "system_prompt": "Be terse.", "prompts": [
        {"id": 1, "text": "one", "note": "n1"}, {"id": "b", "prompt": "two", "extra": [1, 2]},
        {"id": 3, "text": "", "note": ""}]})
    ps = load_prompt_set("s")
    assert ps.system_prompt == "Be terse." and ps.description == "d"
    assert ps.ids == ["1", "b", "3"]
    assert [p.text for p in ps.prompts] == ["one", "two", ""]
    assert [p.note for p in ps.prompts] == ["n1", None, None]  # empty note -> None, as prompt_note
    assert ps.prompts[1].extra == {"extra": [1, 2]}
    assert ps.path == paths.prompt_set_file("s")


def test_bare_list_and_nested_name(datasets):
    datasets("rm_syco/train_100", [{"id": 7, "prompt": "seven"}, {"id": "x-1", "text": "x"}])
    for name in ("rm_syco/train_100", "rm_syco/train_100.json", "/rm_syco/train_100/"):
        ps = load_prompt_set(name)
        assert ps.name == "rm_syco/train_100" and ps.ids == ["7", "x-1"] and ps.system_prompt is None
    assert "rm_syco/train_100" in list_prompt_sets()


def test_unknown_set_lists_close_names(datasets):
    datasets("single_trait", [{"id": 1, "text": "a"}])
    datasets("multi_trait", [{"id": 1, "text": "a"}])
    datasets("rm_syco/train_100", [{"id": 1, "text": "a"}])
    with pytest.raises(PromptSetError) as e:
        load_prompt_set("singel_trait")
    assert "single_trait" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(PromptSetError) as e:
        load_prompt_set("train_100")  # the leaf of a nested set
    assert "rm_syco/train_100" in str(e.value)
    with pytest.raises(PromptSetError) as e:
        load_prompt_set("zzzzzz")
    assert "available" in str(e.value) and "multi_trait" in str(e.value)


@pytest.mark.parametrize("obj, needle", [
    ({"prompts": [{"id": 1, "text": "a"}, {"id": 2}]}, "prompt #1 (id '2'): missing 'text'"),
    ({"prompts": [{"text": "a"}]}, "prompt #0: missing 'id'"),
    ({"prompts": [{"id": 1, "text": 5}]}, "prompt #0 (id '1'): 'text' must be a string"),
    ({"prompts": [{"id": 1.5, "text": "a"}]}, "prompt #0: 'id' must be a string or an integer"),
    ({"prompts": [{"id": True, "text": "a"}]}, "prompt #0: 'id' must be"),
    ({"prompts": [{"id": "a/b", "text": "a"}]}, "prompt #0 (id 'a/b')"),
    ({"prompts": [{"id": "..", "text": "a"}]}, "prompt #0 (id '..')"),
    ({"prompts": [{"id": 1, "text": "a"}, {"id": "1", "text": "b"}]}, "prompt #1 (id '1'): duplicate id"),
    ({"prompts": ["just a string"]}, "prompt #0: expected an object"),
    ({"prompts": [{"id": 1, "text": "a", "note": 3}]}, "'note' must be a string"),
    ({"items": []}, "expected a 'prompts' list"),
    ({"prompts": [], "system_prompt": 3}, "'system_prompt' must be a string"),
    ("text", "expected an object with 'prompts' or a list"),
])
def test_malformed_set_names_file_and_item(datasets, obj, needle):
    f = datasets("bad", obj)
    with pytest.raises(PromptSetError) as e:
        load_prompt_set("bad")
    assert str(f) in str(e.value) and needle in str(e.value)


def test_malformed_json_names_file(datasets):
    f = datasets("broken", None, raw='{"prompts": [ {"id": 1, "text": "a"} ')
    with pytest.raises(PromptSetError) as e:
        load_prompt_set("broken")
    assert str(f) in str(e.value) and "malformed JSON" in str(e.value)


@pytest.mark.parametrize("name", ["../secrets", "a/../../b", "", "/etc/passwd/"])
def test_set_names_cannot_escape_the_datasets_folder(datasets, name):
    datasets("ok", [{"id": 1, "text": "a"}])
    with pytest.raises(PromptSetError):
        load_prompt_set(name)


SHIPPED = {"single_trait": 10, "multi_trait": 10, "dynamic": 8, "adversarial": 8, "baseline": 5,
           "real_world": 10, "harmful": 5, "benign": 5}


@pytest.mark.parametrize("name, n", sorted(SHIPPED.items()))
def test_shipped_sets_load_with_their_sizes(monkeypatch, name, n):
    monkeypatch.delenv("TRAIT_DATASETS_DIR", raising=False)
    ps = load_prompt_set(name)
    assert len(ps) == n and len(set(ps.ids)) == n
    assert all(p.text.strip() or name == "adversarial" for p in ps.prompts)


def test_shipped_benign_parallels_harmful_and_adversarial_covers_edge_cases(monkeypatch):
    monkeypatch.delenv("TRAIT_DATASETS_DIR", raising=False)
    assert load_prompt_set("harmful").ids == load_prompt_set("benign").ids
    adv = load_prompt_set("adversarial").prompts
    assert any(not p.text.strip() or not p.text.replace("\u200b", "").strip() for p in adv)  # empty-looking
    assert max(len(p.text) for p in adv) > 4000                                                # very long
    assert any(any(ord(c) > 0x3000 for c in p.text) for p in adv)                             # CJK / emoji
    assert any("```" in p.text for p in adv)                                                   # code
    assert sum("injection" in (p.note or "") for p in adv) >= 2


def test_select_and_parse_prompt_ids(datasets):
    datasets("s", [{"id": i, "text": f"t{i}"} for i in ("b", 10, 2, 1, "a")])
    ps = load_prompt_set("s")
    assert parse_prompt_ids(None) is None
    assert parse_prompt_ids(" 10, b ,2") == ["10", "b", "2"] and parse_prompt_ids([10, "b"]) == ["10", "b"]
    for bad in ("", "1,,2", ",", []):
        with pytest.raises(PromptSetError, match="--prompt-ids"):
            parse_prompt_ids(bad)
    assert [p.id for p in ps.select(["b", "10", "2", "1"])] == ["1", "2", "10", "b"]  # natural id order
    assert [p.id for p in ps.select([2, "2"])] == ["2"]  # de-duplicated
    assert [p.text for p in ps.select(["10"])] == ["t10"]
    with pytest.raises(PromptSetError, match=r"id\(s\) 7, zz not in prompt set 's'"):
        ps.select(["1", "7", "zz"])
