"""Full experts vs LoRA experts vs QLoRA (nf4) in the moe stage, at the debug recipe's moe-stage shapes, in one run.

    python bench/bench_peft_moe.py --out runs/bench_peft_moe.json              # defaults: the debug recipe's paths
    python bench/bench_peft_moe.py --out x.json --steps 60 --variants "[full,qlora]"

Each variant is `train_moe.main` on the same starting model, data, seed, steps and learning rate as
launch/configs/debug/moe.yaml (4 experts, top-2, micro-batch 16, max_length 256, classify ×8, fp32 on CPU), run in
its own child process so that each peak RSS is its own; the children run one after the other. The starting model is
runs/demo/llm/final when the debug recipe has written it (a trained llm stage: class accuracy means something);
otherwise the debug chat LLM (runs/demo/sft/final) with the projector stage's tiny random tower (launch/configs/debug/
projector.yaml), which makes the held-out loss the comparable figure and class accuracy near zero for all.

Reported per variant:
- trainable parameters;
- weight, gradient and optimizer bytes, counted from the parameters as the run holds them after its set-up:
  weights = every parameter's storage (fp32 here; nf4 = 4-bit packed uint8 + the absmax/double-quantisation state,
  semivlm.moe.parameter_bytes), gradients = trainable elements × their element size, optimizer = AdamW's 2 fp32
  states per trainable element (8 bytes);
- peak RSS of the child process (ru_maxrss), tokens/s (median over the steps after the first two), held-out loss at
  the last step, held-out class accuracy of the export (greedy answers matched exactly);
- and the ratio QLoRA / full of weight + optimizer bytes (issue 20's target: <= 0.4).
Caption METEOR is left out: pycocoevalcap's METEOR needs Java, and the held-out loss covers the captions.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file (python bench/…): train_moe.py and semivlm/ live at the root

# name -> MoEConfig overrides. The seed's QLoRA setting (MoE-LLaVA for InfographicsVQA): r 8, alpha 16, dropout 0.05.
LORA = {"moe_lora_r": 8, "moe_lora_alpha": 16, "moe_lora_dropout": 0.05}
VARIANTS = {
    "full": {},
    "lora": LORA,
    "qlora": {**LORA, "quantization": "nf4"},
    # dynamic rank (issue 20 point 3): one adapter trained at r' ~ U[4, 8] per step; its held-out loss is measured at
    # r and, in the row "dynamic_rank r/2", at r/2 (model.DynamicRank.set_eval_rank, what evaluate.py's `rank` gives)
    "dynamic_rank": {**LORA, "lora_dynamic_rank": True, "lora_rank_min": 4},
}


def debug_inputs() -> dict:
    """The debug recipe's moe-stage inputs (launch/configs/debug/moe.yaml)."""
    demo = REPO / "runs/demo"
    return {"llm": demo / "llm/final", "sft": demo / "sft/final",
            "train_data": [demo / "annotations/captions.jsonl", demo / "annotations/vqa.jsonl",
                           demo / "annotations/classify.jsonl", demo / "instructions/instructions.jsonl"]}


def starting_vlm(root: Path) -> tuple[Path, str]:
    """(dense VLM directory, what it is): the debug llm stage's export, else built once from the debug chat LLM and
    the projector stage's random tower."""
    inputs = debug_inputs()
    if (inputs["llm"] / "config.json").is_file():
        return inputs["llm"], "runs/demo/llm/final (debug recipe's llm stage)"
    built = root / "dense_vlm"
    if not (built / "config.json").is_file():
        import yaml

        from semivlm import vlm

        projector = yaml.safe_load((REPO / "launch/configs/debug/projector.yaml").read_text())
        model, processor = vlm.build_vlm(projector["vision_config"], str(inputs["sft"]),
                                         feature_layer=projector["vision_feature_layer"],
                                         feature_strategy=projector["vision_feature_select_strategy"])
        model.save_pretrained(built)
        processor.save_pretrained(built)
    return built, "runs/demo/sft/final + random tiny CLIP of debug/projector.yaml (no trained llm stage found)"


def child(args) -> None:
    """One variant: train_moe.main with the parameter counts taken right after the stage's set-up."""
    import torch

    import train_moe
    from semivlm import moe
    from semivlm.config import load_config

    counts = {}
    setup = train_moe.prepare_stage_model

    def counting(cfg, model, accelerator):
        out = setup(cfg, model, accelerator)
        trainable = [p for p in out[0].parameters() if p.requires_grad]
        counts.update(trainable_params=sum(p.numel() for p in trainable),
                      total_params=sum(p.numel() for p in out[0].parameters()),
                      weight_bytes=moe.parameter_bytes(out[0]),
                      grad_bytes=sum(p.numel() * p.element_size() for p in trainable),
                      optimizer_bytes=8 * sum(p.numel() for p in trainable))  # AdamW: exp_avg, exp_avg_sq in fp32
        return out

    train_moe.prepare_stage_model = counting
    if VARIANTS[args.child].get("lora_dynamic_rank"):  # the trained adapter's held-out loss at r/2 as well
        from semivlm import loop

        def train_then_half_rank(cfg, accelerator, model, tokenizer, train_set, eval_set, collate, **kwargs):
            result = loop.train(cfg, accelerator, model, tokenizer, train_set, eval_set, collate, **kwargs)
            if eval_set is None:
                return result
            model.dynamic_rank.set_eval_rank(model.dynamic_rank.r // 2)
            counts["eval_loss_half_rank"] = loop.evaluate(model, accelerator, eval_set, collate, cfg,
                                                          kwargs["loss_fn"])["eval_loss"]
            model.dynamic_rank.set_eval_rank(None)
            return result

        train_moe.train = train_then_half_rank
    start = Path(args.start)
    inputs = debug_inputs()
    values = {"output_dir": Path(args.root) / args.child, "stage": "moe", "init_from": start,
              "train_data": json.dumps([str(p) for p in inputs["train_data"]]), "max_length": 256,
              "num_experts": 4, "top_k": 2, "router_aux_loss_coef": 0.01, "task_repeats": json.dumps({"classify": 8}),
              "micro_batch_size": 16, "grad_accum": 1, "max_steps": args.steps, "learning_rate": args.learning_rate,
              "warmup_steps": 2, "min_lr_ratio": 0.1, "weight_decay": 0.0, "eval_every": 0,
              "eval_batches": args.eval_batches, "save_every": 0, "log_every": 5, "seed": 0,
              "ds_config": REPO / "ds_configs/zero3_fp32.json", "classify_eval": args.classify_eval,
              "index_dir": Path(args.root) / "record_index", **VARIANTS[args.child]}
    cfg = load_config(train_moe.MoEConfig, [x for k, v in values.items() for x in (f"--{k}", str(v))])
    t0 = time.perf_counter()
    result = train_moe.main(cfg)
    steps = [h for h in result["history"] if "tokens_per_s" in h]
    evals = [h for h in result["history"] if "eval_loss" in h]
    out = {**counts, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steps[2:] or steps),
           "train_loss_last": steps[-1]["loss"], "eval_loss": evals[-1]["eval_loss"] if evals else None,
           "classify_accuracy": result.get("classify_accuracy"), "classify_n": result.get("classify_n"),
           "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "overrides": VARIANTS[args.child]}
    Path(args.child_out).write_text(json.dumps(out, indent=1) + "\n")


def table(results: dict) -> str:
    rows = ["| variant | trainable params | weights MiB | grads MiB | AdamW MiB | weights+AdamW vs full | peak RSS MiB "
            "| tokens/s | held-out loss | class acc (n) |", "|---" * 10 + "|"]
    full = results.get("full")
    for name, r in results.items():
        wo = r["weight_bytes"] + r["optimizer_bytes"]
        ratio = f"{wo / (full['weight_bytes'] + full['optimizer_bytes']):.3f}" if full else "-"
        mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        acc = f"{r['classify_accuracy']:.3f} ({r['classify_n']})" if r["classify_accuracy"] is not None else "-"
        rows.append(f"| {name} | {r['trainable_params']:,} | {mib(r['weight_bytes'])} | {mib(r['grad_bytes'])} | "
                    f"{mib(r['optimizer_bytes'])} | {ratio} | {r['peak_rss_mib']:.0f} | {r['tokens_per_s']:,.0f} | "
                    f"{loss} | {acc} |")
    return "\n".join(rows)


@dataclass
class BenchConfig:
    out: str = ""  # JSON file for the results (required)
    root: str = str(REPO / "runs/bench_peft_moe")  # scratch directory of the runs
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = 30
    learning_rate: float = 1e-3  # debug/moe.yaml's, for every variant
    eval_batches: int = 8
    classify_eval: int = 50
    child: str = ""  # set by the parent: the variant this child process runs ...
    child_out: str = ""  # ... the JSON it writes ...
    start: str = ""  # ... and the dense VLM it starts from


def main(args: BenchConfig) -> None:
    if args.child:
        return child(args)
    if not args.out:
        raise SystemExit("--out is required: the JSON file for the results")
    names = list(args.variants)
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    if missing := [str(p) for p in debug_inputs()["train_data"] if not p.is_file()]:
        raise SystemExit(f"missing debug recipe data {missing}: run the debug recipe's data stages first (make demo)")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    start, start_what = starting_vlm(root)
    results = {}
    for name in names:
        child_out = root / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", name, "--child_out", str(child_out), "--start", str(start),
               "--root", str(root), "--steps", str(args.steps), "--learning_rate", str(args.learning_rate),
               "--eval_batches", str(args.eval_batches), "--classify_eval", str(args.classify_eval)]
        log = root / f"{name}.log"
        with log.open("w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"variant {name} failed: see {log}")
        results[name] = json.loads(child_out.read_text())
        if "eval_loss_half_rank" in results[name]:  # same run, its adapter cut to r/2 (class accuracy not measured)
            results[f"{name} r/2"] = {**results[name], "eval_loss": results[name]["eval_loss_half_rank"],
                                      "classify_accuracy": None}
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'overrides'})}", flush=True)
    summary = {"start": start_what, "steps": args.steps, "learning_rate": args.learning_rate,
               "shapes": "debug recipe moe stage: 4 experts top-2, micro-batch 16, max_length 256, fp32, CPU",
               "bytes": "weights as held (fp32; nf4 packed + quant state), grads = trainable x element size, "
                        "AdamW = 8 bytes per trainable element", "variants": results}
    if "full" in results and "qlora" in results:
        f, q = results["full"], results["qlora"]
        summary["qlora_over_full_weights_plus_optimizer"] = (q["weight_bytes"] + q["optimizer_bytes"]) / (
            f["weight_bytes"] + f["optimizer_bytes"])
        if f["classify_accuracy"] is not None and q["classify_accuracy"] is not None:
            summary["qlora_minus_full_class_accuracy"] = q["classify_accuracy"] - f["classify_accuracy"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nstart: {start_what}; {args.steps} steps at lr {args.learning_rate:g}\n")
    print(table(results))
    if "qlora_over_full_weights_plus_optimizer" in summary:
        print(f"\nQLoRA / full, weights + AdamW bytes: {summary['qlora_over_full_weights_plus_optimizer']:.3f} "
              f"(target <= 0.4)")


if __name__ == "__main__":
    from semivlm.config import load_config

    main(load_config(BenchConfig))
