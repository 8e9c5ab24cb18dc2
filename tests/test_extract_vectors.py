"""extraction/extract_vectors.py on a tiny Llama, checked against features computed here from HF's own
output_hidden_states (never from our capture code).

    vectors are fp32 unit vectors; mean_diff == normalised difference of HF train-line means; baseline == midpoint
    probe is a stationary point of the L2 logistic objective (C=1) on row-normalised train features
    reported held-out accuracy == accuracy recomputed from HF features of the recorded validation lines; it separates
    default positions response[:5] / response[:] (trait-interp's folders response__5 / response_all); a
    PROMPT<TAB>RESPONSE line counts response[...] from the response's first token, prompt[-1] is the prompt's last
    all[-1] uses the last token; reruns are identical; the extraction fallback of utils.vectors picks the best layer
    bad input: missing / short files, unknown method, prompt positions without a prompt, bad layers; nothing
    written; CLI
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from extraction.extract_vectors import ExtractError, extract_vectors, main
from utils import paths
from utils.vectors import best_vector, rank_vectors

POS_WORDS = "kind polite good help please thanks safe yes hello".split()
NEG_WORDS = "rude harmful bad refuse cannot sorry no never deceive".split()
LAYERS = [0, 1, 2]          # hidden_states[4] is after the final norm, so the oracle stops at layer 2


def lines(words, seed, n=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 8, (1,), generator=g))
        out.append(" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist()))
    return out


@pytest.fixture(scope="module")
def hf(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo("llama")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture
def ext(experiments, hf, tmp_path, monkeypatch):
    """Experiment 'x' (extraction variant base) and datasets/traits/tone/kind with 16 + 16 lines + blank lines."""
    experiments("x", {"base": {"model": hf[0]}}, defaults={"extraction": "base", "application": "base"})
    root = tmp_path / "datasets"
    monkeypatch.setenv("TRAIT_DATASETS_DIR", str(root))
    folder = root / "traits" / "tone" / "kind"
    folder.mkdir(parents=True)
    (folder / "positive.txt").write_text("\n".join(lines(POS_WORDS, 1)) + "\n\n")
    (folder / "negative.txt").write_text("\n\n" + "\n".join(lines(NEG_WORDS, 2)))
    return folder


@pytest.fixture(scope="module")
def loaded(hf):
    """The variant loaded once through utils.model (what extract_vectors would load itself)."""
    from utils.model import load_model
    return load_model(hf[0])


def hf_features(hf, texts, index=slice(None)) -> dict[int, torch.Tensor]:
    """Per layer [n, H]: HF hidden states over each text's tokens after BOS, mean (slice) or one token."""
    _, tok, model = hf
    rows = {L: [] for L in LAYERS}
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for L in LAYERS:
            h = hs[L + 1][0, 1:][index]
            rows[L].append(h if h.ndim == 1 else h.mean(0))
    return {L: torch.stack(r).double() for L, r in rows.items()}


def read_lines(path):
    return {n: t.strip() for n, t in enumerate(path.read_text().splitlines(), start=1) if t.strip()}


def split_texts(folder, meta):
    """(train_pos, train_neg, val_pos, val_neg) texts from the files and the recorded validation line numbers."""
    out = []
    for name, key in (("positive.txt", "positive"), ("negative.txt", "negative")):
        by_line = read_lines(folder / name)
        val = set(meta["val_lines"][key])
        assert val and val < set(by_line)
        out.append(([t for n, t in by_line.items() if n not in val], [by_line[n] for n in sorted(val)]))
    (tp, vp), (tn, vn) = out
    return tp, tn, vp, vn


def test_vectors_match_hf_and_separate_held_out(ext, hf, loaded):
    s = extract_vectors("x", layers="0-2", loaded=loaded, progress=False)
    assert s["layers"] == LAYERS and s["traits"]["tone/kind"].keys() == {"mean_diff", "probe", "best"}
    assert s["positions"] == ["response[:5]", "response[:]"]
    features = None
    for method in ("mean_diff", "probe"):
        meta = json.loads(paths.vector_metadata("x", "tone/kind", "base", "response_all", "residual", method).read_text())
        assert (meta["method"], meta["position"], meta["component"], meta["n_positive"], meta["n_negative"]) == (
            method, "response[:]", "residual", 16, 16)
        assert len(meta["val_lines"]["positive"]) == len(meta["val_lines"]["negative"]) == 4
        tp, tn, vp, vn = split_texts(ext, meta)
        if features is None:   # both methods share the split (checked by the texts below)
            features = (tp, tn, vp, vn), [hf_features(hf, t) for t in (tp, tn, vp, vn)]
        assert features[0] == (tp, tn, vp, vn)
        f_tp, f_tn, f_vp, f_vn = features[1]
        for L in LAYERS:
            path = paths.vector_file("x", "tone/kind", "base", "response_all", "residual", method, L)
            v = torch.load(path, weights_only=True)
            assert v.dtype == torch.float32 and v.shape == (64,) and abs(float(v.norm()) - 1) < 1e-6
            entry = meta["layers"][str(L)]
            vd = v.double()
            if method == "mean_diff":
                diff = f_tp[L].mean(0) - f_tn[L].mean(0)
                torch.testing.assert_close(vd, diff / diff.norm(), atol=1e-5, rtol=0)
                assert entry["norm"] == pytest.approx(float(diff.norm()), rel=1e-4)
            else:   # a stationary point of sum BCE + |w|^2 / 2 on row-normalised train features
                x = torch.cat([f_tp[L], f_tn[L]])
                x = x / x.norm(dim=1, keepdim=True)
                y = torch.cat([torch.ones(len(tp)), torch.zeros(len(tn))]).double()
                w = (vd * entry["norm"]).requires_grad_(True)
                b = torch.tensor(entry["bias"], dtype=torch.float64, requires_grad=True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum") + 0.5 * w @ w
                gw, gb = torch.autograd.grad(loss, [w, b])
                assert float(gw.norm()) < 1e-4 and abs(float(gb)) < 1e-4
            baseline = float((f_tp[L].mean(0) + f_tn[L].mean(0)) / 2 @ vd)
            assert entry["baseline"] == pytest.approx(baseline, abs=1e-4)
            acc = float(((f_vp[L] @ vd > baseline).sum() + (f_vn[L] @ vd <= baseline).sum()) / (len(vp) + len(vn)))
            assert entry["val_accuracy"] == acc
            assert set(entry) >= {"norm", "baseline", "train_accuracy", "val_accuracy", "val_separation"}
            # the reference points: held-out class means and population stds of the HF projections
            pv, nv = f_vp[L] @ vd, f_vn[L] @ vd
            for key, want in (("val_pos_mean", pv.mean()), ("val_neg_mean", nv.mean()),
                              ("val_pos_std", pv.std(unbiased=False)), ("val_neg_std", nv.std(unbiased=False))):
                assert entry[key] == pytest.approx(float(want), abs=1e-4), key
        best = max(meta["layers"].values(), key=lambda e: e["val_accuracy"])
        assert best["val_accuracy"] >= 0.875 and best["val_separation"] > 1.0

    # with no steering results, the fallback of utils.vectors ranks them; the summary names the same winner
    top = rank_vectors("x", "tone/kind", "base", "base")[0]
    assert top.source == "extraction"
    best = s["traits"]["tone/kind"]["best"]
    assert (best["position"], best["method"], best["layer"]) == (top.ref.position, top.ref.method, top.ref.layer)
    meta = json.loads(paths.vector_metadata("x", "tone/kind", "base", top.ref.pos_dir, "residual",
                                            top.ref.method).read_text())
    assert meta["layers"][str(top.ref.layer)]["val_separation"] == best["val_separation"] == top.separation

    # the selected vector carries those reference points, and says in words why it was chosen
    chosen = best_vector("x", "tone/kind", "base", "base")
    entry, ref = meta["layers"][str(top.ref.layer)], chosen.reference
    assert ref.source == "metadata" and ref.baseline == entry["baseline"] == chosen.baseline
    assert (ref.pos_mean, ref.neg_mean, ref.pos_std, ref.neg_std) == tuple(
        entry[k] for k in ("val_pos_mean", "val_neg_mean", "val_pos_std", "val_neg_std"))
    assert ref.spread == pytest.approx(((entry["val_pos_std"] ** 2 + entry["val_neg_std"] ** 2) / 2) ** 0.5)
    assert ref.relative(ref.pos_mean, "z") == pytest.approx((ref.pos_mean - ref.baseline) / ref.spread)
    assert ref.relative(3.0, "baseline") == 3.0 - ref.baseline and ref.relative(3.0, "raw") == 3.0
    assert chosen.explanation.startswith(f"chosen by held-out separation at layer {top.ref.layer} (no steering "
                                         f"evidence")
    assert chosen.describe()["reference"]["spread"] == ref.spread


def test_first_five_response_tokens_and_prompt_split(ext, hf, loaded):
    """response[:5] of a plain line: its first 5 tokens after BOS; with PROMPT<TAB>RESPONSE, the response's."""
    _, tok, model = hf
    folder = ext
    pos = [f"say it kind\t{t}" for t in lines(POS_WORDS, 3, 8)]
    neg = [f"say it rude\t{t}" for t in lines(NEG_WORDS, 4, 8)]
    (folder / "positive.txt").write_text("\n".join(pos))
    (folder / "negative.txt").write_text("\n".join(neg))
    extract_vectors("x", position="response[:5],prompt[-1],all[:]", methods="mean_diff", layers="1",
                    loaded=loaded, progress=False)
    for position, pos_dir in (("response[:5]", "response__5"), ("prompt[-1]", "prompt_-1"), ("all[:]", "all_all")):
        meta = json.loads(paths.vector_metadata("x", "tone/kind", "base", pos_dir, "residual", "mean_diff").read_text())
        assert meta["position"] == position
        tp, tn, _, _ = split_texts(folder, meta)
        feats = []
        for texts in (tp, tn):
            rows = []
            for text in texts:
                prompt, response = text.split("\t")
                p_ids = tok(prompt)["input_ids"]
                ids = p_ids + tok(response, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
                rows.append({"response[:5]": h[len(p_ids):len(p_ids) + 5].mean(0), "prompt[-1]": h[len(p_ids) - 1],
                             "all[:]": h[1:].mean(0)}[position])
            feats.append(torch.stack(rows).double())
        diff = feats[0].mean(0) - feats[1].mean(0)
        path = paths.vector_file("x", "tone/kind", "base", pos_dir, "residual", "mean_diff", 1)
        got = torch.load(path, weights_only=True).double()
        torch.testing.assert_close(got, diff / diff.norm(), atol=1e-5, rtol=0)


def test_last_token_position_and_rerun_identical(ext, hf, loaded):
    extract_vectors("x", position="all[-1]", methods="mean_diff", layers="1", loaded=loaded, progress=False)
    meta_path = paths.vector_metadata("x", "tone/kind", "base", "all_-1", "residual", "mean_diff")
    meta = json.loads(meta_path.read_text())
    assert list(meta["layers"]) == ["1"] and meta["position"] == "all[-1]"
    tp, tn, _, _ = split_texts(ext, meta)
    diff = hf_features(hf, tp, -1)[1].mean(0) - hf_features(hf, tn, -1)[1].mean(0)
    vec_path = paths.vector_file("x", "tone/kind", "base", "all_-1", "residual", "mean_diff", 1)
    torch.testing.assert_close(torch.load(vec_path, weights_only=True).double(), diff / diff.norm(), atol=1e-5, rtol=0)
    digest = hashlib.sha256(vec_path.read_bytes()).hexdigest()
    extract_vectors("x", position="all[-1]", methods="mean_diff", layers="1", loaded=loaded, progress=False)
    assert hashlib.sha256(vec_path.read_bytes()).hexdigest() == digest   # same split, same bytes, same provenance


@pytest.mark.parametrize("case,kwargs,message", [
    ("missing", {}, r"negative\.txt not found"),
    ("short", {}, r"positive\.txt: needs at least 2 non-blank lines"),
    ("method", {"methods": "probe,gradient"}, r"--methods.*'gradient'"),
    ("frame", {"position": "prompt[-1]"}, r"positive\.txt:\d+: position prompt\[-1\] selects no token.*PROMPT<TAB>"),
    ("grammar", {"position": "all"}, r"--position 'all'"),
    ("layers", {"layers": "9"}, r"--layers '9'.*4 layers"),
    ("trait", {"traits": "tone/nope"}, r"trait 'tone/nope'.*not found.*tone/kind"),
    ("name", {"traits": "kind"}, r"category/name"),
    ("fraction", {"val_fraction": 1.0}, r"--val-fraction"),
    ("empty", {"position": "all[20:]"}, r"positive\.txt:\d+: position all\[20:\] selects no token"),
])
def test_bad_input(ext, loaded, case, kwargs, message):
    if case == "missing":
        (ext / "negative.txt").unlink()
    if case == "short":
        (ext / "positive.txt").write_text("\none line only\n\n")
    with pytest.raises(ExtractError if case != "layers" else ValueError, match=message):
        extract_vectors("x", **kwargs, loaded=loaded, progress=False)
    assert not paths.extraction_dir("x").exists()


def test_cli(ext, capsys):
    assert main(["--experiment", "x", "--traits", "tone/kind", "--layers", "2", "--methods", "probe", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "extracted 1 traits x 2 positions x 1 methods x 1 layers (4 files)" in out
    assert "tone/kind probe response[:5] layer 2" in out or "tone/kind probe response[:] layer 2" in out
    assert "held-out" in out and "floor" in out
    for pos_dir in ("response__5", "response_all"):
        assert paths.vector_file("x", "tone/kind", "base", pos_dir, "residual", "probe", 2).exists()
    assert main(["--experiment", "x", "--methods", "svm", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --methods")
    assert main(["--help"]) == 0 and "examples:" in capsys.readouterr().out


def test_interrupted_extraction_is_never_used(ext, loaded, monkeypatch, capsys):
    """A re-extraction interrupted after some layer files leaves the set without metadata.json (removed before the
    first file, written after the last): selection never uses it and says so; the next run completes it."""
    from extraction import extract_vectors as ev
    from utils.vectors import VectorError, incomplete_sets, list_vectors, load_vector

    extract_vectors("x", position="response[:]", methods="mean_diff", layers="0-2", loaded=loaded, progress=False)
    folder = paths.vector_metadata("x", "tone/kind", "base", "response_all", "residual", "mean_diff").parent
    assert [r.layer for r in list_vectors("x", "tone/kind", "base")] == LAYERS
    real_write, calls = ev.write_pt, []

    def dying_write(path, obj):   # the second layer file of the re-run never lands: Ctrl-C in the middle
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, obj)

    monkeypatch.setattr(ev, "write_pt", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_vectors("x", position="response[:]", methods="mean_diff", layers="0-2", loaded=loaded, progress=False)
    assert not (folder / "metadata.json").exists() and (folder / "layer0.pt").exists()
    assert incomplete_sets("x") == [folder]
    assert list_vectors("x", "tone/kind", "base") == []    # its only set is incomplete
    with pytest.raises(VectorError, match=r"no vector files"):
        rank_vectors("x", "tone/kind", "base", "base")
    assert capsys.readouterr().err.count(f"{folder}: vector files without metadata.json") == 1   # once per process
    with pytest.raises(VectorError, match=r"no metadata\.json: an incomplete vector set"):
        load_vector("x", "tone/kind", "base", "response_all", "residual", "mean_diff", 0)
    monkeypatch.setattr(ev, "write_pt", real_write)
    extract_vectors("x", position="response[:]", methods="mean_diff", layers="0-2", loaded=loaded, progress=False)
    assert incomplete_sets("x") == [] and [r.layer for r in list_vectors("x", "tone/kind", "base")] == LAYERS


def brute_auroc(pos, neg) -> float:
    """Every pair counted by hand: 1 when the positive scores higher, 1/2 on a tie."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    return wins / (len(pos) * len(neg))


def test_card_matches_hf(ext, hf, loaded, tmp_path, capsys):
    """card.json next to the vectors: AUROC, accuracy, recall at 1% FPR on a neutral corpus, 32 random directions,
    sign and class statistics, each recomputed here from HF hidden states and pairs counted by hand."""
    from utils.cards import card_path, read_card

    neutral_file = tmp_path / "neutral.txt"
    neutral_texts = lines("the a table window river bus morning paper green road".split(), 7, n=120)
    neutral_file.write_text("\n".join(neutral_texts) + "\n")
    extract_vectors("x", position="response[:]", methods="probe", layers="1-2", loaded=loaded, progress=False,
                    neutral_corpus=str(neutral_file))
    card = read_card(card_path("x", "tone/kind", "base"))
    assert card.extra["n_neutral"] == 120 and card.fpr == 0.01 and card.n_random == 32
    meta = json.loads(paths.vector_metadata("x", "tone/kind", "base", "response_all", "residual", "probe").read_text())
    tp, tn, vp, vn = split_texts(ext, meta)
    f_tp, f_tn, f_vp, f_vn, f_nu = (hf_features(hf, t) for t in (tp, tn, vp, vn, neutral_texts))
    for L in (1, 2):
        e = card.entry("response_all", "residual", "probe", L)
        f = paths.vector_file("x", "tone/kind", "base", "response_all", "residual", "probe", L)
        v = torch.load(f, weights_only=True).double()
        pv, nv, nu = f_vp[L] @ v, f_vn[L] @ v, f_nu[L] @ v
        assert e["auroc"] == pytest.approx(brute_auroc(pv, nv))
        assert e["accuracy"] == meta["layers"][str(L)]["val_accuracy"]
        threshold = sorted(nu.tolist(), reverse=True)[1]    # 1% of 120: one neutral sentence may score above
        assert e["neutral_threshold"] == pytest.approx(threshold, abs=1e-4)
        assert e["recall_at_fpr"] == sum(p > threshold for p in pv.tolist()) / len(pv)
        g = torch.Generator().manual_seed(0)
        rand = torch.randn(32, 64, generator=g, dtype=torch.float64)
        aucs = []
        for d in rand / rand.norm(dim=1, keepdim=True):
            d = d if float((f_tp[L].mean(0) - f_tn[L].mean(0)) @ d) > 0 else -d
            aucs.append(brute_auroc(f_vp[L] @ d, f_vn[L] @ d))
        assert e["random_auroc_mean"] == pytest.approx(sum(aucs) / 32, abs=1e-6)
        assert e["random_auroc_max"] == pytest.approx(max(aucs), abs=1e-6)
        assert e["sign_ok"] is (float(pv.mean()) > float(nv.mean()))
        assert (e["pos_mean"], e["pos_std"]) == (pytest.approx(float(pv.mean()), abs=1e-4),
                                                 pytest.approx(float(pv.std(unbiased=False)), abs=1e-4))
        assert e["baseline"] == meta["layers"][str(L)]["baseline"]
    assert main(["--experiment", "x", "--traits", "tone/kind", "--layers", "1", "--methods", "probe", "--quiet",
                 "--position", "response[:]", "--neutral-corpus", str(neutral_file)]) == 0
    out = capsys.readouterr().out
    assert "vector card tone/kind" in out and "response_all/residual/probe" in out and "AUROC" in out
    assert main(["--experiment", "x", "--neutral-corpus", str(tmp_path / "nope.txt"), "--quiet"]) == 2
    assert "--neutral-corpus" in capsys.readouterr().err


def test_trait_card_for_vectors_from_elsewhere(ext, loaded, capsys):
    """trait-card on our own vectors (val_lines known) writes the card the extractor wrote; on vectors stripped to
    what trait-interp writes (norm, baseline), it reads every line, says so, and gives selection the reference."""
    from extraction.vector_card import main as card_main, vector_card
    from utils.cards import card_path, read_card

    extract_vectors("x", position="response[:]", methods="probe", layers="1-2", loaded=loaded, progress=False)
    path = card_path("x", "tone/kind", "base")
    ours = read_card(path)
    assert card_main(["--experiment", "x", "--quiet"]) == 2 and "--overwrite" in capsys.readouterr().err
    vector_card("x", overwrite=True, loaded=loaded, progress=False)
    again = read_card(path)
    for key, layers in ours.sets.items():
        for layer, e in layers.items():
            for k, v in e.items():
                assert again.sets[key][layer][k] == (pytest.approx(v, abs=1e-5) if isinstance(v, float) else v), k
    meta_path = paths.vector_metadata("x", "tone/kind", "base", "response_all", "residual", "probe")
    meta = json.loads(meta_path.read_text())
    meta = {k: meta[k] for k in ("model", "trait", "method", "component", "position")} | {
        "layers": {l: {"norm": e["norm"], "baseline": e["baseline"]} for l, e in meta["layers"].items()}}
    meta_path.write_text(json.dumps(meta))
    s = vector_card("x", overwrite=True, loaded=loaded, progress=False)
    assert "every line" in s["traits"]["tone/kind"]["held_out"]
    card = read_card(path)
    e = card.entry("response_all", "residual", "probe", 2)
    assert e["n_pos"] == e["n_neg"] == 16 and e["baseline"] == meta["layers"]["2"]["baseline"]
    from utils.vectors import select_vectors   # no held-out metrics left to rank by: a layer is asked for
    ref = select_vectors("x", "tone/kind", "base", "base", layers="2", position="response[:]")[0].reference
    assert ref.source == "card" and (ref.pos_mean, ref.neg_mean) == (e["pos_mean"], e["neg_mean"])
