"""GPTQ W4A16 export (llm-compressor) of a text LLM or a (MoE) VLM, in the compressed-tensors format vLLM serves.

CPU / single-GPU debug (the debug recipe's MoE VLM; its FFN width 352 needs groups of 32):
    python export_gptq.py --model runs/demo/moe/final --output_dir runs/demo/gptq --group_size 32 \
        --calibration "[runs/demo/annotations/captions.jsonl,runs/demo/instructions/instructions.jsonl]" \
        --eval_data runs/demo/annotations/classify.jsonl
One GPU (GPTQ runs layer by layer on one device; the rest of the node idles):
    accelerate launch --num_processes 1 export_gptq.py --config launch/configs/micrograph_vlm/gptq.yaml
SLURM:
    sbatch --nodes=1 launch/slurm/train.sbatch export_gptq.py launch/configs/micrograph_vlm/gptq.yaml

Steps: a LoRA adapter directory is merged onto its base first; the model is calibrated on records drawn from the
training data (images and text for a VLM) and quantised to 4-bit weights in groups (16-bit activations) by GPTQ;
the vision tower, the projector, MoE routers and lm_head stay unquantised. MoE experts are calibrated on every
calibration token (llm-compressor's all-experts calibration), since an expert that sees no tokens gets broken scales;
the export then checks every expert's scales (finite, positive, not all equal). The result is written atomically in
the architecture's own checkpoint layout (a Mixtral's experts as block_sparse_moe.experts.<e>.w1/w3/w2, as vLLM and
transformers read them; the ignore list under both checkpoint and transformers-5 module names), reloaded with plain
transformers (every tensor must find its weight), made to generate, and compared with the unquantised model: size on
disk and the held-out metric (class top-1 by likelihood for classification records, answer perplexity for the others).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from semivlm import evaluation as ev
from semivlm import vlm
from semivlm.chat import encode_records
from semivlm.config import load_config

# modules GPTQ leaves alone: the vision side, the routers (a 4-bit router changes which experts a token meets), lm_head
IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*mlp\\.gate$",
          "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$"]


@dataclass
class ExportConfig:
    model: str = ""  # a saved model directory (LLM or VLM), or a PEFT LoRA adapter directory (merged onto its base)
    output_dir: str = ""
    calibration: list[str] = field(default_factory=list)  # JSONL record files from the training data
    calibration_split: str = "train"
    num_calibration_samples: int = 256
    max_length: int = 512  # tokens per calibration sample (image tokens included)
    group_size: int = 128  # W4A16 groups along each weight's input dimension; must divide every quantised width
    dampening_frac: float = 0.01
    eval_data: list[str] = field(default_factory=list)  # held-out records for the before/after metric (empty = skip)
    eval_split: str = "test"
    eval_limit: int = 100
    seed: int = 0
    # with an adapter `model`: merge only its leading `rank` components (0 = as trained), e.g. one rank of a
    # lora_dynamic_rank run; the adapter is truncated to rank r' (PEFT then scales it alpha/r', as it was trained)
    rank: int = 0


# ---------------------------------------------------------------- model

def load_merged(path: str, rank: int = 0):
    """(model, processor or tokenizer, is_vlm, directory of the unquantised weights). A LoRA adapter directory is merged onto the base
    its adapter_config.json names, so the quantised model serves without PEFT."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        if rank:
            raise SystemExit(f"rank {rank} needs model to be a LoRA adapter directory; '{path}' has no adapter_config.json")
        model, processor, is_vlm = ev.load_model(path)
        return model, processor, is_vlm, path, path
    from semivlm.model import adapter_base, merge_adapter

    base = adapter_base(path)
    model, processor, is_vlm = ev.load_model(base)
    model = merge_adapter(model, path, rank)
    return model, processor, is_vlm, f"{base} + LoRA {path}{f' at rank {rank}' if rank else ''} (merged)", base


def check_group_size(model, group_size: int) -> None:
    """Every Linear GPTQ will quantise must split into whole groups; name the first misfits and a size that fits."""
    import math
    import re

    bad = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not any(
                re.match(p[3:], name) if p.startswith("re:") else name.endswith(p) for p in IGNORE):
            if m.in_features % group_size:
                bad[name] = m.in_features
    fused = [(n, p.shape[-1]) for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3]
    bad.update({n: w for n, w in fused if "down_proj" in n and w % group_size})  # fused experts: (E, H, I)
    if bad:
        widths = sorted(set(bad.values()))
        fit = max(g for g in (128, 64, 32, 16, 8) if all(w % g == 0 for w in widths)) if all(w % 8 == 0 for w in widths) \
            else math.gcd(*widths)
        raise SystemExit(f"group_size {group_size} does not divide the input width of {len(bad)} layer(s), e.g. "
                         f"{list(bad.items())[:3]}: use --group_size {fit} (largest size that fits all of {widths})")


# ---------------------------------------------------------------- calibration

def calibration_set(cfg: ExportConfig, processor, is_vlm: bool) -> list[dict]:
    """Up to num_calibration_samples encoded records from the training data, images and text mixed for a VLM."""
    rows = ev.read_records(cfg.calibration, cfg.calibration_split)
    if is_vlm:
        by_root: dict = {}
        for r, root in rows:
            by_root.setdefault(root, []).append(r)
        examples, counts = [], {}
        for root, recs in by_root.items():
            out, c = vlm.encode_vlm_records(processor, recs, root, cfg.max_length, "truncate", True, str(root))
            examples += out
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
    else:
        examples, counts = encode_records(processor, [r for r, _ in rows if not r.get("images")], cfg.max_length,
                                          "truncate", True, "calibration")
    if not examples:
        raise SystemExit(f"calibration {cfg.calibration}: no usable records of split '{cfg.calibration_split}' "
                         f"({len(rows)} read; {counts})")
    random.Random(cfg.seed).shuffle(examples)
    chosen = examples[:cfg.num_calibration_samples]
    n_img = sum(bool(e.get("has_image")) for e in chosen)
    print(f"calibration: {len(chosen)} samples ({n_img} with images, {sum(len(e['input_ids']) for e in chosen):,} "
          f"tokens) from {len(examples)} usable | {counts}", flush=True)
    return chosen


def calibration_dataset(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": e["input_ids"], "pixel_values": e["pixel_values"].tolist()
                               if e.get("pixel_values") is not None else None} for e in examples])


def collate_one(rows: list[dict]) -> dict:
    row = rows[0]  # llm-compressor calibrates with batch size 1
    ids = torch.tensor([row["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if row.get("pixel_values") is not None:
        batch["pixel_values"] = torch.tensor(row["pixel_values"])
    return batch


def expert_scale_report(model) -> dict:
    """Per quantised expert Linear: its scales must be finite and positive and not all equal (a constant scale is
    what an expert that saw no calibration token ends up with)."""
    report, bad = {}, []
    for name, m in model.named_modules():
        scale = getattr(m, "weight_scale", None)
        if scale is None or ".experts." not in name:
            continue
        s = scale.detach().float()
        ok = bool(torch.isfinite(s).all() and (s > 0).all() and s.numel() > 1 and s.std() > 0)
        report[name] = {"min": float(s.min()), "max": float(s.max()), "ok": ok}
        if not ok:
            bad.append(name)
    if bad:
        raise SystemExit(f"GPTQ left degenerate scales in {len(bad)} expert layer(s), e.g. {bad[:3]}: give more or more "
                         "varied calibration records")
    return report


# ---------------------------------------------------------------- checkpoint names

def name_experts_as_checkpoint(model) -> dict[str, str]:
    """Make save_pretrained write llm-compressor's per-expert Linears under the architecture's checkpoint names.

    transformers 5 holds MoE experts fused (experts.gate_up_proj (E, 2I, H), experts.down_proj (E, H, I)) and converts
    per-expert checkpoint tensors on load: Mixtral's `block_sparse_moe.experts.<e>.w1/w3/w2`, Qwen-MoE's
    `mlp.experts.<e>.gate_proj/up_proj/down_proj`. llm-compressor calibrates and quantises the experts as one Linear per
    expert projection named gate_proj/up_proj/down_proj; saving reverts only the renamings of the load conversion (its
    fused-expert converters no longer match), so a Mixtral export came out as `experts.<e>.gate_proj.weight_packed`,
    a name neither transformers' Mixtral loader nor vLLM's (`experts.<e>.w1`) reads: the experts were silently left
    uninitialised on reload. Each fused-expert converter of the model's conversion list is replaced here by per-expert
    renamings with the same scope, taken from its own source patterns, so the export has the layout of an unquantised
    checkpoint of the architecture, which transformers (dequantising each expert, then fusing) and vLLM both load.
    Returns {linearised name: checkpoint name} of the parts renamed (empty for a dense model or Qwen-MoE names)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built in memory, not loaded: the mapping save_pretrained would use
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    out, renamed = [], {}
    for conv in conversions:
        targets = conv._original_target_patterns
        fused = isinstance(conv, WeightConverter) and len(targets) == 1 and \
            re.search(r"experts\.(gate_up_proj|up_proj|down_proj)$", targets[0])
        if not fused:
            out.append(conv)
            continue
        parts = ["gate_proj", "up_proj"] if fused[1] == "gate_up_proj" else [fused[1]]
        sources = conv._original_source_patterns
        if len(sources) != len(parts):
            raise SystemExit(f"export: unexpected fused-expert conversion {sources} -> {targets}: cannot name the "
                             "quantised experts as the checkpoint format does")
        for src, part in zip(sources, parts):
            m = re.fullmatch(r"(.*)\.experts\.\*\.(\w+)\.weight", src)
            if not m:
                raise SystemExit(f"export: unexpected fused-expert source pattern {src!r}")
            lead, ckpt = m[1], m[2]
            rename = WeightRenaming(source_patterns=re.escape(lead) + rf"\.experts\.(\d+)\.{ckpt}\.",
                                    target_patterns=lead + rf".experts.\1.{part}.")
            rename.scope_prefix, rename.base_model_prefix = conv.scope_prefix, conv.base_model_prefix
            out.append(rename)
            if ckpt != part:
                renamed[part] = ckpt
    model._weight_conversions = out  # what save_pretrained and compressed-tensors' ignore-name mapping revert
    return renamed


def unquantised_linears(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is None]


def finish_config(directory: Path, module_names: list[str]) -> list[str]:
    """Fix up the written config.json; returns its ignore list.

    compressed-tensors writes the ignore list in checkpoint names (`vision_tower.encoder…`, `language_model.model.…`),
    which vLLM matches; transformers 5 matches it against its own module names (`model.vision_tower.encoder…`,
    `model.language_model.…`) and so wrapped the unquantised vision tower and projector as 4-bit layers with nothing
    to load into them ("tensor column shape must be divisible by the given group_size" at the first forward). The list is
    written with both spellings of every unquantised Linear plus this script's patterns, which match either. And vLLM
    builds a Llava's language model from text_config.architectures (it fills that in for Mistral only), which
    llm-compressor's rewrite of config.json from the source model's leaves out when the source had none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = directory / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    patterns = [p for p in IGNORE if p.startswith("re:")]
    qc["ignore"] = list(dict.fromkeys(qc.get("ignore", []) + module_names + patterns))
    text = config.get("text_config")
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.get("model_type")) if isinstance(text, dict) else None
    if causal_lm and not text.get("architectures"):
        text["architectures"] = [causal_lm]
    path.write_text(json.dumps(config, indent=2) + "\n")
    return qc["ignore"]


# ---------------------------------------------------------------- held-out metric

def held_out_metric(model, processor, is_vlm: bool, rows) -> dict:
    classify = [x for x in rows if x[0].get("meta", {}).get("task") == "classify"]
    if classify:
        classes = sorted({ev.reference(r) for r, _ in classify})
        scores = ev.option_scores(model, processor, is_vlm, classify, classes)
        hits = [classes[int(s.argmax())] == ev.reference(r) for s, (r, _) in zip(scores, classify)]
        return {"metric": "classification top-1", "value": sum(hits) / len(hits), "n": len(hits)}
    m = ev.answer_perplexity(model, processor, is_vlm, rows)
    return {"metric": "answer perplexity", "value": m["perplexity"], "n": m["tokens"]}


def main(cfg: ExportConfig) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    if not (cfg.model and cfg.output_dir and cfg.calibration):
        raise SystemExit("model, output_dir and calibration are required")
    torch.manual_seed(cfg.seed)
    out, tmp = Path(cfg.output_dir), Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".tmp")

    # ---- model (LoRA merged), calibration data, held-out records
    model, processor, is_vlm, source, weights_dir = load_merged(cfg.model, cfg.rank)
    check_group_size(model, cfg.group_size)
    examples = calibration_set(cfg, processor, is_vlm)
    eval_rows = ev.read_records(cfg.eval_data, cfg.eval_split)[:cfg.eval_limit] if cfg.eval_data else []
    before = held_out_metric(model, processor, is_vlm, eval_rows) if eval_rows else None

    # ---- GPTQ: 4-bit weights in groups, 16-bit activations
    t0 = time.perf_counter()
    recipe = GPTQModifier(targets="Linear", ignore=IGNORE, dampening_frac=cfg.dampening_frac,
                          config_groups={"group_0": {"targets": ["Linear"], "weights": {
                              "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                              "group_size": cfg.group_size}}})
    oneshot(model=model, dataset=calibration_dataset(examples), recipe=recipe, num_calibration_samples=len(examples),
            data_collator=collate_one, max_seq_length=cfg.max_length, moe_calibrate_all_experts=True,
            shuffle_calibration_samples=False)
    gptq_s = time.perf_counter() - t0
    experts = expert_scale_report(model)

    # ---- write atomically (experts and ignore list named for transformers and vLLM alike), reload, generate
    shutil.rmtree(tmp, ignore_errors=True)
    expert_names = name_experts_as_checkpoint(model)
    unquantised = unquantised_linears(model)
    model.save_pretrained(tmp, save_compressed=True)
    ignore = finish_config(tmp, unquantised)
    processor.save_pretrained(tmp)
    if (Path(cfg.model) / "generation_config.json").is_file():
        shutil.copy(Path(cfg.model) / "generation_config.json", tmp / "generation_config.json")
    del model
    try:
        reloaded, processor, _ = ev.load_model(str(tmp), strict=True)  # every tensor must find its weight
    except Exception as e:  # never publish an export that transformers cannot load
        raise SystemExit(f"the quantised model in {tmp} does not reload with transformers "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); {out} was left as it was") from None
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    sample = examples[0]
    prompt_rows = ev.read_records(cfg.eval_data or cfg.calibration, cfg.eval_split if cfg.eval_data else
                                  cfg.calibration_split)[:1]
    answer = ev.generate(reloaded, processor, is_vlm, prompt_rows, max_new_tokens=16)[0] if prompt_rows else ""
    after = held_out_metric(reloaded, processor, is_vlm, eval_rows) if eval_rows else None

    # ---- report
    report = {"source": source, "output": str(out), "scheme": f"W4A16 int4 symmetric, group {cfg.group_size}",
              "ignored": IGNORE, "ignore_entries": len(ignore), "expert_checkpoint_names": expert_names,
              "calibration_samples": len(examples), "calibration_tokens_first": len(sample["input_ids"]),
              "gptq_seconds": round(gptq_s, 1), "size_mb_source": ev.disk_size(weights_dir) / 2**20,
              "size_mb_quantised": ev.disk_size(out) / 2**20, "experts_checked": len(experts),
              "reloaded_answer": answer, "before": before, "after": after, "config": asdict(cfg)}
    ev.save_json(out / "export_report.json", report)
    ev.save_json(out / "expert_scales.json", experts)
    print(f"GPTQ W4A16 (group {cfg.group_size}) of {source} in {gptq_s:.0f}s -> {out} | "
          f"{report['size_mb_source']:.1f} MB -> {report['size_mb_quantised']:.1f} MB | {len(experts)} expert layers "
          f"with sound scales | reloaded answer: {answer!r}")
    if before and after:
        print(f"{before['metric']} on {before['n']} held-out: {before['value']:.4g} -> {after['value']:.4g} "
              f"({after['value'] - before['value']:+.4g})")
    return report


if __name__ == "__main__":
    main(load_config(ExportConfig))
