"""Mutated input files through every stage that reads them: one clean `error:` line (exit 2) or exit 0 with
well-formed outputs; never a traceback, a half-written file, a hang, or a pickle payload that runs.

One experiment (tiny zoo Llama, a LoRA variant replaying its responses) is built once through the stages'
own main(argv): responses, raw files of both variants, projections, calibration, means, a model diff
(results.json, diff_vectors.pt + sidecar, prompt_means.pt), per_token_diff files, attention / logit-lens JSONs.
Every case then mutates one file (a seeded generator: deleted keys, swapped types, truncation, random
bytes, non-UTF-8, NaN / inf, huge and negative numbers, wrong shapes and dtypes, deep nesting, a folder
where a file belongs, a pickle payload), calls the stages that read it in this process, checks the rule,
and puts the tree back byte for byte.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import write_responses, write_vectors
from utils import paths

EXP, SET, A, B = "fz", "fz", "a", "b"
TRAITS = {"behavioral/refusal": {1: 0.80, 2: 0.95, 3: 0.60}, "cognitive/honesty": {1: 0.90, 2: 0.50}}
SEED = 21
CASES_PER_TARGET = 14                     # random mutations per (file, stages) target; targeted cases come on top


class _Payload:
    """Unpickling this creates MARKER: a file that must never appear (every .pt is loaded with weights_only)."""

    marker: str = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------------------
# The stages, as a user runs them (main(argv) of each script)

def _stages():
    from analysis import report
    from analysis.model_diff import compare_variants, per_token_diff
    from inference import capture_raw_activations, extract_viz, project_raw_activations_onto_traits as project

    base = ["--experiment", EXP, "--prompt-set", SET]
    return {
        "project": (project.main, base + ["--model-variant", A, "--quiet", "--overwrite"]),
        # a rerun with another selection rule over existing outputs: refused, the existing file read for the message
        "project_b": (project.main, base + ["--model-variant", B, "--quiet", "--layers", "2"]),
        "capture": (capture_raw_activations.main, base + ["--model-variant", A, "--overwrite"]),
        "viz": (extract_viz.main, base + ["--model-variant", A, "--attention", "--logit-lens",
                                          "--overwrite"]),
        "compare": (compare_variants.main, base + ["--variant-a", A, "--variant-b", B, "--quiet", "--use-best-vector"]),
        "existing_diff": (compare_variants.main, base + ["--variant-a", A, "--variant-b", B, "--quiet", "--use-best-vector",
                                                         "--use-existing-diff"]),
        "per_token": (per_token_diff.main, base + ["--variant-a", A, "--variant-b", B, "--traits", "all", "--quiet",
                                                     "--overwrite"]),
        "report": (report.main, base + ["--model-variant", A, "--quiet", "--overwrite"]),
        "report_compare": (report.main, base + ["--compare", f"{A},{B}", "--quiet", "--overwrite"]),
    }


def _run(stage: str) -> tuple[int, str]:
    main, argv = _stages()[stage]
    err = io.StringIO()
    signal.alarm(120)                      # a hang fails the case instead of the whole run
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(list(argv))
    finally:
        signal.alarm(0)
    return rc, err.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The experiment, built once

@pytest.fixture(scope="module")
def built(tmp_path_factory, zoo, zoo_lora):
    model, lora = zoo("llama"), zoo_lora("llama")
    exp_dir = tmp_path_factory.mktemp("fuzz") / "experiments" / EXP
    exp_dir.mkdir(parents=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAIT_EXPERIMENTS_DIR", str(exp_dir.parent))
    (exp_dir / "config.json").write_text(json.dumps({
        "defaults": {"extraction": A, "application": A},
        "model_variants": {A: {"model": model}, B: {"model": model, "lora": lora}}, "use_chat_template": None}))
    write_vectors(EXP, A, TRAITS, hidden=64)
    write_responses(EXP, A, SET, model)
    from analysis import report
    from analysis.model_diff import compare_variants, per_token_diff
    from inference import capture_raw_activations, extract_viz, project_raw_activations_onto_traits as project

    base = ["--experiment", EXP, "--prompt-set", SET]
    steps = [
        (capture_raw_activations.main, base + ["--model-variant", A]),
        (capture_raw_activations.main, base + ["--model-variant", B, "--responses-from", A]),
        (project.main, base + ["--model-variant", A, "--quiet"]),
        (project.main, base + ["--model-variant", B, "--quiet"]),
        # per-prompt means of A's prompts 1 and 2 (compare_variants reads them instead of those raw files)
        (project.main, base + ["--model-variant", A, "--quiet", "--fused", "--save-means", "--skip-existing",
                               "--prompt-ids", "1,2"]),
        (compare_variants.main, base + ["--variant-a", A, "--variant-b", B, "--quiet", "--use-best-vector"]),
        (per_token_diff.main, base + ["--variant-a", A, "--variant-b", B, "--traits", "all", "--quiet"]),
        (extract_viz.main, base + ["--model-variant", A, "--attention", "--logit-lens"]),
        (report.main, base + ["--model-variant", A, "--quiet"]),
    ]
    for main, argv in steps:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            assert main(argv) == 0, err.getvalue()
    golden = {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()}
    yield exp_dir, golden
    mp.undo()


def _restore(exp_dir: Path, golden: dict[Path, bytes]) -> list[Path]:
    """Put the tree back as built; returns the files that differed (changed, new, or gone)."""
    changed = []
    for p in sorted(exp_dir.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_dir() and not p.is_symlink():
            if p not in golden:
                if not any(p.iterdir()):
                    p.rmdir()
                elif not any(q in golden for q in golden if p in q.parents):
                    shutil.rmtree(p)
                    changed.append(p)
            else:  # a folder where a file was
                shutil.rmtree(p)
                changed.append(p)
        elif p not in golden:
            p.unlink()
            changed.append(p)
    for p, data in golden.items():
        if p.is_dir():
            shutil.rmtree(p)
        if not p.exists() or p.read_bytes() != data:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            changed.append(p)
    return changed


# ---------------------------------------------------------------------------------------------------------
# Mutations (seeded)

def _nodes(obj, path=()):
    """Every (path, value) in a JSON-like / torch.load tree."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            yield from _nodes(v, path + (i,))


def _set(obj, path, value, delete=False):
    for k in path[:-1]:
        obj = obj[k]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


SWAPS = [[], {}, "x", 7, -1, -(10 ** 20), 10 ** 20, 1e308, None, True, [[1]], {"1": 2}, [None], ""]


def _mutate_tree(obj, rng: random.Random, tensors: bool):
    nodes = [(p, v) for p, v in _nodes(obj) if p]
    if not nodes:
        return "[1]" if not tensors else [1]
    path, value = rng.choice(nodes)
    op = rng.choice(["delete", "swap", "swap", "number"] + (["tensor", "tensor", "layer_key"] if tensors else []))
    if op == "delete" and isinstance(path[-1], (str, int)) and not isinstance(value, type(None)):
        _set(obj, path, None, delete=True)
    elif op == "number":
        nums = [(p, v) for p, v in nodes if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums:
            path, _ = rng.choice(nums)
        _set(obj, path, rng.choice([-1, -(10 ** 18), 10 ** 18, 1e300, -1e300, 0, 2 ** 63]))
    elif op == "tensor" and tensors:
        ts = [(p, v) for p, v in nodes if isinstance(v, torch.Tensor)]
        if ts:
            path, t = rng.choice(ts)
            kind = rng.choice(["nan", "inf", "shape", "dtype", "empty", "1d"])
            new = t.clone().float()
            if kind == "nan" and new.numel():
                new.view(-1)[rng.randrange(new.numel())] = float("nan")
            elif kind == "inf" and new.numel():
                new.view(-1)[rng.randrange(new.numel())] = float("inf")
            elif kind == "shape":
                new = torch.zeros(*[s + 1 for s in t.shape]) if t.ndim else torch.zeros(3)
            elif kind == "dtype":
                new = t.to(torch.int64) if t.is_floating_point() else t.float()
            elif kind == "empty":
                new = torch.zeros(0)
            else:
                new = new.reshape(-1)
            _set(obj, path, new)
        else:
            _set(obj, path, rng.choice(SWAPS))
    elif op == "layer_key" and tensors:
        ds = [(p, v) for p, v in nodes if isinstance(v, dict) and any(isinstance(k, int) for k in v)]
        if ds:
            path, d = rng.choice(ds)
            k = next(k for k in d if isinstance(k, int))
            d[rng.choice([-(10 ** 18), 10 ** 18, -1, "7"])] = d.pop(k)
        else:
            _set(obj, path, rng.choice(SWAPS))
    else:
        _set(obj, path, rng.choice(SWAPS))
    return obj


def _mutate_bytes(path: Path, rng: random.Random, marker: Path) -> str:
    """One seeded mutation of `path`; returns its name."""
    data = path.read_bytes()
    is_pt = path.suffix == ".pt"
    kind = rng.choice(["tree", "tree", "tree", "truncate", "random", "non_utf8", "empty", "folder", "nested",
                       "nan", "payload"] if not is_pt else
                      ["tree", "tree", "tree", "tree", "truncate", "random", "empty", "folder", "payload",
                       "json_in_pt"])
    if kind == "truncate":
        path.write_bytes(data[:rng.randrange(max(1, len(data)))])
    elif kind == "random":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))))
    elif kind == "non_utf8":
        cut = rng.randrange(max(1, len(data)))
        path.write_bytes(data[:cut] + b"\xff\xfe\xc3" + data[cut:])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.unlink()
        path.mkdir()
        (path / "inside.json").write_text("{}")
    elif kind == "nested":
        depth = rng.choice([5000, 100000])
        path.write_text("[" * depth + "]" * depth)
    elif kind == "nan":
        text = data.decode("utf-8")
        nums = list(re.finditer(r"(?<![\w.\"])-?\d+(\.\d+)?([eE][-+]?\d+)?(?![\w\"])", text))
        if nums:
            m = rng.choice(nums)
            text = text[:m.start()] + rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]) + text[m.end():]
        path.write_text(text, encoding="utf-8")
    elif kind == "payload":
        _Payload.marker = str(marker)
        with open(path, "wb") as fh:
            torch.save({"prompt": _Payload(), "response": {}, "metadata": {}}, fh)
    elif kind == "json_in_pt":
        path.write_text('{"prompt": {}, "response": {}}')
    else:  # tree
        if is_pt:
            obj = torch.load(path, weights_only=True)
            obj = _tensor_file(obj, rng)
            with open(path, "wb") as fh:
                torch.save(obj, fh)
        else:
            obj = json.loads(data)
            path.write_text(json.dumps(_mutate_tree(obj, rng, tensors=False)))
    return kind


def _tensor_file(obj, rng: random.Random):
    if isinstance(obj, (dict, list)):
        return _mutate_tree(obj, rng, tensors=True)
    box = {"t": obj}
    return _mutate_tree(box, rng, tensors=True).get("t", [])


# ---------------------------------------------------------------------------------------------------------
# Which files each stage reads

def _targets(exp_dir: Path) -> list[tuple[str, Path, list[str]]]:
    inf = exp_dir / "inference"
    diff = exp_dir / "model_diff" / f"{A}_vs_{B}"
    ptd = diff / "per_token_diff" / "behavioral" / "refusal" / SET
    viz = exp_dir / "analysis" / "per_token" / SET
    proj = inf / A / "projections" / "behavioral" / "refusal" / SET
    return [
        ("config", exp_dir / "config.json", ["project"]),
        ("response", inf / A / "responses" / SET / "2.json", ["capture", "viz", "per_token", "report"]),
        ("raw", inf / A / "raw" / "residual" / SET / "3.pt", ["project", "compare", "per_token"]),
        ("raw_b", inf / B / "raw" / "residual" / SET / "2.pt", ["compare", "report_compare"]),
        ("means", inf / A / "raw" / "means" / SET / "1.pt", ["compare"]),
        ("calibration", inf / A / "massive_activations" / "calibration.json", ["project"]),
        ("projection", proj / "2.json", ["per_token", "report"]),
        ("projection_b", inf / B / "projections" / "behavioral" / "refusal" / SET / "3.json", ["project_b"]),
        ("attention", viz / "1_attention.json", ["report"]),
        ("logit_lens", viz / "2_logit_lens.json", ["report"]),
        ("results", diff / SET / "results.json", ["report_compare", "existing_diff"]),
        ("diff_vectors", diff / SET / "diff_vectors.pt", ["existing_diff"]),
        ("diff_sidecar", diff / SET / "diff_vectors.json", ["existing_diff"]),
        ("prompt_means", diff / SET / "prompt_means.pt", ["existing_diff"]),
        ("per_token_diff", ptd / "1.json", ["report_compare"]),
        ("aggregate", ptd / "aggregate.json", ["report_compare"]),
    ]


def _check_outputs(changed: list[Path]) -> None:
    """Every file a successful run wrote reads back through its owner (or at least as strict JSON / .pt)."""
    from utils.projections import read_projection
    from utils.storage import load_pt, read_json

    for p in changed:
        if not p.exists() or p.is_dir():
            continue
        assert not p.name.endswith(".tmp"), f"temporary file left: {p}"
        if p.suffix == ".json":
            read_projection(p) if "/projections/" in p.as_posix() else read_json(p)
        elif p.suffix == ".pt":
            load_pt(p)


def _changed(exp_dir: Path, golden: dict[Path, bytes], target: Path | None) -> list[Path]:
    """Files that differ from the built tree, the mutated file (or folder) itself left out."""
    return [p for p in exp_dir.rglob("*") if p.is_file() and p != target and (target is None or target not in p.parents)
            and golden.get(p) != p.read_bytes()]


def _case(exp_dir, golden, stage: str, label: str, target: Path | None) -> str | None:
    """Run one stage on the mutated tree; None when it kept the rule, else what went wrong."""
    try:
        rc, err = _run(stage)
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly what the test looks for
        import traceback
        return f"{label} -> {stage}: {type(e).__name__}: {e}\n{''.join(traceback.format_exc()[-1500:])}"
    lines = [l for l in err.splitlines() if l.strip()]
    if rc == 2:
        errors = [l for l in lines if l.startswith("error: ")]
        if len(errors) != 1 or any("Traceback" in l for l in lines):
            return f"{label} -> {stage}: exit 2 but stderr {err[-500:]!r}"
        leftovers = [p for p in exp_dir.rglob("*.tmp")]
        if leftovers:
            return f"{label} -> {stage}: temporary files left {leftovers}"
        written = [p for p in _changed(exp_dir, golden, target)]
        if written:
            return f"{label} -> {stage}: exit 2 ({lines[-1][:200]}) but wrote {written[:3]}"
        return None
    if rc != 0:
        return f"{label} -> {stage}: exit {rc}: {err[-500:]!r}"
    changed = _changed(exp_dir, golden, target)
    try:
        _check_outputs(changed)
    except Exception as e:  # noqa: BLE001
        return f"{label} -> {stage}: exit 0 but an output is malformed: {e}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Targeted cases: every traceback the issue lists

def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _edit_pt(path: Path, fn) -> None:
    """fn edits the loaded object in place, or returns a replacement (a tensor)."""
    obj = torch.load(path, weights_only=True)
    new = fn(obj)
    obj = new if isinstance(new, torch.Tensor) else obj
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _targeted(exp_dir: Path) -> list[tuple[str, str, object, Path]]:
    inf, diff = exp_dir / "inference", exp_dir / "model_diff" / f"{A}_vs_{B}" / SET
    raw3 = inf / A / "raw" / "residual" / SET / "3.pt"
    viz = exp_dir / "analysis" / "per_token" / SET

    def first_entry(obj):
        return obj["attention"][1]["by_layer"][0]

    proj2 = inf / A / "projections" / "behavioral" / "refusal" / SET / "2.json"
    cases = [
        ("config model list", "project", lambda: _edit_json(exp_dir / "config.json", lambda c: c["model_variants"][A]
                                                            .__setitem__("model", ["a"]))),
        ("config defaults object", "project", lambda: _edit_json(exp_dir / "config.json", lambda c: c["defaults"]
                                                                 .__setitem__("application", {}))),
        ("config folder", "project", lambda: ((exp_dir / "config.json").unlink(), (exp_dir / "config.json").mkdir())),
        ("config deep nesting", "project", lambda: (exp_dir / "config.json").write_text("[" * 100000)),
        ("prompt_means wrong shape", "existing_diff", lambda: _edit_pt(diff / "prompt_means.pt", lambda o: o.__setitem__(
            "means_a", o["means_a"][:, :, :5].clone()))),
        ("prompt_means missing key", "existing_diff", lambda: _edit_pt(diff / "prompt_means.pt", lambda o: o.pop("means_b"))),
        ("prompt_means NaN", "existing_diff", lambda: _edit_pt(diff / "prompt_means.pt", lambda o: o["means_a"].view(-1)
                                                               .__setitem__(0, float("nan")))),
        ("diff_vectors NaN", "existing_diff", lambda: _edit_pt(diff / "diff_vectors.pt", lambda t: t.view(-1)
                                                               .__setitem__(-1, float("inf")))),
        ("diff_vectors wrong shape", "existing_diff", lambda: _edit_pt(diff / "diff_vectors.pt", lambda t: t[0].clone())),
        ("diff sidecar huge negative layer", "existing_diff", lambda: _edit_json(diff / "diff_vectors.json", lambda s: s.__setitem__(
            "layers", [-(10 ** 20)]))),
        ("later raw file other hidden size", "project", lambda: _edit_pt(raw3, lambda o: o["response"]["activations"][1]
                                                                        .__setitem__("residual", torch.zeros(
                                                                            len(o["response"]["token_ids"]), 32)))),
        ("later raw file non-dict activations entry", "project", lambda: _edit_pt(raw3, lambda o: o["response"]["activations"]
                                                                                 .__setitem__(2, [1, 2]))),
        ("later raw file token_ids not a list", "project", lambda: _edit_pt(raw3, lambda o: o["response"]
                                                                           .__setitem__("token_ids", 5))),
        ("raw response not a dict", "per_token", lambda: _edit_pt(raw3, lambda o: o.__setitem__("response", [1, 2]))),
        ("raw NaN activation", "project", lambda: _edit_pt(raw3, lambda o: o["response"]["activations"][2]["residual"]
                                                           .view(-1).__setitem__(0, float("nan")))),
        ("attention rows not lists", "report", lambda: _edit_json(viz / "1_attention.json", lambda o: o["attention"][1]
                                                                  .__setitem__("by_layer", 7))),
        ("attention missing key", "report", lambda: _edit_json(viz / "1_attention.json", lambda o: o.pop("attention"))),
        ("attention infinity", "report", lambda: (viz / "1_attention.json").write_text(
            (viz / "1_attention.json").read_text().replace("1.0", "Infinity", 1))),
        ("logit lens prob NaN", "report", lambda: (viz / "2_logit_lens.json").write_text(
            (viz / "2_logit_lens.json").read_text().replace('"prob": 0', '"prob": NaN', 1))),
        ("logit lens huge layer", "report", lambda: _edit_json(viz / "2_logit_lens.json", lambda o: o["predictions"][0][
            "by_layer"][0].__setitem__("layer", 10 ** 30))),
        ("projection NaN score", "report", lambda: proj2.write_text(proj2.read_text().replace(
            '"response": [', '"response": [NaN, ', 1))),
        ("results.json NaN peak", "report_compare", lambda: (diff / "results.json").write_text(
            (diff / "results.json").read_text().replace('"peak_effect_size": ', '"peak_effect_size": NaN, "x": ', 1))),
    ]
    targets = {"config": exp_dir / "config.json", "prompt_means": diff / "prompt_means.pt",
               "diff_vectors": diff / "diff_vectors.pt", "diff sidecar": diff / "diff_vectors.json", "raw": raw3,
               "later raw": raw3, "attention": viz / "1_attention.json", "logit lens": viz / "2_logit_lens.json",
               "projection": proj2, "results.json": diff / "results.json"}
    return [(label, stage, setup, next(p for k, p in targets.items() if label.startswith(k)))
            for label, stage, setup in cases]


def test_mutated_inputs_give_one_error_line_or_well_formed_outputs(built, tmp_path):
    exp_dir, golden = built
    marker = tmp_path / "PAYLOAD_RAN"
    rng = random.Random(SEED)
    failures = []
    cases = list(_targeted(exp_dir))
    for name, path, stages in _targets(exp_dir):
        assert path.is_file(), f"the built experiment lacks {path}"
        for k in range(CASES_PER_TARGET):
            seed = rng.randrange(1 << 30)
            stage = stages[k % len(stages)]
            cases.append((f"{name} #{k} (seed {seed})", stage,
                          lambda path=path, seed=seed: _mutate_bytes(path, random.Random(seed), marker), path))
    for label, stage, setup, target in cases:
        kind = setup()
        label = f"{label} [{kind}]" if isinstance(kind, str) else label
        failure = _case(exp_dir, golden, stage, label, target)
        if failure:
            failures.append(failure)
        _restore(exp_dir, golden)
        assert not marker.exists(), f"{label}: a pickle payload ran"
    print(f"{len(cases)} fuzz cases, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {len(cases)} cases broke the rule:\n" + "\n".join(failures[:40])
    assert len(cases) > 200


def test_pickle_payload_is_refused_not_run(built, tmp_path):
    """The payload itself, loaded directly: weights_only refuses it and the marker never appears."""
    from utils.raw import RawError, read_raw

    marker = tmp_path / "PAYLOAD_RAN"
    _Payload.marker = str(marker)
    bad = tmp_path / "payload.pt"
    with open(bad, "wb") as fh:
        torch.save({"prompt": _Payload(), "response": {}}, fh)
    with pytest.raises(RawError, match="payload.pt"):
        read_raw(bad)
    assert not marker.exists()
    from tests.malicious import unpickle_unsafely

    unpickle_unsafely(bad)  # the oracle: the payload is real, it does run when unpickled
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Guarded writes: a rerun refuses and changes nothing; --skip-existing keeps; --overwrite replaces

def _tree(exp_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()}


def _inodes(folder: Path) -> dict[Path, int]:
    """Each output file's inode: an atomic write (temp file + rename) gives the path a new one."""
    return {p: p.stat().st_ino for p in folder.rglob("*") if p.is_file()}


def _call(main, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _refuses(exp_dir: Path, main, argv, *needles: str) -> None:
    before = _tree(exp_dir)
    rc, err = _call(main, argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--skip-existing" in lines[0] and "--overwrite" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert _tree(exp_dir) == before            # every file byte-identical, nothing new


@pytest.mark.parametrize("stage", ["capture", "project", "viz"])
def test_a_rerun_without_flags_refuses_and_overwrite_replaces(built, stage):
    exp_dir, golden = built
    main, argv = _stages()[stage]
    argv = [a for a in argv if a != "--overwrite"]
    outputs = {"capture": exp_dir / "inference" / A / "raw" / "residual" / SET,
               "project": exp_dir / "inference" / A / "projections",
               "viz": exp_dir / "analysis" / "per_token" / SET}[stage]
    try:
        _refuses(exp_dir, main, argv, str(outputs))
        before, inodes = _tree(exp_dir), _inodes(outputs)
        assert _call(main, argv + ["--skip-existing"])[0] == 0
        assert _tree(exp_dir) == before and _inodes(outputs) == inodes     # every output exists: none rewritten
        assert _call(main, argv + ["--overwrite"])[0] == 0
        after, replaced = _tree(exp_dir), _inodes(outputs)
        assert set(after) == set(before) and set(replaced) == set(inodes)
        assert all(replaced[p] != inodes[p] for p in inodes), "--overwrite left files in place"   # renamed over
        _check_outputs([p for p in after if outputs in p.parents])
        assert _call(main, argv + ["--overwrite", "--skip-existing"])[0] == 2     # contradictory: a usage error
    finally:
        _restore(exp_dir, golden)


def test_refusal_names_a_set_projected_by_another_rule(built):
    """`project --layer 2 --prompt-ids 1` over a set projected at the best layer: refused, the rule named."""
    from inference import project_raw_activations_onto_traits as project

    exp_dir, golden = built
    argv = ["--experiment", EXP, "--prompt-set", SET, "--model-variant", A, "--quiet", "--layer", "2",
            "--prompt-ids", "1"]
    _refuses(exp_dir, project.main, argv, "--layers best", "--layers 2")
    try:
        assert _call(project.main, argv + ["--overwrite"])[0] == 0
        from utils.projections import read_projection
        proj = read_projection(paths.projection_file(EXP, A, "behavioral/refusal", SET, "1"))
        assert proj.metadata["layers_spec"] == "2" and proj.layers == [2]
    finally:
        _restore(exp_dir, golden)


def test_refusal_names_responses_another_variant_replayed(built, tmp_path, monkeypatch):
    """generate over responses that variant b replayed with --responses-from a: refused, the pairing named."""
    from inference import generate_responses

    exp_dir, golden = built
    datasets = tmp_path / "datasets"
    (datasets / "inference").mkdir(parents=True)
    (datasets / "inference" / f"{SET}.json").write_text(json.dumps(
        {"prompts": [{"id": i, "text": f"prompt {i}"} for i in range(1, 5)]}))
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(datasets))
    imported = tmp_path / "imported.json"
    imported.write_text(json.dumps({str(i): f"new answer {i}" for i in range(1, 5)}))
    argv = ["--experiment", EXP, "--prompt-set", SET, "--model-variant", A, "--from-responses", str(imported),
            "--no-progress"]
    _refuses(exp_dir, generate_responses.main, argv, "variant 'b' replayed", "--responses-from a")
    try:
        assert _call(generate_responses.main, argv + ["--overwrite"])[0] == 0
        from utils.responses import load_response
        assert load_response(paths.response_file(EXP, A, SET, "2"))["response"].startswith("new answer 2")
    finally:
        _restore(exp_dir, golden)
