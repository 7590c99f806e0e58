"""Chat SFT (SemiKong's second text stage) and DPO, for any HF decoder: full, LoRA or QLoRA, on the shared loop.

CPU / single-GPU debug (after train_pretrain.py and data_prep/make_instructions.py of the debug recipe):
    python train_sft.py --config launch/configs/debug/sft.yaml
    python train_sft.py --config launch/configs/debug/dpo.yaml
One node, 8 GPUs, DeepSpeed ZeRO-3:
    accelerate launch --config_file launch/accelerate/node_8gpu_zero3.yaml train_sft.py \
        --config launch/configs/semikong_8b/sft.yaml
SLURM, several nodes (checkpoints and requeues itself before the time limit, resumes on restart):
    sbatch --nodes=2 launch/slurm/train.sbatch train_sft.py launch/configs/semikong_8b/sft.yaml

SFT puts the loss on assistant tokens only, checked record by record (a record whose template leaves no supervised
tokens, or puts the labels anywhere but on its assistant text, is an error naming it, or a counted skip with
`skip_invalid`). Records are packed into full rows without attention across records, or length-grouped. DPO
(`objective: dpo`) trains on preference pairs against the starting model as frozen reference: its log-probs are
precomputed once (cached in output_dir) or, with LoRA, taken on the fly with the adapters switched off.
LoRA and QLoRA (nf4, double quantisation) runs export `output_dir/final` merged onto the unquantised base.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from semivlm import chat, dpo
from semivlm.config import load_config
from semivlm.data import RecordError, exit_on_bad_record, read_jsonl
from semivlm.loop import TrainConfig, make_accelerator, train, zero_stage
from semivlm.model import (apply_liger, apply_lora, build_causal_lm, enable_dynamic_rank, load_tokenizer,
                           resolve_attn_implementation)


@dataclass
class SFTConfig(TrainConfig):
    objective: Literal["sft", "dpo"] = "sft"
    max_length: int = 1024  # tokens per record (and per packed row)
    packing: bool = True  # sft: pack records into full rows; else length-grouped batches
    overflow: Literal["truncate", "skip"] = "truncate"  # records longer than max_length
    skip_invalid: bool = False  # count and skip bad records instead of stopping at the first
    train_split: str = "train"  # keep records whose meta.split is this ("" = all)
    eval_split: str = "validation"
    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # DyLoRA-style nested rank: each step trains the leading r' ~ U[lora_rank_min, lora_r] components of every adapter
    # (model.DynamicRank), so one adapter serves each of those ranks once truncated (evaluate.py / export_gptq.py rank)
    lora_dynamic_rank: bool = False
    lora_rank_min: int = 1
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quantization: Literal["none", "nf4"] = "none"  # nf4 = QLoRA (bitsandbytes, double quantisation, bf16 compute)
    beta: float = 0.1  # dpo: strength of the pull towards the reference
    dpo_reference: Literal["precomputed", "adapter_off"] = "precomputed"


def read_split(path: str, split: str, skip_invalid: bool, what: str) -> list[dict]:
    if not path:
        raise SystemExit(f"{what} is required (a JSONL file of records)")
    try:
        rows = list(read_jsonl(path, skip_bad=skip_invalid))
    except RecordError as e:
        raise SystemExit(f"{what}: {e}") from None
    return [r for r in rows if not split or r.get("meta", {}).get("split", split) == split]


def load_model(cfg: SFTConfig, accelerator, tokenizer):
    """The decoder, optionally nf4-quantised (QLoRA) and wrapped with LoRA adapters."""
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.quantization == "nf4":
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if not cfg.init_from or cfg.lora_r <= 0:
            raise SystemExit("quantization: nf4 (QLoRA) needs init_from (a saved model) and lora_r > 0")
        if zero_stage(accelerator) == 3:
            raise SystemExit("QLoRA is not supported under ZeRO-3 here; use ds_configs/zero2.json or one GPU")
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, quantization_config=bnb, attn_implementation=attn)
        model = prepare_model_for_kbit_training(  # QLoRA is for tight memory: auto = checkpointing on
            model, use_gradient_checkpointing=cfg.gradient_checkpointing is not False,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = build_causal_lm(cfg.init_from, cfg.model_config, len(tokenizer), accelerator.param_dtype, attn)
    accelerator.print(f"attention {attn} | liger {apply_liger(model, cfg.liger, zero_stage(accelerator))}")
    lora_config = None
    if cfg.lora_dynamic_rank and cfg.lora_r <= 0:
        raise SystemExit("lora_dynamic_rank needs LoRA: set lora_r > 0")
    if cfg.lora_r > 0:
        model, lora_config = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        if cfg.lora_dynamic_rank:
            enable_dynamic_rank(model, cfg.lora_rank_min, cfg.seed)
    elif cfg.objective == "dpo" and cfg.dpo_reference == "adapter_off":
        raise SystemExit("dpo_reference: adapter_off needs LoRA (lora_r > 0); use precomputed for full fine-tuning")
    return model, lora_config


def sft_data(cfg: SFTConfig, tokenizer, rows: list[dict], where: str, accelerator):
    examples, counts = chat.encode_records(tokenizer, rows, cfg.max_length, cfg.overflow, cfg.skip_invalid, where)
    if not examples:
        raise SystemExit(f"{where}: no usable records ({counts})")
    if cfg.packing:
        packed = chat.pack_examples(examples, cfg.max_length)
        accelerator.print(f"{where}: {len(examples)} records -> {len(packed)} packed rows of {cfg.max_length} "
                          f"({100 * chat.packing_efficiency(packed, cfg.max_length):.1f}% tokens, not padding) | {counts}")
        return packed, counts
    accelerator.print(f"{where}: {len(examples)} records, length-grouped batches | {counts}")
    return examples, counts


def main(cfg: SFTConfig) -> dict:
    with exit_on_bad_record():
        return run(cfg)


def run(cfg: SFTConfig) -> dict:
    # ---- distributed setup: precision, clipping and ZeRO stage come from the ds_configs/ file
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)

    # ---- data: records checked one by one; bad ones stop the run (or are counted with skip_invalid)
    train_rows = read_split(cfg.train_data, cfg.train_split, cfg.skip_invalid, "train_data")
    eval_rows = read_split(cfg.eval_data or cfg.train_data, cfg.eval_split, cfg.skip_invalid, "eval_data") \
        if (cfg.eval_data or cfg.eval_split) else []
    permutation, on_start = None, None
    if cfg.objective == "sft":
        train_set, _ = sft_data(cfg, tokenizer, train_rows, cfg.train_data, accelerator)
        eval_set = sft_data(cfg, tokenizer, eval_rows, cfg.eval_data or cfg.train_data, accelerator)[0] \
            if eval_rows else None
        # flash-attention needs the record boundaries spelled out when a packed micro-batch has several rows
        collate = partial(chat.collate_chat, pad_id=tokenizer.pad_token_id,
                          varlen=resolve_attn_implementation(cfg.attn_implementation).startswith("flash"))
        if not cfg.packing:
            lengths = [len(e["input_ids"]) for e in train_set]
            permutation = partial(chat.length_grouped_permutation, lengths, cfg.micro_batch_size, cfg.seed)
    else:
        images = sum(1 for r in train_rows + eval_rows if r.get("images"))
        train_rows, eval_rows = [r for r in train_rows if not r.get("images")], [r for r in eval_rows if not r.get("images")]
        accelerator.print(f"dpo: {len(train_rows)} train / {len(eval_rows)} held-out text pairs "
                          f"({images} image pairs are for train_moe.py)")

        def encode(rows, where):  # encode_pair names `where` itself
            pairs, counts = chat.encode_counted(
                rows, lambda r, n: (dpo.encode_pair(tokenizer, r, cfg.max_length, where, cfg.overflow), False),
                cfg.skip_invalid, count_truncated=False)
            accelerator.print(f"{where}: {len(pairs)} pairs | {counts}")
            return pairs
        train_set, eval_set = encode(train_rows, cfg.train_data), encode(eval_rows, cfg.eval_data or cfg.train_data)
        if not train_set:
            raise SystemExit(f"{cfg.train_data}: no usable preference pairs")
        collate = partial(dpo.collate_pairs, pad_id=tokenizer.pad_token_id)
        if cfg.dpo_reference == "precomputed":
            on_start = dpo.reference_on_start([train_set, eval_set], collate, cfg.micro_batch_size, cfg.output_dir)
        eval_set = eval_set or None

    # ---- model (after the Accelerator, so that ZeRO-3 partitions it while it is constructed)
    torch.manual_seed(cfg.seed)
    model, lora_config = load_model(cfg, accelerator, tokenizer)
    loss_fn = dpo.make_dpo_loss(cfg.beta, cfg.dpo_reference) if cfg.objective == "dpo" else None

    # ---- train, evaluate, export (merged when LoRA/QLoRA)
    extra = {"loss_fn": loss_fn} if loss_fn else {}
    dynamic = getattr(model, "dynamic_rank", None)
    result = train(cfg, accelerator, model, tokenizer, train_set, eval_set, collate, lora_config=lora_config,
                   seq_len=cfg.max_length, permutation=permutation, on_start=on_start,
                   base_for_merge=cfg.init_from if cfg.quantization != "none" else None,
                   before_step=dynamic.set_step if dynamic else None, **extra)
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(load_config(SFTConfig))
