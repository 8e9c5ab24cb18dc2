"""Stages cover the prompt set's ids, not whatever files lie in the folder; --prompt-set takes a JSON path too.

    responses of ids no longer in the set's file are reported (stderr, naming the folder and ids) and never captured
    without a set file (imported responses) the folder's files are the set, as before
    generate with --prompt-set path/to/mine.json writes responses/mine/, and capture then reads that set
"""
from __future__ import annotations

import json

from inference.capture_raw_activations import main as capture
from inference.generate_responses import main as generate
from tests.helpers import write_responses
from utils import paths
from utils.prompts import load_prompt_set, set_ids

PAIRS = [(f"prompt {i}", "an answer") for i in range(4)]


def _set(tmp_path, monkeypatch, ids) -> None:
    data = tmp_path / "datasets"
    (data / "inference").mkdir(parents=True, exist_ok=True)
    (data / "inference" / "s.json").write_text(json.dumps({"prompts": [{"id": i, "text": f"prompt {i}"} for i in ids]}))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(data))


def test_capture_reads_the_set_ids_and_reports_stale_files(zoo, experiments, tmp_path, monkeypatch, capsys):
    experiments("e", {"base": {"model": zoo("llama")}})
    write_responses("e", "base", "s", zoo("llama"), pairs=PAIRS)          # ids 1..4
    write_responses("e", "base", "imported", zoo("llama"), pairs=PAIRS)   # no set file: the folder is the set
    _set(tmp_path, monkeypatch, [1, 2, 3])                                # id 4 was removed from the set
    assert capture(["--experiment", "e", "--prompt-set", "s", "--layers", "1", "--no-server"]) == 0
    out, err = capsys.readouterr()
    assert sorted(paths.raw_files("e", "base", "s")) == ["1", "2", "3"]
    assert "1 file(s) of id(s) not in prompt set 's'" in err and "left out: 4" in err
    assert str(paths.responses_dir("e", "base", "s")) in err
    assert out.startswith("captured 3 prompts")
    assert capture(["--experiment", "e", "--prompt-set", "imported", "--layers", "1", "--no-server"]) == 0
    assert sorted(paths.raw_files("e", "base", "imported")) == ["1", "2", "3", "4"]


def test_prompt_set_as_a_json_path(zoo, experiments, tmp_path, monkeypatch, capsys):
    experiments("e", {"base": {"model": zoo("llama")}})
    _set(tmp_path, monkeypatch, [1])
    mine = tmp_path / "elsewhere" / "mine.json"
    mine.parent.mkdir()
    mine.write_text(json.dumps([{"id": "a", "text": "hello"}, {"id": "b", "text": "why?"}]))
    pset = load_prompt_set(str(mine))
    assert pset.name == "mine" and pset.ids == ["a", "b"] and set_ids(str(mine)) == ["a", "b"]
    assert load_prompt_set(str(tmp_path / "datasets" / "inference" / "s.json")).name == "s"   # a set's own file
    assert set_ids("nothing_here") is None
    assert generate(["--experiment", "e", "--prompt-set", str(mine), "--max-new-tokens", "2", "--no-server",
                     "--no-progress"]) == 0
    assert sorted(p.stem for p in paths.responses_dir("e", "base", "mine").glob("*.json")) == ["a", "b"]
    assert capture(["--experiment", "e", "--prompt-set", "mine", "--layers", "1", "--no-server"]) == 0
    assert sorted(paths.raw_files("e", "base", "mine")) == ["a", "b"]
