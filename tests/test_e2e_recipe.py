"""The debug recipe end to end on CPU through launch/recipe.sh (fewer images and steps than `make demo`): every stage
runs for real, every stage's output loads with plain transformers, and the report carries every metric."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_script

pytestmark = pytest.mark.slow  # minutes: every stage of the recipe trains for real

STEPS = {"pretrain": 30, "sft": 20, "dpo": 4, "vision": 20, "projector": 10, "llm": 20, "moe": 10, "moe_dpo": 4}


def shrunk_debug_config(dst: Path) -> Path:
    """launch/configs/debug with 100 micrographs, a few steps per stage and small evaluations."""
    shutil.copytree(REPO / "launch/configs/debug", dst)
    for name, steps in STEPS.items():
        cfg = yaml.safe_load((dst / f"{name}.yaml").read_text())
        cfg.update(max_steps=steps, eval_every=steps, save_every=steps, warmup_steps=2, log_every=5)
        if "classify_eval" in cfg:
            cfg["classify_eval"] = 10
        (dst / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    edits = {"micrographs": {"n": 100}, "evaluate": {"limit": 10, "max_new_tokens": 16},
             "gptq": {"num_calibration_samples": 16, "eval_limit": 10}}
    for name, changes in edits.items():
        cfg = yaml.safe_load((dst / f"{name}.yaml").read_text())
        cfg.update(changes)
        (dst / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_debug_recipe_runs_every_stage_outputs_load_and_report_has_every_metric(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, CLIPModel

    cfg, run = shrunk_debug_config(tmp_path / "cfg"), tmp_path / "run"
    p = run_script(["bash", "launch/recipe.sh", str(cfg), str(run)], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[recipe 19/19 report] done" in p.stdout

    for stage in ("pretrain", "sft", "dpo"):
        assert AutoModelForCausalLM.from_pretrained(run / stage / "final").config.model_type == "llama"
    assert CLIPModel.from_pretrained(run / "vision/final").config.vision_config.image_size == 64
    for stage in ("projector/final", "llm/final", "moe/final", "moe_dpo/final", "gptq"):
        model = AutoModelForImageTextToText.from_pretrained(run / stage)
        assert model.config.model_type == "llava", stage
    assert json.loads((run / "gptq/config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"

    report = (run / "report.md").read_text()
    for metric in ("perplexity", "corpus_perplexity", "bleu4", "meteor", "rouge_l", "cider", "vqa_exact_match",
                   "vqa_token_f1", "top1", "top5", "size_mb", "tokens_per_s", "class_accuracy"):
        assert f" {metric} |" in report, metric
    for run_name in ("| dpo |", "| llm |", "| moe |", "| moe_dpo |", "| gptq |", "| vision |", "| projector |"):
        assert run_name in report, run_name
    comparison = json.loads((run / "comparison.json").read_text())
    moe = next(r for r in comparison["evaluations"] if r["run"] == "moe")
    assert 0 <= moe["top1"] <= moe["top5"] <= 1 and moe["bleu4"] is not None

    again = run_script(["bash", "launch/recipe.sh", str(cfg), str(run)], timeout=120)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 19, again.stdout[-2000:]
