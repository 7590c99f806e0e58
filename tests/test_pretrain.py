"""train_pretrain.py and the shared loop: ZeRO-3 sharding, resume exactness, atomic checkpoints, exports."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import EPS32, REPO, fp32_sum_tol, reset_accelerate, run_script

from semivlm.config import load_config
from train_pretrain import PretrainConfig, main


def run_in_process(args: list[str]) -> dict:
    reset_accelerate()
    return main(load_config(PretrainConfig, args))


def losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def heldout_loss(model_dir, blocks_dir) -> float:
    """Token-mean loss of a saved model on saved blocks, computed independently of the loop."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(load_from_disk(str(blocks_dir))["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.slow
def test_zero3_two_process_run_shards_weights_resumes_exactly_and_exports(pretrain_args, tmp_path, tiny_blocks,
                                                                         tiny_model_dir):
    launch = [str(REPO / ".venv/bin/accelerate"), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
              "train_pretrain.py"]
    # from_pretrained of a local directory, loaded straight into ZeRO-3 partitions
    common = {"max_steps": 6, "save_every": 6, "eval_every": 0, "eval_batches": 8, "init_from": tiny_model_dir,
              "model_config": "{}"}
    straight = run_script(launch + pretrain_args(tmp_path / "straight", **common), timeout=300)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    # each rank stores only its half of the parameters
    held = re.findall(r"rank (\d)/2 holds ([\d,]+) of ([\d,]+) parameters \(ZeRO stage 3\)", straight.stdout)
    assert sorted(r for r, _, _ in held) == ["0", "1"], straight.stdout[-2000:]
    shard = [int(h.replace(",", "")) for _, h, _ in held]
    total = int(held[0][2].replace(",", ""))
    assert sum(shard) == total and max(shard) <= 0.55 * total

    history = json.loads((tmp_path / "straight/history.json").read_text())
    train = losses(history)
    assert train[6] < train[1] - 0.3, train
    final_eval = [h["eval_loss"] for h in history if "eval_loss" in h][-1]

    # the export reloads with plain transformers and equals the weights consolidated from the ZeRO-3 shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "straight/final").state_dict()
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "straight/checkpoints/step_0000006"))
    assert set(consolidated) <= set(exported) and len(consolidated) >= len(exported) - 1
    for name, weight in consolidated.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=0, msg=name)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert not torch.equal(initial["model.norm.weight"], exported["model.norm.weight"])
    initial_eval = [h["eval_loss"] for h in history if "eval_loss" in h][0]
    assert heldout_loss(tiny_model_dir, tiny_blocks / "validation") == pytest.approx(initial_eval, abs=1e-4)
    assert heldout_loss(tmp_path / "straight/final", tiny_blocks / "validation") == pytest.approx(final_eval, abs=1e-4)

    # stopped after step 3 and resumed under ZeRO-3: the remaining steps repeat the uninterrupted run
    first = run_script(launch + pretrain_args(tmp_path / "resumed", **common, exit_after_steps=3), timeout=300)
    assert first.returncode == 0 and "stop requested" in first.stdout, first.stderr[-3000:]
    assert not (tmp_path / "resumed/final").exists()
    second = run_script(launch + pretrain_args(tmp_path / "resumed", **common), timeout=300)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    resumed = losses(json.loads((tmp_path / "resumed/history.json").read_text()))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(train[step], abs=1e-5), (step, resumed, train)


def test_resume_after_stop_gives_the_same_losses_as_an_uninterrupted_run(pretrain_args, tmp_path):
    straight = run_in_process(pretrain_args(tmp_path / "a"))
    stopped = run_in_process(pretrain_args(tmp_path / "b", exit_after_steps=3))
    assert stopped["stopped_early"] and stopped["final_dir"] is None
    resumed = run_in_process(pretrain_args(tmp_path / "b"))
    a, b = losses(straight["history"]), losses(resumed["history"])
    assert sorted(b) == list(range(1, 9))
    for step in range(4, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


class SimulatedKill(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the loop can catch and tidy up after it."""


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(pretrain_args, tmp_path,
                                                                                        monkeypatch):
    from accelerate import Accelerator

    reference = losses(run_in_process(pretrain_args(tmp_path / "ref", save_every=3))["history"])

    original, calls = Accelerator.save_state, []

    def save_then_die(self, output_dir=None, **kw):
        calls.append(output_dir)
        result = original(self, output_dir, **kw)
        if len(calls) == 2:  # the step-6 checkpoint: weights on disk, trainer state not yet written
            raise SimulatedKill()
        return result

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    with pytest.raises(SimulatedKill):
        run_in_process(pretrain_args(tmp_path / "run", save_every=3))
    monkeypatch.setattr(Accelerator, "save_state", original)
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "step_0000003/trainer_state.json").is_file()
    assert (ckpts / ".tmp-step_0000006").is_dir() and not (ckpts / "step_0000006").exists()

    reset_accelerate()
    resumed = run_in_process(pretrain_args(tmp_path / "run", save_every=3))
    assert not (ckpts / ".tmp-step_0000006").exists()
    after = losses(resumed["history"])
    for step in range(4, 9):
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step


def test_gradient_is_a_token_mean_whatever_the_accumulation_split(tiny_blocks, tmp_path):
    """With unequal numbers of supervised tokens per sequence, 1×8 and 2 accumulated ×4 give the gradient of the
    token-mean loss over all 8 sequences (a mean of per-micro-batch means would not)."""
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_LLAMA
    from semivlm.loop import TrainConfig, make_accelerator, train
    from train_pretrain import collate_blocks

    def collate_with_prompt_masks(rows):
        batch = collate_blocks(rows)
        for i, ids in enumerate(batch["input_ids"]):
            batch["labels"][i, : int(ids[0]) * 7 % 60] = -100  # masked prefix length depends on the sample only
        return batch

    data = load_from_disk(str(tiny_blocks / "train")).with_format("torch")
    spec = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=400, **spec)

    def grad_norm_of_first_step(micro, accum):
        reset_accelerate()
        cfg = TrainConfig(output_dir=str(tmp_path / f"{micro}x{accum}"), max_steps=1, micro_batch_size=micro,
                          grad_accum=accum, eval_every=0, save_every=0,
                          ds_config=str(REPO / "ds_configs/zero3_fp32.json"))
        accelerator = make_accelerator(cfg)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        result = train(cfg, accelerator, model, None, data, None, collate_with_prompt_masks)
        return result["history"][-1]["grad_norm"], result["history"][-1]["loss"]

    norm_1x8, loss_1x8 = grad_norm_of_first_step(8, 1)
    norm_4x2, loss_4x2 = grad_norm_of_first_step(4, 2)

    # independent reference: the same 8 sequences in one batch, mean cross-entropy over supervised tokens
    from semivlm.loop import StepBatches

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    cfg = TrainConfig(micro_batch_size=8, grad_accum=1)
    batch = StepBatches(data, collate_with_prompt_masks, cfg, world=1, rank=0)(0)[0]
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    reference = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    # the three sum the same per-token terms in other orders (and batch shapes): a token-mean of n_tok cross-entropies,
    # each a logsumexp over the vocabulary, and every gradient entry a sum over the step's n_tok tokens
    n_tok = int((batch["labels"][:, 1:] != -100).sum())
    loss_tol = fp32_sum_tol(n_tok + config.vocab_size, loss.item())
    assert loss_1x8 == pytest.approx(loss.item(), abs=loss_tol) and loss_4x2 == pytest.approx(loss.item(), abs=loss_tol)
    assert norm_1x8 == pytest.approx(reference, rel=n_tok * EPS32)
    assert norm_4x2 == pytest.approx(reference, rel=n_tok * EPS32)


def test_lora_run_exports_a_merged_model_that_plain_transformers_loads_and_logs_tensorboard(pretrain_args, tmp_path, tiny_blocks):
    result = run_in_process(pretrain_args(tmp_path / "lora", lora_r=4, lora_alpha=8, learning_rate=1e-2,
                                          eval_batches=8, report_to="tensorboard"))
    # accelerate's TensorBoard tracker writes under output_dir/tensorboard/<project>/ (contents: test_trackers.py)
    assert list((tmp_path / "lora/tensorboard").glob("semivlm/events.out.tfevents.*"))
    final = tmp_path / "lora/final"
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").is_file()
    history = result["history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert evals[-1] < evals[0]
    # the merged weights reproduce the adapter model's held-out loss, so the merge lost nothing
    assert heldout_loss(final, tiny_blocks / "validation") == pytest.approx(evals[-1], abs=1e-4)


@pytest.mark.parametrize("override, message", [
    ({"train_data": "/nonexistent/train"}, "train_data '/nonexistent/train' does not exist"),
    ({"tokenizer": "/nonexistent/tok"}, "tokenizer directory '/nonexistent/tok' does not exist"),
    ({"ds_config": "/nonexistent/ds.json"}, "ds_config '/nonexistent/ds.json' does not exist"),
    ({"init_from": "/nonexistent/model"}, "init_from directory '/nonexistent/model' does not exist"),
    ({"model_config": "{hidden_size: 64}"}, "model_config needs a `model_type`"),
])
def test_bad_paths_and_settings_stop_with_a_message_naming_them(pretrain_args, tmp_path, override, message):
    with pytest.raises(SystemExit, match=message):
        run_in_process(pretrain_args(tmp_path / "bad", **override))


def test_blocks_from_another_tokenizer_are_refused(pretrain_args, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[5, 9000, 7, 1]] * 4}).save_to_disk(tmp_path / "foreign")
    with pytest.raises(SystemExit, match="holds token id 9000 but the model's vocabulary has"):
        run_in_process(pretrain_args(tmp_path / "bad", train_data=tmp_path / "foreign"))


def test_corrupt_checkpoint_is_named_instead_of_resumed(pretrain_args, tmp_path):
    run_in_process(pretrain_args(tmp_path / "run", exit_after_steps=2))
    state = next((tmp_path / "run/checkpoints").glob("step_*")) / "trainer_state.json"
    state.write_text("{truncated")
    with pytest.raises(SystemExit, match=r"checkpoint '.*step_0000002' is corrupt"):
        run_in_process(pretrain_args(tmp_path / "run"))


def test_command_line_errors_print_one_line_not_a_traceback(tmp_path):
    result = run_script([str(REPO / ".venv/bin/python"), "train_pretrain.py", "--max_stepz", "3"], timeout=120)
    assert result.returncode != 0
    assert "unknown key 'max_stepz'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # three training subprocesses: ~11 s
def test_sigusr1_or_stop_file_checkpoints_and_exits_and_the_rerun_finishes(pretrain_args, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "preempted"
    args = [sys.executable, "train_pretrain.py", *pretrain_args(out, max_steps=400, micro_batch_size=2, grad_accum=1)]

    def run_until_step(n, interrupt):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {n}/"):
                interrupt(proc)
        assert proc.wait(timeout=120) == 0, "".join(lines[-30:])
        return "".join(lines)

    log = run_until_step(3, lambda p: p.send_signal(signal.SIGUSR1))
    assert "stop requested" in log and not (out / "final").exists()
    first = int(next((out / "checkpoints").glob("step_*")).name.split("_")[1])
    assert first >= 3

    log = run_until_step(first + 2, lambda p: (out / "STOP").touch())
    assert f"resumed from" in log and "stop requested" in log
    second = max(int(d.name.split("_")[1]) for d in (out / "checkpoints").glob("step_*"))
    assert second > first and not (out / "final").exists()


@pytest.mark.slow
def test_debug_recipe_pretraining_lowers_heldout_perplexity_well_below_the_initial_model(tmp_path):
    """The real debug configs on the built-in corpus, shortened: the corpus builder, then train_pretrain.py."""
    from data_prep.build_corpus import CorpusConfig
    from data_prep.build_corpus import main as build_corpus

    corpus = tmp_path / "corpus"
    build_corpus(load_config(CorpusConfig, ["--config", str(REPO / "launch/configs/debug/corpus.yaml"),
                                            "--out", str(corpus)]))
    result = run_in_process(["--config", str(REPO / "launch/configs/debug/pretrain.yaml"),
                             "--output_dir", str(tmp_path / "pretrain"), "--tokenizer", str(corpus / "tokenizer"),
                             "--train_data", str(corpus / "train"), "--eval_data", str(corpus / "validation"),
                             "--max_steps", "60", "--eval_every", "0", "--save_every", "0",
                             "--ds_config", str(REPO / "ds_configs/zero3_fp32.json")])
    ppl = [h["eval_ppl"] for h in result["history"] if "eval_ppl" in h]
    assert ppl[0] > 1000  # a random model is about as unsure as the 2048-token vocabulary
    assert ppl[-1] < ppl[0] / 3, ppl


def test_fast_paths_are_used_when_present_and_refused_clearly_when_demanded_but_missing(monkeypatch):
    import importlib.util

    from semivlm.model import apply_liger, resolve_attn_implementation

    assert resolve_attn_implementation("eager") == "eager"
    assert resolve_attn_implementation("auto") == "sdpa"  # this machine: no GPU
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert resolve_attn_implementation("auto") == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    assert apply_liger(None, "auto", 0) == "off (liger-kernel not installed)"
    with pytest.raises(SystemExit, match="liger: 'on' needs liger-kernel installed"):
        apply_liger(None, "on", 0)
    assert apply_liger(None, "off", 3) == "off"


@pytest.mark.slow
def test_compiled_checkpointed_blocks_train_to_the_same_losses_and_export_the_same_names(pretrain_args, tmp_path,
                                                                                          capsys):
    from safetensors.torch import load_file

    plain = run_in_process(pretrain_args(tmp_path / "plain"))  # gradient_checkpointing: auto = off on CPU
    assert "activation checkpointing off" in capsys.readouterr().out
    fast = run_in_process(pretrain_args(tmp_path / "fast", compile="true", gradient_checkpointing="true"))
    log = capsys.readouterr().out
    assert "activation checkpointing on" in log and "compiled 2 transformer blocks" in log
    a, b = losses(plain["history"]), losses(fast["history"])
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], abs=1e-4) for s in a), (a, b)
    assert a[8] < a[1] - 0.1  # and they did learn
    weights = [load_file(f"{d}/model.safetensors") for d in (plain["final_dir"], fast["final_dir"])]
    assert weights[0].keys() == weights[1].keys()  # no _orig_mod. in the export


def saved_activation_bytes(model, batch: int, seq: int) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training forward (parameters excluded)."""
    storages: dict[int, int] = {}

    def keep(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("moe_every", [0, 1, 2])
def test_activation_estimate_covers_what_autograd_saves_logits_and_experts_included(moe_every):
    """The estimate behind gradient_checkpointing auto, against a measurement on a tiny Qwen3 whose vocabulary
    outweighs its width as a real one's does (151,936 vs 896): the logits are most of the memory."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from semivlm import moe
    from semivlm.model import activation_bytes

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    if moe_every:
        config = moe.moe_text_config(config, num_experts=4, top_k=2, moe_every=moe_every)
    model = AutoModelForCausalLM.from_config(config).train()
    measured, estimate = saved_activation_bytes(model, 2, 64), activation_bytes(model, 2, 64)
    # the estimate counts the transient float32 logits too, and leaves out small tensors (rsqrt, q/k norms)
    assert 1.0 < estimate / measured < 1.8, (estimate, measured)
    assert 34 * 2 * 64 * 2 * 64 < measured / 4  # the old layers-only formula (34·b·s·L·h) saw a fifth of it
    # by hand (fp32, e = 4 bytes; q = 64, kv = 32; per token): attention 4·(2·64 + 2·64 + 2·32) = 1280 per layer,
    # dense FFN 4·(2·64 + 4·160) = 3072, MoE FFN 4·(2·64 + 4 + 2·(64 + 4·160)) = 6160, final norm 4·128 = 512,
    # logits (4 + 8)·2048 = 24576
    ffn = {0: [3072, 3072], 1: [6160, 6160], 2: [6160, 3072]}[moe_every]
    assert estimate == 2 * 64 * (2 * 1280 + sum(ffn) + 512 + 24576)


def test_gradient_checkpointing_auto_turns_on_when_activations_would_fill_60_percent_of_the_gpu(monkeypatch):
    from types import SimpleNamespace

    from transformers import (AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, Qwen2Config)

    from semivlm.model import activation_bytes, wants_gradient_checkpointing

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 2**30))
    with torch.device("meta"):  # real shapes, no memory
        qwen_05b = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2), dtype=torch.bfloat16)
        llama_8b_config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
        llama_8b = AutoModelForCausalLM.from_config(llama_8b_config, dtype=torch.bfloat16)
        vlm = LlavaForConditionalGeneration(LlavaConfig(
            text_config=llama_8b_config, vision_config=CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
                patch_size=14))).to(
            torch.bfloat16)
    # the H100 anchor (gpu/README.md): this shape at 8 × 2048 peaked at 51.8 GiB, of which ~7 GB weights and Adam
    assert activation_bytes(qwen_05b, 8, 2048) == pytest.approx(44.7e9, rel=0.01)
    assert wants_gradient_checkpointing("auto", qwen_05b, 8, 2048, gpu) is False
    assert activation_bytes(llama_8b, 4, 2048) == pytest.approx(54.7e9, rel=0.01)
    assert wants_gradient_checkpointing("auto", llama_8b, 4, 2048, gpu) is True
    assert wants_gradient_checkpointing("auto", llama_8b, 4, 2048, torch.device("cpu")) is False
    assert wants_gradient_checkpointing(True, qwen_05b, 1, 16, gpu) is True
    assert wants_gradient_checkpointing(False, llama_8b, 64, 8192, gpu) is False
    # a VLM: the decoder's shape counts, and the vision tower only when it trains (frozen, it saves nothing)
    vlm.model.vision_tower.requires_grad_(False)
    frozen = activation_bytes(vlm, 4, 2048)
    assert frozen == activation_bytes(llama_8b, 4, 2048)
    vlm.model.vision_tower.requires_grad_(True)
    # 577 patches × 24 layers × 2 bytes × (8·1024 + 2·4096) per image
    assert activation_bytes(vlm, 4, 2048) - frozen == 4 * 577 * 24 * 2 * (8 * 1024 + 2 * 4096)


def test_pretraining_reads_build_corpus_shards_memory_mapped_and_trains(pretrain_args, tiny_blocks, tmp_path,
                                                                       monkeypatch):
    """A corpus written in several Arrow shards by build_corpus (with the tiny model's tokenizer): load_blocks maps
    the shards instead of loading them, rows come back in order across shard boundaries, the token-id check reads
    chunk by chunk, and a short run trains on it."""
    import numpy as np
    from datasets import load_from_disk

    import data_prep.build_corpus as bc
    from train_pretrain import load_blocks, max_token_id

    monkeypatch.setattr(bc, "SHARD_BYTES", 4 * 64 * 10)            # 10 blocks a shard
    monkeypatch.setattr(bc, "FLUSH_TOKENS", 300)
    corpus = tmp_path / "corpus"
    stats = bc.main(bc.CorpusConfig(out=str(corpus), inputs=[str(REPO / "data/corpus")], block_size=64,
                                    tokenizer=str(tiny_blocks / "tokenizer")))
    assert stats["splits"]["train"]["shards"] > 3
    blocks = load_blocks(str(corpus / "train"), "train_data")
    assert len(blocks) == stats["splits"]["train"]["blocks"]
    assert {f["filename"] for f in blocks.cache_files} == {str(p) for p in (corpus / "train").glob("data-*.arrow")}
    plain = np.array(load_from_disk(str(corpus / "train"))["input_ids"])
    for i in (0, 9, 10, 11, len(blocks) - 1):                        # across shard boundaries
        assert blocks[i]["input_ids"].tolist() == plain[i].tolist()
    assert max_token_id(blocks) == plain.max() < 400
    result = run_in_process(pretrain_args(tmp_path / "run", train_data=str(corpus / "train"),
                                          eval_data=str(corpus / "validation"), max_steps=6, learning_rate=1e-2))
    train_losses = losses(result["history"])
    assert train_losses[6] < train_losses[1], train_losses
