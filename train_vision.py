"""Contrastive (CLIP) training of the vision encoder on your micrograph captions, before MoE-LLaVA stage I.

CPU / single-GPU debug (a tiny random two-tower CLIP; the debug recipe's stand-in for a pretrained encoder):
    python train_vision.py --config launch/configs/debug/vision.yaml
One node, 8 GPUs, DeepSpeed ZeRO-3: domain adaptation of a pretrained CLIP ViT-L/14-336 on your captions, an option
the micrograph_vlm recipe leaves out (it keeps the web-pretrained tower frozen, as MoE-LLaVA does):
    accelerate launch --config_file launch/accelerate/node_8gpu_zero3.yaml train_vision.py \
        --init_from openai/clip-vit-large-patch14-336 --output_dir runs/micrograph_vlm/vision \
        --train_data "[runs/micrograph_vlm/annotations/captions.jsonl]" --ds_config ds_configs/zero3.json \
        --micro_batch_size 32 --max_steps 1000 --learning_rate 1e-5
then `train_moe.py --stage projector --vision_tower runs/micrograph_vlm/vision/final`. On SLURM (checkpoints and
requeues itself before the time limit) the same fields go in a YAML: `sbatch --nodes=2 launch/slurm/train.sbatch
train_vision.py YOUR_VISION.yaml`.

A LLaVA projector can only pass on what the vision tower sees. Real recipes start from a web-pretrained CLIP or SigLIP
(optionally adapted here to micrographs, as domain CLIP models are); the tiny CPU recipe has no pretrained tower, so
this script gives its random one the contrastive pretraining that CLIP got: image i and caption i of a batch are
pulled together, every other pairing in the batch pushed apart (symmetric InfoNCE, negatives from the rank's own
micro-batch). Captions come from the same caption records `train_moe.py --stage projector` reads. Augmentation is
orientation-safe on purpose: captions speak of "horizontal lines" and "a data bar at the bottom", so flips and
rotations would teach the tower to ignore what the captions say.

`objective: classify` trains the same two towers on labelled micrographs instead (classification records, e.g. the
NFFA-Europe SEM categories): each image against the texts of all class names, as CLIP's zero-shot classifier scores
them. Supervision by labels is what ViTs were first pretrained with and teaches a small tower much faster than
captions do; the class texts make the result a zero-shot classifier as well.

The result, `output_dir/final`, is a plain CLIPModel directory (weights, tokenizer, image processor);
train_moe.py's `vision_tower:` takes it and keeps its vision half.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from semivlm import record_index, vlm
from semivlm.chat import SkipRecord, encode_counted, record_error
from semivlm.config import load_config
from semivlm.data import RecordError, exit_on_bad_record, read_jsonl
from semivlm.loop import TrainConfig, make_accelerator, train, zero_stage
from semivlm.model import load_tokenizer


@dataclass
class VisionConfig(TrainConfig):
    init_from: str = ""  # a CLIP directory or hub id to continue from; empty = a random one from model_config + tokenizer
    model_config: dict = field(default_factory=dict)  # {vision_config: {...}, text_config: {...}, projection_dim: N}
    tokenizer: str = ""  # random CLIP only: the tokenizer of its text tower (e.g. the SFT LLM's)
    train_data: list[str] = field(default_factory=list)  # caption records (JSONL, meta.task == "caption")
    eval_data: list[str] = field(default_factory=list)  # empty = the eval_split records of train_data
    train_split: str = "train"
    eval_split: str = "validation"
    objective: Literal["contrastive", "classify"] = "contrastive"  # see the docstring
    max_text_length: int = 192  # caption tokens, eos included; longer captions are cut (counted)
    # jitter: brightness/contrast and shifts of a few pixels; d4: jitter + flips and transposes, only for labels that
    # do not depend on orientation (classify on categories), never for captions that describe it
    augment: Literal["none", "jitter", "d4"] = "jitter"
    max_shift: float = 0.06  # fraction of the image side
    skip_invalid: bool = False
    max_aspect_ratio: float = 5.0
    num_workers: int = 2  # DataLoader processes decoding each micro-batch's images (0: the main process does)
    # preprocessed images kept per process (each worker its own) up to this size: many epochs over a few thousand
    # images then decode each once; beyond it images are decoded every time, so memory stays bounded
    image_cache_mb: float = 256


# ---------------------------------------------------------------- model

def build_clip(cfg: VisionConfig, dtype):
    """(CLIPModel, CLIPProcessor): from init_from, or random from model_config with `tokenizer`'s vocabulary."""
    from transformers import AutoProcessor, CLIPConfig, CLIPModel, CLIPProcessor

    if cfg.init_from:
        try:
            model = CLIPModel.from_pretrained(cfg.init_from, dtype=dtype)
        except (OSError, ValueError) as e:
            raise SystemExit(f"init_from '{cfg.init_from}' is not a two-tower CLIP model: {str(e).splitlines()[0]}") from None
        return model, AutoProcessor.from_pretrained(cfg.init_from)
    if not (cfg.model_config and cfg.tokenizer):
        raise SystemExit("a random CLIP needs model_config ({vision_config: ..., text_config: ...}) and tokenizer "
                         "(a tokenizer directory, e.g. the SFT LLM's); or give init_from, a CLIP directory")
    tok = load_tokenizer(cfg.tokenizer)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise SystemExit(f"tokenizer '{cfg.tokenizer}' needs an eos and a pad token (CLIP pools the eos position)")
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.model_config.items()}
    unknown = set(spec) - {"vision_config", "text_config", "projection_dim", "logit_scale_init_value"}
    if unknown:
        raise SystemExit(f"model_config: unknown keys {sorted(unknown)}")
    text = {**spec.get("text_config", {}), "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id or tok.eos_token_id,
            "max_position_embeddings": cfg.max_text_length}
    config = CLIPConfig(text_config=text, vision_config=spec.get("vision_config", {}),
                        **{k: v for k, v in spec.items() if k not in ("vision_config", "text_config")})
    model = CLIPModel._from_config(config, dtype=dtype)
    mean, std = vlm.DEFAULT_NORM["clip"]
    return model, CLIPProcessor(image_processor=vlm.image_processor("clip", config.vision_config.image_size, mean, std),
                                tokenizer=tok)


# ---------------------------------------------------------------- data

def image_text_pairs(cfg: VisionConfig, processor, files: list[str], split: str, where: str, log) -> list[dict]:
    """{"images": [path], "input_ids", "text"} per record of `split` whose task suits the objective (caption, or
    classify): the image's path, checked from its header only, and the assistant's answer + eos. Pixels are decoded
    per micro-batch (record_index.ImageCollate, in DataLoader workers), so memory does not grow with the images."""
    task = {"contrastive": "caption", "classify": "classify"}[cfg.objective]
    tok = processor.tokenizer
    checked: set = set()  # images whose header was read (several records may share one)
    examples, totals = [], {}

    def encode_one(rec, n):
        rid = str(rec.get("id") or f"#{n}") if isinstance(rec, dict) else f"#{n}"
        images = rec.get("images") if isinstance(rec, dict) else None
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            raise record_error(rid, "needs exactly one image", f"images={images!r}")
        answers = [m for m in rec.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
        content = answers[0].get("content") if answers else None
        text = content if isinstance(content, str) else " ".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
        if not text.strip():
            raise record_error(rid, f"no {task} text", "no assistant turn with text")
        ids = tok(text.strip(), add_special_tokens=False)["input_ids"][:cfg.max_text_length - 1] + [tok.eos_token_id]
        path = str(root / images[0])
        if path not in checked:
            vlm.image_header(path, rid, cfg.max_aspect_ratio)  # missing, not an image, too small or elongated
            checked.add(path)
        return {"id": rid, "images": [path], "input_ids": ids, "text": text.strip()}, len(ids) == cfg.max_text_length

    for path in files:
        root = Path(path).parent
        try:
            records = [r for r in read_jsonl(path, skip_bad=cfg.skip_invalid)
                       if r.get("meta", {}).get("task", "caption") == task
                       and (not split or r.get("meta", {}).get("split", split) == split)]
            out, counts = encode_counted(records, encode_one, cfg.skip_invalid, path)
        except (RecordError, SkipRecord) as e:
            raise SystemExit(f"bad record: {e}") from None
        examples += out
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    log(f"{where}: {len(examples)} image-{task} pairs from {files} | {totals}")
    return examples


def pad_texts(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(token_lists), max(map(len, token_lists))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), 1
    return ids, mask


def collate_pairs(rows: list[dict], pad_id: int, patches: int, classes: list[str] | None = None) -> dict:
    """Images ([1, 3, H, W] each, as ImageCollate decodes them) + their texts; with `classes`, the label index of
    each text instead (the class texts are shared)."""
    ids, mask = pad_texts([r["input_ids"] for r in rows], pad_id)
    batch = {"pixel_values": torch.cat([r["pixel_values"] for r in rows]), "_n_items": len(rows),
             "_n_tokens": (0 if classes else int(mask.sum())) + len(rows) * patches}
    if classes:
        batch["labels"] = torch.tensor([classes.index(r["text"]) for r in rows])
    else:
        batch.update(input_ids=ids, attention_mask=mask)
    return batch


def clip_flops_per_token(model, patches: int, text_tokens: float) -> float:
    """Training FLOPs per token (image patch or caption token): each passes one tower, 6 FLOPs per weight it meets
    (2 forward, 4 backward) plus the attention matmuls of its tower (as model.flops_per_token counts them)."""
    def tower(module, cfg, seq):
        weights = sum(p.numel() for n, p in module.named_parameters() if "embed" not in n and p.ndim >= 2)
        return 6.0 * weights + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq
    vc, tc = model.config.vision_config, model.config.text_config
    image = tower(model.vision_model, vc, patches + 1) + 6.0 * model.visual_projection.weight.numel() / patches
    text = tower(model.text_model, tc, text_tokens) + 6.0 * model.text_projection.weight.numel() / text_tokens
    return (image * patches + text * text_tokens) / (patches + text_tokens)


def jitter(pixels: torch.Tensor, max_shift: float, generator=None) -> torch.Tensor:
    """Per image: contrast ×[0.8, 1.2], brightness ±0.2 (normalised units), and a shift of up to max_shift of the
    side (edge pixels repeated). Nothing that changes what a caption says: no flips, rotations or crops of content."""
    b, _, h, w = pixels.shape
    contrast = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=generator)
    bright = torch.empty(b, 1, 1, 1).uniform_(-0.2, 0.2, generator=generator)
    out = pixels * contrast.to(pixels) + bright.to(pixels)
    pad = max(1, int(round(max_shift * max(h, w))))
    padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def d4(pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """Per image, one of the 8 symmetries of the square (flips and transposes)."""
    flips = torch.rand(3, len(pixels), generator=generator) < 0.5
    out = torch.where(flips[0, :, None, None, None].to(pixels.device), pixels.flip(-1), pixels)
    out = torch.where(flips[1, :, None, None, None].to(pixels.device), out.flip(-2), out)
    return torch.where(flips[2, :, None, None, None].to(pixels.device), out.transpose(-1, -2), out)


def vision_loss(cfg: VisionConfig, class_ids: torch.Tensor | None = None, class_mask: torch.Tensor | None = None):
    """Summed over the micro-batch's images (the loop divides by the step's images). contrastive: symmetric InfoNCE
    between images and their captions, extras image→caption retrieval accuracy within the micro-batch; classify:
    cross-entropy of each image against every class text, extras accuracy."""
    def loss_fn(model, batch, num_items):
        pixels = batch["pixel_values"]
        if model.training and cfg.augment in ("jitter", "d4"):
            pixels = jitter(d4(pixels) if cfg.augment == "d4" else pixels, cfg.max_shift)
        if class_ids is not None:
            out = model(input_ids=class_ids.to(pixels.device), attention_mask=class_mask.to(pixels.device),
                        pixel_values=pixels)
            logits, target = out.logits_per_image.float(), batch["labels"]
            loss = F.cross_entropy(logits, target, reduction="sum")
            return loss / num_items, {"accuracy": float((logits.argmax(1) == target).float().mean())}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels)
        logits = out.logits_per_image.float()
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")) / 2
        return loss / num_items, {"retrieval_acc": float((logits.argmax(1) == target).float().mean())}
    return loss_fn


# ---------------------------------------------------------------- main

def main(cfg: VisionConfig) -> dict:
    with exit_on_bad_record():  # an image that fails to decode at train time: one line naming file and record
        return run(cfg)


def run(cfg: VisionConfig) -> dict:
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    model, processor = build_clip(cfg, accelerator.param_dtype)
    if not cfg.train_data:
        raise SystemExit("train_data is required: caption record files (JSONL)")
    train_set = image_text_pairs(cfg, processor, cfg.train_data, cfg.train_split, "train", accelerator.print)
    eval_set = image_text_pairs(cfg, processor, cfg.eval_data or cfg.train_data, cfg.eval_split, "held-out",
                                accelerator.print) or None
    classes, class_ids, class_mask = None, None, None
    if cfg.objective == "classify":
        first = {}
        for e in train_set:
            first.setdefault(e["text"], e["input_ids"])
        classes = sorted(first)
        if len(classes) < 2:
            raise SystemExit(f"objective classify needs at least two classes in {cfg.train_data}; found {classes}")
        if unseen := next((e for e in eval_set or [] if e["text"] not in first), None):
            raise SystemExit(f"held-out record {unseen['id']!r}: class {unseen['text']!r} is not among the "
                             f"{len(classes)} train classes {classes}")
        class_ids, class_mask = pad_texts([first[c] for c in classes], processor.tokenizer.pad_token_id)
        accelerator.print(f"{len(classes)} classes: {classes}")
    if len(train_set) < cfg.micro_batch_size or (cfg.micro_batch_size < 2 and not classes):
        raise SystemExit(f"contrastive training needs micro batches of ≥ 2 pairs and at least one full batch: "
                         f"{len(train_set)} train pairs, micro_batch_size {cfg.micro_batch_size}")
    vocab = model.config.text_config.vocab_size
    if (top := max(max(e["input_ids"]) for e in train_set)) >= vocab:
        raise SystemExit(f"caption token id {top} is outside the text tower's vocabulary of {vocab}: init_from and "
                         "its tokenizer do not match")
    accelerator.print(f"CLIP: vision {model.config.vision_config.num_hidden_layers} layers × "
                      f"{model.config.vision_config.hidden_size} at {model.config.vision_config.image_size} px | text "
                      f"{model.config.text_config.num_hidden_layers} layers × {model.config.text_config.hidden_size} | "
                      f"augment {cfg.augment} | ZeRO stage {zero_stage(accelerator)}")
    vc = model.config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    text_tokens = sum(len(e["input_ids"]) for e in train_set) / len(train_set)
    # images decoded per micro-batch: in DataLoader workers for training, in the main process for held-out batches;
    # one that does not decode is named in one line, or under skip_invalid replaced by a blank image and counted
    collate = record_index.ImageCollate(
        partial(collate_pairs, pad_id=processor.tokenizer.pad_token_id, patches=patches, classes=classes), processor,
        cfg.max_aspect_ratio, cfg.skip_invalid, "train", accelerator.print, cfg.image_cache_mb)
    result = train(cfg, accelerator, model, processor, train_set, eval_set, collate,
                   loss_fn=vision_loss(cfg, class_ids, class_mask), seq_len=cfg.max_text_length,
                   train_flops_per_token=clip_flops_per_token(model, patches, text_tokens),
                   batch_loader=record_index.batch_loader(cfg.num_workers, collate.report,
                                                          pin_memory=accelerator.device.type == "cuda"))
    metric = "eval_accuracy" if classes else "eval_retrieval_acc"
    evals = [h for h in result["history"] if metric in h]
    if len(evals) >= 2:
        what = "classification accuracy" if classes else f"image→caption retrieval within batches of {cfg.micro_batch_size}"
        accelerator.print(f"held-out {what}: {evals[0][metric]:.3f} -> {evals[-1][metric]:.3f}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(load_config(VisionConfig))
