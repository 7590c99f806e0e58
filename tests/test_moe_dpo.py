"""DPO on the MoE stage (train_moe.py --stage moe --objective dpo): an MoE VLM as init_from is trained as it is (not
upcycled again), the first held-out DPO loss is log 2 (the policy is its own reference), the reward margin of the
training pairs grows, the load-balancing loss still applies, a LoRA moe stage's adapter is continued from where it
left off, and the export is again a plain Mixtral VLM with routing statistics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fp32_sum_tol
from safetensors.torch import load_file
from test_train_moe import args_for, run_stage, vlm_inputs  # noqa: F401  (vlm_inputs: a module fixture, reused)

from semivlm import vlm
from semivlm.data import read_jsonl


def pairs_file(inputs: Path) -> str:
    return json.dumps([str(inputs / "annotations/preferences.jsonl")])


@pytest.fixture(scope="module")
def moe_runs(vlm_inputs, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A tiny VLM (projector stage), then two moe stages from it: full experts, and LoRA experts (r 4)."""
    root = tmp_path_factory.mktemp("moe_dpo")
    run_stage(args_for(vlm_inputs, root / "projector", "projector", vlm_inputs / "llm", max_steps=2, classify_eval=0))
    out = {}
    for name, extra in (("full", {}), ("lora", {"moe_lora_r": 4, "moe_lora_alpha": 8})):
        run_stage(args_for(vlm_inputs, root / name, "moe", root / "projector/final", max_steps=3, classify_eval=0,
                           **extra))
        out[name] = root / name
    return out


def dpo_args(inputs: Path, out: Path, init_from: Path, **overrides) -> list[str]:
    values = {"objective": "dpo", "train_data": pairs_file(inputs), "max_length": 384, "max_steps": 10,
              "learning_rate": 1e-2, "eval_batches": 4, "classify_eval": 0}
    return args_for(inputs, out, "moe", init_from, **{**values, **overrides})


def reference_vs_model(out: Path, model_dir: Path, inputs: Path) -> tuple[float, float]:
    """(largest |cached reference log-prob − log-prob under `model_dir`| over the run's pairs, the tolerance for it).
    The reference pass ran on the run's policy at step 0; here the same pairs go through `model_dir` one pair at a
    time, so the two differ only by fp32 summation order (padding width, GEMM blocking)."""
    from semivlm.dpo import pair_logps

    cache = json.loads((out / "dpo_reference_logps.json").read_text())
    model, processor = vlm.load_vlm(model_dir)
    records = {r["id"]: r for r in read_jsonl(inputs / "annotations/preferences.jsonl")}
    chosen = [records[i] for i in cache["ids"][:6]]
    rows, _ = vlm.encode_vlm_pairs(processor, chosen, inputs / "annotations", 384, where="preferences.jsonl")
    pad = processor.tokenizer.pad_token_id
    mine = pair_logps(model, rows, lambda r: vlm.collate_vlm_pairs(r, pad), 1)
    diffs = [abs(a - b) for ref, now in zip(cache["logps"][:6], mine) for a, b in zip(ref, now)]
    # a sequence log-prob is a sum of ≤ 384 token log-probs, all negative (Σ|x| = |sum|), in fp32; the logits under
    # them come from reductions over 64 hidden units, whose reordering moves them far less than that sum's bound.
    # Another start (routers drawn afresh, an adapter not loaded) moves these log-probs by far more.
    magnitude = max(abs(x) for pair in cache["logps"][:6] for x in pair)
    return max(diffs), fp32_sum_tol(384, magnitude)


@pytest.mark.slow  # the tests with moe_runs train tiny stages through train_moe.py: tens of seconds each
def test_dpo_on_an_moe_model_trains_it_as_it_is_and_pulls_chosen_above_rejected(moe_runs, vlm_inputs, tmp_path):  # noqa: F811
    init, out = moe_runs["full"] / "final", tmp_path / "dpo"
    result = run_stage(dpo_args(vlm_inputs, out, init))
    assert not (out / "start").exists()  # not upcycled again: init_from is the model
    config = json.loads((out / "final/config.json").read_text())["text_config"]
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    # the policy at step 0 is init_from with its trained routers, not a fresh upcycling (whose routers are N(0, 0.01))
    diff, tol = reference_vs_model(out, init, vlm_inputs)
    assert diff <= tol, (diff, tol)

    evals = [h for h in result["history"] if "eval_lm_loss" in h]
    # held-out DPO metrics against the reference; eval_loss adds the load-balancing term, lm_loss is the DPO loss
    first = evals[0]
    n_pairs = first["eval_tokens"]
    # per pair log σ(β·margin) moves by ≤ β/2 · |margin change| ≤ β · tol (β = 0.1) when policy and reference differ
    # by summation order only; the mean over pairs adds its own fp32 summation bound
    assert first["eval_lm_loss"] == pytest.approx(math.log(2), abs=fp32_sum_tol(n_pairs, math.log(2)) + 0.1 * tol)
    assert abs(first["eval_rewards_margin"]) <= 0.2 * tol and "eval_reward_accuracy" in evals[-1]
    steps = [h for h in result["history"] if "rewards_margin" in h]
    assert len(steps) == 10
    assert all(h["aux_loss"] >= 1.0 for h in steps)  # k·Σf·P ≥ 1: the load-balancing loss is in the objective
    assert sum(h["rewards_margin"] for h in steps[-3:]) / 3 > 0.01, [h["rewards_margin"] for h in steps]
    assert sum(h["lm_loss"] for h in steps[-3:]) / 3 < math.log(2)

    # the export: plain Mixtral weights (experts and routers changed, nothing of PEFT), routing statistics beside them
    before, after = load_file(init / "model.safetensors"), load_file(out / "final/model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".block_sparse_moe." in k for k in changed)
    assert any(k.endswith("block_sparse_moe.gate.weight") for k in changed)
    routing = json.loads((out / "final/routing.json").read_text())
    assert routing["num_experts"] == 4 and len(routing["layers"]) == 2 and routing["layers"][0]["tokens"]["image"] > 0


@pytest.mark.slow
def test_dpo_continues_a_lora_moe_stage_from_its_adapter_and_exports_plain_mixtral(moe_runs, vlm_inputs, tmp_path):  # noqa: F811
    lora, out = moe_runs["lora"], tmp_path / "dpo_lora"
    result = run_stage(dpo_args(vlm_inputs, out, lora / "final", moe_lora_r=4, moe_lora_alpha=8, max_steps=6))
    # the policy at step 0 is the adapter on its base: what the moe stage exported merged
    diff, tol = reference_vs_model(out, lora / "final", vlm_inputs)
    assert diff <= tol, (diff, tol)
    evals = [h for h in result["history"] if "eval_lm_loss" in h]
    n_pairs = evals[0]["eval_tokens"]
    assert evals[0]["eval_lm_loss"] == pytest.approx(math.log(2), abs=fp32_sum_tol(n_pairs, math.log(2)) + 0.1 * tol)
    # the adapter went on training: its LoRA tensors moved away from the moe stage's
    before = load_file(lora / "adapter/adapter_model.safetensors")
    after = load_file(out / "adapter/adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any("lora_" in k and not torch.equal(before[k], after[k]) for k in before)

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(model.model.language_model).__name__ == "MixtralModel"
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    assert (out / "final/routing.json").is_file()


@pytest.mark.slow
def test_an_moe_init_from_with_other_expert_settings_stops_with_one_line(moe_runs, vlm_inputs, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match=r"is an MoE VLM already \(4 experts, top-2, sparse layers \[0, 1\]\).*"
                                         r"num_experts 8"):
        run_stage(dpo_args(vlm_inputs, tmp_path / "bad", moe_runs["full"] / "final", num_experts=8))


def test_record_fraction_keeps_the_same_seeded_share_of_pairs_whatever_the_file_order(tmp_path):
    from semivlm.data import write_jsonl_atomic
    from semivlm.record_index import iter_records
    from train_moe import MoEConfig

    pairs = [{"id": f"p{i}", "images": [], "prompt": "q", "chosen": "a", "rejected": "b", "meta": {"split": "train"}}
             for i in range(2000)]
    write_jsonl_atomic(tmp_path / "a.jsonl", pairs)
    write_jsonl_atomic(tmp_path / "b.jsonl", pairs[::-1])
    cfg = MoEConfig(objective="dpo", record_fraction=0.1, seed=3)
    kept = [{r["id"] for r, _ in iter_records(cfg, [str(tmp_path / f)], "train", ())} for f in ("a.jsonl", "b.jsonl")]
    assert kept[0] == kept[1] and 150 < len(kept[0]) < 250  # 10 % of 2,000 ± 3.5 σ (σ = √(2000·0.1·0.9) ≈ 13)
    other_seed = {r["id"] for r, _ in iter_records(MoEConfig(objective="dpo", record_fraction=0.1, seed=4),
                                                   [str(tmp_path / "a.jsonl")], "train", ())}
    assert other_seed != kept[0]
    assert len(list(iter_records(MoEConfig(objective="dpo"), [str(tmp_path / "a.jsonl")], "train", ()))) == 2000
