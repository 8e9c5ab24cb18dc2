"""utils/storage.py: exact JSON round trips, NaN refusal, atomic writes, safe loads."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from utils.storage import StorageError, atomic_write, dumps_json, load_pt, read_json, write_json, write_pt

TRICKY = [",", ", ", '"', "'", "\\", "\\n", "\n", "\r\n", "\t", "a,b", '{"x": 1}', "[1, 2]", "🙂", "日本",
          "café", "naïve", "\u2028", "\u0000", " ", "", "<|im_end|>",
          "\ufffd"]  # what decoding half of a multi-byte character gives


def test_json_round_trips_tricky_strings_exactly(tmp_path):
    obj = {"tokens": TRICKY, "token_ids": list(range(len(TRICKY))), "nested": {"k,ey": TRICKY[::-1]},
           "scores": [0.1, -2.5e-8, 3.0, 1e300], "none": None, "flag": True}
    path = tmp_path / "r.json"
    n = write_json(path, obj)
    assert n == path.stat().st_size
    assert read_json(path) == obj
    assert json.loads(path.read_text(encoding="utf-8")) == obj  # a standard reader agrees
    raw = path.read_text(encoding="utf-8")
    assert "🙂" in raw and "日本" in raw  # non-ASCII written as UTF-8, not escaped
    # indented form round-trips too
    write_json(path, obj, indent=2)
    assert read_json(path) == obj


def test_comma_token_not_mangled(tmp_path):
    """B2 (docs/original-bugs.md): trait-interp's compact writer turned every "," token into ", "."""
    path = tmp_path / "r.json"
    write_json(path, {"tokens": ["a", ",", "b", ",", ","]})
    assert read_json(path)["tokens"] == ["a", ",", "b", ",", ","]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_refused_and_nothing_written(tmp_path, bad):
    path = tmp_path / "r.json"
    with pytest.raises(StorageError, match="NaN"):
        write_json(path, {"scores": [1.0, bad]})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError):
        dumps_json({"x": {"y": [bad]}})


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(StorageError):
        write_json(path, {"v": math.nan})
    assert read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_atomic_write_leaves_nothing_when_the_body_raises(tmp_path):
    path = tmp_path / "sub" / "out.pt"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file either


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # the old file stays until the body finished
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_pt_and_load_pt_round_trip(tmp_path):
    obj = {"prompt": {"text": "a, \"b\"", "token_ids": [1, 2],
                      "activations": {3: {"residual": torch.randn(2, 4)}}},
           "metadata": {"layers": [3], "dtype": "float32"}}
    path = tmp_path / "x.pt"
    size = write_pt(path, obj)
    assert size == path.stat().st_size
    back = load_pt(path)
    assert back["prompt"]["text"] == obj["prompt"]["text"] and back["metadata"] == obj["metadata"]
    torch.testing.assert_close(back["prompt"]["activations"][3]["residual"], obj["prompt"]["activations"][3]["residual"])
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


class Payload:
    """An arbitrary class: unpickling it would mean running code the file chooses."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


class Plain:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("obj", [Plain(), {"t": torch.zeros(2), "evil": Payload()}])
def test_load_pt_refuses_pickled_classes(tmp_path, obj):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(StorageError, match="bad.pt"):
        load_pt(path)
    with pytest.raises(StorageError, match="bad.pt"):
        load_pt(path, mmap=False)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(StorageError, match="missing.pt: file not found"):
        load_pt(tmp_path / "missing.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StorageError, match="trunc.pt"):
        load_pt(tmp_path / "trunc.pt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StorageError, match="bad.json: malformed JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(StorageError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")


def test_atomic_write_gives_normal_permissions(tmp_path):
    """The temp file is created owner-only; the written file must get the mode a plain open() gives."""
    (tmp_path / "plain.json").write_text("{}")
    write_json(tmp_path / "atomic.json", {})
    assert (tmp_path / "atomic.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
    os.chmod(tmp_path / "atomic.json", 0o640)  # an existing file keeps its mode
    write_json(tmp_path / "atomic.json", {"v": 2})
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == 0o640


def test_background_writer_writes_every_record_and_counts_bytes(tmp_path):
    from utils.storage import BackgroundWriter, load_pt

    records = {f"{i}.pt": {"a": torch.full((50, 8), float(i)), "meta": {"i": i}} for i in range(6)}
    # a budget smaller than two records: submit must block until the writer catches up, never lose one
    with BackgroundWriter(max_pending_bytes=50 * 8 * 4 + 1) as writer:
        for name, rec in records.items():
            writer.submit(tmp_path / name, rec)
    assert writer.bytes == sum((tmp_path / n).stat().st_size for n in records)
    assert writer.files == [str(tmp_path / n) for n in records]
    for name, rec in records.items():
        got = load_pt(tmp_path / name)
        assert torch.equal(got["a"], rec["a"]) and got["meta"] == rec["meta"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_background_writer_reraises_a_failed_write(tmp_path, monkeypatch):
    import utils.storage as storage

    real = storage.write_pt

    def failing(path, obj):
        if path.name == "1.pt":
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(storage, "write_pt", failing)
    with pytest.raises(OSError, match="disk full"):
        with storage.BackgroundWriter() as writer:
            for i in range(3):
                writer.submit(tmp_path / f"{i}.pt", {"a": torch.ones(3)})
    assert (tmp_path / "0.pt").exists() and not (tmp_path / "1.pt").exists()


def test_background_writer_writes_json_in_the_same_queue(tmp_path):
    from utils.storage import BackgroundWriter, load_pt

    with BackgroundWriter() as writer:
        writer.submit(tmp_path / "0.pt", {"a": torch.ones(4)})
        writer.submit_json(tmp_path / "0.json", {"tokens": [",", " ,"], "n": 1})
    assert json.loads((tmp_path / "0.json").read_text(encoding="utf-8")) == {"tokens": [",", " ,"], "n": 1}
    assert torch.equal(load_pt(tmp_path / "0.pt")["a"], torch.ones(4))
    assert writer.files == [str(tmp_path / "0.pt"), str(tmp_path / "0.json")]
    assert writer.bytes == (tmp_path / "0.pt").stat().st_size + (tmp_path / "0.json").stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))
