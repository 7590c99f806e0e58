"""MoE-LLaVA stages I–III on Hugging Face-native models, every stage under DeepSpeed ZeRO-3.

CPU / single-GPU debug (after make_instructions.py and train_sft.py of the debug recipe; one stage after another):
    python train_moe.py --config launch/configs/debug/projector.yaml
    python train_moe.py --config launch/configs/debug/llm.yaml
    python train_moe.py --config launch/configs/debug/moe.yaml
One node, 8 GPUs, DeepSpeed ZeRO-3:
    accelerate launch --config_file launch/accelerate/node_8gpu_zero3.yaml train_moe.py \
        --config launch/configs/micrograph_vlm/moe.yaml
SLURM, several nodes (checkpoints and requeues itself before the time limit, resumes on restart):
    sbatch --nodes=2 launch/slurm/train.sbatch train_moe.py launch/configs/micrograph_vlm/moe.yaml

`--stage projector` assembles a LlavaForConditionalGeneration from a CLIP/SigLIP vision tower and the LLM that
train_sft.py wrote and trains the projector on captions; `--stage llm` trains projector + LLM on VQA, captions,
classification and text instructions; `--stage moe` converts the decoder into the matching HF MoE architecture
(Llama/Mistral → Mixtral, Qwen3 → Qwen3Moe, Qwen2 → Qwen2Moe), every expert a copy of its layer's FFN, and trains
experts and routers with a load-balancing loss. STAGES below is the one table of what each stage trains, starts
from, reads and at which learning rates. Each stage ends in `output_dir/final`, which plain
`AutoModelForImageTextToText.from_pretrained` loads (and vLLM serves); MoE runs save per-layer routing statistics
(`routing.json`, image vs text tokens) beside every checkpoint and the export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from semivlm import dpo, moe, record_index, vlm
from semivlm.checkpoint import unpartitioned
from semivlm.config import load_config
from semivlm.data import exit_on_bad_record
from semivlm.evaluation import classification_accuracy
from semivlm.record_index import index_records, read_records, repeat_tasks
from semivlm.loop import (TrainConfig, causal_lm_loss, make_accelerator, random_order, supervised_tokens,
                          train, zero_stage)
from semivlm.model import (adapter_base, apply_liger, enable_dynamic_rank, load_adapter_weights,
                           resolve_attn_implementation)

# stage -> what it trains, what `init_from` must be, which record tasks it reads, default learning rates (MoE-LLaVA:
# 1e-3 for stage I, 2e-5 for stages II and III; the projector keeps the LLM's rate in stage II)
STAGES = {
    "projector": {"trains": ("projector",), "starts_from": "llm or vlm", "tasks": ("caption",),
                  "learning_rate": 1e-3, "projector_lr": 1e-3},
    "llm": {"trains": ("projector", "llm"), "starts_from": "vlm", "tasks": ("caption", "vqa", "classify", "instruction"),
            "learning_rate": 2e-5, "projector_lr": 2e-5},
    "moe": {"trains": ("experts", "routers"), "starts_from": "vlm (upcycled here)",
            "tasks": ("caption", "vqa", "classify", "instruction"), "learning_rate": 2e-5, "projector_lr": 2e-5},
}

# fields that only some stages read: set on another stage they would be ignored without a word, so that is an error
STAGE_FIELDS = {"vision_tower": ("projector",), "vision_config": ("projector",), "vision_feature_layer": ("projector",),
                "vision_feature_select_strategy": ("projector",), "unfreeze_vision_tower": ("llm", "moe"),
                "lora_r": ("llm",), "lora_alpha": ("llm",), "lora_dropout": ("llm",),
                "lora_dynamic_rank": ("llm", "moe"), "lora_rank_min": ("llm", "moe"),
                "quantization": ("llm", "moe"),
                **{k: ("moe",) for k in ("train_attention", "moe_lora_r", "moe_lora_alpha", "moe_lora_dropout",
                                         "num_experts", "top_k",
                                         "moe_every", "router_aux_loss_coef", "router_z_loss_coef")}}


@dataclass
class MoEConfig(TrainConfig):
    stage: Literal["projector", "llm", "moe"] = "projector"
    train_data: list[str] = field(default_factory=list)  # JSONL record files; each stage keeps its tasks' records
    eval_data: list[str] = field(default_factory=list)  # empty = the eval_split records of train_data
    train_split: str = "train"
    eval_split: str = "validation"
    tasks: list[str] = field(default_factory=list)  # override the stage's data mix (caption, vqa, classify, instruction)
    task_repeats: dict = field(default_factory=dict)  # copies of each training record per task, e.g. {classify: 4}
    vision_tower: str = ""  # projector stage from an LLM: CLIP/SigLIP directory or hub id ...
    vision_config: dict = field(default_factory=dict)  # ... or a tiny random tower {model_type: clip_vision_model, ...}
    vision_feature_layer: int = 0  # projector stage: tower layer the projector reads (0 = CLIP -2 as LLaVA, SigLIP -1)
    vision_feature_select_strategy: str = ""  # projector stage: "" = the family's; full keeps CLIP's class token
    learning_rate: float = 0.0  # 0 = the stage's default from STAGES
    projector_lr: float = 0.0  # 0 = the stage's default
    unfreeze_vision_tower: bool = False  # llm/moe stages: train the vision tower too
    vision_lr: float = 2e-6
    train_attention: bool = False  # moe stage: attention too, besides experts and routers
    lora_r: int = 0  # llm stage: LoRA on the LLM's attention and MLP projections (projector trained in full), merged at export
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    moe_lora_r: int = 0  # moe stage: LoRA on the experts (PEFT target_parameters), routers trained in full
    moe_lora_alpha: int = 32
    # > 0: expert LoRA with dropout, on per-expert nn.Linear (moe.unfuse_experts; no grouped_mm), fused at export
    moe_lora_dropout: float = 0.0
    # nf4 = QLoRA (llm stage with lora_r, moe stage with moe_lora_r): the decoder layers' Linears frozen in 4-bit
    # (bitsandbytes nf4, double quantisation, bf16 compute); routers, projector, tower, embeddings stay as loaded
    quantization: Literal["none", "nf4"] = "none"
    # llm/moe stages: DyLoRA-style nested rank for the stage's LoRA (lora_r or moe_lora_r): each step trains the leading
    # r' ~ U[lora_rank_min, r] components (model.DynamicRank); evaluate.py / export_gptq.py `rank` truncate the adapter
    lora_dynamic_rank: bool = False
    lora_rank_min: int = 1
    num_experts: int = 4
    top_k: int = 2
    moe_every: int = 1  # 2 = MoE on every other layer (Qwen3Moe only; MoE-LLaVA's default)
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    experts_implementation: str = "auto"  # auto = grouped_mm on GPU, eager on CPU
    max_length: int = 1024  # tokens per sample, image tokens included
    overflow: Literal["truncate", "skip"] = "truncate"
    skip_invalid: bool = False
    max_aspect_ratio: float = 5.0  # wider images are padded to square up to this ratio, refused beyond it
    # images are decoded per micro-batch by this many DataLoader processes, a few micro-batches ahead (0 = in the
    # training process, between steps)
    num_workers: int = 2
    index_dir: str = ""  # where record indexes live (token ids, image paths and sizes); empty = output_dir/record_index
    group_by_modality: bool = True  # micro-batches all-image or all-text, of similar length (LLaVA)
    objective: Literal["sft", "dpo"] = "sft"  # dpo: image (and text) preference pairs from train_data
    beta: float = 0.1
    # a seeded share of the records (pairs) of every file the run reads, chosen by id before anything is encoded, e.g.
    # a demo-sized DPO run on a large preference file; 1 = all
    record_fraction: float = 1.0
    classify_eval: int = 100  # held-out classification records answered after training (0 = off) ...
    classify_data: str = ""  # ... from this JSONL (empty = the classify records of eval_data or train_data)


# ---------------------------------------------------------------- data

# ---------------------------------------------------------------- model

def starting_model_dir(cfg: MoEConfig, accelerator) -> Path:
    """The HF directory every rank loads (partitioned under ZeRO-3): init_from itself, or — built once by the main
    process — the VLM assembled from vision tower + LLM (projector stage) or the upcycled MoE (moe stage)."""
    if not cfg.init_from:
        raise SystemExit(f"init_from is required: the {STAGES[cfg.stage]['starts_from']} directory this stage starts from")
    source = Path(cfg.init_from)
    is_vlm = vlm.is_vlm_dir(source)
    if cfg.stage != "projector" and not is_vlm:
        raise SystemExit(f"--stage {cfg.stage} starts from a VLM directory (the previous stage's output_dir/final); "
                         f"'{cfg.init_from}' is not one")
    if cfg.stage == "llm" or (cfg.stage == "projector" and is_vlm):
        return source
    if cfg.stage == "moe" and moe.upcycled_already(source, cfg.num_experts, cfg.top_k, cfg.moe_every):  # e.g. DPO
        adapter = continued_adapter(cfg)
        if not adapter:
            return source
        base = Path(adapter_base(adapter))
        if not ((base / "config.json").is_file() and vlm.is_vlm_dir(base)):
            raise SystemExit(f"{adapter}: the model it was trained on ('{base}') is not found, so it cannot be continued")
        return base
    start = Path(cfg.output_dir) / "start"
    if accelerator.is_main_process and not (start / "config.json").is_file():
        tmp = Path(cfg.output_dir) / ".tmp-start"
        with unpartitioned():
            if cfg.stage == "projector":
                if not (cfg.vision_tower or cfg.vision_config):
                    raise SystemExit("--stage projector from an LLM needs vision_tower (a CLIP/SigLIP directory or "
                                     "hub id) or vision_config (a tiny random tower)")
                torch.manual_seed(cfg.seed)  # the random projector (and tower): one start per seed
                model, processor = vlm.build_vlm(cfg.vision_tower or cfg.vision_config, cfg.init_from,
                                                 feature_layer=cfg.vision_feature_layer,
                                                 feature_strategy=cfg.vision_feature_select_strategy)
            else:
                dense, processor = vlm.load_vlm(source)
                model = moe.upcycle(dense, cfg.num_experts, cfg.top_k, cfg.moe_every, seed=cfg.seed)
                del dense
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        tmp.rename(start)
        accelerator.print(f"wrote the starting model of stage {cfg.stage} to {start}")
    accelerator.wait_for_everyone()
    return start


def continued_adapter(cfg: MoEConfig) -> Path | None:
    """moe.continued_expert_adapter for a moe stage with expert LoRA; None otherwise."""
    if cfg.stage != "moe" or cfg.moe_lora_r <= 0 or not cfg.init_from:
        return None
    return moe.continued_expert_adapter(cfg.init_from, cfg.moe_lora_r, cfg.moe_lora_alpha)


def set_trainable(cfg: MoEConfig, model) -> dict[str, list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze what the stage trains; returns the trained parameters by LR group."""
    trains = set(STAGES[cfg.stage]["trains"]) | ({"vision"} if cfg.unfreeze_vision_tower else set())
    trains |= {"attention"} if cfg.stage == "moe" and cfg.train_attention else set()
    sparse = set(moe.expert_and_router_parameter_names(model)) if cfg.stage == "moe" else set()
    unused = vlm.unused_vision_parameters(model)
    groups = {"projector": [], "vision": [], "rest": []}
    for name, p in model.named_parameters():
        kind = ("projector" if "multi_modal_projector" in name else "vision" if "vision_tower" in name
                else "routers" if name in sparse and name.endswith("mlp.gate.weight") else "experts" if name in sparse
                else "attention" if "self_attn" in name else "llm")
        on = (kind in trains or (kind in ("experts", "routers", "attention") and "llm" in trains)) and name not in unused
        lora_instead = (cfg.moe_lora_r > 0 and kind == "experts") or (cfg.lora_r > 0 and kind in ("llm", "attention")) \
            or (cfg.quantization == "nf4" and kind == "attention")  # 4-bit attention trains as LoRA (train_attention)
        p.requires_grad_(on and not lora_instead)
        if p.requires_grad:
            groups["projector" if kind == "projector" else "vision" if kind == "vision" else "rest"].append(p)
    return groups


def param_groups(cfg: MoEConfig, groups: dict) -> list[dict]:
    lrs = {"projector": cfg.projector_lr or STAGES[cfg.stage]["projector_lr"], "vision": cfg.vision_lr,
           "rest": cfg.learning_rate or STAGES[cfg.stage]["learning_rate"]}
    out = []
    for kind, params in groups.items():
        for decay in (True, False):
            ps = [p for p in params if (len(getattr(p, "ds_shape", p.shape)) >= 2) == decay]  # ZeRO-3: true shape
            if ps:
                out.append({"params": ps, "lr": lrs[kind], "weight_decay": cfg.weight_decay if decay else 0.0})
    return out


def moe_loss(cfg: MoEConfig, probe, image_token_id: int, base_loss):
    """The LM (or DPO) loss plus router_aux_loss_coef · load-balancing loss (+ z-loss), each logged on its own.
    Auxiliary terms are means per micro-batch: weighted by the micro-batch's share of the step's items so that
    they add up to one mean per optimizer step, however the step is split."""
    def loss_fn(model, batch, num_items):
        probe.start(batch["attention_mask"], batch["input_ids"] == image_token_id, record=model.training)
        loss, extras = base_loss(model, batch, num_items)
        aux, z = probe.losses()
        share = supervised_tokens(batch) / num_items if num_items else 1.0
        total = loss + share * (cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * z)
        return total, {**extras, "lm_loss": float(loss.detach()) / share if share else 0.0, "aux_loss": float(aux.detach()),
                       "z_loss": float(z.detach())}
    return loss_fn


def prepare_stage_model(cfg: MoEConfig, model, accelerator):
    """The loaded model set up for its stage (also what bench/bench_stages.py times): Liger kernels; for `moe` the
    experts implementation, ZeRO-3 leaf modules and the router probe; the stage's trainable parameters; LoRA on the
    experts when asked. Returns (model, parameter groups, probe or None, LoRA config or None)."""
    accelerator.print(f"liger {apply_liger(model, cfg.liger, zero_stage(accelerator))}")
    probe, lora_config = None, None
    if cfg.stage == "moe":
        accelerator.print(f"experts {moe.set_experts_implementation(model, accelerator.device.type, cfg.experts_implementation)}"
                          f" | ZeRO-3 leaf modules {moe.register_zero3_leaf_modules(model)}")
        probe = moe.RouterProbe(model)
    moe.check_lora_settings(cfg, zero_stage(accelerator), accelerator.device)
    if moe.experts_unfused(cfg):
        accelerator.print(f"experts of {moe.unfuse_experts(model)} MoE blocks unfused into per-expert Linears "
                          f"(LoRA dropout {cfg.moe_lora_dropout}, quantization {cfg.quantization})")
    if cfg.quantization == "nf4":
        accelerator.print(f"nf4: {moe.quantize_nf4(model, accelerator.device)} decoder Linears quantised on "
                          f"{accelerator.device} (double quantisation, bf16 compute); routers, projector, vision tower,"
                          f" embeddings and norms as loaded")
    groups = set_trainable(cfg, model)
    if cfg.stage == "moe":  # everything before the first MoE block is frozen: ZeRO-3's backward needs input grads
        model.enable_input_require_grads()
    if cfg.lora_r > 0 or cfg.moe_lora_r > 0:
        model, lora_config = wrap_lora(cfg, model, groups)
    if cfg.lora_dynamic_rank:  # the loop's before_step draws each step's rank: model.dynamic_rank.set_step
        if lora_config is None:
            raise SystemExit(f"lora_dynamic_rank needs LoRA on the {cfg.stage} stage: set "
                             f"{'moe_lora_r' if cfg.stage == 'moe' else 'lora_r'} > 0")
        enable_dynamic_rank(model, cfg.lora_rank_min, cfg.seed)
    return model, groups, probe, lora_config


# the LLM's projections in the llm stage; the vision tower (CLIP/SigLIP q/k/v/out_proj, fc1/fc2) and projector excluded
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def wrap_lora(cfg: MoEConfig, model, groups: dict):
    """LoRA on the LLM (llm stage) or on the experts (moe stage), with what the stage trains in full (projector,
    routers, attention under train_attention, the tower when unfrozen) kept trainable: get_peft_model freezes every
    non-LoRA parameter. Returns (peft model, LoraConfig for the export): the export's config names those modules in
    `modules_to_save`, so the adapter directory holds them too and the merged model has their trained weights."""
    import copy

    from peft import LoraConfig, get_peft_model

    if moe.experts_unfused(cfg):  # train_attention under nf4: attention is 4-bit, so it trains as LoRA too
        train_config = moe.unfused_expert_lora_config(cfg.moe_lora_r, cfg.moe_lora_alpha, cfg.moe_lora_dropout,
                                                      attention=cfg.quantization == "nf4" and cfg.train_attention)
    elif cfg.stage == "moe":
        train_config = moe.expert_lora_config(model, cfg.moe_lora_r, cfg.moe_lora_alpha)
    else:
        train_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=LLM_LORA_TARGETS)
    full = [p for ps in groups.values() for p in ps]
    full_modules = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad})
    model = get_peft_model(model, train_config)
    for p in full:
        p.requires_grad_(True)
    groups["rest"] += [p for n, p in model.named_parameters() if "lora_" in n]
    export_config = copy.deepcopy(train_config)
    export_config.modules_to_save = full_modules or None
    return model, export_config


# ---------------------------------------------------------------- main

def main(cfg: MoEConfig) -> dict:
    with exit_on_bad_record():
        return run(cfg)


def check_stage_fields(cfg: MoEConfig) -> None:
    defaults = MoEConfig()
    misplaced = [f"{k} (read by the {' and '.join(s)} stage{'s' * (len(s) > 1)})" for k, s in STAGE_FIELDS.items()
                 if cfg.stage not in s and getattr(cfg, k) != getattr(defaults, k)]
    if misplaced:
        raise SystemExit(f"--stage {cfg.stage} does not read {', '.join(misplaced)}: remove it or run that stage")


def run(cfg: MoEConfig) -> dict:
    stage = STAGES[cfg.stage]
    check_stage_fields(cfg)
    if not 0 < cfg.record_fraction <= 1:
        raise SystemExit(f"record_fraction must be in (0, 1] (a share of the records), not {cfg.record_fraction}")
    if not cfg.output_dir:
        raise SystemExit("output_dir is required")
    accelerator = make_accelerator(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    # ---- the starting model, loaded partitioned under ZeRO-3 (after the Accelerator set the config up)
    moe.check_lora_settings(cfg, zero_stage(accelerator), accelerator.device)  # before minutes of loading
    start = starting_model_dir(cfg, accelerator)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    torch.manual_seed(cfg.seed)  # fresh LoRA adapters and dropout masks: the same run gives the same model
    model, processor = vlm.load_vlm(start, accelerator.param_dtype, attn)
    accelerator.print(f"attention {attn}")
    tokenizer = processor.tokenizer
    model, groups, probe, lora_config = prepare_stage_model(cfg, model, accelerator)
    if adapter := continued_adapter(cfg):  # the fresh adapter takes the saved one's weights
        load_adapter_weights(model, adapter, accelerator.print)

    # ---- data: the stage's mix, each record checked (image count, decodability, labels, length)
    tasks = tuple(cfg.tasks) or stage["tasks"]
    if not cfg.train_data:
        raise SystemExit("train_data is required: JSONL record files (captions, VQA, classification, instructions)")
    train_set = index_records(cfg, processor, cfg.train_data, cfg.train_split, tasks, "train", accelerator)
    train_set = repeat_tasks(cfg, train_set, STAGES["llm"]["tasks"], accelerator.print)
    eval_set = index_records(cfg, processor, cfg.eval_data or cfg.train_data, cfg.eval_split, tasks, "held-out",
                             accelerator) or None
    if not train_set:
        raise SystemExit(f"no usable {cfg.train_split} records of tasks {tasks} in {cfg.train_data}")
    pad_id = tokenizer.pad_token_id
    permutation, on_start = None, None
    if cfg.objective == "dpo":
        collate = partial(vlm.collate_vlm_pairs, pad_id=pad_id)
        collate = record_index.ImageCollate(collate, processor, cfg.max_aspect_ratio, cfg.skip_invalid, "train",
                                            accelerator.print)
        # precomputed: the reference is the policy as this run starts (a continued adapter included), which switching
        # the adapter off would not give
        base_loss = dpo.make_dpo_loss(cfg.beta, "precomputed")
        train_set, eval_set = dpo.pairs_read(cfg, train_set, eval_set, accelerator)
        on_start = dpo.reference_on_start([train_set, eval_set or []], collate, cfg.micro_batch_size, cfg.output_dir)
    else:
        collate = record_index.ImageCollate(partial(vlm.collate_vlm, pad_id=pad_id), processor, cfg.max_aspect_ratio,
                                            cfg.skip_invalid, "train", accelerator.print)
        base_loss = causal_lm_loss
        lengths = train_set.column("length").tolist()
        if cfg.group_by_modality:
            permutation = partial(vlm.modality_length_grouped_permutation, lengths,
                                  train_set.column("has_image").tolist(), cfg.micro_batch_size, cfg.seed)
        order = permutation(0) if permutation else random_order(cfg.seed, len(train_set), 0)
        share = vlm.token_share(lengths, order, cfg.micro_batch_size)
        accelerator.print(f"micro-batches of {cfg.micro_batch_size}: {100 * share:.1f}% tokens, not padding "
                          f"(group_by_modality {cfg.group_by_modality}): padding-free packing could win back the rest")
    any_image = train_set.column("has_image").any() or (eval_set is not None and eval_set.column("has_image").any())
    report = collate.report  # the main process's check of each micro-batch decoded by a worker
    if zero_stage(accelerator) == 3 and accelerator.num_processes > 1 and any_image:
        # ZeRO-3 gathers the vision tower's weights in a collective every rank must join, so every micro-batch on
        # every rank runs it: text-only micro-batches get a blind image
        blank = vlm.blank_pixel_values(processor)
        collate = partial(vlm.blind_image_collate, collate, blank, vlm.image_tokens_per_image(processor, blank),
                          model.config.image_token_id, pad_id)
    loss_fn = moe_loss(cfg, probe, model.config.image_token_id, base_loss) if probe else base_loss

    # ---- train, then the export; what the stage trained is logged by the loop ("training N of M parameters")
    accelerator.print(f"stage {cfg.stage}: trains {stage['trains']}{' + vision tower' if cfg.unfreeze_vision_tower else ''}"
                      f" | tasks {tasks} | lr {cfg.learning_rate or stage['learning_rate']:.1e}, projector "
                      f"{cfg.projector_lr or stage['projector_lr']:.1e} | ZeRO stage {zero_stage(accelerator)}")
    reduce_sum = partial(accelerator.reduce, reduction="sum")
    routing = moe.routing_artifacts(probe, reduce_sum, accelerator.print) if probe else None
    result = train(cfg, accelerator, model, processor, train_set, eval_set, collate, loss_fn=loss_fn,
                   param_groups=param_groups(cfg, groups), lora_config=lora_config, seq_len=cfg.max_length,
                   permutation=permutation, on_start=on_start, artifacts=routing,
                   batch_loader=record_index.batch_loader(cfg.num_workers, report,
                                                          pin_memory=accelerator.device.type == "cuda"),
                   before_step=model.dynamic_rank.set_step if cfg.lora_dynamic_rank else None,
                   # QLoRA: the adapter merges onto the unquantised starting model; unfused experts are fused back
                   base_for_merge=str(start) if cfg.quantization == "nf4" else None,
                   export_layout=(moe.unfuse_experts, moe.fuse_experts) if moe.experts_unfused(cfg) else None)

    # ---- held-out category accuracy of the exported model (main process; the others wait)
    if result["final_dir"] and cfg.classify_eval > 0 and accelerator.is_main_process:
        files = [cfg.classify_data] if cfg.classify_data else cfg.eval_data or cfg.train_data
        rows = read_records(cfg, files, cfg.eval_split, ("classify",))
        with unpartitioned():  # main process alone: under ZeRO-3, loading and generate() would wait for all ranks
            acc = classification_accuracy(Path(result["final_dir"]), rows, cfg.classify_eval, accelerator.device,
                                          accelerator.param_dtype)
        accelerator.print(f"held-out classification: {acc['classify_accuracy']:.3f} of {acc['classify_n']} answered "
                          f"exactly (e.g. {acc['examples'][:2]})")
        (Path(cfg.output_dir) / "classification.json").write_text(json.dumps(acc, indent=1) + "\n")
        accelerator.log({k: acc[k] for k in ("classify_accuracy", "classify_n")}, step=result["max_steps"])
        result.update({k: acc[k] for k in ("classify_accuracy", "classify_n")})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(load_config(MoEConfig))
