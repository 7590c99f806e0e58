"""Domain continued pretraining (as SemiKong): causal-LM training of any HF decoder on packed corpus blocks.

CPU / single-GPU debug (tiny random model, the built-in corpus; build it first with data_prep/build_corpus.py):
    python train_pretrain.py --config launch/configs/debug/pretrain.yaml --output_dir runs/demo/pretrain
One node, 8 GPUs, DeepSpeed ZeRO-3:
    accelerate launch --config_file launch/accelerate/node_8gpu_zero3.yaml train_pretrain.py \
        --config launch/configs/semikong_8b/pretrain.yaml
SLURM, several nodes (checkpoints and requeues itself before the time limit, resumes on restart):
    sbatch --nodes=2 launch/slurm/train.sbatch train_pretrain.py launch/configs/semikong_8b/pretrain.yaml

Full fine-tuning by default; `--lora_r 16` trains LoRA adapters instead and still exports a merged model.
The run writes `output_dir/checkpoints/step_N/` (resumable), `output_dir/final/` (save_pretrained, safetensors)
and `output_dir/history.json`; rerunning the same command resumes from the newest complete checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from semivlm.config import load_config
from semivlm.loop import TrainConfig, make_accelerator, train, zero_stage
from semivlm.model import (apply_liger, apply_lora, build_causal_lm, enable_dynamic_rank, load_tokenizer,
                           resolve_attn_implementation)


@dataclass
class PretrainConfig(TrainConfig):
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # DyLoRA-style nested rank: each step trains the leading r' ~ U[lora_rank_min, lora_r] components of every adapter
    # (model.DynamicRank), so one adapter serves each of those ranks once truncated (evaluate.py / export_gptq.py rank)
    lora_dynamic_rank: bool = False
    lora_rank_min: int = 1
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def load_blocks(path: str, what: str):
    """A `datasets` directory of fixed-length `input_ids` blocks, as written by data_prep/build_corpus.py: its Arrow
    shards are memory-mapped (load_from_disk keeps nothing in memory), so a row is read from the page cache when the
    DataLoader asks for it and resident memory does not grow with the corpus."""
    from datasets import load_from_disk

    if not path:
        raise SystemExit(f"{what} is required (a directory written by data_prep/build_corpus.py)")
    if not Path(path).is_dir():
        raise SystemExit(f"{what} '{path}' does not exist (build it with data_prep/build_corpus.py)")
    try:
        ds = load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{what} '{path}' is not a saved datasets directory: {e}") from None
    if "input_ids" not in ds.column_names:
        raise SystemExit(f"{what} '{path}' has no input_ids column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise SystemExit(f"{what} '{path}' holds no blocks")
    return ds.with_format("torch")


def max_token_id(blocks) -> int:
    """The largest token id, one Arrow chunk at a time (combine_chunks would copy the whole corpus into memory)."""
    import pyarrow.compute as pc

    return max(int(pc.max(chunk.flatten()).as_py()) for chunk in blocks.data.column("input_ids").chunks
               if len(chunk))


def collate_blocks(rows: list[dict]) -> dict:
    input_ids = torch.stack([r["input_ids"] for r in rows]).long()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def main(cfg: PretrainConfig) -> dict:
    # ---- distributed setup: precision, clipping and ZeRO stage come from the ds_configs/ file
    accelerator = make_accelerator(cfg)

    # ---- data
    train_blocks = load_blocks(cfg.train_data, "train_data")
    eval_blocks = load_blocks(cfg.eval_data, "eval_data") if cfg.eval_data else None
    seq_len = len(train_blocks[0]["input_ids"])

    # ---- model (built after the Accelerator so that ZeRO-3 partitions it while it is constructed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    torch.manual_seed(cfg.seed)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    model = build_causal_lm(cfg.init_from, cfg.model_config, len(tokenizer), accelerator.param_dtype, attn)
    accelerator.print(f"attention {attn} | liger {apply_liger(model, cfg.liger, zero_stage(accelerator))}")
    vocab = model.get_input_embeddings().num_embeddings
    top_id = max_token_id(train_blocks)
    if top_id >= vocab:
        raise SystemExit(f"train_data '{cfg.train_data}' holds token id {top_id} but the model's vocabulary has "
                         f"{vocab} entries: was it built with a different tokenizer than '{cfg.tokenizer}'?")
    lora_config, dynamic = None, None
    if cfg.lora_dynamic_rank and cfg.lora_r <= 0:
        raise SystemExit("lora_dynamic_rank needs LoRA: set lora_r > 0")
    if cfg.lora_r > 0:
        model, lora_config = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        if cfg.lora_dynamic_rank:
            dynamic = enable_dynamic_rank(model, cfg.lora_rank_min, cfg.seed)

    # ---- train, evaluate, export
    result = train(cfg, accelerator, model, tokenizer, train_blocks, eval_blocks, collate_blocks,
                   lora_config=lora_config, seq_len=seq_len, before_step=dynamic.set_step if dynamic else None)
    evals = [h for h in result["history"] if "eval_ppl" in h]
    if len(evals) >= 2:
        accelerator.print(f"held-out perplexity {evals[0]['eval_ppl']:.2f} -> {evals[-1]['eval_ppl']:.2f}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(load_config(PretrainConfig))
