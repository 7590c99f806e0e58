"""train_sft.py end to end: LoRA under 2-process ZeRO-3, QLoRA on CPU, merges, DPO, bad records."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from conftest import REPO, fp32_sum_tol, reset_accelerate, run_script

from semivlm.config import load_config
from semivlm.data import read_jsonl, write_jsonl_atomic
from train_sft import SFTConfig, main


@pytest.fixture(scope="session")
def sft_inputs(tmp_path_factory):
    """The debug chain in miniature: built-in corpus → ChatML tokenizer + instructions + text preference pairs, and
    a tiny random Llama saved with that tokenizer (what train_pretrain.py would have exported)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from data_prep.build_corpus import CorpusConfig
    from data_prep.build_corpus import main as build_corpus
    from data_prep.make_instructions import InstructionsConfig
    from data_prep.make_instructions import main as make_instructions

    root = tmp_path_factory.mktemp("sft")
    build_corpus(CorpusConfig(out=str(root / "corpus"), vocab_size=2048, block_size=256))  # the debug recipe's corpus.yaml
    make_instructions(InstructionsConfig(documents=str(root / "corpus/documents.jsonl"), out=str(root / "instr")))
    tok = AutoTokenizer.from_pretrained(root / "corpus/tokenizer")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


def args_for(inputs, out, **overrides) -> list[str]:
    values = {"output_dir": out, "init_from": inputs / "base", "train_data": inputs / "instr/instructions.jsonl",
              "max_length": 512, "micro_batch_size": 2, "grad_accum": 1, "max_steps": 6, "learning_rate": 2e-3,
              "warmup_steps": 1, "eval_every": 0, "eval_batches": 4, "save_every": 0,
              "ds_config": REPO / "ds_configs/zero3_fp32.json", **overrides}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def run_in_process(args):
    reset_accelerate()
    return main(load_config(SFTConfig, args))


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_merged_equals_adapter_on_base(out, base_dir):
    """output_dir/final (merged, plain transformers) gives the logits of base + output_dir/adapter (PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert not (out / "final/adapter_config.json").exists()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(merged, ids), logits_of(with_adapter, ids), rtol=1e-4, atol=1e-4)
    lora_b = [p for n, p in with_adapter.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "the adapter never moved from its zero initialisation"


@pytest.mark.slow
def test_zero3_two_process_lora_sft_learns_and_exports_a_merged_model(sft_inputs, tmp_path):
    out = tmp_path / "zero3"
    launch = [str(REPO / ".venv/bin/accelerate"), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
              "train_sft.py"]
    result = run_script(launch + args_for(sft_inputs, out, lora_r=8, lora_alpha=16, max_steps=8,
                                          learning_rate=1e-2), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"rank 1/2 holds [\d,]+ of [\d,]+ parameters \(ZeRO stage 3\)", result.stdout)
    assert re.search(r"packed rows of 512 \((9[5-9]|100)\.\d% tokens", result.stdout), result.stdout[:2000]
    history = json.loads((out / "history.json").read_text())
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < evals[0] - 0.05, evals
    assert_merged_equals_adapter_on_base(out, sft_inputs / "base")


@pytest.mark.slow
def test_full_sft_with_length_grouping_lowers_heldout_loss(sft_inputs, tmp_path):
    result = run_in_process(args_for(sft_inputs, tmp_path / "full", packing=False, max_steps=12, micro_batch_size=4))
    evals = [h["eval_loss"] for h in result["history"] if "eval_loss" in h]
    assert evals[-1] < evals[0] - 0.3, evals


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_merges_onto_the_unquantised_base(sft_inputs, tmp_path):
    out = tmp_path / "qlora"
    result = run_in_process(args_for(sft_inputs, out, quantization="nf4", lora_r=8, lora_alpha=16, max_steps=4,
                                     learning_rate=1e-2))
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert len(losses) == 4 and all(l == l and l < 20 for l in losses)  # finite
    assert_merged_equals_adapter_on_base(out, sft_inputs / "base")


@pytest.mark.slow
def test_dpo_caches_reference_logprobs_and_a_resumed_run_reuses_them(sft_inputs, tmp_path):
    out = tmp_path / "dpo"
    common = dict(objective="dpo", train_data=sft_inputs / "instr/preferences.jsonl", learning_rate=1e-2,
                  max_steps=16, micro_batch_size=4, eval_batches=6)
    stopped = run_in_process(args_for(sft_inputs, out, exit_after_steps=4, **common))
    assert stopped["stopped_early"]
    cache = out / "dpo_reference_logps.json"
    first = json.loads(cache.read_text())
    assert len(first["ids"]) == len(first["logps"]) > 0
    from semivlm import dpo

    calls = []
    original = dpo.precompute_reference_logps
    dpo.precompute_reference_logps = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        resumed = run_in_process(args_for(sft_inputs, out, **common))
    finally:
        dpo.precompute_reference_logps = original
    assert calls == [] and json.loads(cache.read_text()) == first  # the SFT model's numbers, not the resumed model's
    assert resumed["final_dir"]
    evals = [h for h in stopped["history"] + resumed["history"] if "eval_loss" in h]
    # step 0: policy == reference, so margin 0 and loss -log σ(0) = log 2, up to fp32 rounding: the cached reference
    # pass batched the held-out pairs with other partners (other padding width, other GEMM blocking) than the eval.
    # Each log-prob is a sum of <= max_length (512) token log-probs with Σ|x| = |logp|, so a pair's reward difference
    # β((π_c - r_c) - (π_r - r_r)) is within β·fp32_sum_tol(512, |r_c| + |r_r|), and the margin (mean over the pairs)
    # within the mean of that; |d(-log σ(z))/dz| <= 1 bounds the loss. The cache holds the train pairs, then the
    # held-out ones, which the eval counts in eval_tokens (one per pair for DPO).
    heldout = first["logps"][-evals[0]["eval_tokens"]:]
    tol = SFTConfig().beta * sum(fp32_sum_tol(512, abs(c) + abs(r)) for c, r in heldout) / len(heldout)
    assert tol < 0.02  # below the trained margin checked below, so a reference of another model would still show
    assert evals[0]["eval_rewards_margin"] == pytest.approx(0.0, abs=tol)
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=tol)
    assert evals[-1]["eval_rewards_margin"] > 0.05 and evals[-1]["eval_loss"] < 0.69  # held-out pairs


@pytest.mark.parametrize("broken, message", [
    ({"messages": [{"role": "user", "content": "What is CMP?"}]}, "no assistant"),
    # a train_sft.py subprocess each (~7 s): the fast suite keeps the first
    pytest.param({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}, "empty",
                 marks=pytest.mark.slow),
    pytest.param({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}, "order",
                 marks=pytest.mark.slow),
])
def test_bad_records_stop_the_run_with_one_line_naming_the_record(sft_inputs, tmp_path, broken, message):
    rows = list(read_jsonl(sft_inputs / "instr/instructions.jsonl"))[:20]
    rows.insert(5, {"id": "broken-record-7", "meta": {"split": "train"}, **broken})
    data = tmp_path / "bad.jsonl"
    write_jsonl_atomic(data, rows)
    result = run_script([str(REPO / ".venv/bin/python"), "train_sft.py",
                         *args_for(sft_inputs, tmp_path / "out", train_data=data)], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "broken-record-7" in result.stderr and re.search(message, result.stderr, re.I), result.stderr[-1000:]
    # asked to skip, the same file trains and the bad record is counted
    skipped = run_in_process(args_for(sft_inputs, tmp_path / "skip", train_data=data, skip_invalid=True, max_steps=1))
    assert skipped["final_dir"]


def test_a_line_that_is_not_json_is_named_by_file_and_line(sft_inputs, tmp_path):
    data = tmp_path / "bad.jsonl"
    shutil.copy(sft_inputs / "instr/instructions.jsonl", data)
    with data.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:\d+: not a JSON object"):
        run_in_process(args_for(sft_inputs, tmp_path / "out", train_data=data))
