"""Metrics for evaluate.py: captions, short answers (VQA), classification, and the plots and tables reporting them.

Pure functions: no model code. Scales are pycocoevalcap's: BLEU, METEOR and ROUGE-L are fractions in [0, 1] (papers
print them ×100); CIDEr is pycocoevalcap's CIDEr-D-style value, already ×10, so 0–10 (papers print it ×100).
"""
from __future__ import annotations

import atexit
import math
import numbers
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PYTHON_BACKEND = "python (sacrebleu, rouge-score; no METEOR without Java)"


# ---------------------------------------------------------------------------------------------------------- captions
def _clean(text: str) -> str:
    # one line per caption and no "|||": the PTB tokenizer and the METEOR jar both talk line-by-line over a pipe,
    # and METEOR splits fields on "|||" (pycocoevalcap strips it from hypotheses only) — either would desync them
    return " ".join(text.replace("|||", " ").split())


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer, same jar, flags and punctuation filter, so the numbers match COCOEvalCap's. Run
    here because the original writes its temporary file beside the jar, which fails when site-packages is read-only.
    Inherited quirk, kept for comparability: with -lowerCase brackets come out as "-lrb-"/"-rrb-", which the filter
    (written for "-LRB-") does not remove, so they count as words."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not texts:
        return []
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts) + "\n")
    try:
        done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", "-encoding", "utf-8", f.name], capture_output=True)
    finally:
        os.unlink(f.name)
    lines = done.stdout.decode("utf-8").splitlines()
    if done.returncode or len(lines) != len(texts):
        raise RuntimeError(f"PTB tokenizer (java) returned {len(lines)} lines for {len(texts)} captions, exit code "
                           f"{done.returncode}: {done.stderr.decode(errors='replace')[-1000:]}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines]


_meteor_lock, _meteor_scorer = threading.Lock(), None


def _meteor(gts: dict, res: dict) -> float:
    """One METEOR JVM per process, reused: starting it (JVM + paraphrase tables) takes ~9 s, scoring is fast."""
    global _meteor_scorer
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor_scorer is None or _meteor_scorer.meteor_p.poll() is not None:
            _meteor_scorer = Meteor()
        scorer = _meteor_scorer
        try:
            return float(scorer.compute_score(gts, res)[0])
        except Exception as exc:
            scorer.meteor_p.kill()
            said = scorer.meteor_p.stderr.read().decode(errors="replace")[-1000:]
            scorer.meteor_p.wait()
            scorer.lock = threading.Lock()  # compute_score leaves its lock held on error; Meteor.__del__ would hang
            _meteor_scorer = None
            raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {exc!r}; java said: {said}") from exc


@atexit.register
def _close_meteor() -> None:
    if _meteor_scorer is not None:
        _meteor_scorer.meteor_p.kill()


def _check_captions(predictions, references) -> tuple[list[str], list[list[str]]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists (one entry per image), not a single string")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} items but references has {len(references)}")
    if not predictions:
        raise ValueError("predictions and references are empty: nothing to score")
    refs = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise ValueError(f"predictions[{i}] is a {type(p).__name__}, not a str")
        r = [r] if isinstance(r, str) else r
        if not isinstance(r, (list, tuple)):
            raise ValueError(f"references[{i}] is a {type(r).__name__}: expected a str or a list of str")
        if not r:
            raise ValueError(f"references[{i}] is an empty list: every item needs at least one reference caption")
        for j, x in enumerate(r):
            if not isinstance(x, str) or not x.strip():
                raise ValueError(f"references[{i}][{j}] is {x!r}: a reference must be a non-empty string")
        refs.append([_clean(x) for x in r])
    return [_clean(p) for p in predictions], refs


def caption_metrics(predictions: list[str], references: list[list[str]] | list[str], backend: str = "auto") -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr as COCO caption papers report them, so our numbers sit next to theirs.

    backend "pycocoevalcap" (the default when `java` is on PATH) is COCOEvalCap's pipeline: PTB tokenisation, then
    its Bleu ("closest" reference length, corpus level), METEOR 1.5, ROUGE-L (β = 1.2, max precision and recall over
    the references) and CIDEr. backend "python" (the default without Java) cannot run METEOR (None) and is labelled
    in "backend" so nobody puts it beside paper numbers unawares: lowercase word tokenisation; corpus BLEU-n from
    sacrebleu with max n-gram order n, no smoothing — the same formula as pycocoevalcap's, which however adds 1e-15
    to matched counts, so an order with no match gives it ~1e-4 where sacrebleu gives 0; ROUGE-L is rouge-score's
    F1 (β = 1) of the best reference, averaged — not pycocoevalcap's; CIDEr is pycocoevalcap's pure-Python Cider.

    CIDEr's idf comes from the evaluated references themselves: one image always scores 0 and a handful of images
    give unstable values. An empty or blank prediction is a wrong answer: it is scored as an empty string (which
    pycocoevalcap 1.2 and sacrebleu score 0 without error) and counted in "empty_predictions"; so is a prediction
    that is only punctuation. A blank reference is an error.
    """
    if backend not in ("auto", "pycocoevalcap", "python"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'pycocoevalcap' or 'python'")
    has_java = shutil.which("java") is not None
    if backend == "pycocoevalcap" and not has_java:
        raise ValueError("backend='pycocoevalcap' needs Java on PATH (the PTB tokenizer and METEOR are jars); "
                         "install a JRE or pass backend='python'")
    java = has_java and backend != "python"
    preds, refs = _check_captions(predictions, references)
    flat = [p for p in preds if p] + [r for rs in refs for r in rs]
    # the python backend's words agree with PTB + pycocoevalcap's punctuation filter on ordinary captions ("3.5" kept
    # whole), not on clitics ("it's": "it s" vs PTB "it 's") or brackets (PTB keeps "-lrb-", see _ptb_tokenize)
    words = re.compile(r"\w+(?:\.\d+)*")
    tokens = iter(_ptb_tokenize(flat) if java else [" ".join(words.findall(t.lower())) for t in flat])
    res = {i: [next(tokens) if p else ""] for i, p in enumerate(preds)}
    gts = {i: [next(tokens) for _ in rs] for i, rs in enumerate(refs)}
    for i, rs in gts.items():
        for j, r in enumerate(rs):
            if not r:
                raise ValueError(f"references[{i}][{j}] ({refs[i][j]!r}) has no words after tokenisation")
    from pycocoevalcap.cider.cider import Cider

    out: dict = {"n": len(preds), "empty_predictions": sum(not res[i][0] for i in res)}
    if java:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
        out.update(meteor=_meteor(gts, res), rouge_l=float(Rouge().compute_score(gts, res)[0]),
                   backend="pycocoevalcap")
    else:
        from rouge_score.rouge_scorer import RougeScorer
        from sacrebleu.metrics import BLEU

        hyps = [res[i][0] for i in range(len(preds))]
        width = max(len(rs) for rs in gts.values())  # sacrebleu wants reference streams; None pads missing ones
        streams = [[rs[j] if j < len(rs) else None for rs in gts.values()] for j in range(width)]
        for n in range(1, 5):
            bleu = BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, force=True)
            out[f"bleu{n}"] = bleu.corpus_score(hyps, streams).score / 100
        rouge = RougeScorer(["rougeL"], tokenizer=SimpleNamespace(tokenize=str.split))
        out.update(meteor=None, rouge_l=float(np.mean([rouge.score_multi(gts[i], h)["rougeL"].fmeasure
                                                        for i, h in enumerate(hyps)])), backend=PYTHON_BACKEND)
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    return {k: out[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "backend",
                                "empty_predictions", "n")}


# ------------------------------------------------------------------------------------------------- short answers
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]|_")  # any punctuation except a decimal point between digits


def normalize_answer(s: str) -> str:
    """SQuAD/VQA normalisation (lowercase; punctuation, articles a/an/the and extra spaces removed; number words
    zero–ten as digits) made safe for measurements: "12.5" stays "12.5" (SQuAD would make it "125"), "1,000" is
    "1000", "12.50" is "12.5", and "12nm" is "12 nm". Units are kept and never converted: "12 nm" is not "12" (an
    exact-match miss that token F1 scores 2/3) and not "0.012 µm"."""
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", str(s).lower())
    s = re.sub(r"(?<![\w.])\.(?=\d)", "0.", s)
    s = re.sub(r"(?<=\d)(?=[^\W\d_])", " ", _PUNCT.sub(" ", s))
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in ("a", "an", "the")]
    return " ".join(w.rstrip("0").rstrip(".") if re.fullmatch(r"\d+\.\d+", w) else w for w in words)


def _refs(ref) -> list[str]:
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise ValueError("the reference answer list is empty")
    return refs


def exact_match(pred: str, ref: str | list[str]) -> float:
    """1.0 when the normalised answers are equal (any of several references counts), else 0.0."""
    return float(any(normalize_answer(pred) == normalize_answer(r) for r in _refs(ref)))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def token_f1(pred: str, ref: str | list[str]) -> float:
    """SQuAD's bag-of-words F1, partial credit for answers that are nearly right; best over several references."""
    return max(_f1(pred, r) for r in _refs(ref))


def vqa_metrics(predictions: list[str], references: list, question_types: list[str] | None = None) -> dict:
    """Exact match and token F1 overall and per question type, since one aggregate hides which skill fails."""
    types = ["all"] * len(predictions) if question_types is None else list(question_types)
    if not len(predictions) == len(references) == len(types):
        raise ValueError(f"predictions has {len(predictions)} items, references {len(references)}, "
                         f"question_types {len(types)}: they must be equal")
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    groups: dict[str, list[tuple[float, float]]] = {}
    for i, (p, r, t) in enumerate(zip(predictions, references, types)):
        if not isinstance(p, str):
            raise ValueError(f"predictions[{i}] is a {type(p).__name__}, not a str")
        if not (isinstance(r, str) or (isinstance(r, (list, tuple)) and r and all(isinstance(x, str) for x in r))):
            raise ValueError(f"references[{i}] is {r!r}: expected a str or a non-empty list of str")
        groups.setdefault(str(t), []).append((exact_match(p, r), token_f1(p, r)))

    def summary(rows):
        return {"exact_match": float(np.mean([e for e, _ in rows])), "token_f1": float(np.mean([f for _, f in rows])),
                "n": len(rows)}

    return {"overall": summary([row for rows in groups.values() for row in rows]),
            "by_type": {t: summary(groups[t]) for t in sorted(groups)}}


# ------------------------------------------------------------------------------------------------ classification
def classification_metrics(scores, labels, class_names: list[str], k: int = 5) -> dict:
    """Accuracy of picking the best-scoring class (e.g. the answer with the highest log-likelihood), with the detail
    needed to see which classes are confused. Ties go to the lower class index. The top-k key is named after the
    requested k ("top5") but computed with k = min(k, C)."""
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be a numeric (N, C) array: {exc}") from exc
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] != len(names):
        raise ValueError(f"scores has shape {s.shape}; expected (N, {len(names)}) with N >= 1: one row per example, "
                         f"one column per class in class_names")
    y = np.asarray(labels)
    if y.shape != (s.shape[0],):
        raise ValueError(f"labels has shape {y.shape}; expected ({s.shape[0]},), one per row of scores")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if (bad := np.flatnonzero((y < 0) | (y >= len(names)))).size:
        raise ValueError(f"labels[{bad[0]}] = {y[bad[0]]} is outside 0..{len(names) - 1} ({len(names)} classes)")
    if (nan := np.flatnonzero(np.isnan(s).any(axis=1))).size:
        raise ValueError(f"scores row {nan[0]} contains NaN ({nan.size} such rows)")
    if not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive integer")
    ranked = np.argsort(-s, axis=1, kind="stable")[:, :min(k, len(names))]
    pred = ranked[:, 0]
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    support = confusion.sum(axis=1)
    per_class = {n: float(confusion[c, c] / support[c]) if support[c] else None for c, n in enumerate(names)}
    seen = [v for v in per_class.values() if v is not None]
    return {"top1": float((pred == y).mean()), f"top{k}": float((ranked == y[:, None]).any(axis=1).mean()),
            "per_class_accuracy": per_class, "mean_class_accuracy": float(np.mean(seen)),
            "confusion": confusion.tolist(), "n": int(s.shape[0])}


# ------------------------------------------------------------------------------------------------- plots, tables
def _figure(width: float, height: float):
    # an explicit Agg canvas: no pyplot, so no global backend switch and no figure kept alive in pyplot's registry
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    # a str, not a Path: callers put it straight into metrics.json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return str(path)


def plot_confusion(confusion, class_names: list[str], path) -> str:
    """Colour is the row fraction (so rare classes are as visible as common ones); cells carry the counts."""
    m = np.asarray(confusion, dtype=np.float64)
    c = len(class_names)
    if m.shape != (c, c):
        raise ValueError(f"confusion has shape {m.shape}; expected ({c}, {c}) for {c} class_names")
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    fig = _figure(max(4.0, 2 + 0.5 * c), max(3.5, 1.5 + 0.5 * c))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title="confusion (colour: row share)")
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if c <= 30:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=8, color="white" if frac[i, j] > .5 else "black")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_routing(routing: dict, path) -> str:
    """Expert share per MoE layer for image and text tokens (RouterProbe.summary(), saved as routing.json), to see
    at a glance whether experts specialise by modality or collapse onto a few (compare with the uniform 1/E)."""
    layers = routing.get("layers") if isinstance(routing, dict) else None
    if not layers:
        raise ValueError("routing has no 'layers': expected RouterProbe.summary() output (routing.json)")
    panels = {m: [e.get(m) or [] for e in layers] for m in ("image", "text")}
    panels = {m: rows for m, rows in panels.items() if any(rows)} or {"all": [e.get("all") or [] for e in layers]}
    first = next((r for rows in panels.values() for r in rows if r), None)
    if first is None:
        raise ValueError("routing has no expert shares in any layer (no image, text or all tokens were routed)")
    experts = int(routing.get("num_experts") or len(first))
    for m, rows in panels.items():
        for e, r in zip(layers, rows):
            if r and len(r) != experts:
                raise ValueError(f"routing layer {e.get('layer')}: '{m}' has {len(r)} shares, expected {experts}")
    mats = {m: np.array([r or [np.nan] * experts for r in rows], dtype=np.float64) for m, rows in panels.items()}
    vmax = max(float(np.nanmax(x)) for x in mats.values() if not np.isnan(x).all())
    fig = _figure(1.5 + len(mats) * max(3.0, 0.4 * experts), 1.5 + max(2.0, 0.3 * len(layers)))
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (m, x) in zip(axes, mats.items()):
        im = ax.imshow(x, vmin=0, vmax=vmax, aspect="auto", cmap="viridis")
        ax.set(title=f"{m} tokens (uniform 1/E = {1 / experts:.3g})", xlabel="expert", ylabel="MoE layer",
               xticks=range(experts), yticks=range(len(layers)))
        ax.set_yticklabels([str(e.get("layer", i)) for i, e in enumerate(layers)])
    fig.colorbar(im, ax=list(axes), label=f"share of top-{routing.get('top_k', 'k')} assignments")
    return _save(fig, path)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """GitHub markdown for reports and READMEs: floats to 4 significant digits, counts exact, missing values "–"."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")

    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return "–" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
        return str(int(v)) if isinstance(v, numbers.Integral) else "–" if math.isnan(v) else f"{float(v):.4g}"

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{i}] is a {type(row).__name__}, not a dict")
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
