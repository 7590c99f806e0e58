"""Held-out evaluation with the seed papers' metrics, for text LLMs and VLMs (bf16, fp32 or GPTQ-quantised).

CPU / single-GPU debug (the debug recipe's MoE VLM on the built-in micrographs' test split):
    python evaluate.py --model runs/demo/moe/final --output_dir runs/demo/eval/moe \
        --data "[runs/demo/annotations/captions.jsonl,runs/demo/annotations/vqa.jsonl,runs/demo/annotations/classify.jsonl]"
One node (evaluation runs on one GPU; launch several models side by side rather than one across GPUs):
    accelerate launch --num_processes 1 evaluate.py --config launch/configs/micrograph_vlm/evaluate.yaml
SLURM:
    sbatch --nodes=1 launch/slurm/train.sbatch evaluate.py launch/configs/micrograph_vlm/evaluate.yaml

What is measured, per task of the records (meta.task): captions, greedy → BLEU-1..4, METEOR, ROUGE-L, CIDEr
(pycocoevalcap; a labelled pure-Python fallback without Java) and BERTScore with a local model; VQA, greedy → exact
match and token F1 after normalisation, per question type (meta.qtype); classification → top-1/top-5 by the
likelihood of each class name as the whole answer (never a parse of free text) and a confusion matrix; text
instructions → answer perplexity; a corpus directory → perplexity of its blocks; MoE models → expert shares per
layer for image and text tokens on the held-out records (PNG heatmaps; the training-time routing.json too).
Writes output_dir/metrics.json, report.md, predictions.jsonl and the plots. `--compare "[DIR,DIR,...]"` puts
several evaluations (dense vs MoE vs GPTQ, stage by stage) side by side in one report.md instead.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from semivlm import evaluation as ev
from semivlm import metrics
from semivlm.config import load_config
from semivlm.data import exit_on_bad_record, record_task

# headline metrics of one run, in the order the comparison table shows them
HEADLINE = ["perplexity", "answer_perplexity", "corpus_perplexity", "bleu4", "meteor", "rouge_l", "cider",
            "vqa_exact_match", "vqa_token_f1", "class_accuracy", "top1", "top5", "size_mb", "answers_per_s"]


@dataclass
class EvalConfig:
    model: str = ""  # a saved model directory (train_*.py's output_dir/final, or export_gptq.py's output)
    data: list[str] = field(default_factory=list)  # JSONL record files; each record's meta.task says what to measure
    output_dir: str = ""
    split: str = "test"  # records whose meta.split is this ("" = all)
    corpus: str = ""  # optional: a corpus blocks directory (build_corpus.py) for perplexity
    limit: int = 200  # records per task (0 = all)
    batch_size: int = 8
    max_new_tokens: int = 96
    max_length: int = 1024
    classes: list[str] = field(default_factory=list)  # empty = the distinct answers of the classification records
    metrics_backend: Literal["auto", "python"] = "auto"  # python: sacrebleu/rouge-score, no METEOR (labelled)
    bertscore_model: str = ""  # a local model directory for BERTScore (empty = skipped)
    name: str = ""  # this run's label in comparisons (default: the model directory)
    compare: list[str] = field(default_factory=list)  # evaluation output dirs to tabulate instead of evaluating
    training: list[str] = field(default_factory=list)  # with compare: training output dirs, one row each (history.json)
    # with compare: targets checked in the report, "RUN.METRIC": ">= 0.92" or relative to another run's value,
    # ">= moe - 0.02", "<= moe * 1.25"; a goal whose run or metric is missing is reported as not measured
    goals: dict = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = the GPU when one is visible, else the CPU
    # `model` may also be a PEFT LoRA adapter directory (a run's output_dir/adapter): it is merged onto `base` (empty =
    # the base its adapter_config.json names), cut to its leading `rank` components first when rank > 0 (lora_dynamic_rank
    # runs train every rank in [lora_rank_min, r]); `ranks` evaluates each into output_dir/rank_<r>/ and writes one row
    # per rank to output_dir/ranks.json and report.md
    base: str = ""
    rank: int = 0
    ranks: list[int] = field(default_factory=list)


def progress_printer(what: str):
    t0 = time.perf_counter()

    def show(done: int, total: int):
        if done == total or done % max(1, total // 5) == 0:
            elapsed = time.perf_counter() - t0
            print(f"  {what}: {done}/{total} | {elapsed:.0f}s | ETA {elapsed / done * (total - done):.0f}s", flush=True)
    return show


def bertscore(predictions: list[str], references: list[str], model_dir: str) -> dict:
    """BERTScore F1 (mean) with a user-supplied local encoder (no download): greedy cosine matching of contextual
    token embeddings (last hidden layer), as Zhang et al. 2020 without IDF weighting or baseline rescaling."""
    from transformers import AutoModel, AutoTokenizer

    if not Path(model_dir).is_dir():
        raise SystemExit(f"bertscore_model '{model_dir}' is not a local directory (BERTScore never downloads)")
    tok, enc = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def embed(text):
        ids = tok(text or ".", return_tensors="pt", truncation=True, max_length=512)
        h = enc(**ids).last_hidden_state[0, 1:-1] if ids["input_ids"].shape[1] > 2 else enc(**ids).last_hidden_state[0]
        return torch.nn.functional.normalize(h, dim=-1)

    f1s = []
    for p, r in zip(predictions, references):
        sim = embed(p) @ embed(r).T
        precision, recall = sim.max(1).values.mean(), sim.max(0).values.mean()
        f1s.append(float(2 * precision * recall / (precision + recall)))
    return {"bertscore_f1": sum(f1s) / len(f1s), "bertscore_model": model_dir}


def compare(cfg: EvalConfig) -> dict:
    """One table of several evaluations' headline metrics (rows in the order given)."""
    rows = []
    for d in cfg.compare:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"compare: '{d}' has no metrics.json (run evaluate.py with --output_dir {d} first)")
        m = json.loads(path.read_text())
        rows.append({"run": m.get("name", d), **{k: m["headline"].get(k) for k in HEADLINE}})
    columns = ["run"] + [k for k in HEADLINE if any(r.get(k) is not None for r in rows)]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = metrics.markdown_table(rows, columns)
    text = f"# {cfg.name or 'Comparison'}\n\n## Held-out metrics\n\n{table}"
    if cfg.goals:
        text += goals_section(rows, cfg.goals)
    text += examples_section(cfg.compare)
    training = [training_summary(d) for d in cfg.training]
    if training:
        columns = ["stage", "steps", "train_loss", "eval_loss", "tokens_per_s", "mfu_percent", "peak_mem_gib",
                   "class_accuracy"]
        text += ("\n## Training\n\nMedian tokens/s and MFU over the logged steps; class_accuracy is the held-out "
                 "share of generated answers naming the right category after the stage (train_moe.py).\n\n"
                 + metrics.markdown_table(training, columns))
    (out / "report.md").write_text(text)
    ev.save_json(out / "comparison.json", {"evaluations": rows, "training": training})
    print(text)
    return {"rows": rows, "training": training}


def goals_section(rows: list[dict], goals: dict) -> str:
    """Each goal beside the measured value: met or not, and by how much (measured minus target)."""
    by_run = {r["run"]: r for r in rows}
    lines = []
    for key, rule in goals.items():
        run, _, metric = key.partition(".")
        op, _, expr = str(rule).strip().partition(" ")
        parts = expr.split()
        if op not in (">=", "<=") or len(parts) not in (1, 3) or (len(parts) == 3 and parts[1] not in "+-*"):
            raise SystemExit(f"goals: '{key}: {rule}' is not '>= NUMBER' or '<= RUN.METRIC-RUN (+|-|*) NUMBER'")
        try:
            number = float(parts[-1])
        except ValueError:
            raise SystemExit(f"goals: '{key}: {rule}': '{parts[-1]}' is not a number") from None
        measured = by_run.get(run, {}).get(metric)
        base = by_run.get(parts[0], {}).get(metric) if len(parts) == 3 else number
        if measured is None or base is None:
            lines.append({"goal": f"{key} {rule}", "measured": None, "target": None, "met": "not measured"})
            continue
        target = base if len(parts) == 1 else {"+": base + number, "-": base - number, "*": base * number}[parts[1]]
        met = measured >= target if op == ">=" else measured <= target
        lines.append({"goal": f"{key} {rule}", "measured": measured, "target": target,
                      "met": "yes" if met else f"no, by {abs(measured - target):.3g}"})
    return "\n## Goals\n\n" + metrics.markdown_table(lines, ["goal", "measured", "target", "met"]) + "\n"


def examples_section(eval_dirs: list[str], per_task: int = 3) -> str:
    """What the models say: the first `per_task` caption and VQA records that every evaluation answered, each
    model's answer beside the reference, so a reader sees the text behind the metrics."""
    answers = {}  # eval dir -> {(task, id): prediction}
    refs: dict[tuple, str] = {}
    for d in eval_dirs:
        path = Path(d) / "predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        answers[d] = {(r["task"], r["id"]): r["prediction"] for r in rows}
        refs.update({(r["task"], r["id"]): r["reference"] for r in rows})
    text = ""
    for task in ("caption", "vqa"):  # among the evaluations of that task (a text-only LLM's has none)
        dirs = [d for d in eval_dirs if any(k[0] == task for k in answers[d])]
        keys = [k for k in refs if k[0] == task and all(k in answers[d] for d in dirs)][:per_task]
        if not keys:
            continue
        text += f"\n## Example {'captions' if task == 'caption' else 'VQA answers'}\n"
        for k in keys:
            text += f"\n`{k[1]}` reference: {refs[k]}\n\n"
            text += "".join(f"- **{json.loads((Path(d) / 'metrics.json').read_text()).get('name', d)}**: "
                            f"{answers[d][k] or '(empty)'}\n" for d in dirs)
    return text


def training_summary(run_dir: str) -> dict:
    """One training stage's row: steps, last train and eval loss, median throughput, peak memory, class accuracy."""
    import statistics

    path = Path(run_dir) / "history.json"
    if not path.is_file():
        raise SystemExit(f"compare: training run '{run_dir}' has no history.json")
    history = json.loads(path.read_text())
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    median = lambda key: statistics.median(h[key] for h in steps if key in h) if steps else None  # noqa: E731
    row = {"stage": Path(run_dir).name, "steps": steps[-1]["step"] if steps else 0,
           "train_loss": steps[-1]["loss"] if steps else None, "eval_loss": evals[-1]["eval_loss"] if evals else None,
           "tokens_per_s": median("tokens_per_s"),
           "mfu_percent": 100 * median("mfu") if any("mfu" in h for h in steps) else None,
           "peak_mem_gib": max((h.get("peak_mem_gib", 0) for h in steps), default=None)}
    accuracy = Path(run_dir) / "classification.json"
    if accuracy.is_file():
        row["class_accuracy"] = json.loads(accuracy.read_text()).get("classify_accuracy")
    return row


def load_model(cfg: EvalConfig, device):
    """(model, processor, is_vlm) of `model`: a saved model directory, or a LoRA adapter merged onto its base (cut to
    `rank` first)."""
    from semivlm.model import adapter_base, merge_adapter

    if not (Path(cfg.model) / "adapter_config.json").is_file():
        if cfg.rank or cfg.base:
            raise SystemExit(f"rank/base need model to be a LoRA adapter directory (e.g. a run's output_dir/adapter); "
                             f"'{cfg.model}' has no adapter_config.json")
        return ev.load_model(cfg.model, getattr(torch, cfg.dtype), device=device)
    model, processor, is_vlm = ev.load_model(adapter_base(cfg.model, cfg.base), getattr(torch, cfg.dtype))
    return merge_adapter(model, cfg.model, cfg.rank).to(device), processor, is_vlm


def sweep_ranks(cfg: EvalConfig) -> dict:
    """One evaluation per rank of one adapter (output_dir/rank_<r>/) and a table with one row per rank."""
    from dataclasses import replace

    from semivlm.model import adapter_ranks, check_rank

    if not (Path(cfg.model) / "adapter_config.json").is_file():
        raise SystemExit(f"ranks need model to be a LoRA adapter directory; '{cfg.model}' has no adapter_config.json")
    rank_min, r = adapter_ranks(cfg.model)
    for rank in cfg.ranks:  # all refused before any is evaluated
        check_rank(rank, r, rank_min, "ranks: rank")
    out = Path(cfg.output_dir)
    rows = []
    for rank in cfg.ranks:
        result = main(replace(cfg, ranks=[], rank=rank, output_dir=str(out / f"rank_{rank}"),
                              name=f"{cfg.name or cfg.model} rank {rank}"))
        rows.append({"rank": rank, **result["headline"]})
    columns = ["rank"] + [k for k in HEADLINE if any(row.get(k) is not None for row in rows)]
    ev.save_json(out / "ranks.json", {"model": cfg.model, "r": r, "rank_min": rank_min, "rows": rows})
    text = (f"# `{cfg.model}` truncated to each rank\n\nadapter rank {r}, trained down to {rank_min}; each row merges "
            f"its leading components only (rank_<r>/ holds that evaluation)\n\n{metrics.markdown_table(rows, columns)}")
    (out / "report.md").write_text(text)
    print(text)
    return {"rows": rows}


def main(cfg: EvalConfig) -> dict:
    if not cfg.output_dir:
        raise SystemExit("output_dir is required")
    if cfg.compare:
        return compare(cfg)
    if cfg.ranks:
        return sweep_ranks(cfg)
    if not cfg.model:
        raise SystemExit("model is required (a saved model directory), or --compare DIRS")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- model and records, by task
    device = ev.pick_device(cfg.device)
    model, processor, is_vlm = load_model(cfg, device)
    records = ev.read_records(cfg.data, cfg.split)
    by_task: dict[str, list] = {}
    for r, root in records:
        task = record_task(r)
        if is_vlm or not r.get("images"):  # a text LLM cannot see: image records are not its to answer
            by_task.setdefault(task, []).append((r, root))
    limited = {t: rows[:cfg.limit] if cfg.limit else rows for t, rows in by_task.items()}
    print(f"{cfg.model} ({'VLM' if is_vlm else 'text LLM'}{', MoE' if ev.is_moe(model) else ''}) | {device} "
          f"{cfg.dtype}, batches of {cfg.batch_size} | split "
          f"{cfg.split or 'all'} | " + ", ".join(f"{t} {len(v)}" for t, v in limited.items()), flush=True)
    if not cfg.data and not cfg.corpus:
        raise SystemExit("nothing to evaluate: give data (JSONL record files) and/or corpus")
    if cfg.data and not limited:
        raise SystemExit(f"no records of split '{cfg.split}' in {cfg.data}")
    result: dict = {"name": cfg.name or cfg.model, "model": cfg.model, "config": asdict(cfg), "device": str(device),
                    "tasks": {}}
    predictions, headline = [], {}
    gen_time, gen_count = 0.0, 0

    def answers(task, max_new_tokens=cfg.max_new_tokens, label=""):
        nonlocal gen_time, gen_count
        t0 = time.perf_counter()
        preds = ev.generate(model, processor, is_vlm, limited[task], max_new_tokens, cfg.batch_size,
                            progress_printer(f"{task} answers"))
        elapsed = time.perf_counter() - t0
        gen_time, gen_count = gen_time + elapsed, gen_count + len(preds)
        print(f"  {task}: {len(preds)} answers in {elapsed:.1f}s = {len(preds) / max(elapsed, 1e-9):.2f} answers/s on "
              f"{device}", flush=True)
        refs = [ev.reference(r) for r, _ in limited[task]]
        predictions.extend({"id": r.get("id"), "task": label or task, "prediction": p, "reference": ref}
                           for (r, _), p, ref in zip(limited[task], preds, refs))
        return preds, refs

    with exit_on_bad_record():
        # ---- captions: the captioning metrics of the seed papers
        if "caption" in limited:
            preds, refs = answers("caption")
            m = metrics.caption_metrics(preds, refs, backend=cfg.metrics_backend)
            if cfg.bertscore_model:
                m.update(bertscore(preds, refs, cfg.bertscore_model))
            result["tasks"]["caption"] = m
            headline.update({k: m.get(k) for k in ("bleu4", "meteor", "rouge_l", "cider")})

        # ---- VQA: normalised exact match and token F1, per question type
        if "vqa" in limited:
            preds, refs = answers("vqa")
            types = [r.get("meta", {}).get("qtype", "other") for r, _ in limited["vqa"]]
            m = metrics.vqa_metrics(preds, refs, types)
            result["tasks"]["vqa"] = m
            headline.update(vqa_exact_match=m["overall"]["exact_match"], vqa_token_f1=m["overall"]["token_f1"])

        # ---- classification: likelihood of every class name as the answer
        if "classify" in limited:
            rows = limited["classify"]
            classes = cfg.classes or sorted({ev.reference(r) for r, _ in by_task["classify"]})
            refs = [ev.reference(r) for r, _ in rows]
            if unknown := sorted(set(refs) - set(classes)):
                raise SystemExit(f"classification records answer {unknown[:3]}, which are not among classes {classes}")
            scores = ev.option_scores(model, processor, is_vlm, rows, classes, cfg.max_length,
                                      progress_printer("class likelihoods"))
            m = metrics.classification_metrics(scores.numpy(), [classes.index(x) for x in refs], classes)
            m["plot"] = metrics.plot_confusion(m["confusion"], classes, out / "confusion.png")
            predictions.extend({"id": r.get("id"), "task": "classify", "prediction": classes[int(s.argmax())],
                                "reference": ref} for (r, _), s, ref in zip(rows, scores, refs))
            # the answer a user reads: generated, then matched to the reference (as train_moe.py's class accuracy)
            preds, _ = answers("classify", max_new_tokens=12, label="classify_generated")
            m["generated_accuracy"] = sum(map(ev.same_class_answer, preds, refs)) / len(refs)
            result["tasks"]["classify"] = m
            headline.update(class_accuracy=m["generated_accuracy"], top1=m["top1"], top5=m["top5"])

        # ---- perplexity: reference answers of the text instructions, and the corpus blocks
        if "instruction" in limited:
            m = ev.answer_perplexity(model, processor, is_vlm, limited["instruction"], cfg.max_length, cfg.batch_size)
            result["tasks"]["instruction"] = m
            headline["perplexity"] = m["perplexity"]
        # the reference answers of the image tasks, scored: what quantisation costs shows here first
        if is_vlm and (scored := [x for t in ("caption", "vqa") for x in limited.get(t, [])]):
            m = ev.answer_perplexity(model, processor, is_vlm, scored, cfg.max_length, cfg.batch_size)
            result["tasks"]["image_answers"] = m
            headline["answer_perplexity"] = m["perplexity"]
        if cfg.corpus:
            from datasets import load_from_disk

            try:
                blocks = load_from_disk(cfg.corpus)
            except (FileNotFoundError, ValueError) as e:
                raise SystemExit(f"corpus '{cfg.corpus}' is not a saved datasets directory: {e}") from None
            m = ev.block_perplexity(model, blocks, cfg.batch_size, cfg.limit)
            result["tasks"]["corpus"] = m
            headline["corpus_perplexity"] = m["perplexity"]

        # ---- MoE: routing on the held-out records, image vs text tokens
        if ev.is_moe(model) and is_vlm:
            held_out = [x for t in ("caption", "vqa", "classify") for x in limited.get(t, [])][:cfg.limit or None]
            if held_out:
                routing = ev.routing_on(model, processor, held_out, cfg.max_length, cfg.batch_size)
                ev.save_json(out / "routing_eval.json", routing)
                result["routing"] = {"held_out": "routing_eval.json",
                                     "plot": metrics.plot_routing(routing, out / "routing_eval.png")}
            trained = Path(cfg.model) / "routing.json"
            summary = json.loads(trained.read_text()) if trained.is_file() else {}
            if summary.get("layers"):  # the training-time shares of the last save interval
                result.setdefault("routing", {})["training_plot"] = metrics.plot_routing(summary, out / "routing_train.png")

    # ---- report
    headline["size_mb"] = ev.disk_size(cfg.model) / 2**20
    headline["answers_per_s"] = gen_count / gen_time if gen_time else None
    result["headline"] = headline
    ev.save_json(out / "metrics.json", result)
    with open(out / "predictions.jsonl", "w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    lines = [f"# Evaluation of `{cfg.model}`", "", f"split `{cfg.split or 'all'}`, records per task ≤ {cfg.limit or 'all'}", "",
             f"device `{device}` ({cfg.dtype}), generation in batches of {cfg.batch_size}: "
             f"{headline['answers_per_s'] or 0:.2f} answers/s", "",
             metrics.markdown_table([{"metric": k, "value": v} for k, v in headline.items()], ["metric", "value"])]
    if "caption" in result["tasks"]:
        lines += ["", f"Caption metrics backend: {result['tasks']['caption'].get('backend')}"]
    if "vqa" in result["tasks"]:
        by_type = result["tasks"]["vqa"]["by_type"]
        lines += ["", "## VQA by question type", "", metrics.markdown_table(
            [{"type": t, **v} for t, v in sorted(by_type.items())], ["type", "exact_match", "token_f1", "n"])]
    if "classify" in result["tasks"]:
        lines += ["", "## Classification", "", "![confusion](confusion.png)"]
    if "routing" in result:
        lines += ["", "## Expert routing (held-out records)", "", "![routing](routing_eval.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in headline.items()))
    print(f"wrote {out / 'report.md'}")
    return result


if __name__ == "__main__":
    main(load_config(EvalConfig))
