"""Throughput of the project's training loop against a plain PyTorch loop: same model, data, batch and precision.

CPU (tiny shapes, keeps the script working):
    python bench/bench_loop.py --shape tiny
One GPU (random-init Qwen2.5-0.5B shape, seq 2048, bf16 from ds_configs/zero3.json):
    python bench/bench_loop.py --shape qwen2.5-0.5b --seq_len 2048 --micro_batch_size 8 --ds_config ds_configs/zero3.json
SLURM (one GPU of a node):
    srun -N1 --gpus=1 python bench/bench_loop.py --shape qwen2.5-0.5b --seq_len 2048 --ds_config ds_configs/zero3.json

Both loops run in this one process, plain first, each with its own warm-up; the figures are medians over the
timed steps. MFU uses the same FLOP count for both (semivlm.model.flops_per_token) against the datasheet peak of a
known GPU, else a matmul ceiling measured here.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semivlm.config import load_config  # noqa: E402
from semivlm.loop import TrainConfig, make_accelerator, peak_memory_gib, peak_tflops, train  # noqa: E402
from semivlm.model import flops_per_token  # noqa: E402

SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


@dataclass
class BenchConfig:
    shape: str = "tiny"
    seq_len: int = 256
    micro_batch_size: int = 8
    steps: int = 12  # timed steps per loop
    warmup: int = 3
    rounds: int = 2  # loops alternate this many times; each reports its best median, so drift hits both alike
    ds_config: str = "ds_configs/zero3_fp32.json"  # precision and clipping for both loops
    attn_implementation: str = "sdpa"
    seed: int = 0


def build_model(cfg: BenchConfig, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[cfg.shape])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=max(cfg.seq_len, 512), **spec)
    config._attn_implementation = cfg.attn_implementation
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_blocks(cfg: BenchConfig, n: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, SHAPES[cfg.shape]["vocab_size"], (n, cfg.seq_len), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def plain_loop(cfg: BenchConfig, accelerator, data) -> list[float]:
    """What a user writes by hand: AdamW, autocast, clip, step. Returns tokens/s of each timed step."""
    device = accelerator.device
    model = build_model(cfg, torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = accelerator.mixed_precision == "bf16"
    rates = []
    for step in range(cfg.warmup + cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()  # fetching the batch is part of a step, as it is in the project's loop
        rows = [data[(step * cfg.micro_batch_size + i) % len(data)]["input_ids"] for i in range(cfg.micro_batch_size)]
        ids = torch.stack(rows).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if accelerator.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), accelerator.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= cfg.warmup:
            rates.append(ids.numel() / (time.perf_counter() - t0))
    del model, opt
    return rates


def main(cfg: BenchConfig) -> dict:
    if cfg.shape not in SHAPES:
        raise SystemExit(f"unknown shape '{cfg.shape}'; choose from {sorted(SHAPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        train_cfg = TrainConfig(output_dir=tmp, max_steps=cfg.warmup + cfg.steps, micro_batch_size=cfg.micro_batch_size,
                                grad_accum=1, eval_every=0, save_every=0, warmup_steps=0, learning_rate=1e-4,
                                ds_config=cfg.ds_config, seed=cfg.seed, log_every=10**9)
        accelerator = make_accelerator(train_cfg)
        device = accelerator.device
        data = random_blocks(cfg, cfg.micro_batch_size * (cfg.warmup + cfg.steps))
        probe = build_model(cfg, torch.float32)
        fpt, n_params = flops_per_token(probe, cfg.seq_len), sum(p.numel() for p in probe.parameters())
        del probe
        tflops, source = peak_tflops(train_cfg, accelerator)
        from train_pretrain import collate_blocks

        def ours():
            model = build_model(cfg, accelerator.param_dtype)
            history = train(train_cfg, accelerator, model, None, data, None, collate_blocks,
                            seq_len=cfg.seq_len)["history"]
            return [h["tokens_per_s"] for h in history if "tokens_per_s" in h][cfg.warmup:]

        results = {}
        for _ in range(cfg.rounds):
            for name, run in (("plain PyTorch loop", lambda: plain_loop(cfg, accelerator, data)), ("semivlm loop", ours)):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                rate = statistics.median(run())
                best = results.get(name, (0.0, 0.0))
                results[name] = (max(rate, best[0]), max(peak_memory_gib(device), best[1]))

    print(f"\n{cfg.shape}: {n_params / 1e6:.1f}M parameters, seq {cfg.seq_len}, micro-batch {cfg.micro_batch_size}, "
          f"precision {accelerator.mixed_precision}, {device.type}; MFU against {tflops:.3g} TFLOP/s ({source})")
    print(f"{'loop':<22}{'tokens/s':>12}{'MFU':>9}{'peak GiB':>10}")
    for name, (rate, mem) in results.items():
        print(f"{name:<22}{rate:>12,.0f}{100 * fpt * rate / (tflops * 1e12):>8.1f}%{mem:>10.1f}")
    ratio = results["semivlm loop"][0] / results["plain PyTorch loop"][0]
    print(f"semivlm / plain = {ratio:.2f}x")
    accelerator.end_training()
    return {"results": results, "ratio": ratio}


if __name__ == "__main__":
    main(load_config(BenchConfig))
