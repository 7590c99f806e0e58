"""semivlm.metrics against pycocoevalcap's own scorers, hand-computed values and bad input.

Java costs: each pycocoevalcap-backend call runs the PTB tokenizer jar (~0.5 s); METEOR starts one JVM per process
(~9 s, then reused), and the parity test starts a second, independent one on purpose.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from semivlm import metrics
from semivlm.metrics import (caption_metrics, classification_metrics, exact_match, markdown_table, normalize_answer,
                             plot_confusion, plot_routing, token_f1, vqa_metrics)

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: METEOR 1.5 and the PTB tokenizer are jars")
PNG = b"\x89PNG\r\n\x1a\n"

# words, capitals, commas and full stops only: PTB and the python backend's tokenisation agree on these
TOY_PREDS = ["A SEM image of silicon nanowires on a substrate.",
             "TEM image showing a thin oxide layer on silicon.",
             "Spherical gold nanoparticles, uniformly dispersed.",
             "a cross section of a trench filled with copper"]
TOY_REFS = [["An SEM image of vertical silicon nanowires on a substrate.",
             "Silicon nanowires grown on a substrate, seen by SEM."],
            ["A TEM image showing a thin gate oxide layer on silicon.", "Thin oxide on a silicon substrate."],
            ["Gold nanoparticles that are spherical and uniformly dispersed.",
             "Uniformly dispersed spherical gold nanoparticles."],
            ["A cross section of a copper filled trench.", "Cross section of a trench filled with copper."]]


@pytest.fixture(scope="module")
def toy_java():
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH")
    return caption_metrics(TOY_PREDS, TOY_REFS, backend="pycocoevalcap")


# ----------------------------------------------------------------------------------------------------- captions
@needs_java
def test_caption_metrics_equal_cocoevalcap_pipeline_on_toy_corpus(toy_java):
    # pycocoevalcap 1.2 ships no example captions (its example/ script needs COCO's captions_val2014.json), so the
    # reference is COCOEvalCap's own sequence on a fixed corpus: PTBTokenizer, then each scorer, called directly
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(TOY_REFS)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(TOY_PREDS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()  # a JVM of its own, independent of the one metrics keeps
    expected = {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
                "meteor": meteor.compute_score(gts, res)[0], "rouge_l": Rouge().compute_score(gts, res)[0],
                "cider": Cider().compute_score(gts, res)[0]}
    del meteor
    assert toy_java["backend"] == "pycocoevalcap" and toy_java["n"] == 4 and toy_java["empty_predictions"] == 0
    for key, value in expected.items():
        assert toy_java[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < toy_java["bleu4"] < toy_java["bleu1"] <= 1 and 0 < toy_java["meteor"] < 1 and toy_java["cider"] > 0


# "The cat sat on the mat." against "the cat is on the mat today" (PTB: lowercase, full stop dropped):
#   candidate 6 words, reference 7; modified n-gram precisions
#     p1 = 5/6  (the×2, cat, on, mat; not "sat")      p2 = 3/5  (the cat, on the, the mat)
#     p3 = 1/4  (on the mat)                           p4 = 0/3
#   brevity penalty BP = exp(1 - r/c) = exp(1 - 7/6) = 0.846482
#   BLEU-1 = BP·p1 = 0.705401      BLEU-2 = BP·(p1·p2)^(1/2) = BP·√0.5 = 0.598553
#   BLEU-3 = BP·(p1·p2·p3)^(1/3) = BP·0.5 = 0.423241      BLEU-4 = 0
#   pycocoevalcap computes (correct + 1e-15)/(guess + 1e-9), so its BLEU-4 is BP·(0.125·1e-15/3)^(1/4) = 6.8e-5,
#   not 0, and the other orders are off by ~1e-10: hence the 1e-4 tolerance
#   ROUGE-L: LCS = "the cat on the mat" = 5, P = 5/6, R = 5/7
#     pycocoevalcap, β = 1.2: (1+β²)PR/(R+β²P) = 305/402 = 0.758706;  rouge-score F1 = 2·5/(6+7) = 10/13
HAND = {"bleu1": math.exp(-1 / 6) * 5 / 6, "bleu2": math.exp(-1 / 6) * math.sqrt(0.5), "bleu3": math.exp(-1 / 6) / 2,
        "bleu4": 0.0}


@needs_java
def test_bleu_and_rouge_l_match_hand_computation():
    got = caption_metrics(["The cat sat on the mat."], [["the cat is on the mat today"]], backend="pycocoevalcap")
    for key, value in HAND.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert 0 < got["bleu4"] < 1e-4  # pycocoevalcap's epsilon, not a match
    assert got["rouge_l"] == pytest.approx(305 / 402, abs=1e-9)
    assert got["cider"] == 0.0  # one image: every n-gram's idf is log(1/1) = 0, a documented CIDEr property

    py = caption_metrics(["The cat sat on the mat."], [["the cat is on the mat today"]], backend="python")
    for key, value in HAND.items():
        assert py[key] == pytest.approx(value, abs=1e-9), key
    assert py["rouge_l"] == pytest.approx(10 / 13, abs=1e-9)


@needs_java
def test_meteor_through_java_is_high_for_identical_and_lower_for_different_caption():
    same = caption_metrics(["a thin oxide layer on silicon"], ["a thin oxide layer on silicon"])
    other = caption_metrics(["copper lines on a wafer"], ["a thin oxide layer on silicon"])
    assert same["backend"] == "pycocoevalcap"
    assert 0.9 < same["meteor"] <= 1.0  # METEOR 1.5 gives an exact match 1.0 (no fragmentation penalty)
    assert 0.0 <= other["meteor"] < same["meteor"]


@needs_java
def test_python_backend_is_labelled_has_no_meteor_and_bleu_matches_pycocoevalcap(toy_java, monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # as on a machine without Java
    py = caption_metrics(TOY_PREDS, TOY_REFS)
    assert py["backend"] == metrics.PYTHON_BACKEND and "no METEOR" in py["backend"] and py["meteor"] is None
    # same tokens on this corpus, same formula ("closest" reference length, corpus counts, no smoothing); every
    # order has matches here, so only pycocoevalcap's 1e-15/1e-9 epsilons differ (relative ~1e-10)
    for n in range(1, 5):
        assert py[f"bleu{n}"] == pytest.approx(toy_java[f"bleu{n}"], abs=1e-6)
    assert py["cider"] == pytest.approx(toy_java["cider"], abs=1e-9)  # same Cider class, same tokens
    assert 0 < py["rouge_l"] <= 1  # F1 of the best reference, not pycocoevalcap's β = 1.2: not compared
    with pytest.raises(ValueError, match="needs Java"):
        caption_metrics(TOY_PREDS, TOY_REFS, backend="pycocoevalcap")


@needs_java
def test_empty_predictions_are_counted_and_scored_as_wrong_by_both_backends():
    preds, refs = ["", "the cat sat on the mat"], [["a dog runs"], ["the cat sat on the mat"]]
    full = caption_metrics(["a dog runs", "the cat sat on the mat"], refs)
    for backend in ("pycocoevalcap", "python"):
        got = caption_metrics(preds, refs, backend=backend)
        assert got["empty_predictions"] == 1 and got["n"] == 2
        assert got["bleu1"] < full["bleu1"] and got["rouge_l"] == pytest.approx(0.5, abs=1e-9)
    assert got["bleu4"] < full["bleu4"]
    blank = caption_metrics(["  ", "...", "\n"], ["a dog", "a cat", "a cow"], backend="python")
    assert blank["empty_predictions"] == 3 and blank["bleu1"] == blank["rouge_l"] == blank["cider"] == 0.0


def test_caption_metrics_rejects_bad_input_naming_it():
    with pytest.raises(ValueError, match=r"predictions has 2 items but references has 3"):
        caption_metrics(["a", "b"], ["a", "b", "c"], backend="python")
    with pytest.raises(ValueError, match="empty"):
        caption_metrics([], [], backend="python")
    with pytest.raises(ValueError, match=r"references\[1\] is an empty list"):
        caption_metrics(["a cat", "a dog"], [["a cat"], []], backend="python")
    with pytest.raises(ValueError, match=r"references\[0\]\[1\]"):
        caption_metrics(["a cat"], [["a cat", "  "]], backend="python")
    with pytest.raises(ValueError, match=r"predictions\[1\] is a NoneType"):
        caption_metrics(["a cat", None], ["a cat", "a dog"], backend="python")
    with pytest.raises(ValueError, match="backend='bleurt'"):
        caption_metrics(["a cat"], ["a cat"], backend="bleurt")


# ------------------------------------------------------------------------------------------------ short answers
def test_normalize_answer_strips_case_punctuation_articles_and_keeps_decimals():
    assert normalize_answer("  The Wafer's  edge!! ") == "wafer s edge"
    assert normalize_answer("An oxide, a film") == "oxide film"
    assert normalize_answer("12.5 nm") == "12.5 nm"       # SQuAD's normalisation would give "125 nm"
    assert normalize_answer("12.50nm") == "12.5 nm"
    assert normalize_answer("1,000") == "1000" and normalize_answer("Two") == "2" and normalize_answer(".5") == "0.5"
    assert normalize_answer("cross-section") == "cross section"


def test_exact_match_and_token_f1_on_hand_examples():
    assert exact_match("The nanowires.", "nanowires") == 1.0
    assert exact_match("12 nm", "12") == 0.0 and exact_match("12nm", "12 nm") == 1.0
    assert exact_match("copper", ["aluminium", "Copper"]) == 1.0
    # "12 nm" vs "12": common 1, P = 1/2, R = 1 -> F1 = 2/3
    assert token_f1("12 nm", "12") == pytest.approx(2 / 3)
    # "thin gate oxide" vs "gate oxide layer": common 2, P = R = 2/3
    assert token_f1("a thin gate oxide", "the gate oxide layer") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "copper") == 0.0 and token_f1("copper", "") == 0.0
    assert token_f1("gold", "copper") == 0.0


def test_vqa_metrics_overall_and_by_question_type():
    got = vqa_metrics(["12 nm", "yes", "hexagonal", "three"], ["12 nm", "no", "cubic lattice", "3"],
                      ["measure", "yes/no", "shape", "count"])
    assert got["overall"] == {"exact_match": 0.5, "token_f1": 0.5, "n": 4}
    assert got["by_type"]["count"] == {"exact_match": 1.0, "token_f1": 1.0, "n": 1}
    assert got["by_type"]["yes/no"]["exact_match"] == 0.0 and list(got["by_type"]) == sorted(got["by_type"])
    two = vqa_metrics(["12", "12 nm"], ["12 nm", "12 nm"], ["measure", "measure"])
    assert two["by_type"]["measure"] == {"exact_match": 0.5, "token_f1": pytest.approx(5 / 6), "n": 2}
    with pytest.raises(ValueError, match="predictions has 2 items, references 1, question_types 2"):
        vqa_metrics(["a", "b"], ["a"], ["t", "t"])


# ----------------------------------------------------------------------------------------------- classification
def test_classification_picks_the_highest_scoring_class_and_counts_confusions():
    names = ["wire", "particle", "film", "trench", "pore", "grain"]
    labels = [0, 1, 2, 3, 4, 5, 0, 1]
    scores = np.full((8, 6), -5.0)
    scores[np.arange(8), labels] = -1.0      # the true class scores best ...
    scores[6, 2], scores[7, 0] = 0.0, -0.5   # ... except row 6 (predicts film) and row 7 (predicts wire)
    got = classification_metrics(scores, labels, names)
    assert got["top1"] == pytest.approx(6 / 8) and got["top5"] == 1.0 and got["top5"] >= got["top1"]
    assert np.asarray(got["confusion"]).sum() == 8 and got["n"] == 8
    assert got["confusion"][0][2] == 1 and got["confusion"][1][0] == 1 and got["confusion"][2][2] == 1
    assert got["per_class_accuracy"]["wire"] == 0.5 and got["per_class_accuracy"]["grain"] == 1.0
    # k larger than the number of classes: every class is in the "top 5" of 3
    small = classification_metrics([[0.1, 0.2, 0.7], [0.9, 0.05, 0.05]], [0, 0], ["a", "b", "c"])
    assert small["top1"] == 0.5 and small["top5"] == 1.0 and small["per_class_accuracy"]["b"] is None


def test_classification_rejects_bad_shapes_nan_and_labels_out_of_range():
    names = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"scores has shape \(2, 2\); expected \(N, 3\)"):
        classification_metrics([[0, 1], [1, 0]], [0, 1], names)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\); expected \(2,\)"):
        classification_metrics(np.zeros((2, 3)), [0, 1, 2], names)
    with pytest.raises(ValueError, match=r"labels\[1\] = 3 is outside 0..2"):
        classification_metrics(np.zeros((2, 3)), [0, 3], names)
    with pytest.raises(ValueError, match="integer"):
        classification_metrics(np.zeros((2, 3)), [0.0, 1.5], names)
    with pytest.raises(ValueError, match="scores row 1 contains NaN"):
        classification_metrics([[0, 1, 2], [0, float("nan"), 1]], [0, 1], names)


# ------------------------------------------------------------------------------------------------ plots, tables
def test_plots_write_png_files(tmp_path):
    confusion = classification_metrics(np.eye(3) + 0.1, [0, 1, 2], ["wire", "film", "pore"])["confusion"]
    out = plot_confusion(confusion, ["wire", "film", "pore"], tmp_path / "plots" / "confusion.png")
    assert isinstance(out, str) and Path(out).read_bytes()[:8] == PNG  # a str: it goes into metrics.json as is
    # RouterProbe.summary() format: shares per expert per layer, None for a modality without tokens
    routing = {"num_experts": 4, "top_k": 2, "aux_loss_mean": 1.02, "layers": [
        {"layer": 1, "image": [0.4, 0.3, 0.2, 0.1], "text": [0.25, 0.25, 0.25, 0.25], "all": [0.3, 0.27, 0.23, 0.2],
         "tokens": {"image": 64, "text": 32, "all": 96}, "aux_loss_mean": 1.01},
        {"layer": 3, "image": None, "text": [0.1, 0.2, 0.3, 0.4], "all": [0.1, 0.2, 0.3, 0.4],
         "tokens": {"image": 0, "text": 32, "all": 32}, "aux_loss_mean": 1.03}]}
    out = plot_routing(routing, tmp_path / "routing.png")
    assert Path(out).read_bytes()[:8] == PNG and Path(out).stat().st_size > 1000
    routing["layers"][1]["text"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="routing layer 3: 'text' has 2 shares, expected 4"):
        plot_routing(routing, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no 'layers'"):
        plot_routing({"layers": []}, tmp_path / "bad.png")


def test_markdown_table_formats_numbers_and_missing_values():
    table = markdown_table([{"model": "moe|4e", "bleu4": 0.123456, "n": 12345, "meteor": None},
                            {"model": "dense", "bleu4": float("nan"), "n": np.int64(7)}],
                           ["model", "bleu4", "meteor", "n"])
    assert table.splitlines() == ["| model | bleu4 | meteor | n |", "|---|---|---|---|",
                                  "| moe\\|4e | 0.1235 | – | 12345 |", "| dense | – | – | 7 |"]
