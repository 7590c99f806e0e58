"""train_moe.py end to end: each stage trains exactly what the stage table says, stage III under a real 2-process
ZeRO-3 job exports a plain HF MoE VLM with routing statistics, image DPO through the same objective, bad records."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, reset_accelerate, run_script
from safetensors.torch import load_file

from semivlm.config import load_config
from semivlm.data import read_jsonl, text_record, write_jsonl_atomic
from train_moe import MoEConfig, main

TINY_CLIP = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="module")
def vlm_inputs(tmp_path_factory) -> Path:
    """The data pipeline on 24 tiny micrographs (synth → annotate → image preference pairs), a few text
    instructions, and a tiny Llama with the debug ChatML tokenizer (what train_sft.py exports)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from data_prep.annotate import AnnotateConfig
    from data_prep.annotate import main as annotate
    from data_prep.build_corpus import train_tokenizer
    from data_prep.make_instructions import preference_pairs
    from data_prep.synth_micrographs import SynthConfig
    from data_prep.synth_micrographs import main as synth

    root = tmp_path_factory.mktemp("moe")
    synth(SynthConfig(out=str(root / "micrographs"), n=24, size=64, seed=0, val_fraction=0.2, test_fraction=0.0))
    annotate(AnnotateConfig(manifest=str(root / "micrographs/manifest.jsonl"), out=str(root / "annotations"),
                            vqa_per_image=2))
    ann = root / "annotations"
    texts = [text_record(f"t{i}", f"What does step {i} of CMP remove?", f"Step {i} removes the overburden.",
                         {"split": "train" if i < 12 else "validation", "task": "instruction"}) for i in range(16)]
    write_jsonl_atomic(ann / "instructions.jsonl", texts)
    write_jsonl_atomic(ann / "preferences.jsonl", [p for p in preference_pairs([], str(ann), ann, seed=0)
                                                   if p["images"]])
    words = [m["content"][-1]["text"] for name in ("captions", "vqa", "classify", "instructions")
             for r in read_jsonl(ann / f"{name}.jsonl") for m in r["messages"]]
    tok = train_tokenizer(words * 3, vocab_size=400)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root


def args_for(inputs: Path, out: Path, stage: str, init_from: Path, **overrides) -> list[str]:
    ann = inputs / "annotations"
    data = [str(ann / f"{n}.jsonl") for n in ("captions", "vqa", "classify", "instructions")]
    values = {"output_dir": out, "stage": stage, "init_from": init_from, "train_data": json.dumps(data),
              "max_length": 192, "micro_batch_size": 4, "max_steps": 4,
              "learning_rate": 5e-3, "projector_lr": 5e-3, "vision_lr": 5e-3, "warmup_steps": 1, "eval_every": 0,
              "eval_batches": 2, "save_every": 0, "classify_eval": 4, "classify_data": ann / "classify.jsonl",
              "ds_config": REPO / "ds_configs/zero3_fp32.json",
              **({"vision_config": json.dumps(TINY_CLIP)} if stage == "projector" else {}), **overrides}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def run_stage(args) -> dict:
    reset_accelerate()
    return main(load_config(MoEConfig, args))


def changed_parameters(before_dir: Path, after_dir: Path) -> tuple[set[str], set[str]]:
    """(names whose values changed, all names) between two saved models of the same architecture."""
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}, set(before)


@pytest.fixture(scope="module")
def three_stages(vlm_inputs, tmp_path_factory) -> dict:
    """The three stages in a row, one process, tiny steps: stage -> (result, output_dir)."""
    root, out = tmp_path_factory.mktemp("stages"), {}
    out["projector"] = (run_stage(args_for(vlm_inputs, root / "projector", "projector", vlm_inputs / "llm")),
                        root / "projector")
    out["llm"] = (run_stage(args_for(vlm_inputs, root / "llm", "llm", root / "projector/final",
                                     unfreeze_vision_tower="true")), root / "llm")
    out["moe"] = (run_stage(args_for(vlm_inputs, root / "moe", "moe", root / "llm/final")), root / "moe")
    return out


@pytest.mark.slow
def test_projector_stage_changes_the_projector_and_nothing_else(three_stages):
    result, out = three_stages["projector"]
    changed, names = changed_parameters(out / "start", out / "final")
    projector = {n for n in names if "multi_modal_projector" in n}
    assert changed == projector and len(projector) == 4  # two Linear layers, weight + bias
    assert (out / "classification.json").is_file() and result["classify_n"] == 4


@pytest.mark.slow
def test_llm_stage_changes_projector_and_llm_and_the_used_vision_layers_only(three_stages):
    _, out = three_stages["llm"]
    changed, names = changed_parameters(three_stages["projector"][1] / "final", out / "final")
    # CLIP's last layer and post_layernorm never reach the LLM (LLaVA reads the penultimate layer): untouched
    unused = {n for n in names if "vision_tower" in n and (".layers.1." in n or "post_layernorm" in n)}
    llm = {n for n in names if "language_model" in n or n.startswith("lm_head")}
    assert changed & unused == set()
    assert {n for n in names if "multi_modal_projector" in n} <= changed
    assert len(changed & llm) >= 0.9 * len(llm)  # every LLM matrix moves (norms may hold still for 4 steps)
    assert any("vision_tower" in n and ".layers.0." in n for n in changed)


@pytest.mark.slow
def test_moe_stage_trains_experts_and_routers_only_and_saves_routing(three_stages):
    _, out = three_stages["moe"]
    config = json.loads((out / "final/config.json").read_text())
    assert config["text_config"]["model_type"] == "mixtral" and config["text_config"]["num_local_experts"] == 4
    changed, names = changed_parameters(out / "start", out / "final")
    # transformers saves Mixtral in its original checkpoint layout (what vLLM reads): one w1/w2/w3 per expert
    sparse = {n for n in names if ".block_sparse_moe." in n}
    assert changed == sparse and len(sparse) == 2 * (1 + 4 * 3)  # 2 layers × (router + 4 experts × w1, w2, w3)
    routing = json.loads((out / "final/routing.json").read_text())
    assert routing["num_experts"] == 4 and routing["top_k"] == 2 and len(routing["layers"]) == 2
    for layer in routing["layers"]:
        assert sum(layer["all"]) == pytest.approx(1.0, abs=1e-4) and sum(layer["image"]) == pytest.approx(1.0, abs=1e-4)
        assert layer["tokens"]["image"] > 0 and layer["tokens"]["text"] > 0
    # the same shares are recorded at the export step, the path that sends them to the report_to trackers
    recorded = {k: v for h in three_stages["moe"][0]["history"] if h["step"] == 4 for k, v in h.items()
                if k.startswith("routing/")}
    assert recorded["routing/layer1/image/expert3"] == routing["layers"][1]["image"][3]
    assert len(recorded) == 2 * (2 * 4 + 1)  # 2 layers × (image, text × 4 experts + aux loss)
    steps = [h for h in three_stages["moe"][0]["history"] if "aux_loss" in h]
    assert steps and all(math.isfinite(h["aux_loss"]) and h["aux_loss"] >= 1.0 for h in steps)  # k·Σf·P ≥ 1


@pytest.mark.slow
def test_zero3_two_process_moe_stage_finishes_and_exports_a_plain_hf_moe_vlm(three_stages, vlm_inputs, tmp_path):
    out = tmp_path / "zero3_moe"
    launch = [str(REPO / ".venv/bin/accelerate"), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
              "train_moe.py"]
    # micro-batches of 2 from a mix with text-only records: ranks meet image and text batches in the same step
    args = args_for(vlm_inputs, out, "moe", three_stages["llm"][1] / "final", max_steps=8, micro_batch_size=2,
                    learning_rate=1e-2, eval_every=4, eval_batches=3, save_every=4, group_by_modality="false")
    result = run_script(launch + args, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"rank 1/2 holds [\d,]+ of [\d,]+ parameters \(ZeRO stage 3\)", result.stdout)
    assert "ZeRO-3 leaf modules ['MixtralSparseMoeBlock']" in result.stdout
    history = json.loads((out / "history.json").read_text())
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < evals[0], evals
    assert (out / "checkpoints/step_0000008/routing.json").is_file()
    # the export right after the last checkpoint keeps that interval's statistics (the probe was just reset)
    assert json.loads((out / "final/routing.json").read_text())["layers"]

    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(model) is LlavaForConditionalGeneration
    assert type(model.model.language_model).__name__ == "MixtralModel"
    processor = AutoProcessor.from_pretrained(out / "final")
    from semivlm.vlm import end_of_turn_ids, generate_answer, image_fill, load_image

    record = next(r for r in read_jsonl(vlm_inputs / "annotations/classify.jsonl"))
    answer = generate_answer(model, processor, record, vlm_inputs / "annotations", max_new_tokens=5)
    # the answer is the decoded new tokens of plain transformers generate() on the export, its image prompt included
    image = load_image(vlm_inputs / "annotations" / record["images"][0], record["id"], fill=image_fill(processor))
    enc = processor(text=processor.apply_chat_template(record["messages"][:-1], tokenize=False,
                                                      add_generation_prompt=True),
                    images=[image], return_tensors="pt", add_special_tokens=False)
    new = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=end_of_turn_ids(processor.tokenizer))[0, enc["input_ids"].shape[1]:]
    assert answer == processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_image_dpo_runs_through_the_sft_objective_against_the_llm_stage(three_stages, vlm_inputs, tmp_path):
    out = tmp_path / "dpo"
    result = run_stage(args_for(vlm_inputs, out, "llm", three_stages["llm"][1] / "final", objective="dpo",
                                train_data=json.dumps([str(vlm_inputs / "annotations/preferences.jsonl")]),
                                max_length=384, max_steps=12, learning_rate=1e-2, eval_batches=4, classify_eval=0))
    evals = [h for h in result["history"] if "eval_loss" in h]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-3)  # the policy is its own reference
    margins = [h["rewards_margin"] for h in result["history"] if "rewards_margin" in h]
    assert len(margins) == 12 and sum(margins[-4:]) / 4 > 0.01, margins  # chosen pulled above rejected
    assert (out / "dpo_reference_logps.json").is_file() and result["final_dir"]


@pytest.mark.slow  # a train_moe.py subprocess: ~12 s
def test_a_record_with_more_placeholders_than_images_stops_with_one_line_naming_it(vlm_inputs, tmp_path):
    rows = list(read_jsonl(vlm_inputs / "annotations/captions.jsonl"))
    bad = json.loads(json.dumps(rows[3]))
    bad["id"] = "two-placeholders-1"
    bad["messages"][0]["content"].insert(0, {"type": "image"})
    data = vlm_inputs / "annotations/bad_captions.jsonl"  # beside the images its paths point to
    write_jsonl_atomic(data, rows[:3] + [bad] + rows[4:])
    args = args_for(vlm_inputs, tmp_path / "out", "projector", vlm_inputs / "llm",
                    train_data=json.dumps([str(data)]))
    result = run_script([str(REPO / ".venv/bin/python"), "train_moe.py", *args], timeout=180)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "two-placeholders-1" in result.stderr and re.search(r"image", result.stderr), result.stderr[-1000:]
    skipped = run_stage(args + ["--skip_invalid", "true", "--max_steps", "1", "--classify_eval", "0"])
    assert skipped["final_dir"]


def test_task_repeats_weight_the_data_mix_and_unknown_tasks_are_an_error():
    from datasets import Dataset

    from semivlm.record_index import IndexedRecords, repeat_tasks
    from train_moe import STAGES

    examples = IndexedRecords(Dataset.from_list([{"id": "a", "task": "classify"}, {"id": "b", "task": "caption"}]))
    out = repeat_tasks(MoEConfig(task_repeats={"classify": 3}), examples, STAGES["llm"]["tasks"], lambda *_: None)
    assert [out[i]["id"] for i in range(len(out))] == ["a", "a", "a", "b"]
    assert repeat_tasks(MoEConfig(), examples, STAGES["llm"]["tasks"], print) is examples
    with pytest.raises(SystemExit, match="unknown task.*captions"):
        repeat_tasks(MoEConfig(task_repeats={"captions": 2}), examples, STAGES["llm"]["tasks"], print)


@pytest.mark.slow
def test_llm_stage_with_lora_trains_adapters_and_projector_and_exports_them_merged(three_stages, vlm_inputs, tmp_path):
    out = tmp_path / "llm_lora"
    result = run_stage(args_for(vlm_inputs, out, "llm", three_stages["projector"][1] / "final", lora_r=4,
                                lora_dropout=0.0))
    changed, names = changed_parameters(three_stages["projector"][1] / "final", out / "final")
    projections = {n for n in names if "language_model" in n and re.search(r"\.(q|k|v|o|gate|up|down)_proj\.", n)}
    projector = {n for n in names if "multi_modal_projector" in n}
    assert projector <= changed and projections <= changed  # LoRA merged into every LLM projection
    assert changed == projector | projections  # embeddings, norms, lm_head and the tower stay bit-equal
    adapter = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 4 and any("multi_modal_projector" in m for m in adapter["modules_to_save"])
    # LoRA's B starts at zero, so the step-0 held-out loss is the full llm stage's, computed on the same model
    full = run_stage(args_for(vlm_inputs, tmp_path / "llm_full", "llm", three_stages["projector"][1] / "final",
                              max_steps=1))
    assert result["history"][0]["eval_loss"] == pytest.approx(full["history"][0]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_moe_stage_with_expert_lora_trains_routers_and_merges_onto_unchanged_base_experts(three_stages, vlm_inputs,
                                                                                          tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "moe_lora"
    run_stage(args_for(vlm_inputs, out, "moe", three_stages["llm"][1] / "final", moe_lora_r=4, learning_rate=1e-2))
    changed, names = changed_parameters(out / "start", out / "final")
    routers = {n for n in names if n.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 2 and routers <= changed  # the routers learn (PEFT alone would have frozen them)
    assert changed <= {n for n in names if ".block_sparse_moe." in n}  # attention, embeddings, tower bit-equal
    # the export is the start model + the saved adapter (expert LoRA and the routers) merged: base experts untouched
    start = AutoModelForImageTextToText.from_pretrained(out / "start", dtype=torch.float32)
    merged = PeftModel.from_pretrained(start, out / "adapter").merge_and_unload().state_dict()
    final = AutoModelForImageTextToText.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    assert merged.keys() == final.keys()
    for k in final:  # one fp32 rounding of W + s·B·A either way
        torch.testing.assert_close(merged[k], final[k], rtol=1e-5, atol=1e-6)


def test_a_field_the_stage_does_not_read_is_an_error_naming_it_and_its_stages(vlm_inputs, tmp_path):
    with pytest.raises(SystemExit, match=r"--stage projector does not read moe_lora_r \(read by the moe stage\)"):
        run_stage(args_for(vlm_inputs, tmp_path / "p", "projector", vlm_inputs / "llm", moe_lora_r=4))
    with pytest.raises(SystemExit, match=r"lora_r \(read by the llm stage\)"):
        run_stage(args_for(vlm_inputs, tmp_path / "m", "moe", vlm_inputs / "llm", lora_r=4))
