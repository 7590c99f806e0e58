"""evaluate.py on tiny models the tests build: every metric of a VLM run lands in metrics.json and report.md, the
likelihood classifier follows the model's preference, comparisons tabulate runs, and bad input stops with a clear
message. (export_gptq.py: tests/test_export_gptq.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION

from semivlm import evaluation as ev
from semivlm import vlm
from semivlm.chat import end_of_turn_ids


@pytest.fixture(scope="module")
def vlm_dir(llm_dir, tmp_path_factory) -> Path:
    model, processor = vlm.build_vlm(TINY_VISION["clip"], str(llm_dir))
    path = tmp_path_factory.mktemp("vlm") / "final"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def data_files(pipeline: Path) -> list[str]:
    return [str(pipeline / f"annotations/{n}.jsonl") for n in ("captions", "vqa", "classify")]


def test_vlm_evaluation_writes_every_metric_report_and_confusion_plot(vlm_dir, pipeline, tmp_path):
    from evaluate import EvalConfig, main

    out = tmp_path / "eval"
    result = main(EvalConfig(model=str(vlm_dir), data=data_files(pipeline), output_dir=str(out), split="",
                             max_new_tokens=8, metrics_backend="python"))
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("bleu4", "rouge_l", "cider", "vqa_exact_match", "vqa_token_f1", "top1", "top5", "size_mb",
                "class_accuracy", "answer_perplexity"):
        assert key in saved["headline"], key
    assert 0.0 <= saved["headline"]["top1"] <= saved["headline"]["top5"] <= 1.0
    cls = saved["tasks"]["classify"]
    assert sum(map(sum, cls["confusion"])) == cls["n"] == 4  # the 4 micrographs' classification records
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "vqa_exact_match" in report and "## VQA by question type" in report
    assert saved["device"] == "cpu" and saved["headline"]["answers_per_s"] > 0 and "answers/s" in report
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {x["task"] for x in lines} == {"caption", "vqa", "classify", "classify_generated"}
    generated = [x for x in lines if x["task"] == "classify_generated"]
    assert len(generated) == 4 and saved["headline"]["class_accuracy"] == pytest.approx(
        sum(ev.same_class_answer(x["prediction"], x["reference"]) for x in generated) / 4)
    # the caption and VQA reference answers scored: a random tiny model is far from certain of them
    assert saved["tasks"]["image_answers"]["tokens"] > 0 and saved["headline"]["answer_perplexity"] > 1.0


def test_generated_class_answer_matches_up_to_case_spacing_and_full_stop():
    assert ev.same_class_answer("  Porous   Sponge. ", "porous sponge")
    assert not ev.same_class_answer("porous sponges", "porous sponge")
    assert not ev.same_class_answer("a porous sponge", "porous sponge")


def test_classifier_picks_the_class_the_model_is_made_to_prefer(vlm_dir, pipeline):
    model, processor, is_vlm = ev.load_model(str(vlm_dir))
    rows = [r for r in ev.read_records(data_files(pipeline)) if r[0]["meta"]["task"] == "classify"][:2]
    classes = ["particles", "nanowires", "tips"]
    tok = processor.tokenizer
    preferred = tok("nanowires", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # lm_head rows of the preferred answer's tokens get a large bias: its likelihood must win
        bias = torch.zeros(model.lm_head.out_features)
        bias[preferred] = 20.0
        model.lm_head.bias = torch.nn.Parameter(bias)
    scores = ev.option_scores(model, processor, is_vlm, rows, classes)
    assert scores.shape == (2, 3)
    assert (scores.argmax(1) == 1).all(), scores


def test_comparison_puts_runs_side_by_side(tmp_path):
    from evaluate import EvalConfig, main

    for name, top1 in (("dense", 0.5), ("moe", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"name": name, "headline": {"top1": top1, "bleu4": 0.1}}))
        # four captions and a VQA answer each; caption c3 only the dense model answered
        rows = [{"id": f"c{i}", "task": "caption", "prediction": f"{name} caption {i}", "reference": f"ref caption {i}"}
                for i in range(4 if name == "dense" else 5) if not (name == "moe" and i == 3)]
        rows.append({"id": "q0", "task": "vqa", "prediction": f"{name} answer", "reference": "ref answer"})
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text").mkdir()  # a text-only LLM's evaluation: no caption or VQA answers to show
    (tmp_path / "text/metrics.json").write_text(json.dumps({"name": "sft", "headline": {"ppl": 9.0}}))
    (tmp_path / "text/predictions.jsonl").write_text(json.dumps({"id": "t0", "task": "instruction", "prediction": "a",
                                                                  "reference": "b"}) + "\n")
    main(EvalConfig(compare=[str(tmp_path / d) for d in ("text", "dense", "moe")], output_dir=str(tmp_path / "cmp")))
    table = (tmp_path / "cmp/report.md").read_text()
    assert "**sft**" not in table
    assert "| dense" in table and "| moe" in table and "0.75" in table and "top1" in table
    # three captions that both models answered, each model's answer under its reference, then the VQA answer
    captions = table.split("## Example captions")[1].split("## Example VQA answers")[0]
    assert [line for line in captions.splitlines() if "reference:" in line] == [
        f"`c{i}` reference: ref caption {i}" for i in (0, 1, 2)]
    assert "- **dense**: dense caption 2\n- **moe**: moe caption 2" in captions
    assert "`q0` reference: ref answer" in table and "- **moe**: moe answer" in table


def test_report_checks_each_goal_and_says_by_how_much_it_is_missed(tmp_path):
    from evaluate import EvalConfig, main

    for name, head in (("moe", {"class_accuracy": 0.5, "meteor": 0.4, "answer_perplexity": 10.0}),
                       ("gptq", {"class_accuracy": 0.49, "answer_perplexity": 13.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"name": name, "headline": head}))
    goals = {"moe.class_accuracy": ">= 0.92", "moe.meteor": ">= 0.35", "moe.bleu4": ">= 0.15",
             "gptq.class_accuracy": ">= moe - 0.02", "gptq.answer_perplexity": "<= moe * 1.25"}
    main(EvalConfig(compare=[str(tmp_path / "moe"), str(tmp_path / "gptq")], output_dir=str(tmp_path), goals=goals))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in (tmp_path / "report.md").read_text().split("## Goals")[1].splitlines() if line.count("|") > 4}
    assert rows["moe.class_accuracy >= 0.92"][2] == "no, by 0.42"
    assert rows["moe.meteor >= 0.35"][2] == "yes"
    assert rows["moe.bleu4 >= 0.15"][2] == "not measured"  # a metric the run lacks is never counted as met
    assert rows["gptq.class_accuracy >= moe - 0.02"][2] == "yes"  # 0.49 against 0.48
    assert rows["gptq.answer_perplexity <= moe * 1.25"][2] == "no, by 0.5"  # 13 against 12.5
    with pytest.raises(SystemExit, match="goals: 'moe.top1: > 1'"):
        main(EvalConfig(compare=[str(tmp_path / "moe")], output_dir=str(tmp_path), goals={"moe.top1": "> 1"}))


def test_vlm_directory_without_processor_is_a_clear_error(vlm_dir, tmp_path):
    broken = tmp_path / "noproc"
    shutil.copytree(vlm_dir, broken)
    for f in ("processor_config.json", "preprocessor_config.json"):
        (broken / f).unlink(missing_ok=True)
    with pytest.raises(SystemExit, match="without a processor"):
        ev.load_model(str(broken))


def test_batched_generation_gives_the_same_greedy_answers_as_one_by_one(vlm_dir, pipeline):
    # left padding must not change a greedy answer: batches are only a speed-up
    model, processor, is_vlm = ev.load_model(str(vlm_dir))
    rows = [r for r in ev.read_records(data_files(pipeline)) if r[0]["meta"]["task"] in ("caption", "vqa")][:6]
    prompts = {len(processor.apply_chat_template(ev._prompt_messages(r), tokenize=False)) for r, _ in rows}
    assert len(prompts) > 1  # prompts of different lengths, so the batch really is padded
    tok = processor.tokenizer
    with torch.no_grad():  # the random tiny model writes only newlines: special and blank tokens are barred
        bias = torch.zeros(model.lm_head.out_features)
        barred = set(tok.all_special_ids) | set(end_of_turn_ids(tok)) | {model.config.image_token_id}
        barred |= {i for i in range(len(bias)) if not tok.decode([i]).strip()}
        bias[sorted(i for i in barred if i < len(bias))] = -1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    side = tok.padding_side
    one_by_one = ev.generate(model, processor, is_vlm, rows, max_new_tokens=8, batch_size=1)
    batched = ev.generate(model, processor, is_vlm, rows, max_new_tokens=8, batch_size=4)
    assert batched == one_by_one and all(one_by_one)
    assert tok.padding_side == side  # generate() pads left and restores the tokenizer's own side


def test_evaluation_device_is_the_gpu_when_one_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ev.pick_device("auto") == torch.device("cuda", 0)
    assert ev.pick_device("cuda") == torch.device("cuda", 0)
    assert ev.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.pick_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match="no CUDA device"):
        ev.pick_device("cuda")


def test_loaded_model_sits_on_the_device_asked_for(vlm_dir):
    # "meta" stands in for a GPU on this CPU-only machine: what matters is that load_model moves the weights
    model, _, _ = ev.load_model(str(vlm_dir), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
