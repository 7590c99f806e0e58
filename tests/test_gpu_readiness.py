"""What the first run on H100s or on 8×A100 under SLURM relies on, checked on CPU (issue 18): MFU's denominator from
the card's real name, no recipe config pinning it, fp32 gradient accumulation in every ZeRO config, and the device
evaluate.py picks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semivlm.loop import datasheet_tflops

ROOT = Path(__file__).resolve().parents[1]

# torch.cuda.get_device_name() strings as the cards report them, with their datasheet dense bf16 TFLOP/s
REAL_DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H800": 989.0,
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA H20": 148.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA A30": 165.0,
    "NVIDIA A40": 150.0,
    "Tesla V100-SXM2-32GB": 125.0,
}


@pytest.mark.parametrize("name", sorted(REAL_DEVICE_NAMES))
def test_mfu_peak_comes_from_the_exact_card_variant(name):
    assert datasheet_tflops(name) == REAL_DEVICE_NAMES[name], name


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "Tesla T4"])
def test_unlisted_cards_get_no_borrowed_figure(name):
    # A10G must not read as A10 nor RTX/T4 as anything: they fall back to the measured matmul ceiling
    assert datasheet_tflops(name) is None


def test_peak_tflops_reads_the_detected_card_and_config_still_overrides(monkeypatch):
    import torch

    from semivlm import loop

    class Acc:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    tflops, source = loop.peak_tflops(loop.TrainConfig(), Acc())
    assert tflops == 756.0 and "H100 PCIe" in source
    assert loop.peak_tflops(loop.TrainConfig(peak_tflops=500.0), Acc()) == (500.0, "configured")


def test_no_recipe_config_pins_the_mfu_peak():
    # a pinned A100 figure made MFU read 3.2x too high on an H100
    pinned = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "launch/configs").glob("*/*.yaml"))
              if "peak_tflops" in (yaml.safe_load(p.read_text()) or {})]
    assert pinned == []


# ---------------------------------------------------------------- fp32 gradient accumulation under ZeRO

BF16_DS_CONFIGS = ["zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("name", BF16_DS_CONFIGS + ["zero3_fp32.json"])
def test_every_ds_config_accumulates_gradients_in_fp32(name):
    # without it DeepSpeed 0.19.8 accumulates in the model dtype (engine.get_data_types): bf16 over 16 micro-steps
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    assert cfg.get("data_types", {}).get("grad_accum_dtype") == "fp32", name


DS_ENGINE_DTYPES = r"""
import json, sys, torch
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
for path in sys.argv[1:]:
    cfg = json.load(open(path))
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=4, train_batch_size=4)
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if cfg["zero_optimization"].get(k) == "auto":
            cfg["zero_optimization"][k] = 100
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
    buffer = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3's accumulation buffer
    print("DTYPES", json.dumps({"file": path.rsplit("/", 1)[-1], "model": str(engine.get_data_types()[0]),
          "accum": str(opt.gradient_accumulation_dtype), "buffer": str(buffer.dtype) if buffer is not None else None}))
"""


def test_deepspeed_zero2_and_zero3_take_the_fp32_accumulation_from_the_configs(tmp_path):
    # the ZeRO-1/2 optimizer (stage_1_and_2.py: gradient_accumulation_dtype) and ZeRO-3's
    # (stage3.py: grad_partitions_flat_buffer) are both built with engine.get_data_types()[1]
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = tmp_path / "dtypes.py"
    script.write_text(DS_ENGINE_DTYPES)
    run = subprocess.run([sys.executable, str(script), *(str(ROOT / "ds_configs" / n) for n in BF16_DS_CONFIGS)],
                         env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line.split("DTYPES ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("DTYPES ")]
    assert len(rows) == 3, run.stdout[-2000:] + run.stderr[-3000:]
    for row in rows:
        assert row["model"] == "torch.bfloat16" and row["accum"] == "torch.float32", row
        if row["file"] != "zero2.json":
            assert row["buffer"] == "torch.float32", row


# ---------------------------------------------------------------- the real epoch count at the start of training

def test_training_start_line_states_the_real_epoch_count(pretrain_args, tiny_blocks, tmp_path, capsys):
    # the recipe YAMLs' epoch arithmetic rests on guessed record counts; the log must say what the data gives
    from datasets import load_from_disk
    from test_pretrain import run_in_process

    records = len(load_from_disk(str(tiny_blocks / "train")))
    run_in_process(pretrain_args(tmp_path / "run", max_steps=3, micro_batch_size=4, grad_accum=2))
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("training "))
    per_epoch = records / 8
    assert f"{records:,} training sequences / 8 per step = {per_epoch:,.1f} steps per epoch" in start, start
    assert f"3 steps = {3 / per_epoch:.2f} epochs" in start, start


def test_moe_recipe_comment_states_the_active_parameters_of_its_model():
    # Qwen3-1.7B's published config, upcycled as moe.yaml says (experts, top-k, every other layer), on the meta device
    import re

    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    text = (ROOT / "launch/configs/micrograph_vlm/moe.yaml").read_text()
    cfg = yaml.safe_load(text)
    qwen3_1p7b = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(Qwen3Config(**qwen3_1p7b))
        moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
            **qwen3_1p7b, moe_intermediate_size=6144, num_experts=cfg["num_experts"],
            num_experts_per_tok=cfg["top_k"], decoder_sparse_step=cfg["moe_every"], mlp_only_layers=[]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sparse = sum(hasattr(layer.mlp, "experts") for layer in moe.model.layers)
    ffn = 3 * 2048 * 6144
    active = count(dense) + sparse * (cfg["top_k"] - 1) * ffn
    assert sparse == 14 and count(moe) == count(dense) + sparse * (cfg["num_experts"] - 1) * ffn + sparse * 2048 * 4
    stated = float(re.search(r"~([\d.]+)B active", text).group(1))
    assert stated == pytest.approx(active / 1e9, abs=0.01), (stated, active)


# ---------------------------------------------------------------- rank 0 working alone while the others wait

SLOW_RANK0 = r"""
import os, sys, time
sys.path.insert(0, os.environ["REPO"])
import semivlm.checkpoint as ckpt

original = ckpt.stop_at_end_of_turn  # export_final calls it on the main process only, before its closing barrier


def slow(*args, **kwargs):  # stands for the LoRA merge / classification check that rank 0 runs alone
    print("rank 0 works alone", flush=True)
    time.sleep(float(os.environ["SLOW_RANK0_S"]))
    return original(*args, **kwargs)


ckpt.stop_at_end_of_turn = slow
from semivlm.config import load_config  # noqa: E402
from train_pretrain import PretrainConfig, main  # noqa: E402

main(load_config(PretrainConfig))
"""


@pytest.mark.slow  # two 2-process ZeRO-3 launches, each with 30 s of rank-0 work (~3.5 min)
def test_process_group_timeout_covers_rank0_working_alone(pretrain_args, tmp_path):
    # a real 2-process ZeRO-3 run on gloo: rank 0 spends 30 s alone at export while rank 1 waits in the barrier
    from conftest import REPO, run_script

    wrapper = tmp_path / "slow_rank0.py"
    wrapper.write_text(SLOW_RANK0)
    launch = [str(REPO / ".venv/bin/accelerate"), "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
              str(wrapper)]
    env = {"REPO": str(REPO), "SLOW_RANK0_S": "30"}
    common = {"max_steps": 2, "eval_every": 0, "eval_batches": 1}

    # a timeout shorter than rank 0's work (as DeepSpeed's 10-minute default is shorter than a CPU-side check of a
    # 3.6B model) kills the run at that barrier
    short = run_script(launch + pretrain_args(tmp_path / "short", dist_timeout_minutes=0.25, **common),
                       timeout=400, env_extra=env)
    assert short.returncode != 0, short.stdout[-2000:]
    assert "rank 0 works alone" in short.stdout, short.stdout[-2000:] + short.stderr[-2000:]
    assert "timed out" in short.stderr.lower(), short.stderr[-3000:]  # gloo: "Timed out waiting 15000ms for recv"

    # one that fits lets the same run finish and export
    fits = run_script(launch + pretrain_args(tmp_path / "fits", dist_timeout_minutes=1.5, **common),
                      timeout=400, env_extra=env)
    assert fits.returncode == 0, fits.stdout[-2000:] + fits.stderr[-3000:]
    assert "rank 0 works alone" in fits.stdout and (tmp_path / "fits/final/config.json").is_file()


def test_nonpositive_process_group_timeout_is_refused():
    from semivlm.loop import TrainConfig, make_accelerator

    with pytest.raises(SystemExit, match="dist_timeout_minutes must be > 0"):
        make_accelerator(TrainConfig(dist_timeout_minutes=0, ds_config=str(ROOT / "ds_configs/zero3_fp32.json")))


def test_moe_classification_check_runs_on_the_device_and_dtype_it_is_given(monkeypatch, tmp_path):
    # train_moe passes the run's accelerator.device and parameter dtype: the check no longer decodes on CPU in fp32
    import torch

    import train_moe
    from semivlm import vlm

    seen = {}

    class Model(torch.nn.Module):
        def to(self, device):
            seen["device"] = device
            return self

    def load_vlm(path, dtype=torch.float32, *args, **kwargs):
        seen["dtype"] = dtype
        return Model(), None

    monkeypatch.setattr(vlm, "load_vlm", load_vlm)
    acc = train_moe.classification_accuracy(tmp_path, [], 10, torch.device("cuda", 3), torch.bfloat16)
    assert seen == {"device": torch.device("cuda", 3), "dtype": torch.bfloat16} and acc["classify_n"] == 0
