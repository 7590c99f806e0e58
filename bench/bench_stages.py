"""Every training stage on the project's loop against a plain Hugging Face + PyTorch loop, and ZeRO-2 against ZeRO-3.

CPU (tiny shapes, seconds per stage; keeps the script working):
    python bench/bench_stages.py --shape tiny
One GPU (Qwen2.5-0.5B-shaped decoder, CLIP ViT-L/14-336-shaped tower, seq 2048, random weights, bf16 from zero3.json):
    python bench/bench_stages.py --shape real --micro_batch_sizes '{moe: 4}' --out runs/bench_stages.json
SLURM (one GPU of a node; --shape real-1.5b for the 1.5B decoder):
    srun -N1 --gpus=1 python bench/bench_stages.py --shape real --micro_batch_sizes '{moe: 4}' --out bench_stages.json

For each stage (pretrain, sft, projector, llm, moe) one process runs `semivlm.loop.train` set up as the stage's
script sets it up (full decoder; full decoder on packed SFT rows; projector; projector + LLM; upcycled experts and
routers with the load-balancing loss and `experts_implementation`), and the loop a user writes by hand (fp32 weights,
SDPA, eager experts, the same trainable parameters in fused AdamW on CUDA, bf16 autocast when the ds_config says bf16,
clip, step), on the same model, random data and batch. The two alternate `rounds` times, each after its own warm-up,
and each keeps its best median step, so drift hits both alike. MFU counts active FLOPs (semivlm.model.flops_per_token:
top-k of E experts) plus the vision tower's forward, against the datasheet peak of a known GPU and against a matmul
ceiling measured first. Peak memory: the CUDA allocator's peak of each run; on CPU the process's largest RSS so far.
The loop's final export (after the timed steps) is skipped: at real shapes it would write gigabytes per run.

ZeRO-2 vs ZeRO-3: DeepSpeed's state is one per process, so the script re-runs itself with `--only_ours true` under
`accelerate launch --num_processes 1 --use_deepspeed --deepspeed_config_file ds_configs/zero{2,3}.json` (DeepSpeed
must be installed; `--zero false` skips this). On CPU both run in fp32 over gloo from temporary copies with bf16 off
(ds_configs/ has zero3_fp32.json but no fp32 ZeRO-2 file). The loop's options (attn_implementation, liger,
experts_implementation, gradient_checkpointing, any TrainConfig/MoEConfig field in `loop_options`) change "ours" only,
so they can be A/B-ed against the same plain baseline.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal
from unittest import mock

import torch

# train_moe and train_pretrain are flat top-level scripts, not in an installed package: `python bench/bench_stages.py`
# puts bench/ on sys.path, so the repository root is added to import them (semivlm comes from the editable install)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semivlm import chat, moe, vlm  # noqa: E402
from semivlm.checkpoint import unpartitioned  # noqa: E402
from semivlm.config import load_config  # noqa: E402
from semivlm.loop import (TrainConfig, datasheet_tflops, causal_lm_loss, input_tokens,  # noqa: E402
                          make_accelerator, measure_peak_tflops, model_inputs, peak_memory_gib, train, zero_stage)
from semivlm.model import (apply_liger, build_causal_lm, flops_per_token, numel,  # noqa: E402
                           resolve_attn_implementation)
from semivlm.vlm import unused_vision_parameters  # noqa: E402
from train_moe import MoEConfig, moe_loss, param_groups, prepare_stage_model, set_trainable  # noqa: E402
from train_pretrain import collate_blocks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT_STAGES, VLM_STAGES = ("pretrain", "sft"), ("projector", "llm", "moe")
QWEN = dict(model_type="qwen2", num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
            max_position_embeddings=32768)
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=336, intermediate_size=4096)
SHAPES = {  # decoder, vision tower, default seq_len, default micro-batch
    "tiny": (dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024),
             dict(model_type="clip_vision_model", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=8, image_size=64, intermediate_size=128), 256, 4),
    "real": (dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
             CLIP_L_336, 2048, 8),
    "real-1.5b": (dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
                  CLIP_L_336, 2048, 8),
}


@dataclass
class BenchConfig:
    shape: str = "tiny"  # tiny | real (Qwen2.5-0.5B shape) | real-1.5b
    stages: list[str] = field(default_factory=lambda: list(TEXT_STAGES + VLM_STAGES))
    seq_len: int = 0  # tokens per sample, image tokens included; 0 = the shape's
    micro_batch_size: int = 0  # 0 = the shape's
    micro_batch_sizes: dict = field(default_factory=dict)  # per stage, e.g. {moe: 4}
    steps: int = 8  # timed steps per loop and round
    warmup: int = 3
    rounds: int = 2  # plain and ours alternate this many times
    ds_config: str = ""  # precision and clipping of both loops; "" = zero3.json on CUDA, zero3_fp32.json on CPU
    attn_implementation: str = "auto"  # ours; the plain loop uses SDPA
    liger: Literal["auto", "on", "off"] = "auto"  # ours
    experts_implementation: str = "auto"  # ours; the plain loop uses eager experts
    gradient_checkpointing: bool = False  # ours
    loop_options: dict = field(default_factory=dict)  # more TrainConfig/MoEConfig fields for ours
    num_experts: int = 4
    top_k: int = 2
    find_max_micro_batch: bool = False  # also search the largest micro-batch each loop fits (GPU memory)
    max_micro_batch: int = 256  # where that search stops
    zero: bool = True  # also ours under ZeRO-2 and ZeRO-3, one subprocess each
    zero2_config: str = "ds_configs/zero2.json"
    zero3_config: str = "ds_configs/zero3.json"
    zero_timeout_s: int = 3600
    only_ours: bool = False  # what the ZeRO subprocesses run
    cache_dir: str = ""  # keep the random VLMs here for later runs (the ZeRO subprocesses get the parent's)
    out: str = ""  # JSON file with every figure
    seed: int = 0


def shape_of(cfg: BenchConfig) -> tuple[dict, dict, int]:
    if cfg.shape not in SHAPES:
        raise SystemExit(f"unknown shape '{cfg.shape}'; choose from {sorted(SHAPES)}")
    if unknown := set(cfg.stages) - set(TEXT_STAGES + VLM_STAGES):
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages are {TEXT_STAGES + VLM_STAGES}")
    llm, vision, seq_len, _ = SHAPES[cfg.shape]
    seq_len = cfg.seq_len or seq_len
    return {**llm, "max_position_embeddings": max(seq_len, llm["max_position_embeddings"])}, vision, seq_len


def micro_batch(cfg: BenchConfig, stage: str) -> int:
    return int(cfg.micro_batch_sizes.get(stage, cfg.micro_batch_size or SHAPES[cfg.shape][3]))


def stage_config(cfg: BenchConfig, stage: str, out_dir: Path, ds_config: str):
    """The config "ours" trains with: TrainConfig (text stages) or train_moe's MoEConfig, timing-only settings."""
    kw = dict(output_dir=str(out_dir), max_steps=cfg.warmup + cfg.steps, micro_batch_size=micro_batch(cfg, stage),
              grad_accum=1, eval_every=0, save_every=0, warmup_steps=0, learning_rate=1e-4, ds_config=ds_config,
              seed=cfg.seed, log_every=10**9, attn_implementation=cfg.attn_implementation, liger=cfg.liger,
              gradient_checkpointing=cfg.gradient_checkpointing)
    if stage in VLM_STAGES:
        kw.update(stage=stage, experts_implementation=cfg.experts_implementation, max_length=shape_of(cfg)[2],
                  num_experts=cfg.num_experts, top_k=cfg.top_k)
    if unknown := set(cfg.loop_options) - {f.name for f in dataclasses.fields(MoEConfig)}:
        raise SystemExit(f"loop_options: {sorted(unknown)} are not TrainConfig/MoEConfig fields")
    cls = MoEConfig if stage in VLM_STAGES else TrainConfig  # text stages take the TrainConfig fields only
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**kw, **{k: v for k, v in cfg.loop_options.items() if k in fields}})


# ---------------------------------------------------------------- models and data, all random

def build_vlm_dirs(cfg: BenchConfig, cache: Path) -> dict[str, Path]:
    """Random LLM + locally trained tokenizer -> vlm.build_vlm -> moe.upcycle, each saved once (bf16) and loaded by
    every run as train_moe.py loads its starting model; reused when `cache` already holds them."""
    from data_prep.build_corpus import train_tokenizer

    llm_spec, vision_spec, seq_len = shape_of(cfg)
    cache = cache / f"{cfg.shape}-seq{seq_len}"
    dirs = {"projector": cache / "vlm", "llm": cache / "vlm", "moe": cache / f"moe{cfg.num_experts}top{cfg.top_k}"}
    need = {dirs[s] for s in cfg.stages if s in VLM_STAGES and not (dirs[s] / "config.json").is_file()}
    with unpartitioned():  # whole models on this process, also inside a ZeRO-3 run
        if need and not (dirs["llm"] / "config.json").is_file():
            words = [f"the {w} at {i} nm shows grain {j}" for i in range(40) for j, w in enumerate(("wafer", "via"))]
            tok = train_tokenizer(words, vocab_size=300)
            torch.manual_seed(cfg.seed)
            build_causal_lm("", llm_spec, len(tok), torch.bfloat16).save_pretrained(cache / "lm")
            tok.save_pretrained(cache / "lm")
            model, processor = vlm.build_vlm(vision_spec, str(cache / "lm"), dtype=torch.bfloat16)
            model.save_pretrained(dirs["llm"])
            processor.save_pretrained(dirs["llm"])
        if dirs["moe"] in need:
            dense, processor = vlm.load_vlm(str(dirs["llm"]), torch.bfloat16)
            moe.upcycle(dense, cfg.num_experts, cfg.top_k, 1, seed=cfg.seed).save_pretrained(dirs["moe"])
            processor.save_pretrained(dirs["moe"])
    return dirs


def random_data(cfg: BenchConfig, stage: str, dirs: dict) -> tuple[list[dict], object]:
    """(rows, collate): token blocks (pretrain), packed records with unsupervised prompts (sft), one image and its
    text per sample (VLM stages). Every row is exactly seq_len tokens; four distinct micro-batches, reused."""
    llm_spec, vision_spec, seq_len = shape_of(cfg)
    g, n, vocab = torch.Generator().manual_seed(cfg.seed), micro_batch(cfg, stage) * 4, llm_spec["vocab_size"]
    if stage == "pretrain":
        return [{"input_ids": torch.randint(0, vocab, (seq_len,), generator=g)} for _ in range(n)], collate_blocks
    if stage == "sft":  # records of 1/2, 1/4, 1/8, 1/8 of a row: first-fit packing fills every row exactly
        examples = []
        for _ in range(n):
            quarter, eighth = seq_len // 4, seq_len // 8
            for length in (seq_len - quarter - 2 * eighth, quarter, eighth, eighth):
                ids = torch.randint(0, vocab, (length,), generator=g).tolist()
                examples.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
        return chat.pack_examples(examples, seq_len), partial(chat.collate_chat, pad_id=0)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dirs[stage])
    image_id, n_image, size = config.image_token_id, config.image_seq_length, vision_spec["image_size"]
    if seq_len < n_image + 32:
        raise SystemExit(f"seq_len {seq_len} leaves too little text beside the {n_image} image tokens")
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq_len,), generator=g)
        ids[ids == image_id] = image_id - 1
        ids[2:2 + n_image] = image_id
        labels = ids.clone()
        labels[:2 + n_image + 16] = -100  # the image and the question are not supervised
        rows.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, size, size, generator=g)})
    return rows, partial(vlm.collate_vlm, pad_id=0)


def training_flops_per_token(model, seq_len: int) -> float:
    """flops_per_token (active experts; weight gradients only where trained) plus the vision tower's forward
    (backward too if trained) per image, spread over its sample's seq_len tokens."""
    fpt = flops_per_token(model, seq_len)
    if getattr(model.config, "vision_config", None) is None:
        return fpt
    vc, unused = model.config.vision_config, unused_vision_parameters(model)
    used = [p for name, p in model.named_parameters() if "vision_tower" in name and name not in unused]
    n_tok = (vc.image_size // vc.patch_size) ** 2 + 1
    layers = model.config.vision_feature_layer % (vc.num_hidden_layers + 1)
    forward = 2 * sum(numel(p) for p in used) * n_tok + 4 * layers * vc.hidden_size * n_tok**2
    return fpt + forward * (3 if any(p.requires_grad for p in used) else 1) / seq_len


# ---------------------------------------------------------------- the two loops

def ours(cfg: BenchConfig, stage: str, accelerator, dirs: dict, data, collate, work: Path) -> dict:
    """semivlm.loop.train, set up as the stage's script does it. Per-step tokens/s and FLOPs per token."""
    scfg = stage_config(cfg, stage, Path(tempfile.mkdtemp(dir=work)), accelerator.ds_file)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # stages may differ in micro-batch; an earlier prepare() fixed its own
        mbs = scfg.micro_batch_size
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=1,
                                       train_batch_size=mbs * accelerator.num_processes)
    attn = resolve_attn_implementation(scfg.attn_implementation)
    loss_fn, groups, probe = causal_lm_loss, None, None
    if stage in TEXT_STAGES:  # train_pretrain.py / train_sft.py: full fine-tuning of a model_config decoder
        torch.manual_seed(cfg.seed)
        model = build_causal_lm("", shape_of(cfg)[0], 0, accelerator.param_dtype, attn)
        apply_liger(model, scfg.liger, zero_stage(accelerator))
    else:  # train_moe.run: the starting model, set up for its stage by the script's own function
        model, _ = vlm.load_vlm(str(dirs[stage]), accelerator.param_dtype, attn)
        model, groups, probe, _ = prepare_stage_model(scfg, model, accelerator)
        groups = param_groups(scfg, groups)
        if probe is not None:
            loss_fn = moe_loss(scfg, probe, model.config.image_token_id, causal_lm_loss)
    fpt = training_flops_per_token(model, shape_of(cfg)[2])
    with mock.patch("semivlm.checkpoint.export_final", return_value=None):  # untimed; minutes at real shapes
        history = train(scfg, accelerator, model, None, data, None, collate, loss_fn=loss_fn, param_groups=groups,
                        seq_len=shape_of(cfg)[2])["history"]
    if probe is not None:
        probe.remove()
    shutil.rmtree(scfg.output_dir, ignore_errors=True)
    return {"rates": [h["tokens_per_s"] for h in history if "tokens_per_s" in h][cfg.warmup:], "flops_per_token": fpt}


def plain(cfg: BenchConfig, stage: str, accelerator, dirs: dict, data, collate, work: Path) -> dict:
    """What a user writes by hand around the same Hugging Face model: fp32 weights, SDPA, eager experts, the stage's
    trainable parameters in one AdamW, autocast, HF's loss (+ HF's load-balancing loss), clip, step."""
    device = accelerator.device
    if stage in TEXT_STAGES:
        torch.manual_seed(cfg.seed)
        model = build_causal_lm("", shape_of(cfg)[0], 0, torch.float32, "sdpa")
    else:
        model, _ = vlm.load_vlm(str(dirs[stage]), torch.float32, "sdpa")
        set_trainable(stage_config(cfg, stage, work, accelerator.ds_file), model)
    router_logits, hooks = [], []
    if stage == "moe":
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        moe.set_experts_implementation(model, device.type, "eager")
        text = model.config.text_config
        n_experts = getattr(text, "num_local_experts", None) or text.num_experts
        hooks = [m.gate.register_forward_hook(lambda mod, args, out: router_logits.append(out[0]))
                 for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    fpt = training_flops_per_token(model, shape_of(cfg)[2])
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    micro, rates = micro_batch(cfg, stage), []
    for step in range(cfg.warmup + cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()  # fetching the batch is part of a step, as it is in the project's loop
        batch = collate([data[(step * micro + i) % len(data)] for i in range(micro)])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        router_logits.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=accelerator.mixed_precision == "bf16"):
            loss = model(**model_inputs(batch), use_cache=False).loss
            if hooks:
                loss = loss + text.router_aux_loss_coef * load_balancing_loss_func(
                    tuple(router_logits), n_experts, text.num_experts_per_tok, batch["attention_mask"])
        loss.backward()
        if accelerator.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, accelerator.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= cfg.warmup:
            rates.append(input_tokens(batch) / (time.perf_counter() - t0))
    for h in hooks:
        h.remove()
    return {"rates": rates, "flops_per_token": fpt}


# ---------------------------------------------------------------- measuring, the ZeRO subprocesses, the report

def measure_stage(cfg: BenchConfig, stage: str, accelerator, dirs: dict, loops, peaks: dict, work: Path) -> dict:
    """Per loop, its best round's median step (and the largest peak memory); {"error": ...} when every round ran
    out of GPU memory."""
    data, collate = random_data(cfg, stage, dirs)
    seq_len, runs = shape_of(cfg)[2], {name: [] for name, _ in loops}
    for _ in range(cfg.rounds):
        for name, run in loops:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                result = run(cfg, stage, accelerator, dirs, data, collate, work)
                rate = statistics.median(result["rates"])
                mfu = {k: result["flops_per_token"] * rate / (v * 1e12) if v else None for k, v in peaks.items()}
                samples = rate / seq_len if stage in VLM_STAGES else None
                runs[name].append({"tokens_per_s": rate, "samples_per_s": samples, "mfu_datasheet": mfu["datasheet"],
                                   "mfu_measured": mfu["measured"], "peak_mem_gib": peak_memory_gib(accelerator.device)})
            except torch.cuda.OutOfMemoryError:
                runs[name].append({"error": f"out of memory at micro-batch {micro_batch(cfg, stage)}"})
            accelerator.free_memory()  # drop the prepared model and optimizer (and the DeepSpeed engine)
    best = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        best[name] = {**max(ok, key=lambda r: r["tokens_per_s"]), "peak_mem_gib": max(r["peak_mem_gib"] for r in ok)} \
            if ok else rs[-1]
    if cfg.find_max_micro_batch:
        for name, run in loops:
            best[name]["largest_micro_batch"] = largest_micro_batch(cfg, stage, accelerator, dirs, run, work)
    if "tokens_per_s" in best.get("plain", {}) and "tokens_per_s" in best["ours"]:
        best["ours_over_plain"] = best["ours"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    return best


def largest_micro_batch(cfg: BenchConfig, stage: str, accelerator, dirs: dict, run, work: Path) -> int:
    """The largest micro-batch (up to max_micro_batch) whose steps run without running out of GPU memory: doubling
    from the configured one, then bisecting between the last that fit and the first that did not. 0 = none fit."""
    def fits(mb: int) -> bool:
        trial = dataclasses.replace(cfg, micro_batch_sizes={**cfg.micro_batch_sizes, stage: mb}, warmup=1, steps=1)
        try:
            run(trial, stage, accelerator, dirs, *random_data(trial, stage, dirs), work)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            accelerator.free_memory()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    low, high = 0, micro_batch(cfg, stage)  # low fits (0: nothing known), high is the next to try
    while high <= cfg.max_micro_batch and fits(high):
        low, high = high, 2 * high
    if high > cfg.max_micro_batch:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def find(path: str) -> str:
    """A config path as given when it exists, else relative to the repository (where the subprocesses run)."""
    return str(Path(path).resolve() if Path(path).is_file() else REPO / path)


def fp32_copy(path: str, work: Path) -> str:
    """The DeepSpeed config with bf16 off, for CPU runs (as zero3_fp32.json is to zero3.json)."""
    ds = {**json.loads(Path(path).read_text()), "bf16": {"enabled": False}}
    out = work / f"{Path(path).stem}_fp32.json"
    out.write_text(json.dumps(ds, indent=1))
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_comparison(cfg: BenchConfig, cache: Path, work: Path) -> dict:
    """Ours under ZeRO-2 and under ZeRO-3, each a one-process `accelerate launch --use_deepspeed` of this script."""
    results, cuda = {}, torch.cuda.is_available()
    for name, path in (("zero2", cfg.zero2_config), ("zero3", cfg.zero3_config)):
        path = find(path) if cuda else fp32_copy(find(path), work)
        child = dataclasses.replace(cfg, only_ours=True, zero=False, cache_dir=str(cache), ds_config=path,
                                    out=str(work / f"{name}.json"))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--use_deepspeed", "--deepspeed_config_file", path, "--zero3_init_flag", str(name == "zero3").lower(),
               "--main_process_port", str(free_port()), __file__]
        cmd += [x for k, v in dataclasses.asdict(child).items()
                for x in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
        print(f"\n{name}: {' '.join(cmd[2:16])} ... --only_ours true", flush=True)
        threads = {} if cuda else {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # as many as this process uses
        done = subprocess.run(cmd, cwd=REPO, timeout=cfg.zero_timeout_s, text=True, capture_output=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **threads})
        report = json.loads(Path(child.out).read_text()) if done.returncode == 0 else {}
        if report.get("zero_stage") != int(name[-1]):  # failed, or did not run under that ZeRO stage
            print(f"{name} run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-8000:]}")
            failed = {"error": f"{name} run failed (exit {done.returncode})"}
            report = {"stages": {stage: {"ours": failed} for stage in cfg.stages}}
        results[name] = report["stages"]
    out = {}
    for stage in cfg.stages:
        z = {name: results[name][stage]["ours"] for name in ("zero2", "zero3")}
        out[stage] = {f"{name}_{k}": r.get(k) for name, r in z.items()
                      for k in ("tokens_per_s", "peak_mem_gib", "error")}
        if all("tokens_per_s" in r for r in z.values()):
            out[stage]["zero3_over_zero2"] = z["zero3"]["tokens_per_s"] / z["zero2"]["tokens_per_s"]
    return out


def main(cfg: BenchConfig) -> dict:
    llm_spec, vision_spec, seq_len = shape_of(cfg)
    cuda = torch.cuda.is_available()
    ds_config = find(cfg.ds_config or ("ds_configs/zero3.json" if cuda else "ds_configs/zero3_fp32.json"))
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        cache = Path(cfg.cache_dir) if cfg.cache_dir else work / "models"
        accelerator = make_accelerator(TrainConfig(ds_config=ds_config, micro_batch_size=micro_batch(cfg, "pretrain")))
        dirs = build_vlm_dirs(cfg, cache)
        device = torch.cuda.get_device_name(accelerator.device) if cuda else "cpu"
        sheet = datasheet_tflops(device) if cuda else None
        ceiling = measure_peak_tflops(accelerator.device, torch.bfloat16 if cuda else torch.float32)
        peaks = {"datasheet": sheet, "measured": ceiling}
        report = {"config": dataclasses.asdict(cfg), "device": device, "precision": accelerator.mixed_precision,
                  "zero_stage": zero_stage(accelerator), "ds_config": accelerator.ds_file, "seq_len": seq_len,
                  "peak_tflops": peaks, "stages": {}}
        loops = (("ours", ours),) if cfg.only_ours else (("plain", plain), ("ours", ours))
        if sheet is None:  # the loop's own MFU log would measure the ceiling again in every run
            cfg = dataclasses.replace(cfg, loop_options={"peak_tflops": ceiling, **cfg.loop_options})
        for stage in cfg.stages:
            report["stages"][stage] = measure_stage(cfg, stage, accelerator, dirs, loops, peaks, work)
        if cfg.zero and not cfg.only_ours:
            report["zero"] = zero_comparison(cfg, cache, work)
    print_report(cfg, report, llm_spec, vision_spec)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1) + "\n")
    accelerator.end_training()
    return report


def fmt(x, spec: str) -> str:
    return "-" if x is None else f"{100 * x:.1f}%" if spec == "%" else format(x, spec)


def print_report(cfg: BenchConfig, report: dict, llm: dict, vision: dict) -> None:
    peaks = report["peak_tflops"]
    print(f"\n{cfg.shape}: {llm['model_type']} decoder {llm['hidden_size']}x{llm['num_hidden_layers']}, vision "
          f"{vision['hidden_size']}x{vision['num_hidden_layers']} @ {vision['image_size']}px, seq {report['seq_len']}, "
          f"precision {report['precision']}, ZeRO {report['zero_stage']}, {report['device']}; peak TFLOP/s: datasheet "
          f"{fmt(peaks['datasheet'], 'g')}, measured matmul {peaks['measured']:.3g}")
    print(f"{'stage':<10}{'loop':<7}{'micro':>6}{'tokens/s':>11}{'samples/s':>11}{'MFU sheet':>10}{'MFU meas.':>10}"
          f"{'peak GiB':>9}{'ours/plain':>11}{'max micro':>10}")
    for stage, res in report["stages"].items():
        for name in [k for k in ("plain", "ours") if k in res]:
            r = res[name]
            figures = f"  {r['error']}" if "error" in r else (
                f"{fmt(r['tokens_per_s'], ',.0f'):>11}{fmt(r['samples_per_s'], ',.2f'):>11}"
                f"{fmt(r['mfu_datasheet'], '%'):>10}{fmt(r['mfu_measured'], '%'):>10}{r['peak_mem_gib']:>9.2f}")
            ratio = fmt(res.get("ours_over_plain"), ".2f") + "x" if name == "ours" and "plain" in res else ""
            largest = fmt(r.get("largest_micro_batch"), "d") + ("+" if r.get("largest_micro_batch") ==
                                                                  cfg.max_micro_batch else "")
            print(f"{stage:<10}{name:<7}{micro_batch(cfg, stage):>6}{figures}{ratio:>11}{largest:>10}")
    if "zero" in report:
        print(f"\nours under DeepSpeed, one process each: {cfg.zero2_config} vs {cfg.zero3_config}"
              f"{' (fp32 copies on CPU)' if report['device'] == 'cpu' else ''}")
        print(f"{'stage':<10}{'ZeRO-2 tok/s':>14}{'ZeRO-3 tok/s':>14}{'ZeRO-3/ZeRO-2':>15}{'GiB Z2':>8}{'GiB Z3':>8}")
        for stage, z in report["zero"].items():
            print(f"{stage:<10}{fmt(z['zero2_tokens_per_s'], ',.0f'):>14}{fmt(z['zero3_tokens_per_s'], ',.0f'):>14}"
                  f"{fmt(z.get('zero3_over_zero2'), '.2f') + 'x':>15}{fmt(z['zero2_peak_mem_gib'], '.2f'):>8}"
                  f"{fmt(z['zero3_peak_mem_gib'], '.2f'):>8}  {z['zero2_error'] or z['zero3_error'] or ''}")


if __name__ == "__main__":
    main(load_config(BenchConfig))
